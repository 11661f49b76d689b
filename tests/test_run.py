"""End-to-end: the continual-learning job, killed and resumed, checkpoints across meshes, bad configs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcl.config import CheckpointConfig, MeshConfig, OptimConfig
from jaxcl.models import ModelConfig
from jaxcl.parallel import make_mesh
from jaxcl.train import create_train_state, make_optimizer, state_shardings
from jaxcl.train.checkpoint import Checkpointer, abstract_like
from tests.compile_cache import killable_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
        "data.seq_len=32", "data.batch_size=8", "data.eval_batches=2", "data.domains=[bible,manpages]",
        "train.pretrain_steps=30", "train.steps=30", "train.log_every=5", "optim.warmup_steps=5", "optim.lr=1e-2",
        "checkpoint.every=10", "checkpoint.async_save=false"]


def jaxcl(*args, run_dir, wait=True):
    cmd = [sys.executable, "-m", "jaxcl.cli", *args, f"run.dir={run_dir}"]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=killable_env())          # it will be killed
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def checkpoint_steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the run dir: its bytes and modification time (ns)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def train_records(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["stage"], r["step"]) for r in records if r["kind"] == "train"]


def assert_accounting_sums_invocations(report: dict, walls: list[float]) -> None:
    """report.json accounts each invocation that did work, measured inside that invocation's own wall."""
    invocations = report["invocations"]
    assert len(invocations) == len(walls), invocations
    for inv, wall in zip(invocations, walls):
        assert 0 < inv["wall_seconds"] < wall and 0 <= inv["train_seconds"] <= inv["wall_seconds"]
    assert report["wall_seconds"] == pytest.approx(sum(i["wall_seconds"] for i in invocations), rel=1e-12)
    assert report["train_seconds"] == pytest.approx(sum(i["train_seconds"] for i in invocations), rel=1e-9)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    out = jaxcl("run", "configs/demo.yaml", *TINY, run_dir=run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir, json.loads((run_dir / "report.json").read_text()), out.stdout


def test_run_writes_the_report_contract(uninterrupted):
    run_dir, report, stdout = uninterrupted
    assert report["method"] == "sequential" and report["metric"] == "perplexity"
    assert report["stages"] == report["eval_on"] == ["bible", "manpages"]
    assert np.array(report["matrix"]).shape == (2, 2)
    assert set(report["summary"]) >= {"average", "forgetting"}
    for name in ("config.yaml", "metrics.jsonl", "report.json", "perplexity_matrix.png", "training_loss.png"):
        assert (run_dir / name).stat().st_size > 0, name
    m = report["matrix"]
    # It learns: each domain's perplexity right after training on it is far below the untrained model's,
    assert m[0][0] < 0.5 * report["initial_perplexity"][0] and m[1][1] < 0.5 * report["initial_perplexity"][1]
    # and training on manpages improves manpages (forgetting is measured on the full demo, docs/benchmarks.md).
    assert m[1][1] < 0.7 * m[0][1]
    assert "perplexity matrix (sequential)" in stdout


def test_eval_command_reproduces_the_final_row(uninterrupted):
    run_dir, report, _ = uninterrupted
    out = jaxcl("eval", "configs/demo.yaml", *TINY, run_dir=run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    evaluated = json.loads((run_dir / "eval.json").read_text())["domains"]
    np.testing.assert_allclose([evaluated[d]["perplexity"] for d in report["eval_on"]], report["matrix"][-1],
                               rtol=1e-5)


def test_train_command_runs_one_joint_stage(tmp_path):
    out = jaxcl("train", "configs/demo.yaml", *TINY, "train.eval_every=10", run_dir=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "joint" and report["stages"] == ["joint"] and len(report["matrix"][0]) == 2
    assert report["summary"]["average"] == pytest.approx(sum(report["matrix"][0]) / 2)     # both domains
    assert max(report["matrix"][0]) < 0.5 * min(report["initial_perplexity"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in records if r["kind"] == "eval_step"]
    assert sorted({r["step"] for r in periodic}) == [10, 20, 30, 40, 50] and \
        {r["domain"] for r in periodic} == {"bible", "manpages"}
    assert report["train_tokens"] == [60 * 8 * 32]        # the sequential run's total: 30 + 30 steps


def test_sigkill_then_restart_resumes_and_matches_uninterrupted(uninterrupted, tmp_path):
    _, reference, _ = uninterrupted
    start = time.time()
    proc = jaxcl("run", "configs/demo.yaml", *TINY, run_dir=tmp_path, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in checkpoint_steps(tmp_path) if s > 30]:
        time.sleep(0.2)           # wait until a checkpoint inside stage 2 exists
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    first_wall = time.time() - start
    steps = checkpoint_steps(tmp_path)
    assert steps and max(steps) < 60 and not (tmp_path / "report.json").exists(), steps
    start = time.time()
    out = jaxcl("run", "configs/demo.yaml", *TINY, run_dir=tmp_path)
    second_wall = time.time() - start
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming from checkpoint" in out.stderr
    resumed = json.loads((tmp_path / "report.json").read_text())
    np.testing.assert_allclose(resumed["matrix"], reference["matrix"], rtol=1e-5)
    # The records the killed invocation wrote after its last checkpoint were dropped and redone once.
    assert sorted(train_records(tmp_path)) == sorted(train_records(uninterrupted[0]))
    assert_accounting_sums_invocations(resumed, [first_wall, second_wall])


def test_changed_training_keys_are_refused_and_change_nothing(uninterrupted):
    run_dir, _, _ = uninterrupted
    before = snapshot(run_dir)
    out = jaxcl("run", "configs/demo.yaml", *TINY, "train.steps=31", "model.n_layers=3", run_dir=run_dir)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("jaxcl run: error:")]
    assert len(errors) == 1 and "changed: model.n_layers, train.steps" in errors[0], out.stderr[-2000:]
    assert "run.name=" in errors[0] and "checkpoint.resume=false" in errors[0]
    assert snapshot(run_dir) == before


def test_rerunning_a_finished_run_says_so_and_changes_nothing(uninterrupted):
    run_dir, report, _ = uninterrupted
    before = snapshot(run_dir)
    out = jaxcl("run", "configs/demo.yaml", *TINY, "train.log_every=3", run_dir=run_dir)   # harmless key
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{run_dir} holds a finished run: its report is {run_dir / 'report.json'}" in out.stdout
    assert "perplexity matrix" not in out.stdout
    assert snapshot(run_dir) == before


def test_a_run_dir_is_never_reused_by_another_run(uninterrupted, tmp_path):
    run_dir, _, _ = uninterrupted
    joint = jaxcl("train", "configs/demo.yaml", *TINY, run_dir=run_dir)      # same dir, other method
    assert joint.returncode == 2 and "holds a sequential run" in joint.stderr
    fresh = jaxcl("run", "configs/demo.yaml", *TINY, "checkpoint.resume=false", run_dir=run_dir)
    assert fresh.returncode == 2 and "already holds checkpoints" in fresh.stderr


def test_sigterm_saves_exits_cleanly_and_the_resumed_report_sums_both_invocations(tmp_path):
    start = time.time()
    proc = jaxcl("run", "configs/demo.yaml", *TINY, "checkpoint.every=0", run_dir=tmp_path, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    first_wall = time.time() - start
    assert proc.returncode == 0, output[-3000:]
    assert "preempted at global step" in output
    assert checkpoint_steps(tmp_path), "no checkpoint written on SIGTERM"
    # Resuming with a key that changes what is trained is refused before anything is written ...
    before = snapshot(tmp_path)
    refused = jaxcl("run", "configs/demo.yaml", *TINY, "checkpoint.every=0", "model.n_layers=3", run_dir=tmp_path)
    assert refused.returncode == 2 and "changed: model.n_layers" in refused.stderr, refused.stderr[-2000:]
    assert snapshot(tmp_path) == before
    # ... while a harmless one (logging frequency) is accepted, and config.yaml keeps describing the run.
    start = time.time()
    out = jaxcl("run", "configs/demo.yaml", *TINY, "checkpoint.every=0", "train.log_every=3", run_dir=tmp_path)
    second_wall = time.time() - start
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming from checkpoint" in out.stderr
    assert (tmp_path / "config.yaml").read_bytes() == before["config.yaml"][0]
    report = json.loads((tmp_path / "report.json").read_text())
    assert_accounting_sums_invocations(report, [first_wall, second_wall])
    records = train_records(tmp_path)
    assert len(records) == len(set(records))


def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path):
    cfg = ModelConfig(family="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    tx = make_optimizer(OptimConfig(), total_steps=10)
    mesh_a = make_mesh(MeshConfig(data=1, fsdp=8))
    state, _ = create_train_state(cfg, tx, jax.random.key(0), mesh_a)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    ckpt.save(7, state, {"note": "mesh a"})
    ckpt.close()

    mesh_b = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = state_shardings(cfg, tx, mesh_b)
    shapes = jax.eval_shape(lambda: jax.tree.map(lambda x: x, state))
    restored, meta = Checkpointer(tmp_path).restore(7, abstract_like(shapes, shardings))
    assert meta == {"note": "mesh a"}
    kernel = restored.params["layers"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh_b.shape
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("overrides,message", [
    (["train.stepz=3"], "unknown config key(s): train.stepz"),
    (["train.steps=many"], "train.steps must be an integer, got 'many'"),
    (["data.batch_size=12"], "data.batch_size=12 is not divisible by the data-parallel size 8"),
    (["data.domains=[bible,klingon]"], "unknown domain 'klingon'"),
    (["data.tokenizer=/no/such/tokenizer.json"], "data.tokenizer='/no/such/tokenizer.json'"),
])
def test_bad_config_gives_one_line_error(tmp_path, overrides, message):
    out = jaxcl("run", "configs/demo.yaml", *overrides, run_dir=tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("jaxcl run: error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]


def test_missing_config_file_is_named(tmp_path):
    out = jaxcl("run", "configs/nope.yaml", run_dir=tmp_path)
    assert out.returncode == 2 and "configs/nope.yaml" in out.stderr and "not found" in out.stderr


def test_preemption_on_a_stages_last_step_saves_the_completed_stage(tmp_path):
    from jaxcl.config import load_config
    from jaxcl.train.checkpoint import Checkpointer
    from jaxcl.train.loop import ContinualRun, MetricsLog, Preempted

    overrides = [o for o in TINY if not o.startswith("train.pretrain_steps")] + \
        ["train.pretrain_steps=1", f"run.dir={tmp_path}"]
    runner = ContinualRun(load_config(ROOT / "configs/demo.yaml", overrides))
    ckpt = Checkpointer(tmp_path / "checkpoints", runner.cfg.checkpoint)
    with pytest.raises(Preempted):
        runner._run(ckpt, MetricsLog(tmp_path / "metrics.jsonl"), {"signal": signal.SIGTERM})
    ckpt.close()
    meta = Checkpointer(tmp_path / "checkpoints").restore_meta(1)
    assert meta["stage"] == 0 and meta["completed"] and len(meta["matrix"]) == 1
