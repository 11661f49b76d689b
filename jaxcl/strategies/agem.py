"""A-GEM: averaged gradient episodic memory (Chaudhry et al. 2019, ICLR, "Efficient Lifelong Learning with
A-GEM", eq. 11).

Every step the gradient g of the current batch is compared with the reference gradient g_ref of a batch
drawn from the memory of the earlier domains; when they conflict (g . g_ref < 0) g is projected so that
the update does not increase the memory loss to first order:

    g~ = g - (g . g_ref / g_ref . g_ref) g_ref,   else g~ = g

The projection is an optax transformation (`agem_projection`) chained before the run's optimizer
(clipping, AdamW); the reference gradient arrives as its extra argument `reference_grads`, computed by the
train step on `reference_batch`. Cost: one more forward and backward pass per step (counted in the run's
training FLOPs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.config import Config, ConfigError
from jaxcl.strategies.memory import ReplayMemory
from jaxcl.train.strategy import Strategy

REFERENCE = 3      # the phase of the reference draws (distinct from ELLE's warmup 0 and replay 1)


def tree_dot(a: Any, b: Any) -> jax.Array:
    """Sum over every leaf of the elementwise product (`optax.tree.vdot`; jaxcl's params are float32)."""
    return optax.tree.vdot(a, b)


def agem_projection() -> optax.GradientTransformationExtraArgs:
    """The A-GEM projection as an optax transformation (stateless). `update(g, state, params,
    reference_grads=g_ref)` returns g~ (above); without `reference_grads` (no memory yet) it is the identity.
    Leaves keep their dtype; the dot products are float32."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, reference_grads=None, **extra):
        del params, extra
        if reference_grads is None:
            return updates, state
        dot = tree_dot(updates, reference_grads)
        norm2 = tree_dot(reference_grads, reference_grads)
        coef = dot / jnp.maximum(norm2, jnp.finfo(jnp.float32).tiny)
        conflict = dot < 0
        projected = jax.tree.map(lambda g, r: jnp.where(conflict, g - (coef * r).astype(g.dtype), g),
                                 updates, reference_grads)
        return projected, state

    return optax.GradientTransformationExtraArgs(init, update)


class AGEM(Strategy):
    """`strategies.agem`: memory_fraction of each domain kept; reference batches of reference_batch_size rows
    (0 = data.batch_size) drawn uniformly from the memory of the domains before the stage."""

    name = "agem"
    uses_reference_batch = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.settings = cfg.strategies.agem
        self.memory: ReplayMemory | None = None

    def check(self, run: Any) -> None:
        size = self.settings.reference_batch_size or run.cfg.data.batch_size
        dp = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
        if size % dp:
            raise ConfigError(f"strategies.agem.reference_batch_size={size} is not divisible by the data-parallel "
                              f"size {dp}")
        self.memory = ReplayMemory(run.train_sequences, run.domains, self.settings.memory_fraction, run.cfg.run.seed)

    def gradient_transformation(self, run: Any) -> optax.GradientTransformation:
        return agem_projection()

    def reference_batch(self, run: Any, stage: int, step: int, model_cfg: Any) -> dict[str, np.ndarray] | None:
        """Rows drawn uniformly from the union of the earlier domains' memories (a domain with probability
        proportional to its memory size, as one memory would be sampled), with their domains' prompts."""
        old = run.domains[:stage]
        if not old:
            return None
        size = self.settings.reference_batch_size or run.cfg.data.batch_size
        rng = np.random.default_rng([run.cfg.run.seed, stage, REFERENCE, step])
        sizes = np.array([self.memory.size(d) for d in old], np.float64)
        if not sizes.sum():
            return None                              # an empty memory: no constraint
        sources = rng.choice(len(old), size=size, p=sizes / sizes.sum())
        ids = np.empty((size, run.cfg.data.seq_len), np.int32)
        for i, d in enumerate(old):
            rows = np.flatnonzero(sources == i)
            if len(rows):
                ids[rows] = self.memory.banks[d].take(rng.integers(0, self.memory.size(d), size=len(rows)))
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if model_cfg.num_prompts:
            batch["prompt_ids"] = np.array([run.domains.index(old[s]) for s in sources], np.int32)
        return batch

    def step_flops(self, run: Any, model_cfg: Any) -> float:
        from jaxcl.train.loop import train_step_flops

        size = self.settings.reference_batch_size or run.cfg.data.batch_size
        return train_step_flops(model_cfg, size, run.cfg.data.seq_len)


__all__ = ["AGEM", "agem_projection", "tree_dot"]
