"""Continual-learning strategies (jaxcl.strategies) on the shared loop: each against an independent reference,
strength 0 = plain sequential training bit for bit, replay = ELLE's replay, sharded, resumable."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.config import load_config
from jaxcl.models import ModelConfig, abstract_params, init_params
from jaxcl.transforms import grown_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
        "data.seq_len=32", "data.batch_size=8", "data.eval_batches=1", "data.domains=[bible,manpages]",
        "train.pretrain_steps=6", "train.steps=6", "train.log_every=2", "optim.warmup_steps=1",
        "checkpoint.every=0", "checkpoint.async_save=false",
        "strategies.replay.micro_batches=4", "strategies.ewc.fisher_batches=2"]
SMALL = ModelConfig(family="gpt2", vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16)


def _cfg(tmp_path, *overrides):
    return load_config(ROOT / "configs" / "demo.yaml", [*TINY, f"run.dir={tmp_path}", *overrides])


def _tree(rng, like, scale=1.0, positive=False):
    leaves, treedef = jax.tree.flatten(like)
    out = [rng.standard_normal(x.shape).astype(np.float32) * scale for x in leaves]
    return jax.tree.unflatten(treedef, [np.abs(x) if positive else x for x in out])


# ----------------------------------------------------------------------------- each strategy against a reference
def test_ewc_fisher_equals_the_per_sequence_formula():
    """F = 1/N sum_i (grad NLL_i)^2 with NLL_i the mean token NLL of sequence i: the jitted scan against one
    jax.grad call per sequence, squared and averaged in NumPy (float64)."""
    from jaxcl.parallel import make_mesh
    from jaxcl.config import MeshConfig
    from jaxcl.strategies.ewc import make_fisher_fn
    from jaxcl.train.step import make_loss_fn

    params = init_params(SMALL, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (5, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, 7:] = 0                                                     # a padded sequence: fewer scored tokens
    loss_fn = make_loss_fn(SMALL)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params)
    got = make_fisher_fn(loss_fn, mesh, shardings)(params, {"input_ids": ids, "attention_mask": mask})
    want = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
    grad = jax.jit(jax.grad(lambda p, one: loss_fn(p, one, jax.random.key(0), deterministic=True)[0]))
    for i in range(len(ids)):
        g = grad(params, {"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]})
        want = jax.tree.map(lambda w, x: w + np.square(np.asarray(x, np.float64)), want, g)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-12)
    assert all(float(np.min(g)) >= 0 for g in jax.tree.leaves(got)) and sum(float(np.sum(g)) for g in jax.tree.leaves(got)) > 0


def test_ewc_and_distillation_terms_and_their_gradients_equal_numpy():
    from jaxcl.strategies import distillation_kl, ewc_penalty

    rng = np.random.default_rng(1)
    like = {"a": np.zeros((3, 4)), "b": {"c": np.zeros(5)}}
    theta, anchor, fisher = _tree(rng, like), _tree(rng, like), _tree(rng, like, 0.1, positive=True)
    lam = 1e-3
    value, grad = jax.value_and_grad(lambda p: 0.5 * lam * ewc_penalty(p, fisher, anchor))(theta)
    flat = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]        # noqa: E731
    want = 0.5 * lam * sum(np.sum(f * (p - a) ** 2) for p, f, a in zip(flat(theta), flat(fisher), flat(anchor)))
    np.testing.assert_allclose(float(value), want, rtol=1e-6)
    for g, p, f, a in zip(flat(grad), flat(theta), flat(fisher), flat(anchor)):
        np.testing.assert_allclose(g, lam * f * (p - a), rtol=1e-5, atol=1e-12)
    assert float(ewc_penalty(anchor, fisher, anchor)) == 0.0                        # zero at the anchor

    teacher, student = rng.standard_normal((2, 5, 11)) * 3, rng.standard_normal((2, 5, 11)) * 3
    weights = (rng.random((2, 5)) < 0.7).astype(np.float32)
    for temperature in (1.0, 2.5):
        value, grad = jax.value_and_grad(lambda s: distillation_kl(jnp.asarray(teacher, jnp.float32), s,
                                                                   jnp.asarray(weights), temperature))(
            jnp.asarray(student, jnp.float32))

        def softmax(z):
            e = np.exp(z - z.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)

        pt, ps = softmax(teacher / temperature), softmax(student / temperature)
        kl = np.sum(pt * (np.log(pt) - np.log(ps)), -1)
        np.testing.assert_allclose(float(value), temperature ** 2 * np.sum(kl * weights) / weights.sum(), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), temperature * (ps - pt) * weights[..., None] / weights.sum(),
                                   rtol=1e-4, atol=1e-7)
    assert float(distillation_kl(jnp.asarray(teacher), jnp.asarray(teacher), jnp.asarray(weights), 2.0)) == \
        pytest.approx(0.0, abs=1e-6)


def test_agem_projection_is_the_closed_form_and_never_conflicts_with_the_reference():
    from jaxcl.strategies import agem_projection

    rng = np.random.default_rng(2)
    like = {"w": np.zeros((4, 3)), "b": np.zeros(6)}
    tx = agem_projection()
    state = tx.init(like)
    flat = lambda t: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)])  # noqa: E731
    conflicts = 0
    for trial in range(20):
        g, ref = _tree(rng, like), _tree(rng, like)
        out, _ = tx.update(g, state, like, reference_grads=ref)
        gv, rv, ov = flat(g), flat(ref), flat(out)
        if gv @ rv < 0:
            conflicts += 1
            np.testing.assert_allclose(ov, gv - (gv @ rv) / (rv @ rv) * rv, rtol=1e-5, atol=1e-6)
            assert ov @ rv >= -1e-5 * np.linalg.norm(gv) * np.linalg.norm(rv)
        else:                                                            # no conflict: g itself, bit for bit
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)))
    assert 0 < conflicts < 20
    g = _tree(rng, like)
    out, _ = tx.update(g, state, like)                                   # no memory yet: the identity
    assert out is g
    # chained before AdamW it changes nothing without a reference
    base = optax.adamw(1e-2)
    both = optax.chain(agem_projection(), base)
    p = _tree(rng, like)
    u1, _ = base.update(g, base.init(p), p)
    u2, _ = both.update(g, both.init(p), p)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)))


# ----------------------------------------------------------------------------- on the loop
@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Plain sequential training, the reference of the strength-0 runs."""
    from jaxcl.train.loop import ContinualRun

    return ContinualRun(_cfg(tmp_path_factory.mktemp("plain"))).run()


def test_strength_zero_and_an_empty_memory_are_plain_sequential_training_bit_for_bit(plain, tmp_path):
    """EWC and LwF at strength 0 and A-GEM with an empty memory, composed on one run: the same perplexity
    matrix as plain sequential training, exactly (the Fisher pass, the teacher forward, the reference
    gradient and the mirrors in the train state all run; none may change an update)."""
    from jaxcl.data.cache.reader import SubsetRows
    from jaxcl.train.loop import ContinualRun

    run = ContinualRun(_cfg(tmp_path, "run.strategies=[ewc,lwf,agem]", "strategies.ewc.strength=0",
                            "strategies.lwf.strength=0"))
    agem = run.strategies[2]
    agem.memory.banks = {d: SubsetRows(b.rows, np.array([], np.int64)) for d, b in agem.memory.banks.items()}
    report = run.run()
    assert report["matrix"] == plain["matrix"]
    # the extra compute is counted: the Fisher pass after stage 0; the teacher forward and the reference
    # gradient on every step of stage 1
    from jaxcl.train.loop import train_step_flops

    step = train_step_flops(run.cfg.model, 8, 32)
    assert report["train_flops"][0] == pytest.approx(plain["train_flops"][0] + 2 * step)
    assert report["train_flops"][1] == pytest.approx(plain["train_flops"][1] + 6 * (step / 3 + train_step_flops(
        run.cfg.model, 8, 32)))
    penalties = [r for r in _records(tmp_path) if r.get("kind") == "train" and r["stage_index"] == 1]
    assert penalties and all(r["penalty/ewc"] == 0.0 and r["penalty/lwf"] == 0.0 for r in penalties)


def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _AlwaysProject:
    """A-GEM's projection applied whatever the sign of g . g_ref: shows the loop feeds the memory gradient."""

    def gradient_transformation(self, run):
        from jaxcl.strategies.agem import tree_dot

        def update(g, state, params=None, *, reference_grads=None, **extra):
            if reference_grads is None:                                  # stage 0: no memory
                return g, state
            coef = tree_dot(g, reference_grads) / tree_dot(reference_grads, reference_grads)
            return jax.tree.map(lambda x, r: x - coef * r, g, reference_grads), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def test_each_strategy_changes_training_after_stage_0_only(plain, tmp_path):
    from jaxcl.strategies import AGEM
    from jaxcl.train.loop import ContinualRun

    for name in ("ewc", "lwf", "agem"):
        run = ContinualRun(_cfg(tmp_path / name, f"run.strategies=[{name}]", "strategies.ewc.strength=1e6",
                                "strategies.lwf.strength=5"))
        if name == "agem":           # these early LMs' task and memory gradients never conflict (cosine > 0)
            run.strategies = (type("Forced", (_AlwaysProject, AGEM), {})(run.cfg),)
            run.strategies[0].check(run)
        report = run.run()
        assert report["matrix"][0] == plain["matrix"][0], name
        assert report["matrix"][1] != plain["matrix"][1], name
    stage1 = [r for r in _records(tmp_path / "ewc") if r.get("kind") == "train" and r["stage_index"] == 1]
    assert stage1[0]["penalty/ewc"] >= 0 and any(r["penalty/ewc"] > 0 for r in stage1)
    cosines = [r["reference_cosine"] for r in _records(tmp_path / "agem") if r.get("kind") == "train"
               and r["stage_index"] == 1]
    assert len(cosines) == 3 and all(-1 <= c <= 1 for c in cosines)


def test_replay_strategy_replays_exactly_what_elle_replays(tmp_path):
    """Experience replay on a sequential run and ELLE without growth, prompts, warmup or adaptive weights
    (the same memory fraction, ratio and micro-batches) are the same training, bit for bit."""
    from jaxcl.elle.run import ElleRun
    from jaxcl.train.loop import ContinualRun

    memory = ["strategies.replay.memory_fraction=0.2", "strategies.replay.ratio=0.5"]
    replay = ContinualRun(_cfg(tmp_path / "replay", "run.strategies=[replay]", *memory)).run()
    elle = ElleRun(_cfg(tmp_path / "elle", "run.method=elle", "elle.schedule=[]", "elle.prompt_length=0",
                        "elle.warmup_steps=0", "elle.adaptive_every=0", "elle.memory_fraction=0.2",
                        "elle.replay_ratio=0.5", "elle.micro_batches=4")).run()
    assert replay["matrix"] == elle["matrix"]


class _StopAt:
    """Mixin: SIGTERM (preemption) after step `at[1]` of stage `at[0]`."""

    def after_step(self, stage, step, steps, model_cfg, state, shardings):
        super().after_step(stage, step, steps, model_cfg, state, shardings)
        if (stage, step) == self.stop_at:
            import signal

            self._stop["signal"] = signal.SIGTERM


def test_a_composed_sharded_run_resumes_to_the_same_result(tmp_path):
    """EWC + LwF + A-GEM + replay on 8 devices (data 2 x fsdp 2 x tensor 2): preempted at the end of stage 0
    (the carried Fisher), then `jaxcl run` SIGKILLed at a random moment after a checkpoint inside stage 1
    (mirrors and the strategies' host state restored from the last checkpoint, the steps after it redone),
    resumed: the same report as an uninterrupted run."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from jaxcl.train.checkpoint import Checkpointer
    from jaxcl.train.loop import ContinualRun, MetricsLog, Preempted

    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.pretrain_steps=4", "train.steps=8",
            "run.strategies=[ewc,lwf,agem,replay]", "strategies.ewc.strength=1e5", "checkpoint.every=2"]
    reference = ContinualRun(_cfg(tmp_path / "ref", *mesh)).run()
    assert reference["matrix"][1] != reference["matrix"][0]

    class Interrupted(_StopAt, ContinualRun):
        pass

    cfg = _cfg(tmp_path / "cut", *mesh)
    run = Interrupted(cfg)
    run.stop_at = (0, 4)
    stop = {"signal": None}
    ckpt = Checkpointer(tmp_path / "cut" / "checkpoints", cfg.checkpoint)
    with pytest.raises(Preempted):
        run._stop = stop
        run._run(ckpt, MetricsLog(tmp_path / "cut" / "metrics.jsonl"), stop)
    ckpt.close()
    meta = Checkpointer(tmp_path / "cut" / "checkpoints").restore_meta(4)
    assert (meta["stage"], meta["completed"]) == (0, True)
    assert meta["strategy_mirrors"] == {"ewc": ["anchor", "fisher"]}

    # the CLI goes on from the stage-0 checkpoint and is killed between checkpoints of stage 1
    from tests.compile_cache import killable_env

    proc = subprocess.Popen([sys.executable, "-m", "jaxcl.cli", "run", "configs/demo.yaml", *TINY, *mesh,
                             f"run.dir={tmp_path / 'cut'}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=killable_env())
    steps = lambda: sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit())
    deadline = time.time() + 300
    while time.time() < deadline and max(steps()) < 6 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.15))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert max(steps()) >= 6 and not (tmp_path / "cut" / "report.json").exists(), steps()
    meta = Checkpointer(tmp_path / "cut" / "checkpoints").restore_meta(max(steps()))
    assert meta["stage"] == 1 and (meta["completed"] or meta["strategy_mirrors"] == {
        "ewc": ["anchor", "fisher"], "lwf": ["teacher"]}), meta
    resumed = ContinualRun(cfg).run()
    assert resumed["matrix"] == reference["matrix"]
    assert resumed["train_flops"] == pytest.approx(reference["train_flops"])


def test_a_users_strategy_in_one_file(tmp_path, plain):
    """The docs' example (docs/strategies.md): L2 towards the previous stage's weights, written outside jaxcl
    and named by its import path; at strength 0 plain training, at a large strength it holds stage 1 back."""
    import sys

    sys.path.insert(0, str(ROOT / "docs" / "examples"))
    try:
        zero = _cfg(tmp_path / "zero", "run.strategies=[l2_strategy:L2ToPrevious]",
                    "strategies.options={l2: {strength: 0.0}}")
        from jaxcl.train.loop import ContinualRun

        assert ContinualRun(zero).run()["matrix"] == plain["matrix"]
        strong = ContinualRun(_cfg(tmp_path / "strong", "run.strategies=[l2_strategy:L2ToPrevious]",
                                   "strategies.options={l2: {strength: 100.0}}")).run()
        assert strong["matrix"][1] != plain["matrix"][1]
    finally:
        sys.path.remove(str(ROOT / "docs" / "examples"))


def test_lwf_agem_and_ewc_on_a_growing_elle_run(tmp_path):
    """On ELLE (growth, domain prompts, warmup, its own replay): stage 0 trains without the strategies (its step
    has no strategy term; that stage 0 equals the plain run is tested on the sequential loop above); from stage 1 the teacher
    and EWC's anchor are the grown, warmed-up model the stage starts from (both terms start at 0), EWC's Fisher
    went through the growth (non-negative, as in tests/test_grow.py) and A-GEM's reference rows carry their
    domains' prompts."""
    from jaxcl.elle.run import ElleRun

    elle = ["run.method=elle", "elle.schedule=[{d_model: 48, n_heads: 3}]", "elle.warmup_steps=2",
            "elle.micro_batches=4", "elle.adaptive_every=0", "train.log_every=1"]
    run = ElleRun(_cfg(tmp_path / "both", *elle, "run.strategies=[lwf,agem,ewc]", "strategies.lwf.strength=5"))
    batch = run.strategies[1].reference_batch(run, 1, 0, run.cfg.model.replace(num_prompts=2, prompt_length=1))
    assert batch["prompt_ids"].tolist() == [0] * 8                          # stage 1's memory: domain 0's rows
    report = run.run()
    assert report["architectures"][1]["d_model"] == 48
    train = [r for r in _records(tmp_path / "both") if r.get("kind") == "train"]
    assert not any(k.startswith("penalty/") or k == "reference_cosine" for r in train if r["stage_index"] == 0 for k in r)
    stage1 = [r for r in train if r["stage_index"] == 1]
    assert stage1[0]["penalty/lwf"] == pytest.approx(0.0, abs=1e-6) and stage1[-1]["penalty/lwf"] > 0
    assert stage1[0]["penalty/ewc"] == 0.0 and stage1[-1]["penalty/ewc"] > 0
    old_cfg = run._grown_from[1]
    new_cfg = grown_config(old_cfg, method=run.cfg.elle.grow_method, d_model=48, n_heads=3)
    fisher = run.grow_importance(1, _tree(np.random.default_rng(0), abstract_params(old_cfg), positive=True))
    assert all((np.asarray(x) >= 0).all() for x in jax.tree.leaves(fisher))
    assert jax.tree.map(np.shape, fisher) == jax.tree.map(np.shape, abstract_params(new_cfg))
    assert all(-1 <= r["reference_cosine"] <= 1 for r in stage1)


def test_strategy_rows_of_the_equal_flops_benchmark_spend_elles_budget(tmp_path):
    """`benchmarks/elle_equal_flops.py`'s strategy rows: every stage's training FLOPs (the Fisher pass and the
    per-step extras included) within one step of what ELLE plans for it. ewc-final is run and its measured
    FLOPs compared (its Fisher pass is paid at stage 0's end); lwf-final and agem-final are checked from
    their step counts and their per-step extras, which the strength-0 test above measures on a run (a
    teacher forward = 1/3 step, a reference gradient = 1 step)."""
    import sys

    from jaxcl.elle.run import planned_stage_flops
    from jaxcl.train.loop import ContinualRun, train_step_flops

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.elle_equal_flops import comparison_configs
    finally:
        sys.path.remove(str(ROOT))
    base = _cfg(tmp_path, "run.method=elle", "elle.schedule=[{n_layers: 3}]", "elle.warmup_steps=2",
                "elle.micro_batches=4", "train.pretrain_steps=8", "train.steps=8")
    runs, _ = comparison_configs(base)
    budget = planned_stage_flops(base, 2)
    step = train_step_flops(runs["ewc-final"].model, 8, 32)
    cfg = dataclasses.replace(runs["ewc-final"], run=dataclasses.replace(runs["ewc-final"].run, dir=str(tmp_path / "ewc")))
    report = ContinualRun(cfg).run()
    assert report["train_flops"][0] == pytest.approx(cfg.train.stage_steps[0] * step + 2 * step)   # + the Fisher
    for spent, planned in zip(report["train_flops"], budget):
        assert abs(spent - planned) <= step, (report["train_flops"], budget)
    for name, extra in (("lwf-final", step / 3), ("agem-final", step)):
        steps = runs[name].train.stage_steps
        spent = [steps[0] * step, *(n * (step + extra) for n in steps[1:])]
        for s_, planned in zip(spent, budget):
            assert abs(s_ - planned) <= step + extra, (name, spent, budget)