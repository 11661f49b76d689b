"""Token streams cut into fixed-length sequences, shuffled deterministically, placed on any mesh.

The global batch at step t is a fixed function of (seed, t): rows `[t*B, (t+1)*B)` of an endless
sequence of per-epoch permutations. Every process computes that whole batch in numpy from the global
row ids (an int32 `[B, seq]` gather, cheap next to a train step), and `device_batch` makes the global
`jax.Array` with `jax.make_array_from_callback`, so each process transfers exactly the shards its own
devices hold. Nothing assumes which rows a process owns: any mesh over any process layout (the batch
split over processes, replicated across them, or both, e.g. a `tensor` axis spanning hosts) gives the
single-process batch. The stream's position is one integer, saved in every checkpoint, so a resumed
run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from jaxcl.data.shuffle import fold_key, index_shuffle
from jaxcl.errors import ConfigError


def pack_sequences(tokens: np.ndarray, seq_len: int, what: str = "stream") -> np.ndarray:
    """`[n_tokens]` -> `[n_tokens // seq_len, seq_len]` (the ragged tail is dropped).

    Raises ConfigError naming `what` when there are fewer tokens than one sequence.
    """
    n = len(tokens) // seq_len
    if n == 0:
        raise ConfigError(f"{what}: {len(tokens)} tokens are fewer than data.seq_len={seq_len}")
    return np.ascontiguousarray(tokens[: n * seq_len].reshape(n, seq_len))


def document_slice(documents: list, fractions: tuple[float, float] = (0.0, 1.0)) -> list:
    """The documents between two fractions of the list, in order: `[0, 0.5]` is the first half (rounded
    down), `[0.5, 1]` the rest, so complementary ranges partition the documents exactly."""
    lo, hi = (int(len(documents) * float(f)) for f in fractions)
    return documents[lo:hi]


def split_rows(data, tokenizer, tokenizer_spec: str, domains, split: str, *, source=None,
               source_spec: str | None = None, key: str = "data.source",
               documents: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """Every domain's `split` as `[n, data.seq_len]` rows read on demand from the token cache (`PackedRows`),
    of the documents between two fractions of the split (`document_slice`'s rule). Documents are framed as
    the tokenizer frames them and never run together. A missing or stale cache is prepared first
    (`jaxcl.data.cache.open_splits`). `data`: the run's `DataConfig`; `source_spec`/`key`: another source
    than `data.source` (SeMem's `semem.stream_source`). Raises ConfigError for a split shorter than a row."""
    from jaxcl.data.cache import open_splits

    caches = open_splits(source_spec=source_spec or data.source, text_field=data.text_field, tokenizer=tokenizer,
                         tokenizer_spec=tokenizer_spec, cache=data.cache, domains=tuple(domains), splits=(split,),
                         processes=data.prepare_processes, on_bad_document=data.on_bad_document, key_name=key,
                         source=source)
    documents = tuple(float(f) for f in documents)
    where = "" if documents == (0.0, 1.0) else f" (documents {list(documents)})"
    return {d: caches[(d, split)].rows(data.seq_len, documents, f"domain {d!r} {split} split{where}") for d in domains}


def cached_domains(data, tokenizer, tokenizer_spec: str, domains, n_eval: int | None = None, *,
                   source=None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every domain's train rows (`split_rows`, documents `data.train_documents`) and valid rows (its first
    `n_eval` sequences, in memory): the one token stream every method reads."""
    train = split_rows(data, tokenizer, tokenizer_spec, domains, "train", source=source,
                       documents=data.train_documents)
    valid = split_rows(data, tokenizer, tokenizer_spec, domains, "valid", source=source)
    return train, {d: v[:n_eval] for d, v in valid.items()}


class SequenceStream:
    """An endless, seeded stream of global batches of one domain's packed training sequences.

    `sequences` is `[n, seq_len]` int32 (a numpy array or rows read on demand from the token cache:
    `jaxcl.data.cache.Rows`); each call of `next_batch` returns the next `global_batch`
    rows of the concatenated per-epoch permutations (the same on every process) and advances
    `position` (global rows consumed so far) by `global_batch`.
    """

    def __init__(self, sequences: np.ndarray, global_batch: int, seed: int, *, position: int = 0):
        if global_batch < 1:
            raise ConfigError(f"data.batch_size must be positive, got {global_batch}")
        self.sequences = sequences                     # [n, seq_len] int32
        self.global_batch = global_batch
        self.seed = seed
        self.position = position                       # global rows consumed so far

    def global_row_ids(self, position: int) -> np.ndarray:
        """Sequence ids `[global_batch]` of the global batch starting at `position` (same on every process):
        position p is element p mod n of epoch p // n's permutation, a stateless Feistel shuffle keyed by
        (seed, epoch) (`jaxcl.data.shuffle`), so a batch costs O(global_batch) whatever the corpus size."""
        n = len(self.sequences)
        flat = np.arange(position, position + self.global_batch, dtype=np.int64)
        epochs = flat // n
        out = np.empty(self.global_batch, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = index_shuffle(flat[sel] % n, n, fold_key(self.seed, int(epoch)))
        return out

    def next_batch(self) -> dict[str, np.ndarray]:
        """The whole next global batch: input_ids and attention_mask `[global_batch, seq]` (numpy).

        Every process gets the same arrays; `device_batch` places them on a mesh.
        """
        ids = np.asarray(self.sequences[self.global_row_ids(self.position)], np.int32)
        self.position += self.global_batch
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def state(self) -> dict[str, Any]:
        """JSON state saved in checkpoints: position, seed and the number of sequences."""
        return {"position": int(self.position), "seed": int(self.seed), "n_sequences": int(len(self.sequences))}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`; ConfigError when the data changed since it was saved."""
        if state.get("n_sequences") not in (None, len(self.sequences)):
            raise ConfigError(f"checkpointed data stream had {state['n_sequences']} sequences, now "
                              f"{len(self.sequences)}: data or data.seq_len changed since the checkpoint")
        self.position = int(state["position"])


def eval_batches(sequences: np.ndarray, global_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed, unshuffled global evaluation batches `[global_batch, seq]` of `sequences` `[n, seq]`.

    The last batch is padded to `global_batch` rows with mask-0 rows, so every batch has one shape
    (one compiled eval step). The same on every process; place them with `device_batch`.
    """
    for start in range(0, len(sequences), global_batch):
        chunk = sequences[start:start + global_batch]
        mask = np.ones_like(chunk)
        if len(chunk) < global_batch:
            pad = global_batch - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
        yield {"input_ids": chunk, "attention_mask": mask}


def _for_rank(sharding: Sharding, ndim: int) -> Sharding:
    """`sharding` of `[batch, seq]` arrays cut to the leading `ndim` dims (per-row arrays use the batch axis)."""
    if isinstance(sharding, NamedSharding) and len(sharding.spec) > ndim:
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:ndim]))
    return sharding


def _check_rows(rows: int, sharding: Sharding) -> None:
    if not isinstance(sharding, NamedSharding) or not len(sharding.spec) or sharding.spec[0] is None:
        return
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if rows % shards:
        raise ConfigError(f"a batch of {rows} rows cannot be split over the {shards} shards of mesh axes "
                          f"{'x'.join(axes)}: data.batch_size must be a multiple of {shards}")


def device_batch(batch: dict[str, np.ndarray], sharding: Sharding) -> dict[str, jax.Array]:
    """The global numpy batch (identical on every process) -> global `jax.Array`s laid out by `sharding`.

    `sharding` is that of `[batch, seq]` arrays; per-row arrays (`[batch]`, e.g. prompt ids) use its
    batch axis only. Each process copies to its devices only the shards they hold (rows and, for a
    replicated batch, whole copies), whatever the mesh: the batch may be split across processes,
    replicated across them (a `tensor` axis spanning hosts), or both. Raises ConfigError when the
    rows do not divide over the batch axis.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sh = _for_rank(sharding, v.ndim)
        _check_rows(v.shape[0], sh)
        out[k] = jax.make_array_from_callback(v.shape, sh, lambda index, v=v: v[index])
    return out
