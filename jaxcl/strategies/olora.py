"""O-LoRA: orthogonal subspaces for the low-rank increments of successive tasks (Wang et al. 2023,
"Orthogonal Subspace Learning for Language Model Continual Learning", Findings of EMNLP; eq. 5-6).

Each task learns its own low-rank increments (on SLM's path: its own `slm.top_k` slots of the JARe bank,
`jaxcl.slm.strategies`), the earlier tasks' increments are frozen, and the new input-side factors are
pushed orthogonal to the earlier ones:

    L_orth = strength * sum_{i < t} sum_{targets, layers} || A_i^T A_t ||_F^2

with A the input-side factor (`down` [r, d_in] per slot, i.e. LoRA's A transposed). At evaluation every
seen task's increments are summed (the paper merges them into the weights); no task id is used.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcl.config import Config, ConfigError
from jaxcl.train.strategy import Strategy


def orthogonality_penalty(bank: dict[str, Any], earlier: jax.Array, current: jax.Array) -> jax.Array:
    """sum over targets, layers, earlier slots p and current slots q of ||down[l, p] down[l, q]^T||_F^2.

    bank: {target: {"down": [L, P, r, d_in], ...}}; earlier, current: float [P] slot flags (0/1) -> float32."""
    total = jnp.zeros((), jnp.float32)
    for factors in bank.values():
        down = factors["down"].astype(jnp.float32)
        old = down * earlier[None, :, None, None]
        new = down * current[None, :, None, None]
        gram = jnp.einsum("lprd,lqsd->lpqrs", old, new)            # every earlier x current row pair, per layer
        total = total + jnp.sum(jnp.square(gram))
    return total


class OLoRA(Strategy):
    """`strategies.olora`: strength (lambda_1 of the paper)."""

    name = "olora"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.settings = cfg.strategies.olora

    def check(self, run: Any) -> None:
        if getattr(run, "method", None) != "slm":
            raise ConfigError("run.strategies: olora needs SLM's per-task low-rank increments; it runs as a row of "
                              "SLM's benchmark (slm.baselines=[olora]), not on a full-parameter loop")

    def begin_stage(self, run: Any, stage: int, model_cfg: Any, params: Any, state: dict[str, Any] | None,
                    shardings: Any) -> dict[str, Any]:
        return {"earlier": jnp.asarray(run.slot_flags(range(stage))), "current": jnp.asarray(run.slot_flags([stage]))}

    def loss_term(self, run: Any, model_cfg: Any):
        strength = self.settings.strength

        def term(params, batch, outputs, state, rng):
            return strength * orthogonality_penalty(params["bank"], state["earlier"], state["current"])

        return term


__all__ = ["OLoRA", "orthogonality_penalty"]
