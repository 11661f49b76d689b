"""Launch N JAX processes of a worker script on localhost (gloo CPU collectives) and collect their results."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker: str, out_dir: Path, n: int = 2, timeout: int = 240) -> list:
    """Run `tests/<worker>` as processes 0..n-1 (`worker COORDINATOR INDEX OUT_DIR`); every one must exit 0
    and write `OUT_DIR/process<i>.npz`, which is returned in process order."""
    coordinator = f"127.0.0.1:{free_port()}"
    script = Path(__file__).with_name(worker)
    env = dict(os.environ)          # one real CPU device per process; the suite's other XLA flags kept
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, str(script), coordinator, str(i), str(out_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return [np.load(out_dir / f"process{i}.npz") for i in range(n)]
