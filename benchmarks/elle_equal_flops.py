"""ELLE vs. its baselines at equal training compute on the embedded 5-domain stream.

    python benchmarks/elle_equal_flops.py [--config configs/elle/demo.yaml] [--out runs/elle-compare] [key=value ...]

Runs, each through jaxcl's own runners (same data, tokenizer, optimizer, evaluation):
  elle              growth + domain prompts + replay + warmup (the config as given)
  sequential-final  sequential fine-tuning of the final-size model (no replay, no prompts)
  replay-final      the final-size model with ELLE's replay (experience replay), no growth or prompts
  replay-small      the initial small model with ELLE's replay, fixed size (no growth or prompts)
Every baseline gets, stage by stage, as many steps as fit in the training FLOPs ELLE spends on that
stage (warmups included), so all runs use the same compute per stage. Prints AP (final average
perplexity over the domains) and AP+ (average increase of old domains' perplexity since they were
learned), with ratios to ELLE, and writes compare.json and compare.png into --out. Runs resume: a
finished run is not repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_summary, print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/elle/demo.yaml")
    parser.add_argument("--out", default="runs/elle-compare")
    parser.add_argument("--only", default="", help="comma list of run names to run (default: all)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every run")
    args = parser.parse_args()

    from jaxcl.config import ElleConfig, load_config
    from jaxcl.elle.run import planned_stage_flops, target_sizes
    from jaxcl.runs import run_config
    from jaxcl.train.loop import train_step_flops
    from jaxcl.transforms import grown_config

    base = load_config(args.config, args.overrides)
    from jaxcl.data.sources import open_source
    domains = tuple(base.data.domains) or open_source(base.data.source, base.data.text_field).domains()
    n = len(domains)
    elle_flops = planned_stage_flops(base, n)
    final = base.model
    for target in base.elle.schedule:
        final = grown_config(final, method=base.elle.grow_method, **target_sizes(target))
    final = final.replace(num_prompts=0)
    small = base.model
    replay_only = dataclasses.replace(base.elle, schedule=(), prompt_length=0, warmup_steps=0)

    def equal_steps(model_cfg):
        per_step = train_step_flops(model_cfg, base.data.batch_size, base.data.seq_len)
        return tuple(max(1, round(f / per_step)) for f in elle_flops)

    out = Path(args.out)
    runs = {
        "elle": base,
        "sequential-final": dataclasses.replace(base, model=final, elle=ElleConfig(),
                                                run=dataclasses.replace(base.run, method="sequential"),
                                                train=dataclasses.replace(base.train, stage_steps=equal_steps(final))),
        "replay-final": dataclasses.replace(base, model=final, elle=replay_only,
                                            train=dataclasses.replace(base.train, stage_steps=equal_steps(final))),
        "replay-small": dataclasses.replace(base, model=small, elle=replay_only,
                                            train=dataclasses.replace(base.train, stage_steps=equal_steps(small))),
    }
    only = [s for s in args.only.split(",") if s]
    reports = {}
    for name, cfg in runs.items():
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{base.run.name}-{name}",
                                                               dir=str(out / name)))
        if only and name not in only:
            path = out / name / "report.json"
            if path.exists():
                reports[name] = json.loads(path.read_text())
            continue
        print(f"=== {name}: stage steps {list(cfg.train.stage_steps) or 'as configured'}", flush=True)
        reports[name] = run_config(cfg)

    rows, ref = [], reports.get("elle")
    for name, r in reports.items():
        ap, ap_plus = r["summary"]["average"], r["summary"]["forgetting"]
        flops = sum(r["train_flops"])
        rows.append([name, r["architectures"][-1]["n_layers"], r["architectures"][-1]["d_model"], ap, ap_plus,
                     flops / 1e12, r["train_seconds"],
                     ap / ref["summary"]["average"] if ref else float("nan")])
    print(f"\n{machine_summary()}; config {args.config} {' '.join(args.overrides)}")
    print_table(["run", "final L", "final D", "AP (ppl)", "AP+ (ppl)", "train TFLOPs", "train s", "AP / ELLE AP"], rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                  "elle_stage_flops": elle_flops, "reports": reports}, indent=2))
    _plot(reports, domains, out / "compare.png")
    print(f"outputs in {out}/: compare.json, compare.png and one run directory per method")


def _plot(reports: dict, domains, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in reports.items():
        seen_avg = [sum(row[:i + 1]) / (i + 1) for i, row in enumerate(r["matrix"])]
        flops = [sum(r["train_flops"][:i + 1]) / 1e12 for i in range(len(r["matrix"]))]
        axes[0].plot(flops, seen_avg, marker="o", label=name)
        axes[1].plot(range(len(domains)), r["matrix"][-1], marker="o", label=name)
    axes[0].set(xlabel="cumulative training TFLOPs", ylabel="average perplexity over seen domains",
                title="AP after each stage", yscale="log")
    axes[1].set(xlabel="domain", ylabel="final perplexity", title="final perplexity per domain", yscale="log")
    axes[1].set_xticks(range(len(domains)), domains, rotation=30)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
