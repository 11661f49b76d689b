"""Meshes and the tiny training run shared by the two-process data test and its workers (no side effects).

The device orders index `jax.devices()`: with two processes of 4 CPU devices each, indices 0-3 are
process 0's devices and 4-7 process 1's; in the single-process reference (8 fake devices) the same
indices give the same mesh layout, so the compiled programs match and losses agree to round-off.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxcl.config import MeshConfig, OptimConfig
from jaxcl.models import ModelConfig

GLOBAL_BATCH, SEED, STEPS, TRAIN_STEPS = 8, 11, 6, 3
MODEL = ModelConfig(family="gpt2", vocab_size=96, d_model=32, n_layers=2, n_heads=8, d_ff=64, max_seq_len=16)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1)

# name -> (mesh config, device order, whether the tensor axis spans both processes)
CASES = {
    # batch split over processes, each process a contiguous half (the layout the old per-process rows assumed)
    "data_fsdp": (MeshConfig(data=-1, fsdp=2), list(range(8)), False),
    # tensor over all 8 devices: the batch is replicated on every device of both processes
    "tensor8": (MeshConfig(data=1, fsdp=1, tensor=8), list(range(8)), True),
    # each data row holds 2 devices of each process: both processes need all 8 rows
    "data2_tensor4_across": (MeshConfig(data=2, fsdp=1, tensor=4), [0, 1, 4, 5, 2, 3, 6, 7], True),
    # process 1 holds the first half of the batch, process 0 the second
    "fsdp2_tensor4_swapped": (MeshConfig(data=1, fsdp=2, tensor=4), [4, 5, 6, 7, 0, 1, 2, 3], False),
}


def sequences() -> np.ndarray:
    """37 distinct int32 sequences `[37, 16]` (37 rows: epochs wrap mid-batch) of skewed token frequencies (a
    geometric law: a few steps learn it, so "it trains" does not hang on which rows a batch drew)."""
    rng = np.random.RandomState(0)
    return np.minimum(rng.geometric(0.3, (37, 16)) - 1, MODEL.vocab_size - 1).astype(np.int32)


def case_mesh(name: str):
    """The mesh of case `name` over this process group's `jax.devices()`."""
    from jaxcl.parallel import make_mesh

    mesh_cfg, order, _ = CASES[name]
    devices = jax.devices()
    return make_mesh(mesh_cfg, [devices[i] for i in order])


def tensor_processes(mesh) -> set[int]:
    """Process indices along the tensor axis of the mesh's first (data, fsdp) position."""
    return {d.process_index for d in np.asarray(mesh.devices)[0, 0, :]}


def train_losses(mesh) -> list[float]:
    """Losses of `TRAIN_STEPS` steps of the tiny GPT-2 on the stream's global batches on `mesh`,
    built as ContinualRun builds them (create_train_state, make_train_step, device_batch)."""
    from jaxcl.data.stream import SequenceStream, device_batch
    from jaxcl.parallel import batch_sharding
    from jaxcl.train import create_train_state, make_optimizer, make_train_step

    tx = make_optimizer(OPTIM, total_steps=10)
    state, shardings = create_train_state(MODEL, tx, jax.random.key(0), mesh)
    step = make_train_step(MODEL, tx, mesh, shardings)
    stream = SequenceStream(sequences(), GLOBAL_BATCH, seed=SEED)
    losses = []
    for _ in range(TRAIN_STEPS):
        state, metrics = step(state, device_batch(stream.next_batch(), batch_sharding(mesh)), jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return losses
