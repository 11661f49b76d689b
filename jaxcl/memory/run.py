"""`jaxcl run` with `run.method: semem`: a frozen LM learns a stream of domains through its memory only.

For every model size (`model`, then each of `semem.extra_models`):
1. pre-train the LM on the first domain with the shared training loop (`ContinualRun`, one stage; its
   checkpoint makes a rerun skip this);
2. stream the other domains in chunks; each chunk is scored against each memory as it stood at the
   start of the chunk, then the admitted tokens are added:
   - `semem`: admit tokens with log p(gold) < δ (selective memorization),
   - `full`: admit every token (kNN-LM / full memorization),
   and the LM alone is the third, memory-free baseline;
3. after each chunk: held-out tokens of the chunk (never memorized) join the calibrator's training
   set (with held-out text of the pre-training domain), their features are computed against the
   memory as it now is, the calibrator is retrained from scratch, and every domain's validation
   perplexity is measured.

Writes report.json (the DESIGN.md contract; `matrix` is SeMem's perplexity after each streamed domain
for the main model, `memory` its per-chunk memory records), metrics.jsonl, memory_growth.png,
perplexity_per_chunk.png, perplexity_matrix.png, and one datastore per model and policy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.config import Config, ConfigError, save_config
from jaxcl.eval.metrics import seen_domains
from jaxcl.eval.report import build_report, format_matrix, plot_matrix, plot_memory_growth, plot_series, \
    write_report
from jaxcl.memory.calibrator import Calibrator, fit_calibrator
from jaxcl.memory.datastore import Datastore, params_fingerprint
from jaxcl.memory.selective import SelectiveMemory, make_lm_scorer, score_sequences
from jaxcl.models import ModelConfig, abstract_params
from jaxcl.train.checkpoint import Checkpointer, abstract_like
from jaxcl.train.loop import ContinualRun, MetricsLog, _progress
from jaxcl.train.optimizer import make_optimizer
from jaxcl.train.state import TrainState, state_shardings

log = logging.getLogger(__name__)

POLICIES = {"semem": "selective", "full": "all"}


class SememRun(ContinualRun):
    """SeMem over the embedded stream, with full memorization and the bare LM as baselines."""

    method = "semem"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        sm = cfg.semem
        self.pretrain_domain = self.domains[0]
        self.stream = tuple(sm.stream_domains) or self.domains[1:]
        if not self.stream:
            raise ConfigError("semem needs at least one domain to stream after the pre-training domain "
                              f"(data.domains={list(self.domains)}, semem.stream_domains={list(sm.stream_domains)})")
        for d in self.stream:
            if d not in self.domains:
                raise ConfigError(f"semem.stream_domains: {d!r} is not one of data.domains {list(self.domains)}")
        seq = cfg.data.seq_len
        self.chunk_rows = max(1, sm.chunk_tokens // seq)
        self.heldout_rows = max(1, sm.heldout_tokens // seq)
        self.eval_rows = max(1, sm.eval_tokens // seq)
        for d in self.stream:
            need = sm.chunks_per_domain * (self.chunk_rows + self.heldout_rows)
            if len(self.train_sequences[d]) < need:
                raise ConfigError(f"domain {d!r} has {len(self.train_sequences[d])} training sequences of "
                                  f"{seq} tokens; semem.chunks_per_domain={sm.chunks_per_domain} x (chunk_tokens="
                                  f"{sm.chunk_tokens} + heldout_tokens={sm.heldout_tokens}) needs {need}")
        self.models = [cfg.model] + [_override_model(cfg.model, o, i) for i, o in enumerate(sm.extra_models)]

    # ------------------------------------------------------------------ pre-training (the shared loop)
    def _pretrain(self, model_cfg: ModelConfig, tag: str) -> Any:
        """Pre-train on the first domain with ContinualRun (resumable, cached) and return the params."""
        pre = object.__new__(ContinualRun)
        pre.__dict__.update(self.__dict__)
        pre.cfg = dataclasses.replace(self.cfg, model=model_cfg,
                                      run=dataclasses.replace(self.cfg.run, method="sequential"))
        pre.run_dir = Path(self.cfg.semem.pretrain_dir or self.run_dir) / f"pretrain-{tag}"
        pre.stages = (self.pretrain_domain,)
        pre.stage_flops = []          # per pre-training run (the dict copy above would share the list)
        report = pre.run()
        ckpt = Checkpointer(pre.run_dir / "checkpoints", self.cfg.checkpoint)
        try:
            step = ckpt.latest_step()
            tx = make_optimizer(self.cfg.optim, pre.stage_steps(0))
            shardings = state_shardings(model_cfg, tx, self.mesh, self.rules)
            shapes = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                                    abstract_params(model_cfg))
            state, _ = ckpt.restore(step, abstract_like(shapes, shardings))
        finally:
            ckpt.close()
        return state.params, report

    # ------------------------------------------------------------------ the stream
    def _chunks(self):
        for d in self.stream:
            seqs = self.train_sequences[d]
            for c in range(self.cfg.semem.chunks_per_domain):
                start = c * (self.chunk_rows + self.heldout_rows)
                yield d, c, seqs[start:start + self.chunk_rows], \
                    seqs[start + self.chunk_rows:start + self.chunk_rows + self.heldout_rows]

    def _run_model(self, model_cfg: ModelConfig, tag: str, metrics: MetricsLog) -> dict[str, Any]:
        sm = self.cfg.semem
        params, pre_report = self._pretrain(model_cfg, tag)
        scorer = make_lm_scorer(model_cfg)
        fingerprint = params_fingerprint(params)
        eval_tokens = {d: score_sequences(scorer, params, self.valid_sequences[d][:self.eval_rows])
                       for d in self.domains}
        lm_only = {d: math.exp(-float(t.lm_logp.mean())) for d in self.domains for t in [eval_tokens[d]]}
        metrics.write(kind="semem_lm_only", model=tag, perplexity=lm_only)
        memories = {}
        for name, admit in POLICIES.items():
            path = self.run_dir / tag / name / "datastore"
            if (path / "manifest.json").exists():
                raise ConfigError(f"{path} already holds a datastore from an earlier run: choose another run.dir")
            store = Datastore.create(str(path), dim=model_cfg.d_model, backend=sm.backend,
                                     model_fingerprint=fingerprint, tokenizer=self.cfg.data.tokenizer,
                                     index_options=dict(sm.index_options), mesh=None)
            memories[name] = SelectiveMemory(store, admit, sm.threshold, sm.k, Calibrator.initial(sm.lam, sm.temperature))
            # Held-out text of the pre-training domain too (validation rows the evaluation does not use), so
            # that the calibrator also learns when the memory is irrelevant to what the LM already knows.
            spare = self.valid_sequences[self.pretrain_domain][self.eval_rows:self.eval_rows + self.heldout_rows]
            if len(spare):
                memories[name].heldout.append(score_sequences(scorer, params, spare))
        counts = np.ones(self.cfg.model.vocab_size, np.float64)          # token frequencies of the stream so far
        records = {name: [] for name in memories}
        curves = {name: {d: [] for d in self.domains} for name in memories}
        matrices = {name: [] for name in memories}
        tokens_seen = 0
        n_chunks = len(self.stream) * sm.chunks_per_domain
        bar = _progress(n_chunks, 0, f"semem {tag}")
        for index, (domain, c, chunk, heldout) in enumerate(self._chunks()):
            counts += np.bincount(chunk[:, :-1].reshape(-1), minlength=len(counts))
            log_freq = np.log(counts).astype(np.float32)
            chunk_tokens = score_sequences(scorer, params, chunk)
            heldout_tokens = score_sequences(scorer, params, heldout)
            tokens_seen += len(chunk_tokens)
            for name, mem in memories.items():
                stats = mem.memorize(chunk_tokens, log_freq)
                mem.heldout.append(heldout_tokens)
                data = mem.calibration_data(log_freq)
                if data is not None:
                    mem.calibrator = fit_calibrator(data, sm.calibrator, init=mem.calibrator,
                                                    steps=sm.calibrator_steps, lr=sm.calibrator_lr,
                                                    hidden=sm.calibrator_hidden,
                                                    rng=jax.random.fold_in(jax.random.key(self.cfg.run.seed), index))
                ppl = {d: math.exp(-float(mem.logprobs(eval_tokens[d], log_freq)[0].mean())) for d in self.domains}
                rec = {"domain": domain, "chunk": c, "tokens_seen": tokens_seen, "memory_size": len(mem),
                       "tokens_admitted": stats["admitted"], "admitted_rate": stats["admitted"] / stats["tokens"],
                       "online_perplexity": math.exp(stats["online_nll"]),
                       "temperature": mem.calibrator.temperature, "perplexity": ppl}
                records[name].append(rec)
                for d in self.domains:
                    curves[name][d].append(ppl[d])
                if c == sm.chunks_per_domain - 1:
                    matrices[name].append([ppl[d] for d in self.domains])
                metrics.write(kind="semem_chunk", model=tag, policy=name, **rec)
            bar.update()
            bar.set_postfix(semem=len(memories["semem"]), full=len(memories["full"]))
        bar.close()
        return {"tag": tag, "architecture": {k: getattr(model_cfg, k) for k in ("family", "d_model", "n_layers",
                                                                                "n_heads", "d_ff")}
                | {"params": model_cfg.num_params()},
                "pretrain_matrix_row": pre_report["matrix"][0], "lm_only": lm_only, "records": records,
                "curves": curves, "matrices": matrices}

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        start = time.time()
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        results = [self._run_model(m, f"model{i}-d{m.d_model}", metrics) for i, m in enumerate(self.models)]
        report = self._report(results, time.time() - start)
        if jax.process_index() == 0:
            self._write(report, results)
        return report

    def _report(self, results, wall) -> dict[str, Any]:
        main = results[0]
        memory = [{k: r[k] for k in ("domain", "chunk", "tokens_seen", "memory_size", "admitted_rate",
                                     "tokens_admitted")} for r in main["records"]["semem"]]
        models = []
        for res in results:
            semem, full = res["records"]["semem"][-1], res["records"]["full"][-1]
            avg = {name: float(np.mean(list(res["records"][name][-1]["perplexity"].values()))) for name in POLICIES}
            avg_lm = float(np.mean(list(res["lm_only"].values())))
            rates_by_domain = {}
            for r in res["records"]["semem"]:
                rates_by_domain.setdefault(r["domain"], []).append(r["admitted_rate"])
            models.append({
                "tag": res["tag"], "architecture": res["architecture"], "lm_only_perplexity": res["lm_only"],
                "final_perplexity": {name: res["records"][name][-1]["perplexity"] for name in POLICIES},
                "average_final_perplexity": avg | {"lm_only": avg_lm},
                "memory_size": {"semem": semem["memory_size"], "full": full["memory_size"]},
                "memory_ratio": semem["memory_size"] / max(full["memory_size"], 1),
                "perplexity_ratio": avg["semem"] / avg["full"],
                "admitted_rate_by_domain": rates_by_domain,
                "memory": {name: res["records"][name] for name in POLICIES}})
        acceptance = {
            "memory_ratio": models[0]["memory_ratio"],
            "memory_at_most_60_percent": models[0]["memory_ratio"] <= 0.60,
            "perplexity_ratio_vs_full": models[0]["perplexity_ratio"],
            "perplexity_within_5_percent": models[0]["perplexity_ratio"] <= 1.05,
            "rate_falls_within_every_domain": all(v[-1] < v[0] for v in models[0]["admitted_rate_by_domain"].values()),
        }
        if len(models) > 1:
            acceptance["larger_model_admits_fewer"] = all(
                m["memory_size"]["semem"] < models[0]["memory_size"]["semem"] for m in models[1:]
                if m["architecture"]["params"] > models[0]["architecture"]["params"])
        seen = seen_domains(self.stream, self.domains, also=[self.pretrain_domain])
        return build_report(self.method, "perplexity", self.stream, self.domains, main["matrices"]["semem"], wall,
                            seen=seen, memory=memory,
                            baselines={"full_memory": main["matrices"]["full"],
                                       "lm_only": [main["lm_only"][d] for d in self.domains]},
                            pretrain_domain=self.pretrain_domain, models=models, acceptance=acceptance)

    def _write(self, report, results) -> None:
        write_report(self.run_dir, report)
        plot_matrix(report, self.run_dir / "perplexity_matrix.png")
        curves = {f"{res['tag']} {name}": res["records"][name] for res in results for name in POLICIES}
        plot_memory_growth(curves, self.run_dir / "memory_growth.png")
        labels = [f"{r['domain']}#{r['chunk']}" for r in results[0]["records"]["semem"]]
        series = {}
        for res in results:
            for name in POLICIES:
                series[f"{res['tag']} {name}"] = [float(np.mean(list(r["perplexity"].values())))
                                                  for r in res["records"][name]]
            series[f"{res['tag']} LM only"] = [float(np.mean(list(res["lm_only"].values())))] * len(labels)
        plot_series(series, self.run_dir / "perplexity_per_chunk.png", xlabel="after chunk",
                    ylabel="mean validation perplexity (all domains)", title="SeMem vs full memory vs LM",
                    xticks=labels)
        rates = {f"{res['tag']} semem": [r["admitted_rate"] for r in res["records"]["semem"]] for res in results}
        plot_series(rates, self.run_dir / "admitted_rate.png", xlabel="chunk", ylabel="admitted fraction",
                    title=f"SeMem memorization rate (δ = {self.cfg.semem.threshold})", xticks=labels)
        print(format_matrix(report))
        for m in report["models"]:
            print(f"{m['tag']}: memory semem/full = {m['memory_size']['semem']}/{m['memory_size']['full']} "
                  f"({m['memory_ratio']:.2%}); mean ppl semem {m['average_final_perplexity']['semem']:.2f}, "
                  f"full {m['average_final_perplexity']['full']:.2f}, LM {m['average_final_perplexity']['lm_only']:.2f}")
        print("acceptance:", report["acceptance"])
        print(f"outputs in {self.run_dir}/: report.json, memory_growth.png, perplexity_per_chunk.png, "
              "admitted_rate.png, perplexity_matrix.png, metrics.jsonl, config.yaml")


def _override_model(base: ModelConfig, overrides: dict[str, Any], i: int) -> ModelConfig:
    try:
        return ModelConfig.from_dict({**dataclasses.asdict(base), **overrides})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"semem.extra_models[{i}]: {e}") from None
