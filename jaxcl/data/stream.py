"""Token streams cut into fixed-length sequences, shuffled deterministically, read per process.

The global batch at step t is a fixed function of (seed, t): rows `[t*B, (t+1)*B)` of an endless
sequence of per-epoch permutations. Process p of P reads only its `B/P` rows of that batch, and
`jax.make_array_from_process_local_data` assembles the global array. The stream's position is one
integer, saved in every checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from jaxcl.config import ConfigError


def pack_sequences(tokens: np.ndarray, seq_len: int, what: str = "stream") -> np.ndarray:
    """`[n_tokens]` -> `[n_tokens // seq_len, seq_len]` (the ragged tail is dropped)."""
    n = len(tokens) // seq_len
    if n == 0:
        raise ConfigError(f"{what}: {len(tokens)} tokens are fewer than data.seq_len={seq_len}")
    return np.ascontiguousarray(tokens[: n * seq_len].reshape(n, seq_len))


def _process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch % process_count:
        raise ConfigError(f"data.batch_size={global_batch} is not divisible by the {process_count} processes")
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


class SequenceStream:
    """An endless, seeded, per-process view of one domain's packed training sequences."""

    def __init__(self, sequences: np.ndarray, global_batch: int, seed: int, *, position: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        self.sequences = sequences                     # [n, seq_len] int32
        self.global_batch = global_batch
        self.seed = seed
        self.position = position                       # global rows consumed so far
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.rows = _process_rows(global_batch, self.process_index, self.process_count)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))

    def global_row_ids(self, position: int) -> np.ndarray:
        """Sequence ids of the whole global batch starting at `position` (same on every process)."""
        n = len(self.sequences)
        flat = np.arange(position, position + self.global_batch)
        epochs = flat // n
        out = np.empty(self.global_batch, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._permutation(int(epoch))[flat[sel] % n]
        return out

    def next_local(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch: input_ids and attention_mask `[B/P, seq]`."""
        ids = self.sequences[self.global_row_ids(self.position)[self.rows]]
        self.position += self.global_batch
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def state(self) -> dict[str, Any]:
        return {"position": int(self.position), "seed": int(self.seed), "n_sequences": int(len(self.sequences))}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("n_sequences") not in (None, len(self.sequences)):
            raise ConfigError(f"checkpointed data stream had {state['n_sequences']} sequences, now "
                              f"{len(self.sequences)}: data or data.seq_len changed since the checkpoint")
        self.position = int(state["position"])


def eval_batches(sequences: np.ndarray, global_batch: int, *, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of fixed, unshuffled evaluation batches; the last one padded with mask-0 rows."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    rows = _process_rows(global_batch, pi, pc)
    for start in range(0, len(sequences), global_batch):
        chunk = sequences[start:start + global_batch]
        mask = np.ones_like(chunk)
        if len(chunk) < global_batch:
            pad = global_batch - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
        yield {"input_ids": chunk[rows], "attention_mask": mask[rows]}


def to_global(local_batch: dict[str, np.ndarray], sharding: Sharding) -> dict[str, jax.Array]:
    """Assemble the global batch from every process's local rows (no host sees the whole batch).

    `sharding` is that of `[batch, seq]` arrays; per-row arrays (`[batch]`, e.g. prompt ids) use its
    batch axis only.
    """
    def for_rank(ndim: int) -> Sharding:
        if isinstance(sharding, NamedSharding) and len(sharding.spec) > ndim:
            return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:ndim]))
        return sharding

    return {k: jax.make_array_from_process_local_data(for_rank(np.ndim(v)), v) for k, v in local_batch.items()}
