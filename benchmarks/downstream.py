"""Downstream benchmark: does continual pre-training help the end tasks? ELLE vs its baselines, 3 seeds.

    python benchmarks/downstream.py [--seeds 0,1,2] [--methods elle,sequential,replay,joint] [--commit]
                                    [--runs runs/downstream-bench] [--results benchmarks/results/downstream]
                                    [--config configs/elle/compare.yaml] [key=value ...]
    python benchmarks/downstream.py --summarize      # the claims and plots from the committed results alone

Methods, each pre-trained on the embedded 5-domain stream (bible -> jargon -> wordnet -> manpages -> pydoc) at
ELLE's training FLOPs stage by stage (benchmarks/elle_equal_flops.py's equal-FLOPs configs of
`configs/elle/compare.yaml`):
  elle        ELLE with its adaptive replay weights (growth L2/D64 -> L4/D128, domain prompts, replay, warmup)
  sequential  sequential fine-tuning of the final-size model (L4/D128; no replay, no prompts)
  replay      the final-size model with ELLE's replay (experience replay; no growth, no prompts)
  joint       the final-size model trained on all five domains at once (a new run: one stage of as many
              steps as `replay` takes in all, so the same FLOPs); its final model is its only row

Each stage checkpoint is fine-tuned (`jaxcl.downstream`, the library's defaults: 500 training texts, 3 epochs,
learning rate chosen on the run's stage-0 validation from 3e-4 / 1e-3 / 3e-3) on the tasks of the domains
seen so far (bible_books, wordnet_pos, manpage_section, pydoc_package; jargon has none), one fine-tuning seed
per pre-training seed; ELLE's checkpoints also without their prompts (the prompt ablation).

A piece is one method x one seed: pre-training, then its fine-tunes (checkpoints do not survive between
sessions). When a piece finishes, its report, config and downstream cells (predictions included) are copied
into `--results/<method>-seed<s>/` with `piece.json` (wall times), and with `--commit` git-committed at once,
followed by the regenerated summary and plots (so the committed summary is always the committed pieces');
a finished piece is never redone, and one made with another config is refused (`piece_changes`). The summary (`summary.json`, `downstream_final.png`,
`downstream_forgetting.png`) reports, with 95 % intervals from a paired bootstrap over test texts (the
same resamples of a task for every method, seed and row; seed-averaged predictions):
  - each method's final-stage average accuracy and macro-F1 over the four tasks;
  - forgetting on the earlier domains' tasks (best score after the domain was learned minus the final);
  - ELLE - each baseline on the final average, and ELLE's prompt ablation (with - without prompts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("elle", "sequential", "replay", "joint")
SOURCE_RUN = {"elle": "elle-adaptive", "sequential": "sequential-final", "replay": "replay-final"}
TASKS = ("bible_books", "wordnet_pos", "manpage_section", "pydoc_package")
ROOT = Path(__file__).resolve().parents[1]


def method_config(base, method: str):
    """The pre-training config of `method` (equal FLOPs to ELLE per stage; joint: the same total)."""
    from benchmarks.elle_equal_flops import comparison_configs

    runs, _ = comparison_configs(base)
    if method in SOURCE_RUN:
        return runs[SOURCE_RUN[method]]
    replay = runs["replay-final"]
    return dataclasses.replace(replay, run=dataclasses.replace(replay.run, method="joint"),
                               elle=dataclasses.replace(base.elle, schedule=(), prompt_length=0, warmup_steps=0))


def run_piece(method: str, seed: int, args) -> dict:
    """Pre-train, fine-tune, copy the results; returns piece.json's content. Finished pieces are read back."""
    from benchmarks.common import finished_or_run, publish_result
    from jaxcl.config import load_config
    from jaxcl.downstream import DownstreamRun

    done = Path(args.results) / f"{method}-seed{seed}"
    base = load_config(args.config, list(args.overrides) + [f"run.seed={seed}"])
    cfg = method_config(base, method)
    if (done / "piece.json").is_file():
        changed = piece_changes(done, cfg)
        if changed:
            sys.exit(f"{done} holds {method} seed {seed} made with another config ({', '.join(changed)}): "
                     "use its --config and overrides, or another --results directory")
        return json.loads((done / "piece.json").read_text())
    run_dir = Path(args.runs) / f"seed{seed}" / method
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"downstream-{method}-seed{seed}",
                                                           dir=str(run_dir)))
    start = time.time()
    print(f"=== {method} seed {seed}: pre-training (stage steps {list(cfg.train.stage_steps) or 'as configured'})",
          flush=True)
    finished_or_run(cfg, run_dir, rerun=False)
    pretrain = time.time() - start
    start = time.time()
    variants = [None, False] if method == "elle" else [None]
    for prompts in variants:
        print(f"=== {method} seed {seed}: fine-tuning{' without prompts' if prompts is False else ''}", flush=True)
        DownstreamRun(run_dir, seeds=[seed], seen_only=True, prompts=prompts).run()
    finetune = time.time() - start
    piece = {"method": method, "seed": seed, "pretrain_seconds": pretrain, "finetune_seconds": finetune,
             "seconds": pretrain + finetune, "config": args.config, "overrides": list(args.overrides)}

    def fill(tmp: Path) -> None:
        for name in ("report.json", "config.yaml"):
            shutil.copy2(run_dir / name, tmp / name)
        shutil.copytree(run_dir / "downstream", tmp / "downstream", ignore=shutil.ignore_patterns("tensorboard"))
        (tmp / "piece.json").write_text(json.dumps(piece, indent=2))

    print(f"=== {method} seed {seed}: {pretrain / 60:.1f} min pre-training + {finetune / 60:.1f} min fine-tuning",
          flush=True)
    publish_result(done, fill, commit_message=(f"benchmarks/downstream.py: {method} seed {seed} finished "
                                               f"({piece['seconds'] / 60:.0f} min)" if args.commit else None))
    return piece


def piece_changes(done: Path, cfg) -> list[str]:
    """The dotted keys in which `cfg` differs from the finished piece in `done` in what it pre-trains
    (`jaxcl.rundir.incompatible_keys`) or in how it fine-tunes (`downstream.*`: a piece fine-tuned on other
    caps or grids is not the same measurement); empty when the piece can be reused."""
    from jaxcl.config import config_to_dict
    from jaxcl.rundir import changed_keys, incompatible_keys, normalized_config, recorded_config

    recorded = recorded_config(done) or {}
    tuned = changed_keys(normalized_config(recorded).get("downstream"), config_to_dict(cfg)["downstream"],
                         "downstream.")
    return incompatible_keys(recorded, cfg, cfg.run.method) + tuned


# ----------------------------------------------------------------------------- analysis
def _load(results: Path):
    """Per method: (rows, tasks, found) merged over its finished seeds, and the pieces."""
    from jaxcl.config import DownstreamConfig, _build
    from jaxcl.data.corpus import DOMAINS
    from jaxcl.downstream import Row, resolve_tasks

    tasks, settings = [], None
    out, pieces = {}, {}
    for piece_path in sorted(results.glob("*-seed*/piece.json")):
        piece = json.loads(piece_path.read_text())
        d = piece_path.parent / "downstream"
        info = json.loads((d / "downstream.json").read_text())
        if settings is None:            # the tasks as the pieces capped them (every piece must agree)
            settings = info["settings"]
            tasks = list(resolve_tasks(_build(DownstreamConfig, settings, "downstream"), DOMAINS).values())
        elif info["settings"] != settings:
            sys.exit(f"{d}: downstream settings differ from the other pieces' ({settings}); rerun it")
        rows = [Row(**{**r, "trained": tuple(r["trained"])}) for r in info["rows"]]
        entry = out.setdefault(piece["method"], {"rows": rows, "found": {}, "lr": {}})
        entry["lr"][piece["seed"]] = info["lr"]
        pieces.setdefault(piece["method"], {})[piece["seed"]] = piece
        for cell_path in sorted(d.glob("cells/*/*/*/seed*.json")):
            cell = json.loads(cell_path.read_text())
            variant = cell_path.parts[-4]
            entry["found"].setdefault(variant, {}).setdefault((cell["row"], cell["task"]), {})[cell["seed"]] = cell
    return tasks, out, pieces


def analyse(results: Path, resamples: int = 2000) -> dict:
    """The claims with intervals (see the module docstring), from the finished pieces under `results`."""
    import numpy as np

    from jaxcl.downstream import build_summary
    from jaxcl.eval.metrics import classification_scores, percentile_interval, text_draws

    tasks, methods, pieces = _load(results)
    seen = lambda r, t: t.domain in r.trained                                           # noqa: E731
    draws = {t.name: text_draws(len(t.split("test")), resamples, t.name) for t in tasks}
    summary = {"resamples": resamples, "level": 0.95, "methods": {}, "pieces": pieces}
    final_boot = {}
    for method, entry in methods.items():
        block = build_summary(entry["rows"], tasks, entry["found"], resamples, seen=seen)
        variant = "plain" if "plain" in block["variants"] else "prompt"
        found = entry["found"][variant]
        final = entry["rows"][-1].name
        seeds = sorted({s for cells in found.values() for s in cells})
        per_seed = {}
        boot = {}
        for t in tasks:
            cells = found.get((final, t.name))
            if not cells:
                continue
            preds = np.stack([np.asarray(cells[s]["predictions"]) for s in sorted(cells)])
            boot[t.name] = classification_scores(preds, t.split("test").labels, len(t.label_names), draws[t.name])
            for s in sorted(cells):
                per_seed.setdefault(s, []).append(cells[s]["accuracy"])
        final_boot[method] = boot
        summary["methods"][method] = {
            "seeds": seeds, "final_row": final, "variant": variant,
            "final_average": block["variants"][variant]["summary"]["average"],
            "final_per_task": {t.name: block["variants"][variant]["accuracy"]["matrix"][-1][j]
                               for j, t in enumerate(tasks)},
            "forgetting": block["variants"][variant]["summary"]["forgetting"],
            "final_average_per_seed": {str(s): float(np.mean(v)) for s, v in per_seed.items()},
            "prompt_ablation": block.get("prompt_ablation", {}).get("final_average"),
            "prompt_ablation_cells": block.get("prompt_ablation"),
            "lr": entry["lr"],
            "minutes": sum(p["seconds"] for p in pieces[method].values()) / 60,
        }
    if "elle" in final_boot:
        summary["elle_minus"] = {}
        for other, boot in final_boot.items():
            common = [t for t in TASKS if t in boot and t in final_boot["elle"]]
            if other == "elle" or not common:
                continue
            diff = {}
            for m in ("accuracy", "macro_f1"):
                d = np.mean([final_boot["elle"][t][m] - boot[t][m] for t in common], axis=0)
                low, high = percentile_interval(d, 0.95)
                diff[m] = {"value": float(np.mean(d)), "low": low, "high": high}
            summary["elle_minus"][other] = {"tasks": common, **diff}
    summary["total_minutes"] = sum(m["minutes"] for m in summary["methods"].values())
    return summary


def plots(summary: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(summary["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    width = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        per_task = summary["methods"][m]["final_per_task"]
        values = [np.nan if per_task.get(t) is None else per_task[t] for t in TASKS]
        ax.bar(np.arange(len(TASKS)) + k * width, values, width, label=m)
    ax.set_xticks(np.arange(len(TASKS)) + width * (len(methods) - 1) / 2, TASKS, rotation=15)
    ax.set_ylabel("test accuracy after the last stage (%)")
    ax.legend(fontsize=8)
    ax.set_title("final-stage accuracy per task (seed mean)")
    ax = axes[1]
    avg = [summary["methods"][m]["final_average"]["accuracy"] for m in methods]
    ax.errorbar(range(len(methods)), [a["value"] for a in avg],
                yerr=[[a["value"] - a["low"] for a in avg], [a["high"] - a["value"] for a in avg]], fmt="o", capsize=4)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("final average accuracy (%), 95 % interval")
    ax.set_title("final average over the four tasks")
    fig.tight_layout()
    fig.savefig(out / "downstream_final.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    earlier = TASKS[:3]
    for k, m in enumerate(m for m in methods if summary["methods"][m]["forgetting"]["accuracy"]):
        f = summary["methods"][m]["forgetting"]["accuracy"]
        vals = [f.get(t, {}).get("value", np.nan) for t in earlier]
        lows = [v - f.get(t, {}).get("low", v) for t, v in zip(earlier, vals)]
        highs = [f.get(t, {}).get("high", v) - v for t, v in zip(earlier, vals)]
        ax.errorbar(np.arange(3) + 0.1 * k, vals, yerr=[lows, highs], fmt="o", capsize=3, label=m)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(3), earlier)
    ax.set_ylabel("forgetting (best after learning - final), points")
    ax.legend(fontsize=8)
    ax.set_title("downstream forgetting of earlier domains' tasks")
    fig.tight_layout()
    fig.savefig(out / "downstream_forgetting.png", dpi=120)
    plt.close(fig)


def write_summary(results: Path, commit: bool) -> dict:
    """summary.json and the two plots in `results` from the pieces there (`analyse`, `plots`); with `commit`,
    git-committed (each piece's commit is followed by its summary's, so the committed summary is the one the
    committed pieces give: `tests/test_benchmark_runs.py` checks it)."""
    from benchmarks.common import commit_paths

    summary = analyse(results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    files = [results / "summary.json"]
    if summary["methods"]:
        plots(summary, results)
        files += [results / "downstream_final.png", results / "downstream_forgetting.png"]
    if commit:
        pieces = sum(len(seeds) for seeds in summary["pieces"].values())
        commit_paths(files, f"benchmarks/downstream.py: summary of {pieces} pieces")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/elle/compare.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", default="runs/downstream-bench", help="run directories (checkpoints; not committed)")
    parser.add_argument("--results", default="benchmarks/results/downstream", help="committed results")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished piece's results at once")
    parser.add_argument("--summarize", action="store_true", help="only the summary, from the committed results")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every pre-training run")
    args = parser.parse_args()
    results = Path(args.results)
    if not args.summarize:
        methods = [m for m in args.methods.split(",") if m]
        bad = sorted(set(methods) - set(METHODS))
        if bad:
            parser.error(f"--methods: unknown {bad} (choose from {', '.join(METHODS)})")
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            for method in methods:
                new = not (results / f"{method}-seed{seed}" / "piece.json").is_file()
                run_piece(method, seed, args)       # a finished piece: read back, checked against this config
                if new and args.commit:             # the committed summary always matches the committed pieces
                    write_summary(results, commit=True)
    summary = write_summary(results, commit=False)
    for m, s in summary["methods"].items():
        a = s["final_average"]["accuracy"]
        print(f"{m:>11}: seeds {s['seeds']}: final average accuracy {a['value']:.2f} [{a['low']:.2f}, {a['high']:.2f}]"
              + (f"; prompt ablation {s['prompt_ablation']['accuracy']['value']:+.2f} "
                 f"[{s['prompt_ablation']['accuracy']['low']:+.2f}, {s['prompt_ablation']['accuracy']['high']:+.2f}]"
                 if s.get("prompt_ablation") else ""))
    for other, d in summary.get("elle_minus", {}).items():
        a = d["accuracy"]
        print(f"ELLE - {other}: {a['value']:+.2f} [{a['low']:+.2f}, {a['high']:+.2f}] accuracy points")
    print(f"total {summary['total_minutes']:.0f} min; summary in {results / 'summary.json'}")


if __name__ == "__main__":
    main()
