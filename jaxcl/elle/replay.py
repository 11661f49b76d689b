"""ELLE's replay memory: per-domain memory banks, micro-batch replacement and adaptive domain weights.

Every update, r = floor(ratio * m + u) of the batch's m micro-batches (u ~ U[0, 1), so r is ratio * m
in expectation) are replaced by memory micro-batches; each comes from an old domain d drawn with
probability proportional to w_d. The weights follow ELLE's code: every few steps,

    w_d = (ppl_d(before) - ppl_d(now)) / tokens_d(replayed since before)

(with validation perplexities, as ELLE's code does) so replay goes to domains that still improve per
replayed token; a domain that gets worse takes the largest weight in the first half of a stage (and
during warmup), and none later. Memory rows are drawn uniformly with replacement (ELLE iterates a
reshuffled memory; for a memory much larger than what one stage replays the two coincide).
All draws are a pure function of (seed, stage, phase, step), so resuming replays exactly.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jaxcl.config import ConfigError
from jaxcl.data.cache.reader import SubsetRows
from jaxcl.data.shuffle import fold_key, index_shuffle


def memory_rows(n_sequences: int, fraction: float, seed: int) -> np.ndarray:
    """Indices (sorted) of the sequences a domain keeps in memory: a fixed random `fraction` (at least one),
    the first ones of a stateless shuffle (`jaxcl.data.shuffle`), so O(kept rows) whatever the corpus."""
    if n_sequences < 1:
        raise ConfigError("replay memory: a domain has no training sequences")
    keep = max(1, int(math.ceil(fraction * n_sequences)))
    return np.sort(index_shuffle(np.arange(keep), n_sequences, fold_key(seed)))


def replay_plan(rng: np.random.Generator, micro_batches: int, ratio: float,
                weights: Sequence[float]) -> list[tuple[int, int]]:
    """[(micro-batch slot, index into `weights`)] to replace in one update (empty when nothing to replay)."""
    if not len(weights) or ratio <= 0:
        return []
    n_replace = min(micro_batches, int(math.floor(ratio * micro_batches + rng.random())))
    if n_replace == 0:
        return []
    w = np.maximum(np.asarray(weights, np.float64), 0.0)
    p = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    slots = np.sort(rng.choice(micro_batches, size=n_replace, replace=False))
    sources = rng.choice(len(w), size=n_replace, p=p)
    return [(int(s), int(d)) for s, d in zip(slots, sources)]


def adaptive_weights(previous_ppl: Sequence[float | None], ppl: Sequence[float], tokens: Sequence[float],
                     weights: Sequence[float], first_half: bool) -> list[float]:
    """ELLE's replay weights from the change of each old domain's validation perplexity per replayed token.

    As in ELLE's code: a domain without a previous perplexity (the first update of a stage) gets 1; a
    domain that got worse (or did not improve) takes the largest weight in the first half of a stage
    (or in warmup) and ~0 in the second half; every weight stays >= 1e-9. A domain that was not
    replayed at all since the last update keeps its weight (its change says nothing about replay).
    """
    gains: list[float | None] = []
    for prev, now, t, w in zip(previous_ppl, ppl, tokens, weights):
        if prev is None:
            gains.append(1.0)
        elif t <= 0:
            gains.append(None)                    # keep the previous weight
        else:
            gains.append((prev - now) / t)
    best = max([g for g in gains if g is not None and g > 0], default=1.0)
    out = []
    for g, w in zip(gains, weights):
        if g is None:
            out.append(float(w))
            continue
        if g <= 0:
            g = best if first_half else 0.0
        out.append(max(g, 1e-9))
    return out


class ReplayMemory:
    """Memory banks of the domains seen so far and the replacement of micro-batches by memory rows."""

    def __init__(self, train_sequences: dict[str, np.ndarray], domains: Sequence[str], fraction: float, seed: int):
        self.domains = tuple(domains)
        # [n_memory, seq]: row ids into each domain's rows (the token cache), not copies
        self.banks = {d: SubsetRows(train_sequences[d], memory_rows(len(train_sequences[d]), fraction, seed * 7919 + i))
                      for i, d in enumerate(self.domains)}

    def size(self, domain: str) -> int:
        return len(self.banks[domain])

    def mix(self, batch: dict[str, np.ndarray], old_domains: Sequence[str], weights: Sequence[float], ratio: float,
            micro_batches: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Replace the replayed micro-batches of a global batch by memory rows; returns (batch, rows per domain).

        `batch` is the whole global batch (`input_ids`, `attention_mask` `[B, seq]`, optionally
        `prompt_ids` `[B]`), identical on every process; micro-batch s is rows `[s*B/m, (s+1)*B/m)`.
        The plan and the memory rows are drawn from `rng`, so every process builds the same batch.
        Replaced rows get mask 1 and the prompt of the domain they came from. Raises ConfigError when
        `micro_batches` does not divide B.
        """
        global_batch = len(batch["input_ids"])
        if global_batch % micro_batches:
            raise ConfigError(f"elle.micro_batches={micro_batches} must divide data.batch_size={global_batch}")
        per_micro = global_batch // micro_batches
        out = {k: v.copy() for k, v in batch.items()}
        counts: dict[str, int] = {}
        for slot, source in replay_plan(rng, micro_batches, ratio, weights):
            domain = old_domains[source]
            picks = rng.integers(0, len(self.banks[domain]), size=per_micro)
            counts[domain] = counts.get(domain, 0) + per_micro
            rows = slice(slot * per_micro, (slot + 1) * per_micro)
            out["input_ids"][rows] = self.banks[domain].take(picks)
            out["attention_mask"][rows] = 1
            if "prompt_ids" in out:
                out["prompt_ids"][rows] = self.domains.index(domain)
        return out, counts


def stage_rng(seed: int, stage: int, phase: int, step: int) -> np.random.Generator:
    """The replay generator of one update (phase 0 = warmup, 1 = the stage proper)."""
    return np.random.default_rng([seed, stage, phase, step])


__all__ = ["ReplayMemory", "adaptive_weights", "memory_rows", "replay_plan", "stage_rng"]
