"""Two JAX processes on localhost: each owns the rows it added; a search merges both processes' top-k."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.memory_multiprocess_worker import rows_of
from tests.test_multiprocess_data import free_port


def test_search_merges_every_processes_top_k(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    worker = Path(__file__).with_name("memory_multiprocess_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, str(worker), coordinator, str(i), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    results = [np.load(tmp_path / f"process{i}.npz") for i in range(2)]
    # Reference: one exact search over process 0's rows followed by process 1's (the global id order).
    keys = np.concatenate([rows_of(0)[0], rows_of(1)[0]]).astype(np.float16).astype(np.float32)
    values = np.concatenate([rows_of(0)[1], rows_of(1)[1]])
    queries = np.random.default_rng(7).normal(size=(20, 8)).astype(np.float32)
    d = ((keys[None] - queries[:, None]) ** 2).sum(-1)
    ref_ids = np.argsort(d, axis=1)[:, :10]
    for r in results:
        assert int(r["total"]) == 800
        np.testing.assert_array_equal(r["ids"], ref_ids)
        np.testing.assert_allclose(r["dists"], np.take_along_axis(d, ref_ids, 1), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(r["values"], values[ref_ids])
    assert sorted(int(r["local"]) for r in results) == [300, 500]
    assert (ref_ids >= 300).any() and (ref_ids < 300).any()     # both processes contribute neighbours
    assert (tmp_path / "store" / "process-00000" / "manifest.json").is_file()
    assert (tmp_path / "store" / "process-00001" / "manifest.json").is_file()
