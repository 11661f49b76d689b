"""Selective memorization (SeMem): score a chunk against the memory as it stood, admit the hard tokens.

The LM is frozen. For a chunk of the stream, every target token gets its log-probability under the
semiparametric model (LM + the memory *at the start of the chunk* + the current calibrator); tokens with
log p(gold) < δ are admitted, and their (key, next token) pairs are added after the whole chunk is scored.
`admit="all"` is full memorization (kNN-LM), `admit="random"` the RandMem control (a random subset of the
same size as a SeMem policy admitted) and `admit="none"` the bare LM, all on the same code path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.memory.calibrator import CalibrationData, Calibrator, calibrator_features
from jaxcl.memory.datastore import Datastore
from jaxcl.memory.knnlm import knn_lm_target_logprobs
from jaxcl.models import ModelConfig, build

__all__ = ["ScoredTokens", "make_lm_scorer", "score_sequences", "memory_logprobs", "admission_mask",
           "Policy", "stream_policies", "SelectiveMemory", "knn_keys_of", "memory_eval_logprobs"]


@dataclasses.dataclass
class ScoredTokens:
    """Every target token of some sequences, flattened: what the LM says and the memory needs."""

    keys: np.ndarray          # [n, d] float32: the decoder's knn_keys at the context position
    targets: np.ndarray       # [n] int32: the next token (the value stored for an admitted key)
    contexts: np.ndarray      # [n] int32: the last context token (lexical features)
    lm_logp: np.ndarray       # [n] log p_LM(target)
    lm_conf: np.ndarray       # [n] max_y p_LM(y)
    lm_entropy: np.ndarray    # [n] entropy of p_LM

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: np.ndarray) -> "ScoredTokens":
        """The tokens at `index` (an int array or boolean mask)."""
        return ScoredTokens(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


def make_lm_scorer(model_cfg: ModelConfig) -> Callable:
    """jitted (params, ids [b, s]) -> per-position LM outputs for targets ids[:, 1:] (see ScoredTokens)."""
    model = build(model_cfg)

    @jax.jit
    def score(params, ids):
        out = model.apply({"params": params}, ids, jnp.ones_like(ids), deterministic=True)
        logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)                        # [b, s-1, V]
        gold = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]           # [b, s-1]
        p = jnp.exp(logp)
        return {"keys": out.knn_keys[:, :-1].astype(jnp.float32), "lm_logp": gold,
                "lm_conf": jnp.max(p, axis=-1), "lm_entropy": -jnp.sum(p * logp, axis=-1)}

    return score


def _padded(sequences: np.ndarray, start: int, batch: int) -> tuple[jax.Array, int]:
    rows = sequences[start:start + batch]
    padded = np.zeros((batch, sequences.shape[1]), np.int32)
    padded[:len(rows)] = rows
    return jnp.asarray(padded), len(rows)


def _scored(out: dict[str, Any], rows: np.ndarray) -> ScoredTokens:
    """ScoredTokens of `rows [n, seq]` from the scorer's (padded) output, fetched to the host."""
    out = jax.device_get(out)
    flat = {name: (np.asarray(v)[:len(rows)].reshape(-1, v.shape[-1]) if name == "keys"
                   else np.asarray(v)[:len(rows)].reshape(-1)) for name, v in out.items()}
    return ScoredTokens(targets=rows[:, 1:].reshape(-1).astype(np.int32),
                        contexts=rows[:, :-1].reshape(-1).astype(np.int32), **flat)


def _concat(parts: list[ScoredTokens]) -> ScoredTokens:
    return ScoredTokens(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                           for f in dataclasses.fields(ScoredTokens)})


def score_sequences(scorer: Callable, params: Any, sequences: np.ndarray, batch: int = 32) -> ScoredTokens:
    """Run the frozen LM over `sequences [n, seq]` in fixed-size batches (the last one padded)."""
    parts = []
    for s in range(0, len(sequences), batch):
        ids, n = _padded(sequences, s, batch)
        parts.append(_scored(scorer(params, ids), sequences[s:s + n]))
    return _concat(parts)


def memory_eval_logprobs(scorer: Callable, params: Any, sequences: np.ndarray, store: Datastore | None,
                         calibrator: Calibrator, k: int, log_freq: np.ndarray, batch: int = 32) -> np.ndarray:
    """kNN-LM log p(gold) `[n * (seq - 1)]` of every target token of `sequences [n, seq]`: the LM forward and
    the memory search pipelined.

    The LM forward of batch i+1 is dispatched (JAX runs it asynchronously, on XLA's threads) before the host
    searches the memory for batch i (ScaNN's batched search on its own threads), so the two overlap instead
    of alternating. Equal to `memory_logprobs(score_sequences(...), ...)[0]` (tested); perplexity is
    `exp(-mean)`. Uses the target-only mixture (`knn_lm_target_logprobs`): no [tokens, V] kNN distribution.
    """
    out, n = [], len(sequences)
    pending = _padded(sequences, 0, batch)
    pending = (scorer(params, pending[0]), pending[1])
    for s in range(0, n, batch):
        result, rows = pending
        if s + batch < n:
            ids, nxt = _padded(sequences, s + batch, batch)
            pending = (scorer(params, ids), nxt)                 # runs while this batch is searched
        tokens = _scored(result, sequences[s:s + rows])
        out.append(memory_logprobs(tokens, store, calibrator, k, log_freq, batch=len(tokens))[0])
    return np.concatenate(out)


def admission_mask(logp_gold: np.ndarray, threshold: float) -> np.ndarray:
    """SeMem's rule: admit a token when the semiparametric log p(gold) < δ (natural log)."""
    return np.asarray(logp_gold) < threshold


@jax.jit
def _target_logprobs(lm_logp, dists, values, targets, lam, temperature):
    return knn_lm_target_logprobs(lm_logp, dists, values, targets, lam=lam, temperature=temperature)


def memory_logprobs(tokens: ScoredTokens, store: Datastore | None, calibrator: Calibrator, k: int,
                    log_freq: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, CalibrationData | None]:
    """log p(gold) under LM + memory `[n]`, and the calibration records of these tokens.

    With no memory (None or empty) this is the LM's log p and there are no records.
    """
    if store is None or len(store) == 0:
        return tokens.lm_logp.copy(), None
    out = np.empty(len(tokens), np.float32)
    records = []
    values_all = store.values
    for s in range(0, len(tokens), batch):
        sl = slice(s, s + batch)
        dists, ids = store.search(tokens.keys[sl], k)                                   # [b, k]
        values = values_all[ids]
        feats = calibrator_features(tokens.lm_conf[sl], tokens.lm_entropy[sl], log_freq[tokens.contexts[sl]],
                                    dists, values)
        lam = calibrator.lam(feats)
        out[sl] = np.asarray(_target_logprobs(tokens.lm_logp[sl], dists, values, tokens.targets[sl], lam,
                                              np.float32(calibrator.temperature)))
        records.append(CalibrationData(feats, tokens.lm_logp[sl], dists.astype(np.float16),
                                       values == tokens.targets[sl, None]))
    data = records[0]
    for r in records[1:]:
        data = data.extend(r)
    return out, data


@dataclasses.dataclass(frozen=True)
class Policy:
    """A memorization policy of one stream: what `SelectiveMemory.memorize` admits.

    - `selective` (SeMem): tokens with semiparametric log p(gold) < `threshold` (δ, natural log);
    - `all` (full memorization, the kNN-LM);
    - `random` (RandMem, the SeMem paper's control): per chunk, a seeded uniformly random subset of the
      chunk's tokens of the same size as the SeMem policy `matches` admitted from that chunk;
    - `none` (the bare LM).
    """

    name: str
    admit: str
    threshold: float | None = None
    matches: str | None = None


def stream_policies(threshold: float, sweep=(), random_control: bool = False) -> dict[str, Policy]:
    """The policies of a SeMem stream, in the order a chunk is processed (each SeMem policy before the
    RandMem policy that copies its admitted count): `semem` at `threshold`, `semem@δ` for each other δ of
    `sweep`, `full`, then (with `random_control`) `randmem` / `randmem@δ`."""
    deltas = [float(threshold)] + [float(d) for d in dict.fromkeys(sweep) if float(d) != float(threshold)]
    names = ["semem"] + [f"semem@{d:g}" for d in deltas[1:]]
    out = {n: Policy(n, "selective", d) for n, d in zip(names, deltas)}
    out["full"] = Policy("full", "all")
    if random_control:
        for n, d in zip(names, deltas):
            r = "randmem" + n[len("semem"):]
            out[r] = Policy(r, "random", d, matches=n)
    return out


class SelectiveMemory:
    """One memory (datastore + calibrator + held-out records) and its admission policy."""

    def __init__(self, store: Datastore | None, admit: str, threshold: float | None, k: int, calibrator: Calibrator):
        if admit not in ("selective", "all", "random", "none"):
            raise ValueError(f"admit must be 'selective', 'all', 'random' or 'none', got {admit!r}")
        self.store, self.admit, self.threshold, self.k = store, admit, threshold, k
        self.calibrator = calibrator
        self.heldout: list[ScoredTokens] = []      # never memorized: the calibrator's training text

    def __len__(self) -> int:
        return 0 if self.store is None else len(self.store)

    def logprobs(self, tokens: ScoredTokens, log_freq: np.ndarray) -> tuple[np.ndarray, CalibrationData | None]:
        return memory_logprobs(tokens, None if self.admit == "none" else self.store, self.calibrator, self.k,
                               log_freq)

    def memorize(self, tokens: ScoredTokens, log_freq: np.ndarray, *, size: int | None = None,
                 rng: np.random.Generator | None = None) -> dict[str, float]:
        """Score the chunk against the memory as it stands, then add the admitted tokens.

        `admit="random"` admits `size` tokens chosen uniformly without replacement by `rng` (both required).
        Returns {"tokens", "admitted", "online_nll"} (the chunk's mean NLL before its rows were added).
        """
        logp, _ = self.logprobs(tokens, log_freq)
        if self.admit == "all":
            keep = np.ones(len(tokens), bool)
        elif self.admit == "none":
            keep = np.zeros(len(tokens), bool)
        elif self.admit == "random":
            if size is None or rng is None:
                raise ValueError("admit='random' needs the number of tokens to admit (size) and an rng")
            keep = np.zeros(len(tokens), bool)
            keep[rng.choice(len(tokens), size=min(int(size), len(tokens)), replace=False)] = True
        else:
            keep = admission_mask(logp, self.threshold)
        if keep.any():
            self.store.add(tokens.keys[keep], tokens.targets[keep])
        return {"tokens": int(len(tokens)), "admitted": int(keep.sum()), "online_nll": float(-logp.mean())}

    def calibration_data(self, log_freq: np.ndarray, max_tokens: int = 0,
                         rng: np.random.Generator | None = None) -> CalibrationData | None:
        """Features of every held-out token against the memory as it is now (what the calibrator will
        see at test time), with their LM and neighbour log-probabilities. `max_tokens` > 0: a uniformly
        random subset of that many held-out tokens (drawn by `rng`), so the cost stays flat as the
        stream grows."""
        pool = self.heldout
        total = sum(len(t) for t in pool)
        if max_tokens and total > max_tokens:
            if rng is None:
                raise ValueError("calibration_data(max_tokens=...) needs an rng")
            chosen = np.sort(rng.choice(total, size=max_tokens, replace=False))
            pool, start = [], 0
            for tokens in self.heldout:
                mine = chosen[(chosen >= start) & (chosen < start + len(tokens))] - start
                if len(mine):
                    pool.append(tokens.take(mine))
                start += len(tokens)
        if not pool:
            return None
        # One search over all the pieces (a search call has a fixed cost; per token the result is the same)
        _, records = self.logprobs(_concat(pool), log_freq)
        return records


def knn_keys_of(model_cfg: ModelConfig, params: Any, sequences: np.ndarray, batch: int = 32) -> np.ndarray:
    """The model's kNN keys (`out.knn_keys`) of every position of `sequences [n, seq]` -> `[n * seq, d]`.

    Works for decoders and encoders alike (benchmarks and recall tests use real pretrained keys).
    """
    model = build(model_cfg)
    fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids, jnp.ones_like(ids), deterministic=True).knn_keys)
    out = []
    for s in range(0, len(sequences), batch):
        rows = sequences[s:s + batch]
        padded = np.zeros((batch, sequences.shape[1]), np.int32)
        padded[:len(rows)] = rows
        out.append(np.asarray(fn(params, jnp.asarray(padded)), np.float32)[:len(rows)].reshape(-1, model_cfg.d_model))
    return np.concatenate(out)
