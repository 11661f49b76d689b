"""Elastic weight consolidation: a quadratic penalty that keeps the parameters important for earlier
domains near their values after those domains.

    penalty(theta) = lambda / 2 * sum_k F_k (theta_k - theta*_k)^2          (Kirkpatrick et al. 2017, eq. 3)

F is the diagonal empirical Fisher of the finished stage, on gold tokens, one sequence at a time:

    F = 1/N sum_i (grad_theta NLL_i)^2,   NLL_i = the mean token NLL of training sequence i

over the `strategies.ewc.fisher_batches` first batches of the stage's training stream (N sequences),
at the model the stage ended with. Across stages:
  - online (Schwarz et al. 2018, "Progress & Compress", eq. 8): F <- decay * F + F_new, theta* <- the latest model;
  - not online (the original, one penalty per earlier stage): sum_j F_j (theta - theta_j)^2 is kept as one
    quadratic, F = sum_j F_j and theta* = sum_j F_j theta_j / F (where F > 0; equal up to a constant, so
    its gradient is exactly the sum of the per-stage penalties' gradients).

The Fisher pass costs one forward and backward per sequence (counted in the stage's training FLOPs).

Across growth (an ELLE run with `elle.schedule`): at a stage that grows, the Fisher is carried through the
same growth by `jaxcl.transforms.grow_importance` (copied, split and rescaled coordinates keep their
source's importance, new coordinates get 0), and the anchor is the model the stage starts from (grown and
warmed up), so the penalty is 0 at the stage's first step. Both variants reset their anchor there: a
per-stage anchor of the smaller model has no counterpart for the new coordinates.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcl.config import Config
from jaxcl.parallel import replicated
from jaxcl.strategies.common import private_copy
from jaxcl.train.strategy import Strategy


def ewc_penalty(params: Any, fisher: Any, anchor: Any) -> jax.Array:
    """sum over every leaf of F * (theta - theta*)^2 (float32 scalar; halve and scale by lambda outside)."""
    return sum(jnp.sum(f * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32)))
               for p, f, a in zip(jax.tree.leaves(params), jax.tree.leaves(fisher), jax.tree.leaves(anchor)))


def make_fisher_fn(loss_fn, mesh, param_shardings):
    """fisher_sum(params, batch) -> sum over the batch's sequences of (grad NLL_i)^2, a params-shaped float32
    tree sharded like the params. `loss_fn` is the run's (jaxcl.train.step.make_loss_fn, or SLM's
    classification loss), called on one sequence at a time, deterministically (no dropout). `mesh=None`
    (SLM's single-device path): a plain jit."""

    def per_sequence(params, acc, row):
        one = {k: v[None] for k, v in row.items()}
        grads = jax.grad(lambda p: loss_fn(p, one, jax.random.key(0), deterministic=True)[0])(params)
        return jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), acc, grads)

    def fisher_sum(params, batch):
        acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        acc, _ = jax.lax.scan(lambda a, row: (per_sequence(params, a, row), None), acc, batch)
        return acc

    if mesh is None:
        return jax.jit(fisher_sum)
    return jax.jit(fisher_sum, in_shardings=(param_shardings, replicated(mesh)), out_shardings=param_shardings)


def empirical_fisher(run: Any, stage: int, model_cfg: Any, params: Any, param_shardings: Any,
                     n_batches: int) -> Any:
    """The diagonal empirical Fisher (above) of `stage` at `params`: float32, sharded like the params."""
    fisher_sum = make_fisher_fn(run.loss_fn(model_cfg), run.mesh, param_shardings)
    total, n = None, 0
    for batch in run.strategy_batches(stage, model_cfg, n_batches):
        part = fisher_sum(params, {k: jnp.asarray(v) for k, v in batch.items()})
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        n += len(next(iter(batch.values())))        # every entry leads with the batch axis
    return jax.tree.map(lambda f: f / n, total)


class EWC(Strategy):
    """`strategies.ewc`: strength (lambda), fisher_batches, online, decay."""

    name = "ewc"
    mirrors = ("fisher", "anchor")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.settings = cfg.strategies.ewc

    def begin_stage(self, run: Any, stage: int, model_cfg: Any, params: Any, state: dict[str, Any] | None,
                    shardings: Any) -> dict[str, Any]:
        """After growth: the Fisher through the growth, the anchor = the stage's starting params."""
        if not state or not run.grows_at(stage):
            return state or {}
        fisher = run.grow_importance(stage, state["fisher"])
        anchor = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return private_copy({"fisher": fisher, "anchor": anchor}, {"fisher": shardings, "anchor": shardings})

    def loss_term(self, run: Any, model_cfg: Any):
        strength = self.settings.strength

        def term(params, batch, outputs, state, rng):
            return 0.5 * strength * ewc_penalty(params, state["fisher"], state["anchor"])

        return term

    def end_stage(self, run: Any, stage: int, model_cfg: Any, params: Any, state: dict[str, Any] | None,
                  shardings: Any) -> tuple[dict[str, Any], float]:
        s = self.settings
        new = empirical_fisher(run, stage, model_cfg, params, shardings, s.fisher_batches)
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        if not state:
            fisher, anchor = new, params
        elif s.online:
            fisher = jax.tree.map(lambda f, n: s.decay * f + n, state["fisher"], new)
            anchor = params
        else:
            fisher = jax.tree.map(jnp.add, state["fisher"], new)
            anchor = jax.tree.map(lambda f0, a0, n, p, f: jnp.where(f > 0, (f0 * a0 + n * p) / jnp.where(f > 0, f, 1.0), p),
                                  state["fisher"], state["anchor"], new, params, fisher)
        return (private_copy({"fisher": fisher, "anchor": anchor}, {"fisher": shardings, "anchor": shardings}),
                self.end_stage_flops(run, model_cfg))

    def end_stage_flops(self, run: Any, model_cfg: Any) -> float:
        """The Fisher pass: a forward and a backward per sequence of `fisher_batches` batches."""
        from jaxcl.train.loop import train_step_flops

        return self.settings.fisher_batches * train_step_flops(model_cfg, run.cfg.data.batch_size,
                                                               run.cfg.data.seq_len)


__all__ = ["EWC", "empirical_fisher", "ewc_penalty", "make_fisher_fn"]
