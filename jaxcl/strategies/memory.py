"""An episodic memory of earlier domains' training sequences and the replacement of micro-batches by its rows.

The mechanism experience replay (`jaxcl.strategies.replay`), A-GEM's reference batches
(`jaxcl.strategies.agem`) and ELLE's replay (`jaxcl.elle.replay`, with adaptive domain weights) share.
Each domain keeps a fixed random `fraction` of its training sequences (row ids into the token cache, not
copies). Every update, r = floor(ratio * m + u) of the batch's m micro-batches (u ~ U[0, 1), so r is
ratio * m in expectation) are replaced by memory micro-batches; each comes from an old domain d drawn with
probability proportional to w_d (uniform for experience replay; ELLE adapts them). Memory rows are drawn
uniformly with replacement. All draws are a pure function of (seed, stage, phase, step), so resuming
replays exactly and every process builds the same batch.

Sources: experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning"); the
micro-batch replacement follows ELLE (Qin et al. 2022, thunlp/ELLE).
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


__all__ = ["ReplayMemory", "memory_rows", "replay_plan", "stage_rng"]
