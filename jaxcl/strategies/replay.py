"""Experience replay as a strategy: a share of every batch's micro-batches comes from a memory of the
earlier domains' training sequences, the domains drawn uniformly.

Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning" (arXiv:1902.10486); the memory
and the micro-batch replacement are ELLE's (`jaxcl.strategies.memory`), so a sequential run with
`run.strategies=[replay]` replays exactly the rows an ELLE run without growth, prompts, warmup or adaptive
weights replays (tested bit for bit).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxcl.config import Config, ConfigError
from jaxcl.strategies.memory import ReplayMemory, stage_rng
from jaxcl.train.strategy import Strategy

MAIN = 1      # the replay phase of a stage's steps (ELLE's warmup is phase 0)


class ExperienceReplay(Strategy):
    """`strategies.replay`: memory_fraction of each domain kept; ~ratio of the micro_batches replaced."""

    name = "replay"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.settings = cfg.strategies.replay
        self.memory: ReplayMemory | None = None

    def check(self, run: Any) -> None:
        if run.method == "elle":
            raise ConfigError("run.strategies: replay on an ELLE run, which already replays (elle.replay_ratio, "
                              "elle.memory_fraction); remove replay from run.strategies")
        if run.cfg.data.batch_size % self.settings.micro_batches:
            raise ConfigError(f"strategies.replay.micro_batches={self.settings.micro_batches} must divide "
                              f"data.batch_size={run.cfg.data.batch_size}")
        self.memory = ReplayMemory(run.train_sequences, run.domains, self.settings.memory_fraction, run.cfg.run.seed)

    def compose_batch(self, run: Any, stage: int, step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        old = run.domains[:stage]
        if not old or self.settings.ratio == 0:
            return batch
        batch, _ = self.memory.mix(batch, old, [1.0] * len(old), self.settings.ratio, self.settings.micro_batches,
                                   stage_rng(run.cfg.run.seed, stage, MAIN, step))
        return batch


__all__ = ["ExperienceReplay"]
