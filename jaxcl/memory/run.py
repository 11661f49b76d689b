"""`jaxcl run` with `run.method: semem`: a frozen LM learns a stream of domains through its memory only.

For every model size (`model`, then each of `semem.extra_models`):
1. take the LM from `model.init_from` (each extra model: its own `init_from`), or pre-train it on the first
   domain with the shared path (`jaxcl.train.pretrain`: one stage of `ContinualRun`, cached by its config);
   the LM is frozen from here on;
2. stream the other domains in chunks; each chunk is scored against each memory as it stood at the
   start of the chunk, then the admitted tokens are added:
   - `semem`: admit tokens with log p(gold) < δ (selective memorization),
   - `full`: admit every token (kNN-LM / full memorization),
   and the LM alone is the third, memory-free baseline;
3. after each chunk: held-out tokens of the chunk (never memorized) join the calibrator's training
   set (with held-out text of the pre-training domain), their features are computed against the
   memory as it now is, the calibrator is retrained from scratch, and every domain's validation
   perplexity is measured.

Resumable at any moment: after each completed chunk, `semem_state.npz` is replaced atomically with what
the stream has produced so far (records, calibrators, the row count each datastore committed, the
metrics.jsonl offset, the accounting). A resumed run reopens each datastore and rolls it back to that
count, recomputes what is a pure function of the chunks seen (token counts, held-out scores), and goes
on with the next chunk: it ends with the same memories and numbers as a run never interrupted.

Writes report.json (the DESIGN.md contract; `matrix` is SeMem's perplexity after each streamed domain
for the main model, `memory` its per-chunk memory records), metrics.jsonl, memory_growth.png,
perplexity_per_chunk.png, perplexity_matrix.png, and per model and policy a datastore plus `memory.npz` (final
calibrator, the stream's token frequencies, k, the LM's checkpoint): `KnnMemory.from_run` and
`jaxcl generate RUN --memory` decode with them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcl import rundir
from jaxcl.config import Config, ConfigError
from jaxcl.eval.metrics import seen_domains
from jaxcl.eval.report import build_report, format_matrix, plot_matrix, plot_memory_growth, plot_series, \
    write_report
from jaxcl.memory.calibrator import Calibrator, fit_calibrator
from jaxcl.memory.datastore import Datastore, DatastoreError, params_fingerprint
from jaxcl.memory.selective import SelectiveMemory, make_lm_scorer, score_sequences
from jaxcl.models import ModelConfig, abstract_params
from jaxcl.train.loop import ContinualRun, MetricsLog, _progress

log = logging.getLogger(__name__)

POLICIES = {"semem": "selective", "full": "all"}
STATE_FILE = "semem_state.npz"


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
        # Where each model comes from: a checkpoint (model.init_from; semem.extra_models[i].init_from), frozen
        # as loaded, or None: pre-trained on the first domain by the shared loop.
        self.sources = [cfg.init_from] + [o.get("init_from") for o in sm.extra_models]
        self._check_tokenizers()

    def _check_tokenizers(self) -> None:
        """Every model reads the run's one token stream: each must fit its vocabulary, and an extra model from
        its own checkpoint must have been trained with the same tokenizer (else its ids mean other text)."""
        from jaxcl.init_from import check_tokenizer_fits, same_tokenizer, tokenizer_spec

        for i, (model_cfg, source) in enumerate(zip(self.models, self.sources)):
            check_tokenizer_fits(dataclasses.replace(self.cfg, model=model_cfg), self.tokenizer, self.tokenizer_spec)
            if i and source is not None:
                theirs = tokenizer_spec(dataclasses.replace(
                    self.cfg, init_from=source, data=dataclasses.replace(self.cfg.data, tokenizer="auto")))
                if not same_tokenizer(theirs, self.tokenizer_spec):
                    raise ConfigError(f"semem.extra_models[{i - 1}].init_from={source!r} uses the tokenizer {theirs!r}, "
                                      f"but this run streams text tokenized by {self.tokenizer_spec!r}: all SeMem "
                                      "models must share one tokenizer")

    # ------------------------------------------------------------------ pre-training (the shared loop)
    def _pretrain(self, model_cfg: ModelConfig, tag: str) -> str:
        """Pre-train on the first domain with the shared path (`jaxcl.train.pretrain`: a cached, resumable
        one-stage run in `semem.pretrain_dir` or the run directory); returns it as an init_from source."""
        from jaxcl.train.pretrain import pretrain

        root = Path(self.cfg.semem.pretrain_dir or self.run_dir)
        return str(pretrain(self.cfg, model_cfg, (self.pretrain_domain,), root, tag))

    def _load_frozen(self, model_cfg: ModelConfig, source: str) -> tuple[Any, dict[str, Any]]:
        """The LM from checkpoint `source`, placed on this run's shardings (SeMem never trains it), and its
        perplexity row on every domain (what the pre-training row reports for a model trained here)."""
        from jaxcl.init_from import load_params
        from jaxcl.models import param_axes
        from jaxcl.parallel import logical_to_sharding

        shardings = logical_to_sharding(param_axes(model_cfg), self.mesh, self.rules, shapes=abstract_params(model_cfg))
        params = load_params(source, model_cfg, shardings, jax.random.key(self.cfg.run.seed))
        row = self.evaluate(model_cfg, params, shardings)
        log.info("SeMem: frozen LM from %s (%.2f M params)", source, model_cfg.num_params() / 1e6)
        return params, {"matrix": [[row[d]["perplexity"] for d in self.domains]]}

    # ------------------------------------------------------------------ the stream
    def _chunks(self):
        for d in self.stream:
            seqs = self.train_sequences[d]
            for c in range(self.cfg.semem.chunks_per_domain):
                start = c * (self.chunk_rows + self.heldout_rows)
                yield d, c, seqs[start:start + self.chunk_rows], \
                    seqs[start + self.chunk_rows:start + self.chunk_rows + self.heldout_rows]

    def _open_store(self, path: Path, count: int, model_cfg: ModelConfig, fingerprint: str) -> Datastore:
        """The policy's datastore holding exactly the `count` rows the last completed chunk committed:
        a new one, or the one an interrupted invocation left, rolled back (rows added by a chunk that
        never completed are dropped)."""
        sm = self.cfg.semem
        if path.exists() and any(path.iterdir()):
            try:
                store = Datastore.open(str(path), model_fingerprint=fingerprint)
            except DatastoreError as e:
                if count:
                    raise ConfigError(f"{path} cannot be resumed: {e}") from None
                store = None             # a create that never finished and nothing committed: start it again
            if store is not None:
                if len(store) < count:
                    raise ConfigError(f"{path} holds {len(store)} rows but {self.run_dir / STATE_FILE} says its last "
                                      f"completed chunk committed {count}: the run directory was changed outside jaxcl")
                store.rollback(count)
                return store
            shutil.rmtree(path)
        elif count:
            raise ConfigError(f"{path} is missing but {self.run_dir / STATE_FILE} says it holds {count} rows")
        return Datastore.create(str(path), dim=model_cfg.d_model, backend=sm.backend, model_fingerprint=fingerprint,
                                tokenizer=self.tokenizer_spec, index_options=dict(sm.index_options), mesh=None)

    def _run_model(self, model_cfg: ModelConfig, tag: str, metrics: MetricsLog,
                   saved: dict[str, Any] | None, source: str | None = None) -> dict[str, Any]:
        """Stream every chunk past the memories of one model; `saved`: this model's stream state from an
        interrupted invocation (None: from the start); `source`: the checkpoint the LM comes from (None:
        pre-trained here)."""
        sm = self.cfg.semem
        source = source or self._pretrain(model_cfg, tag)
        params, pre_report = self._load_frozen(model_cfg, source)
        scorer = make_lm_scorer(model_cfg)
        fingerprint = params_fingerprint(params)
        eval_tokens = {d: score_sequences(scorer, params, self.valid_sequences[d][:self.eval_rows])
                       for d in self.domains}
        lm_only = {d: math.exp(-float(t.lm_logp.mean())) for d in self.domains for t in [eval_tokens[d]]}
        if saved is None:
            metrics.write(kind="semem_lm_only", model=tag, perplexity=lm_only)
        # Held-out text of the pre-training domain too (validation rows the evaluation does not use), so
        # that the calibrator also learns when the memory is irrelevant to what the LM already knows.
        spare = self.valid_sequences[self.pretrain_domain][self.eval_rows:self.eval_rows + self.heldout_rows]
        spare_tokens = score_sequences(scorer, params, spare) if len(spare) else None
        memories = {}
        for name, admit in POLICIES.items():
            store = self._open_store(self.run_dir / tag / name / "datastore", saved["counts"][name] if saved else 0,
                                     model_cfg, fingerprint)
            calibrator = saved["calibrators"][name] if saved else Calibrator.initial(sm.lam, sm.temperature)
            memories[name] = SelectiveMemory(store, admit, sm.threshold, sm.k, calibrator)
            if spare_tokens is not None:
                memories[name].heldout.append(spare_tokens)
        counts = np.ones(self.cfg.model.vocab_size, np.float64)          # token frequencies of the stream so far
        if saved is None:
            records = {name: [] for name in memories}
            curves = {name: {d: [] for d in self.domains} for name in memories}
            matrices = {name: [] for name in memories}
            tokens_seen, done = 0, 0
        else:
            records, curves, matrices = saved["records"], saved["curves"], saved["matrices"]
            tokens_seen, done = saved["tokens_seen"], saved["chunks_done"]
        result = {"tag": tag, "architecture": {k: getattr(model_cfg, k) for k in ("family", "d_model", "n_layers",
                                                                                  "n_heads", "d_ff")}
                  | {"params": model_cfg.num_params()},
                  "pretrain_matrix_row": pre_report["matrix"][0], "lm_only": lm_only, "records": records,
                  "curves": curves, "matrices": matrices}

        def commit(chunks_done: int) -> None:
            self._commit_state(current=result | {"chunks_done": chunks_done, "tokens_seen": tokens_seen,
                                                 "counts": {n: len(m) for n, m in memories.items()}},
                               calibrators={n: m.calibrator for n, m in memories.items()}, metrics=metrics)

        if saved is None:
            commit(0)        # the pre-training and the new stores are this invocation's work so far
        n_chunks = len(self.stream) * sm.chunks_per_domain
        bar = _progress(n_chunks, done, f"semem {tag}")
        for index, (domain, c, chunk, heldout) in enumerate(self._chunks()):
            counts += np.bincount(chunk[:, :-1].reshape(-1), minlength=len(counts))
            if index < done:           # completed before an interruption: rebuild what the state leaves out
                heldout_tokens = score_sequences(scorer, params, heldout)
                for mem in memories.values():
                    mem.heldout.append(heldout_tokens)
                continue
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
            commit(index + 1)          # the chunk is complete: its rows, records and calibrators are kept
            bar.update()
            bar.set_postfix(semem=len(memories["semem"]), full=len(memories["full"]))
        bar.close()
        from jaxcl.init_from import parse_init_from, pinned_spec
        from jaxcl.memory.decoding import MEMORY_FILE, save_memory_info

        pinned = pinned_spec(parse_init_from(source))
        if jax.process_index() == 0:
            for name, mem in memories.items():      # what decoding with this memory needs (KnnMemory.from_run)
                save_memory_info(self.run_dir / tag / name / MEMORY_FILE, calibrator=mem.calibrator,
                                 log_freq=np.log(counts).astype(np.float32), k=sm.k, lam=sm.lam, source=pinned)
        self._done_models[tag] = result
        self._commit_state(current=None, calibrators={}, metrics=metrics)
        return result

    # ------------------------------------------------------------------ the stream state (resume)
    def _commit_state(self, *, current: dict[str, Any] | None, calibrators: dict[str, Calibrator],
                      metrics: MetricsLog) -> None:
        """Replace semem_state.npz (atomically) with the finished models' results, the current model's
        stream state, the metrics.jsonl offset and the accounting."""
        if jax.process_index() != 0:
            return
        state = {"models": self._done_models, "current": current, "metrics_offset": metrics.offset(),
                 "invocations": self._acct.record()}
        arrays = {"state.json": np.frombuffer(json.dumps(state).encode(), np.uint8)}
        for name, cal in calibrators.items():
            arrays |= cal.to_arrays(f"cal|{name}|")
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        rundir.atomic_write(self.run_dir / STATE_FILE, buf.getvalue())

    def _load_state(self) -> dict[str, Any] | None:
        """What the last completed chunk committed (None: no chunk state yet)."""
        path = self.run_dir / STATE_FILE
        if not path.is_file():
            return None
        with np.load(path) as z:
            state = json.loads(bytes(z["state.json"]).decode())
            if state["current"] is not None:
                state["current"]["calibrators"] = {name: Calibrator.from_arrays(z, f"cal|{name}|")
                                                   for name in POLICIES}
        return state

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        finished = rundir.begin(self.run_dir, self.cfg, self.method)      # before anything is written
        if finished is not None:
            return finished
        state = self._load_state()
        self._acct = rundir.Invocations(state["invocations"] if state else [])
        self._done_models: dict[str, Any] = dict(state["models"]) if state else {}
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        metrics.truncate(state["metrics_offset"] if state else 0)       # records after the last completed chunk go
        current = state["current"] if state else None
        results = []
        for i, m in enumerate(self.models):
            tag = f"model{i}-d{m.d_model}"
            if tag in self._done_models:
                results.append(self._done_models[tag])
                continue
            results.append(self._run_model(m, tag, metrics, current if current and current["tag"] == tag else None,
                                           source=self.sources[i]))
        invocations = self._acct.record()
        report = self._report(results, rundir.Invocations.total(invocations)) | {"invocations": invocations}
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
                            pretrain_domain=self.pretrain_domain, models=models, acceptance=acceptance,
                            initial_perplexity=main["pretrain_matrix_row"], init_from=self.sources[0])

    def _write(self, report, results) -> None:
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
        write_report(self.run_dir, report)          # last: report.json marks the run finished
        print(format_matrix(report))
        for m in report["models"]:
            print(f"{m['tag']}: memory semem/full = {m['memory_size']['semem']}/{m['memory_size']['full']} "
                  f"({m['memory_ratio']:.2%}); mean ppl semem {m['average_final_perplexity']['semem']:.2f}, "
                  f"full {m['average_final_perplexity']['full']:.2f}, LM {m['average_final_perplexity']['lm_only']:.2f}")
        print("acceptance:", report["acceptance"])
        print(f"outputs in {self.run_dir}/: report.json, memory_growth.png, perplexity_per_chunk.png, "
              "admitted_rate.png, perplexity_matrix.png, metrics.jsonl, config.yaml")


def _override_model(base: ModelConfig, overrides: dict[str, Any], i: int) -> ModelConfig:
    """`semem.extra_models[i]`: overrides of the main model, or `{init_from: CHECKPOINT}` (its architecture;
    other keys may only repeat it)."""
    overrides = dict(overrides)
    spec = overrides.pop("init_from", None)
    if spec is not None:
        from jaxcl.init_from import InitFromError, parse_init_from, source_model_config

        try:
            loaded = source_model_config(parse_init_from(spec))
        except (InitFromError, ValueError, FileNotFoundError) as e:
            raise ConfigError(f"semem.extra_models[{i}].init_from: {e}") from None
        clash = sorted(k for k, v in overrides.items() if k in loaded.to_dict() and loaded.to_dict()[k] != v)
        if clash:
            raise ConfigError(f"semem.extra_models[{i}]: {', '.join(clash)} disagree with its init_from checkpoint "
                              f"{spec!r}")
        base = loaded
    try:
        return ModelConfig.from_dict({**base.to_dict(), **overrides})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"semem.extra_models[{i}]: {e}") from None

