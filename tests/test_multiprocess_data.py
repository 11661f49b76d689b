"""Two JAX processes on localhost: each reads a disjoint shard; the global batch equals one process's."""

import numpy as np

from jaxcl.data.stream import SequenceStream
from tests.process_launcher import run_workers


def test_two_processes_read_disjoint_shards_of_the_same_global_batch(tmp_path):
    results = run_workers("multiprocess_worker.py", tmp_path)

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
