"""Selective memorization (SeMem): score a chunk against the memory as it stood, admit the hard tokens.

The LM is frozen. For a chunk of the stream, every target token gets its log-probability under the
semiparametric model (LM + the memory *at the start of the chunk* + the current calibrator); tokens with
log p(gold) < δ are admitted, and their (key, next token) pairs are added after the whole chunk is scored.
`admit="all"` is full memorization (kNN-LM) and `admit="none"` is the bare LM, on the same code path.
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
           "SelectiveMemory", "knn_keys_of"]


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


def score_sequences(scorer: Callable, params: Any, sequences: np.ndarray, batch: int = 32) -> ScoredTokens:
    """Run the frozen LM over `sequences [n, seq]` in fixed-size batches (the last one padded)."""
    parts: dict[str, list[np.ndarray]] = {"keys": [], "lm_logp": [], "lm_conf": [], "lm_entropy": []}
    for s in range(0, len(sequences), batch):
        rows = sequences[s:s + batch]
        padded = np.zeros((batch, sequences.shape[1]), np.int32)
        padded[:len(rows)] = rows
        out = jax.device_get(scorer(params, jnp.asarray(padded)))
        for name in parts:
            value = np.asarray(out[name])[:len(rows)]
            parts[name].append(value.reshape(-1, value.shape[-1]) if name == "keys" else value.reshape(-1))
    flat = {k: np.concatenate(v) for k, v in parts.items()}
    return ScoredTokens(targets=sequences[:, 1:].reshape(-1).astype(np.int32),
                        contexts=sequences[:, :-1].reshape(-1).astype(np.int32), **flat)


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


class SelectiveMemory:
    """One memory (datastore + calibrator + held-out records) and its admission policy."""

    def __init__(self, store: Datastore | None, admit: str, threshold: float, k: int, calibrator: Calibrator):
        if admit not in ("selective", "all", "none"):
            raise ValueError(f"admit must be 'selective', 'all' or 'none', got {admit!r}")
        self.store, self.admit, self.threshold, self.k = store, admit, threshold, k
        self.calibrator = calibrator
        self.heldout: list[ScoredTokens] = []      # never memorized: the calibrator's training text

    def __len__(self) -> int:
        return 0 if self.store is None else len(self.store)

    def logprobs(self, tokens: ScoredTokens, log_freq: np.ndarray) -> tuple[np.ndarray, CalibrationData | None]:
        return memory_logprobs(tokens, None if self.admit == "none" else self.store, self.calibrator, self.k,
                               log_freq)

    def memorize(self, tokens: ScoredTokens, log_freq: np.ndarray) -> dict[str, float]:
        """Score the chunk against the memory as it stands, then add the admitted tokens."""
        logp, _ = self.logprobs(tokens, log_freq)
        if self.admit == "all":
            keep = np.ones(len(tokens), bool)
        elif self.admit == "none":
            keep = np.zeros(len(tokens), bool)
        else:
            keep = admission_mask(logp, self.threshold)
        if keep.any():
            self.store.add(tokens.keys[keep], tokens.targets[keep])
        return {"tokens": int(len(tokens)), "admitted": int(keep.sum()), "online_nll": float(-logp.mean())}

    def calibration_data(self, log_freq: np.ndarray) -> CalibrationData | None:
        """Features of every held-out token against the memory as it is now (what the calibrator will
        see at test time), with their LM and neighbour log-probabilities."""
        data = None
        for tokens in self.heldout:
            _, records = self.logprobs(tokens, log_freq)
            if records is not None:
                data = records if data is None else data.extend(records)
        return data


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
