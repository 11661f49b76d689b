"""Reading a committed token cache: a split's token stream by memory map (local) or byte-range reads (URL).

`SplitCache` is one split's stream of framed documents: `read(start, stop)` gives tokens, `document_start(i)`
the token offset of document i. `PackedRows` is the `[n, seq_len]` view training reads: row r is tokens
`[start + r*seq_len, start + (r+1)*seq_len)` of the stream (the ragged tail dropped), so a row costs
one slice of one or two shard files and nothing is held in memory but the rows asked for.
"""

from __future__ import annotations

import json

import numpy as np

from jaxcl.data.cache.layout import FORMAT, MANIFEST
from jaxcl.errors import ConfigError, DataError
from jaxcl.storage import StoreFiles


_RAISED = []


def _more_open_files() -> None:
    """Every mapped shard holds a file descriptor: raise the soft limit to the hard one (once), so a corpus of
    thousands of shards does not hit the usual 1,024."""
    if _RAISED:
        return
    _RAISED.append(True)
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ImportError, ValueError, OSError):
        pass


class SplitCache:
    """One committed split: tokens and document offsets over its shards (opened lazily)."""

    def __init__(self, files: StoreFiles, prefix: str, manifest: dict):
        self.files, self.prefix, self.manifest = files, prefix, manifest
        self.domain, self.split = manifest["domain"], manifest["split"]
        self.dtype = np.dtype(manifest["dtype"])
        shards = manifest["shards"]
        self.names = [s["name"] for s in shards]
        self.token_starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in shards], dtype=np.int64)])
        self.doc_starts = np.concatenate([[0], np.cumsum([s["documents"] for s in shards], dtype=np.int64)])
        self.tokens = int(self.token_starts[-1])
        self.documents = int(self.doc_starts[-1])
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @staticmethod
    def open(files: StoreFiles, prefix: str, tokenizer_fingerprint: str | None = None) -> "SplitCache | None":
        """The committed split under `prefix`, or None when it has no manifest yet. DataError when its manifest
        is damaged, another tokenizer made it, or a shard file is missing or has the wrong size (one listing or
        one stat per file; nothing is read)."""
        raw = files.read_bytes(prefix + MANIFEST)
        if raw is None:
            return None
        where = files.where(prefix + MANIFEST)
        try:
            manifest = json.loads(raw)
            shards = manifest["shards"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{where}: damaged token-cache manifest: delete {files.where(prefix)} and prepare "
                            "again (jaxcl prepare)") from None
        if manifest.get("format") != FORMAT:
            raise DataError(f"{where}: token cache format {manifest.get('format')}, this jaxcl reads {FORMAT}: "
                            "prepare again (jaxcl prepare)")
        if tokenizer_fingerprint is not None and manifest.get("tokenizer") != tokenizer_fingerprint:
            raise DataError(f"{where}: this cache was made with another tokenizer (fingerprint "
                            f"{str(manifest.get('tokenizer'))[:12]}, the run's is {tokenizer_fingerprint[:12]}): "
                            "point data.cache elsewhere or prepare again with this tokenizer")
        itemsize = np.dtype(manifest["dtype"]).itemsize
        names = [f"{s['name']}.{ext}" for s in shards for ext in ("tokens", "docs")]
        sizes = files.sizes(prefix, names)
        for s in shards:
            for ext, size in (("tokens", s["tokens"] * itemsize), ("docs", s["documents"] * 8)):
                name = f"{s['name']}.{ext}"
                if name not in sizes:
                    raise DataError(f"{files.where(prefix + name)}: missing from a committed token cache: delete "
                                    f"{files.where(prefix)} and prepare again")
                if sizes[name] not in (None, size):
                    raise DataError(f"{files.where(prefix + name)}: {sizes[name]} bytes, the manifest says {size}: "
                                    f"the cache was damaged; delete {files.where(prefix)} and prepare again")
        return SplitCache(files, prefix, manifest)

    # ------------------------------------------------------------------ raw access
    def _map(self, shard: int, ext: str) -> np.ndarray:
        key = (shard, ext)
        if key not in self._maps:
            _more_open_files()
            dtype = self.dtype if ext == "tokens" else np.dtype("<u8")
            path = self.files.root / self.prefix / f"{self.names[shard]}.{ext}"
            if path.stat().st_size == 0:
                self._maps[key] = np.zeros((0,), dtype)
            else:
                self._maps[key] = np.memmap(path, dtype=dtype, mode="r")
        return self._maps[key]

    def _ranges(self, shard: int, ext: str, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """Element ranges of one shard file: memory-mapped slices (local) or batched byte-range reads (URL)."""
        if self.files.local:
            m = self._map(shard, ext)
            return [np.asarray(m[a:b]) for a, b in ranges]
        import tensorstore as ts

        dtype = self.dtype if ext == "tokens" else np.dtype("<u8")
        key = f"{self.prefix}{self.names[shard]}.{ext}"
        batch = ts.Batch()
        futures = [self.files.kv.read(key, byte_range=slice(a * dtype.itemsize, b * dtype.itemsize), batch=batch)
                   for a, b in ranges if b > a]
        batch.submit()
        values = iter(f.result().value for f in futures)
        return [np.frombuffer(next(values), dtype) if b > a else np.zeros((0,), dtype) for a, b in ranges]

    def read_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int32 `[len(starts), length]`: tokens `[s, s + length)` of the stream for every start s (each range
        lies inside the stream; one may span shards)."""
        starts = np.asarray(starts, np.int64)
        out = np.empty((len(starts), length), np.int32)
        first = np.searchsorted(self.token_starts, starts, side="right") - 1
        last = np.searchsorted(self.token_starts, starts + length - 1, side="right") - 1
        pieces: dict[int, list[tuple[int, int, int, int]]] = {}     # shard -> (row, col, a, b)
        for row, (s, f, l) in enumerate(zip(starts, first, last)):
            for shard in range(int(f), int(l) + 1):
                lo = max(int(s), int(self.token_starts[shard]))
                hi = min(int(s) + length, int(self.token_starts[shard + 1]))
                base = int(self.token_starts[shard])
                pieces.setdefault(shard, []).append((row, lo - int(s), lo - base, hi - base))
        for shard, items in pieces.items():
            for (row, col, a, b), values in zip(items, self._ranges(shard, "tokens", [(a, b) for _, _, a, b in items])):
                out[row, col:col + b - a] = values
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """int32 tokens `[start, stop)` of the stream."""
        return self.read_rows(np.asarray([start]), stop - start)[0] if stop > start else np.zeros((0,), np.int32)

    def document_start(self, index: int) -> int:
        """Token offset where document `index` starts (`index == documents`: the end of the stream)."""
        if not 0 <= index <= self.documents:
            raise IndexError(index)
        if index == 0:
            return 0
        shard = int(np.searchsorted(self.doc_starts, index, side="left")) - 1     # the shard holding doc index-1
        within = index - 1 - int(self.doc_starts[shard])
        end = int(self._ranges(shard, "docs", [(within, within + 1)])[0][0])
        return int(self.token_starts[shard]) + end

    def document_lengths(self) -> np.ndarray:
        """Token count of every document `[documents]` (reads all offsets: for tests and small splits)."""
        ends = [np.asarray(self._ranges(i, "docs", [(0, s["documents"])])[0], np.int64) + int(self.token_starts[i])
                for i, s in enumerate(self.manifest["shards"])]
        ends = np.concatenate(ends) if ends else np.zeros((0,), np.int64)
        return np.diff(np.concatenate([[0], ends]))

    def rows(self, seq_len: int, documents: tuple[float, float] = (0.0, 1.0), what: str | None = None) -> "PackedRows":
        """The `[n, seq_len]` packed rows of the documents between two fractions of the split (`[0, 0.5]`: the
        first half, rounded down; complementary ranges partition the documents exactly)."""
        lo, hi = (int(self.documents * float(f)) for f in documents)
        return PackedRows(self, seq_len, self.document_start(lo), self.document_start(hi),
                          what or f"domain {self.domain!r} {self.split} split")


class Rows:
    """A read-only `[n, seq_len]` int32 array of training rows, read on demand: `len`, `shape`, indexing with
    an int, a slice or an int array (a copy of just those rows), `np.asarray` (every row: small views only).
    Subclasses implement `take(ids)`."""

    dtype = np.dtype(np.int32)
    ndim = 2
    n: int
    seq_len: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.seq_len)

    def __len__(self) -> int:
        return self.n

    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            raise IndexError(f"row ids outside [0, {self.n})")
        return ids

    def take(self, ids) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows = self[key[0]]
            return rows[(slice(None),) + key[1:]] if rows.ndim == 2 else rows[key[1:]]
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(self.n)))
        if np.isscalar(key):
            index = int(key) + (self.n if int(key) < 0 else 0)
            return self.take([index])[0]
        return self.take(key).reshape(np.shape(key) + (self.seq_len,))

    def __array__(self, dtype=None, copy=None):
        rows = self.take(np.arange(self.n))
        return rows if dtype is None else rows.astype(dtype)


class PackedRows(Rows):
    """Row r = tokens `[start + r*seq_len, start + (r+1)*seq_len)` of a split's stream (the ragged tail dropped)."""

    def __init__(self, split: SplitCache, seq_len: int, start: int, stop: int, what: str):
        self.split, self.seq_len, self.start = split, int(seq_len), int(start)
        self.n = (int(stop) - int(start)) // self.seq_len
        if self.n == 0:
            raise ConfigError(f"{what}: {int(stop) - int(start)} tokens are fewer than data.seq_len={seq_len}")
        self.what = what

    def take(self, ids) -> np.ndarray:
        """int32 `[len(ids), seq_len]`: the rows `ids` (any order, repeats allowed)."""
        return self.split.read_rows(self.start + self._ids(ids) * self.seq_len, self.seq_len)

    def __repr__(self) -> str:
        return f"PackedRows({self.what}, shape={self.shape})"


class SubsetRows(Rows):
    """The rows `ids` of another array of rows (ELLE's memory banks: row ids, not copies)."""

    def __init__(self, rows, ids: np.ndarray):
        self.rows, self.ids = rows, np.asarray(ids, np.int64)
        self.n, self.seq_len = len(self.ids), rows.shape[1]

    def take(self, ids) -> np.ndarray:
        return np.asarray(self.rows[self.ids[self._ids(ids)]], np.int32)


class ConcatRows(Rows):
    """Several arrays of rows end to end (the joint run's union of every domain's rows)."""

    def __init__(self, parts: list):
        self.parts = list(parts)
        self.seq_len = parts[0].shape[1]
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)])
        self.n = int(self.starts[-1])

    def take(self, ids) -> np.ndarray:
        ids = self._ids(ids)
        out = np.empty((len(ids), self.seq_len), np.int32)
        part = np.searchsorted(self.starts, ids, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = np.asarray(self.parts[p][ids[sel] - self.starts[p]], np.int32)
        return out


__all__ = ["ConcatRows", "PackedRows", "Rows", "SplitCache", "SubsetRows"]
