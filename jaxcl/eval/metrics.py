"""Continual-learning summaries of a stage x domain metric matrix.

`matrix[i][j]` is the metric on domain/task j after stage i (None where not evaluated). The usual
protocol: stage i trains on `eval_on[i]`. The average can be taken over any set of seen columns
(`seen_domains`: a joint stage has seen every domain, SeMem also its pre-training domain); forgetting
and backward transfer compare the final row with the row that learned each column (`learned_rows`:
the diagonal under the usual protocol, shifted for SeMem whose first stage streams the second domain).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

Matrix = Sequence[Sequence[float | None]]


def _final_row(matrix: Matrix) -> Sequence[float | None]:
    return matrix[-1]


def average_seen(matrix: Matrix, seen: int | Sequence[int] | None = None) -> float:
    """Mean metric over the domains seen by the end (AP for perplexity, average accuracy).

    `seen`: the seen columns — None: one per stage (stage i trains domain i); an int n: the first n;
    a sequence: those column indices (see `seen_domains`).
    """
    final = _final_row(matrix)
    if seen is None:
        seen = len(matrix)
    columns = range(min(seen, len(final))) if isinstance(seen, int) else seen
    values = [final[j] for j in columns if final[j] is not None]
    return float(sum(values) / len(values)) if values else math.nan


Learned = Sequence[int | None]          # per column: the row (stage) that learned it, None = no stage


def _old_columns(matrix: Matrix, learned: Learned | None) -> list[tuple[int, int]]:
    """(column, row that learned it) for every column learned before the last stage; default: the
    usual protocol, column j learned by row j."""
    last = len(matrix) - 1
    if learned is None:
        learned = range(last)
    return [(j, r) for j, r in enumerate(learned) if r is not None and r < last]


def perplexity_forgetting(matrix: Matrix, learned: Learned | None = None) -> float:
    """Mean increase of an old domain's perplexity from just after learning it to the end (ELLE's AP+).

    Positive = forgetting. Domains trained in the last stage are excluded. `learned`: see
    `learned_rows` (default: stage i learned domain i).
    """
    last = len(matrix) - 1
    diffs = [matrix[last][j] - matrix[r][j] for j, r in _old_columns(matrix, learned)
             if matrix[last][j] is not None and matrix[r][j] is not None]
    return float(sum(diffs) / len(diffs)) if diffs else 0.0


def accuracy_forgetting(matrix: Matrix, learned: Learned | None = None) -> float:
    """Mean drop from an old task's best accuracy at any earlier stage to its final accuracy."""
    last = len(matrix) - 1
    drops = []
    for j, r in _old_columns(matrix, learned):
        history = [matrix[i][j] for i in range(r, last) if matrix[i][j] is not None]
        if history and matrix[last][j] is not None:
            drops.append(max(history) - matrix[last][j])
    return float(sum(drops) / len(drops)) if drops else 0.0


def backward_transfer(matrix: Matrix, learned: Learned | None = None) -> float:
    """Mean of (final metric - metric just after learning) over old tasks (negative = forgetting for accuracy)."""
    last = len(matrix) - 1
    diffs = [matrix[last][j] - matrix[r][j] for j, r in _old_columns(matrix, learned)
             if matrix[last][j] is not None and matrix[r][j] is not None]
    return float(sum(diffs) / len(diffs)) if diffs else 0.0


def learned_rows(stages: Sequence[str], eval_on: Sequence[str]) -> list[int | None]:
    """Per `eval_on` column, the first stage (matrix row) named after it, None where no stage is (e.g.
    SeMem's pre-training domain). A stage named otherwise (joint / multitask) learned every column."""
    stages, eval_on = list(stages), list(eval_on)
    if not stages or not all(s in eval_on for s in stages):
        return [0] * len(eval_on)
    return [stages.index(d) if d in stages else None for d in eval_on]


def seen_domains(stages: Sequence[str], eval_on: Sequence[str], also: Sequence[str] = ()) -> list[int]:
    """Indices of the `eval_on` columns trained on by the end of `stages`, plus those named in `also`
    (domains learned before the first stage, e.g. SeMem's pre-training domain).

    Every stage must be named after the domain it trains; a stage named otherwise (joint / multitask
    training on the union) means every domain was seen. A runner whose stage names could collide with
    domain names passes its columns to `summarize` explicitly instead.
    """
    learned = learned_rows(stages, eval_on)
    return [j for j, domain in enumerate(eval_on) if learned[j] is not None or domain in also]


def summarize(matrix: Matrix, metric: str, seen: int | Sequence[int] | None = None,
              learned: Learned | None = None) -> dict[str, float]:
    """The `summary` block of report.json for a perplexity or accuracy matrix (`seen`: `average_seen`;
    `learned`: `learned_rows`, default the usual protocol)."""
    if metric == "perplexity":
        return {"average": average_seen(matrix, seen), "forgetting": perplexity_forgetting(matrix, learned)}
    return {"average": average_seen(matrix, seen), "forgetting": accuracy_forgetting(matrix, learned),
            "backward_transfer": backward_transfer(matrix, learned)}


def _percentile_interval(values: Any, level: float) -> tuple[float, float]:
    """The two-sided percentile interval of bootstrap `values` at `level` (e.g. 0.95 -> 2.5th, 97.5th)."""
    import numpy as np

    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(np.asarray(values, np.float64), [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_matrix(correct: Sequence[Sequence[Any]], seen: int | Sequence[int] | None = None,
                     *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap intervals (over test texts) of an accuracy matrix and its summary.

    Why: a task's accuracy on a few hundred texts moves by 0.1-0.8 points per text, so a matrix entry, an
    average or a forgetting number means little without its sampling interval.

    `correct[i][j]`: a 0/1 (or bool) vector over task j's test texts after stage i, the same texts in the
    same order in every row (None where not evaluated). Each resample draws every task's texts with
    replacement once and applies that draw to every row of the column (the rows score the same texts),
    then recomputes the matrix and `summarize(..., "accuracy", seen)`. Returns {"matrix": [[[lo, hi] |
    None]], "average": [lo, hi], "forgetting": [lo, hi], "backward_transfer": [lo, hi]} in points, at
    `level` (two-sided, percentiles), with a seeded generator (same inputs, same intervals).
    """
    import numpy as np

    rows, cols = len(correct), max(len(r) for r in correct)
    rng = np.random.default_rng(seed)
    boot = np.full((resamples, rows, cols), np.nan)
    for j in range(cols):
        scored = [(i, np.asarray(correct[i][j], np.float64)) for i in range(rows)
                  if j < len(correct[i]) and correct[i][j] is not None]
        if not scored:
            continue
        n = len(scored[0][1])
        if any(len(v) != n for _, v in scored) or n == 0:
            raise ValueError(f"column {j}: every row must score the same (non-empty) set of texts")
        draw = rng.integers(n, size=(resamples, n))
        for i, v in scored:
            boot[:, i, j] = 100.0 * v[draw].mean(axis=1)
    def interval(values) -> list[float]:
        return list(_percentile_interval(values, level))

    summaries = [summarize([[None if np.isnan(x) else float(x) for x in row] for row in b], "accuracy", seen)
                 for b in boot]
    matrix = [[interval(boot[:, i, j]) if not np.isnan(boot[0, i, j]) else None for j in range(cols)]
              for i in range(rows)]
    return {"matrix": matrix, "level": level, "resamples": resamples,
            **{k: interval([s[k] for s in summaries]) for k in ("average", "forgetting", "backward_transfer")}}


def mean_interval(values: Sequence[float], *, resamples: int = 10000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of per-run values with a percentile bootstrap interval over runs (orders x seeds).

    Returns {"mean", "low", "high", "std", "n"}; with one run the interval is the value itself. Used for the
    averages over task orders and seeds that SLM's benchmark reports (`benchmarks/slm_orders.py`).
    """
    import numpy as np

    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("mean_interval needs at least one value")
    means = v[np.random.default_rng(seed).integers(v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = _percentile_interval(means, level) if v.size > 1 else (v[0], v[0])
    return {"mean": float(v.mean()), "low": float(lo), "high": float(hi),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def paired_perplexity_bootstrap(nll_a: Mapping[str, Any], nll_b: Mapping[str, Any], *, resamples: int = 10000,
                                level: float = 0.95, seed: int = 0) -> dict:
    """Paired, domain-stratified bootstrap of the difference in mean perplexity between two models A and B.

    Why: two memories evaluated on the same text differ by a few percent; whether that is a real difference
    or the luck of which sequences were drawn is what a paired interval answers (both models score the same
    resampled sequences, so the text's own difficulty cancels out).

    `nll_a[d]`, `nll_b[d]`: per-sequence mean negative log-likelihood (nats per token, float arrays `[n_d]`,
    the same sequences in the same order, each sequence the same number of tokens) on domain d; the two
    mappings must have the same domains. The statistic is the group perplexity the reports use: the mean
    over domains of exp(mean NLL of the domain's sequences). Each resample draws every domain's sequences
    with replacement (seeded generator: same inputs, same interval) and recomputes it for A and B.

    Returns {"a", "b": the group perplexities; "difference": a - b; "low", "high": its percentile interval
    at `level`; "relative", "relative_low", "relative_high": the same for a / b - 1; "detectable": the
    smallest |a - b| the evaluation set resolves, (z_(1-α/2) + z_0.8) x the bootstrap standard error of the
    difference (a two-sided test at 1 - level with 80 % power); "sequences": n in all; "level"}. The
    difference is significant (A lower) when "high" < 0. Raises ValueError on mismatched domains or lengths.
    Source: Efron & Tibshirani (1993), ch. 13 (percentile intervals) and ch. 16 (paired comparisons).
    """
    import numpy as np
    from statistics import NormalDist

    if set(nll_a) != set(nll_b) or not nll_a:
        raise ValueError(f"paired bootstrap: both sides need the same domains, got {sorted(nll_a)} and "
                         f"{sorted(nll_b)}")
    rng = np.random.default_rng(seed)
    boot_a = np.zeros(resamples)
    boot_b = np.zeros(resamples)
    point_a, point_b, total = 0.0, 0.0, 0
    for d in sorted(nll_a):
        a, b = np.asarray(nll_a[d], np.float64), np.asarray(nll_b[d], np.float64)
        if a.shape != b.shape or a.ndim != 1 or a.size == 0:
            raise ValueError(f"paired bootstrap: domain {d!r} has {a.shape} and {b.shape} sequence scores; both "
                             "need the same non-empty [n] vector")
        draw = rng.integers(a.size, size=(resamples, a.size))
        boot_a += np.exp(a[draw].mean(axis=1))
        boot_b += np.exp(b[draw].mean(axis=1))
        point_a += float(np.exp(a.mean()))
        point_b += float(np.exp(b.mean()))
        total += a.size
    n = len(nll_a)
    boot_a, boot_b, point_a, point_b = boot_a / n, boot_b / n, point_a / n, point_b / n
    diff, rel = boot_a - boot_b, boot_a / boot_b - 1.0
    lo, hi = _percentile_interval(diff, level)
    rlo, rhi = _percentile_interval(rel, level)
    z = NormalDist().inv_cdf(1.0 - (1.0 - level) / 2.0) + NormalDist().inv_cdf(0.8)
    return {"a": point_a, "b": point_b, "difference": point_a - point_b, "low": lo, "high": hi,
            "relative": point_a / point_b - 1.0, "relative_low": rlo, "relative_high": rhi,
            "detectable": float(z * diff.std(ddof=1)), "detectable_relative": float(z * rel.std(ddof=1)),
            "sequences": int(total), "level": level, "resamples": resamples}


def retrieval_confusion(chosen: Mapping[int, Any], tasks: Sequence[str], texts: Mapping[int, Sequence[str]],
                        examples: int = 3, counts: Any = None, pairs: dict[str, list[str]] | None = None) -> dict:
    """Where task retrieval routes each task's texts: a confusion matrix over tasks with example texts.

    `chosen`: {task index t: chosen task index per text of t} (int arrays; a choice outside 0..n-1 counts as
    the last task); `texts`: {t: the texts, in the same order}. Returns {"tasks", "counts" [n, n] (rows: the
    text's task, columns: the chosen one), "examples" {"a -> b": up to `examples` distinct texts}}. Pass the
    `counts` array and `pairs` dict of an earlier call to accumulate over several routings (seeds). Why: SLM
    forgets only through retrieval, so a missed forgetting target is explained by which pairs are confused
    (SLM's report, `benchmarks/slm_retrieval.py`).
    """
    import numpy as np

    n = len(tasks)
    counts = np.zeros((n, n), np.int64) if counts is None else counts
    pairs = {} if pairs is None else pairs
    for t, picks in chosen.items():
        picks = np.clip(np.asarray(picks, np.int64), 0, n - 1)
        counts[t] += np.bincount(picks, minlength=n)[:n]
        for row in np.flatnonzero(picks != t):
            pair = pairs.setdefault(f"{tasks[t]} -> {tasks[int(picks[row])]}", [])
            if len(pair) < examples and texts[t][row] not in pair:
                pair.append(texts[t][row])
    return {"tasks": list(tasks), "counts": counts.tolist(), "examples": pairs}


def classification_scores(predictions: Any, labels: Any, n_classes: int, draws: Any = None) -> dict[str, Any]:
    """Accuracy and macro-F1 (in points) of one or several seeds' predictions, on the texts or on resamples.

    Why: a downstream cell is a few hundred test texts fine-tuned from one or a few seeds; its interval comes
    from resampling the texts, and comparisons (stage vs stage, method vs method, prompt vs none) stay
    paired when every score of a task uses the same `draws`.

    `predictions`: `[n]` or `[seeds, n]` class ids; `labels`: `[n]`; `draws`: None (the texts as they are)
    or `[R, n]` indices into the texts (one bootstrap resample per row). Accuracy is the share of correct
    texts; macro-F1 is the unweighted mean over the classes that occur in `labels` of
    F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c) (0 where a resample has none of c at all), as scikit-learn's
    `f1_score(average="macro", labels=<those classes>)`. Both are averaged over seeds. Returns
    {"accuracy", "macro_f1"}: floats without `draws`, else `[R]` arrays.
    """
    import numpy as np

    pred = np.atleast_2d(np.asarray(predictions, np.int64))
    y = np.asarray(labels, np.int64)
    if pred.shape[1] != y.shape[0] or y.ndim != 1 or y.size == 0:
        raise ValueError(f"predictions {pred.shape} and labels {y.shape} must score the same non-empty set of texts")
    if (pred < 0).any() or (pred >= n_classes).any() or (y < 0).any() or (y >= n_classes).any():
        raise ValueError(f"class ids must be in 0..{n_classes - 1}")
    idx = np.arange(y.size)[None] if draws is None else np.asarray(draws, np.int64)
    present = np.unique(y)
    r, c = idx.shape[0], n_classes
    yy = y[idx]                                                                   # [R, n]
    acc, f1 = np.zeros(r), np.zeros(r)
    for p in pred:
        pp = p[idx]
        acc += (pp == yy).mean(axis=1)
        flat = (np.arange(r)[:, None] * c * c + yy * c + pp).ravel()
        confusion = np.bincount(flat, minlength=r * c * c).reshape(r, c, c)       # [R, true, predicted]
        tp = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)
        denom = confusion.sum(axis=1) + confusion.sum(axis=2)                      # 2TP + FP + FN
        per_class = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)
        f1 += per_class[:, present].mean(axis=1)
    acc, f1 = 100.0 * acc / len(pred), 100.0 * f1 / len(pred)
    if draws is None:
        return {"accuracy": float(acc[0]), "macro_f1": float(f1[0])}
    return {"accuracy": acc, "macro_f1": f1}


def text_draws(n: int, resamples: int, seed: int | str) -> Any:
    """`[resamples, n]` bootstrap indices over `n` texts from a generator seeded by `seed` (an int, or a string
    such as a task name, hashed): the same draws for every score of a task keep comparisons paired."""
    import numpy as np

    if isinstance(seed, str):
        seed = seed_from_text(seed)
    return np.random.default_rng(seed).integers(n, size=(resamples, n))


def seed_from_text(text: str) -> int:
    """A 64-bit generator seed from a name (sha256): fixed draws per task without a seed table."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def percentile_interval(values: Any, level: float = 0.95) -> list[float]:
    """`[low, high]`: the two-sided percentile interval of bootstrap `values` at `level`."""
    return list(_percentile_interval(values, level))
