"""SeMem's claims under its own protocol: the past/future stream, a δ sweep, RandMem, full memorization, sizes.

    python benchmarks/semem_stream.py [--config configs/semem/stream.yaml] [--out runs/semem-stream]
                                      [--skip-ablation] [--rerun] [key=value ...]

Runs (each a `jaxcl run` of `run.method: semem`, resumable after a kill at any moment; a finished run is
reused, never repeated, and one finished with another config is refused):
  semem             the config: every model size pre-trained on the mixture of the pasts (shared, cached in
                    <out>/pretrain), then the stream with SeMem at every δ, RandMem at each δ's sizes, full
                    memorization and the bare LM on the same code path
  constant-lambda   the ablation: the main model, δ = semem.threshold, one λ for every token (fitted on the
                    same held-out text) instead of the per-token calibrator
Prints per model the trade-off (memory size, validation and test perplexity of the pre-training domains'
futures and of the unseen domains, admission rate over the futures) and the acceptance checks of issue 16,
plus the pre-training budget curve (held-out perplexity every `train.eval_every` steps); writes
<out>/semem_stream.json. The plots are the run's own (<out>/semem/*.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import finished_or_run, machine_summary, print_table, write_json  # noqa: E402

PAPER_RATES = {"GPT-2 small": 0.53, "GPT-2 large": 0.42}    # SeMem paper: admitted fraction at δ = -1.5


def budget_curves(pretrain_root: Path) -> dict[str, dict[str, list]]:
    """Per pre-trained model: (step, mean validation perplexity over its domains) at every evaluation."""
    curves = {}
    for run in sorted(pretrain_root.glob("pretrain-*")):
        path = run / "metrics.jsonl"
        if not path.exists():
            continue
        by_step: dict[int, list[float]] = {}
        for line in path.read_text().splitlines():
            rec = json.loads(line) if line.endswith("}") else {}
            if rec.get("kind") == "eval":
                by_step.setdefault(int(rec["global_step"]), []).append(float(rec["perplexity"]))
        curves[run.name] = {"steps": sorted(by_step),
                            "perplexity": [sum(v) / len(v) for _, v in sorted(by_step.items())]}
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/semem/stream.yaml")
    parser.add_argument("--out", default="runs/semem-stream")
    parser.add_argument("--skip-ablation", action="store_true", help="do not run the constant-λ ablation")
    parser.add_argument("--rerun", action="store_true", help="run again even where a report.json exists")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every run")
    args = parser.parse_args()

    from jaxcl.config import load_config

    out = Path(args.out).absolute()
    base = load_config(args.config, [*args.overrides, f"semem.pretrain_dir={out / 'pretrain'}"])
    main_cfg = dataclasses.replace(base, run=dataclasses.replace(base.run, dir=str(out / "semem")))
    report = finished_or_run(main_cfg, out / "semem", rerun=args.rerun, banner="== semem (all policies, all sizes)")
    ablation = None
    if not args.skip_ablation:
        cfg = dataclasses.replace(
            base, run=dataclasses.replace(base.run, dir=str(out / "constant-lambda")),
            semem=dataclasses.replace(base.semem, calibrator="constant", sweep=(), random_control=False,
                                      extra_models=()))
        ablation = finished_or_run(cfg, out / "constant-lambda", rerun=args.rerun,
                                   banner="== constant-λ ablation (main model, δ = semem.threshold)")

    print(f"\n{machine_summary()}; {args.config}")
    summary = {"config": args.config, "machine": machine_summary(), "models": [], "acceptance": report["acceptance"],
               "pretraining_budget": budget_curves(out / "pretrain")}
    for m in report["models"]:
        pol, full = m["policies"], m["policies"]["full"]
        rows = []
        for name, p in sorted(pol.items(), key=lambda kv: (kv[1]["admit"], kv[1]["memory_size"])):
            rows.append([name, p["threshold"] if p["threshold"] is not None else "-", f"{p['memory_size']:,}",
                         f"{p['memory_size'] / max(full['memory_size'], 1):.2f}",
                         f"{p['valid']['future']:.2f}" if p["valid"]["future"] else "-",
                         f"{p['test']['future']:.2f}" if p["test"]["future"] else "-",
                         f"{p['test']['unseen']:.2f}" if p["test"]["unseen"] else "-",
                         f"{p['admitted_rate_future']:.3f}" if p["admitted_rate_future"] is not None else "-"])
        lm = m["lm_only"]
        rows.append(["LM only", "-", "0", "0", f"{lm['valid']['future']:.2f}" if lm["valid"]["future"] else "-",
                     f"{lm['test']['future']:.2f}" if lm["test"]["future"] else "-",
                     f"{lm['test']['unseen']:.2f}" if lm["test"]["unseen"] else "-", "-"])
        arch = m["architecture"]
        print(f"\n{m['tag']} ({arch['params'] / 1e6:.1f} M parameters, d={arch['d_model']}, L={arch['n_layers']}); "
              f"δ chosen on validation: {m['chosen_threshold']}")
        print_table(["policy", "δ", "memory", "vs full", "valid ppl (futures)", "test ppl (futures)",
                     "test ppl (unseen)", "admitted (futures)"], rows)
        summary["models"].append({k: m[k] for k in ("tag", "architecture", "chosen", "chosen_threshold", "groups")}
                                 | {"policies": {n: {k: v for k, v in p.items() if k != "admitted_rate_by_domain"}
                                                 for n, p in pol.items()},
                                    "lm_only": lm})
    if ablation is not None:
        a = ablation["models"][0]["policies"]["semem"]
        s = report["models"][0]["policies"]["semem"]
        summary["constant_lambda"] = {"memory_size": a["memory_size"], "test": a["test"], "valid": a["valid"]}
        print(f"\nconstant-λ ablation ({report['models'][0]['tag']}, δ = {a['threshold']}): memory "
              f"{a['memory_size']:,} vs {s['memory_size']:,} with the calibrator; test perplexity (futures) "
              f"{a['test']['future']:.2f} vs {s['test']['future']:.2f}")
    print("\nacceptance (issue 16):")
    for key, value in report["acceptance"].items():
        print(f"  {key}: {value}")
    print(f"  paper, admitted at δ = -1.5: {PAPER_RATES}")
    for name, curve in summary["pretraining_budget"].items():
        print(f"pre-training {name}: "
              + ", ".join(f"{s}: {p:.1f}" for s, p in zip(curve["steps"], curve["perplexity"])))
    write_json(str(out / "semem_stream.json"), summary)
    print(f"\nwrote {out / 'semem_stream.json'}; plots in {out / 'semem'}/")


if __name__ == "__main__":
    main()
