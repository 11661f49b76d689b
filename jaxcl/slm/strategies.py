"""The continual-learning strategies of `jaxcl.strategies` on SLM's path, as baseline rows.

    slm.baselines: [sequential, replay, multitask, ewc, lwf, olora]

A strategy row is the sequential baseline (one shared set of `slm.top_k` slots, the union head over every
seen column, class-incremental: no task id at evaluation) with one strategy acting on the classifier's
trainable tree (the JARe bank and the head; the encoder stays frozen):
  - `ewc`: the empirical Fisher of each finished task over `strategies.ewc.fisher_batches` batches of its
    training texts, one text at a time, and the quadratic penalty (`jaxcl.strategies.ewc`);
  - `lwf`: KL to the model the task started from, over the columns learned before it
    (`jaxcl.strategies.distill`);
  - `olora`: every task trains its own `top_k` slots and its own head columns (the earlier tasks' frozen),
    with O-LoRA's orthogonality penalty against the earlier tasks' subspaces; evaluation sums every seen
    task's increments (`jaxcl.strategies.olora`).
The strategy objects are the ones the LM loops run; `SlmStrategyRun` is the run-side surface they read
(what `jaxcl.train.loop.ContinualRun` provides there). With strength 0 an ewc or lwf row trains exactly
like the sequential row (same initialisation, same batches).
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.slm.classifier import ContinualClassifier, _logits, classification_loss

ROWS = ("ewc", "lwf", "olora")        # slm.baselines entries that are strategies (names in jaxcl.train.strategy.REGISTRY)


class SlmStrategyRun:
    """What a strategy reads from the run on SLM's path: `cfg`, `method` ("slm"), `mesh` (None: one device),
    `loss_fn`, `forward_logits`, `strategy_batches`, `grows_at`, and the learner's slot layout
    (`task_slots`, `max_slots`, `top_k`)."""

    method = "slm"
    mesh = None

    def __init__(self, cfg: Any, learner: ContinualClassifier, tasks: list[tuple[Any, np.ndarray, np.ndarray]]):
        """`tasks[t]` = (data with ids / mask / labels, its head columns, the columns seen before it)."""
        self.cfg, self.learner, self.tasks = cfg, learner, tasks

    # ------------------------------------------------------------------ what the strategies call
    def loss_fn(self, model_cfg: Any):
        learner = self.learner

        def loss_fn(params, batch, rng=None, deterministic=True):
            return classification_loss(learner.model, learner.backbone, params, batch)

        return loss_fn

    def forward_logits(self, model_cfg: Any):
        """fn(trainable, outputs) -> logits [b, C] on the batch's texts, slots and mixing weights, kept on the
        columns learned before the task (-1e9 elsewhere), as `outputs["logits"]` is."""
        learner = self.learner

        def forward(params, outputs):
            logits = _logits(learner.model, learner.backbone, params, outputs["ids"], outputs["mask"],
                             outputs["slots"], outputs["mix_weights"])
            return jnp.where(outputs["old"], logits, -1e9)

        return forward

    def strategy_batches(self, stage: int, model_cfg: Any, n: int) -> Iterator[dict[str, jax.Array]]:
        """`n` batches of `slm.batch_size` texts of task `stage`'s training split (a fixed draw per run seed and
        task), with the slots that task trained (one row of slots per text: a Fisher pass scans them)."""
        from jaxcl.slm.classifier import classification_batch

        data, _, old = self.tasks[stage]
        rng = np.random.default_rng((self.cfg.run.seed, 31_337, stage))
        slots, weights = self.training_slots(stage)
        b = self.cfg.slm.batch_size
        allowed = self.learner.col_task != -1
        for _ in range(n):
            rows = rng.choice(len(data), size=b, replace=len(data) < b)
            yield classification_batch(data.ids[rows], data.mask[rows],
                                       self.learner.global_labels(stage, data.labels[rows]),
                                       np.repeat(slots[None], b, 0), np.repeat(weights[None], b, 0),
                                       np.repeat(allowed[None], b, 0), np.repeat(old[None], b, 0))

    def grows_at(self, stage: int) -> bool:
        return False

    # ------------------------------------------------------------------ the slot layout
    per_task_slots = False        # O-LoRA (OLoRARun) gives every task its own slots; the other rows share the first top_k

    def training_slots(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots [K], mixing weights [K]) task `task` trains with."""
        k = self.cfg.slm.top_k
        start = task * self.cfg.slm.slots_per_task if self.per_task_slots else 0
        return np.arange(start, start + k), np.full((k,), 1.0 / k, np.float32)

    def slot_flags(self, tasks) -> np.ndarray:
        """float32 [P]: 1 on the training slots of every task in `tasks`."""
        out = np.zeros((self.learner.shape.max_slots,), np.float32)
        for t in tasks:
            out[self.training_slots(t)[0]] = 1.0
        return out


class OLoRARun(SlmStrategyRun):
    per_task_slots = True


def single_device_shardings(tree: Any) -> Any:
    """SLM's path runs on one device: every leaf on it (what `private_copy` lays mirrors out on)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: sharding, tree)


__all__ = ["ROWS", "SlmStrategyRun", "OLoRARun", "single_device_shardings"]
