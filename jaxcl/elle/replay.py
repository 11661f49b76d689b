"""ELLE's replay: the shared episodic memory (`jaxcl.strategies.memory`: per-domain memory banks,
micro-batch replacement) with ELLE's adaptive domain weights. The weights follow ELLE's code: every few steps,

    w_d = (ppl_d(before) - ppl_d(now)) / tokens_d(replayed since before)

(with validation perplexities, as ELLE's code does) so replay goes to domains that still improve per
replayed token; a domain that gets worse takes the largest weight in the first half of a stage (and
during warmup), and none later. Memory rows are drawn uniformly with replacement (ELLE iterates a
reshuffled memory; for a memory much larger than what one stage replays the two coincide).
All draws are a pure function of (seed, stage, phase, step), so resuming replays exactly.
"""

from __future__ import annotations

from typing import Sequence

from jaxcl.strategies.memory import ReplayMemory, memory_rows, replay_plan, stage_rng


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


__all__ = ["ReplayMemory", "adaptive_weights", "memory_rows", "replay_plan", "stage_rng"]
