"""One process of the two-process data test (run by tests/test_multiprocess_data.py, not by pytest).

For every mesh of tests/multiprocess_cases.py: the global batches this process assembles (gathered
back to numpy), what its own devices hold, and the losses of a few train steps.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main(coordinator: str, process_id: int, out_dir: str) -> None:
    from jax.experimental import multihost_utils

    from jaxcl.data.stream import SequenceStream, device_batch
    from jaxcl.parallel import batch_sharding, initialize_distributed
    from tests.multiprocess_cases import CASES, GLOBAL_BATCH, SEED, STEPS, case_mesh, sequences, tensor_processes, \
        train_losses

    initialize_distributed(coordinator, num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    out = {}
    for name, (_, _, spans) in CASES.items():
        mesh = case_mesh(name)
        assert (tensor_processes(mesh) == {0, 1}) == spans, (name, mesh.devices)
        stream = SequenceStream(sequences(), global_batch=GLOBAL_BATCH, seed=SEED)
        gathered, prompts = [], []
        for step in range(STEPS):
            batch = stream.next_batch() | {"prompt_ids": np.arange(GLOBAL_BATCH, dtype=np.int32) + 10 * step}
            arrays = device_batch(batch, batch_sharding(mesh))
            for k, v in arrays.items():
                assert v.shape == batch[k].shape, (name, k, v.shape)
                assert len(v.addressable_shards) == 4              # only this process's devices were filled
                for shard in v.addressable_shards:                 # each holds exactly its slice of the batch
                    np.testing.assert_array_equal(np.asarray(shard.data), batch[k][shard.index])
            gathered.append(np.asarray(multihost_utils.process_allgather(arrays["input_ids"], tiled=True)))
            prompts.append(np.asarray(multihost_utils.process_allgather(arrays["prompt_ids"], tiled=True)))
        out[f"{name}/gathered"] = np.stack(gathered)
        out[f"{name}/prompt_ids"] = np.stack(prompts)
        out[f"{name}/position"] = np.int64(stream.position)
        out[f"{name}/losses"] = np.asarray(train_losses(mesh), np.float64)
    np.savez(os.path.join(out_dir, f"process{process_id}.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
