"""ELLE vs. its baselines at equal training compute on the embedded 5-domain stream, over seeds.

    python benchmarks/elle_equal_flops.py [--config configs/elle/compare.yaml] [--seeds 0,1,2]
                                          [--out runs/elle-compare] [--only NAMES] [--results DIR]
                                          [--commit] [--from DIR ...] [key=value ...]

The default configuration is configs/elle/demo.yaml with 400 updates per new domain (sized so that the 8
rows x 3 seeds fit 5 hours on 2 CPU cores; sessions 3-21 used 600, `train.steps=600`);
`--config configs/elle/demo.yaml` gives the demo's 150-update stages.

Runs, each through jaxcl's own runners (same data, tokenizer, optimizer, evaluation), once per seed:
  elle-uniform      growth + domain prompts + replay + warmup, old domains replayed uniformly
  elle-adaptive     the same with ELLE's adaptive replay weights (its code's heuristic; every
                    `elle.adaptive_every` steps, or 25 where the config says 0)
  sequential-final  sequential fine-tuning of the final-size model (no replay, no prompts)
  replay-final      the final-size model with ELLE's replay (experience replay), no growth or prompts
  replay-small      the initial small model with ELLE's replay, fixed size (no growth or prompts)
  ewc-final, lwf-final, agem-final
                    sequential fine-tuning of the final-size model with one strategy (jaxcl.strategies,
                    its knobs from the config's `strategies:` section); each strategy's extra compute (the
                    Fisher pass, the teacher forward, the reference gradient) is paid from the same budget
Every baseline gets, stage by stage, as many steps as fit in the training FLOPs ELLE spends on that
stage (warmups included), so all runs use the same compute per stage. Prints AP (final average
perplexity over the domains) and AP+ (average increase of old domains' perplexity since they were
learned), mean and standard deviation over seeds, with ratios to the config's own ELLE variant and
the number of seeds in which that variant beats each run on both; writes compare.json and
compare.png into --out. Finished runs (a report.json in their directory) are not repeated.

Across sessions (run directories do not survive them): --results DIR keeps each finished run's config.yaml
and report.json in DIR/seed<s>/<name>/ as it finishes (with --commit, git-committed at once), and a run
found there is never run again. --from DIR (repeatable) also takes finished runs from other benchmarks'
results: `benchmarks/downstream.py`'s pieces (DIR/<method>-seed<s>/) are its elle / sequential / replay
pre-training runs, the same configs as elle-adaptive / sequential-final / replay-final here. A run taken
from elsewhere must have this benchmark's config in everything that changes what is trained
(`jaxcl.rundir.incompatible_keys`: run.name, run.dir, checkpointing, downstream settings may differ); a
different one is an error naming the keys, never silently mixed in.

Intervals: AP and AP+ per run as the mean over seeds with a 95 % percentile-bootstrap interval over seeds
(`jaxcl.eval.metrics.mean_interval`), and each run's difference to the reference paired within seeds.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import finished_or_run, format_interval, machine_summary, parse_seeds, print_table, \
    publish_result, run_comparison_parser  # noqa: E402

ADAPTIVE_EVERY_FALLBACK = 25


def comparison_configs(base) -> dict:
    """The five runs at equal per-stage FLOPs, keyed by name (every one with `base`'s seed)."""
    from jaxcl.config import ElleConfig
    from jaxcl.data.sources import open_source
    from jaxcl.elle.run import planned_stage_flops, target_sizes
    from jaxcl.train.loop import train_step_flops
    from jaxcl.transforms import grown_config

    domains = tuple(base.data.domains) or open_source(base.data.source, base.data.text_field).domains()
    elle_flops = planned_stage_flops(base, len(domains))
    final = base.model
    for target in base.elle.schedule:
        final = grown_config(final, method=base.elle.grow_method, **target_sizes(target))
    final = final.replace(num_prompts=0)
    replay_only = dataclasses.replace(base.elle, schedule=(), prompt_length=0, warmup_steps=0)

    def equal_steps(model_cfg):
        per_step = train_step_flops(model_cfg, base.data.batch_size, base.data.seq_len)
        return tuple(max(1, round(f / per_step)) for f in elle_flops)

    def with_steps(model_cfg, elle, method="elle"):
        return dataclasses.replace(base, model=model_cfg, elle=elle,
                                   run=dataclasses.replace(base.run, method=method),
                                   train=dataclasses.replace(base.train, stage_steps=equal_steps(model_cfg)))

    def with_strategy(name):
        cfg = with_steps(final, ElleConfig(), method="sequential")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, strategies=(name,)))
        return dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, stage_steps=strategy_stage_steps(cfg, final, elle_flops)))

    adaptive_every = base.elle.adaptive_every or ADAPTIVE_EVERY_FALLBACK
    return {
        "elle-uniform": dataclasses.replace(base, elle=dataclasses.replace(base.elle, adaptive_every=0)),
        "elle-adaptive": dataclasses.replace(base, elle=dataclasses.replace(base.elle, adaptive_every=adaptive_every)),
        "sequential-final": with_steps(final, ElleConfig(), method="sequential"),
        "replay-final": with_steps(final, replay_only),
        "replay-small": with_steps(base.model, replay_only),
        **{f"{name}-final": with_strategy(name) for name in STRATEGY_ROWS},
    }, domains


STRATEGY_ROWS = ("ewc", "lwf", "agem")


def strategy_stage_steps(cfg, model_cfg, stage_flops) -> tuple[int, ...]:
    """Steps per stage that fit `stage_flops` (ELLE's) for a sequential run of `model_cfg` with
    `cfg.run.strategies`: stage 0 trains plainly and pays for the strategies' stage-end work (EWC's
    Fisher); later stages pay their per-step extra (a teacher forward, a reference gradient) and, but the
    last, their stage-end work. The costs are the strategies' own (`step_flops`, `end_stage_flops`)."""
    import types

    from jaxcl.train.loop import train_step_flops
    from jaxcl.train.strategy import resolve_strategies

    view = types.SimpleNamespace(cfg=cfg)
    strategies = resolve_strategies(cfg)
    per_step = train_step_flops(model_cfg, cfg.data.batch_size, cfg.data.seq_len)
    extra = sum(s.step_flops(view, model_cfg) for s in strategies)
    end = sum(s.end_stage_flops(view, model_cfg) for s in strategies)
    last = len(stage_flops) - 1
    return tuple(max(1, round((f - (end if i < last else 0.0)) / (per_step + (extra if i else 0.0))))
                 for i, f in enumerate(stage_flops))


# benchmarks/downstream.py's pre-training runs: which of this benchmark's runs each method's piece is
DOWNSTREAM_PIECES = {"elle-adaptive": "elle", "sequential-final": "sequential", "replay-final": "replay"}


def finished_elsewhere(cfg, name: str, seed: int, sources: list[Path]) -> tuple[dict, Path] | None:
    """(report, directory) of a finished run of `cfg` in one of `sources` (this benchmark's results layout
    DIR/seed<s>/<name>/, or a downstream piece DIR/<method>-seed<s>/), None when none holds it; SystemExit
    when one holds it with a config that trains something else."""
    from jaxcl.rundir import incompatible_keys, read_report, recorded_config

    for source in sources:
        candidates = [source / f"seed{seed}" / name]
        if name in DOWNSTREAM_PIECES:
            candidates.append(source / f"{DOWNSTREAM_PIECES[name]}-seed{seed}")
        for where in candidates:
            if not (where / "report.json").is_file():
                continue
            changed = incompatible_keys(recorded_config(where) or {}, cfg, cfg.run.method)
            if changed:
                sys.exit(f"{where} holds {name} seed {seed} with another config ({', '.join(changed)}): "
                         "use the same --config and overrides, or leave that directory out")
            return read_report(where / "report.json"), where
    return None


def keep_result(run_dir: Path, results: Path, name: str, seed: int, commit: bool) -> Path:
    """Copy a finished run's config.yaml and report.json to results/seed<s>/<name>/ (atomically,
    `benchmarks.common.publish_result`), and with `commit` git-commit it."""
    import shutil

    def fill(tmp: Path) -> None:
        for file in ("config.yaml", "report.json"):
            shutil.copy2(run_dir / file, tmp / file)

    return publish_result(results / f"seed{seed}" / name, fill, commit_message=(
        f"benchmarks/elle_equal_flops.py: {name} seed {seed} finished" if commit else None))


def main() -> None:
    parser = run_comparison_parser(__doc__, "configs/elle/compare.yaml", "runs/elle-compare", "0,1,2")
    parser.add_argument("--only", default="", help="comma list of run names to run (default: all)")
    parser.add_argument("--results", type=Path, default=None,
                        help="keep every finished run's config and report here (and reuse them)")
    parser.add_argument("--commit", action="store_true", help="git-commit each run kept in --results at once")
    parser.add_argument("--from", dest="sources", type=Path, action="append", default=[],
                        help="take finished runs from this directory (repeatable; e.g. benchmarks/results/downstream)")
    args = parser.parse_args()
    if args.commit and args.results is None:
        parser.error("--commit needs --results DIR")

    from jaxcl.config import load_config

    seeds = parse_seeds(parser, args.seeds)
    only = [s for s in args.only.split(",") if s]
    out = Path(args.out)
    reports: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        base = load_config(args.config, list(args.overrides) + [f"run.seed={seed}"])
        runs, domains = comparison_configs(base)
        for name, cfg in runs.items():
            run_dir = out / f"seed{seed}" / name
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(
                cfg.run, name=f"{base.run.name}-{name}-seed{seed}", dir=str(run_dir)))
            wanted = not only or name in only
            found = None if args.rerun else finished_elsewhere(
                cfg, name, seed, ([args.results] if args.results else []) + list(args.sources))
            if found is not None:
                reports.setdefault(name, {})[seed] = {**found[0], "taken_from": str(found[1])}
                continue
            if not wanted and not (run_dir / "report.json").exists():
                continue
            banner = f"=== seed {seed} {name}: stage steps {list(cfg.train.stage_steps) or 'as configured'}"
            reports.setdefault(name, {})[seed] = finished_or_run(cfg, run_dir, rerun=args.rerun and wanted,
                                                                 banner=banner)
            if args.results:
                keep_result(run_dir, args.results, name, seed, args.commit)

    reference = "elle-uniform" if base.elle.adaptive_every == 0 else "elle-adaptive"
    rows = _summary_rows(reports, reference)
    print(f"\n{machine_summary()}; config {args.config} {' '.join(args.overrides)}; seeds {seeds}; "
          f"ratios and wins against {reference} (the config's own replay weighting)")
    print_table(["run", "final L/D", "AP mean", "AP std", "AP+ mean", "AP+ std", "train TFLOPs",
                 "train s (mean)", "AP / ref", "AP+ / ref", f"seeds {reference} wins both"], rows)
    intervals = interval_rows(reports, reference)
    print()
    print_table(["run", "seeds", "AP [95 % CI over seeds]", f"AP - {reference} (paired)",
                 "AP+ [95 % CI over seeds]", f"AP+ - {reference} (paired)"],
                [[r["run"], r["seeds"], *[format_interval(r[k]) for k in ("ap", "ap_diff", "ap_plus", "ap_plus_diff")]]
                 for r in intervals])
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(
        {"config": args.config, "overrides": args.overrides, "seeds": seeds, "reference": reference,
         "table": rows, "intervals": intervals, "reports": {name: {str(s): r for s, r in per.items()} for name, per in reports.items()}},
        indent=2))
    _plot(reports, domains, out / "compare.png")
    print(f"outputs in {out}/: compare.json, compare.png and one run directory per seed and method")


def interval_rows(reports: dict[str, dict[int, dict]], reference: str) -> list[dict]:
    """Per run: AP and AP+ (mean with a 95 % percentile-bootstrap interval over seeds,
    `jaxcl.eval.metrics.mean_interval`) and their differences to `reference`, paired within the seeds both
    ran (None for the reference itself or without a common seed)."""
    from jaxcl.eval.metrics import mean_interval

    ref = reports.get(reference, {})
    out = []
    for name, per_seed in reports.items():
        row = {"run": name, "seeds": sorted(per_seed)}
        common = [s for s in sorted(per_seed) if s in ref]
        for key, metric in (("ap", "average"), ("ap_plus", "forgetting")):
            row[key] = mean_interval([per_seed[s]["summary"][metric] for s in sorted(per_seed)])
            row[f"{key}_diff"] = (mean_interval([per_seed[s]["summary"][metric] - ref[s]["summary"][metric]
                                                 for s in common]) if common and name != reference else None)
        out.append(row)
    return out


def _summary_rows(reports: dict[str, dict[int, dict]], reference: str) -> list[list]:
    """One row per run: mean/std of AP and AP+ over seeds, ratios to `reference`, and its win count."""
    def stats(values):
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    ref = reports.get(reference, {})
    rows = []
    for name, per_seed in reports.items():
        ap_mean, ap_std = stats([r["summary"]["average"] for r in per_seed.values()])
        plus_mean, plus_std = stats([r["summary"]["forgetting"] for r in per_seed.values()])
        common = [s for s in per_seed if s in ref]          # ratios only over the seeds both have
        ratio_ap = ratio_plus = float("nan")
        if common:
            ratio_ap = (statistics.fmean(per_seed[s]["summary"]["average"] for s in common)
                        / statistics.fmean(ref[s]["summary"]["average"] for s in common))
            ref_plus = statistics.fmean(ref[s]["summary"]["forgetting"] for s in common)
            if ref_plus:
                ratio_plus = statistics.fmean(per_seed[s]["summary"]["forgetting"] for s in common) / ref_plus
        wins = sum(ref[s]["summary"]["average"] < per_seed[s]["summary"]["average"]
                   and ref[s]["summary"]["forgetting"] < per_seed[s]["summary"]["forgetting"] for s in common)
        arch = next(iter(per_seed.values()))["architectures"][-1]
        rows.append([name, f"L{arch['n_layers']}/D{arch['d_model']}", ap_mean, ap_std, plus_mean, plus_std,
                     statistics.fmean(sum(r["train_flops"]) for r in per_seed.values()) / 1e12,
                     statistics.fmean(r["train_seconds"] for r in per_seed.values()),
                     ratio_ap, ratio_plus,
                     "-" if name == reference else f"{wins}/{len(common)}"])
    return rows


def _plot(reports: dict[str, dict[int, dict]], domains, path: Path) -> None:
    """AP over seen domains against cumulative FLOPs, and the final perplexity per domain (seed means)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, per_seed in reports.items():
        matrices = np.array([r["matrix"] for r in per_seed.values()])                 # [seeds, stages, domains]
        seen_avg = np.array([[row[:i + 1].mean() for i, row in enumerate(m)] for m in matrices])
        flops = np.cumsum(next(iter(per_seed.values()))["train_flops"]) / 1e12
        mean, std = seen_avg.mean(0), seen_avg.std(0)
        axes[0].plot(flops, mean, marker="o", label=f"{name} (n={len(per_seed)})")
        axes[0].fill_between(flops, mean - std, mean + std, alpha=0.15)
        final = matrices[:, -1].mean(0)
        axes[1].plot(range(len(domains)), final, marker="o", label=name)
    axes[0].set(xlabel="cumulative training TFLOPs", ylabel="average perplexity over seen domains",
                title="AP after each stage (mean ± std over seeds)", yscale="log")
    axes[1].set(xlabel="domain", ylabel="final perplexity", title="final perplexity per domain (seed mean)",
                yscale="log")
    axes[1].set_xticks(range(len(domains)), domains, rotation=30)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
