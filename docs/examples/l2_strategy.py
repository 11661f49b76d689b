"""A user's continual-learning strategy in one file: an L2 pull towards the weights the stage started from.

    jaxcl run configs/demo.yaml 'run.strategies=[l2_strategy:L2ToPrevious]' 'strategies.options={l2: {strength: 0.1}}'

(with this directory on PYTHONPATH). No loop is touched: the strategy says what it keeps on device
(`mirrors`), how to fill it when a stage begins, and a pure loss term; jaxcl shards the mirror like the
params, checkpoints it, resumes it, and adds the term to the loss from stage 1 on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.config import ConfigError
from jaxcl.strategies.common import private_copy
from jaxcl.train.strategy import Strategy


class L2ToPrevious(Strategy):
    """strength / 2 * ||theta - theta_previous||^2, theta_previous = the model at the stage's start."""

    name = "l2"
    mirrors = ("previous",)

    def __init__(self, cfg):
        super().__init__(cfg)
        options = dict(cfg.strategies.options.get("l2", {}))
        self.strength = float(options.pop("strength", 0.01))
        if options or self.strength < 0:
            raise ConfigError(f"strategies.options.l2: takes only strength >= 0, got {cfg.strategies.options['l2']}")

    def begin_stage(self, run, stage, model_cfg, params, state, shardings):
        return {"previous": private_copy(params, shardings)}          # its own buffers: the step donates params

    def loss_term(self, run, model_cfg):
        strength = self.strength

        def term(params, batch, outputs, state, rng):
            return 0.5 * strength * sum(jnp.sum(jnp.square(p - q)) for p, q in
                                        zip(jax.tree.leaves(params), jax.tree.leaves(state["previous"])))

        return term
