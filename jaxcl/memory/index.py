"""Nearest-neighbour index backends behind one interface: `exact` (JAX) and `scann` (segmented).

An index proposes candidate neighbours; the `Datastore` then recomputes exact squared-L2 distances
from the stored keys and sorts them, so every backend returns the same kind of answer.

- `ExactIndex`: brute force in JAX. Keys live on the devices of a mesh, rows sharded over all mesh
  axes; each device scans its rows in chunks (matmul + `lax.top_k`, or `lax.approx_min_k` for TPU),
  then the per-device top-k lists are gathered and merged. The correctness oracle, and the fallback
  where ScaNN is unavailable.
- `ScannIndex`: frozen ScaNN segments (tree + asymmetric hashing + exact reorder) over contiguous row
  ranges, plus the mutable tail ("delta") searched by an `ExactIndex`. When the delta reaches
  `segment_rows` it is frozen into a new segment; when there are more than `max_segments` segments
  they are compacted into one. Segments are serialized next to the data (checksummed, listed in the
  datastore's commit records) and reloaded on open.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import secrets
import platform
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

__all__ = ["ExactIndex", "ScannIndex", "ScannOptions", "make_index", "scann_available", "merge_topk"]


def merge_topk(dists: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest of several candidate lists `[q, m]` (ascending); duplicate ids kept once."""
    order = np.argsort(dists, axis=1, kind="stable")
    dists = np.take_along_axis(dists, order, 1)
    ids = np.take_along_axis(ids, order, 1)
    if ids.shape[1] > 1:      # the same row proposed twice (e.g. by overlapping searches) counts once
        sorted_ids = np.sort(ids, axis=1)
        if np.any(sorted_ids[:, 1:] == sorted_ids[:, :-1]):
            out_d, out_i = np.full((len(ids), k), np.inf, np.float32), np.full((len(ids), k), -1, np.int64)
            for r in range(len(ids)):
                _, first = np.unique(ids[r], return_index=True)
                keep = np.sort(first)[:k]
                out_d[r, :len(keep)], out_i[r, :len(keep)] = dists[r, keep], ids[r, keep]
            return out_d, out_i
    return dists[:, :k], ids[:, :k]


# ----------------------------------------------------------------------------- exact (JAX)
def _default_mesh() -> Mesh:
    return Mesh(np.array(jax.local_devices()), ("rows",))


def min_k(d: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest entries of each row of `d [q, n]`, ascending, and their column indices: exactly what
    `-top_k(-d, k)` returns (ties aside), at a fraction of its cost on CPU, where top-k is a partial sort
    of every row.

    How: split each row into n/g groups of g columns (g ~ sqrt(n / k), a power of two); the k smallest
    entries lie in the k groups with the smallest minima (any entry outside them has k smaller group
    minima, hence k smaller entries, ahead of it), so a top-k over the n/g group minima, then one over
    the k*g entries of the chosen groups, is exact. At q=1024, n=16384, k=64: 2.2x faster than top_k
    on 2 CPU cores, same values and indices.
    """
    q, n = d.shape
    g = 1 << max(0, round(math.log2(max(1.0, math.sqrt(n / max(k, 1))))))
    if g == 1 or n % g or n // g < k:
        neg, idx = jax.lax.top_k(-d, k)
        return -neg, idx
    groups = d.reshape(q, n // g, g)
    _, gi = jax.lax.top_k(-groups.min(axis=-1), k)                                    # [q, k] group ids
    cand = jnp.take_along_axis(groups, gi[:, :, None], axis=1).reshape(q, k * g)      # [q, k * g]
    neg, j = jax.lax.top_k(-cand, k)
    return -neg, jnp.take_along_axis(gi, j // g, axis=1) * g + j % g


@functools.lru_cache(maxsize=32)
def _exact_search_fn(mesh: Mesh, per_device: int, chunk: int, k: int, approx: bool, recall_target: float):
    axes = tuple(mesh.axis_names)

    def local(queries, keys, norms, n_valid):          # queries [q, d]; keys [per_device, d]; norms [per_device]
        offset = jax.lax.axis_index(axes) * per_device
        qn = jnp.sum(queries * queries, axis=-1)        # [q]

        def body(carry, c):
            best_d, best_i = carry
            kc = jax.lax.dynamic_slice_in_dim(keys, c * chunk, chunk).astype(jnp.float32)      # [chunk, d]
            nc = jax.lax.dynamic_slice_in_dim(norms, c * chunk, chunk)
            d = qn[:, None] - 2.0 * jnp.dot(queries, kc.T, precision=jax.lax.Precision.HIGHEST) + nc[None]
            rows = offset + c * chunk + jnp.arange(chunk)                                     # [chunk]
            d = jnp.where(rows[None] < n_valid, d, jnp.inf)                                  # [q, chunk]
            if approx:
                cd, ci = jax.lax.approx_min_k(d, k, recall_target=recall_target)
            else:
                cd, ci = min_k(d, k)
            cand_d = jnp.concatenate([best_d, cd], axis=1)                                  # [q, 2k]
            cand_i = jnp.concatenate([best_i, rows[ci]], axis=1)
            neg, j = jax.lax.top_k(-cand_d, k)
            return (-neg, jnp.take_along_axis(cand_i, j, axis=1)), None

        init = (jnp.full((queries.shape[0], k), jnp.inf, jnp.float32), jnp.full((queries.shape[0], k), -1, jnp.int32))
        (best_d, best_i), _ = jax.lax.scan(body, init, jnp.arange(per_device // chunk))
        all_d = jax.lax.all_gather(best_d, axes, axis=1, tiled=True)      # [q, n_dev * k]
        all_i = jax.lax.all_gather(best_i, axes, axis=1, tiled=True)
        neg, j = jax.lax.top_k(-all_d, k)
        return -neg, jnp.take_along_axis(all_i, j, axis=1)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P(axes), P()), out_specs=(P(), P()),
                       check_vma=False)
    return jax.jit(fn)


class ExactIndex:
    """Brute-force squared-L2 search over keys sharded by rows across `mesh` (default: local devices)."""

    name = "exact"

    def __init__(self, dim: int, *, mesh: Mesh | None = None, chunk_rows: int = 16384, query_batch: int = 1024,
                 approx: bool = False, recall_target: float = 0.95):
        self.dim, self.mesh = dim, mesh or _default_mesh()
        self.chunk_rows, self.query_batch = chunk_rows, query_batch
        self.approx, self.recall_target = approx, recall_target
        self._start = 0            # first row this index covers (the delta of a segmented index starts later)
        self._count = 0            # rows placed on the devices
        self._keys = self._norms = self._host = None
        self._placed = (0, 0)
        self._per_device = self._chunk = 0

    def options(self) -> dict[str, Any]:
        return {"approx": self.approx, "recall_target": self.recall_target, "chunk_rows": self.chunk_rows}

    def sync(self, keys: np.ndarray, start: int = 0) -> None:
        """Cover rows `keys[start:]`; they are placed on the devices lazily, at the next search."""
        self._host, self._start, self._count = keys, start, len(keys)

    def _place(self, min_chunk: int) -> None:
        """Put the covered rows on the devices, each scanning its rows in chunks of >= min_chunk rows."""
        placed = (self._start, self._count)
        if self._keys is not None and self._placed == placed and self._chunk >= min(min_chunk, self.chunk_rows):
            return
        rows = self._host[self._start:self._count]
        n_dev = self.mesh.devices.size
        per_device = max(1, math.ceil(len(rows) / n_dev))
        chunk = min(self.chunk_rows, 1 << max(0, (per_device - 1).bit_length()))
        chunk = max(chunk, 1 << max(0, (min_chunk - 1).bit_length()))
        per_device = chunk * (1 << max(0, (math.ceil(per_device / chunk) - 1).bit_length()))  # power-of-2 chunks
        padded = np.zeros((per_device * n_dev, self.dim), np.float16)
        padded[:len(rows)] = rows
        sharding = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
        self._keys = jax.device_put(padded, sharding)
        norms = np.sum(np.square(padded, dtype=np.float32), axis=1)
        self._norms = jax.device_put(norms, sharding)
        self._placed = placed
        self._per_device, self._chunk = per_device, chunk

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dists [q, k] float32, ids [q, k] int64 global row ids) of the k nearest synced rows."""
        n = self._count - self._start
        if n <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        k = min(k, n)
        self._place(min_chunk=max(k, 64))
        fn = _exact_search_fn(self.mesh, self._per_device, self._chunk, k, self.approx, self.recall_target)
        out_d, out_i = [], []
        # queries are padded to a power of two (>= 64, <= query_batch): a handful of compiled shapes, and a
        # small search does not pay for a full batch
        qb = min(self.query_batch, max(64, 1 << max(0, (len(queries) - 1).bit_length())))
        for s in range(0, len(queries), qb):
            q = np.zeros((qb, self.dim), np.float32)
            part = queries[s:s + qb]
            q[:len(part)] = part
            d, i = fn(jnp.asarray(q), self._keys, self._norms, jnp.int32(n))
            out_d.append(np.asarray(d)[:len(part), :k])
            out_i.append(np.asarray(i)[:len(part), :k].astype(np.int64) + self._start)
        return np.concatenate(out_d), np.concatenate(out_i)

    def compact(self, keys: np.ndarray) -> None:
        self.sync(keys)

    # The exact index is rebuilt from the stored keys on open: nothing to serialize.
    def commit_state(self, store) -> dict[str, Any]:
        """What a commit record holds for this index: nothing (it is rebuilt from the keys)."""
        return {}

    def load(self, store, keys: np.ndarray, state: dict[str, Any] | None = None) -> None:
        """Cover the committed `keys`."""
        self.sync(keys)


# ----------------------------------------------------------------------------- ScaNN (segmented)
def scann_available() -> bool:
    try:
        _import_scann()
        return True
    except RuntimeError:
        return False


def _import_scann():
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"backend='scann' needs ScaNN, which is only built for x86-64 Linux (this is "
                           f"{platform.system()} {platform.machine()}); use backend='exact'")
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError as e:
        raise RuntimeError(f"backend='scann' needs the scann package (pip install 'scann>=1.4,<1.5'): {e}; "
                           "or use backend='exact'") from None
    return scann_ops_pybind


@dataclasses.dataclass(frozen=True)
class ScannOptions:
    """How segments are built and searched (tree + AH + reorder, kNN-LM-style)."""

    segment_rows: int = 65536          # delta size that triggers freezing a new segment
    max_segments: int = 8              # more segments than this -> compact them into one
    leaves_per_sqrt_n: float = 1.0     # num_leaves = leaves_per_sqrt_n * sqrt(n)
    leaves_to_search: float = 0.05     # fraction of a segment's leaves probed per query
    min_leaves_to_search: int = 32     # ... but at least this many (small segments need a larger fraction)
    reorder: int = 16                  # exact re-scoring of reorder * k AH candidates (> k)
    dims_per_block: int = 2            # AH: dimensions per 4-bit code (2 = ScaNN's accurate setting)
    training_sample: int = 100_000
    threads: int = 0                   # 0 = ScaNN's default


@dataclasses.dataclass
class _Segment:
    start: int
    end: int
    name: str
    searcher: Any
    leaves: int = 0            # tree partitions (0: brute-force AH, no tree)
    files: dict[str, str] | None = None     # file name -> SHA-256 once written (None: not on disk yet)


class ScannIndex:
    """Frozen ScaNN segments over rows [0, frozen_end) plus an exact JAX delta over [frozen_end, n)."""

    name = "scann"

    def __init__(self, dim: int, options: ScannOptions = ScannOptions(), *, mesh: Mesh | None = None):
        self.scann = _import_scann()
        self.dim, self.opts = dim, options
        self.segments: list[_Segment] = []
        self.delta = ExactIndex(dim, mesh=mesh)

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.opts)

    @property
    def frozen_end(self) -> int:
        return self.segments[-1].end if self.segments else 0

    def _leaves(self, n: int) -> int:
        leaves = int(self.opts.leaves_per_sqrt_n * math.sqrt(n))
        return leaves if leaves >= 16 and n >= 4 * leaves else 0

    def _probe(self, leaves: int) -> int:
        return min(leaves, max(self.opts.min_leaves_to_search, round(leaves * self.opts.leaves_to_search), 1))

    def _segment(self, keys: np.ndarray, start: int, end: int) -> _Segment:
        return _Segment(start, end, f"segment-{start:012d}-{end:012d}-{secrets.token_hex(4)}",
                        self._build(keys[start:end]), self._leaves(end - start))

    def _build(self, rows: np.ndarray):
        n = len(rows)
        builder = self.scann.builder(np.ascontiguousarray(rows, np.float32), 10, "squared_l2")
        leaves = self._leaves(n)
        if leaves:
            # random_init=False: ScaNN's k-means++ start is seeded, its random start is not; a segment
            # must be the same on every build so a resumed run (or a rebuilt segment) gives the same numbers
            builder = builder.tree(num_leaves=leaves, num_leaves_to_search=self._probe(leaves),
                                   training_sample_size=min(n, max(self.opts.training_sample, 4 * leaves)),
                                   random_init=False)
        bpb = self.opts.dims_per_block if self.dim % self.opts.dims_per_block == 0 else 1
        builder = builder.score_ah(bpb, anisotropic_quantization_threshold=float("nan")).reorder(64)
        searcher = builder.build()
        if self.opts.threads:
            searcher.set_num_threads(self.opts.threads)
        return searcher

    def sync(self, keys: np.ndarray, start: int = 0) -> None:
        """Freeze full deltas into segments, compact when there are too many, refresh the delta."""
        while len(keys) - self.frozen_end >= self.opts.segment_rows:
            s = self.frozen_end
            e = s + self.opts.segment_rows
            self.segments.append(self._segment(keys, s, e))
        if len(self.segments) > self.opts.max_segments:
            e = self.frozen_end
            self.segments = [self._segment(keys, 0, e)]
        self.delta.sync(keys, self.frozen_end)

    def compact(self, keys: np.ndarray) -> None:
        """Freeze the delta and merge every segment into one (e.g. after a bulk load, before serving)."""
        if len(keys) and (len(self.segments) != 1 or self.frozen_end != len(keys)):
            self.segments = [self._segment(keys, 0, len(keys))]
        self.delta.sync(keys, self.frozen_end)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from every segment (approximate, reordered) and the exact delta, merged."""
        queries = np.ascontiguousarray(queries, np.float32)
        cand_d, cand_i = [], []
        for seg in self.segments:
            kk = min(k, seg.end - seg.start)
            probe = self._probe(seg.leaves) if seg.leaves else None
            ids, d = seg.searcher.search_batched_parallel(queries, final_num_neighbors=kk, leaves_to_search=probe,
                                                          pre_reorder_num_neighbors=max(kk * self.opts.reorder, kk + 1))
            cand_d.append(np.asarray(d, np.float32))
            cand_i.append(np.asarray(ids, np.int64) + seg.start)
        d, i = self.delta.search(queries, k)
        cand_d.append(d)
        cand_i.append(i)
        dists, ids = np.concatenate(cand_d, 1), np.concatenate(cand_i, 1)
        return merge_topk(dists, ids, min(k, dists.shape[1]))

    # ------------------------------------------------------------------ persistence (next to the data)
    def commit_state(self, store) -> dict[str, Any]:
        """Write every segment not yet on disk and return the segment list a commit record holds.

        A segment's files go under `index/<name>/`, where the name is unique to that build (rows and a
        random suffix), so a directory is only ever written by one build and a rebuild after a crash never
        mixes with a killed build's files; each file is written atomically and its SHA-256 listed.
        """
        for seg in self.segments:
            if seg.files is not None:
                continue
            files = {}
            with tempfile.TemporaryDirectory() as tmp:
                seg.searcher.serialize(tmp, relative_path=True)
                for f in sorted(Path(tmp).iterdir()):
                    data = f.read_bytes()
                    store.write_bytes(f"index/{seg.name}/{f.name}", data)
                    files[f.name] = hashlib.sha256(data).hexdigest()
            seg.files = files
        return {"segments": [{"start": s.start, "end": s.end, "name": s.name, "files": s.files}
                             for s in self.segments], "options": self.options()}

    def load(self, store, keys: np.ndarray, state: dict[str, Any] | None = None) -> None:
        """Reload the committed segments (those within the committed rows, contiguous from row 0, whose
        files check out) and rebuild the rest: a segment that is missing or fails its checksum is rebuilt
        from the keys with a warning, never trusted."""
        listing = (state or {}).get("segments", [])
        self.segments = []
        for s in listing:
            if s["end"] > len(keys) or s["start"] != self.frozen_end:
                break
            searcher = self._read_segment(store, s)
            if searcher is None:
                break
            self.segments.append(_Segment(s["start"], s["end"], s["name"], searcher,
                                          self._leaves(s["end"] - s["start"]), files=s.get("files")))
        self.sync(keys)

    def _read_segment(self, store, s: dict[str, Any]):
        expected = s.get("files")           # None: a version-1 store (no checksums)
        names = sorted(expected) if expected is not None else store.list_keys(f"index/{s['name']}/")
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                data = store.read_bytes(f"index/{s['name']}/{name}")
                if data is None or (expected is not None and hashlib.sha256(data).hexdigest() != expected[name]):
                    log.warning("index segment %s: file %s is %s; rebuilding the segment from the keys", s["name"],
                                name, "missing" if data is None else "damaged (checksum mismatch)")
                    return None
                (Path(tmp) / name).write_bytes(data)
            if not names:
                return None
            try:
                searcher = self.scann.load_searcher(tmp)
            except Exception as e:     # ScaNN raises its own error types on unreadable files
                log.warning("index segment %s cannot be loaded (%s); rebuilding it from the keys", s["name"], e)
                return None
        if self.opts.threads:
            searcher.set_num_threads(self.opts.threads)
        return searcher


def make_index(backend: str, dim: int, options: dict[str, Any] | None = None, mesh: Mesh | None = None):
    """The index object for a backend name ("exact" | "scann")."""
    options = dict(options or {})
    if backend == "exact":
        allowed = {"approx", "recall_target", "chunk_rows"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"unknown exact-index option(s) {sorted(unknown)} (valid: {sorted(allowed)})")
        return ExactIndex(dim, mesh=mesh, **options)
    if backend == "scann":
        fields = {f.name for f in dataclasses.fields(ScannOptions)}
        unknown = set(options) - fields
        if unknown:
            raise ValueError(f"unknown scann-index option(s) {sorted(unknown)} (valid: {sorted(fields)})")
        return ScannIndex(dim, ScannOptions(**options), mesh=mesh)
    raise ValueError(f"unknown datastore backend {backend!r} (valid: 'exact', 'scann')")
