"""The ELLE stage loop: grow -> function-recovering warmup -> train with domain prompts and replay.

    stage 0:      add the domain prompts; train on domain 0
    stage i >= 1: grow to elle.schedule[i-1]; warm up on domain i-1's memory (+ replay of older
                  memories) with a fresh optimizer; train on domain i, replacing ~replay_ratio of the
                  micro-batches by memory micro-batches of domains < i (adaptive domain weights)

Everything else (evaluation of every domain after every stage, checkpoints, resume, reports) is the
shared `ContinualRun`. The report adds `architectures` and `train_flops` per stage (warmup included).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import jax
import numpy as np

from jaxcl.config import Config, ConfigError
from jaxcl.data.stream import SequenceStream, device_batch
from jaxcl.elle.replay import ReplayMemory, adaptive_weights, stage_rng
from jaxcl.models import ModelConfig, abstract_params, param_axes
from jaxcl.parallel import batch_sharding, logical_to_sharding
from jaxcl.train.loop import ContinualRun, MetricsLog, Preempted, _progress, steps_of_stage, train_step_flops
from jaxcl.train.state import create_train_state
from jaxcl.transforms import add_prompts, grow, grow_importance, grown_config

log = logging.getLogger(__name__)

WARMUP, MAIN = 0, 1          # replay phases (the replay generator and the adaptive rule depend on them)


class ElleRun(ContinualRun):
    """ELLE over `cfg.data.domains` with the growth schedule, prompts, replay and warmup of `cfg.elle`."""

    method = "elle"

    def __init__(self, cfg: Config):
        e = cfg.elle
        if cfg.model.num_prompts:        # config-only checks come before the corpus is tokenized
            raise ConfigError("model.num_prompts: ELLE adds its domain prompts itself (elle.prompt_length); "
                              "leave model.num_prompts at 0")
        if cfg.data.batch_size % e.micro_batches:
            raise ConfigError(f"elle.micro_batches={e.micro_batches} must divide data.batch_size={cfg.data.batch_size}")
        model_cfg = cfg.model
        for i, target in enumerate(e.schedule):       # fail before any training on an impossible schedule
            try:
                model_cfg = grown_config(model_cfg, method=e.grow_method, **target_sizes(target))
            except ValueError as err:
                raise ConfigError(f"elle.schedule[{i}]: {' '.join(str(err).split())}") from None
        if e.prompt_length and cfg.model.family != "llama" and cfg.data.seq_len + e.prompt_length > cfg.model.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} + elle.prompt_length={e.prompt_length} exceeds "
                              f"model.max_seq_len={cfg.model.max_seq_len} (the prompt takes positions)")
        super().__init__(cfg)
        if e.schedule and len(e.schedule) != len(self.domains) - 1:
            raise ConfigError(f"elle.schedule has {len(e.schedule)} entries; the stream has {len(self.domains)} "
                              f"domains, so it needs {len(self.domains) - 1} (one per domain after the first)")
        self.memory = ReplayMemory(self.train_sequences, self.domains, e.memory_fraction, cfg.run.seed)
        self.replay: dict[str, Any] = {}         # weights / perplexity at last update / tokens replayed since
        self.warmup_tokens: list[int] = []       # training tokens of each stage's warmup (not in train_tokens)
        self._metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self._grown_from: dict[int, ModelConfig] = {}   # stage -> the architecture it grew from (this process)

    # ------------------------------------------------------------------ model between stages
    def stage_model(self, stage: int, model_cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
        e, seed = self.cfg.elle, self.cfg.run.seed
        if stage == 0:
            if e.prompt_length:
                params, model_cfg = add_prompts(params, model_cfg, num_prompts=len(self.domains),
                                                prompt_length=e.prompt_length,
                                                rng=jax.random.fold_in(jax.random.key(seed), 7_000))
            params = self._place(model_cfg, params)
        else:
            if e.schedule:
                model_cfg, params = self._grow(stage, model_cfg, params)
                if e.warmup_steps:
                    params = self._warmup(stage, model_cfg, params)
        self._begin_replay(stage, MAIN)
        return model_cfg, params

    def _place(self, model_cfg: ModelConfig, params: Any) -> Any:
        return jax.device_put(params, self._param_shardings(model_cfg))

    def _param_shardings(self, model_cfg: ModelConfig) -> Any:
        return logical_to_sharding(param_axes(model_cfg), self.mesh, self.rules, shapes=abstract_params(model_cfg))

    def _growth(self, stage: int) -> tuple[dict[str, int], jax.Array]:
        """(target sizes, rng) of the growth that starts `stage`: `grow` and `grow_importance` share them."""
        return (target_sizes(self.cfg.elle.schedule[stage - 1]),
                jax.random.fold_in(jax.random.key(self.cfg.run.seed), 1_000 + stage))

    def _grow(self, stage: int, model_cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
        """Grow to this stage's architecture inside one jit that lays the result out on the new shardings."""
        e = self.cfg.elle
        target, rng = self._growth(stage)
        new_cfg = grown_config(model_cfg, method=e.grow_method, **target)
        grown = jax.jit(lambda p, r: grow(p, model_cfg, **target, rng=r, method=e.grow_method,
                                          noise_std=e.noise_std)[0],
                        out_shardings=self._param_shardings(new_cfg))(params, rng)
        self._grown_from[stage] = model_cfg
        log.info("stage %d: grew %s -> %s (%.2f M -> %.2f M params, method=%s)", stage, _arch(model_cfg),
                 _arch(new_cfg), model_cfg.num_params() / 1e6, new_cfg.num_params() / 1e6, e.grow_method)
        return new_cfg, grown

    def grows_at(self, stage: int) -> bool:
        return bool(self.cfg.elle.schedule) and stage >= 1

    def grow_importance(self, stage: int, tree: Any) -> Any:
        """`tree` (float32, laid out like the params before `stage`'s growth) carried through that growth by
        `jaxcl.transforms.grow_importance` (same targets, rng and method as the params): copies keep their
        source's value, new coordinates get 0; laid out on the grown model's shardings."""
        e = self.cfg.elle
        old_cfg = self._grown_from[stage]
        target, rng = self._growth(stage)
        new_cfg = grown_config(old_cfg, method=e.grow_method, **target)
        return jax.jit(lambda t, r: grow_importance(t, old_cfg, **target, rng=r, method=e.grow_method,
                                                    noise_std=e.noise_std),
                       out_shardings=self._param_shardings(new_cfg))(tree, rng)

    def _warmup(self, stage: int, model_cfg: ModelConfig, params: Any) -> Any:
        """Function-recovering warmup: train on the previous domain's memory (plus replay of older ones)
        with a fresh optimizer whose schedule is the upcoming stage's, cut after `warmup_steps`."""
        cfg, e = self.cfg, self.cfg.elle
        previous = self.domains[stage - 1]
        tx = self.optimizer(self.stage_steps(stage))
        rng = jax.random.fold_in(jax.random.key(cfg.run.seed), 2_000 + stage)
        state, shardings = create_train_state(model_cfg, tx, rng, self.mesh, self.rules, params=params)
        train_step = self.train_step_fn(model_cfg, tx, shardings)
        stream = SequenceStream(self.memory.banks[previous], cfg.data.batch_size, seed=cfg.run.seed * 1000 + 500 + stage)
        self._begin_replay(stage, WARMUP)
        while len(self.stage_flops) <= stage:
            self.stage_flops.append(0.0)
        while len(self.warmup_tokens) <= stage:
            self.warmup_tokens.append(0)
        self.warmup_tokens[stage] = 0
        self.stage_flops[stage] = 0.0          # a warmup redone after preemption is counted once
        flops, sharding = self.step_flops(model_cfg), batch_sharding(self.mesh, self.rules)
        start, bar = time.time(), _progress(e.warmup_steps, 0, f"stage {stage} warmup on {previous} memory")
        for step in range(e.warmup_steps):
            if self.stop_requested():
                # Warmups are not checkpointed: the resumed run redoes this one, identically, from the
                # previous stage's checkpoint (at most `warmup_steps` steps of work are lost).
                bar.close()
                log.warning("preempted during the warmup of stage %d: resuming will redo it from the "
                            "checkpoint of stage %d", stage, stage - 1)
                raise Preempted(self._global_step(stage, 0))
            batch = self._replayed(stage, WARMUP, step, stream, previous)
            state, m = train_step(state, device_batch(batch, sharding), rng)
            self.stage_flops[stage] += flops
            self.warmup_tokens[stage] += cfg.data.batch_size * cfg.data.seq_len
            bar.update()
            self._maybe_adapt(stage, WARMUP, step + 1, e.warmup_steps, model_cfg, state.params, shardings.params)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == e.warmup_steps:
                m = jax.device_get(m)
                bar.set_postfix(loss=f"{float(m['loss']):.3f}")
                self._metrics.write(kind="warmup", stage=self.stages[stage], stage_index=stage, step=step + 1,
                                    loss=float(m["loss"]), grad_norm=float(m["grad_norm"]))
        bar.close()
        self.train_seconds += time.time() - start
        return state.params

    # ------------------------------------------------------------------ replay
    def next_batch(self, stage: int, stream: SequenceStream) -> dict[str, np.ndarray]:
        """The next global batch of the stage's domain with replayed memory micro-batches mixed in."""
        step = stream.position // self.cfg.data.batch_size
        return self._replayed(stage, MAIN, step, stream, self.stages[stage])

    def _replayed(self, stage: int, phase: int, step: int, stream: SequenceStream, domain: str) -> dict[str, np.ndarray]:
        """The next global batch of `domain` (with its prompt) with memory micro-batches of older domains
        mixed in (the same on every process: the mix is drawn from a generator of (seed, stage, phase, step))."""
        e = self.cfg.elle
        batch = stream.next_batch()
        if e.prompt_length and "prompt_ids" not in batch:     # a mixture batch has each row's own prompt
            batch["prompt_ids"] = np.full((len(batch["input_ids"]),), self.domains.index(domain), np.int32)
        old = self._old_domains(stage, phase)
        if not old or e.replay_ratio == 0:
            return batch
        weights = [self.replay["weights"][d] for d in old]
        batch, counts = self.memory.mix(batch, old, weights, e.replay_ratio, e.micro_batches,
                                        stage_rng(self.cfg.run.seed, stage, phase, step))
        for d, n in counts.items():
            self.replay["tokens"][d] += n * self.cfg.data.seq_len
        return batch

    def _old_domains(self, stage: int, phase: int) -> tuple[str, ...]:
        """Domains replayed in this phase: before stage i, during warmup before stage i - 1."""
        return self.domains[:stage - 1] if phase == WARMUP else self.domains[:stage]

    def _begin_replay(self, stage: int, phase: int) -> None:
        """Replay state at the start of a phase. A stage starts with uniform weights and no reference
        perplexities (ELLE resets them); a warmup replays the same old domains as the stage before it
        did, and carries that stage's weights and perplexities on, as ELLE's code does."""
        old = self._old_domains(stage, phase)
        carried = self.replay if phase == WARMUP and set(self.replay.get("weights", {})) == set(old) else None
        if carried is not None:
            self.replay = {**carried, "stage": stage, "phase": phase}
        else:
            self.replay = {"stage": stage, "phase": phase, "weights": {d: 1.0 for d in old},
                           "tokens": {d: 0.0 for d in old}, "ppl": {d: None for d in old}}

    def _old_perplexities(self, old, model_cfg, params, param_shardings) -> dict[str, float]:
        eval_step = self.eval_step_fn(model_cfg, param_shardings)
        out = {}
        for d in old:
            nll, n = self.domain_nll(eval_step, model_cfg, params, d, self.cfg.elle.adaptive_eval_batches)
            out[d] = math.exp(min(nll / max(n, 1.0), 700.0))
        return out

    def _maybe_adapt(self, stage, phase, done, steps, model_cfg, params, param_shardings) -> None:
        e = self.cfg.elle
        old = self._old_domains(stage, phase)
        if not old or not e.adaptive_every or e.replay_ratio == 0 or done % e.adaptive_every:
            return
        ppl = self._old_perplexities(old, model_cfg, params, param_shardings)
        first_half = phase == WARMUP or done < steps / 2
        r = self.replay
        weights = adaptive_weights([r["ppl"][d] for d in old], [ppl[d] for d in old], [r["tokens"][d] for d in old],
                                   [r["weights"][d] for d in old], first_half)
        r.update(weights=dict(zip(old, weights)), ppl=ppl, tokens={d: 0.0 for d in old})
        self._metrics.write(kind="replay_weights", stage=self.stages[stage], stage_index=stage,
                            phase="warmup" if phase == WARMUP else "train", step=done,
                            weights=r["weights"], valid_perplexity=ppl)

    # ------------------------------------------------------------------ hooks of the shared loop
    def after_step(self, stage, step, steps, model_cfg, state, shardings) -> None:
        self._maybe_adapt(stage, MAIN, step, steps, model_cfg, state.params, shardings.params)

    def method_state(self) -> dict[str, Any]:
        return {"replay": self.replay, "warmup_tokens": self.warmup_tokens}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.replay = dict(state.get("replay", {}))
        self.warmup_tokens = list(state.get("warmup_tokens", []))

    def report_extras(self, architectures) -> dict[str, Any]:
        extras = super().report_extras(architectures)
        extras["warmup_tokens"] = self.warmup_tokens + [0] * (len(self.stages) - len(self.warmup_tokens))
        return extras


def planned_stage_flops(cfg: Config, n_stages: int) -> list[float]:
    """Training FLOPs of every stage an ELLE run of `cfg` will spend (warmups included), from the
    config alone: what equal-compute baselines are given (the adaptive-replay evaluations are not
    training and are not counted)."""
    e = cfg.elle
    model_cfg = cfg.model
    if e.prompt_length:
        model_cfg = model_cfg.replace(num_prompts=n_stages, prompt_length=e.prompt_length)
    out = []
    for stage in range(n_stages):
        steps = steps_of_stage(cfg.train, stage)
        if stage > 0 and e.schedule:
            model_cfg = grown_config(model_cfg, method=e.grow_method, **target_sizes(e.schedule[stage - 1]))
            steps += e.warmup_steps
        out.append(steps * train_step_flops(model_cfg, cfg.data.batch_size, cfg.data.seq_len))
    return out


def target_sizes(target) -> dict[str, int]:
    """The non-None sizes of a `GrowthTarget`, as `grow` keyword arguments."""
    return {k: v for k, v in dataclasses.asdict(target).items() if v is not None}


def _arch(cfg: ModelConfig) -> str:
    return f"L{cfg.n_layers}/D{cfg.d_model}/H{cfg.n_heads}/F{cfg.d_ff}"


__all__ = ["ElleRun", "planned_stage_flops", "target_sizes"]
