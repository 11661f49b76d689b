"""Two JAX processes on localhost: each reads a disjoint shard; the global batch equals one process's."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxcl.data.stream import SequenceStream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_of_the_same_global_batch(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    worker = Path(__file__).with_name("multiprocess_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(worker), coordinator, str(i), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    results = [np.load(tmp_path / f"process{i}.npz") for i in range(2)]

    sequences = np.arange(37 * 5, dtype=np.int32).reshape(37, 5)
    single = SequenceStream(sequences, global_batch=8, seed=11, process_index=0, process_count=1)
    expected = np.stack([single.next_local()["input_ids"] for _ in range(6)])     # [steps, 8, 5]

    local0, local1 = results[0]["local"], results[1]["local"]
    assert local0.shape == local1.shape == (6, 4, 5)
    np.testing.assert_array_equal(np.concatenate([local0, local1], axis=1), expected)
    for step in range(6):      # disjoint: no sequence is read by both processes in the same step
        assert not set(map(tuple, local0[step])) & set(map(tuple, local1[step]))
    for r in results:
        np.testing.assert_array_equal(r["gathered"], expected)
        assert int(r["position"]) == 48
