"""A persistent, append-only kNN-LM datastore: float16 keys `[n, d]` and int32 values `[n]`.

Layout under `path` (a local directory or any tensorstore kvstore URL, e.g. `gs://bucket/store`):

    manifest.json   format, dim, key/value types, model fingerprint, tokenizer, backend, *count*
    keys/           zarr array float16 [capacity, dim] (rows >= count are not part of the store)
    values/         zarr array int32 [capacity]
    index.json, index/<segment>/...   the ScaNN backend's frozen segments (see `jaxcl.memory.index`)

Crash safety: `add` writes the new rows first and waits until tensorstore reports them written
(the file kvstore writes each chunk to a temporary file and renames it, so a chunk holding committed
rows is always either its old or its new version), and only then rewrites `manifest.json` with the
new count (again written whole and renamed). A process killed mid-append leaves the last committed
count and every committed row intact; the rows past the count are ignored and overwritten later.

Multi-host: with `jax.process_count() > 1` every process owns the rows it adds, stored under
`path/process-<i>`; `search` runs on each process's rows and merges all processes' top-k lists
(every process must call it with the same queries). Global row ids number process 0's rows first,
then process 1's, and so on; `values` is the concatenation in that order.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from jaxcl.memory.index import make_index, merge_topk

__all__ = ["Datastore", "DatastoreError", "params_fingerprint"]

FORMAT = "jaxcl.datastore"
VERSION = 1
MAX_ROWS = 1 << 40            # the zarr arrays' nominal shape: chunks are only written where rows exist


class DatastoreError(ValueError):
    """A path that is not a datastore, or a store that does not match what the caller expects."""


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
    if "://" in path:
        return path.rstrip("/") + "/"
    import os
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


class _Files:
    """Small whole-file reads and atomic writes in the store's kvstore (manifest, index segments)."""

    def __init__(self, path: str):
        self.kv = ts.KvStore.open(_kvstore_spec(path)).result()

    def read_bytes(self, key: str) -> bytes | None:
        r = self.kv.read(key).result()
        return bytes(r.value) if r.state == "value" else None

    def write_bytes(self, key: str, data: bytes) -> None:
        self.kv.write(key, data).result()

    def read_json(self, key: str, default: Any = None) -> Any:
        raw = self.read_bytes(key)
        return default if raw is None else json.loads(raw)

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, json.dumps(value, indent=1).encode())

    def list_keys(self, prefix: str) -> list[str]:
        keys = self.kv.list(ts.KvStore.KeyRange(prefix, prefix + "\xff")).result()
        return sorted(k.decode()[len(prefix):] for k in keys)


def _open_arrays(path: str, dim: int, chunk_rows: int, create: bool):
    base = _kvstore_spec(path)
    def spec(name, shape, chunks, dtype):
        kv = dict(base, path=base["path"] + name + "/") if isinstance(base, dict) else base + name + "/"
        s = {"driver": "zarr", "kvstore": kv}
        if create:
            s["metadata"] = {"shape": shape, "chunks": chunks, "dtype": dtype, "compressor": None}
        return s
    keys = ts.open(spec("keys", [MAX_ROWS, dim], [chunk_rows, dim], "<f2"), create=create, open=not create).result()
    values = ts.open(spec("values", [MAX_ROWS], [chunk_rows * 16], "<i4"), create=create, open=not create).result()
    return keys, values


class Datastore:
    """Keys `[n, d]` float16 -> values `[n]` int32 with a nearest-neighbour index.

        ds = Datastore.create(path, dim=d, backend="scann")   # or "exact"
        ds.add(keys, values)                                   # keys [n, d] float, values [n] int
        dists, ids = ds.search(queries, k)                     # squared L2, ascending; ids index ds.values
    """

    def __init__(self, path: str, manifest: dict[str, Any], *, mesh=None, distributed: bool | None = None,
                 _root: str | None = None):
        self.path, self.manifest = str(path), manifest
        self.root = _root or self.path
        self.dim = int(manifest["dim"])
        self.distributed = jax.process_count() > 1 if distributed is None else distributed
        self._files = _Files(self.path)
        self._keys_ts, self._values_ts = _open_arrays(self.path, self.dim, manifest["chunk_rows"], create=False)
        count = int(manifest["count"])
        self._keys = np.empty((max(1024, count), self.dim), np.float16)        # host copy, grown by doubling
        self._values = np.empty((max(1024, count),), np.int32)
        if count:
            self._keys[:count] = self._keys_ts[:count].read().result()
            self._values[:count] = self._values_ts[:count].read().result()
        self._count = count
        self.index = make_index(manifest["backend"], self.dim, manifest.get("index_options"), mesh)
        self.index.load(self._files, self.keys)
        self._global_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ create / open
    @staticmethod
    def _shard_path(path: str, distributed: bool | None) -> str:
        distributed = jax.process_count() > 1 if distributed is None else distributed
        return f"{str(path).rstrip('/')}/process-{jax.process_index():05d}" if distributed else str(path)

    @classmethod
    def create(cls, path: str, dim: int, backend: str = "exact", *, model_fingerprint: str = "",
               tokenizer: str = "", chunk_rows: int = 4096, index_options: dict[str, Any] | None = None,
               mesh=None, distributed: bool | None = None) -> "Datastore":
        """A new, empty store at `path`; refuses to overwrite an existing one."""
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"datastore dim must be a positive integer, got {dim!r}")
        make_index(backend, int(dim), index_options, mesh)          # fails early on a bad backend/options
        shard = cls._shard_path(path, distributed)
        files = _Files(shard)
        if files.read_bytes("manifest.json") is not None:
            raise FileExistsError(f"{shard!r} already holds a datastore: open it with Datastore.open, "
                                  "or choose another path (nothing was changed)")
        _open_arrays(shard, int(dim), chunk_rows, create=True)
        manifest = {"format": FORMAT, "version": VERSION, "dim": int(dim), "count": 0, "key_dtype": "float16",
                    "value_dtype": "int32", "backend": backend, "index_options": dict(index_options or {}),
                    "model_fingerprint": model_fingerprint, "tokenizer": tokenizer, "chunk_rows": int(chunk_rows)}
        files.write_json("manifest.json", manifest)
        return cls(shard, manifest, mesh=mesh, distributed=distributed, _root=str(path))

    @classmethod
    def open(cls, path: str, *, model_fingerprint: str | None = None, mesh=None,
             distributed: bool | None = None) -> "Datastore":
        """Reopen a store at its last committed count; `model_fingerprint`, when given, must match."""
        shard = cls._shard_path(path, distributed)
        try:
            manifest = _Files(shard).read_json("manifest.json")
        except (ValueError, json.JSONDecodeError) as e:
            raise DatastoreError(f"{shard!r} is not a jaxcl datastore (unreadable manifest.json: {e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DatastoreError(f"{shard!r} is not a jaxcl datastore (no manifest.json with format {FORMAT!r})")
        if manifest.get("version") != VERSION:
            raise DatastoreError(f"{shard!r}: datastore format version {manifest.get('version')} is not supported "
                                 f"(this jaxcl reads version {VERSION})")
        if model_fingerprint is not None and manifest["model_fingerprint"] != model_fingerprint:
            raise DatastoreError(f"{shard!r} holds keys of model {manifest['model_fingerprint']!r}, not of "
                                 f"{model_fingerprint!r}: its keys are not comparable with this model's queries")
        return cls(shard, manifest, mesh=mesh, distributed=distributed, _root=str(path))

    # ------------------------------------------------------------------ contents
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
        is written; the count in the manifest moves only after the rows are durable.
        """
        keys, values = self._check_rows(keys, values)
        n, start = len(keys), self._count
        if n == 0:
            return range(start, start)
        end = start + n
        write_k = self._keys_ts[start:end].write(keys)
        write_v = self._values_ts[start:end].write(values)
        write_k.result()
        write_v.result()
        self._files.write_json("manifest.json", dict(self.manifest, count=end))      # the commit point
        self.manifest = dict(self.manifest, count=end)
        if end > len(self._keys):
            cap = 1 << math.ceil(math.log2(end))
            grown_k = np.empty((cap, self.dim), np.float16)
            grown_k[:start] = self._keys[:start]
            grown_v = np.empty((cap,), np.int32)
            grown_v[:start] = self._values[:start]
            self._keys, self._values = grown_k, grown_v
        self._keys[start:end] = keys
        self._values[start:end] = values
        self._count = end
        self.index.sync(self.keys)
        self.index.save(self._files)
        return range(start, end)

    def compact(self) -> None:
        """Rebuild the index over every committed row as one segment (ScaNN: freezes the delta and merges
        all segments; exact: nothing to do), and save it next to the data."""
        self.index.compact(self.keys)
        self.index.save(self._files)

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
