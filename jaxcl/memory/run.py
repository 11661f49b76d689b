"""`jaxcl run` with `run.method: semem`: a frozen LM learns a stream of domains through its memory only.

The protocol (the SeMem paper's, sized by the config):
1. each pre-training domain's training documents are split in document order into a *past* (the first
   `semem.past_fraction`) and a *future* (the rest); for every model size (`model`, then each of
   `semem.extra_models`) the LM comes from `model.init_from` (each extra model: its own `init_from`) or is
   pre-trained on the mixture of all pasts with the shared path (`jaxcl.train.pretrain`: one joint stage of
   `ContinualRun`, cached by its config); the LM is frozen from here on;
2. the stream: every pre-training domain's future, then the other domains (of `data.domains`, and of
   `semem.stream_source`, e.g. `embedded:unseen`: text the LM never saw), each cut into chunks. Each chunk
   is scored against each memory as it stood at the start of the chunk, then the admitted tokens are added.
   The policies, on one code path (`selective.stream_policies`):
   - `semem` (and `semem@δ` for each δ of `semem.sweep`): admit tokens with log p(gold) < δ,
   - `full`: admit every token (kNN-LM / full memorization),
   - `randmem` / `randmem@δ` (`semem.random_control`): a seeded random subset of the chunk of the same size
     as the matching SeMem policy admitted from it (the paper's RandMem control),
   and the LM alone is the memory-free baseline;
3. after each chunk: held-out tokens of the chunk (never memorized) join the calibrator's training
   set (with held-out text of the pre-training domains), their features are computed against the
   memory as it now is, the calibrator is retrained from scratch, and (every chunk or at each domain's
   end: `semem.eval_every`) every domain's validation perplexity is measured;
4. at the end, every policy's perplexity on every domain's test split (read once, for the report).

Resumable at any moment: after each completed chunk, `semem_state.npz` is replaced atomically with what
the stream has produced so far (records, calibrators, the row count each datastore committed, the
metrics.jsonl offset, the accounting). A resumed run reopens each datastore and rolls it back to that
count, recomputes what is a pure function of the chunks seen (token counts, held-out scores), and goes
on with the next chunk: it ends with the same memories and numbers as a run never interrupted.

Writes report.json (the DESIGN.md contract; `matrix` is SeMem's perplexity after each streamed domain
for the main model, `memory` its per-chunk memory records; per model, every policy's memory size and
validation / test perplexity, the per-sequence test NLL a paired bootstrap resamples (`test_nll`,
`lm_only_test_nll`), the stream's and the test evaluation's wall seconds, the δ chosen on validation and the
acceptance checks), metrics.jsonl (`semem_chunk` records, and `semem_chunk_seconds`: where each chunk's
time went), memory_growth.png, admitted_rate.png, perplexity_per_chunk.png, perplexity_matrix.png,
tradeoff-<model>.png
(perplexity vs memory size: the δ sweep against RandMem and full memorization), and per model and policy a
datastore plus `memory.npz` (final calibrator, the stream's token frequencies, k, the LM's checkpoint):
`KnnMemory.from_run` and `jaxcl generate RUN --memory` decode with them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcl import rundir
from jaxcl.config import Config, ConfigError
from jaxcl.eval.metrics import seen_domains
from jaxcl.eval.report import build_report, format_matrix, plot_matrix, plot_memory_growth, plot_series, \
    write_report
from jaxcl.memory.calibrator import Calibrator, fit_calibrators
from jaxcl.memory.datastore import Datastore, DatastoreError, params_fingerprint
from jaxcl.data.sources import open_source
from jaxcl.data.stream import split_rows
from jaxcl.memory.selective import SelectiveMemory, make_lm_scorer, score_sequences, stream_policies
from jaxcl.models import ModelConfig, abstract_params
from jaxcl.train.loop import ContinualRun, MetricsLog, _progress

log = logging.getLogger(__name__)

STATE_FILE = "semem_state.npz"


class SememRun(ContinualRun):
    """SeMem over a past/future stream, with its δ sweep, RandMem, full memorization and the bare LM on one path."""

    method = "semem"

    def __init__(self, cfg: Config):
        if cfg.run.strategies:
            raise ConfigError(f"run.strategies={list(cfg.run.strategies)}: SeMem keeps its LM frozen while it "
                              "memorizes, so no training strategy applies; leave run.strategies empty")
        if cfg.data.mixture:
            raise ConfigError("data.mixture: SeMem streams its domains chunk by chunk and pre-trains on the pasts "
                              "jointly; it takes no mixture (remove data.mixture)")
        super().__init__(cfg)
        sm = cfg.semem
        self.policies = stream_policies(sm.threshold, sm.sweep, sm.random_control)
        self.pretrain_domains = tuple(sm.pretrain_domains) or self.domains
        for d in self.pretrain_domains:
            if d not in self.domains:
                raise ConfigError(f"semem.pretrain_domains: {d!r} is not one of data.domains {list(self.domains)}")
        seq = cfg.data.seq_len
        stream_source = open_source(sm.stream_source, cfg.data.text_field, "semem.stream_source") \
            if sm.stream_source else None
        extra = tuple(d for d in (stream_source.domains() if stream_source else ())
                      if d not in self.domains)
        if sm.stream_domains:
            self.stream = tuple(sm.stream_domains)
        else:
            self.stream = (tuple(d for d in self.pretrain_domains if sm.past_fraction < 1)
                           + tuple(d for d in self.domains if d not in self.pretrain_domains) + extra)
        if not self.stream:
            raise ConfigError("semem streams nothing: semem.past_fraction=1 leaves the pre-training domains no "
                              "future, and data.domains / semem.stream_source add no other domain "
                              f"(semem.stream_domains={list(sm.stream_domains)})")
        bar = _progress(len(self.stream), 0, "stream text")
        self.stream_sequences: dict[str, np.ndarray] = {}
        self.eval_domains = self.domains + tuple(d for d in self.stream if d not in self.domains)
        n_eval = cfg.data.eval_batches * cfg.data.batch_size
        extras = tuple(d for d in self.stream if d in extra)
        extra_train = split_rows(cfg.data, self.tokenizer, self.tokenizer_spec, extras, "train", source=stream_source,
                                 source_spec=sm.stream_source, key="semem.stream_source") if extras else {}
        extra_valid = split_rows(cfg.data, self.tokenizer, self.tokenizer_spec, extras, "valid", source=stream_source,
                                 source_spec=sm.stream_source, key="semem.stream_source") if extras else {}
        for d in self.stream:
            if d in self.pretrain_domains:
                if sm.past_fraction >= 1:
                    raise ConfigError(f"semem.stream_domains: {d!r} is a pre-training domain and "
                                      "semem.past_fraction=1 leaves it no future to stream")
                self.stream_sequences[d] = split_rows(cfg.data, self.tokenizer, self.tokenizer_spec, (d,), "train",
                                                      source=self._source, documents=(sm.past_fraction, 1.0))[d]
            elif d in extra:
                self.stream_sequences[d] = extra_train[d]
                self.valid_sequences[d] = extra_valid[d][:n_eval]
            elif d in self.domains:
                self.stream_sequences[d] = self.train_sequences[d]
            else:
                where = f"semem.stream_source={sm.stream_source!r}" if sm.stream_source else "data.domains"
                raise ConfigError(f"semem.stream_domains: {d!r} is neither one of data.domains "
                                  f"{list(self.domains)} nor a domain of {where}")
            bar.update()
        bar.close()
        self.chunk_rows = max(1, sm.chunk_tokens // seq) if sm.chunk_tokens else None
        self.heldout_rows = max(1, sm.heldout_tokens // seq)
        self.eval_rows = max(1, sm.eval_tokens // seq)
        self.test_rows = max(1, (sm.test_tokens or sm.eval_tokens) // seq)
        for d in self.stream:
            self._chunk_layout(d)                       # every domain has text for its chunks (or a named error)
        self._stream_source = stream_source
        self.models = [cfg.model] + [_override_model(cfg.model, o, i) for i, o in enumerate(sm.extra_models)]
        # Where each model comes from: a checkpoint (model.init_from; semem.extra_models[i].init_from), frozen
        # as loaded, or None: pre-trained on the mixture of the pasts by the shared loop.
        self.sources = [cfg.init_from] + [o.get("init_from") for o in sm.extra_models]
        self._check_tokenizers()

    def _chunk_layout(self, domain: str) -> tuple[int, int]:
        """(rows per chunk memorized, rows per chunk in all: those plus the held-out rows) of a stream domain."""
        sm, n = self.cfg.semem, len(self.stream_sequences[domain])
        if self.chunk_rows is not None:
            need = sm.chunks_per_domain * (self.chunk_rows + self.heldout_rows)
            if n < need:
                raise ConfigError(f"domain {domain!r} has {n} stream sequences of {self.cfg.data.seq_len} tokens; "
                                  f"semem.chunks_per_domain={sm.chunks_per_domain} x (chunk_tokens={sm.chunk_tokens} "
                                  f"+ heldout_tokens={sm.heldout_tokens}) needs {need}")
            return self.chunk_rows, self.chunk_rows + self.heldout_rows
        per = n // sm.chunks_per_domain
        if per <= self.heldout_rows:
            raise ConfigError(f"domain {domain!r} has {n} stream sequences of {self.cfg.data.seq_len} tokens: cut "
                              f"into semem.chunks_per_domain={sm.chunks_per_domain} chunks, each has {per}, no more "
                              f"than semem.heldout_tokens={sm.heldout_tokens} hold out")
        return per - self.heldout_rows, per

    def _test_sequences(self) -> dict[str, np.ndarray]:
        """Every evaluated domain's test split (its first `semem.test_tokens`, default `semem.eval_tokens`), read
        once for the report."""
        out, data = {}, self.cfg.data
        for d in self.eval_domains:
            if d in self.domains:
                rows = split_rows(data, self.tokenizer, self.tokenizer_spec, (d,), "test", source=self._source)[d]
            else:
                rows = split_rows(data, self.tokenizer, self.tokenizer_spec, (d,), "test", source=self._stream_source,
                                  source_spec=self.cfg.semem.stream_source, key="semem.stream_source")[d]
            out[d] = rows[:self.test_rows]
        return out

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

    def model_tag(self, i: int) -> str:
        """The name of model `i` (0: `model`, then `semem.extra_models`) in the run directory and report."""
        return f"model{i}-d{self.models[i].d_model}"

    # ------------------------------------------------------------------ pre-training (the shared loop)
    def pretrained(self, model_cfg: ModelConfig, tag: str) -> str:
        """Pre-train on the mixture of the pre-training domains' pasts with the shared path
        (`jaxcl.train.pretrain`: a cached, resumable run in `semem.pretrain_dir` or the run directory);
        returns its run directory as an init_from source. A benchmark calls it to time the pre-training
        apart from the stream (`benchmarks/semem_stream.py`); the run then reuses the cached result."""
        from jaxcl.train.pretrain import pretrain

        sm = self.cfg.semem
        past = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data,
                                                                      train_documents=(0.0, sm.past_fraction)))
        root = Path(sm.pretrain_dir or self.run_dir)
        return str(pretrain(past, model_cfg, self.pretrain_domains, root, tag))

    def _load_frozen(self, model_cfg: ModelConfig, source: str) -> Any:
        """The LM from checkpoint `source`, placed on this run's shardings (SeMem never trains it)."""
        from jaxcl.init_from import load_params
        from jaxcl.models import param_axes
        from jaxcl.parallel import logical_to_sharding

        shardings = logical_to_sharding(param_axes(model_cfg), self.mesh, self.rules, shapes=abstract_params(model_cfg))
        params = load_params(source, model_cfg, shardings, jax.random.key(self.cfg.run.seed))
        log.info("SeMem: frozen LM from %s (%.2f M params)", source, model_cfg.num_params() / 1e6)
        return params

    # ------------------------------------------------------------------ the stream
    def _chunks(self):
        """(domain, chunk index, memorized rows, held-out rows) of the whole stream, in order."""
        for d in self.stream:
            seqs = self.stream_sequences[d]
            rows, step = self._chunk_layout(d)
            for c in range(self.cfg.semem.chunks_per_domain):
                start = c * step
                yield d, c, seqs[start:start + rows], seqs[start + rows:start + step]

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
        sm, seed = self.cfg.semem, self.cfg.run.seed
        source = source or self.pretrained(model_cfg, tag)
        params = self._load_frozen(model_cfg, source)
        scorer = make_lm_scorer(model_cfg)
        fingerprint = params_fingerprint(params)
        eval_tokens = {d: score_sequences(scorer, params, self.valid_sequences[d][:self.eval_rows])
                       for d in self.eval_domains}
        lm_only = {d: math.exp(-float(eval_tokens[d].lm_logp.mean())) for d in self.eval_domains}
        if saved is None:
            metrics.write(kind="semem_lm_only", model=tag, perplexity=lm_only)
        # Held-out text of the pre-training domains too (validation rows the evaluation does not use), so
        # that the calibrator also learns when the memory is irrelevant to what the LM already knows.
        spare = [s for d in self.pretrain_domains
                 for s in [self.valid_sequences[d][self.eval_rows:self.eval_rows + self.heldout_rows]] if len(s)]
        spare_tokens = [score_sequences(scorer, params, s) for s in spare]
        memories = {}
        for name, policy in self.policies.items():
            store = self._open_store(self.run_dir / tag / name / "datastore", saved["counts"][name] if saved else 0,
                                     model_cfg, fingerprint)
            calibrator = saved["calibrators"][name] if saved else Calibrator.initial(sm.lam, sm.temperature)
            memories[name] = SelectiveMemory(store, policy.admit, policy.threshold, sm.k, calibrator)
            memories[name].heldout.extend(spare_tokens)
        counts = np.ones(self.cfg.model.vocab_size, np.float64)          # token frequencies of the stream so far
        if saved is None:
            records = {name: [] for name in memories}
            curves = {name: {d: [] for d in self.eval_domains} for name in memories}
            matrices = {name: [] for name in memories}
            tokens_seen, done = 0, 0
        else:
            records, curves, matrices = saved["records"], saved["curves"], saved["matrices"]
            tokens_seen, done = saved["tokens_seen"], saved["chunks_done"]
        result = {"tag": tag, "architecture": {k: getattr(model_cfg, k) for k in ("family", "d_model", "n_layers",
                                                                                  "n_heads", "d_ff")}
                  | {"params": model_cfg.num_params()},
                  "pretrain_matrix_row": [lm_only[d] for d in self.eval_domains], "lm_only": lm_only,
                  "records": records, "curves": curves, "matrices": matrices,
                  # wall seconds of this model's stream (chunks, calibration, validation) and test evaluation,
                  # summed over invocations
                  "seconds": dict(saved["seconds"]) if saved and "seconds" in saved else {"stream": 0.0,
                                                                                         "test": 0.0}}

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
            started = time.monotonic()
            log_freq = np.log(counts).astype(np.float32)
            chunk_tokens = score_sequences(scorer, params, chunk)
            heldout_tokens = score_sequences(scorer, params, heldout)
            tokens_seen += len(chunk_tokens)
            evaluate = sm.eval_every == "chunk" or c == sm.chunks_per_domain - 1
            admitted: dict[str, int] = {}
            stats: dict[str, dict[str, Any]] = {}
            took: dict[str, float] = {"score": time.monotonic() - started}      # where the chunk's time goes
            for name, mem in memories.items():
                policy = self.policies[name]
                # Seeded by (run seed, chunk, policy): a resumed chunk draws the same random subset.
                rng = np.random.default_rng([seed, index, zlib.crc32(name.encode())])
                t0 = time.monotonic()
                stats[name] = mem.memorize(chunk_tokens, log_freq, rng=rng,
                                           size=admitted[policy.matches] if policy.matches else None)
                took[f"memorize {name}"] = time.monotonic() - t0
                admitted[name] = stats[name]["admitted"]
                mem.heldout.append(heldout_tokens)
            # The same held-out subset for every policy (seeded by the chunk only), the same initialisation,
            # minibatches and dropout: memories that agree get the same calibrator. Fitted together (one
            # vmapped fit per shape of held-out data).
            t0 = time.monotonic()
            datas = {name: mem.calibration_data(log_freq, sm.calibrator_max_tokens,
                                                rng=np.random.default_rng([seed, index]))
                     for name, mem in memories.items()}
            groups: dict[tuple, list[str]] = {}
            for name, data in datas.items():
                if data is not None:
                    groups.setdefault((len(data), data.dists.shape[1]), []).append(name)
            for names in groups.values():
                fitted = fit_calibrators([datas[n] for n in names], sm.calibrator,
                                         inits=[memories[n].calibrator for n in names], steps=sm.calibrator_steps,
                                         lr=sm.calibrator_lr, hidden=sm.calibrator_hidden,
                                         batch=sm.calibrator_batch, rng=jax.random.fold_in(jax.random.key(seed), index))
                for n, cal in zip(names, fitted):
                    memories[n].calibrator = cal
            took["calibrate (all policies)"] = time.monotonic() - t0
            for name, mem in memories.items():
                st = stats[name]
                rec = {"domain": domain, "chunk": c, "tokens_seen": tokens_seen, "memory_size": len(mem),
                       "tokens": st["tokens"], "tokens_admitted": st["admitted"],
                       "admitted_rate": st["admitted"] / st["tokens"],
                       "online_perplexity": math.exp(st["online_nll"]),
                       "temperature": mem.calibrator.temperature}
                if evaluate:
                    t0 = time.monotonic()
                    rec["perplexity"] = {d: math.exp(-float(mem.logprobs(eval_tokens[d], log_freq)[0].mean()))
                                         for d in self.eval_domains}
                    took[f"evaluate {name}"] = time.monotonic() - t0
                    for d in self.eval_domains:
                        curves[name][d].append(rec["perplexity"][d])
                    if c == sm.chunks_per_domain - 1:
                        matrices[name].append([rec["perplexity"][d] for d in self.eval_domains])
                records[name].append(rec)
                metrics.write(kind="semem_chunk", model=tag, policy=name, **rec)
            result["seconds"]["stream"] += time.monotonic() - started
            metrics.write(kind="semem_chunk_seconds", model=tag, domain=domain, chunk=c,
                          memory_size=max(len(m) for m in memories.values()),
                          seconds=took | {"total": time.monotonic() - started})
            commit(index + 1)          # the chunk is complete: its rows, records and calibrators are kept
            bar.update()
            bar.set_postfix({n: len(m) for n, m in memories.items() if n in ("semem", "full")})
        bar.close()
        # The test splits, read once: every policy's perplexity with its final memory and calibrator.
        # Per-sequence mean NLL is kept too: the paired bootstrap of two policies resamples sequences.
        if "test" not in result:
            started = time.monotonic()
            log_freq = np.log(counts).astype(np.float32)
            test_rows = self._test_sequences()
            test_tokens = {d: score_sequences(scorer, params, s) for d, s in test_rows.items()}

            def per_sequence(logp: np.ndarray, d: str) -> list[float]:
                return (-logp.reshape(len(test_rows[d]), -1).mean(axis=1)).tolist()

            result["lm_only_test"] = {d: math.exp(-float(t.lm_logp.mean())) for d, t in test_tokens.items()}
            result["lm_only_test_nll"] = {d: per_sequence(t.lm_logp, d) for d, t in test_tokens.items()}
            result["test"], result["test_nll"] = {}, {}
            for name, mem in memories.items():
                logps = {d: mem.logprobs(t, log_freq)[0] for d, t in test_tokens.items()}
                result["test"][name] = {d: math.exp(-float(v.mean())) for d, v in logps.items()}
                result["test_nll"][name] = {d: per_sequence(v, d) for d, v in logps.items()}
            result["seconds"]["test"] += time.monotonic() - started
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
                                                   for name in self.policies}
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
            tag = self.model_tag(i)
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

    # ------------------------------------------------------------------ report
    def _summarize_model(self, res: dict[str, Any]) -> dict[str, Any]:
        """One model's numbers: every policy's memory and perplexities (validation: the last evaluation;
        test: read once at the end), averaged over the streamed domains (all of them, the pre-training
        domains' futures, the other domains), the δ chosen on validation, and admission by domain."""
        groups = {"stream": list(self.stream),
                  "future": [d for d in self.stream if d in self.pretrain_domains],
                  "unseen": [d for d in self.stream if d not in self.pretrain_domains]}

        def means(ppl: dict[str, float]) -> dict[str, float | None]:
            return {g: (float(np.mean([ppl[d] for d in ds])) if ds else None) for g, ds in groups.items()}

        policies = {}
        for name, policy in self.policies.items():
            recs = res["records"][name]
            valid = [r for r in recs if "perplexity" in r][-1]["perplexity"]
            in_future = [r for r in recs if r["domain"] in groups["future"]]
            rates: dict[str, list[float]] = {}
            for r in recs:
                rates.setdefault(r["domain"], []).append(r["admitted_rate"])
            quarter = max(1, self.cfg.semem.chunks_per_domain // 4)
            policies[name] = {
                "admit": policy.admit, "threshold": policy.threshold, "memory_size": recs[-1]["memory_size"],
                "admitted_rate": recs[-1]["memory_size"] / max(recs[-1]["tokens_seen"], 1),
                "admitted_rate_future": (sum(r["tokens_admitted"] for r in in_future)
                                         / sum(r["tokens"] for r in in_future)) if in_future else None,
                "admitted_rate_by_domain": rates,
                "rate_first_vs_last_quarter": {d: {"first": float(np.mean(v[:quarter])),
                                                   "last": float(np.mean(v[-quarter:]))} for d, v in rates.items()},
                "valid_perplexity": valid, "test_perplexity": res["test"][name],
                "valid": means(valid), "test": means(res["test"][name])}
        full = policies["full"]
        selective = [n for n, p in self.policies.items() if p.admit == "selective"]
        # δ chosen on validation: the smallest memory whose validation perplexity (streamed domains) is within
        # 5 % of full memorization's; the test split only reports it.
        ok = [n for n in selective if policies[n]["valid"]["stream"] <= 1.05 * full["valid"]["stream"]]
        chosen = min(ok, key=lambda n: policies[n]["memory_size"]) if ok else None
        lm = {"valid": means(res["lm_only"]), "test": means(res["lm_only_test"])}
        return {"groups": groups, "policies": policies, "lm_only": lm, "chosen": chosen,
                "chosen_threshold": self.policies[chosen].threshold if chosen else None}

    def _report(self, results, wall) -> dict[str, Any]:
        main = results[0]
        memory = [{k: r[k] for k in ("domain", "chunk", "tokens_seen", "memory_size", "admitted_rate",
                                     "tokens_admitted")} for r in main["records"]["semem"]]
        models = []
        for res in results:
            summary = self._summarize_model(res)
            pol = summary["policies"]
            semem, full = pol["semem"], pol["full"]
            final = {name: pol[name]["valid_perplexity"] for name in ("semem", "full")}
            avg = {name: float(np.mean(list(final[name].values()))) for name in final}
            models.append({
                "tag": res["tag"], "architecture": res["architecture"], "lm_only_perplexity": res["lm_only"],
                "lm_only_test_perplexity": res["lm_only_test"],
                # per test sequence, mean NLL (nats/token): what paired bootstrap intervals resample
                "test_nll": res["test_nll"], "lm_only_test_nll": res["lm_only_test_nll"],
                "seconds": res.get("seconds"),
                "final_perplexity": final,
                "average_final_perplexity": avg | {"lm_only": float(np.mean(list(res["lm_only"].values())))},
                "memory_size": {"semem": semem["memory_size"], "full": full["memory_size"]},
                "memory_ratio": semem["memory_size"] / max(full["memory_size"], 1),
                "perplexity_ratio": semem["test"]["stream"] / full["test"]["stream"],
                "admitted_rate_by_domain": semem["admitted_rate_by_domain"],
                "memory": {name: res["records"][name] for name in self.policies}} | summary)
        report_models = models
        acceptance = self._acceptance(report_models)
        seen = seen_domains(self.stream, self.eval_domains, also=list(self.pretrain_domains))
        return build_report(self.method, "perplexity", self.stream, self.eval_domains, main["matrices"]["semem"],
                            wall, seen=seen, memory=memory,
                            baselines={"full_memory": main["matrices"]["full"],
                                       "lm_only": [main["lm_only"][d] for d in self.eval_domains]}
                            | {f"{n}_memory": main["matrices"][n] for n in self.policies if n not in ("semem", "full")},
                            pretrain_domains=list(self.pretrain_domains), past_fraction=self.cfg.semem.past_fraction,
                            models=models, acceptance=acceptance,
                            initial_perplexity=main["pretrain_matrix_row"], init_from=self.sources[0])

    def _acceptance(self, models: list[dict[str, Any]]) -> dict[str, Any]:
        """Issue 16's checks, as measured (test perplexities averaged over the streamed domains)."""
        out: dict[str, Any] = {}
        paper = next((n for n, p in self.policies.items() if p.admit == "selective" and p.threshold == -1.5), None)
        for m in models:
            pol, tag = m["policies"], m["tag"]
            pairs = [(n, p.matches) for n, p in self.policies.items() if p.admit == "random"]
            if pairs:
                out[f"{tag}: semem below randmem at every δ"] = all(
                    pol[s]["test"]["stream"] < pol[r]["test"]["stream"] for r, s in pairs)
            chosen = m["chosen"]
            out[f"{tag}: chosen δ (validation)"] = m["chosen_threshold"]
            if chosen is not None:
                c, f = pol[chosen], pol["full"]
                out[f"{tag}: chosen δ test perplexity / full"] = c["test"]["stream"] / f["test"]["stream"]
                out[f"{tag}: chosen δ memory / full"] = c["memory_size"] / max(f["memory_size"], 1)
                out[f"{tag}: chosen δ within 5 % of full with ≤ 60 % memory"] = \
                    c["test"]["stream"] <= 1.05 * f["test"]["stream"] and c["memory_size"] <= 0.6 * f["memory_size"]
            for name in dict.fromkeys(n for n in (paper, chosen) if n):
                rates = pol[name]["rate_first_vs_last_quarter"]
                out[f"{tag}: {name} rate falls (last quarter ≤ 0.8 x first) in every future domain"] = all(
                    rates[d]["last"] <= 0.8 * rates[d]["first"] for d in m["groups"]["future"])
            if paper:
                out[f"{tag}: admitted rate at δ=-1.5 over the futures (paper: 53 % GPT-2 small, 42 % large)"] = \
                    pol[paper]["admitted_rate_future"]
        for name in dict.fromkeys(n for n in (paper, models[0]["chosen"]) if n):
            sizes = [(m["architecture"]["params"], m["policies"][name]["memory_size"]) for m in models]
            if len(sizes) > 1:
                ordered = [s for _, s in sorted(sizes)]
                out[f"larger model admits fewer ({name})"] = all(b < a for a, b in zip(ordered, ordered[1:]))
        return out

    def _write(self, report, results) -> None:
        plot_matrix(report, self.run_dir / "perplexity_matrix.png")
        curves = {f"{res['tag']} {name}": res["records"][name] for res in results for name in self.policies}
        plot_memory_growth(curves, self.run_dir / "memory_growth.png")
        labels = [f"{r['domain']}#{r['chunk']}" for r in results[0]["records"]["semem"] if "perplexity" in r]
        series = {}
        for res in results:
            for name in self.policies:
                series[f"{res['tag']} {name}"] = [float(np.mean(list(r["perplexity"].values())))
                                                  for r in res["records"][name] if "perplexity" in r]
            series[f"{res['tag']} LM only"] = [float(np.mean(list(res["lm_only"].values())))] * len(labels)
        plot_series(series, self.run_dir / "perplexity_per_chunk.png", xlabel="after chunk",
                    ylabel="mean validation perplexity (all domains)", title="SeMem vs its baselines",
                    xticks=labels)
        chunk_labels = [f"{r['domain']}#{r['chunk']}" for r in results[0]["records"]["semem"]]
        rates = {f"{res['tag']} {name}": [r["admitted_rate"] for r in res["records"][name]]
                 for res in results for name, p in self.policies.items() if p.admit == "selective"}
        plot_series(rates, self.run_dir / "admitted_rate.png", xlabel="chunk", ylabel="admitted fraction",
                    title="SeMem memorization rate per chunk", xticks=chunk_labels)
        for m in report["models"]:
            plot_tradeoff(m, self.policies, self.run_dir / f"tradeoff-{m['tag']}.png")
        write_report(self.run_dir, report)          # last: report.json marks the run finished
        print(format_matrix(report))
        for m in report["models"]:
            pol = m["policies"]
            print(f"{m['tag']}: memory semem/full = {pol['semem']['memory_size']}/{pol['full']['memory_size']} "
                  f"({m['memory_ratio']:.2%}); test ppl over the stream: "
                  + ", ".join(f"{n} {p['test']['stream']:.2f} ({p['memory_size']})" for n, p in pol.items())
                  + f", LM {m['lm_only']['test']['stream']:.2f}; chosen δ on validation: {m['chosen_threshold']}")
        print("acceptance:", json.dumps(report["acceptance"], indent=1, ensure_ascii=False))
        print(f"outputs in {self.run_dir}/: report.json, memory_growth.png, perplexity_per_chunk.png, "
              "admitted_rate.png, perplexity_matrix.png, tradeoff-*.png, metrics.jsonl, config.yaml")


def plot_tradeoff(model: dict[str, Any], policies: dict[str, Any], path: str | Path) -> Path:
    """Perplexity against memory size for one model: SeMem's δ sweep and RandMem at the same sizes as lines,
    full memorization a point, the bare LM a horizontal line; one panel per group of streamed domains
    (the pre-training domains' futures, unseen domains), test split."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("future", "unseen") if model["groups"][g]] or ["stream"]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    pol = model["policies"]
    for ax, group in zip(axes[0], groups):
        for admit, style, label in (("selective", "o-", "SeMem (δ sweep)"), ("random", "s--", "RandMem (same sizes)")):
            names = sorted((n for n, p in policies.items() if p.admit == admit), key=lambda n: pol[n]["memory_size"])
            if names:
                ax.plot([pol[n]["memory_size"] for n in names], [pol[n]["test"][group] for n in names], style,
                        label=label)
                if admit == "selective":
                    for n in names:
                        ax.annotate(f"δ={policies[n].threshold:g}", (pol[n]["memory_size"], pol[n]["test"][group]),
                                    fontsize=7, textcoords="offset points", xytext=(4, 4))
        ax.plot([pol["full"]["memory_size"]], [pol["full"]["test"][group]], "k*", markersize=10,
                label="full memorization")
        ax.axhline(model["lm_only"]["test"][group], color="grey", linestyle=":", label="LM only")
        ax.set_xlabel("memory entries at the end of the stream")
        ax.set_ylabel(f"test perplexity ({group} domains: {', '.join(model['groups'][group])})", fontsize=8)
        ax.set_title(f"{model['tag']}: perplexity vs memory size", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


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

