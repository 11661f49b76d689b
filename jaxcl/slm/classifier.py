"""Continual text classification on a frozen encoder: JARe increments + one preallocated union head.

`ContinualClassifier` holds everything a continual learner changes, all with fixed shapes:
  keys     DTKR key pool [g, P, c] + slot owners [P]            (SLM only)
  bank     JARe increments per target [L, P, r, d]               (trainable state)
  head     one linear head over the union of all label sets [d, C_max] + [C_max]   (trainable state)
  col_task owner task of every head column [C_max] (-1 = free); task t's labels are its columns.

The same code path serves SLM and the baselines; what differs is which slots are mixed (retrieved per
input, or a fixed shared set), which columns may be predicted, and which entries may change:
  - SLM: task t trains only its own slots and columns; at evaluation the slots are retrieved from the
    text alone and the head is restricted to the columns of the task the retrieval chose (or the union).
  - sequential / replay / multitask: one shared set of K slots and all seen columns (class-incremental).
  - strategy rows (`jaxcl.slm.strategies`: ewc, lwf, olora): the sequential setup (olora: per-task slots)
    plus a strategy's loss term on the trainable tree (`train_step(..., terms=, strategy=)`).
Updates are masked with `jaxcl.slm.jare.masked_apply`, so everything outside a task's mask stays
bit-identical. Nothing here ever receives a task id at evaluation: `predict` takes token ids and the
text's query only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.models import ModelConfig, build, mean_pool
from jaxcl.slm import dtkr, jare

FREE = -1


@dataclasses.dataclass(frozen=True)
class LearnerShape:
    """Static sizes: everything is preallocated from these, so adding a task never recompiles."""

    max_tasks: int
    slots_per_task: int
    top_k: int
    rank: int
    max_classes: int
    groups: int
    targets: tuple[str, ...] = ("attn.o",)
    per_example: bool = True           # per-example retrieval (False: one retrieval per batch, as the paper)
    head: str = "retrieved"            # "retrieved": columns of the retrieved task; "union": all seen columns
    mix: str = "global"                # "global": mix the top-K of all slots (paper); "task": mix the top-K of
                                       # the chosen task's slots only
    task_choice: str = "vote"          # "vote" (weight vote of the global top-K), "best_keys" or "gaussian" (see dtkr)
    gaussian_shrinkage: float = 0.01   # task_choice="gaussian": covariance shrinkage (dtkr.add_task_statistics)

    @property
    def max_slots(self) -> int:
        return self.max_tasks * self.slots_per_task


class ContinualClassifier:
    """Frozen encoder + JARe bank + union head; `train_step` / `predict` are jitted once."""

    def __init__(self, model_cfg: ModelConfig, backbone: Any, shape: LearnerShape, query_dim: int, rng: jax.Array,
                 tx: optax.GradientTransformation, init_std: float | None = None):
        if shape.top_k > shape.slots_per_task:
            raise ValueError(f"slm.top_k={shape.top_k} exceeds slm.slots_per_task={shape.slots_per_task}")
        self.model_cfg, self.backbone, self.shape, self.tx = model_cfg, backbone, shape, tx
        self.model = build(model_cfg)
        bank_rng, head_rng = jax.random.split(rng)
        head_kernel = jax.random.normal(head_rng, (model_cfg.d_model, shape.max_classes)) * 0.02
        self.trainable = {"bank": jare.init_increment_bank(bank_rng, model_cfg, max_slots=shape.max_slots,
                                                           rank=shape.rank, targets=shape.targets, init_std=init_std),
                          "head": {"kernel": head_kernel, "bias": jnp.zeros((shape.max_classes,))}}
        self.keys = dtkr.new_key_bank(shape.max_slots, query_dim, shape.groups, max_tasks=shape.max_tasks)
        self.col_task = np.full((shape.max_classes,), FREE, np.int32)
        self.label_names: dict[int, tuple[str, ...]] = {}
        self.opt_state = tx.init(self.trainable)
        self._train_step, self._predict = _train_step, _predict       # shared by every learner: compiled once
        self._retrieve = _retrieve

    # ------------------------------------------------------------------ tasks, slots and columns
    @property
    def n_tasks(self) -> int:
        return len(self.label_names)

    def add_task(self, task: int, label_names: tuple[str, ...]) -> np.ndarray:
        """Give a new task its head columns (the next free ones); returns their indices."""
        if task in self.label_names:
            raise ValueError(f"task {task} was already added")
        if task >= self.shape.max_tasks:
            raise ValueError(f"task index {task} exceeds slm.max_tasks={self.shape.max_tasks}")
        if not label_names:
            raise ValueError(f"task {task} has no labels")
        free = np.flatnonzero(self.col_task == FREE)
        if len(free) < len(label_names):
            raise ValueError(f"the head has {len(free)} free columns, task {task} needs {len(label_names)} "
                             f"(raise slm.max_classes)")
        cols = free[:len(label_names)]
        self.col_task[cols] = task
        self.label_names[task] = tuple(label_names)
        return cols

    def columns(self, task: int) -> np.ndarray:
        return np.flatnonzero(self.col_task == task)

    def global_labels(self, task: int, labels: np.ndarray) -> np.ndarray:
        """Task-local labels -> head columns (the union label space)."""
        return self.columns(task)[np.asarray(labels)]

    def set_task_keys(self, task: int, task_keys: jax.Array, queries: np.ndarray) -> np.ndarray:
        """Freeze a task's trained keys into the pool (its JARe slots are the same slot indices) and add the
        statistics of its training `queries` [n, h] (`dtkr.add_task_statistics`; read by
        `task_choice="gaussian"`); returns the slots."""
        self.keys, slots = dtkr.add_task_keys(self.keys, task, task_keys)
        self.keys = dtkr.add_task_statistics(self.keys, task, queries, self.shape.gaussian_shrinkage)
        return slots

    def reset_optimizer(self) -> None:
        """A fresh optimizer state for the next task (old moments must not move new parameters)."""
        self.opt_state = self.tx.init(self.trainable)

    def update_mask(self, slots: np.ndarray, columns: np.ndarray) -> Any:
        """Bool tree: True on the entries that training may change (these slots and head columns)."""
        slot_flags = np.zeros((self.shape.max_slots,), bool)
        slot_flags[np.asarray(slots, int)] = True
        col_flags = np.zeros((self.shape.max_classes,), bool)
        col_flags[np.asarray(columns, int)] = True
        head = {"kernel": np.broadcast_to(col_flags[None, :], (self.model_cfg.d_model, self.shape.max_classes)),
                "bias": col_flags}
        bank = jax.tree.map(lambda x: np.broadcast_to(slot_flags[None, :, None, None], x.shape),
                            self.trainable["bank"])
        return jax.tree.map(jnp.asarray, {"bank": bank, "head": head})

    # ------------------------------------------------------------------ public steps
    def train_step(self, ids, mask, labels, slots, weights, allowed_cols, update_mask, *, old_cols=None,
                   terms: tuple = (), strategy: dict | None = None, rng: jax.Array | None = None):
        """One masked optimizer step; labels are head columns; returns the loss (cross-entropy only).

        `terms`: strategies' loss terms ((name, fn(trainable, batch, outputs, state, rng)), ...; static, so
        build them once per run), `strategy` their states by name; `old_cols` [C] bool the columns learned
        before this task (what `outputs["logits"]` keeps for distillation). With terms the return value is
        (loss, {name: penalty})."""
        batch = classification_batch(ids, mask, labels, slots, weights, allowed_cols,
                                     np.zeros_like(np.asarray(allowed_cols), bool) if old_cols is None else old_cols)
        self.trainable, self.opt_state, loss, penalties = self._train_step(
            self.backbone, self.trainable, self.opt_state, batch, update_mask, strategy or {},
            jax.random.key(0) if rng is None else rng, model=self.model, tx=self.tx, terms=tuple(terms))
        return (loss, penalties) if terms else loss

    def retrieve_for_training(self, task: int, queries: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """DTKR among `task`'s own slots (task identity is known while training, never at evaluation)."""
        allowed = jnp.asarray(np.asarray(self.keys.slot_task) == task)
        return self._retrieve(jnp.asarray(queries), self.keys.keys, allowed, top_k=self.shape.top_k,
                              per_example=self.shape.per_example)

    def choose_tasks(self, queries: np.ndarray) -> np.ndarray:
        """The task DTKR picks for each text from its query alone ([n, c] -> int32 [n]), as `predict` does.

        Why: with per-example retrieval, `mix="task"` and `head="retrieved"`, a prediction depends only on
        the text and the chosen task (whose keys, slots and head columns are frozen once it is trained), so a
        runner can reuse it for as long as the choice does not change (`SlmRun`'s evaluation cache).
        """
        return np.asarray(_choose(jnp.asarray(queries), self.keys, top_k=self.shape.top_k,
                                  per_example=self.shape.per_example, n_tasks=self.shape.max_tasks,
                                  mix=self.shape.mix, task_choice=self.shape.task_choice))

    @property
    def predictions_reusable(self) -> bool:
        """True when a text's prediction is a function of (text, chosen task) only (see `choose_tasks`)."""
        return self.shape.per_example and self.shape.mix == "task" and self.shape.head == "retrieved"

    def predict(self, ids: np.ndarray, mask: np.ndarray, queries: np.ndarray, *, use_retrieval: bool = True,
                fixed_slots: np.ndarray | None = None,
                fixed_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(head column [b], chosen task [b], retrieved slots [G, K]) for one batch of texts.

        Inputs are the text's tokens and its query only; which task the text came from is never passed.
        Without retrieval the slots are `fixed_slots` [M] (default the first top_k) mixed by `fixed_weights`
        [M] (default 1/top_k each; O-LoRA: every seen task's slots), and every seen column may be predicted.
        """
        fixed = np.arange(self.shape.top_k) if fixed_slots is None else np.asarray(fixed_slots)
        weights = (np.full(fixed.shape, 1.0 / self.shape.top_k, np.float32) if fixed_weights is None
                   else np.asarray(fixed_weights, np.float32))
        cols, task, slots = self._predict(self.backbone, self.trainable, self.keys, jnp.asarray(ids),
                                          jnp.asarray(mask), jnp.asarray(queries), jnp.asarray(self.col_task),
                                          jnp.asarray(fixed, jnp.int32), jnp.asarray(weights),
                                          use_retrieval=bool(use_retrieval), model=self.model, shape=self.shape)
        return np.asarray(cols), np.asarray(task), np.asarray(slots)


# ----------------------------------------------------------------------------- jitted pieces
# Module-level, with the model / optimizer / shape static and the backbone an argument (not a closure
# constant), so every learner of a run shares one compiled program per shape.
def _logits(model, backbone, trainable, ids, mask, slots, weights):
    adapters = jare.mix_adapters(trainable["bank"], slots, weights)
    hidden = model.apply({"params": backbone}, ids, mask, adapters=adapters).hidden
    pooled = mean_pool(hidden, mask)                                                     # [b, d]
    return pooled @ trainable["head"]["kernel"] + trainable["head"]["bias"]               # [b, C_max]


def classification_batch(ids, mask, labels, slots, weights, allowed_cols, old_cols) -> dict[str, jax.Array]:
    """One training batch as the classification loss reads it: ids / mask [b, s], labels (head columns) [b],
    slots / mix_weights [G, K] (G = 1 or b), allowed / old [C] or [b, C] bool."""
    return {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask), "labels": jnp.asarray(labels, jnp.int32),
            "slots": jnp.asarray(slots, jnp.int32), "mix_weights": jnp.asarray(weights, jnp.float32),
            "allowed": jnp.asarray(allowed_cols, bool), "old": jnp.asarray(old_cols, bool)}


def classification_loss(model, backbone, trainable, batch):
    """(mean cross-entropy over the allowed columns, (sum, n, outputs)) for `classification_batch`.

    `outputs` is what a strategy's loss term reads (`jaxcl.train.strategy`): `logits` [b, C] kept on the
    columns learned before this task (`old`; -1e9 elsewhere: what LwF distils), `weights` [b] (every text
    scored) and the batch's own entries (what `jaxcl.slm.strategies` feeds a teacher)."""
    logits = _logits(model, backbone, trainable, batch["ids"], batch["mask"], batch["slots"], batch["mix_weights"])
    nll = optax.softmax_cross_entropy_with_integer_labels(jnp.where(batch["allowed"], logits, -1e9), batch["labels"])
    outputs = {**batch, "logits": jnp.where(batch["old"], logits, -1e9), "weights": jnp.ones(nll.shape, jnp.float32)}
    return nll.mean(), (nll.sum(), jnp.asarray(nll.shape[0], jnp.float32), outputs)


@functools.partial(jax.jit, static_argnames=("model", "tx", "terms"), donate_argnums=(1, 2))
def _train_step(backbone, trainable, opt_state, batch, update_mask, strategy, rng, *, model, tx, terms):
    def loss_fn(t):
        loss, (_, _, outputs) = classification_loss(model, backbone, t, batch)
        penalties = {name: term(t, batch, outputs, strategy.get(name), rng) for name, term in terms}
        return loss + sum(penalties.values()), (loss, penalties)

    (_, (loss, penalties)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return jare.masked_apply(trainable, updates, update_mask), opt_state, loss, penalties


@functools.partial(jax.jit, static_argnames=("model", "shape", "use_retrieval"))
def _predict(backbone, trainable, keys, ids, mask, queries, col_task, fixed_slots, fixed_weights, *, use_retrieval,
             model, shape):
    """Predicted head column [b], chosen task [b] and retrieved slots [G, K] from text inputs only."""
    seen = col_task[None, :] != FREE
    if use_retrieval:
        slots, weights, task = dtkr.retrieve_from_text(queries, keys, shape.top_k, shape.per_example,
                                                       shape.max_tasks, shape.mix, shape.task_choice)
        task = jnp.broadcast_to(task, (ids.shape[0],))
        allowed = col_task[None, :] == task[:, None] if shape.head == "retrieved" else seen
    else:
        slots, weights = fixed_slots[None, :], fixed_weights[None, :]
        task = jnp.broadcast_to(dtkr.chosen_task(slots, weights, keys.slot_task, shape.max_tasks), (ids.shape[0],))
        allowed = seen
    allowed = jnp.broadcast_to(allowed, (ids.shape[0], col_task.shape[0]))
    logits = jnp.where(allowed, _logits(model, backbone, trainable, ids, mask, slots, weights), -jnp.inf)
    return jnp.argmax(logits, axis=-1), task, slots


_retrieve = jax.jit(dtkr.retrieve, static_argnames=("top_k", "per_example"))


@functools.partial(jax.jit, static_argnames=("top_k", "per_example", "n_tasks", "mix", "task_choice"))
def _choose(queries, keys, *, top_k, per_example, n_tasks, mix, task_choice):
    return dtkr.retrieve_from_text(queries, keys, top_k, per_example, n_tasks, mix, task_choice)[2]

__all__ = ["LearnerShape", "ContinualClassifier", "FREE"]
