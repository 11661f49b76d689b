"""SeMem's claims under its own protocol: the past/future stream, a δ sweep, RandMem, full memorization, sizes.

    python benchmarks/semem_stream.py [--config configs/semem/measure.yaml] [--out runs/<run.name>]
                                      [--results benchmarks/results/<run.name>] [--ablation] [--rerun]
                                      [--summarize] [key=value ...]

Pieces, in order, each resumable after a kill at any moment and reused once finished (a finished piece run
with another config is refused):
  pretrain-<model>   every model size pre-trained on the mixture of the pasts through the shared path
                     (`SememRun.pretrained`: a cached `joint` run in <out>/pretrain); its budget curve (mean
                     held-out perplexity of the pre-training domains every `train.eval_every` steps) and wall
                     time go to <results>/pretrain-<model>.json as soon as it finishes
  semem              the `jaxcl run` of the config (`run.method: semem`): the stream with SeMem at every δ,
                     RandMem at each δ's sizes, full memorization and the bare LM on one code path; its
                     report.json, config.yaml and plots are copied to <results>/semem/
  constant-lambda    (--ablation) the main model, δ = semem.threshold, one λ for every token instead of the
                     per-token calibrator; copied to <results>/constant-lambda/
Then the claims, each comparison a paired bootstrap over the test split's 128-token sequences
(`jaxcl.eval.metrics.paired_perplexity_bootstrap`), are printed and written to <results>/summary.json with
the plots semem_vs_randmem.png (SeMem - RandMem per δ and size, with intervals), admission_quarters.png
(first vs last quarter of every domain), memory_growth.png (per model, SeMem's δ sweep and full
memorization against tokens streamed) and pretraining_budget.png. `--summarize` recomputes them from
<results>/ alone (no run directory needed: the committed files regenerate the docs' tables).
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

from benchmarks.common import finished_or_run, machine_summary, print_table, write_json  # noqa: E402

PAPER_RATES = {"GPT-2 small": 0.53, "GPT-2 large": 0.42}    # SeMem paper: admitted fraction at δ = -1.5
PLOTS = ("memory_growth.png", "admitted_rate.png", "perplexity_per_chunk.png", "perplexity_matrix.png")


def budget_curve(run_dir: Path) -> dict[str, list]:
    """(step, mean validation perplexity over the pre-training domains) at every evaluation of one run."""
    by_step: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line) if line.endswith("}") else {}
        if rec.get("kind") in ("eval", "eval_step"):      # every train.eval_every steps, and the stage's end
            by_step.setdefault(int(rec["global_step"]), []).append(float(rec["perplexity"]))
    return {"steps": sorted(by_step), "perplexity": [sum(v) / len(v) for _, v in sorted(by_step.items())]}


def pretrain_pieces(cfg, results: Path) -> dict[str, dict]:
    """Pre-train every model size that has no `init_from` (cached: a finished one is reused), writing each
    piece's budget curve and wall time to <results>/pretrain-<model>.json when it finishes."""
    from jaxcl.memory.run import SememRun

    run = SememRun(cfg)
    pieces = {}
    for i, (model_cfg, source) in enumerate(zip(run.models, run.sources)):
        if source is not None:
            continue
        tag = run.model_tag(i)
        started = time.monotonic()
        run_dir = Path(run.pretrained(model_cfg, tag))
        report = json.loads((run_dir / "report.json").read_text())
        tokens = cfg.train.pretrain_steps * cfg.data.batch_size * cfg.data.seq_len
        pieces[tag] = {"tag": tag, "run_dir": run_dir.name, "params": model_cfg.num_params(),
                       "steps": cfg.train.pretrain_steps, "tokens": tokens,
                       "wall_seconds": report["wall_seconds"],
                       "seconds_this_invocation": time.monotonic() - started, "curve": budget_curve(run_dir)}
        write_json(str(results / f"pretrain-{tag}.json"), pieces[tag])
        print(f"pre-trained {tag}: {report['wall_seconds'] / 60:.1f} min, held-out perplexity "
              f"{pieces[tag]['curve']['perplexity'][-1]:.1f}", flush=True)
    return pieces


def keep_run(run_dir: Path, dest: Path) -> None:
    """Copy a finished run's report, config and plots (no checkpoints, no datastores) to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in [run_dir / "report.json", run_dir / "config.yaml", run_dir / "metrics.jsonl",
                 *sorted(run_dir.glob("*.png"))]:
        if path.exists():
            shutil.copy2(path, dest / path.name)


def time_breakdown(metrics: Path) -> dict[str, dict[str, float]]:
    """Per model, where the stream's wall time went (seconds, summed over chunks): the LM scoring the chunk,
    each policy's search and admission, the calibrator refits (all policies), the validation evaluations."""
    out: dict[str, dict[str, float]] = {}
    if not metrics.exists():
        return out
    for line in metrics.read_text().splitlines():
        rec = json.loads(line) if line.endswith("}") else {}
        if rec.get("kind") != "semem_chunk_seconds":
            continue
        parts = out.setdefault(rec["model"], {"score": 0.0, "memorize (all policies)": 0.0,
                                              "calibrate (all policies)": 0.0, "evaluate (all policies)": 0.0,
                                              "total": 0.0, "chunks": 0})
        parts["chunks"] += 1
        for key, value in rec["seconds"].items():
            group = ("memorize (all policies)" if key.startswith("memorize ") else
                     "evaluate (all policies)" if key.startswith("evaluate ") else key)
            parts[group] += value
    return out


def analyse(report: dict, pretrain: dict[str, dict], ablation: dict | None, resamples: int) -> dict:
    """Every claim of SeMem as measured, with paired bootstrap intervals on the test split."""
    from jaxcl.eval.metrics import paired_perplexity_bootstrap

    out: dict = {"models": [], "claims": {}}
    models = report["models"]
    for m in models:
        pol, groups = m["policies"], m["groups"]
        futures, unseen = groups["future"], groups["unseen"]
        nll = m["test_nll"]

        def boot(a: str, b: str, domains: list[str]) -> dict:
            side = {n: ({d: m["lm_only_test_nll"][d] for d in domains} if n == "lm" else
                        {d: nll[n][d] for d in domains}) for n in (a, b)}
            return paired_perplexity_bootstrap(side[a], side[b], resamples=resamples)

        entry = {"tag": m["tag"], "architecture": m["architecture"], "groups": groups, "chosen": m["chosen"],
                 "chosen_threshold": m["chosen_threshold"], "seconds": m.get("seconds"),
                 "lm_only": m["lm_only"], "policies": {}, "semem_vs_randmem": {}, "vs_full": {}, "vs_lm": {}}
        for name, p in pol.items():
            entry["policies"][name] = {k: p[k] for k in ("admit", "threshold", "memory_size", "admitted_rate",
                                                         "admitted_rate_future", "valid", "test",
                                                         "rate_first_vs_last_quarter")}
        for name, p in pol.items():
            if p["admit"] != "random":
                continue
            semem = "semem" + name[len("randmem"):]
            entry["semem_vs_randmem"][f"{p['threshold']:g}"] = {
                "semem": semem, "randmem": name, "memory_size": pol[semem]["memory_size"],
                "future": boot(semem, name, futures), "unseen": boot(semem, name, unseen) if unseen else None}
        for name, p in pol.items():
            if name != "full":
                entry["vs_full"][name] = {"future": boot(name, "full", futures),
                                          "memory_fraction": p["memory_size"] / max(pol["full"]["memory_size"], 1)}
            entry["vs_lm"][name] = {"future": boot(name, "lm", futures),
                                    "unseen": boot(name, "lm", unseen) if unseen else None}
        out["models"].append(entry)

    claims = out["claims"]
    for e in out["models"]:
        tag = e["tag"]
        claims[f"{tag}: SeMem below RandMem of equal size (futures, test, 95 % paired interval)"] = {
            d: {"difference": c["future"]["difference"], "interval": [c["future"]["low"], c["future"]["high"]],
                "detectable": c["future"]["detectable"], "holds": c["future"]["high"] < 0}
            for d, c in sorted(e["semem_vs_randmem"].items(), key=lambda kv: float(kv[0]))}
        chosen = e["chosen"]
        if chosen is None:
            claims[f"{tag}: δ chosen on validation within 5 % of full at ≤ 60 % memory"] = {
                "holds": False, "why": "no δ of the sweep is within 5 % of full memorization on validation"}
        else:
            v = e["vs_full"][chosen]
            claims[f"{tag}: δ chosen on validation within 5 % of full at ≤ 60 % memory"] = {
                "chosen": chosen, "threshold": e["chosen_threshold"],
                "test_ratio": 1 + v["future"]["relative"],
                "interval": [1 + v["future"]["relative_low"], 1 + v["future"]["relative_high"]],
                "memory_fraction": v["memory_fraction"],
                "holds": v["future"]["relative"] <= 0.05 and v["memory_fraction"] <= 0.6}
        rates = {}
        for name, p in e["policies"].items():
            if p["admit"] != "selective":
                continue
            q = p["rate_first_vs_last_quarter"]
            per = {d: {"first": q[d]["first"], "last": q[d]["last"],
                       "ratio": q[d]["last"] / q[d]["first"] if q[d]["first"] else None} for d in q}
            fut = [per[d] for d in (models[0]["groups"]["future"])]
            rates[name] = {"threshold": p["threshold"], "by_domain": per,
                           "holds_every_future": all(r["ratio"] is not None and r["ratio"] <= 0.8 for r in fut)}
        claims[f"{tag}: admission, last quarter ≤ 0.8 x first quarter of each future domain"] = rates
        paper = next((n for n, p in e["policies"].items() if p["admit"] == "selective" and p["threshold"] == -1.5),
                     None)
        if paper:
            claims[f"{tag}: admitted at δ = -1.5 over the futures (paper: 53 % GPT-2 small, 42 % large)"] = \
                e["policies"][paper]["admitted_rate_future"]
    if len(out["models"]) > 1:
        by_size = sorted(out["models"], key=lambda e: e["architecture"]["params"])
        small, large = by_size[0], by_size[-1]
        better = large["lm_only"]["test"]["future"] < small["lm_only"]["test"]["future"]
        held = {e["tag"]: pretrain[e["tag"]]["curve"]["perplexity"][-1] for e in by_size if e["tag"] in pretrain}
        fewer = {}
        for name, p in small["policies"].items():
            if p["admit"] != "selective":
                continue
            a_small = small["policies"][name]["memory_size"]
            a_large = large["policies"][name]["memory_size"]
            fewer[name] = {"threshold": p["threshold"], "small": a_small, "large": a_large,
                           "ratio": a_large / max(a_small, 1), "fewer": a_large < a_small}
        claims["larger model admits fewer tokens over the whole stream"] = {
            "small": small["tag"], "large": large["tag"], "pretrain_domains": list(report["pretrain_domains"]),
            "held_out_perplexity_after_pretraining": held,
            "test_perplexity_futures_lm_only": {e["tag"]: e["lm_only"]["test"]["future"] for e in by_size},
            "larger_is_better_lm": better, "by_policy": fewer,
            "status": ("holds" if all(f["fewer"] for f in fewer.values()) else "does not hold")
            if better else "untested (the larger model is not the better LM on held-out text)"}
    if ablation is not None:
        # the same model, δ and test sequences: the per-token calibrator's run against the constant-λ run
        a, main = ablation["models"][0], models[0]
        out["constant_lambda"] = {
            "tag": a["tag"], "threshold": a["policies"]["semem"]["threshold"],
            "memory_size": a["policies"]["semem"]["memory_size"],
            "memory_size_with_calibrator": main["policies"]["semem"]["memory_size"],
            "test": a["policies"]["semem"]["test"], "valid": a["policies"]["semem"]["valid"],
            "calibrator_minus_constant": {
                g: paired_perplexity_bootstrap({d: main["test_nll"]["semem"][d] for d in main["groups"][g]},
                                               {d: a["test_nll"]["semem"][d] for d in main["groups"][g]},
                                               resamples=resamples)
                for g in ("future", "unseen") if main["groups"][g]}}
    return out


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_intervals(summary: dict, path: Path) -> None:
    """SeMem - RandMem of equal size (test perplexity, futures) per δ and model, with 95 % paired intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for j, e in enumerate(summary["models"]):
        ds = sorted(e["semem_vs_randmem"], key=float)
        xs = [float(d) + 0.06 * (j - 0.5) for d in ds]
        c = [e["semem_vs_randmem"][d]["future"] for d in ds]
        ax.errorbar(xs, [x["difference"] for x in c],
                    yerr=[[x["difference"] - x["low"] for x in c], [x["high"] - x["difference"] for x in c]],
                    fmt="o", capsize=4, label=f"{e['tag']} ({e['architecture']['params'] / 1e6:.1f} M)")
    ax.axhline(0, color="grey", linestyle=":")
    ax.set_xlabel("δ (natural log; SeMem admits tokens with log p(gold) < δ)")
    ax.set_ylabel("test perplexity, SeMem - RandMem (futures)")
    ax.set_title("SeMem vs RandMem of equal size: below 0 = SeMem better (95 % paired bootstrap)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_quarters(summary: dict, path: Path) -> None:
    """Admitted fraction in the first vs the last quarter of every future domain's chunks, per SeMem δ."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, e in zip(axes[0], models):
        key = f"{e['tag']}: admission, last quarter ≤ 0.8 x first quarter of each future domain"
        for name, r in sorted(summary["claims"][key].items(), key=lambda kv: kv[1]["threshold"]):
            doms = list(r["by_domain"])
            ax.plot(range(len(doms)), [r["by_domain"][d]["ratio"] or 0 for d in doms], "o-",
                    label=f"δ = {r['threshold']:g}")
            ax.set_xticks(range(len(doms)), [d if d in e["groups"]["future"] else f"{d}\n(unseen)" for d in doms],
                          rotation=30, fontsize=8)
        ax.axhline(0.8, color="red", linestyle="--", label="claim: ≤ 0.8")
        ax.axhline(1.0, color="grey", linestyle=":")
        ax.set_ylabel("admitted rate, last quarter / first quarter")
        ax.set_title(e["tag"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_growth(report: dict, path: Path) -> None:
    """Memory size against tokens seen, one panel per model: SeMem at each δ and full memorization, with the
    streamed domains' boundaries (RandMem has SeMem's sizes by construction, so it is not drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        names = sorted((n for n, p in m["policies"].items() if p["admit"] in ("selective", "all")),
                       key=lambda n: -m["policies"][n]["memory_size"])
        for name in names:
            recs = m["memory"][name]
            p = m["policies"][name]
            label = "full memorization" if p["admit"] == "all" else f"SeMem δ = {p['threshold']:g}"
            ax.plot([0] + [r["tokens_seen"] for r in recs], [0] + [r["memory_size"] for r in recs],
                    "k--" if p["admit"] == "all" else "-", label=label)
        recs = m["memory"][names[0]]
        ends = [r for i, r in enumerate(recs) if i + 1 == len(recs) or recs[i + 1]["domain"] != r["domain"]]
        start = 0
        for r in ends:
            ax.axvline(r["tokens_seen"], color="grey", linewidth=0.5)
            ax.text((start + r["tokens_seen"]) / 2, 0.02, r["domain"], transform=ax.get_xaxis_transform(),
                    ha="center", fontsize=7, rotation=90)
            start = r["tokens_seen"]
        ax.set_xlabel("tokens streamed")
        ax.set_ylabel("memory entries")
        ax.set_title(f"{m['tag']}: memory growth over the stream", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_budget(pretrain: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for tag, p in sorted(pretrain.items()):
        ax.plot(p["curve"]["steps"], p["curve"]["perplexity"], "o-",
                label=f"{tag} ({p['params'] / 1e6:.1f} M params, {p['wall_seconds'] / 60:.1f} min)")
    ax.set_yscale("log")
    ax.set_xlabel("pre-training step (16 x 128 tokens)")
    ax.set_ylabel("held-out perplexity (mean of the pre-training domains)")
    ax.set_title("the pre-training budget curve", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def print_summary(summary: dict) -> None:
    for e in summary["models"]:
        arch = e["architecture"]
        print(f"\n{e['tag']} ({arch['params'] / 1e6:.2f} M parameters, d={arch['d_model']}, L={arch['n_layers']}); "
              f"δ chosen on validation: {e['chosen_threshold']}")
        full = e["policies"]["full"]["memory_size"]
        rows = []
        for name, p in sorted(e["policies"].items(), key=lambda kv: (kv[1]["admit"], kv[1]["memory_size"])):
            rows.append([name, "-" if p["threshold"] is None else f"{p['threshold']:g}", f"{p['memory_size']:,}",
                         f"{p['memory_size'] / max(full, 1):.2f}", f"{p['valid']['future']:.2f}",
                         f"{p['test']['future']:.2f}", f"{p['test']['unseen']:.2f}" if p["test"]["unseen"] else "-",
                         f"{p['admitted_rate_future']:.3f}"])
        lm = e["lm_only"]
        rows.append(["LM only", "-", "0", "0", f"{lm['valid']['future']:.2f}", f"{lm['test']['future']:.2f}",
                     f"{lm['test']['unseen']:.2f}" if lm["test"]["unseen"] else "-", "-"])
        print_table(["policy", "δ", "memory", "vs full", "valid ppl (futures)", "test ppl (futures)",
                     "test ppl (unseen)", "admitted (futures)"], rows)
        rows = []
        for d, c in sorted(e["semem_vs_randmem"].items(), key=lambda kv: float(kv[0])):
            f = c["future"]
            rows.append([d, f"{c['memory_size']:,}", f"{f['a']:.2f}", f"{f['b']:.2f}", f"{f['difference']:+.2f}",
                         f"[{f['low']:+.2f}, {f['high']:+.2f}]", f"{f['detectable']:.2f}",
                         "yes" if f["high"] < 0 else "no"])
        print_table(["δ", "memory", "SeMem", "RandMem", "SeMem - RandMem", "95 % interval", "detectable",
                     "SeMem lower?"], rows)
    if "constant_lambda" in summary:
        c = summary["constant_lambda"]
        print(f"\nconstant-λ ablation ({c['tag']}, δ = {c['threshold']:g}): memory {c['memory_size']:,} vs "
              f"{c['memory_size_with_calibrator']:,} with the calibrator; calibrator - constant λ, test perplexity: "
              + ", ".join(f"{g} {b['difference']:+.2f} [{b['low']:+.2f}, {b['high']:+.2f}]"
                          for g, b in c["calibrator_minus_constant"].items()))
    print("\nclaims:")
    print(json.dumps(summary["claims"], indent=1, ensure_ascii=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/semem/measure.yaml")
    parser.add_argument("--out", default=None, help="run directory (default runs/<run.name>)")
    parser.add_argument("--results", default=None, help="where the kept results go (default "
                        "benchmarks/results/<run.name>)")
    parser.add_argument("--ablation", action="store_true", help="also run the constant-λ ablation")
    parser.add_argument("--rerun", action="store_true", help="run again even where a report.json exists")
    parser.add_argument("--summarize", action="store_true", help="only recompute the claims from --results")
    parser.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every run")
    args = parser.parse_args()

    from jaxcl.config import load_config

    base = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{base.run.name}").absolute()
    results = Path(args.results or f"benchmarks/results/{base.run.name}").absolute()
    results.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ablation = None
    if args.summarize:
        report = json.loads((results / "semem" / "report.json").read_text())
        pretrain = {p.stem[len("pretrain-"):]: json.loads(p.read_text()) for p in sorted(results.glob("pretrain-*.json"))}
        if (results / "constant-lambda" / "report.json").exists():
            ablation = json.loads((results / "constant-lambda" / "report.json").read_text())
    else:
        base = load_config(args.config, [*args.overrides, f"semem.pretrain_dir={out / 'pretrain'}"])
        main_cfg = dataclasses.replace(base, run=dataclasses.replace(base.run, dir=str(out / "semem")))
        print("== pre-training (shared, cached)", flush=True)
        pretrain = pretrain_pieces(main_cfg, results)
        report = finished_or_run(main_cfg, out / "semem", rerun=args.rerun,
                                 banner="== semem (all policies, all sizes)")
        keep_run(out / "semem", results / "semem")
        if args.ablation:
            cfg = dataclasses.replace(
                base, run=dataclasses.replace(base.run, dir=str(out / "constant-lambda")),
                semem=dataclasses.replace(base.semem, calibrator="constant", sweep=(), random_control=False,
                                          extra_models=()))
            ablation = finished_or_run(cfg, out / "constant-lambda", rerun=args.rerun,
                                       banner="== constant-λ ablation (main model, δ = semem.threshold)")
            keep_run(out / "constant-lambda", results / "constant-lambda")

    summary = analyse(report, pretrain, ablation, args.resamples)
    summary |= {"config": args.config, "machine": machine_summary(), "pretraining": pretrain,
                "stream_seconds": time_breakdown(results / "semem" / "metrics.jsonl"),
                "ablation_ran": ablation is not None, "semem_wall_seconds": report["wall_seconds"],
                "invocations": report.get("invocations")}
    if not args.summarize:
        summary["this_invocation_seconds"] = time.monotonic() - started
    print(f"\n{summary['machine']}; {args.config}")
    print_summary(summary)
    for tag, parts in summary["stream_seconds"].items():
        print(f"stream {tag}: " + ", ".join(f"{k} {v / 60:.1f} min" if k != "chunks" else f"{v} chunks"
                                          for k, v in parts.items()))
    for tag, p in pretrain.items():
        print(f"pre-training {tag} ({p['wall_seconds'] / 60:.1f} min): "
              + ", ".join(f"{s}: {v:.1f}" for s, v in zip(p["curve"]["steps"], p["curve"]["perplexity"])))
    if pretrain:
        plot_budget(pretrain, results / "pretraining_budget.png")
    plot_intervals(summary, results / "semem_vs_randmem.png")
    plot_growth(report, results / "memory_growth.png")
    plot_quarters(summary, results / "admission_quarters.png")
    write_json(str(results / "summary.json"), summary)
    print(f"\nwrote {results / 'summary.json'} and plots in {results}/")


if __name__ == "__main__":
    main()
