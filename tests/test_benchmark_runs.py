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
