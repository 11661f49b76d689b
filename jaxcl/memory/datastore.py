"""A persistent, append-only kNN-LM datastore: float16 keys `[n, d]` and int32 values `[n]`.

Layout under `path` (a local directory or any tensorstore kvstore URL, e.g. `gs://bucket/store`):

    manifest.json        format, dim, key/value types, model fingerprint, tokenizer, backend (written once)
    commits/<seq>.json   commit records: the committed row *count*, the index's segment list and a CRC-32
                         of each chunk's committed rows, each record with a SHA-256; the newest valid record
                         is the store's state (`jaxcl.memory.storage`)
    keys/                zarr array float16 [capacity, dim] (rows >= count are not part of the store)
    values/              zarr array int32 [capacity]
    index/<segment>/...  the ScaNN backend's frozen segments (see `jaxcl.memory.index`), checksummed in
                         the commit record that lists them

Crash safety (docs/reliability.md): `add` writes the new rows first and waits until tensorstore reports
them written (a zarr chunk is always written whole through a temporary and renamed, so a chunk holding
committed rows is its old or its new version), builds and writes any new index segment under a fresh
name, and only then writes a *new* commit record — the commit point. Control files never overwrite a
key in place: a commit record is a new key written atomically (temporary + fsync + rename locally, one
all-or-nothing object PUT on object stores). A process killed at any moment leaves the last committed
count, every committed row and a loadable index; rows past the count are ignored and overwritten later,
temporaries are removed when a writer next opens the store. One writer per store (per process shard).
A committed chunk file that is missing, short, undecodable or changed makes `open` raise `DatastoreError`
naming it, and nothing is written (`Datastore`'s docstring says what is checked, and the cost).

Multi-host: with `jax.process_count() > 1` every process owns the rows it adds, stored under
`path/process-<i>`; `search` runs on each process's rows and merges all processes' top-k lists
(every process must call it with the same queries). Global row ids number process 0's rows first,
then process 1's, and so on; `values` is the concatenation in that order.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import zlib
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from jaxcl.errors import one_line, root_message
from jaxcl.memory.index import make_index, merge_topk
from jaxcl.memory.storage import CommitError, CommitLog, StoreFiles, is_local, local_path

__all__ = ["Datastore", "DatastoreError", "params_fingerprint"]

log = logging.getLogger(__name__)

FORMAT = "jaxcl.datastore"
VERSION = 2                   # 2: count and index listing in commit records (1: in manifest.json / index.json)
MAX_ROWS = 1 << 40            # the zarr arrays' nominal shape: chunks are only written where rows exist
READ_AHEAD_BYTES = 256 << 20  # chunk reads in flight while a store is opened (bounds the extra memory)


from jaxcl.errors import DatastoreError  # noqa: E402  (re-exported: jaxcl.memory.DatastoreError)


def params_fingerprint(params: Any) -> str:
    """A short hash of a parameter tree (shapes and values), recorded in the manifest so that keys
    from one model are never mixed with queries from another."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda t: jax.tree_util.keystr(t[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def _kvstore_spec(path: str) -> dict | str:
    path = str(path)
    if is_local(path):
        return {"driver": "file", "path": str(local_path(path)) + "/"}
    return path.rstrip("/") + "/"


_WAY_FORWARD = ("restore the file from a backup of the store, or rebuild the memory (delete the datastore "
                "and run what built it again); nothing was changed")


def _open_arrays(path: str, dim: int, chunk_rows: int, create: bool, files: StoreFiles | None = None):
    """The keys and values zarr arrays; `create` replaces arrays left by a create that never committed.

    Opening (not `create`) reads only each array's `.zarray`; one that is missing or unreadable raises
    `DatastoreError` naming it (`files` gives its path in the message).
    """
    base = _kvstore_spec(path)
    def spec(name, shape, chunks, dtype):
        kv = dict(base, path=base["path"] + name + "/") if isinstance(base, dict) else base + name + "/"
        s = {"driver": "zarr", "kvstore": kv}
        if create:
            s["metadata"] = {"shape": shape, "chunks": chunks, "dtype": dtype, "compressor": None}
        return s
    kw = {"create": True, "delete_existing": True} if create else {"open": True}
    arrays = []
    for name, shape, chunks, dtype in (("keys", [MAX_ROWS, dim], [chunk_rows, dim], "<f2"),
                                       ("values", [MAX_ROWS], [chunk_rows * 16], "<i4")):
        try:
            arrays.append(ts.open(spec(name, shape, chunks, dtype), **kw).result())
        except Exception as e:           # tensorstore raises ValueError with a status code for any failure
            if create:
                raise
            where = (files or StoreFiles(path)).where(f"{name}/.zarray")
            raise DatastoreError(f"datastore {path!r} is damaged: {where} (the {name} array's description) is "
                                 f"missing or unreadable ({root_message(e)}); {_WAY_FORWARD}") from None
    return tuple(arrays)


@dataclasses.dataclass(frozen=True)
class _ChunkGrid:
    """Where one zarr array's rows live: chunk c holds rows [c * rows, (c + 1) * rows) in the file
    `<name>/<key(c)>`, of exactly `nbytes` bytes (every chunk write is full-size; None if compressed)."""

    name: str
    rows: int
    ndim: int
    separator: str
    nbytes: int | None

    @classmethod
    def of(cls, name: str, array) -> _ChunkGrid:
        meta = array.spec().to_json()["metadata"]
        chunks = [int(c) for c in meta["chunks"]]
        raw = meta.get("compressor") is None and not meta.get("filters")
        return cls(name, chunks[0], len(chunks), meta.get("dimension_separator") or ".",
                   math.prod(chunks) * np.dtype(meta["dtype"]).itemsize if raw else None)

    def key(self, c: int) -> str:
        """Chunk c's key under the array (zarr v2: chunk indices joined by the separator)."""
        return self.separator.join([str(c)] + ["0"] * (self.ndim - 1))

    def chunks(self, count: int) -> int:
        """How many chunks rows [0, count) occupy."""
        return -(-int(count) // self.rows)


def _crc32(rows: np.ndarray) -> str:
    return f"{zlib.crc32(np.ascontiguousarray(rows)) & 0xFFFFFFFF:08x}"


def _read_manifest(files: StoreFiles, where: str) -> dict[str, Any]:
    raw = files.read_bytes("manifest.json")
    try:
        manifest = None if raw is None else json.loads(raw)
    except ValueError as e:
        raise DatastoreError(f"{where!r} is not a jaxcl datastore (unreadable manifest.json: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatastoreError(f"{where!r} is not a jaxcl datastore (no manifest.json with format {FORMAT!r})")
    if manifest.get("version") not in (1, VERSION):
        raise DatastoreError(f"{where!r}: datastore format version {manifest.get('version')} is not supported "
                             f"(this jaxcl reads versions 1 and {VERSION})")
    return manifest


class Datastore:
    """Keys `[n, d]` float16 -> values `[n]` int32 with a nearest-neighbour index.

        ds = Datastore.create(path, dim=d, backend="scann")   # or "exact"
        ds.add(keys, values)                                   # keys [n, d] float, values [n] int
        dists, ids = ds.search(queries, k)                     # squared L2, ascending; ids index ds.values

    Damaged chunk files (docs/reliability.md): tensorstore reads a missing zarr chunk as its fill value,
    so a store is never trusted to hold the rows its commit counts. Opening a store checks, before any
    row is read and without writing anything, that every chunk file rows [0, count) of `keys/` and
    `values/` occupy exists and (local stores) has the exact size of a chunk: one `stat` per chunk file
    (an object store: one listing per array). It then reads every committed row once into host memory
    (as it always did: search and `values` are served from that copy and never read a chunk again, so a
    file that disappears after open cannot change an answer) and checks each chunk's committed rows
    against the CRC-32 that the commit record lists for it (records written since checksums were added;
    older records get the existence and size checks). A missing, short or undecodable chunk file, or one
    whose bytes changed, raises `DatastoreError`: one line naming the store and the file, and the way
    forward. Cost at scale: the stats are negligible (thousands of chunks: milliseconds); the CRC runs
    at several GB/s over bytes open reads anyway; a commit record grows by ~16 bytes per chunk (a
    4096-row chunk of 1024-dim keys is 8 MiB: 200 KiB of record per 100 GiB of keys), and each `add`
    checksums only the chunks it touched.
    """

    def __init__(self, path: str, manifest: dict[str, Any], *, mesh=None, distributed: bool | None = None,
                 _root: str | None = None, _files: StoreFiles | None = None):
        self.path, self._manifest = str(path), {k: v for k, v in manifest.items() if k != "count"}
        self.root = _root or self.path
        self.dim = int(manifest["dim"])
        self.distributed = jax.process_count() > 1 if distributed is None else distributed
        self._files = _files or StoreFiles(self.path)
        self._log = CommitLog(self._files)
        latest = self._log.latest()
        if latest is None:     # version 1 (or a store with no commit yet): the manifest's count, index.json
            self._state = {"count": int(manifest.get("count", 0)), "index": self._v1_index_state()}
            self._source = "manifest.json"
        else:
            self._state = latest[1]
            self._source = f"{CommitLog.PREFIX}{latest[0]:016d}.json"
        count, index_state = int(self._state["count"]), self._state.get("index", {})
        self._keys_ts, self._values_ts = _open_arrays(self.path, self.dim, manifest["chunk_rows"], create=False,
                                                      files=self._files)
        self._grids = (_ChunkGrid.of("keys", self._keys_ts), _ChunkGrid.of("values", self._values_ts))
        self._keys = np.empty((max(1024, count), self.dim), np.float16)        # host copy, grown by doubling
        self._values = np.empty((max(1024, count),), np.int32)
        if count:
            self._check_chunk_files(count)
            self._read_rows(count)
        self._count = count
        # Only now (the store checked out) clear what a killed writer left; never part of the store.
        self._files.remove_temporaries()
        self.index = make_index(manifest["backend"], self.dim, manifest.get("index_options"), mesh)
        self.index.load(self._files, self.keys, index_state)
        self._global_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ chunk files
    def _damaged(self, grid: _ChunkGrid, c: int, what: str, more: int = 0) -> DatastoreError:
        count = int(self._state["count"])
        where = self._files.where(f"{grid.name}/{grid.key(c)}")
        also = f" (and {more} more chunk file(s) of the store)" if more else ""
        return DatastoreError(one_line(
            f"datastore {self.path!r} is damaged: {where} {what}{also}; it holds committed rows "
            f"{c * grid.rows}..{min((c + 1) * grid.rows, count) - 1} of the {count} that {self._source} "
            f"counts; {_WAY_FORWARD}", limit=1000))

    def _check_chunk_files(self, count: int) -> None:
        """Raise `DatastoreError` unless every chunk file rows [0, count) occupy exists with a chunk's size.

        Reads no chunk and writes nothing: one `stat` per chunk file locally, one listing per array on an
        object store. Chunks past the count (rows a killed append wrote, or a rollback dropped) are not
        part of the store and are not looked at.
        """
        for grid in self._grids:
            names = [grid.key(c) for c in range(grid.chunks(count))]
            sizes = self._files.sizes(grid.name + "/", names)
            bad = [(c, sizes.get(n, -1)) for c, n in enumerate(names)
                   if n not in sizes or (grid.nbytes is not None and sizes[n] not in (None, grid.nbytes))]
            if bad:
                c, size = bad[0]
                what = ("is missing" if size == -1 else
                        f"is {size} bytes, not the {grid.nbytes} of a chunk (truncated or damaged)")
                raise self._damaged(grid, c, what, more=len(bad) - 1)

    def _read_rows(self, count: int) -> None:
        """Read rows [0, count) of both arrays into the host copies, chunk by chunk, checking each chunk's
        committed rows against the CRC-32 in the commit record (when it lists them).

        A chunk tensorstore cannot decode, or whose rows fail their checksum, raises `DatastoreError`
        naming its file. At most READ_AHEAD_BYTES of chunk reads per array are in flight.
        """
        sums = self._state.get("chunks") or {}
        for grid, array, host in zip(self._grids, (self._keys_ts, self._values_ts), (self._keys, self._values)):
            listed = sums.get(grid.name) or {}
            crcs = listed.get("crc32", []) if listed.get("rows") == grid.rows else []
            window = max(4, READ_AHEAD_BYTES // max(1, grid.rows * host[:1].nbytes))
            pending: collections.deque = collections.deque()
            for c in range(grid.chunks(count)):
                lo, hi = c * grid.rows, min((c + 1) * grid.rows, count)
                pending.append((c, array[lo:hi].read()))
                if len(pending) >= window:
                    self._take_chunk(grid, host, count, crcs, *pending.popleft())
            while pending:
                self._take_chunk(grid, host, count, crcs, *pending.popleft())

    def _take_chunk(self, grid: _ChunkGrid, host: np.ndarray, count: int, crcs: list[str], c: int,
                    future) -> None:
        """Copy chunk c's committed rows from its read into `host`; check them against `crcs[c]` if listed."""
        lo, hi = c * grid.rows, min((c + 1) * grid.rows, count)
        try:
            host[lo:hi] = future.result()
        except Exception as e:           # tensorstore: ValueError with a status code (short, undecodable chunk)
            raise self._damaged(grid, c, f"cannot be decoded ({root_message(e)})") from None
        if c < len(crcs) and _crc32(host[lo:hi]) != crcs[c]:
            raise self._damaged(grid, c, f"does not hold the bytes committed (the CRC-32 of its rows differs "
                                         f"from the one {self._source} lists: changed outside jaxcl)")

    def _chunk_sums(self, count: int, changed_from: int) -> dict[str, Any]:
        """The commit record's per-chunk CRC-32s of rows [0, count): the current record's for chunks wholly
        before row `changed_from`, computed from the host copy for the rest (all of them, the first
        time a store written before checksums commits)."""
        out = {}
        for grid, host in zip(self._grids, (self._keys, self._values)):
            listed = (self._state.get("chunks") or {}).get(grid.name) or {}
            kept = list(listed.get("crc32", [])) if listed.get("rows") == grid.rows else []
            kept = kept[:min(changed_from // grid.rows, grid.chunks(count))]
            for c in range(len(kept), grid.chunks(count)):
                kept.append(_crc32(host[c * grid.rows:min((c + 1) * grid.rows, count)]))
            out[grid.name] = {"rows": grid.rows, "crc32": kept}
        return out

    def _v1_index_state(self) -> dict[str, Any]:
        raw = self._files.read_bytes("index.json")
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            log.warning("%s: index.json of a version-1 store is unreadable; the index is rebuilt", self.path)
            return {}

    @property
    def manifest(self) -> dict[str, Any]:
        """The store's description (format, dim, dtypes, backend, fingerprint, tokenizer, ...) and `count`."""
        return dict(self._manifest, count=self._count)

    # ------------------------------------------------------------------ create / open
    @staticmethod
    def _shard_path(path: str, distributed: bool | None) -> str:
        distributed = jax.process_count() > 1 if distributed is None else distributed
        return f"{str(path).rstrip('/')}/process-{jax.process_index():05d}" if distributed else str(path)

    @classmethod
    def create(cls, path: str, dim: int, backend: str = "exact", *, model_fingerprint: str = "",
               tokenizer: str = "", chunk_rows: int = 4096, index_options: dict[str, Any] | None = None,
               mesh=None, distributed: bool | None = None) -> "Datastore":
        """A new, empty store at `path`; refuses to overwrite an existing one.

        The manifest is written last (atomically): a create killed before it leaves no store, and
        creating again at the same path replaces whatever it left.
        """
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"datastore dim must be a positive integer, got {dim!r}")
        make_index(backend, int(dim), index_options, mesh)          # fails early on a bad backend/options
        shard = cls._shard_path(path, distributed)
        files = StoreFiles(shard)
        if files.read_bytes("manifest.json") is not None:
            raise FileExistsError(f"{shard!r} already holds a datastore: open it with Datastore.open, "
                                  "or choose another path (nothing was changed)")
        for stale in files.list_keys(CommitLog.PREFIX):       # records of a create that never finished
            files.delete(CommitLog.PREFIX + stale)
        _open_arrays(shard, int(dim), chunk_rows, create=True)
        manifest = {"format": FORMAT, "version": VERSION, "dim": int(dim), "key_dtype": "float16",
                    "value_dtype": "int32", "backend": backend, "index_options": dict(index_options or {}),
                    "model_fingerprint": model_fingerprint, "tokenizer": tokenizer, "chunk_rows": int(chunk_rows)}
        files.write_bytes("manifest.json", json.dumps(manifest, indent=1).encode())
        return cls(shard, manifest, mesh=mesh, distributed=distributed, _root=str(path), _files=files)

    @classmethod
    def open(cls, path: str, *, model_fingerprint: str | None = None, mesh=None,
             distributed: bool | None = None) -> "Datastore":
        """Reopen a store at its last committed count; `model_fingerprint`, when given, must match."""
        shard = cls._shard_path(path, distributed)
        files = StoreFiles(shard)
        manifest = _read_manifest(files, shard)
        if model_fingerprint is not None and manifest["model_fingerprint"] != model_fingerprint:
            raise DatastoreError(f"{shard!r} holds keys of model {manifest['model_fingerprint']!r}, not of "
                                 f"{model_fingerprint!r}: its keys are not comparable with this model's queries")
        try:
            return cls(shard, manifest, mesh=mesh, distributed=distributed, _root=str(path), _files=files)
        except CommitError as e:
            raise DatastoreError(str(e)) from None

    def __len__(self) -> int:
        """Rows in the store (all processes' rows when distributed)."""
        return int(self._process_counts().sum()) if self.distributed else self._count

    @property
    def local_count(self) -> int:
        return self._count

    @property
    def keys(self) -> np.ndarray:
        """This process's committed keys `[n, d]` float16 (a view; do not modify)."""
        return self._keys[:self._count]

    @property
    def values(self) -> np.ndarray:
        """Values `[n]` int32 of every row (all processes' rows, in global id order, when distributed)."""
        if not self.distributed:
            return self._values[:self._count]
        counts = self._process_counts()
        if self._global_cache is None or self._global_cache[0] != int(counts.sum()):
            from jax.experimental import multihost_utils
            padded = np.zeros(int(counts.max()), np.int32)
            padded[:self._count] = self._values[:self._count]
            gathered = np.asarray(multihost_utils.process_allgather(padded))       # [processes, max_count]
            flat = np.concatenate([gathered[p, :c] for p, c in enumerate(counts)])
            self._global_cache = (int(counts.sum()), counts, flat)
        return self._global_cache[2]

    def _process_counts(self) -> np.ndarray:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(np.int64(self._count))).reshape(-1)

    # ------------------------------------------------------------------ add
    def _check_rows(self, keys: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
        keys = np.asarray(jax.device_get(keys))
        values = np.asarray(jax.device_get(values))
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape [n, {self.dim}] (the store's dim), got {tuple(keys.shape)}")
        if not (np.issubdtype(keys.dtype, np.floating) or keys.dtype == jax.numpy.bfloat16):
            raise TypeError(f"keys must be floating point, got dtype {keys.dtype}")
        if values.ndim != 1 or len(values) != len(keys):
            raise ValueError(f"values must have shape [{len(keys)}] (one per key), got {tuple(values.shape)}")
        if not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"values must be integer token ids, got dtype {values.dtype}")
        if len(values) and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
            raise ValueError(f"values must be in [0, 2**31), got range [{values.min()}, {values.max()}]")
        keys16 = keys.astype(np.float16)
        if not np.all(np.isfinite(keys16)):
            bad = np.flatnonzero(~np.all(np.isfinite(keys16), axis=1))
            raise ValueError(f"keys contain NaN/inf (or values beyond float16 range) in {len(bad)} row(s), "
                             f"first rows {bad[:5].tolist()}: nothing was added")
        return keys16, values.astype(np.int32)

    def add(self, keys: Any, values: Any) -> range:
        """Append rows and commit them; returns this process's new local row ids.

        keys [n, dim] float (stored as float16), values [n] int. Everything is checked before anything
        is written; the rows, then any new index segment, are durable before the commit record that
        makes them part of the store is written. A kill at any moment keeps the previous commit.
        """
        keys, values = self._check_rows(keys, values)
        n, start = len(keys), self._count
        if n == 0:
            return range(start, start)
        end = start + n
        if end > len(self._keys):
            cap = 1 << math.ceil(math.log2(end))
            grown_k = np.empty((cap, self.dim), np.float16)
            grown_k[:start] = self._keys[:start]
            grown_v = np.empty((cap,), np.int32)
            grown_v[:start] = self._values[:start]
            self._keys, self._values = grown_k, grown_v
        self._keys[start:end] = keys            # past the committed count until the commit below
        self._values[start:end] = values
        # Write from the start of the chunk holding row `start`, from the host copy: the chunk is rewritten
        # whole anyway, and tensorstore then never reads it back (a chunk file lost after open would read
        # as fill values, and those would be written over committed rows).
        k0, v0 = (start - start % g.rows for g in self._grids)
        write_k = self._keys_ts[k0:end].write(self._keys[k0:end])
        write_v = self._values_ts[v0:end].write(self._values[v0:end])
        write_k.result()
        write_v.result()
        self._commit(end, lambda: self.index.sync(self._keys[:end]), changed_from=start)
        return range(start, end)

    def compact(self) -> None:
        """Rebuild the index over every committed row as one segment (ScaNN: freezes the delta and merges
        all segments; exact: nothing to do), and commit it next to the data."""
        self._commit(self._count, lambda: self.index.compact(self.keys), changed_from=self._count)

    def rollback(self, count: int) -> None:
        """Make the first `count` rows (<= the committed count) the whole store, committed like an add.

        For a caller that committed rows and then lost the work that depended on them (e.g. a SeMem run
        resuming from the last chunk it completed). The dropped rows stay on disk until overwritten.
        """
        if not isinstance(count, (int, np.integer)) or not 0 <= count <= self._count:
            raise ValueError(f"rollback count must be an integer in [0, {self._count}] (the committed rows), "
                             f"got {count!r}")
        if count == self._count:
            return
        self._commit(int(count), lambda: self.index.load(self._files, self._keys[:count],
                                                         self._state.get("index", {})), changed_from=int(count))

    def _commit(self, count: int, update_index, changed_from: int) -> None:
        """Bring the index up to date, write its new segments, then the commit record (the commit point).

        The record lists the count, the index's segments and the CRC-32 of each chunk's committed rows
        (`_chunk_sums`; rows before `changed_from` are unchanged since the current record).
        """
        try:
            update_index()
            state = {"count": int(count), "index": self.index.commit_state(self._files),
                     "chunks": self._chunk_sums(count, changed_from)}
            self._log.commit(state)
        except BaseException:
            # Nothing was committed: back to the last commit's view (rows past it are ignored).
            self.index.load(self._files, self.keys, self._state.get("index", {}))
            raise
        self._state, self._count = state, int(count)
        self._global_cache = None
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Delete index segments that no kept commit record lists (built by killed or superseded commits)."""
        referenced = {s["name"] for body in self._log.kept_bodies()
                      for s in body.get("index", {}).get("segments", [])}
        on_disk = {name.split("/", 1)[0] for name in self._files.list_keys("index/")}
        for name in sorted(on_disk - referenced - {s.name for s in getattr(self.index, "segments", [])}):
            self._files.delete_prefix(f"index/{name}/")

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows of each query: (squared-L2 dists [q, k] float32 ascending, ids [q, k] int64).

        Distances are recomputed exactly (float32) from the stored float16 keys for the returned ids,
        whatever the backend. Fewer than k rows in the store -> min(k, len) columns.
        """
        queries = np.asarray(jax.device_get(queries), np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [q, {self.dim}] (the store's dim), got {tuple(queries.shape)}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not np.all(np.isfinite(queries)):
            raise ValueError("queries contain NaN or inf")
        total = len(self)
        if total == 0:
            raise ValueError(f"datastore {self.root!r} is empty: add rows before searching")
        k_out = min(int(k), total)
        if self._count:
            _, ids = self.index.search(queries, min(int(k), self._count))
            dists = self.exact_distances(queries, ids)
            dists, ids = merge_topk(dists, ids, ids.shape[1])
        else:
            dists = np.zeros((len(queries), 0), np.float32)
            ids = np.zeros((len(queries), 0), np.int64)
        if not self.distributed:
            return dists, ids
        return self._merge_across_processes(dists, ids, k_out)

    def exact_distances(self, queries: np.ndarray, ids: np.ndarray, batch: int = 512) -> np.ndarray:
        """||q - key[id]||² in float32 from the stored keys, `[q, k]` (ids < 0 -> inf)."""
        out = np.empty(ids.shape, np.float32)
        for s in range(0, len(queries), batch):
            idx = ids[s:s + batch]
            rows = self._keys[np.maximum(idx, 0)].astype(np.float32)                  # [b, k, d]
            diff = rows - queries[s:s + batch, None, :]
            d = np.einsum("bkd,bkd->bk", diff, diff)
            out[s:s + batch] = np.where(idx >= 0, d, np.inf)
        return out

    def _merge_across_processes(self, dists: np.ndarray, ids: np.ndarray, k: int):
        from jax.experimental import multihost_utils
        counts = self._process_counts()
        offset = int(counts[:jax.process_index()].sum())
        q = len(dists)
        pad_d = np.full((q, k), np.inf, np.float32)
        pad_i = np.full((q, k), -1, np.int64)
        pad_d[:, :dists.shape[1]] = dists
        pad_i[:, :ids.shape[1]] = np.where(ids >= 0, ids + offset, -1)
        all_d = np.asarray(multihost_utils.process_allgather(pad_d))          # [processes, q, k]
        all_i = np.asarray(multihost_utils.process_allgather(pad_i))
        all_d = np.moveaxis(all_d, 0, 1).reshape(q, -1)
        all_i = np.moveaxis(all_i, 0, 1).reshape(q, -1)
        order = np.argsort(all_d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)
