"""SLM and its baselines over balanced task orders and seeds (the paper averages over task orders).

    python benchmarks/slm_orders.py [--config configs/slm/demo.yaml] [--orders 4] [--seeds 0]
                                    [--out runs/slm-orders] [key=value ...]

A single task order measures forgetting for one pairing of tasks: an old task forgets only when a
later task resembles it. The orders are a Williams design over the config's `slm.tasks`
(`jaxcl.eval.orders.balanced_orders`; the first is the config's own order): every task in every
position once and every task immediately followed by every other once. Each (order, seed) is one
`jaxcl run` of the config (SLM plus the config's `slm.baselines`, same code path, same data).

Prints, per method, the mean and standard deviation over all runs of average accuracy, forgetting
and backward transfer, the gap to multitask, and SLM's retrieval accuracy; then one row per run.
Writes orders.json and orders.png (forgetting and average accuracy per order) into --out. Finished
runs (a report.json whose saved config matches) are not repeated; --rerun forces them.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import finished_or_run, machine_summary, parse_seeds, print_table, \
    run_comparison_parser  # noqa: E402

SHORT = {"bible_books": "bible", "wordnet_pos": "wordnet", "manpage_section": "man", "pydoc_package": "pydoc"}


def _methods(report: dict) -> dict[str, dict]:
    """{method: {"summary", "matrix", "retrieval"?}} of one SLM run's report (summaries recomputed from the
    matrices, so reports written before a metrics fix are read right)."""
    from jaxcl.eval.metrics import seen_domains, summarize

    def entry(stages, matrix, retrieval=None):
        return {"summary": summarize(matrix, report["metric"], seen_domains(stages, report["eval_on"])),
                "matrix": matrix, "retrieval": retrieval}

    out = {"slm": entry(report["stages"], report["matrix"], report.get("retrieval_accuracy"))}
    for name, base in report.get("baselines", {}).items():
        out[name] = entry(base["stages"], base["matrix"])
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_rows(runs: dict[str, dict]) -> list[list]:
    """One row per method: mean ± std over runs of accuracy, forgetting, BWT; gap to multitask."""
    per_method: dict[str, list[dict]] = {}
    for report in runs.values():
        for method, result in _methods(report).items():
            per_method.setdefault(method, []).append(result)
    multitask = per_method.get("multitask")
    mt_mean = _stats([r["summary"]["average"] for r in multitask])[0] if multitask else float("nan")
    rows = []
    for method, results in per_method.items():
        acc = _stats([r["summary"]["average"] for r in results])
        forg = _stats([r["summary"]["forgetting"] for r in results])
        bwt = _stats([r["summary"]["backward_transfer"] for r in results])
        retr = [r["retrieval"] for r in results if r["retrieval"] is not None]
        worst = max(r["summary"]["forgetting"] for r in results)
        rows.append([method, len(results), acc[0], acc[1], acc[0] - mt_mean, forg[0], forg[1], worst, bwt[0],
                     f"{statistics.fmean(retr):.2f}" if retr else "-"])
    return rows


def run_rows(runs: dict[str, dict]) -> list[list]:
    """One row per (order, seed) run: SLM's numbers (forgetting on test and validation) and each baseline's
    forgetting."""
    from jaxcl.eval import accuracy_forgetting

    rows = []
    for key, report in runs.items():
        methods = _methods(report)
        slm = methods["slm"]
        valid = report.get("valid_matrix")
        rows.append([key, " > ".join(SHORT.get(t, t) for t in report["stages"]), slm["summary"]["average"],
                     slm["summary"]["forgetting"], accuracy_forgetting(valid) if valid else float("nan"),
                     slm["retrieval"],
                     *[methods[m]["summary"]["forgetting"] for m in methods if m != "slm"]])
    return rows


def _plot(runs: dict[str, dict], path: Path) -> None:
    """Forgetting and average accuracy of every method, per run (order x seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(runs)
    methods = list(_methods(next(iter(runs.values()))))
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, method in enumerate(methods):
        forg = [_methods(runs[k])[method]["summary"]["forgetting"] for k in keys]
        acc = [_methods(runs[k])[method]["summary"]["average"] for k in keys]
        xs = np.arange(len(keys)) + (i - (len(methods) - 1) / 2) * width
        axes[0].bar(xs, forg, width, label=method)
        axes[1].bar(xs, acc, width, label=method)
    labels = [f"{k}: " + ">".join(SHORT.get(t, t) for t in runs[k]["stages"]) for k in keys]
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set(ylabel="forgetting (points, symmetric log)", title="forgetting per task order (dashed: 1 point)")
    axes[0].axhline(1.0, color="black", lw=0.8, ls="--")
    axes[1].set(ylabel="average accuracy (%)", title="average accuracy after the last task")
    for ax in axes:
        ax.set_xticks(range(len(keys)), labels, fontsize=7, rotation=20, ha="right")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = run_comparison_parser(__doc__, "configs/slm/demo.yaml", "runs/slm-orders", "0")
    parser.add_argument("--orders", type=int, default=0, help="how many balanced orders (default: all)")
    args = parser.parse_args()

    from jaxcl.config import load_config
    from jaxcl.eval.orders import balanced_orders

    seeds = parse_seeds(parser, args.seeds)
    base = load_config(args.config, list(args.overrides))
    if base.run.method != "slm" or base.slm.mode != "classification":
        parser.error(f"{args.config}: needs run.method slm and slm.mode classification")
    try:
        orders = balanced_orders(base.slm.tasks, args.orders or None)
    except ValueError as err:
        parser.error(f"--orders {args.orders}: {err}")
    out = Path(args.out)
    runs: dict[str, dict] = {}
    for o, order in enumerate(orders):
        for seed in seeds:
            key = f"order{o}-seed{seed}"
            run_dir = out / key
            cfg = dataclasses.replace(
                base, run=dataclasses.replace(base.run, seed=seed, name=f"{base.run.name}-{key}", dir=str(run_dir)),
                slm=dataclasses.replace(base.slm, tasks=tuple(order)))
            runs[key] = finished_or_run(cfg, run_dir, rerun=args.rerun, banner=f"=== {key}: {' > '.join(order)}")

    print(f"\n{machine_summary()}; config {args.config} {' '.join(args.overrides)}; "
          f"{len(orders)} balanced orders x seeds {seeds}")
    print_table(["method", "runs", "avg acc mean", "avg acc std", "acc - multitask", "forgetting mean",
                 "forgetting std", "forgetting worst", "BWT mean", "retrieval % (SLM)"], summary_rows(runs))
    print()
    baselines = [m for m in _methods(next(iter(runs.values()))) if m != "slm"]
    print_table(["run", "order", "SLM avg acc", "SLM forgetting", "SLM forgetting (valid)", "SLM retrieval %",
                 *[f"{m} forgetting" for m in baselines]], run_rows(runs))
    out.mkdir(parents=True, exist_ok=True)
    (out / "orders.json").write_text(json.dumps(
        {"config": args.config, "overrides": args.overrides, "seeds": seeds, "orders": orders,
         "summary": summary_rows(runs), "runs": run_rows(runs), "reports": runs}, indent=2))
    _plot(runs, out / "orders.png")
    print(f"outputs in {out}/: orders.json, orders.png and one run directory per order and seed")


if __name__ == "__main__":
    main()
