"""Continual-learning summaries of a stage x domain metric matrix.

`matrix[i][j]` is the metric on domain/task j after stage i (None where not evaluated). Stage i
trains on `eval_on[i]` for the first len(stages) domains (the usual protocol).
"""

from __future__ import annotations

import math
from typing import Sequence

Matrix = Sequence[Sequence[float | None]]


def _final_row(matrix: Matrix) -> Sequence[float | None]:
    return matrix[-1]


def average_seen(matrix: Matrix, seen: int | None = None) -> float:
    """Mean metric over the domains seen by the end (AP for perplexity, average accuracy).

    `seen`: how many of the first domains were trained on; default one per stage (stage i trains domain
    i). A joint / multitask stage trains on every domain: pass the number of domains (see `seen_domains`).
    """
    seen = len(matrix) if seen is None else seen
    values = [v for v in _final_row(matrix)[:seen] if v is not None]
    return float(sum(values) / len(values)) if values else math.nan


def perplexity_forgetting(matrix: Matrix) -> float:
    """Mean increase of an old domain's perplexity from just after learning it to the end (ELLE's AP+).

    Positive = forgetting. Domains trained in the last stage are excluded.
    """
    last = len(matrix) - 1
    diffs = [matrix[last][j] - matrix[j][j] for j in range(last)
             if matrix[last][j] is not None and matrix[j][j] is not None]
    return float(sum(diffs) / len(diffs)) if diffs else 0.0


def accuracy_forgetting(matrix: Matrix) -> float:
    """Mean drop from an old task's best accuracy at any earlier stage to its final accuracy."""
    last = len(matrix) - 1
    drops = []
    for j in range(last):
        history = [matrix[i][j] for i in range(j, last) if matrix[i][j] is not None]
        if history and matrix[last][j] is not None:
            drops.append(max(history) - matrix[last][j])
    return float(sum(drops) / len(drops)) if drops else 0.0


def backward_transfer(matrix: Matrix) -> float:
    """Mean of (final metric - metric just after learning) over old tasks (negative = forgetting for accuracy)."""
    last = len(matrix) - 1
    diffs = [matrix[last][j] - matrix[j][j] for j in range(last)
             if matrix[last][j] is not None and matrix[j][j] is not None]
    return float(sum(diffs) / len(diffs)) if diffs else 0.0


def seen_domains(stages: Sequence[str], eval_on: Sequence[str]) -> int:
    """How many of the first `eval_on` domains were trained on by the end of `stages`.

    When every stage is named after the domain it trains, that is every domain up to the last stage's
    (a domain learned before the first stage, e.g. SeMem's pre-training domain, counts as seen);
    otherwise a stage trained on all of them (joint / multitask), so all are seen.
    """
    eval_on = list(eval_on)
    if stages and all(s in eval_on for s in stages):
        return eval_on.index(stages[-1]) + 1
    return len(eval_on)


def summarize(matrix: Matrix, metric: str, seen: int | None = None) -> dict[str, float]:
    """The `summary` block of report.json for a perplexity or accuracy matrix (`seen`: `average_seen`)."""
    if metric == "perplexity":
        return {"average": average_seen(matrix, seen), "forgetting": perplexity_forgetting(matrix)}
    return {"average": average_seen(matrix, seen), "forgetting": accuracy_forgetting(matrix),
            "backward_transfer": backward_transfer(matrix)}
