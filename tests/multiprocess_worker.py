"""One process of the two-process data test (run by tests/test_multiprocess_data.py, not by pytest)."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(coordinator: str, process_id: int, out_dir: str) -> None:
    from jaxcl.config import MeshConfig
    from jaxcl.data.stream import SequenceStream, to_global
    from jaxcl.parallel import batch_sharding, initialize_distributed, make_mesh
    from jax.experimental import multihost_utils

    initialize_distributed(coordinator, num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2))
    sequences = np.arange(37 * 5, dtype=np.int32).reshape(37, 5)     # 37 sequences: epochs wrap mid-batch
    stream = SequenceStream(sequences, global_batch=8, seed=11)
    local_rows, global_batches = [], []
    for _ in range(6):
        local = stream.next_local()
        batch = to_global(local, batch_sharding(mesh))
        assert batch["input_ids"].shape == (8, 5)
        local_rows.append(local["input_ids"])
        global_batches.append(multihost_utils.process_allgather(batch["input_ids"], tiled=True))
    np.savez(os.path.join(out_dir, f"process{process_id}.npz"), local=np.stack(local_rows),
             gathered=np.stack(global_batches), position=stream.position)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
