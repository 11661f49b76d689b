"""Logit distillation from the previous stage's model (Learning without Forgetting: Li & Hoiem 2017, TPAMI;
for LMs, the "logit distillation" baseline of ELLE, Qin et al. 2022, and of SLM's comparisons).

On every batch of a stage >= 1 the model the stage started from (the teacher, frozen) reads the same
input, and the student is pulled towards its next-token distributions:

    term = strength * T^2 * mean over scored positions of KL(softmax(z_teacher / T) || softmax(z_student / T))

(T^2 keeps the gradient's scale independent of T: Hinton et al. 2015). Cost: one teacher forward per
step (counted in the run's training FLOPs as a third of a training step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcl.config import Config
from jaxcl.strategies.common import private_copy
from jaxcl.train.strategy import Strategy


def distillation_kl(teacher_logits: jax.Array, student_logits: jax.Array, weights: jax.Array,
                    temperature: float) -> jax.Array:
    """T^2 * the weighted mean over positions of KL(p_teacher || p_student) at temperature T.

    logits [..., classes] (an LM: [batch, seq, vocab]; SLM's classifier: [batch, classes]), weights [...] (1 =
    scored) -> float32 scalar."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return temperature ** 2 * jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class LwF(Strategy):
    """`strategies.lwf`: strength, temperature."""

    name = "lwf"
    mirrors = ("teacher",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.settings = cfg.strategies.lwf

    def begin_stage(self, run: Any, stage: int, model_cfg: Any, params: Any, state: dict[str, Any] | None,
                    shardings: Any) -> dict[str, Any]:
        return {"teacher": private_copy(params, shardings)}

    def loss_term(self, run: Any, model_cfg: Any):
        forward, strength, temperature = run.forward_logits(model_cfg), self.settings.strength, self.settings.temperature

        def term(params, batch, outputs, state, rng):
            logits = forward(jax.lax.stop_gradient(state["teacher"]), outputs)
            return strength * distillation_kl(logits, outputs["logits"], outputs["weights"], temperature)

        return term

    def step_flops(self, run: Any, model_cfg: Any) -> float:
        from jaxcl.train.loop import train_step_flops

        return train_step_flops(model_cfg, run.cfg.data.batch_size, run.cfg.data.seq_len) / 3.0


__all__ = ["LwF", "distillation_kl"]
