"""The strategy protocol: how a continual-learning strategy plugs into jaxcl's training loops.

A strategy (EWC, LwF, A-GEM, experience replay, ... in `jaxcl.strategies`; users' own in one file) is a
small object with hooks the loop calls; every hook has a do-nothing default, so a strategy overrides
only what it changes:

    compose_batch      host side, every step: replace rows of the global batch (experience replay)
    reference_batch    host side, every step: a second batch the jitted step takes the gradient of
                       (A-GEM's memory gradient)
    loss_term          device side, pure: (params, batch, outputs, state, rng) -> scalar added to the loss
    gradient_transformation   an optax transformation chained before the run's optimizer; it receives
                       the reference gradient as the extra argument `reference_grads` (A-GEM's projection)
    begin_stage / end_stage   host side, between stages: compute the strategy's device state (an EWC
                       Fisher and anchor, a distillation teacher) from the model
    host_state / load_host_state   JSON the strategy keeps across steps (saved in every checkpoint's meta)

Device state is a dict `{mirror name: params-shaped tree}` (`Strategy.mirrors`), carried in
`TrainState.strategy[strategy.name]`, sharded exactly like the params it mirrors and checkpointed with
them. Strategies act from stage 1 on: stage 0 has no earlier domain to protect, and a run's stage 0 is
plain training whatever its strategies (its step is compiled without them).

The loop never imports `jaxcl.strategies`: `resolve_strategies` imports a name's class lazily from
`REGISTRY` ("module:Class"), or from a "package.module:Class" path a user gives in `run.strategies`.
Design after Avalanche's plugins (callbacks around a shared loop) and optax (pure, composable gradient
transformations).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, ClassVar

import optax

from jaxcl.config import Config, ConfigError

# name -> "module:Class" (imported on first use)
REGISTRY: dict[str, str] = {
    "ewc": "jaxcl.strategies.ewc:EWC",
    "lwf": "jaxcl.strategies.distill:LwF",
    "agem": "jaxcl.strategies.agem:AGEM",
    "replay": "jaxcl.strategies.replay:ExperienceReplay",
    "olora": "jaxcl.strategies.olora:OLoRA",
}

LossTerm = Callable[..., Any]    # (params, batch, outputs, state, rng) -> scalar


class Strategy:
    """Base class of every strategy: hooks that do nothing (see the module docstring for when each is
    called). Subclasses set `name` (the `run.strategies` entry and the key of their state) and
    `mirrors` (names of the params-shaped trees they keep on device)."""

    name: ClassVar[str] = ""
    mirrors: ClassVar[tuple[str, ...]] = ()
    uses_reference_batch: ClassVar[bool] = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ------------------------------------------------------------ configuration
    def check(self, run: Any) -> None:
        """Refuse (ConfigError, one line) a run this strategy cannot apply to; called once the run is built."""

    # ------------------------------------------------------------ host side, per step
    def compose_batch(self, run: Any, stage: int, step: int, batch: dict[str, Any]) -> dict[str, Any]:
        """The global batch of `stage`'s step `step` (numpy, identical on every process), possibly changed."""
        return batch

    def reference_batch(self, run: Any, stage: int, step: int, model_cfg: Any) -> dict[str, Any] | None:
        """A second global batch for the step (only if `uses_reference_batch`; with `prompt_ids` when
        `model_cfg` has prompts); None = none this step (the step then uses the batch itself)."""
        return None

    # ------------------------------------------------------------ device side, pure
    def loss_term(self, run: Any, model_cfg: Any) -> LossTerm | None:
        """A pure function (params, batch, outputs, state, rng) -> scalar added to the training loss, or None.

        `outputs` holds what the loss saw: `logits` [batch, seq, vocab], `input_ids` (the model's input:
        masked for MLM) and `weights` [batch, seq] (1 where a token is scored); `state` is this strategy's
        mirrors."""
        return None

    def gradient_transformation(self, run: Any) -> optax.GradientTransformation | None:
        """An optax transformation applied to the gradient before the run's optimizer (clipping, AdamW)."""
        return None

    def step_flops(self, run: Any, model_cfg: Any) -> float:
        """Extra training FLOPs of one step (a teacher forward, a reference gradient), counted in the budget.
        Reads only `run.cfg` (equal-FLOPs planners call it before any run exists)."""
        return 0.0

    def end_stage_flops(self, run: Any, model_cfg: Any) -> float:
        """Training FLOPs `end_stage` spends after a stage (EWC's Fisher pass); reads only `run.cfg`."""
        return 0.0

    # ------------------------------------------------------------ host side, between stages
    def begin_stage(self, run: Any, stage: int, model_cfg: Any, params: Any, state: dict[str, Any] | None,
                    shardings: Any) -> dict[str, Any]:
        """This strategy's device state for training `stage` (>= 1) from `params` (the model the stage
        starts from) and `state` (what `end_stage` of the stage before returned). Default: `state`."""
        return state if state is not None else {}

    def end_stage(self, run: Any, stage: int, model_cfg: Any, params: Any, state: dict[str, Any],
                  shardings: Any) -> tuple[dict[str, Any], float]:
        """(device state for the next stage, training FLOPs spent computing it) after `stage` finished with
        `params`. Default: unchanged, free."""
        return state, 0.0

    def host_state(self) -> dict[str, Any]:
        return {}

    def load_host_state(self, state: dict[str, Any]) -> None:
        pass


def strategy_class(name: str) -> type:
    """The class a `run.strategies` entry names: a registered name or "package.module:Class"."""
    target = REGISTRY.get(name)
    if target is None:
        if ":" not in name:
            raise ConfigError(f"run.strategies: unknown strategy {name!r} (available: {', '.join(REGISTRY)}; "
                              "or a 'package.module:Class' path to your own)")
        target = name
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"run.strategies: cannot import {name!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"run.strategies: {name!r} is not a jaxcl.train.strategy.Strategy subclass")
    return cls


def resolve_strategies(cfg: Config) -> tuple[Strategy, ...]:
    """The run's strategies, in `run.strategies` order (each constructed from the config)."""
    out = []
    for name in cfg.run.strategies:
        strategy = strategy_class(name)(cfg)
        if any(s.name == strategy.name for s in out):
            raise ConfigError(f"run.strategies names {strategy.name!r} twice")
        out.append(strategy)
    return tuple(out)


__all__ = ["REGISTRY", "Strategy", "resolve_strategies", "strategy_class"]
