"""Run outputs people read: report.json (the contract in DESIGN.md), a matrix heatmap and curves (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from jaxcl.atomic_io import atomic_write_file
from jaxcl.eval.metrics import learned_rows, seen_domains, summarize


def build_report(method: str, metric: str, stages: Sequence[str], eval_on: Sequence[str],
                 matrix: Sequence[Sequence[float | None]], wall_seconds: float, *,
                 seen: Sequence[int] | None = None, **extra: Any) -> dict[str, Any]:
    """The report.json payload: matrix, its summary, and any method-specific keys.

    `seen`: the columns the summary's average covers (default `seen_domains(stages, eval_on)`); forgetting
    compares each column with the stage that learned it (`learned_rows`).
    """
    seen = seen_domains(stages, eval_on) if seen is None else seen
    learned = learned_rows(stages, eval_on)
    report = {"method": method, "metric": metric, "stages": list(stages), "eval_on": list(eval_on),
              "matrix": [[None if v is None or not math.isfinite(v) else float(v) for v in row] for row in matrix],
              "summary": summarize(matrix, metric, seen, learned) if matrix else {},
              "wall_seconds": float(wall_seconds)}
    report.update(extra)
    return report


def write_report(run_dir: str | Path, report: dict[str, Any]) -> Path:
    """Write report.json atomically (old or new version after a kill): runners write it last, as the
    commit point that marks the run finished (`jaxcl.rundir`)."""
    path = Path(run_dir) / "report.json"
    atomic_write_file(path, json.dumps(report, indent=2).encode())
    return path


def format_matrix(report: dict[str, Any]) -> str:
    """The matrix as an aligned text table (rows: after stage i; columns: domain j)."""
    cols = report["eval_on"]
    width = max(10, *(len(c) + 2 for c in cols))
    head = "after stage".ljust(18) + "".join(c.rjust(width) for c in cols)
    lines = [f"{report['metric']} matrix ({report['method']})", head]
    for i, row in enumerate(report["matrix"]):
        label = f"{i}: {report['stages'][i]}"[:17].ljust(18)
        lines.append(label + "".join(("-" if v is None else f"{v:.2f}").rjust(width) for v in row))
    summary = ", ".join(f"{k}={v:.3f}" for k, v in report["summary"].items())
    lines.append(f"summary: {summary}")
    return "\n".join(lines)


def plot_matrix(report: dict[str, Any], path: str | Path) -> Path:
    """Heatmap of the stage x domain matrix with the values written in the cells; where the report holds
    bootstrap `intervals` (`jaxcl.eval.metrics.bootstrap_matrix`), each cell and the summary in the title
    carry their 95 % interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.array([[np.nan if v is None else v for v in row] for row in report["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 * m.shape[1] + 3, 0.9 * m.shape[0] + 2))
    shown = np.log(m) if report["metric"] == "perplexity" else m
    cmap = "viridis_r" if report["metric"] == "perplexity" else "viridis"
    im = ax.imshow(shown, cmap=cmap, aspect="auto")
    intervals = report.get("intervals") or {}
    cells = intervals.get("matrix")
    # bold: the cells just learned (default the diagonal: stage i trains eval_on[i]); a report may list others
    highlight = {tuple(c) for c in report.get("highlight", [(i, i) for i in range(min(m.shape))])}
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                label = f"{m[i, j]:.1f}"
                if cells and cells[i][j] is not None:
                    label += f"\n[{cells[i][j][0]:.1f}, {cells[i][j][1]:.1f}]"
                bright = im.norm(shown[i, j]) > 0.6 if cmap == "viridis" else im.norm(shown[i, j]) < 0.4
                ax.text(j, i, label, ha="center", va="center", color="black" if bright else "white",
                        fontweight="bold" if (i, j) in highlight else "normal", fontsize=8 if cells else 9)
    ax.set_xticks(range(m.shape[1]), report["eval_on"], rotation=30, ha="right")
    ax.set_yticks(range(m.shape[0]), [f"after {s}" for s in report["stages"]])
    ax.set_xlabel("evaluated on")
    summary = ", ".join(f"{k} {v:.2f}" + (f" [{intervals[k][0]:.2f}, {intervals[k][1]:.2f}]" if k in intervals else "")
                        for k, v in report["summary"].items())
    ax.set_title(f"{report['method']}: {report['metric']} ({summary})", fontsize=10)
    fig.colorbar(im, ax=ax, label=f"log {report['metric']}" if report["metric"] == "perplexity" else report["metric"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_training_curves(metrics_path: str | Path, path: str | Path) -> Path | None:
    """Training loss per global step, coloured by stage, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for stage in dict.fromkeys(r["stage"] for r in train):
        rows = [r for r in train if r["stage"] == stage]
        ax.plot([r["global_step"] for r in rows], [r["loss"] for r in rows], label=str(stage))
    ax.set_xlabel("global step")
    ax.set_ylabel("training loss (nats/token)")
    ax.legend(title="stage (domain)", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_memory_growth(curves: dict[str, Sequence[dict[str, Any]]], path: str | Path,
                       title: str = "memory size vs tokens seen") -> Path:
    """Memory entries against streamed tokens, one line per label (e.g. model x policy), with y = x for
    reference (full memorization of every token)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0
    for label, records in curves.items():
        xs = [0] + [r["tokens_seen"] for r in records]
        ys = [0] + [r["memory_size"] for r in records]
        top = max(top, xs[-1])
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="every token")
    return _save_line_plot(fig, ax, path, xlabel="tokens seen", ylabel="memory entries", title=title)


def plot_series(series: dict[str, Sequence[float]], path: str | Path, *, xlabel: str, ylabel: str,
                title: str = "", xticks: Sequence[str] | None = None) -> Path:
    """Several named curves over the same x positions (e.g. perplexity after each chunk)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, ys in series.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=label)
    if xticks is not None:
        ax.set_xticks(range(1, len(xticks) + 1), xticks, rotation=45, ha="right", fontsize=7)
    return _save_line_plot(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title)


def _save_line_plot(fig, ax, path: str | Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, legend, grid and write a line plot (the common finish of the curve plots)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
