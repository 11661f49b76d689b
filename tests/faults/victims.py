"""Victim processes of the fault-injection harness (run as `python tests/faults/victims.py CASE DIR SEED`).

Each victim reopens what an earlier victim (or the harness's setup) left in DIR, prints `READY`, then
commits in a loop and prints `COMMIT <n>` after every commit *returns*; the harness kills it with
SIGKILL at a random moment. Everything a victim writes is a deterministic function of (row id,
version, step), so the verifier knows every byte that must be there (`tests/faults/harness.py`).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

DIM = 32


# ----------------------------------------------------------------------------- deterministic contents
def rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys [n, DIM] float32 and values [n] int32 of global row ids (pseudo-random, spread out)."""
    ids = np.asarray(ids, np.uint64)
    z = ids[:, None] * np.uint64(DIM) + np.arange(DIM, dtype=np.uint64)[None]      # splitmix64 of (row, dim)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    keys = ((z >> np.uint64(40)).astype(np.float32) / float(1 << 24) - 0.5) * 8.0      # uniform in [-4, 4)
    return keys, ((ids.astype(np.int64) * 7919) % 8192).astype(np.int32)


def batch_sizes(seed: int):
    """The append sizes a datastore victim with this seed uses, in order (crossing zarr chunk bounds)."""
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(200, 2500))


def compact_after(seed: int):
    rng = np.random.default_rng(seed + 10_000)
    while True:
        yield bool(rng.random() < 0.25)


def scann_options() -> dict:
    return {"segment_rows": 2500, "max_segments": 2}


def checkpoint_state(step: int) -> dict[str, np.ndarray]:
    """A ~6 MB state whose every value depends on the step (orbax victims)."""
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((768, 1024), dtype=np.float32),
            "b": np.full((1024,), step, np.float32), "step": np.asarray(step, np.int32)}


def hf_model():
    from jaxcl.models import ModelConfig
    return ModelConfig(family="gpt2", vocab_size=2048, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=64)


def hf_params(version: int) -> dict:
    """GPT-2 params whose every value depends on `version` (save_pretrained victims)."""
    import jax
    from jaxcl.models import abstract_params

    rng = np.random.default_rng(version)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), abstract_params(hf_model()))
    jax.tree.leaves(params)[0].flat[0] = version          # the version, readable back from a loaded checkpoint
    return params


def hf_version(params: dict) -> int:
    import jax
    return int(round(float(np.asarray(jax.tree.leaves(params)[0]).flat[0])))


# ----------------------------------------------------------------------------- victims
def say(*words) -> None:
    """One acknowledgement line, written with one write (with PYTHONUNBUFFERED, print() would write each word
    separately, and a kill between them would leave "COMMIT" without its number)."""
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def datastore(directory: str, seed: int, backend: str) -> None:
    from jaxcl.memory import Datastore

    ds = Datastore.open(directory)
    n = len(ds)
    say("READY", n)
    compacts = compact_after(seed)
    for size in batch_sizes(seed):
        keys, values = rows(np.arange(n, n + size))
        ds.add(keys, values)
        n += size
        say("COMMIT", n)
        if backend == "scann" and next(compacts):
            ds.compact()
            say("COMPACT", n)


def orbax(directory: str, seed: int, async_save: bool) -> None:
    from jaxcl.config import CheckpointConfig
    from jaxcl.train.checkpoint import Checkpointer

    ckpt = Checkpointer(directory, CheckpointConfig(keep=3, async_save=async_save))
    step = ckpt.latest_step() or 0
    say("READY", step)
    while True:
        step += 1
        ckpt.save(step, checkpoint_state(step), {"step": step, "seed": seed})
        if async_save and step % 2:
            continue            # two saves in flight, then wait: a kill lands in the background writer too
        ckpt.wait()
        say("COMMIT", step)


def hf(directory: str, seed: int, exchange: bool) -> None:
    import jaxcl.atomic_io
    from jaxcl.hf import load_pretrained, save_pretrained

    if not exchange:           # exercise the portable two-rename path (and its recovery) too
        jaxcl.atomic_io._renameat2_exchange = lambda a, b: False
    _, loaded = load_pretrained(directory)            # recovers a swap that a killed victim left half done
    version = hf_version(loaded)
    say("READY", version)
    cfg = hf_model()
    while True:
        version += 1
        save_pretrained(directory, cfg, hf_params(version), max_shard_bytes=1 << 20)
        say("COMMIT", version)


def main() -> None:
    case, directory, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if case in ("datastore-exact", "datastore-scann"):
        datastore(directory, seed, case.split("-")[1])
    elif case in ("orbax-sync", "orbax-async"):
        orbax(directory, seed, case == "orbax-async")
    elif case in ("hf-exchange", "hf-rename"):
        hf(directory, seed, case == "hf-exchange")
    else:
        raise SystemExit(f"unknown victim case {case!r}")


if __name__ == "__main__":
    main()
