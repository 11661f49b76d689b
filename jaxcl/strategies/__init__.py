"""Continual-learning strategies on jaxcl's training loops (the protocol: `jaxcl.train.strategy`).

    run.strategies: [ewc]          # or lwf, agem, replay; several compose, in order
    strategies.ewc.strength: 1e4   # each strategy's knobs: jaxcl.config.StrategiesConfig

Each is one module: `ewc` (elastic weight consolidation, online or not), `distill` (LwF logit
distillation), `agem` (A-GEM gradient projection), `replay` (experience replay), `olora` (O-LoRA, on SLM's
path only: `jaxcl.slm.strategies`); `memory` is the episodic memory replay, A-GEM and ELLE share.
"""

from jaxcl.strategies.agem import AGEM, agem_projection
from jaxcl.strategies.distill import LwF, distillation_kl
from jaxcl.strategies.ewc import EWC, empirical_fisher, ewc_penalty
from jaxcl.strategies.memory import ReplayMemory
from jaxcl.strategies.olora import OLoRA, orthogonality_penalty
from jaxcl.strategies.replay import ExperienceReplay
from jaxcl.train.strategy import REGISTRY, Strategy, resolve_strategies

__all__ = ["AGEM", "EWC", "ExperienceReplay", "LwF", "OLoRA", "REGISTRY", "ReplayMemory", "Strategy",
           "agem_projection", "distillation_kl", "empirical_fisher", "ewc_penalty", "orthogonality_penalty",
           "resolve_strategies"]
