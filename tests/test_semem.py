"""Selective memorization and the λ calibrator on controlled inputs, and the SeMem run end to end."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxcl.memory import Datastore
from jaxcl.memory.calibrator import CalibrationData, Calibrator, byte_dropout, calibrator_features, fit_calibrator, \
    fit_calibrators, mixture_nll
from jaxcl.memory.selective import ScoredTokens, SelectiveMemory, admission_mask, stream_policies

ROOT = Path(__file__).resolve().parents[1]


def tokens(keys, targets, lm_logp):
    n = len(targets)
    return ScoredTokens(keys=keys.astype(np.float32), targets=targets.astype(np.int32),
                        contexts=np.zeros(n, np.int32), lm_logp=lm_logp.astype(np.float32),
                        lm_conf=np.full(n, 0.2, np.float32), lm_entropy=np.full(n, 3.0, np.float32))


def test_admission_uses_the_memory_as_it_stood_at_the_start_of_the_chunk(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 16)) * 5
    targets = rng.integers(0, 50, 200)
    lm_logp = np.where(rng.random(200) < 0.7, -4.0, -0.5)                 # 70 % hard for the bare LM
    log_freq = np.zeros(50, np.float32)
    store = Datastore.create(tmp_path / "s", dim=16)
    mem = SelectiveMemory(store, "selective", -1.5, 8, Calibrator.initial(0.5, 1.0))
    # Chunk 1 holds every token twice: the memory is empty for the whole chunk, so both copies of each
    # hard token are admitted (decisions never see entries added within the same chunk).
    chunk = tokens(np.concatenate([keys, keys]), np.concatenate([targets, targets]), np.concatenate([lm_logp] * 2))
    stats = mem.memorize(chunk, log_freq)
    assert stats["admitted"] == 2 * int(np.sum(lm_logp < -1.5)) == len(store)
    np.testing.assert_array_equal(admission_mask(chunk.lm_logp, -1.5), chunk.lm_logp < -1.5)
    # Chunk 2 repeats the text: each hard token now has two exact matches (distance 0) with its own
    # value, so p_kNN(gold) ~ 1 and log p = log((1-λ) p_LM + λ) > log 0.5 > δ: nothing is admitted.
    again = mem.memorize(tokens(keys, targets, lm_logp), log_freq)
    assert again["admitted"] == 0 and len(store) == stats["admitted"]
    # Full memorization and the bare LM go through the same code path.
    full = SelectiveMemory(Datastore.create(tmp_path / "f", dim=16), "all", -1.5, 8, Calibrator.initial(0.5, 1.0))
    assert full.memorize(tokens(keys, targets, lm_logp), log_freq)["admitted"] == 200
    none = SelectiveMemory(None, "none", -1.5, 8, Calibrator.initial(0.5, 1.0))
    logp, records = none.logprobs(tokens(keys, targets, lm_logp), log_freq)
    np.testing.assert_allclose(logp, lm_logp)
    assert records is None


def test_random_memorization_admits_a_seeded_subset_of_the_requested_size(tmp_path):
    rng = np.random.default_rng(1)
    chunk = tokens(rng.normal(size=(300, 8)), rng.integers(0, 40, 300), np.full(300, -2.0))
    log_freq = np.zeros(40, np.float32)

    def admitted(seed, size, name):
        mem = SelectiveMemory(Datastore.create(tmp_path / name, dim=8), "random", -1.5, 4, Calibrator.initial(0.5, 1.0))
        stats = mem.memorize(chunk, log_freq, size=size, rng=np.random.default_rng(seed))
        assert stats["admitted"] == len(mem.store) == min(size, 300)
        return mem.store.values.copy(), mem.store.keys.copy()

    a, b, c = admitted(7, 120, "a"), admitted(7, 120, "b"), admitted(8, 120, "c")
    np.testing.assert_array_equal(a[1], b[1])                     # same seed: the same tokens
    assert not np.array_equal(a[1], c[1])                         # another seed: another subset
    rows = {k.tobytes() for k in chunk.keys.astype(np.float16)}
    assert all(k.astype(np.float16).tobytes() in rows for k in a[1])   # every admitted key is one of the chunk's
    assert admitted(0, 1000, "all")[0].shape == (300,)           # capped by the chunk
    mem = SelectiveMemory(Datastore.create(tmp_path / "x", dim=8), "random", -1.5, 4, Calibrator.initial(0.5, 1.0))
    with pytest.raises(ValueError, match="size"):
        mem.memorize(chunk, log_freq)


def test_stream_policies_order_each_semem_before_its_random_control():
    p = stream_policies(-1.5, sweep=(-3, -1.5, -0.5), random_control=True)
    assert list(p) == ["semem", "semem@-3", "semem@-0.5", "full", "randmem", "randmem@-3", "randmem@-0.5"]
    assert [p[n].threshold for n in ("semem", "semem@-3", "semem@-0.5")] == [-1.5, -3.0, -0.5]
    assert p["randmem@-3"].matches == "semem@-3" and p["randmem@-3"].admit == "random" and p["full"].admit == "all"
    assert list(stream_policies(-1.5)) == ["semem", "full"]


def test_calibration_pool_is_capped_by_a_seeded_subset(tmp_path):
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(400, 8))
    mem = SelectiveMemory(Datastore.create(tmp_path / "s", dim=8), "all", -1.5, 4, Calibrator.initial(0.5, 1.0))
    mem.memorize(tokens(keys[:100], rng.integers(0, 30, 100), np.full(100, -2.0)), np.zeros(30, np.float32))
    for part in np.split(np.arange(100, 400), 3):
        mem.heldout.append(tokens(keys[part], rng.integers(0, 30, 100), np.full(100, -2.0)))
    assert len(mem.calibration_data(np.zeros(30, np.float32))) == 300
    capped = mem.calibration_data(np.zeros(30, np.float32), 64, rng=np.random.default_rng(3))
    again = mem.calibration_data(np.zeros(30, np.float32), 64, rng=np.random.default_rng(3))
    assert len(capped) == 64
    np.testing.assert_array_equal(capped.features, again.features)


def test_pipelined_knn_lm_evaluation_equals_scoring_then_searching(tmp_path):
    import jax

    from jaxcl.memory.selective import memory_eval_logprobs, make_lm_scorer, memory_logprobs, score_sequences
    from jaxcl.models import ModelConfig, build

    cfg = ModelConfig(family="gpt2", vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
    ids = np.random.default_rng(0).integers(0, 64, (11, 9)).astype(np.int32)
    params = build(cfg).init(jax.random.key(0), ids[:1], np.ones((1, 9), np.int32))["params"]
    scorer = make_lm_scorer(cfg)
    tokens = score_sequences(scorer, params, ids, batch=4)
    store = Datastore.create(tmp_path / "s", dim=16)
    store.add(tokens.keys[::2], tokens.targets[::2])
    cal, log_freq = Calibrator.initial(0.3, 2.0), np.zeros(64, np.float32)
    reference = memory_logprobs(tokens, store, cal, 5, log_freq)[0]
    piped = memory_eval_logprobs(scorer, params, ids, store, cal, 5, log_freq, batch=4)     # 3 batches, last one padded
    assert piped.shape == (11 * 8,)
    np.testing.assert_allclose(piped, reference, rtol=1e-6, atol=1e-6)
    assert not np.allclose(piped, tokens.lm_logp)                  # the memory changed the scores


def test_calibrator_learns_when_to_trust_the_memory():
    rng = np.random.default_rng(1)
    n, k = 4000, 16
    dists = np.sort(rng.random((n, k)) * 40 + 5, axis=1).astype(np.float32)
    values = rng.integers(0, 1000, (n, k))
    gold = rng.integers(1000, 2000, n)                 # the memory is wrong ...
    close = rng.random(n) < 0.5
    dists[close, 0] = rng.random(close.sum()) * 0.5    # ... unless the nearest neighbour is very close,
    values[close, 0] = gold[close]                     # and then it is right
    lm_logp = np.full(n, -3.0, np.float32)
    feats = calibrator_features(np.full(n, 0.1, np.float32), np.full(n, 4.0, np.float32), np.zeros(n, np.float32),
                                dists, values)
    assert feats.shape == (n, 23)
    data = CalibrationData(feats, lm_logp, dists, values == gold[:, None])
    init = Calibrator.initial(0.25, 10.0)

    def nll(c):
        return float(mixture_nll(c.mode, c.hidden, c.params, (feats - c.mean) / c.std, lm_logp, dists,
                                 values == gold[:, None]))

    constant = fit_calibrator(data, "constant", init=init, steps=150, lr=3e-2)
    mlp = fit_calibrator(data, "mlp", init=init, steps=150, lr=3e-3)
    assert nll(mlp) < nll(constant) < nll(init)
    lam = mlp.lam(feats)
    assert lam[close].mean() > 0.8 and lam[~close].mean() < 0.2


def test_calibrators_fitted_together_equal_fits_alone():
    """fit_calibrators (one vmapped, scanned fit for several memories) gives each memory the calibrator
    fit_calibrator gives it alone; held-out data of different shapes is refused with both shapes named."""
    rng = np.random.default_rng(2)
    n, k = 512, 8

    def data(shift):
        dists = np.sort(rng.random((n, k)) * 10 + shift, axis=1).astype(np.float32)
        values = rng.integers(0, 5, (n, k))
        feats = calibrator_features(rng.random(n).astype(np.float32), rng.random(n).astype(np.float32),
                                    rng.random(n).astype(np.float32), dists, values)
        return CalibrationData(feats, np.log(rng.random(n)).astype(np.float32), dists, values == 0)

    datas = [data(0.0), data(3.0), data(6.0)]
    inits = [Calibrator.initial(0.25, t) for t in (5.0, 10.0, 20.0)]
    for mode, lr in (("mlp", 3e-3), ("constant", 3e-2)):
        together = fit_calibrators(datas, mode, inits=inits, steps=5, lr=lr, batch=128, rng=jax.random.key(7))
        for d, init, cal in zip(datas, inits, together):
            alone = fit_calibrator(d, mode, init=init, steps=5, lr=lr, batch=128, rng=jax.random.key(7))
            np.testing.assert_allclose(cal.lam(d.features), alone.lam(d.features), rtol=1e-4, atol=1e-5)
            assert cal.temperature == pytest.approx(alone.temperature, rel=1e-5)
        assert len({round(c.temperature, 4) for c in together}) == 3        # each memory kept its own T
    with pytest.raises(ValueError, match=r"differ in shape.*\(256, 8, 23\).*\(512, 8, 23\)"):
        fit_calibrators([datas[0], CalibrationData(*(a[:256] for a in dataclasses.astuple(datas[1])))], "mlp",
                        inits=inits[:2], steps=1)


def test_byte_dropout_is_unbiased_inverted_dropout():
    x = jnp.ones((64, 256))
    y = np.asarray(byte_dropout(x, 0.2, jax.random.key(0)))
    keep = 205 / 256
    assert set(np.unique(y)) == {0.0, np.float32(1 / keep)}
    assert abs((y > 0).mean() - keep) < 0.01                      # 16,384 units: 4 sigma is 0.012
    assert abs(y.mean() - 1.0) < 0.015
    assert not np.array_equal(y, np.asarray(byte_dropout(x, 0.2, jax.random.key(1))))
    with pytest.raises(ValueError, match="multiple of 4"):
        byte_dropout(jnp.ones((2, 6)), 0.2, jax.random.key(0))


def test_distinct_value_features():
    dists = np.arange(12, dtype=np.float32)[None].repeat(2, 0)
    values = np.array([[5, 5, 6, 5, 7, 8, 8, 9, 1, 2, 3, 4], [1] * 12])
    f = calibrator_features(np.ones(2), np.ones(2), np.ones(2), dists, values)
    np.testing.assert_allclose(np.exp(f[0, 13:]), [1, 1, 2, 2, 3, 4, 4, 5, 6, 7])
    np.testing.assert_allclose(np.exp(f[1, 13:]), 1)
    np.testing.assert_allclose(f[0, 3:13], np.log1p(np.arange(10)), rtol=1e-6)


TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
        "data.seq_len=64", "data.batch_size=8", "data.eval_batches=2", "data.domains=[bible,wordnet]",
        "train.pretrain_steps=30", "optim.warmup_steps=5", "optim.lr=1e-2", "checkpoint.async_save=false",
        "semem.chunk_tokens=1024", "semem.chunks_per_domain=2", "semem.heldout_tokens=256", "semem.eval_tokens=256",
        "semem.calibrator_steps=10", "semem.extra_models=[{d_model: 48}]", "semem.index_options={segment_rows: 1500}",
        "semem.sweep=[]", "semem.random_control=true", "semem.calibrator_max_tokens=512",
        # the LMs learn the pasts of bible and wordnet; the stream is wordnet's future, then an unseen domain
        "semem.stream_source=embedded:unseen", "semem.stream_domains=[wordnet,gnuinfo]"]
POLICIES = ("semem", "full", "randmem")
CHUNKS = 4                                           # 2 streamed domains x semem.chunks_per_domain


# The runs below see 2 fake CPU devices, not the suite's 8 (tests/conftest.py): still a data-parallel mesh, at a
# fraction of the cost of 8 device programs on a 2-core machine (one tiny run: ~48 s -> ~37 s). SeMem on the
# 8-device mesh is run by tests/test_init_from.py (test_semem_freezes_the_loaded_model, in-process).
ENV = dict(os.environ, XLA_FLAGS=" ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=2"]))


def semem(*args, run_dir, wait=True, xla_cache=None):
    """`jaxcl run configs/semem/demo.yaml TINY ARGS`; `xla_cache`: a persistent compilation cache directory."""
    cmd = [sys.executable, "-m", "jaxcl.cli", "run", "configs/semem/demo.yaml", *TINY, *args, f"run.dir={run_dir}"]
    env = ENV if xla_cache is None else dict(ENV, JAX_COMPILATION_CACHE_DIR=str(xla_cache),
                                             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """The module's persistent compilation cache: the uninterrupted run fills it, and the interrupted runs and
    their resume (the same programs) load what it compiled instead of compiling it again."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, xla_cache):
    """A tiny SeMem run; its pre-trained LMs live in a shared semem.pretrain_dir (reused by the kill test)."""
    pretrain = tmp_path_factory.mktemp("pretrain")
    run_dir = tmp_path_factory.mktemp("semem")
    out = semem(f"semem.pretrain_dir={pretrain}", run_dir=run_dir, xla_cache=xla_cache)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir, pretrain, json.loads((run_dir / "report.json").read_text())


def test_semem_run_writes_the_report_contract(uninterrupted):
    tmp_path, pretrain, report = uninterrupted
    # Each LM was pre-trained by the shared loop on the mixture of the pasts: the first half of each
    # pre-training domain's training documents (the stream reads the second half).
    for run in sorted(pretrain.glob("pretrain-*")):
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["data"]["train_documents"] == [0.0, 0.5] and saved["data"]["domains"] == ["bible", "wordnet"]
        assert saved["run"]["method"] == "joint"
    assert report["method"] == "semem" and report["metric"] == "perplexity"
    assert report["stages"] == ["wordnet", "gnuinfo"] and report["eval_on"] == ["bible", "wordnet", "gnuinfo"]
    assert report["pretrain_domains"] == ["bible", "wordnet"] and report["past_fraction"] == 0.5
    assert np.array(report["matrix"], float).shape == (2, 3) and np.isfinite(report["matrix"]).all()
    memory = report["memory"]
    assert len(memory) == CHUNKS and set(memory[0]) >= {"tokens_seen", "memory_size", "admitted_rate"}
    per_chunk = 1024 // 64 * 63
    assert [m["tokens_seen"] for m in memory] == [per_chunk * (i + 1) for i in range(CHUNKS)]
    sizes = np.cumsum([m["tokens_admitted"] for m in memory])
    assert [m["memory_size"] for m in memory] == sizes.tolist()
    for model in report["models"]:
        full = model["memory"]["full"]
        assert [m["memory_size"] for m in full] == [per_chunk * (i + 1) for i in range(CHUNKS)]
        # RandMem admits, chunk by chunk, exactly as many tokens as SeMem did
        assert [m["tokens_admitted"] for m in model["memory"]["randmem"]] == \
            [m["tokens_admitted"] for m in model["memory"]["semem"]]
        assert model["memory_size"]["semem"] <= model["memory_size"]["full"]
        assert 0 < model["memory_ratio"] <= 1 and np.isfinite(model["perplexity_ratio"])
        assert set(model["final_perplexity"]) == {"semem", "full"} and set(model["lm_only_perplexity"]) == \
            {"bible", "wordnet", "gnuinfo"}
        assert set(model["policies"]) == set(POLICIES) and model["groups"] == \
            {"stream": ["wordnet", "gnuinfo"], "future": ["wordnet"], "unseen": ["gnuinfo"]}
        for name, policy in model["policies"].items():  # test perplexities of every domain, below the bare LM's
            assert set(policy["test_perplexity"]) == {"bible", "wordnet", "gnuinfo"}
            assert policy["test"]["stream"] < model["lm_only"]["test"]["stream"]
            for d, ppl in policy["test_perplexity"].items():   # per-sequence NLL: one per 64-token test sequence
                nll = np.asarray(model["test_nll"][name][d])
                assert len(nll) == 256 // 64 and ppl == pytest.approx(np.exp(nll.mean()), rel=1e-5)
        for d, ppl in model["lm_only_test_perplexity"].items():
            assert ppl == pytest.approx(np.exp(np.mean(model["lm_only_test_nll"][d])), rel=1e-5)
        assert model["seconds"]["stream"] > 0 and model["seconds"]["test"] > 0
        assert model["chosen_threshold"] in (None, -1.5)
    assert len(report["models"]) == 2 and report["models"][1]["architecture"]["d_model"] == 48
    assert any("semem below randmem" in key for key in report["acceptance"])
    store = Datastore.open(tmp_path / report["models"][0]["tag"] / "semem" / "datastore")
    assert len(store) == memory[-1]["memory_size"] and store.manifest["backend"] == "scann"
    for name in ("config.yaml", "metrics.jsonl", "memory_growth.png", "perplexity_per_chunk.png",
                 "admitted_rate.png", "perplexity_matrix.png", *(f"tradeoff-{m['tag']}.png" for m in report["models"])):
        assert (tmp_path / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "semem_chunk" for r in records) == 2 * len(POLICIES) * CHUNKS   # models x policies x chunks
    timed = [r for r in records if r["kind"] == "semem_chunk_seconds"]    # where each chunk's time went
    assert len(timed) == 2 * CHUNKS and all(r["seconds"]["total"] >= r["seconds"]["calibrate (all policies)"] > 0
                                            for r in timed)
    assert all(("evaluate semem" in r["seconds"]) == (r["chunk"] == 1) for r in timed)   # at each domain's end
    assert report["wall_seconds"] == sum(i["wall_seconds"] for i in report["invocations"]) > 0


def _chunk_records(run_dir):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, (line for line in lines if line.endswith("}")))
            if r["kind"] == "semem_chunk"]


def _kill_after(run_dir, pretrain, model, n, xla_cache):
    """Start the run and SIGKILL it once `n` chunk records of `model` are in metrics.jsonl: inside the
    chunk loop, typically after the next policy's rows were added but before the chunk completed.
    `xla_cache`: a copy of the compilation cache, private to this run (a kill can cut a cache write short)."""
    proc = semem(f"semem.pretrain_dir={pretrain}", run_dir=run_dir, wait=False, xla_cache=xla_cache)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and \
            sum(r["model"] == model for r in _chunk_records(run_dir)) < n:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_semem_killed_mid_stream_resumes_to_the_same_memories_and_numbers(uninterrupted, xla_cache, tmp_path,
                                                                          tmp_path_factory):
    _, pretrain, reference = uninterrupted
    tags = [m["tag"] for m in reference["models"]]
    caches = [shutil.copytree(xla_cache, tmp_path_factory.mktemp("xla_cache_copy") / "cache") for _ in range(2)]
    _kill_after(tmp_path, pretrain, tags[0], len(POLICIES) + 1, caches[0])   # mid chunk 1 of the main model
    assert not (tmp_path / "report.json").exists()
    _kill_after(tmp_path, pretrain, tags[1], len(POLICIES) + 1, caches[1])   # resumed, killed mid chunk 1 of model 2
    assert not (tmp_path / "report.json").exists()
    out = semem(f"semem.pretrain_dir={pretrain}", run_dir=tmp_path, xla_cache=xla_cache)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    resumed = json.loads((tmp_path / "report.json").read_text())
    accounting = ("wall_seconds", "invocations")

    def numbers(report):           # everything but where the time went (per model "seconds": wall, per invocation)
        return {k: v if k != "models" else [{n: x for n, x in m.items() if n != "seconds"} for m in v]
                for k, v in report.items() if k not in accounting}

    assert numbers(resumed) == numbers(reference)        # memory sizes, perplexities, matrix, per-sequence NLL
    # Every invocation that did work is accounted for (the pre-training is shared, so each is short).
    assert len(resumed["invocations"]) == 3
    assert resumed["wall_seconds"] == sum(i["wall_seconds"] for i in resumed["invocations"])
    # Each chunk is recorded once, though two invocations were killed after logging part of a chunk.
    chunks = [(r["model"], r["policy"], r["domain"], r["chunk"]) for r in _chunk_records(tmp_path)]
    assert len(chunks) == len(set(chunks)) == 2 * len(POLICIES) * CHUNKS
    for model in reference["models"]:
        for policy in POLICIES:
            store = Datastore.open(tmp_path / model["tag"] / policy / "datastore")
            assert len(store) == model["policies"][policy]["memory_size"]
    # A rerun of the finished run changes no file; a config that changes what is trained is refused.
    before = _snapshot(tmp_path)
    again = semem(f"semem.pretrain_dir={pretrain}", run_dir=tmp_path)
    assert again.returncode == 0 and f"{tmp_path} holds a finished run" in again.stdout and "report.json" in again.stdout
    changed = semem(f"semem.pretrain_dir={pretrain}", "semem.threshold=-1.0", run_dir=tmp_path)
    assert changed.returncode == 2 and "semem.threshold" in changed.stderr
    assert _snapshot(tmp_path) == before


def test_semem_config_errors_name_the_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxcl.cli", "run", "configs/semem/demo.yaml", *TINY,
                          "semem.stream_domains=[pydoc]", f"run.dir={tmp_path}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "semem.stream_domains" in out.stderr
    out = subprocess.run([sys.executable, "-m", "jaxcl.cli", "run", "configs/semem/demo.yaml", "semem.lam=2",
                          f"run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "semem.lam" in out.stderr


def test_generate_decodes_with_the_runs_memory_and_calibrator(uninterrupted, tmp_path, capsys):
    """A finished SeMem run decodes with its frozen LM, its selective memory and its final calibrator: the first
    step equals the kNN-LM mixture of a full forward and the store's (ScaNN) search with that calibrator's λ and T
    (against an exhaustive search: tests/test_generate.py on an exact store)."""
    from test_generate import reference_knn_step

    from jaxcl import cli
    from jaxcl.data.tokenizer import load_tokenizer
    from jaxcl.generate import generate
    from jaxcl.inference import open_decoder
    from jaxcl.memory.decoding import KnnMemory

    run_dir, _, report = uninterrupted
    memory = KnnMemory.from_run(run_dir)
    assert len(memory.store) == report["models"][0]["memory_size"]["semem"] and memory.calibrator is not None
    import yaml
    semem_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["semem"]
    assert (memory.k, memory.lam) == (semem_cfg["k"], semem_cfg["lam"])
    dec = open_decoder(str(run_dir), memory=True)
    assert dec.memory.source == memory.source and dec.model_cfg.d_model == 32
    tok = load_tokenizer(dec.tokenizer)
    ids = np.asarray([tok.tokenizer.encode("And God said unto Moses", add_special_tokens=False).ids])
    out = generate(dec.model_cfg, dec.params, ids, np.ones_like(ids), max_new_tokens=3, eos_token_id=[],
                   memory=dec.memory, return_logprobs=True)
    want = reference_knn_step(dec.model_cfg, dec.params, dec.memory, ids, np.ones_like(ids), exhaustive=False)
    # 5e-4, not test_generate's 1e-5: this LM is trained and its keys are far apart (squared distances in the
    # hundreds), so the cached prefill's float32 round-off in a key (~1e-6 relative) moves log-weights by ~1e-4
    np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), want, atol=5e-4, rtol=0)
    full = KnnMemory.from_run(run_dir, policy="full")
    assert len(full.store) == report["models"][0]["memory_size"]["full"]
    assert KnnMemory.from_run(run_dir, model=1).store.dim == 48
    capsys.readouterr()
    assert cli.main(["generate", str(run_dir), "--memory", "--prompt", "And God said", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("And God said")
    # the d=48 model's memory with the d=32 LM: one line, nothing printed
    assert cli.main(["generate", str(run_dir), "--memory", str(run_dir / report["models"][1]["tag"] / "semem" /
                                                                "datastore"), "--prompt", "x"]) == 2
    captured = capsys.readouterr()
    assert "width 48" in captured.err and len(captured.err.strip().splitlines()) == 1 and not captured.out
