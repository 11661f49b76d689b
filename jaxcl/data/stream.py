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
                         source=source, segment_bytes=data.prepare_segment_bytes)
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


class RowBatch:
    """A global batch's token rows `[B, seq]`, read from their sources only where asked.

    Row i is row `ids[i]` of `sources[which[i]]` (numpy arrays or token-cache `Rows`). `device_batch` reads,
    on each process, only the row ranges its devices hold (each range once, however many devices replicate
    it), so a host of a pod never touches the rest of the global batch. Everything else sees an int32
    array: `np.asarray`, `len`, `shape`, indexing, `copy()` (a numpy copy of all rows).
    """

    dtype = np.dtype(np.int32)
    ndim = 2

    def __init__(self, sources: list, which: np.ndarray, ids: np.ndarray):
        self.sources, self.which, self.ids = list(sources), np.asarray(which), np.asarray(ids, np.int64)
        self.shape = (len(self.ids), int(self.sources[0].shape[1]))
        self._read: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """int32 `[stop - start, seq]`: rows `[start, stop)` of the batch (read once, then kept)."""
        key = (start, stop)
        if key not in self._read:
            out = np.empty((stop - start, self.shape[1]), np.int32)
            which, ids = self.which[start:stop], self.ids[start:stop]
            for s in np.unique(which):
                sel = which == s
                out[sel] = np.asarray(self.sources[int(s)][ids[sel]], np.int32)
            self._read[key] = out
        return self._read[key]

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        first, rest = index[0], index[1:]
        if isinstance(first, slice):
            start, stop, step = first.indices(self.shape[0])
            rows = self.rows(start, stop)[::step] if stop > start else np.zeros((0, self.shape[1]), np.int32)
            return rows[(slice(None),) + rest]
        return np.asarray(self)[index]

    def __array__(self, dtype=None, copy=None):
        rows = self.rows(0, self.shape[0])
        return rows.astype(dtype) if dtype is not None else rows

    def copy(self) -> np.ndarray:
        return np.array(self.rows(0, self.shape[0]))

    def tolist(self) -> list:
        return np.asarray(self).tolist()


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
        """The next global batch: input_ids (a `RowBatch`: rows read where a process needs them) and
        attention_mask `[global_batch, seq]`. The same on every process; `device_batch` places them on a mesh.
        """
        ids = RowBatch([self.sequences], np.zeros(self.global_batch, np.int8), self.global_row_ids(self.position))
        self.position += self.global_batch
        return {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int32)}

    def state(self) -> dict[str, Any]:
        """JSON state saved in checkpoints: position, seed and the number of sequences."""
        return {"position": int(self.position), "seed": int(self.seed), "n_sequences": int(len(self.sequences))}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`; ConfigError when the data changed since it was saved."""
        if state.get("n_sequences") not in (None, len(self.sequences)):
            raise ConfigError(f"checkpointed data stream had {state['n_sequences']} sequences, now "
                              f"{len(self.sequences)}: data or data.seq_len changed since the checkpoint")
        self.position = int(state["position"])


class MixtureStream:
    """An endless, seeded stream of global batches drawn from several domains in fixed proportions
    (`data.mixture`: e.g. continued pre-training on 0.3 of the old domain and 0.7 of the new one).

    Positions are dealt in blocks of `block` rows: each block holds exactly `counts[d]` rows of domain d
    (the weights rounded by largest remainder; so the shares are exact to 1/block), in an order shuffled
    per block. Domain d's c-th row is element c of its own endless per-epoch shuffle, so every domain is
    read without replacement, epoch by epoch. Row p of the stream is therefore a pure function of
    (seed, p) computed in O(block) time: a resume is O(1) and bit-identical (Levanter's mixture dataset
    deals blocks the same way). `next_batch` adds `prompt_ids`: each row's index in `domain_index`.
    """

    def __init__(self, sequences: dict[str, Any], weights: dict[str, float], global_batch: int, seed: int, *,
                 position: int = 0, domain_index: dict[str, int] | None = None, block: int = 4096):
        if global_batch < 1:
            raise ConfigError(f"data.batch_size must be positive, got {global_batch}")
        self.names = [d for d, w in weights.items() if w > 0]
        total = float(sum(weights[d] for d in self.names))
        if not self.names or not total > 0:
            raise ConfigError(f"data.mixture {dict(weights)}: no domain has a positive weight")
        self.sequences = {d: sequences[d] for d in self.names}
        self.global_batch, self.seed, self.position, self.block = global_batch, seed, position, block
        share = np.asarray([weights[d] / total for d in self.names]) * block
        counts = np.floor(share).astype(np.int64)
        for i in np.argsort(-(share - counts), kind="stable")[:block - int(counts.sum())]:
            counts[i] += 1
        small = [d for d, c in zip(self.names, counts) if c == 0]
        if small:
            raise ConfigError(f"data.mixture: the weight of {small[0]!r} is below 1/{block} of the total: raise it or "
                              "drop the domain")
        self.counts = counts
        self.pattern = np.repeat(np.arange(len(self.names)), counts)        # [block] domain of each slot, unshuffled
        self.domain_index = domain_index or {d: i for i, d in enumerate(self.names)}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain `[block]`, rank of the slot among its domain's slots in the block `[block]`) of block b."""
        domains = self.pattern[index_shuffle(np.arange(self.block), self.block, fold_key(self.seed, 7, b))]
        rank = np.empty(self.block, np.int64)
        for i in range(len(self.names)):
            where = np.flatnonzero(domains == i)
            rank[where] = np.arange(len(where))
        return domains, rank

    def global_rows(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain `[global_batch]` as indices into `names`, row id in that domain `[global_batch]`) of the batch
        starting at `position`; the same on every process."""
        flat = np.arange(position, position + self.global_batch, dtype=np.int64)
        domain, row = np.empty(len(flat), np.int64), np.empty(len(flat), np.int64)
        for b in np.unique(flat // self.block):
            sel = flat // self.block == b
            d, rank = self._block(int(b))
            slot = flat[sel] % self.block
            domain[sel] = d[slot]
            count = int(b) * self.counts[d[slot]] + rank[slot]           # this domain's rows dealt before
            for i in np.unique(d[slot]):
                pick = d[slot] == i
                n = len(self.sequences[self.names[i]])
                c = count[pick]
                out = np.empty(len(c), np.int64)
                for epoch in np.unique(c // n):
                    e = c // n == epoch
                    out[e] = index_shuffle(c[e] % n, n, fold_key(self.seed, int(i), int(epoch)))
                idx = np.flatnonzero(sel)[pick]
                row[idx] = out
        return domain, row

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next global batch: input_ids, attention_mask `[global_batch, seq]` and prompt_ids `[global_batch]`."""
        domain, row = self.global_rows(self.position)
        self.position += self.global_batch
        ids = RowBatch([self.sequences[d] for d in self.names], domain, row)
        prompts = np.asarray([self.domain_index[self.names[i]] for i in domain], np.int32)
        return {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int32), "prompt_ids": prompts}

    def state(self) -> dict[str, Any]:
        """JSON state saved in checkpoints: position, seed and every domain's number of sequences."""
        return {"position": int(self.position), "seed": int(self.seed),
                "n_sequences": {d: int(len(v)) for d, v in self.sequences.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`; ConfigError when the data changed since it was saved."""
        now = {d: int(len(v)) for d, v in self.sequences.items()}
        if state.get("n_sequences") not in (None, now):
            raise ConfigError(f"checkpointed mixture stream had {state['n_sequences']} sequences, now {now}: data, "
                              "data.mixture or data.seq_len changed since the checkpoint")
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
    replicated across them (a `tensor` axis spanning hosts), or both; a `RowBatch` is read only for
    those rows. Raises ConfigError when the rows do not divide over the batch axis.
    """
    out = {}
    for k, v in batch.items():
        v = v if isinstance(v, RowBatch) else np.asarray(v)
        sh = _for_rank(sharding, v.ndim)
        _check_rows(v.shape[0], sh)
        out[k] = jax.make_array_from_callback(v.shape, sh, lambda index, v=v: v[index])
    return out
