"""tpu_scripts/*.sh --dry-run print the exact gcloud commands (nothing is executed)."""

import os
import subprocess
from pathlib import Path

import pytest

from jaxcl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TPU_NAME": "cl-pod", "ZONE": "europe-west4-a", "ACCELERATOR": "v5litepod-16", "PATH": os.environ["PATH"]}


def dry_run(script: str, *args: str) -> list[str]:
    out = subprocess.run(["bash", str(ROOT / "tpu_scripts" / script), *args, "--dry-run"], env=ENV, text=True,
                         capture_output=True, check=True, timeout=30)
    return out.stdout.strip().splitlines()


def test_create_and_delete():
    (create,) = dry_run("create.sh", "--spot")
    assert create.startswith("gcloud compute tpus tpu-vm create cl-pod --zone=europe-west4-a")
    assert "--accelerator-type=v5litepod-16" in create and create.rstrip().endswith("--spot")
    (delete,) = dry_run("delete.sh")
    assert delete.startswith("gcloud compute tpus tpu-vm delete cl-pod --zone=europe-west4-a")


def test_setup_copies_to_and_installs_on_every_worker():
    scp, ssh = dry_run("setup.sh")
    assert scp.startswith("gcloud compute tpus tpu-vm scp --recurse") and "--worker=all" in scp
    assert "--worker=all" in ssh and "pip\\ install\\ -e\\ \\'.\\[tpu\\]\\'" in ssh


def test_run_sends_the_same_jaxcl_command_to_all_hosts():
    (ssh,) = dry_run("run.sh", "configs/tpu/pod_demo.yaml", "train.steps=10")
    assert "--worker=all" in ssh
    assert "jaxcl.cli\\ run\\ configs/tpu/pod_demo.yaml\\ train.steps=10" in ssh


def test_prepare_tokenizes_on_every_host_in_the_foreground():
    (ssh,) = dry_run("prepare.sh", "configs/tpu/pod_demo.yaml", "data.cache=gs://b/tokens")
    assert "--worker=all" in ssh and "nohup" not in ssh
    assert "jaxcl.cli\\ prepare\\ configs/tpu/pod_demo.yaml\\ data.cache=gs://b/tokens" in ssh
    cfg = load_config(ROOT / "configs/tpu/pod_demo.yaml")
    assert cfg.data.source.startswith("gs://") and cfg.data.cache.startswith("gs://")


def test_logs_reads_one_worker():
    (ssh,) = dry_run("logs.sh", "2")
    assert "--worker=2" in ssh and "tail" in ssh


def test_run_without_config_is_a_usage_error():
    out = subprocess.run(["bash", str(ROOT / "tpu_scripts" / "run.sh"), "--dry-run"], env=ENV, text=True,
                         capture_output=True, timeout=30)
    assert out.returncode == 2 and "usage" in out.stderr


# base.yaml and models/*.yaml are partial configs, validated through the configs that include them.
FULL_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "base.yaml" and p.parent.name != "models")


@pytest.mark.parametrize("path", FULL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_is_valid(path):
    if path.name == "standard.yaml":         # reads the user's CSVs: the directory is the one required key
        with pytest.raises(ConfigError, match="set slm.task_root"):
            load_config(path)
        cfg = load_config(path, ["slm.task_root=/data/cl_benchmark"])
    else:
        cfg = load_config(path)
    assert cfg.model.vocab_size > 0
