"""ELLE: lifelong pre-training with model growth, domain prompts, replay memory and warmup.

The growth operators themselves are pure transforms in `jaxcl.transforms` (`grow`, `add_prompts`);
this package holds the pieces that need the trainer: replay memory and the stage loop.
"""

from jaxcl.elle.replay import ReplayMemory, adaptive_weights, memory_rows, replay_plan
from jaxcl.elle.run import ElleRun, planned_stage_flops

__all__ = ["ElleRun", "planned_stage_flops", "ReplayMemory", "adaptive_weights", "memory_rows", "replay_plan"]
