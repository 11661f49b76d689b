"""Two JAX processes on localhost: each owns the rows it added; a search merges both processes' top-k."""

import numpy as np

from tests.memory_multiprocess_worker import rows_of
from tests.process_launcher import run_workers


def test_search_merges_every_processes_top_k(tmp_path):
    results = run_workers("memory_multiprocess_worker.py", tmp_path)
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
