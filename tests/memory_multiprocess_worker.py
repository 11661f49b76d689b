"""One process of the two-process datastore test (run by tests/test_memory_multihost.py, not by pytest).

Importing this module (for `rows_of`) must not touch jax or XLA_FLAGS: the environment is set only when
it runs as a script.
"""

import os
import sys

import numpy as np


def rows_of(process_id: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + process_id)
    n = (300, 500)[process_id]
    return rng.normal(size=(n, 8)).astype(np.float32), rng.integers(0, 1000, n).astype(np.int32)


def main(coordinator: str, process_id: int, out_dir: str) -> None:
    import jax

    from jaxcl.memory import Datastore
    from jaxcl.parallel import initialize_distributed

    initialize_distributed(coordinator, num_processes=2, process_id=process_id)
    assert jax.process_count() == 2
    store = Datastore.create(os.path.join(out_dir, "store"), dim=8, backend="exact")
    keys, values = rows_of(process_id)
    store.add(keys[:100], values[:100])
    store.add(keys[100:], values[100:])
    queries = np.random.default_rng(7).normal(size=(20, 8)).astype(np.float32)    # the same on both processes
    dists, ids = store.search(queries, 10)
    np.savez(os.path.join(out_dir, f"process{process_id}.npz"), dists=dists, ids=ids, values=store.values[ids],
             total=len(store), local=store.local_count)


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
