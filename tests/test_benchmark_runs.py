"""`benchmarks/common.finished_or_run`: reuse a finished run only with the same config, never delete an
unfinished (resumable) run directory, restart a finished run only when asked."""

import importlib.util
import json
from pathlib import Path

import pytest

from jaxcl.config import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def finished_or_run(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_run_config(cfg):               # what a runner leaves behind: the config, then the report
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        report = {"seed": cfg.run.seed, "call": len(calls)}
        (run_dir / "report.json").write_text(json.dumps(report))
        calls.append(cfg.run.seed)
        return report

    monkeypatch.setattr("jaxcl.runs.run_config", fake_run_config)
    return module.finished_or_run, calls


def test_finished_runs_are_reused_only_with_the_same_config(tmp_path, finished_or_run):
    run, calls = finished_or_run
    cfg = load_config(ROOT / "configs" / "slm" / "demo.yaml", [f"run.dir={tmp_path / 'r'}"])
    assert run(cfg, tmp_path / "r", rerun=False) == {"seed": 0, "call": 0}
    assert run(cfg, tmp_path / "r", rerun=False) == {"seed": 0, "call": 0} and calls == [0]   # reused
    other = load_config(ROOT / "configs" / "slm" / "demo.yaml", [f"run.dir={tmp_path / 'r'}", "run.seed=1"])
    with pytest.raises(SystemExit, match="different config"):
        run(other, tmp_path / "r", rerun=False)
    assert run(other, tmp_path / "r", rerun=True) == {"seed": 1, "call": 1}                    # restarted


def test_an_unfinished_run_directory_is_kept_for_resume(tmp_path, finished_or_run):
    run, calls = finished_or_run
    cfg = load_config(ROOT / "configs" / "slm" / "demo.yaml", [f"run.dir={tmp_path / 'r'}"])
    checkpoint = tmp_path / "r" / "checkpoints" / "100" / "state"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("resumable")
    run(cfg, tmp_path / "r", rerun=True)          # no report yet: nothing to restart, nothing deleted
    assert checkpoint.read_text() == "resumable" and calls == [0]


def test_slm_orders_summary_intervals_and_acceptance():
    """`benchmarks/slm_orders.py` aggregates run reports: means with bootstrap intervals over runs, the gap to
    multitask paired within the runs that have it, and issue 17's checks from those numbers."""
    import sys

    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("slm_orders", ROOT / "benchmarks" / "slm_orders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def report(final_a, retrieval, multitask=None):
        r = {"metric": "accuracy", "stages": ["a", "b"], "eval_on": ["a", "b"], "retrieval_accuracy": retrieval,
             "matrix": [[80.0, None], [final_a, 70.0]], "intervals": {"forgetting": [0.0, 1.0]}, "baselines": {}}
        if multitask is not None:
            r["baselines"] = {"multitask": {"stages": ["multitask"], "matrix": [[multitask, 70.0]]},
                              "sequential": {"stages": ["a", "b"], "matrix": [[80.0, None], [10.0, 72.0]]}}
        return r

    runs = {"order0-seed0": report(79.6, 98.0, multitask=80.0), "order1-seed0": report(80.0, 97.0, multitask=79.0),
            "order0-seed1": report(79.2, 99.0)}
    stats = module.summary(runs)
    assert stats["slm"]["forgetting"]["n"] == 3 and abs(stats["slm"]["forgetting"]["mean"] - 0.4) < 1e-9
    assert stats["slm"]["forgetting"]["low"] <= 0.4 <= stats["slm"]["forgetting"]["high"] <= 0.8
    assert stats["slm"]["retrieval"]["mean"] == 98.0 and stats["slm"]["worst_forgetting"] == pytest.approx(0.8)
    # paired gap: (79.8 - 75) and (75 - 74.5) over the two runs with multitask
    assert stats["slm"]["gap_to_multitask"]["n"] == 2
    assert stats["slm"]["gap_to_multitask"]["mean"] == pytest.approx(((74.8 - 75.0) + (75.0 - 74.5)) / 2)
    assert stats["sequential"]["forgetting"]["mean"] == 70.0 and stats["multitask"]["average"]["n"] == 2
    checks = module.acceptance(stats)
    assert checks == {"slm_forgetting_mean_le_0.5": True, "slm_forgetting_upper_le_1.0": True,
                      "slm_retrieval_ge_97": True, "slm_within_1_point_of_multitask": True,
                      "sequential_forgets_visibly": True}
    rows = module.run_rows(runs)
    assert rows[0][4] == "[0.00, 1.00]" and rows[0][7:] == ["multitask 0.00", "sequential 70.00"]
    assert len(module.summary_rows(stats)) == 3
    assert "valid_average" not in stats["slm"]
    # strengths are chosen on the final validation average (rows with a complete last validation row)
    runs["order0-seed0"]["valid_matrix"] = [[70.0, None], [60.0, 50.0]]
    runs["order1-seed0"]["valid_matrix"] = [[70.0, None], [60.0, None]]
    assert module.summary(runs)["slm"]["valid_average"]["mean"] == 55.0
    assert module.summary(runs)["slm"]["valid_average"]["n"] == 1


def test_slm_orders_borrows_slm_only_from_the_same_config(tmp_path):
    """--slm-from: a finished SLM run is borrowed when only slm.baselines and the strategies section differ
    (what only the baseline rows read); any other difference is refused naming the key. --baselines-from
    (repeatable) takes each row from the one source that ran it, checking only that row's strategy section."""
    import dataclasses
    import sys

    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("slm_orders", ROOT / "benchmarks" / "slm_orders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = load_config(ROOT / "configs" / "slm" / "demo.yaml", [f"run.dir={tmp_path / 'run'}"])
    (tmp_path / "old").mkdir()
    save_config(cfg, tmp_path / "old" / "config.yaml")
    with pytest.raises(SystemExit, match="has no finished run"):
        module.borrowed_slm(cfg, tmp_path / "old")
    (tmp_path / "old" / "report.json").write_text(json.dumps({"matrix": [[1.0]]}))
    new = load_config(ROOT / "configs" / "slm" / "demo.yaml",
                      [f"run.dir={tmp_path / 'run'}", "slm.baselines=[ewc,olora]", "strategies.ewc.strength=7"])
    assert module.borrowed_slm(new, tmp_path / "old")["matrix"] == [[1.0]]
    other = dataclasses.replace(new, slm=dataclasses.replace(new.slm, steps=new.slm.steps + 1))
    with pytest.raises(SystemExit, match="slm.steps"):
        module.borrowed_slm(other, tmp_path / "old")
    # the old rows beside them (--baselines-from with --slm-from): the strategies section matters only to
    # strategy rows
    (tmp_path / "old" / "report.json").write_text(json.dumps({"baselines": {"sequential": 1, "ewc": 2}}))
    with pytest.raises(SystemExit, match="strategies.ewc.strength"):
        module.borrowed_baselines(new, tmp_path / "old", ["*"])
    assert module.borrowed_baselines(new, tmp_path / "old", ["sequential"]) == {"sequential": 1}
    # one table from several sources (repeatable --baselines-from): a baselines-only strategy run
    # (config.yaml + baselines/<row>.json) whose other strategies' sections differ from ours
    strat = tmp_path / "ewc-7"
    (strat / "baselines").mkdir(parents=True)
    save_config(load_config(ROOT / "configs" / "slm" / "demo.yaml",
                            ["slm.baselines=[ewc]", "strategies.ewc.strength=7", "strategies.olora.strength=9"]),
                strat / "config.yaml")
    (strat / "baselines" / "ewc.json").write_text(json.dumps({"matrix": [[2.0]]}))
    (tmp_path / "old" / "report.json").write_text(json.dumps({"baselines": {"sequential": 1}}))
    rows, used = module.borrowed_rows(new, [tmp_path / "old", strat], ["*"])
    assert rows == {"sequential": 1, "ewc": {"matrix": [[2.0]]}} and used == sorted([str(tmp_path / "old"), str(strat)])
    assert module.borrowed_rows(new, [strat], ["ewc"])[0] == {"ewc": {"matrix": [[2.0]]}}
    weaker = load_config(ROOT / "configs" / "slm" / "demo.yaml", ["slm.baselines=[ewc]"])
    with pytest.raises(SystemExit, match="strategies.ewc.strength"):
        module.borrowed_rows(weaker, [strat], ["ewc"])
    (strat / "baselines" / "sequential.json").write_text(json.dumps({"matrix": [[3.0]]}))
    with pytest.raises(SystemExit, match="the sequential row is in both"):
        module.borrowed_rows(new, [tmp_path / "old", strat], ["*"])
    with pytest.raises(SystemExit, match=r"no source ran the baselines \['lwf'\]"):
        module.borrowed_rows(new, [tmp_path / "old"], ["sequential", "lwf"])
    with pytest.raises(SystemExit, match="has no finished run"):
        module.borrowed_rows(new, [tmp_path], ["*"])


def test_a_timing_run_on_an_unsteady_machine_is_marked_suspect(monkeypatch):
    """`common.Steadiness` flags a run whose matmul rate moved by more than 15 % between its start and end, or
    that lost more than 2 % of its CPU time to the hypervisor (steal); a steady run is not flagged."""
    spec = importlib.util.spec_from_file_location("bench_common_steady", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    real_jiffies = common._cpu_jiffies

    def machine(rates, jiffies):
        rates, jiffies = iter(rates), iter(jiffies)
        monkeypatch.setattr(common, "matmul_peak", lambda repeats: next(rates))
        monkeypatch.setattr(common, "_cpu_jiffies", lambda: next(jiffies))
        return common.Steadiness(repeats=1).finish()

    steady = machine([(190e9, 150e9), (180e9, 140e9)], [(0, 1000), (5, 2000)])      # -5 %, 0.5 % steal
    assert not steady["suspect"] and "SUSPECT" not in steady["line"]
    assert steady["rate_change"] == pytest.approx(180 / 190 - 1) and steady["steal_share"] == pytest.approx(0.005)
    halved = machine([(106e9, 107e9), (192e9, 150e9)], [(0, 1000), (0, 2000)])       # the peak doubled: void
    assert halved["suspect"] and "SUSPECT" in halved["line"]
    stolen = machine([(190e9, 150e9), (190e9, 150e9)], [(0, 1000), (50, 2000)])      # 5 % stolen
    assert stolen["suspect"] and stolen["steal_share"] == pytest.approx(0.05)
    unknown = machine([(190e9, 150e9), (185e9, 150e9)], [None, None])                # no /proc/stat
    assert not unknown["suspect"] and unknown["steal_share"] is None and "unknown" in unknown["line"]
    counters = real_jiffies()                                                       # this machine's own counters
    assert counters is None or 0 <= counters[0] < counters[1]


def test_attention_benchmark_sides_agree_with_torch_sdpa(tmp_path):
    """`benchmarks/attention.py` at a tiny size: every jaxcl side (full xla, blocked under autodiff, blocked with
    its FlashAttention-style VJP, a ragged last block) gives torch SDPA's output and q/k/v gradients."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    out = tmp_path / "attention.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--sizes", "2x40", "--heads", "2",
                    "--head-dim", "8", "--block", "16", "--rounds", "2", "--repeats", "1", "--threads", "1",
                    "--json", str(out)], check=True, cwd=tmp_path, capture_output=True, timeout=600)
    (record,) = json.loads(out.read_text())["results"]
    assert (record["batch"], record["seq"]) == (2, 40)
    for side in ("xla", "blocked (autodiff)", "blocked"):
        out_diff, grad_diff = record[side]["diff_to_torch"]
        assert out_diff < 1e-5 and grad_diff < 1e-4, (side, out_diff, grad_diff)
        assert len(record["seconds_per_call"][side]) == 2


def _benchmark_module(name: str):
    """benchmarks/<name>.py as a module (the repository root on sys.path, as when it runs as a script)."""
    import sys

    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _semem_stream_module():
    return _benchmark_module("semem_stream")


def _semem_model(tag, params, lm_test, shift, sizes, quarters, chosen="semem@-3"):
    """A report.json model entry: one future domain `f` and one unseen `u`, 40 test sequences each; SeMem's
    per-sequence NLL is RandMem's minus `shift` (per δ), full memorization's is RandMem's minus 0.01."""
    import numpy as np

    rng = np.random.default_rng(params)
    base = {d: rng.normal(5.0, 0.8, size=40) for d in ("f", "u")}
    nll = {"full": {d: (v - 0.01).tolist() for d, v in base.items()}}
    policies = {"full": {"admit": "all", "threshold": None, "memory_size": 1000}}
    for delta, name in ((-1.5, "semem"), (-3.0, "semem@-3")):
        suffix = name[len("semem"):]
        nll[name] = {d: (v - shift[delta]).tolist() for d, v in base.items()}
        nll["randmem" + suffix] = {d: v.tolist() for d, v in base.items()}
        policies[name] = {"admit": "selective", "threshold": delta, "memory_size": sizes[delta]}
        policies["randmem" + suffix] = {"admit": "random", "threshold": delta, "memory_size": sizes[delta]}
    for name, p in policies.items():
        ppl = {d: float(np.exp(np.mean(nll[name][d]))) for d in ("f", "u")}
        q = quarters.get(p["threshold"], (1.0, 1.0))
        p.update(admitted_rate=p["memory_size"] / 1000, admitted_rate_future=p["memory_size"] / 1000,
                 valid={"future": ppl["f"], "unseen": ppl["u"], "stream": (ppl["f"] + ppl["u"]) / 2},
                 test={"future": ppl["f"], "unseen": ppl["u"], "stream": (ppl["f"] + ppl["u"]) / 2},
                 rate_first_vs_last_quarter={"f": {"first": q[0], "last": q[1]}, "u": {"first": 1.0, "last": 1.0}})
    return {"tag": tag, "architecture": {"params": params, "d_model": 8, "n_layers": 1},
            "groups": {"future": ["f"], "unseen": ["u"], "stream": ["f", "u"]}, "policies": policies,
            "test_nll": nll, "lm_only_test_nll": {d: (v + 0.5).tolist() for d, v in base.items()},
            "lm_only": {"valid": {"future": lm_test, "unseen": lm_test}, "test": {"future": lm_test, "unseen": lm_test}},
            "chosen": chosen, "chosen_threshold": policies[chosen]["threshold"] if chosen else None}


def test_semem_stream_claims_follow_the_paired_intervals():
    """`benchmarks/semem_stream.py`'s claims: SeMem below RandMem only where the paired interval's upper bound
    is below 0; the chosen δ against full memorization's 5 % and 60 %; the quarter ratio; the larger model's
    admission counted only when it is the better LM (else untested, not failed)."""
    module = _semem_stream_module()
    small = _semem_model("model0-d8", 100, 300.0, {-1.5: 0.05, -3.0: 0.0}, {-1.5: 500, -3.0: 300},
                         {-1.5: (0.6, 0.4), -3.0: (0.5, 0.45)})
    large = _semem_model("model1-d16", 200, 250.0, {-1.5: 0.05, -3.0: -0.04}, {-1.5: 450, -3.0: 320},
                         {-1.5: (0.5, 0.3)}, chosen=None)
    out = module.analyse({"models": [small, large], "pretrain_domains": ["f"]},
                         {"model0-d8": {"curve": {"perplexity": [400.0]}}}, None, resamples=500)
    claims = out["claims"]
    below = claims["model0-d8: SeMem below RandMem of equal size (futures, test, 95 % paired interval)"]
    assert below["-1.5"]["holds"] and below["-1.5"]["interval"][1] < 0 < below["-1.5"]["detectable"]
    assert not below["-3"]["holds"] and below["-3"]["difference"] == 0          # the same NLL: no difference
    worse = claims["model1-d16: SeMem below RandMem of equal size (futures, test, 95 % paired interval)"]["-3"]
    assert not worse["holds"] and worse["interval"][0] > 0
    chosen = claims["model0-d8: δ chosen on validation within 5 % of full at ≤ 60 % memory"]
    assert chosen["memory_fraction"] == 0.3 and chosen["test_ratio"] < 1.05 and chosen["holds"]
    assert chosen["interval"][0] <= chosen["test_ratio"] <= chosen["interval"][1]
    assert not claims["model1-d16: δ chosen on validation within 5 % of full at ≤ 60 % memory"]["holds"]
    rates = claims["model0-d8: admission, last quarter ≤ 0.8 x first quarter of each future domain"]
    assert rates["semem"]["holds_every_future"] and not rates["semem@-3"]["holds_every_future"]   # 0.67, 0.9
    assert rates["semem"]["by_domain"]["f"]["ratio"] == pytest.approx(0.4 / 0.6)
    larger = claims["larger model admits fewer tokens over the whole stream"]
    assert larger["larger_is_better_lm"] and larger["status"] == "does not hold"      # 320 > 300 at δ = -3
    assert larger["by_policy"]["semem"]["fewer"] and not larger["by_policy"]["semem@-3"]["fewer"]
    large["lm_only"]["test"]["future"] = 350.0                                        # now the worse LM
    out = module.analyse({"models": [small, large], "pretrain_domains": ["f"]}, {}, None, resamples=200)
    assert out["claims"]["larger model admits fewer tokens over the whole stream"]["status"].startswith("untested")


def assert_same_results(got, committed, path="summary"):
    """Same structure, same strings, booleans and integers, floats equal to 1e-9 relative: the bootstrap's
    resamples are the same on every machine, but NumPy's float summation order depends on the CPU's SIMD
    width (a committed summary differed from this machine's in the 14th digit)."""
    if isinstance(committed, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(committed), path
        for k in committed:
            assert_same_results(got[k], committed[k], f"{path}/{k}")
    elif isinstance(committed, list):
        assert isinstance(got, list) and len(got) == len(committed), path
        for i, (a, b) in enumerate(zip(got, committed)):
            assert_same_results(a, b, f"{path}[{i}]")
    elif isinstance(committed, float) and not isinstance(got, bool):
        assert got == pytest.approx(committed, rel=1e-9, abs=1e-12), path
    else:
        assert type(got) is type(committed) and got == committed, path


def test_committed_semem_measurement_regenerates_its_summary():
    """The files committed under benchmarks/results/semem-measure/ are enough to recompute every claim the
    docs report (the same paired intervals, to float round-off), and the report's per-sequence NLL agrees with
    its own perplexities."""
    import numpy as np

    module = _semem_stream_module()
    results = ROOT / "benchmarks" / "results" / "semem-measure"
    report = json.loads((results / "semem" / "report.json").read_text())
    committed = json.loads((results / "summary.json").read_text())
    pretrain = {p.stem[len("pretrain-"):]: json.loads(p.read_text()) for p in sorted(results.glob("pretrain-*.json"))}
    ablation = json.loads((results / "constant-lambda" / "report.json").read_text())
    out = module.analyse(report, pretrain, ablation, resamples=10000)
    out = json.loads(json.dumps(out))
    assert_same_results(out["claims"], committed["claims"])
    assert_same_results(out["constant_lambda"], committed["constant_lambda"])
    assert_same_results([m["semem_vs_randmem"] for m in out["models"]], [m["semem_vs_randmem"] for m in committed["models"]])
    for m in report["models"]:
        for name, per_domain in m["test_nll"].items():
            for d, nll in per_domain.items():
                assert len(nll) == 64 and m["policies"][name]["test_perplexity"][d] == \
                    pytest.approx(np.exp(np.mean(nll)), rel=1e-6)


def test_downstream_benchmark_claims_from_synthetic_pieces(tmp_path):
    """`benchmarks/downstream.py`'s summary: final averages, ELLE - baseline and the prompt ablation paired over
    texts, forgetting = best after learning - final, merged over seeds, from pieces as run_piece leaves them."""
    from jaxcl.config import DownstreamConfig, config_to_dict
    from jaxcl.data.classification import load_task
    from jaxcl.data.corpus import DOMAINS

    module = _benchmark_module("downstream")
    settings = config_to_dict(DownstreamConfig(max_test_texts=40))
    tasks = {d: t for d, t in DownstreamConfig().tasks.items()}
    labels = {t: load_task(t, "test") for t in tasks.values()}
    from jaxcl.downstream.tasks import _subset

    labels = {t: _subset(s, 40, f"{t}/test").labels for t, s in labels.items()}

    def piece(method, seed, variants):
        d = tmp_path / f"{method}-seed{seed}"
        rows = [{"name": f"stage{i}", "label": f"after {dom}", "spec": "x", "stage": i, "step": i,
                 "trained": list(DOMAINS[:i + 1]), "identity": "i"} for i, dom in enumerate(DOMAINS)]
        (d / "downstream").mkdir(parents=True)
        (d / "downstream" / "downstream.json").write_text(json.dumps({"rows": rows, "settings": settings,
                                                                       "lr": {t: 1e-3 for t in labels}}))
        (d / "piece.json").write_text(json.dumps({"method": method, "seed": seed, "seconds": 60.0}))
        for variant, right_at_end in variants.items():
            for i, dom in enumerate(DOMAINS):
                for domain, task in tasks.items():
                    if DOMAINS.index(domain) > i:
                        continue
                    y = labels[task]
                    right = right_at_end if i == len(DOMAINS) - 1 else 1.0
                    k = int(round(right * len(y)))
                    pred = np.concatenate([y[:k], (y[k:] + 1) % 4]).tolist()
                    cell = d / "downstream" / "cells" / variant / f"stage{i}" / task / f"seed{seed}.json"
                    cell.parent.mkdir(parents=True, exist_ok=True)
                    cell.write_text(json.dumps({"row": f"stage{i}", "task": task, "seed": seed, "predictions": pred,
                                                "accuracy": 100.0 * k / len(y),
                                                "checkpoint": {"fingerprint": f"{method}{seed}{i}"}}))

    import numpy as np

    for seed in (0, 1):
        piece("elle", seed, {"prompt": 1.0, "no_prompt": 0.5})
        piece("sequential", seed, {"plain": 0.0})
    out = module.analyse(tmp_path, resamples=300)
    elle, seq = out["methods"]["elle"], out["methods"]["sequential"]
    assert elle["seeds"] == [0, 1] and elle["variant"] == "prompt"
    assert elle["final_average"]["accuracy"]["value"] == 100.0 and seq["final_average"]["accuracy"]["value"] == 0.0
    assert elle["prompt_ablation"]["accuracy"]["value"] == pytest.approx(50.0, abs=1.0)
    assert out["elle_minus"]["sequential"]["accuracy"] == {"value": 100.0, "low": 100.0, "high": 100.0}
    assert seq["forgetting"]["accuracy"]["bible_books"]["value"] == 100.0
    assert elle["forgetting"]["accuracy"]["bible_books"]["value"] == 0.0
    assert out["total_minutes"] == 4.0
    module.plots(out, tmp_path)
    assert (tmp_path / "downstream_final.png").is_file() and (tmp_path / "downstream_forgetting.png").is_file()


COMMITTED_DOWNSTREAM = sorted(p.parent.name for p in (ROOT / "benchmarks" / "results").glob("downstream*/summary.json"))


@pytest.mark.parametrize("folder", COMMITTED_DOWNSTREAM)
def test_the_committed_downstream_summary_is_what_the_committed_pieces_give(folder):
    """`benchmarks/results/downstream*/summary.json` (what docs/downstream.md quotes) regenerates (to float
    round-off) from the committed pieces (their cells' predictions) with the benchmark's own analysis."""
    results = ROOT / "benchmarks" / "results" / folder
    committed = json.loads((results / "summary.json").read_text())
    assert committed["methods"], "no committed downstream pieces"
    assert_same_results(json.loads(json.dumps(_benchmark_module("downstream").analyse(results))), committed)


def test_a_downstream_piece_is_reused_only_with_the_same_pretraining_and_fine_tuning_config(tmp_path):
    """benchmarks/downstream.py never reuses a committed piece made with another config: pre-training keys
    (`incompatible_keys`) and `downstream.*` (caps, grids) both count; run.name / run.dir do not."""
    import dataclasses

    module = _benchmark_module("downstream")
    cfg = load_config(ROOT / "configs" / "elle" / "compare.yaml", [f"run.dir={tmp_path / 'run'}"])
    cfg = module.method_config(cfg, "sequential")
    piece = tmp_path / "sequential-seed0"
    piece.mkdir()
    save_config(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="other", dir="elsewhere")),
                piece / "config.yaml")
    assert module.piece_changes(piece, cfg) == []
    fewer = dataclasses.replace(cfg, downstream=dataclasses.replace(cfg.downstream, max_train_texts=10))
    assert module.piece_changes(piece, fewer) == ["downstream.max_train_texts"]
    longer = module.method_config(load_config(ROOT / "configs" / "elle" / "compare.yaml", ["train.steps=600"]),
                                  "sequential")
    assert "train.stage_steps" in module.piece_changes(piece, longer)


def test_elle_equal_flops_takes_finished_runs_from_results_and_downstream_pieces(tmp_path):
    """benchmarks/elle_equal_flops.py across sessions: a run kept in --results or a downstream piece of the
    same config is taken (run.name / run.dir may differ), another config is refused naming the key; AP and
    AP+ come with intervals over seeds and paired differences to the reference."""
    import dataclasses
    import sys

    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("elle_equal_flops", ROOT / "benchmarks" / "elle_equal_flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"run.dir={tmp_path / 'run'}"])
    piece = tmp_path / "downstream" / "sequential-seed0"
    piece.mkdir(parents=True)
    save_config(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="other", dir="elsewhere")),
                piece / "config.yaml")
    (piece / "report.json").write_text(json.dumps({"summary": {"average": 5.0, "forgetting": 1.0}}))
    assert module.finished_elsewhere(cfg, "sequential-final", 0, [tmp_path / "results"]) is None
    report, where = module.finished_elsewhere(cfg, "sequential-final", 0,
                                              [tmp_path / "results", tmp_path / "downstream"])
    assert where == piece and report["summary"]["average"] == 5.0
    assert module.finished_elsewhere(cfg, "sequential-final", 1, [tmp_path / "downstream"]) is None
    assert module.finished_elsewhere(cfg, "ewc-final", 0, [tmp_path / "downstream"]) is None
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=cfg.train.steps + 1))
    with pytest.raises(SystemExit, match="train.steps"):
        module.finished_elsewhere(longer, "sequential-final", 0, [tmp_path / "downstream"])
    # kept in --results as it finishes, then found there
    kept = module.keep_result(piece, tmp_path / "results", "sequential-final", 0, commit=False)
    assert kept == tmp_path / "results" / "seed0" / "sequential-final"
    assert not kept.with_name("sequential-final.partial").exists()
    assert module.finished_elsewhere(cfg, "sequential-final", 0, [tmp_path / "results"])[1] == kept

    def rep(ap, plus):
        return {"summary": {"average": ap, "forgetting": plus}}

    rows = module.interval_rows({"elle-uniform": {0: rep(10.0, 2.0), 1: rep(12.0, 4.0)},
                                 "sequential-final": {0: rep(30.0, 20.0), 1: rep(34.0, 30.0), 2: rep(1.0, 1.0)}},
                                "elle-uniform")
    ref, seq = rows
    assert ref["ap"]["mean"] == 11.0 and ref["ap_diff"] is None and ref["seeds"] == [0, 1]
    assert seq["ap"]["n"] == 3 and seq["ap_diff"]["n"] == 2 and seq["ap_diff"]["mean"] == 21.0
    assert seq["ap_plus_diff"]["mean"] == 22.0 and seq["ap_plus_diff"]["low"] <= 22.0 <= seq["ap_plus_diff"]["high"]
