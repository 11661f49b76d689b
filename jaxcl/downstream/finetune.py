"""Fine-tune one copy of a model on one task (one downstream cell) and predict its evaluation splits.

    result = finetune(model_cfg, params, task, tokenizer=tok, settings=cfg.downstream, lr=3e-4, seed=0,
                      prompt_id=2, evaluate=("test",), mesh=mesh)
    result.predictions["test"]      # [n_test] int32 predicted class ids

The whole model is trained (every backbone parameter, the domain prompt when one is fed, and a fresh
linear head; `jaxcl.downstream.classifier`), as in ELLE's downstream protocol (thunlp/ELLE fine-tunes the
whole model per task) and ContinualLM's end-task evaluation. The optimizer is jaxcl's AdamW
(`jaxcl.train.optimizer.make_optimizer`: decoupled weight decay on matrices only, global-norm clipping)
with linear warmup over `warmup_ratio` of the steps and cosine decay to 0.

Deterministic for a seed: the head's initialisation, the dropout keys and the order of training texts
(a permutation per epoch) are pure functions of (seed, task name), batches have a fixed shape (the last
one of an epoch is padded with zero-weight rows), and XLA runs the same program on the same inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.config import ConfigError, DownstreamConfig, OptimConfig
from jaxcl.downstream.classifier import encode_texts, init_head, make_predict, make_train_step, resolve_pooling
from jaxcl.downstream.tasks import DownstreamTask
from jaxcl.models import ModelConfig
from jaxcl.train.optimizer import make_optimizer

__all__ = ["FinetuneResult", "finetune", "finetune_steps"]


@dataclasses.dataclass
class FinetuneResult:
    """What one fine-tuning produced: predictions per evaluated split, the per-epoch mean training loss,
    optimizer steps, texts that were truncated, and wall seconds (training, evaluation)."""

    predictions: dict[str, np.ndarray]
    train_loss: list[float]
    steps: int
    truncated: dict[str, int]
    seconds: dict[str, float]
    params: Any = None                  # the fine-tuned {"backbone", "head"} (only with keep_params=True)


def _task_seed(seed: int, task: str) -> int:
    digest = hashlib.sha256(f"{seed}/{task}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@functools.lru_cache(maxsize=32)
def _compiled_step(model_cfg: ModelConfig, optim: OptimConfig, total: int, pooling: str, with_prompts: bool):
    """(jitted optimizer init, jitted train step), shared by the cells of one model size and schedule."""
    tx = make_optimizer(optim, total)
    return jax.jit(tx.init), make_train_step(model_cfg, tx, pooling, with_prompts=with_prompts)


@functools.lru_cache(maxsize=32)
def _compiled_predict(model_cfg: ModelConfig, pooling: str, with_prompts: bool):
    return make_predict(model_cfg, pooling, with_prompts=with_prompts)


def _gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) sharded array as one host array on every process."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


BUCKET = 32      # batches are cut to the longest text rounded up to a multiple of this (at most 4 shapes at 128)


def _bucket(mask: np.ndarray, max_len: int) -> int:
    """Columns a batch needs: its longest text, rounded up to a multiple of BUCKET (padding is masked, so the
    result does not depend on it; a causal model's real positions never see the padding)."""
    longest = int(mask.sum(axis=1).max())
    return min(max_len, BUCKET * max(1, math.ceil(longest / BUCKET)))


def finetune_steps(n_train: int, settings: DownstreamConfig) -> int:
    """Optimizer steps of one cell: epochs x ceil(n_train / batch_size)."""
    return settings.epochs * math.ceil(n_train / settings.batch_size)


def _put(batch: dict[str, np.ndarray], sharding_2d, sharding_1d) -> dict[str, jax.Array]:
    """The global batch (the same on every process) as global arrays on the mesh (`device_batch`: each process
    fills only its own devices' shards, so this holds on a multi-host TPU slice too)."""
    if sharding_2d is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    from jaxcl.data.stream import device_batch

    return device_batch(batch, sharding_2d)


def finetune(model_cfg: ModelConfig, backbone: Any, task: DownstreamTask, *, tokenizer, settings: DownstreamConfig,
             lr: float, seed: int, prompt_id: int | None, evaluate: Sequence[str] = ("test",),
             clip_norm: float = 1.0, mesh=None, rules=None, keep_params: bool = False, head_columns: int | None = None,
             on_step: Callable[[int, int, float], None] | None = None) -> FinetuneResult:
    """Fine-tune `backbone` (left untouched: a copy is trained) with a new head on `task`'s train split; return
    the predictions on the `evaluate` splits. `prompt_id`: the domain prompt fed with every text (None: no
    prompt). `head_columns`: the head's width (default the class count rounded up to 8; extra columns are
    masked out), so tasks with different label counts can share one compiled step. `mesh`: batches are sharded over its data axes and parameters keep the shardings `backbone` has.
    Raises ConfigError naming `downstream.batch_size` when a batch does not split over the data-parallel
    devices, and ValueError when `prompt_id` is given to a model without prompts."""
    from jaxcl.parallel import batch_sharding

    if prompt_id is not None and not model_cfg.num_prompts:
        raise ValueError(f"prompt_id={prompt_id} but the model has no prompts (model.num_prompts=0)")
    if prompt_id is not None and not 0 <= prompt_id < model_cfg.num_prompts:
        raise ValueError(f"prompt_id={prompt_id} is outside the model's {model_cfg.num_prompts} prompts")
    pooling = resolve_pooling(model_cfg, settings.pooling)
    sharding_2d = sharding_1d = None
    if mesh is not None:
        dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        for key in ("batch_size", "eval_batch_size"):
            if getattr(settings, key) % dp:
                raise ConfigError(f"downstream.{key}={getattr(settings, key)} does not split over the {dp} "
                                  "data-parallel devices of the mesh (mesh.data x mesh.fsdp)")
        sharding_2d, sharding_1d = batch_sharding(mesh, rules, 2), batch_sharding(mesh, rules, 1)
    train = task.split("train")
    n_classes = len(task.label_names)
    ids, mask, truncated_train = encode_texts(tokenizer, train.texts, settings.max_len)
    labels = np.asarray(train.labels, np.int32)
    rng = jax.random.key(_task_seed(seed, task.name))
    head_rng, dropout_rng = jax.random.split(rng)
    columns = head_columns or 8 * math.ceil(n_classes / 8)
    if columns < n_classes:
        raise ValueError(f"head_columns={columns} is fewer than the task's {n_classes} classes")
    head = init_head(head_rng, model_cfg.d_model, columns)
    class_mask = jnp.arange(columns) < n_classes
    if mesh is not None:
        from jaxcl.parallel import replicated

        head = jax.device_put(head, replicated(mesh))
    # A copy: the train step donates its inputs, and the caller's backbone serves the next cell.
    params = {"backbone": jax.tree.map(jnp.copy, backbone), "head": head}
    bs = settings.batch_size
    per_epoch = math.ceil(len(train) / bs)
    total = settings.epochs * per_epoch
    # Peak rate 1, scaled by `lr` inside the step: the compiled step is shared by every rate of the grid.
    optim = OptimConfig(lr=1.0, warmup_steps=int(settings.warmup_ratio * total), min_lr_ratio=0.0,
                        weight_decay=settings.weight_decay, clip_norm=clip_norm)
    init_fn, step_fn = _compiled_step(model_cfg, optim, total, pooling, prompt_id is not None)
    opt_state = init_fn(params)
    lr_scalar = jnp.asarray(lr, jnp.float32)
    prompt_col = np.full((bs,), 0 if prompt_id is None else prompt_id, np.int32)
    order_rng = np.random.default_rng(_task_seed(seed, task.name))
    losses, step, start = [], 0, time.time()
    for epoch in range(settings.epochs):
        order = order_rng.permutation(len(train))
        epoch_loss = []
        for b in range(per_epoch):
            rows = order[b * bs:(b + 1) * bs]
            weights = np.zeros((bs,), np.float32)
            weights[:len(rows)] = 1.0
            rows = np.concatenate([rows, np.full((bs - len(rows),), rows[0], rows.dtype)])
            width = _bucket(mask[rows], settings.max_len)
            batch = {"ids": ids[rows, :width], "mask": mask[rows, :width], "labels": labels[rows], "weights": weights}
            if prompt_id is not None:
                batch["prompt_ids"] = prompt_col
            batch = _put(batch, sharding_2d, sharding_1d)
            batch["class_mask"] = class_mask
            params, opt_state, loss = step_fn(params, opt_state, batch, jax.random.fold_in(dropout_rng, step),
                                              lr_scalar)
            step += 1
            epoch_loss.append(loss)
            if on_step is not None:
                on_step(step, total, float(loss))
        losses.append(float(np.mean(jax.device_get(epoch_loss))))
    train_seconds = time.time() - start
    start = time.time()
    predict = _compiled_predict(model_cfg, pooling, prompt_id is not None)
    predictions, truncated = {}, {"train": truncated_train}
    for split in evaluate:
        texts = task.split(split).texts
        e_ids, e_mask, truncated[split] = encode_texts(tokenizer, texts, settings.max_len)
        eb = settings.eval_batch_size
        out = []
        for b in range(0, len(texts), eb):
            chunk_ids, chunk_mask = e_ids[b:b + eb], e_mask[b:b + eb]
            n = len(chunk_ids)
            if n < eb:                                     # a fixed shape: pad with copies of the first row
                chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[:1], eb - n, 0)])
                chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[:1], eb - n, 0)])
            width = _bucket(chunk_mask, settings.max_len)
            chunk_ids, chunk_mask = chunk_ids[:, :width], chunk_mask[:, :width]
            batch = _put({"ids": chunk_ids, "mask": chunk_mask,
                          "prompt_ids": np.full((eb,), 0 if prompt_id is None else prompt_id, np.int32)},
                         sharding_2d, sharding_1d)
            predicted = predict(params, batch["ids"], batch["mask"], batch["prompt_ids"], class_mask)
            out.append(np.asarray(_gather(predicted))[:n])
        predictions[split] = np.concatenate(out).astype(np.int32)
    return FinetuneResult(predictions, losses, step, truncated,
                          {"train": train_seconds, "evaluate": time.time() - start},
                          params if keep_params else None)
