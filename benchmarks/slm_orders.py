"""SLM and its baselines over balanced task orders and seeds (the paper averages over task orders).

    python benchmarks/slm_orders.py [--config configs/slm/demo.yaml] [--orders 4] [--seeds 0,1,2]
                                    [--baseline-seeds 0] [--baselines-from DIR ...] [--slm-from DIR]
                                    [--out runs/slm-orders]
                                    [key=value ...]

A single task order measures forgetting for one pairing of tasks: an old task forgets only when a
later task resembles it. The orders are the config's `slm.orders` (configs/slm/standard.yaml: the
literature's orders 4-7), else a Williams design over `slm.tasks` (`jaxcl.eval.orders.balanced_orders`;
the first is the config's own order): every task in every position once and every task immediately
followed by every other once. Each (order, seed) is one
`jaxcl run` of the config (same code path, same data): SLM in every run, the config's `slm.baselines`
in the runs whose seed is in --baseline-seeds (the baselines re-encode every seen task after every
stage, so they cost several times SLM's evaluation, which reuses predictions; default: the first seed).

Prints, per method, the mean over runs of average accuracy, forgetting, backward transfer and (SLM)
retrieval accuracy, each with a 95 % percentile-bootstrap interval over runs
(`jaxcl.eval.metrics.mean_interval`), the gap to multitask (paired within runs) and the acceptance
checks; then one row per run with SLM's forgetting and its 95 % interval over test texts (from the
run's report, `bootstrap_matrix`). Writes orders.json and orders.png into --out. Finished runs (a
report.json whose saved config matches) are not repeated; --rerun forces them.

--slm-from DIR: SLM (and the baselines that run ran) is taken from DIR's finished runs of the same (order,
seed), and only this config's `slm.baselines` run (`SlmRun.run_baselines`: each row saved in
RUN/baselines/<row>.json as it finishes, reused after a kill), in the runs of --baseline-seeds. DIR's runs must
have this config in every key but `slm.baselines` and the `strategies` section (which only the strategy rows
read). Adding EWC / LwF / O-LoRA rows beside finished SLM runs, or choosing a strategy's strength on
validation (`valid avg` in the output: the final validation average of the rows that evaluate validation, SLM
and the strategy rows), thus costs the new rows only.

With both --slm-from and --baselines-from, the rows --baselines-from's runs ran (other than this config's)
are added as well: e.g. the sequential and multitask rows of one benchmark beside another's SLM and new
strategy rows, in one table. --baselines-from is repeatable, and a source may be a baselines-only run of
--slm-from (its baselines/<row>.json): each row comes from the one source that ran it, and a strategy row
only needs its own `strategies.<row>` section to match, so rows whose strengths were chosen in separate
runs join one table (`slm.baselines=[]` with the chosen strengths as overrides; nothing is run).

--baselines-from DIR: the baselines are taken from DIR's finished runs of the same (order, seed) instead of
being run again, when those runs' configs equal this benchmark's in every key but `slm.baselines` and the
keys only SLM reads (`BASELINE_NEUTRAL`: the task choice and the DTKR query layers; the baselines never
retrieve a task, tested in tests/test_slm_run.py). Comparing SLM retrieval settings thus costs SLM's runs
only; a config that differs in anything else is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import finished_or_run, format_interval, machine_summary, parse_seeds, print_table, \
    run_comparison_parser  # noqa: E402

BASELINE_NEUTRAL = ("task_choice", "gaussian_shrinkage", "query_layers")    # slm keys no baseline reads
SHORT = {"bible_books": "bible", "wordnet_pos": "wordnet", "manpage_section": "man", "pydoc_package": "pydoc",
         "debian_section": "debian"}


def _methods(report: dict) -> dict[str, dict]:
    """{method: {"summary", "matrix", "retrieval"?}} of one SLM run's report (summaries recomputed from the
    matrices, so reports written before a metrics fix are read right)."""
    from jaxcl.eval.metrics import seen_domains, summarize

    def entry(stages, matrix, retrieval=None, intervals=None, valid=None):
        return {"summary": summarize(matrix, report["metric"], seen_domains(stages, report["eval_on"])),
                "matrix": matrix, "retrieval": retrieval, "intervals": intervals, "valid": final_valid(valid)}

    out = {"slm": entry(report["stages"], report["matrix"], report.get("retrieval_accuracy"),
                        report.get("intervals"), report.get("valid_matrix"))}
    for name, base in report.get("baselines", {}).items():
        out[name] = entry(base["stages"], base["matrix"], intervals=base.get("intervals"),
                          valid=base.get("valid_matrix"))
    return out


def final_valid(valid_matrix: list | None) -> float | None:
    """The mean validation accuracy over every task after the last stage (what strengths are chosen on), or
    None when the run did not evaluate validation on all of them."""
    if not valid_matrix or any(v is None for v in valid_matrix[-1]):
        return None
    return sum(valid_matrix[-1]) / len(valid_matrix[-1])


def borrowed_slm(cfg, source: Path) -> dict:
    """The report of the finished SLM run in `source`, whose config must equal `cfg` apart from `slm.baselines`
    and the `strategies` section (read only by the strategy rows); SystemExit naming the differing keys
    otherwise."""
    from jaxcl.config import config_to_dict, load_config
    from jaxcl.rundir import incompatible_keys

    report_path = source / "report.json"
    if not report_path.is_file():
        sys.exit(f"--slm-from: {source} has no finished run (report.json)")
    old = load_config(source / "config.yaml")
    aligned = dataclasses.replace(old, slm=dataclasses.replace(old.slm, baselines=cfg.slm.baselines),
                                  strategies=cfg.strategies)
    changed = incompatible_keys(config_to_dict(aligned), cfg, "slm")
    if changed:
        sys.exit(f"--slm-from: {source} ran a different config ({', '.join(changed)}); its SLM would not be "
                 "comparable")
    return json.loads(report_path.read_text())


def borrowed_baselines(cfg, source: Path, names: list[str] | None = None) -> dict:
    """The baselines `names` (default `cfg.slm.baselines`; "*" = every row the source ran) of the finished run
    in `source` (a full run's report.json, or the rows a baselines-only run wrote to baselines/<row>.json,
    `SlmRun.run_baselines`), whose config must equal `cfg` in everything that changes what is trained
    (`jaxcl.rundir.incompatible_keys`, the run-directory rule) apart from `BASELINE_NEUTRAL`, the list
    `slm.baselines` and the `strategies` sections of the strategy rows not borrowed (a row reads only its
    own); SystemExit naming the differing keys otherwise, or the baselines the source did not run."""
    from jaxcl.config import config_to_dict, load_config
    from jaxcl.rundir import incompatible_keys

    ran = rows_ran(source)
    names = list(ran) if names == ["*"] else list(cfg.slm.baselines if names is None else names)
    old = load_config(source / "config.yaml")
    neutral = {k: getattr(cfg.slm, k) for k in BASELINE_NEUTRAL}
    aligned = dataclasses.replace(old, slm=dataclasses.replace(old.slm, baselines=cfg.slm.baselines, **neutral),
                                  strategies=strategies_of(cfg.strategies, old.strategies, names))
    changed = incompatible_keys(config_to_dict(aligned), cfg, "slm")
    if changed:
        sys.exit(f"--baselines-from: {source} ran a different config ({', '.join(changed)}); its baselines would "
                 "not be comparable")
    missing = [b for b in names if b not in ran]
    if missing:
        sys.exit(f"--baselines-from: {source} did not run the baselines {missing}")
    return {b: ran[b] for b in names}


def rows_ran(source: Path) -> dict[str, dict]:
    """{row: its result} of the finished run in `source`: a full run's report.json baselines, or the rows a
    baselines-only run (`SlmRun.run_baselines`) wrote to baselines/<row>.json; SystemExit when it has neither."""
    from jaxcl.rundir import read_report

    if (source / "report.json").is_file():
        return json.loads((source / "report.json").read_text()).get("baselines") or {}
    if (source / "baselines").is_dir() and (source / "config.yaml").is_file():
        return {path.stem: read_report(path) for path in sorted((source / "baselines").glob("*.json"))}
    sys.exit(f"--baselines-from: {source} has no finished run (report.json or baselines/<row>.json)")


def strategies_of(ours, theirs, rows: list[str]):
    """`ours` (a StrategiesConfig) with the sections of the strategy `rows` taken from `theirs`: the config a
    borrowed run must match, since a strategy row reads its own section and nothing else does."""
    from jaxcl.slm.strategies import ROWS

    return dataclasses.replace(ours, **{r: getattr(theirs, r) for r in rows if r in ROWS})


def borrowed_rows(cfg, sources: list[Path], names: list[str] | None = None) -> tuple[dict, list[str]]:
    """The rows `names` (default `cfg.slm.baselines`; "*" = every row the sources ran), each from the one
    source in `sources` that ran it (`borrowed_baselines`: that source's config checked for those rows), and
    the sources used. SystemExit when two sources hold the same row (which one the table shows would be a
    guess) or no source holds a wanted row."""
    wanted = None if names == ["*"] else list(cfg.slm.baselines if names is None else names)
    rows: dict[str, dict] = {}
    where: dict[str, Path] = {}
    for source in sources:
        held = [r for r in rows_ran(source) if wanted is None or r in wanted]
        for name in held:
            if name in rows:
                sys.exit(f"--baselines-from: the {name} row is in both {where[name]} and {source}; give one of them")
            where[name] = source
        if held:
            rows.update(borrowed_baselines(cfg, source, held))
    missing = [r for r in (wanted or []) if r not in rows]
    if missing:
        sys.exit(f"--baselines-from: no source ran the baselines {missing} ({', '.join(map(str, sources))})")
    return rows, sorted({str(where[r]) for r in rows})


def summary(runs: dict[str, dict]) -> dict[str, dict]:
    """Per method: {metric: mean_interval over runs} for average accuracy, forgetting, backward transfer,
    retrieval (SLM) and the paired gap to multitask (runs that have both)."""
    from jaxcl.eval.metrics import mean_interval

    per_method: dict[str, list[dict]] = {}
    gaps: dict[str, list[float]] = {}
    for report in runs.values():
        methods = _methods(report)
        for method, result in methods.items():
            per_method.setdefault(method, []).append(result)
            if "multitask" in methods and method != "multitask":
                gaps.setdefault(method, []).append(result["summary"]["average"]
                                                   - methods["multitask"]["summary"]["average"])
    out = {}
    for method, results in per_method.items():
        out[method] = {k: mean_interval([r["summary"][k] for r in results])
                       for k in ("average", "forgetting", "backward_transfer")}
        out[method]["worst_forgetting"] = max(r["summary"]["forgetting"] for r in results)
        valid = [r["valid"] for r in results if r["valid"] is not None]
        if valid:
            out[method]["valid_average"] = mean_interval(valid)
        retr = [r["retrieval"] for r in results if r["retrieval"] is not None]
        if retr:
            out[method]["retrieval"] = mean_interval(retr)
        if gaps.get(method):
            out[method]["gap_to_multitask"] = mean_interval(gaps[method])
    return out


def summary_rows(stats: dict[str, dict]) -> list[list]:
    """One row per method: mean [95 % interval over runs] of accuracy, gap to multitask, forgetting, BWT,
    retrieval (SLM) and the final validation average (rows that evaluate validation)."""
    return [[method, s["average"]["n"], format_interval(s["average"]), format_interval(s.get("gap_to_multitask")), format_interval(s["forgetting"]),
             f"{s['worst_forgetting']:.2f}", format_interval(s["backward_transfer"]), format_interval(s.get("retrieval")),
             format_interval(s.get("valid_average"))]
            for method, s in stats.items()]


def acceptance(stats: dict[str, dict]) -> dict[str, bool | None]:
    """Issue 17's targets, from the summary (None where a method needed for a check did not run)."""
    slm = stats["slm"]
    gap = slm.get("gap_to_multitask")
    seq = stats.get("sequential")
    return {"slm_forgetting_mean_le_0.5": slm["forgetting"]["mean"] <= 0.5,
            "slm_forgetting_upper_le_1.0": slm["forgetting"]["high"] <= 1.0,
            "slm_retrieval_ge_97": slm["retrieval"]["mean"] >= 97.0,
            "slm_within_1_point_of_multitask": None if gap is None else abs(gap["mean"]) <= 1.0,
            "sequential_forgets_visibly": None if seq is None else seq["forgetting"]["low"] > 5.0}


def run_rows(runs: dict[str, dict]) -> list[list]:
    """One row per (order, seed) run: SLM's numbers (forgetting on test and validation) and each baseline's
    forgetting."""
    from jaxcl.eval import accuracy_forgetting

    rows = []
    for key, report in runs.items():
        methods = _methods(report)
        slm = methods["slm"]
        valid = report.get("valid_matrix")
        ci = (slm["intervals"] or {}).get("forgetting")
        rows.append([key, " > ".join(SHORT.get(t, t) for t in report["stages"]), slm["summary"]["average"],
                     slm["summary"]["forgetting"], f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-",
                     accuracy_forgetting(valid) if valid else float("nan"), slm["retrieval"],
                     *[f"{m} {methods[m]['summary']['forgetting']:.2f}" for m in methods if m != "slm"]])
    return rows


def task_orders(cfg, n: int = 0) -> list[list[str]]:
    """The config's `slm.orders` (the first `n`; 0 = all), else `n` orders of a balanced design over
    `slm.tasks` (0 = the full design)."""
    from jaxcl.eval.orders import balanced_orders

    if cfg.slm.orders:
        return [list(o) for o in cfg.slm.orders][:n or None]
    return balanced_orders(cfg.slm.tasks, n or None)


def _plot(runs: dict[str, dict], stats: dict[str, dict], path: Path) -> None:
    """Left: every method's forgetting per run (order x seed), SLM with its 95 % interval over test texts.
    Right: per method, mean average accuracy and forgetting with 95 % intervals over runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(runs)
    methods = list(stats)
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    for i, method in enumerate(methods):
        xs, forg, err = [], [], [[], []]
        for x, k in enumerate(keys):
            result = _methods(runs[k]).get(method)
            if result is None:
                continue
            f = result["summary"]["forgetting"]
            ci = (result["intervals"] or {}).get("forgetting") or [f, f]
            xs.append(x + (i - (len(methods) - 1) / 2) * width)
            forg.append(f)
            err[0].append(max(f - ci[0], 0.0)), err[1].append(max(ci[1] - f, 0.0))
        axes[0].bar(xs, forg, width, yerr=err, capsize=2, label=method)
    labels = [f"{k}: " + ">".join(SHORT.get(t, t) for t in runs[k]["stages"]) for k in keys]
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set(ylabel="forgetting (points, symmetric log)",
                title="forgetting per run, 95 % interval over test texts (dashed: 0.5 and 1 point)")
    for level in (0.5, 1.0):
        axes[0].axhline(level, color="black", lw=0.8, ls="--")
    axes[0].set_xticks(range(len(keys)), labels, fontsize=6, rotation=30, ha="right")
    axes[0].legend(fontsize=8)
    for name, offset, color in (("average", -0.2, "tab:blue"), ("forgetting", 0.2, "tab:red")):
        means = [stats[m][name]["mean"] for m in methods]
        err = [[stats[m][name]["mean"] - stats[m][name]["low"] for m in methods],
               [stats[m][name]["high"] - stats[m][name]["mean"] for m in methods]]
        axes[1].bar(np.arange(len(methods)) + offset, means, 0.4, yerr=err, capsize=3, color=color,
                    label=f"{name} (95 % interval over runs)")
    axes[1].set_xticks(range(len(methods)), methods)
    axes[1].set(ylabel="points", title="mean over orders x seeds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slm_with_new_baselines(cfg, base, source: Path, run_dir: Path, with_baselines: bool,
                           finished_only: bool, old_rows: list[Path] = ()) -> dict | None:
    """--slm-from: the finished SLM run in `source` with `base.slm.baselines` run in `run_dir` (only those
    rows, `SlmRun.run_baselines`) and added to its baselines, when `with_baselines` (a run of
    --baseline-seeds); with `old_rows` (--baselines-from) also every row those runs ran but this config's. None
    for --finished-only when a row is missing."""
    from jaxcl.slm.run import SlmRun

    cfg = dataclasses.replace(cfg, slm=dataclasses.replace(cfg.slm, baselines=base.slm.baselines))
    report = borrowed_slm(cfg, source)
    report = {**report, "slm_from": str(source)}
    if not with_baselines:
        return report
    if old_rows:
        old, used = borrowed_rows(cfg, list(old_rows), ["*"])
        report["baselines"] = {**report.get("baselines", {}),
                               **{k: v for k, v in old.items() if k not in base.slm.baselines}}
        report["baselines_from"] = used
    if not base.slm.baselines:
        return report
    if finished_only and not all((run_dir / "baselines" / f"{b}.json").is_file() for b in base.slm.baselines):
        return None
    print(f"=== {run_dir.name}: {', '.join(base.slm.baselines)} beside {source}", flush=True)
    rows = SlmRun(cfg).run_baselines()
    return {**report, "baselines": {**report.get("baselines", {}), **rows}}


def main() -> None:
    parser = run_comparison_parser(__doc__, "configs/slm/demo.yaml", "runs/slm-orders", "0")
    parser.add_argument("--orders", type=int, default=0, help="how many balanced orders (default: all)")
    parser.add_argument("--finished-only", action="store_true",
                        help="summarise the runs that have finished in --out and start none (a partial benchmark)")
    parser.add_argument("--baseline-seeds", default=None,
                        help="comma list of the seeds whose runs also run slm.baselines (default: the first seed)")
    parser.add_argument("--baselines-from", default=[], type=Path, action="append",
                        help="take the baselines from this directory's finished runs (same config up to the SLM "
                             "task-choice keys) instead of running them; repeatable (a row from one of them)")
    parser.add_argument("--slm-from", default=None, type=Path,
                        help="take SLM from this directory's finished runs (same config up to slm.baselines and "
                             "the strategies section) and run only slm.baselines")
    args = parser.parse_args()

    from jaxcl.config import load_config

    seeds = parse_seeds(parser, args.seeds)
    baseline_seeds = parse_seeds(parser, args.baseline_seeds) if args.baseline_seeds else seeds[:1]
    base = load_config(args.config, list(args.overrides))
    if base.run.method != "slm" or base.slm.mode != "classification":
        parser.error(f"{args.config}: needs run.method slm and slm.mode classification")
    try:
        orders = task_orders(base, args.orders)
    except ValueError as err:
        parser.error(f"--orders {args.orders}: {err}")
    out = Path(args.out)
    runs: dict[str, dict] = {}
    for seed in seeds:                      # seed-major: a stopped benchmark has every order of the first seeds
        for o, order in enumerate(orders):
            key = f"order{o}-seed{seed}"
            run_dir = out / key
            with_baselines = seed in baseline_seeds and bool(base.slm.baselines)
            cfg = dataclasses.replace(
                base, run=dataclasses.replace(base.run, seed=seed, name=f"{base.run.name}-{key}", dir=str(run_dir)),
                slm=dataclasses.replace(base.slm, tasks=tuple(order),
                                        baselines=base.slm.baselines if with_baselines and not args.baselines_from
                                        else ()))
            if args.slm_from:
                runs[key] = slm_with_new_baselines(cfg, base, args.slm_from / key, run_dir, seed in baseline_seeds,
                                                   args.finished_only, [d / key for d in args.baselines_from])
                if runs[key] is None:
                    del runs[key]
                continue
            if args.finished_only and not (run_dir / "report.json").is_file():
                continue
            borrowed = None
            if with_baselines and args.baselines_from:   # checked before the (long) SLM run starts
                borrowed = borrowed_rows(dataclasses.replace(
                    cfg, slm=dataclasses.replace(cfg.slm, baselines=base.slm.baselines)),
                    [d / key for d in args.baselines_from])
            runs[key] = finished_or_run(cfg, run_dir, rerun=args.rerun, banner=f"=== {key}: {' > '.join(order)}")
            if borrowed is not None:
                runs[key] = {**runs[key], "baselines": borrowed[0], "baselines_from": borrowed[1]}
    if not runs:
        parser.error(f"no finished run in {out}")

    stats = summary(runs)
    checks = acceptance(stats)
    print(f"\n{machine_summary()}; config {args.config} {' '.join(args.overrides)}; "
          f"{len(orders)} balanced orders x seeds {seeds} (baselines: seeds {baseline_seeds})")
    print_table(["method", "runs", "avg acc [95 % CI]", "acc - multitask (paired)", "forgetting [95 % CI]",
                 "forgetting worst", "BWT [95 % CI]", "retrieval % [95 % CI]", "valid avg [95 % CI]"],
                summary_rows(stats))
    print()
    print_table(["run", "order", "SLM avg acc", "SLM forgetting", "95 % CI (texts)", "SLM forgetting (valid)",
                 "SLM retrieval %", "baselines' forgetting"],
                [row[:7] + [", ".join(row[7:]) or "-"] for row in run_rows(runs)])
    print("\nacceptance: " + ", ".join(f"{k} {'-' if v is None else ('yes' if v else 'NO')}"
                                       for k, v in checks.items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "orders.json").write_text(json.dumps(
        {"config": args.config, "overrides": args.overrides, "seeds": seeds, "baseline_seeds": baseline_seeds,
         "baselines_from": [str(d) for d in args.baselines_from] or None,
         "slm_from": str(args.slm_from) if args.slm_from else None,
         "orders": orders, "summary": stats, "acceptance": checks, "runs": run_rows(runs), "reports": runs},
        indent=2))
    _plot(runs, stats, out / "orders.png")
    print(f"outputs in {out}/: orders.json, orders.png and one run directory per order and seed")


if __name__ == "__main__":
    main()
