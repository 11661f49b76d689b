"""The continual-learning stage loop every method shares.

For each domain of the stream: (let the method adapt the model) -> train on the domain -> evaluate
every domain. The plain loop is sequential fine-tuning, the baseline all methods are compared to;
methods subclass `ContinualRun` and override its hooks (`stage_model`, `next_batch`, ...).

The run is resumable at any step: checkpoints hold the sharded TrainState plus JSON metadata
(stage, step in stage, data-stream position, the matrix so far, the resolved config), and a SIGTERM
(preemption) saves and exits cleanly.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import rundir
from jaxcl.config import Config, ConfigError, TrainConfig, config_to_dict
from jaxcl.data.sources import open_source
from jaxcl.data.cache import ConcatRows
from jaxcl.data.stream import MixtureStream, SequenceStream, cached_domains, device_batch, eval_batches
from jaxcl.data.tokenizer import load_tokenizer
from jaxcl.init_from import check_tokenizer_fits, load_params, tokenizer_spec
from jaxcl.eval.report import build_report, format_matrix, plot_matrix, plot_training_curves, write_report
from jaxcl.models import ModelConfig, abstract_params, build, init_params
from jaxcl.parallel import batch_sharding, describe_mesh, make_mesh, resolve_rules, sharding_table
from jaxcl.rundir import Invocations, MetricsFile
from jaxcl.train.checkpoint import Checkpointer, abstract_like
from jaxcl.train.optimizer import learning_rate_schedule, make_optimizer
from jaxcl.train.state import TrainState, create_train_state, state_shardings
from jaxcl.train.step import DEFAULT_BATCH_KEYS, make_eval_step, make_loss_fn, make_train_step
from jaxcl.train.strategy import resolve_strategies

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised after a preemption checkpoint was written; the process exits with status 0."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
                disable=jax.process_index() != 0, file=sys.stderr)


class MetricsLog(MetricsFile):
    """Append-only metrics.jsonl written by process 0 (checkpoints record its offset: `jaxcl.rundir`)."""


class ContinualRun:
    """Sequential fine-tuning over `cfg.data.domains`; the base of every method's run."""

    method = "sequential"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.strategies = resolve_strategies(cfg)      # jaxcl.train.strategy: run.strategies, in order (checked
        self.run_dir = cfg.run_dir()                   # against the run once its data is open, below)
        self.mesh = make_mesh(cfg.mesh)
        self.rules = resolve_rules(cfg.mesh.rules)
        self.tokenizer_spec = tokenizer_spec(cfg)
        self.tokenizer = load_tokenizer(self.tokenizer_spec)
        check_tokenizer_fits(cfg, self.tokenizer, self.tokenizer_spec)
        if cfg.train.objective == "mlm" and self.tokenizer.mask_id is None:
            raise ConfigError(f"train.objective=mlm needs a mask token, and data.tokenizer={cfg.data.tokenizer!r} "
                              "has none of <|mask|>, [MASK], <mask>")
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.data.batch_size % dp:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the data-parallel size "
                              f"{dp} (mesh data={self.mesh.shape['data']} x fsdp={self.mesh.shape['fsdp']})")
        source = open_source(cfg.data.source, cfg.data.text_field)
        available = source.domains()
        self.domains = tuple(cfg.data.domains) or available
        for d in self.domains:
            if d not in available:
                raise ConfigError(f"data.domains: unknown domain {d!r} (available: {', '.join(available)})")
        self._source = source
        self.train_sequences, self.valid_sequences = self._tokenize(source)
        self.stages: tuple[str, ...] = self.stage_names()    # what each stage trains on (keys of train_sequences)
        self._check_mixture()
        if cfg.train.stage_steps and len(cfg.train.stage_steps) != len(self.domains):
            raise ConfigError(f"train.stage_steps has {len(cfg.train.stage_steps)} entries for "
                              f"{len(self.domains)} domains")
        self.train_seconds = 0.0
        self.stage_flops: list[float] = []     # training FLOPs per stage (growth warmups included)
        self._eval_steps: dict[ModelConfig, Any] = {}
        self._train_steps: dict[tuple[ModelConfig, int], Any] = {}
        self._optimizers: dict[int, Any] = {}
        self._stop: dict = {"signal": None}
        self._ckpt: Checkpointer | None = None
        self._strategy_carry: dict[str, Any] = {}     # strategies' device state handed from one stage to the next
        if self.strategies and len(self.stages) < 2:
            raise ConfigError(f"run.strategies={list(cfg.run.strategies)}: a {self.method} run has one stage, and "
                              "strategies act between stages; leave run.strategies empty")
        for strategy in self.strategies:
            strategy.check(self)

    # ------------------------------------------------------------------ data
    def _tokenize(self, source) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Train rows (read on demand from the token cache, prepared first if missing) and valid rows."""
        seq_len = self.cfg.data.seq_len
        if self.cfg.model.family != "llama" and seq_len > self.cfg.model.max_seq_len:
            raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_seq_len={self.cfg.model.max_seq_len}")
        n_eval = self.cfg.data.eval_batches * self.cfg.data.batch_size
        return cached_domains(self.cfg.data, self.tokenizer, self.tokenizer_spec, self.domains, n_eval, source=source)

    # ------------------------------------------------------------------ hooks for methods
    def stage_names(self) -> tuple[str, ...]:
        """The run's stages by name: one per domain (the joint run has one, "joint")."""
        return self.domains

    def _check_mixture(self) -> None:
        """`data.mixture` may name only this run's stages, and weigh only its domains."""
        for stage, weights in self.cfg.data.mixture.items():
            if stage not in self.stages:
                raise ConfigError(f"data.mixture.{stage}: not a stage of this {self.method} run (its stages: "
                                  f"{', '.join(self.stages)})")
            for d in weights:
                if d not in self.domains:
                    raise ConfigError(f"data.mixture.{stage}.{d}: not one of data.domains ({', '.join(self.domains)})")

    def make_stream(self, stage: int, name: str):
        """The training stream of a stage: its domain's rows (`SequenceStream`), or the weighted mixture of
        domains `data.mixture` gives it (`MixtureStream`; every row carries its own domain's prompt id)."""
        seed, batch = self.cfg.run.seed * 1000 + stage, self.cfg.data.batch_size
        weights = self.cfg.data.mixture.get(name)
        if weights:
            return MixtureStream({d: self.train_sequences[d] for d in weights}, weights, batch, seed,
                                 domain_index={d: i for i, d in enumerate(self.domains)})
        return SequenceStream(self.train_sequences[name], batch, seed=seed)

    def initial_params(self, model_cfg: ModelConfig, shardings: Any) -> Any:
        """The model the run starts from: `model.init_from`'s checkpoint (placed onto `shardings` as it is
        read), else a fresh initialisation from `run.seed`."""
        rng = jax.random.key(self.cfg.run.seed)
        if self.cfg.init_from:
            log.info("starting from model.init_from=%s", self.cfg.init_from)
            return load_params(self.cfg.init_from, model_cfg, shardings, jax.random.fold_in(rng, 7_001))
        return init_params(model_cfg, rng, out_shardings=shardings)

    def stage_ends(self) -> tuple[int, ...]:
        """Global steps of the stage-end checkpoints (kept by retention: `init_from=RUN@stageN`, export)."""
        return tuple(self._global_step(i, self.stage_steps(i)) for i in range(len(self.stages)))

    def stage_steps(self, stage: int) -> int:
        return steps_of_stage(self.cfg.train, stage)

    def stage_model(self, stage: int, model_cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
        """Change the model between stages (ELLE grows it here). Sequential: unchanged."""
        return model_cfg, params

    def next_batch(self, stage: int, stream: SequenceStream) -> dict[str, np.ndarray]:
        """The next global batch `[batch_size, seq]` (numpy, the same on every process); replay methods
        mix memory batches in here."""
        return stream.next_batch()

    def domain_batch(self, domain: str, batch: dict[str, np.ndarray], model_cfg: ModelConfig) -> dict[str, np.ndarray]:
        """A global batch of `domain` with what the model needs to know about its domain: a model with
        learned prompts gets the domain's prompt (prompt p = the p-th domain of the stream); a mixture batch
        carries each row's own prompt id already (dropped for a model without prompts)."""
        if not model_cfg.num_prompts:
            return {k: v for k, v in batch.items() if k != "prompt_ids"}
        if "prompt_ids" in batch:
            return batch
        index = self.domains.index(domain)
        if index >= model_cfg.num_prompts:
            raise ConfigError(f"model.num_prompts={model_cfg.num_prompts} but the stream has {len(self.domains)} "
                              f"domains: domain {domain!r} has no prompt")
        return {**batch, "prompt_ids": np.full((len(batch["input_ids"]),), index, np.int32)}

    def after_step(self, stage: int, step: int, steps: int, model_cfg: ModelConfig, state: TrainState,
                   shardings: TrainState) -> None:
        """Called after every optimizer step of a stage (ELLE updates its replay weights here)."""

    def method_state(self) -> dict[str, Any]:
        """JSON state a method keeps across steps; saved in every checkpoint's meta."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what `method_state` returned (on resume)."""

    @staticmethod
    def batch_keys(model_cfg: ModelConfig) -> tuple[str, ...]:
        """The arrays a batch carries: models with learned prompts also take `prompt_ids`."""
        return DEFAULT_BATCH_KEYS + (("prompt_ids",) if model_cfg.num_prompts else ())

    def step_flops(self, model_cfg: ModelConfig) -> float:
        """Training FLOPs of one optimizer step of `model_cfg` on this run's batches."""
        return train_step_flops(model_cfg, self.cfg.data.batch_size, self.cfg.data.seq_len)

    # ------------------------------------------------------------------ evaluation
    def loss_fn(self, model_cfg: ModelConfig):
        return make_loss_fn(model_cfg, self.cfg.train.objective, mask_token_id=self.tokenizer.mask_id,
                            mlm_probability=self.cfg.train.mlm_probability)

    def forward_logits(self, model_cfg: ModelConfig):
        """fn(params, outputs) -> the logits [batch, seq, vocab] of `params` on the inputs a loss saw (`outputs`
        of `loss_fn`: its input ids, attention mask and prompt ids), deterministically. A strategy's second
        model (LwF's teacher) reads the batch through it, whichever loop it runs on."""
        model = build(model_cfg)

        def forward(params, outputs):
            return model.apply({"params": params}, outputs["input_ids"], outputs["attention_mask"],
                               deterministic=True, prompt_ids=outputs["prompt_ids"]).logits

        return forward

    def strategy_batches(self, stage: int, model_cfg: ModelConfig, n: int):
        """The first `n` global batches of `stage`'s training stream (numpy; a fresh copy of the stream, so
        the run's position is untouched), with the domain's prompt: what EWC's Fisher pass reads."""
        name = self.stages[stage]
        stream = self.make_stream(stage, name)
        for _ in range(n):
            yield self.domain_batch(name, stream.next_batch(), model_cfg)

    def eval_step_fn(self, model_cfg: ModelConfig, param_shardings: Any):
        """The jitted (params, batch) -> (nll_sum, tokens) used for perplexities (one per architecture,
        so repeated evaluations never recompile)."""
        if model_cfg not in self._eval_steps:
            self._eval_steps[model_cfg] = make_eval_step(model_cfg, self.mesh, param_shardings, self.rules,
                                                         loss_fn=self.loss_fn(model_cfg),
                                                         batch_keys=self.batch_keys(model_cfg))
        return self._eval_steps[model_cfg]

    def optimizer(self, steps: int):
        """The run's optimizer for a stage of `steps` steps; one object per length, so that train steps
        compiled for it are shared (ELLE's warmup and the stage after it use the same schedule)."""
        if steps not in self._optimizers:
            transforms = [t for t in (s.gradient_transformation(self) for s in self.strategies) if t is not None]
            base = make_optimizer(self.cfg.optim, steps)
            self._optimizers[steps] = optax.chain(*transforms, base) if transforms else base
        return self._optimizers[steps]

    def train_step_fn(self, model_cfg: ModelConfig, tx, shardings: TrainState, with_strategies: bool = False):
        """The jitted train step for an architecture and optimizer object (compiled once per pair; the
        shardings are a function of both on this run's mesh); `with_strategies`: with the strategies' loss
        terms and reference batch (stages >= 1)."""
        key = (model_cfg, id(tx), with_strategies)
        if key not in self._train_steps:
            terms = [(s.name, t) for s in self.strategies if with_strategies
                     for t in [s.loss_term(self, model_cfg)] if t is not None]
            reference = with_strategies and any(s.uses_reference_batch for s in self.strategies)
            step = make_train_step(model_cfg, tx, self.mesh, shardings, self.rules, loss_fn=self.loss_fn(model_cfg),
                                   batch_keys=self.batch_keys(model_cfg), terms=terms, reference=reference)
            self._train_steps[key] = (tx, step)      # keeps tx alive, so its id is never reused
        return self._train_steps[key][1]

    # ------------------------------------------------------------------ strategies (jaxcl.train.strategy)
    def grows_at(self, stage: int) -> bool:
        """Whether `stage_model` changes the architecture at `stage` (ELLE's growth); strategies whose state
        mirrors the params carry it through with `grow_importance` or rebuild it from the stage's params."""
        return False

    def grow_importance(self, stage: int, tree: Any) -> Any:
        """A per-coordinate tree of the model before `stage` carried through `stage`'s growth (copies keep
        their source's value, new coordinates get 0). Only runs that grow implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not grow its model")

    def strategies_active(self, stage: int) -> bool:
        """Strategies act from stage 1 on (stage 0 has no earlier domain)."""
        return bool(self.strategies) and stage >= 1

    def _strategy_shardings(self, state: dict[str, Any], param_shardings: Any) -> dict[str, Any]:
        """Every mirror is sharded exactly like the params it mirrors."""
        return {name: {m: param_shardings for m in mirrors} for name, mirrors in state.items()}

    def _strategy_abstract(self, mirrors: dict[str, list[str]], model_cfg: ModelConfig) -> dict[str, Any]:
        shapes = abstract_params(model_cfg)
        return {name: {m: shapes for m in ms} for name, ms in mirrors.items()}

    def _begin_strategies(self, stage: int, model_cfg: ModelConfig, state: TrainState,
                          shardings: TrainState) -> tuple[TrainState, TrainState]:
        """The strategies' device state for training `stage`, in the TrainState and its shardings."""
        if not self.strategies_active(stage):
            return state, shardings
        sstate = {}
        for s in self.strategies:
            out = s.begin_stage(self, stage, model_cfg, state.params, self._strategy_carry.get(s.name),
                                shardings.params)
            if out:
                sstate[s.name] = out
        sstate = jax.device_put(sstate, self._strategy_shardings(sstate, shardings.params))
        return state.replace(strategy=sstate), shardings.replace(
            strategy=self._strategy_shardings(sstate, shardings.params))

    def _end_strategies(self, stage: int, model_cfg: ModelConfig, state: TrainState,
                        shardings: TrainState) -> tuple[TrainState, TrainState]:
        """After `stage`: each strategy's state for the next stage (e.g. the Fisher of the finished
        stage), its FLOPs added to the stage's; the returned TrainState carries it into the stage-end
        checkpoint. Nothing is computed after the last stage."""
        if not self.strategies or stage == len(self.stages) - 1:
            return state, shardings
        carry = {}
        for s in self.strategies:
            out, flops = s.end_stage(self, stage, model_cfg, state.params, state.strategy.get(s.name),
                                     shardings.params)
            self.stage_flops[stage] += flops
            if out:
                carry[s.name] = out
        self._strategy_carry = carry
        return state.replace(strategy=carry), shardings.replace(
            strategy=self._strategy_shardings(carry, shardings.params))

    def stop_requested(self) -> bool:
        """Whether a preemption signal arrived (agreed across processes); pending saves are flushed first
        so the caller can exit on the latest checkpoint."""
        if not _agreed_stop(self._stop):
            return False
        if self._ckpt is not None:
            self._ckpt.wait()
        return True

    def domain_nll(self, eval_step, model_cfg: ModelConfig, params: Any, domain: str,
                   max_batches: int | None = None) -> tuple[float, float]:
        """(summed NLL, tokens) of `domain`'s validation split (its first `max_batches` batches)."""
        sharding = batch_sharding(self.mesh, self.rules)
        nll, n = 0.0, 0.0
        for i, batch in enumerate(eval_batches(self.valid_sequences[domain], self.cfg.data.batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            s, c = eval_step(params, device_batch(self.domain_batch(domain, batch, model_cfg), sharding))
            nll, n = nll + float(s), n + float(c)
        return nll, n

    def evaluate(self, model_cfg: ModelConfig, params: Any, param_shardings: Any) -> dict[str, dict[str, float]]:
        """Perplexity of every domain's validation split."""
        eval_step = self.eval_step_fn(model_cfg, param_shardings)
        out = {}
        for d in self.domains:
            nll, n = self.domain_nll(eval_step, model_cfg, params, d)
            mean_nll = nll / max(n, 1.0)
            perplexity = math.exp(mean_nll) if mean_nll < 700 else math.inf     # a diverged model must not crash
            out[d] = {"perplexity": perplexity, "nll": mean_nll, "tokens": n}
        return out

    # ------------------------------------------------------------------ the loop
    def _global_step(self, stage: int, step: int) -> int:
        return sum(self.stage_steps(i) for i in range(stage)) + step

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        # Before anything is written: refuse a config that changes what this run dir trained, and
        # return a finished run's report untouched (jaxcl.rundir).
        finished = rundir.begin(self.run_dir, cfg, self.method, recorded=self._checkpointed_config,
                                announce=getattr(self, "announce_finished", True))
        if finished is not None:
            return finished
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint, keep_steps=self.stage_ends())
        log.info("%s", describe_mesh(self.mesh))
        stop = {"signal": None}
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.__setitem__("signal", signum))
        try:
            return self._run(ckpt, metrics, stop)
        finally:
            signal.signal(signal.SIGTERM, previous)
            ckpt.close()

    def _checkpointed_config(self) -> dict[str, Any] | None:
        """The config in the latest checkpoint's meta: what a run dir without config.yaml was trained with."""
        directory = self.run_dir / "checkpoints"
        if not directory.is_dir():
            return None
        ckpt = Checkpointer(directory, self.cfg.checkpoint)
        try:
            latest = ckpt.latest_step()
            return None if latest is None else ckpt.restore_meta(latest).get("config")
        finally:
            ckpt.close()

    def _run(self, ckpt: Checkpointer, metrics: MetricsLog, stop: dict) -> dict[str, Any]:
        cfg = self.cfg
        self._stop, self._ckpt = stop, ckpt       # for work inside hooks (ELLE's warmup) to honour preemption
        start = time.time()
        self._acct = Invocations(start=start)          # this invocation's accounting (meta, report)
        self._metrics_log = metrics                    # checkpoints record its offset
        model_cfg, params, meta = cfg.model, None, None
        if not cfg.checkpoint.resume and ckpt.all_steps():
            raise ConfigError(f"checkpoint.resume=false but {ckpt.directory} already holds checkpoints "
                              f"{ckpt.all_steps()}: choose another run.dir (nothing was overwritten)")
        latest = ckpt.latest_step() if cfg.checkpoint.resume else None
        if latest is not None:
            meta = ckpt.restore_meta(latest)
            if (meta.get("method"), meta.get("stages"), meta.get("domains")) != \
                    (self.method, list(self.stages), list(self.domains)):
                raise ConfigError(f"{ckpt.directory} holds a {meta.get('method')} run over stages {meta.get('stages')}; "
                                  f"this is a {self.method} run over {list(self.stages)}: use another run.dir")
            rundir.check_compatible(meta.get("config"), cfg, self.method, ckpt.directory)
            model_cfg = ModelConfig.from_dict(meta["model"])
            self.train_seconds = meta.get("train_seconds", 0.0)
            self._acct.previous = list(meta.get("invocations", []))
            truncate_to = meta.get("metrics_offset")     # what a killed invocation logged after it: dropped once the
                                                         # state has been read (a damaged checkpoint changes nothing)
            self.stage_flops = list(meta.get("stage_flops", []))
            self.load_method_state(meta.get("method_state", {}))
            for s in self.strategies:
                s.load_host_state(meta.get("strategies", {}).get(s.name, {}))
            log.info("resuming from checkpoint %d (stage %d, step %d)", latest, meta["stage"], meta["stage_step"])
        else:
            truncate_to = None
            metrics.truncate(0)          # a run from scratch: records of an invocation that never checkpointed go
        self._train_seconds_start = self.train_seconds
        matrix = meta["matrix"] if meta else []
        initial = meta.get("initial") if meta else None
        architectures = meta.get("architectures", []) if meta else []
        first_stage = meta["stage"] + (1 if meta and meta["completed"] else 0) if meta else 0

        for stage in range(first_stage, len(self.stages)):
            domain, steps = self.stages[stage], self.stage_steps(stage)
            tx = self.optimizer(steps)
            stream = self.make_stream(stage, domain)
            resume_here = meta is not None and meta["stage"] == stage and not meta["completed"]
            if meta is not None and (resume_here or meta["stage"] == stage - 1):
                # Restore onto *this* run's mesh, whatever mesh wrote the checkpoint.
                restore_cfg = ModelConfig.from_dict(meta["model"])
                restore_tx = tx if resume_here else self.optimizer(self.stage_steps(meta["stage"]))
                shardings = state_shardings(restore_cfg, restore_tx, self.mesh, self.rules)
                shapes = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                             opt_state=restore_tx.init(p)), abstract_params(restore_cfg))
                mirrors = meta.get("strategy_mirrors", {})
                shapes = shapes.replace(strategy=self._strategy_abstract(mirrors, restore_cfg))
                shardings = shardings.replace(strategy=self._strategy_shardings(mirrors, shardings.params))
                restored, _ = ckpt.restore(latest, abstract_like(shapes, shardings))
                self._strategy_carry = {} if resume_here else dict(restored.strategy)
                metrics.truncate(truncate_to)
                truncate_to = None
                params = restored.params
                if resume_here:
                    stream.restore(meta["stream"])
                meta = None          # the checkpoint is consumed; later stages continue in memory
                if not resume_here:
                    restored = None  # free the finished stage's optimizer moments
            if stage == 0 and initial is None:      # only the params: the optimizer state is created below
                param_shardings = state_shardings(model_cfg, tx, self.mesh, self.rules).params
                params = self.initial_params(model_cfg, param_shardings)
                initial = {d: v["perplexity"] for d, v in self.evaluate(model_cfg, params, param_shardings).items()}
                metrics.write(kind="eval_initial", perplexity=initial)
            if not resume_here:
                model_cfg, params = self.stage_model(stage, model_cfg, params)
                state, shardings = create_train_state(model_cfg, tx, jax.random.key(cfg.run.seed), self.mesh,
                                                      self.rules, params=params)
                state, shardings = self._begin_strategies(stage, model_cfg, state, shardings)
            else:
                state = restored
            if stage == first_stage:
                log.info("model: %s, %.2f M params\n%s", model_cfg.family, model_cfg.num_params() / 1e6,
                         sharding_table(state.params, shardings.params))
            state, preempted = self._train_stage(stage, domain, steps, model_cfg, tx, state, shardings, stream, ckpt,
                                                 metrics, stop, matrix, initial, architectures)
            params = state.params
            state, shardings = self._end_strategies(stage, model_cfg, state, shardings)
            row = self.evaluate(model_cfg, params, shardings.params)
            for d, v in row.items():
                metrics.write(kind="eval", stage=domain, stage_index=stage, domain=d,
                              global_step=self._global_step(stage, steps), **v)
            matrix.append([row[d]["perplexity"] for d in self.domains])
            architectures.append(_architecture(model_cfg))
            ckpt.save(self._global_step(stage, steps), state,
                      self._meta(stage, steps, True, model_cfg, stream, matrix, initial, architectures, state.strategy))
            log.info("after stage %d (%s): %s", stage, domain,
                     ", ".join(f"{d}={row[d]['perplexity']:.2f}" for d in self.domains))
            if preempted:      # the signal came on the stage's last step: the stage is saved as completed
                ckpt.wait()
                log.warning("preempted at the end of stage %d: checkpoint saved, exiting", stage)
                raise Preempted(self._global_step(stage, steps))
        ckpt.wait()
        metrics.truncate(truncate_to)          # a run whose last checkpoint completed it: no state was read
        return self._finish(matrix, initial, architectures, time.time() - start)

    def _train_stage(self, stage, domain, steps, model_cfg, tx, state, shardings, stream, ckpt, metrics, stop,
                     matrix, initial, architectures) -> TrainState:
        cfg = self.cfg
        active = self.strategies_active(stage)
        train_step = self.train_step_fn(model_cfg, tx, shardings, with_strategies=active)
        while len(self.stage_flops) <= stage:
            self.stage_flops.append(0.0)
        flops = self.step_flops(model_cfg) + (sum(s.step_flops(self, model_cfg) for s in self.strategies)
                                              if active else 0.0)
        schedule = learning_rate_schedule(cfg.optim, steps)
        sharding = batch_sharding(self.mesh, self.rules)
        rng = jax.random.fold_in(jax.random.key(cfg.run.seed), stage)
        first = int(state.step)
        bar = _progress(steps, first, f"stage {stage} {domain}")
        t_last, tokens_since = time.time(), 0.0
        for step in range(first, steps):
            batch = self.domain_batch(domain, self.next_batch(stage, stream), model_cfg)
            if active:
                state, m = self._strategy_step(train_step, stage, step, model_cfg, state, batch, rng, sharding)
            else:
                state, m = train_step(state, device_batch(batch, sharding), rng)
            tokens_since += cfg.data.batch_size * cfg.data.seq_len
            self.stage_flops[stage] += flops
            bar.update()
            done = step + 1
            self.after_step(stage, done, steps, model_cfg, state, shardings)
            if done % cfg.train.log_every == 0 or done == steps:
                m = jax.device_get(m)
                now = time.time()
                rate = tokens_since / max(now - t_last, 1e-9)
                self.train_seconds += now - t_last
                t_last, tokens_since = now, 0.0
                bar.set_postfix(loss=f"{float(m['loss']):.3f}")
                penalties = {k: float(v) for k, v in m.items() if k.startswith("penalty/") or k == "reference_cosine"}
                metrics.write(kind="train", stage=domain, stage_index=stage, step=done,
                              global_step=self._global_step(stage, done), loss=float(m["loss"]),
                              grad_norm=float(m["grad_norm"]), lr=float(schedule(step)), tokens_per_s=rate,
                              **penalties)
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < steps:
                for d, v in self.evaluate(model_cfg, state.params, shardings.params).items():
                    metrics.write(kind="eval_step", stage=domain, stage_index=stage, domain=d, step=done,
                                  global_step=self._global_step(stage, done), **v)
            preempted = _agreed_stop(stop) or ckpt.reached_preemption(self._global_step(stage, done))
            if done == steps:
                break           # the caller evaluates and saves the completed stage (then honours `preempted`)
            periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0
            if periodic or preempted:
                ckpt.save(self._global_step(stage, done), state,
                          self._meta(stage, done, False, model_cfg, stream, matrix, initial, architectures,
                                     state.strategy))
            if preempted:
                ckpt.wait()
                bar.close()
                log.warning("preempted at global step %d: checkpoint saved, exiting", self._global_step(stage, done))
                raise Preempted(self._global_step(stage, done))
        bar.close()
        return state, first < steps and preempted

    def _strategy_step(self, train_step, stage, step, model_cfg, state, batch, rng, sharding):
        """One step with the strategies: their batch composition (in `run.strategies` order) and, if one
        takes it, the reference batch (the same on every process: pure functions of seed, stage, step)."""
        for s in self.strategies:
            batch = s.compose_batch(self, stage, step, batch)
        args = [state, device_batch(batch, sharding), rng]
        if any(s.uses_reference_batch for s in self.strategies):
            references = [r for r in (s.reference_batch(self, stage, step, model_cfg) for s in self.strategies
                                      if s.uses_reference_batch) if r is not None]
            reference = references[0] if references else batch     # empty memory: the task's own gradient
            args.append(device_batch(reference, sharding))
        return train_step(*args)

    def _meta(self, stage, stage_step, completed, model_cfg, stream, matrix, initial, architectures,
              strategy_tree=None):
        return {"stage": stage, "stage_step": stage_step, "completed": completed, "method": self.method,
                "stages": list(self.stages), "domains": list(self.domains),
                "model": config_to_dict(model_cfg), "stream": stream.state(), "matrix": matrix, "initial": initial,
                "architectures": architectures, "train_seconds": self.train_seconds,
                "stage_flops": self.stage_flops, "method_state": self.method_state(),
                "strategies": {s.name: s.host_state() for s in self.strategies},
                "strategy_mirrors": {name: sorted(tree) for name, tree in (strategy_tree or {}).items()},
                "config": config_to_dict(self.cfg),
                "metrics_offset": self._metrics_log.offset(), "invocations": self._invocations()}

    def _invocations(self) -> list[dict[str, Any]]:
        """The accounting records up to now: earlier invocations' (from the checkpoint) plus this one's."""
        return self._acct.record(train_seconds=self.train_seconds - self._train_seconds_start)

    def report_extras(self, architectures) -> dict[str, Any]:
        """Method-specific report keys; every stage loop reports its architectures and training FLOPs."""
        return {"architectures": architectures, "train_flops": self.stage_flops}

    def _finish(self, matrix, initial, architectures, wall) -> dict[str, Any]:
        tokens = [self.stage_steps(i) * self.cfg.data.batch_size * self.cfg.data.seq_len
                  for i in range(len(self.stages))]
        invocations = self._invocations() if hasattr(self, "_acct") else [{"wall_seconds": wall}]
        report = build_report(self.method, "perplexity", self.stages, self.domains, matrix,
                              Invocations.total(invocations),
                              initial_perplexity=[initial[d] for d in self.domains] if initial else None,
                              train_tokens=tokens, train_seconds=self.train_seconds, invocations=invocations,
                              **self.report_extras(architectures))
        if jax.process_index() == 0:
            plot_matrix(report, self.run_dir / "perplexity_matrix.png")
            plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_loss.png")
            write_report(self.run_dir, report)          # last: report.json marks the run finished
            print(format_matrix(report))
            if initial:
                print("untrained model:".ljust(18) + "".join(f"{initial[d]:.2f}".rjust(max(10, len(d) + 2))
                                                               for d in self.domains))
            print(f"outputs in {self.run_dir}/: report.json, perplexity_matrix.png, training_loss.png, "
                  "metrics.jsonl, config.yaml")
        return report


def steps_of_stage(train: TrainConfig, stage: int) -> int:
    """Optimizer steps of stage `stage`: train.stage_steps, else pretrain_steps (stage 0) or steps."""
    if train.stage_steps:
        return train.stage_steps[stage]
    if stage == 0 and train.pretrain_steps is not None:
        return train.pretrain_steps
    return train.steps


def train_step_flops(model_cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
    """Training FLOPs of one step on `batch_size` sequences of `seq_len` tokens: the layers also run on
    the prompt positions (if the model has prompts); logits are computed for the text positions only."""
    context = seq_len + (model_cfg.prompt_length if model_cfg.num_prompts else 0)
    body = model_cfg.train_flops_per_token(context, logits=False)
    logits = model_cfg.train_flops_per_token(context) - body
    return batch_size * (context * body + seq_len * logits)


def _agreed_stop(stop: dict) -> bool:
    """Whether to stop now; in multi-process runs every process must agree (SIGTERM reaches hosts at
    different steps, and a save is a collective)."""
    local = stop["signal"] is not None
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def _architecture(model_cfg: ModelConfig) -> dict[str, Any]:
    keys = ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff")
    return {k: getattr(model_cfg, k) for k in keys} | {"params": model_cfg.num_params()}


class JointRun(ContinualRun):
    """One stage on the union of all domains (shuffled together): the multitask reference point, with
    the same number of steps as the whole sequential run (pretraining stage + every later stage)."""

    method = "joint"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.model.num_prompts:
            raise ConfigError("model.num_prompts: joint training mixes domains in one stage, so it cannot take "
                              "per-domain prompts; set model.num_prompts=0")
        if not cfg.run.dir:      # never share (and resume) the sequential run's directory
            self.run_dir = Path("runs") / f"{cfg.run.name}-joint"
        # The union of every domain's rows, read through the cache (no copy): the stream samples it without
        # replacement, epoch by epoch.
        self.train_sequences["joint"] = ConcatRows([self.train_sequences[d] for d in self.domains])

    def stage_names(self) -> tuple[str, ...]:
        return ("joint",)

    def stage_steps(self, stage: int) -> int:
        return sum(ContinualRun.stage_steps(self, i) for i in range(len(self.domains)))


__all__ = ["ContinualRun", "JointRun", "Preempted", "steps_of_stage", "train_step_flops"]
