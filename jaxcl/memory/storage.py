"""Small control files a datastore commits, written so that no reader ever sees one torn or mixed.

Why this module exists: tensorstore's `file` kvstore writes a key through a sibling `<key>.__lock` file
that it renames over the key, and a writer killed mid-write leaves that file behind; the next write of
the key reuses it *without truncating*, so a shorter new value ends in stale bytes (reproduced: 50 new
bytes over a stale 120-byte lock leave a 120-byte file). Bulk zarr chunks are immune (every chunk write
is full-size); small control files are not. So control files never go through that path:

- **Local paths** (and `file://` URLs): write a fresh temporary (`O_EXCL`, unique name) in the same
  directory, fsync it, `os.replace` it over the key, fsync the directory. POSIX rename is atomic, so a
  reader sees the old bytes or the new bytes; a kill leaves at most a temporary, which `StoreFiles`
  removes when a writer opens the store.
- **Object stores** (`gs://`, `s3://`, ... through tensorstore): one PUT per key. An object upload is
  all-or-nothing and replaces the whole object, so the same old-or-new guarantee holds without rename
  (which object stores do not have atomically).

`CommitLog` builds the commit protocol on top: every commit is a *new* key `commits/<seq>.json` holding
the committed state and a SHA-256 of it; the newest record that parses and checks out wins, older ones
are kept (the last `keep`) so that a record damaged outside jaxcl's control falls back to its
predecessor instead of losing the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from jaxcl.atomic_io import TMP_MARK, atomic_write_file, writer_alive
from jaxcl.errors import DatastoreError

log = logging.getLogger(__name__)

__all__ = ["StoreFiles", "CommitLog", "CommitError", "is_local", "local_path"]


class CommitError(DatastoreError):
    """No valid commit record where the store says there should be one."""


def is_local(path: str) -> bool:
    """True for a plain filesystem path or a `file://` URL (anything else goes through tensorstore)."""
    path = str(path)
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> Path:
    """The filesystem path of a local store path (`file://` prefix removed), absolute."""
    path = str(path)
    return Path(path[len("file://"):] if path.startswith("file://") else path).absolute()


class StoreFiles:
    """Whole-value reads and atomic writes of small files under a store root (local or object store).

    `read_bytes(key)` -> bytes | None; `write_bytes(key, data)` (atomic, see the module doc);
    `delete(key)`; `list_keys(prefix)` -> names below `prefix` (sorted, temporaries excluded);
    `sizes(prefix, names)` -> which of the keys exist and their sizes; `where(key)` -> its path or URL;
    `remove_temporaries()` deletes what killed writers left (temporaries of live processes are kept).
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.local = is_local(self.path)
        if self.local:
            self.root = local_path(self.path)
            self.kv = None
        else:
            import tensorstore as ts
            self.root = None
            self.kv = ts.KvStore.open(self.path.rstrip("/") + "/").result()

    def read_bytes(self, key: str) -> bytes | None:
        if self.local:
            try:
                return (self.root / key).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
        r = self.kv.read(key).result()
        return bytes(r.value) if r.state == "value" else None

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.local:
            atomic_write_file(self.root / key, bytes(data))
        else:
            self.kv.write(key, bytes(data)).result()

    def delete(self, key: str) -> None:
        if self.local:
            (self.root / key).unlink(missing_ok=True)
        else:
            self.kv.delete(key).result()

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under `prefix` (a folder, e.g. an orphaned index segment)."""
        if self.local:
            import shutil
            shutil.rmtree(self.root / prefix, ignore_errors=True)
        else:
            import tensorstore as ts
            self.kv.delete_range(ts.KvStore.KeyRange(prefix, prefix + "\xff")).result()

    def list_keys(self, prefix: str) -> list[str]:
        """Names of the keys under `prefix` (relative to it, recursive), sorted; temporaries excluded."""
        if self.local:
            base = self.root / prefix
            if not base.is_dir():
                return []
            return sorted(str(p.relative_to(base)) for p in base.rglob("*")
                          if p.is_file() and TMP_MARK not in p.name and not p.name.endswith(".__lock"))
        import tensorstore as ts
        keys = self.kv.list(ts.KvStore.KeyRange(prefix, prefix + "\xff")).result()
        return sorted(k.decode()[len(prefix):] for k in keys)

    def where(self, key: str) -> str:
        """`key` as a user names it in a message: the file's absolute path, or the object's URL."""
        return str(self.root / key) if self.local else f"{self.path.rstrip('/')}/{key}"

    def sizes(self, prefix: str, names: list[str]) -> dict[str, int | None]:
        """Sizes in bytes of those keys `prefix + name` that exist (missing ones are left out); None where a
        size is not known without reading the object. Never reads a value and never writes.

        Local: one `stat` per name. Object stores: one listing of `prefix` (existence only: an upload
        is all-or-nothing, so an object is never short; what it holds is checked when it is read).
        """
        if self.local:
            out: dict[str, int | None] = {}
            for name in names:
                try:
                    out[name] = (self.root / prefix / name).stat().st_size
                except (FileNotFoundError, NotADirectoryError):
                    pass
            return out
        present = set(self.list_keys(prefix))
        return {name: None for name in names if name in present}

    def remove_temporaries(self, prefixes: tuple[str, ...] = ("", "commits", "index")) -> int:
        """Delete temporaries left by killed writers under the given folders; returns how many."""
        if not self.local:
            return 0
        removed = 0
        for prefix in prefixes:
            base = self.root / prefix
            if not base.is_dir():
                continue
            found = base.rglob(f"*{TMP_MARK}*") if prefix else base.glob(f".*{TMP_MARK}*")
            for p in found:
                if p.is_file() and not writer_alive(p.name):
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed


def _digest(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class CommitLog:
    """Append-only, checksummed commit records `commits/<seq:016d>.json` in a `StoreFiles`.

    `latest()` -> (seq, body) of the newest record that parses and whose SHA-256 matches, or None when
    there is no record at all. `commit(body)` writes record seq+1 (a key never written before) and then
    deletes records older than the newest `keep`. A record that fails its checksum is skipped with a
    warning (it can only be damaged from outside: jaxcl's writes are atomic) and never overwritten.
    """

    PREFIX = "commits/"

    def __init__(self, files: StoreFiles, keep: int = 4):
        self.files, self.keep = files, keep
        self._last_seq: int | None = None

    def _seqs(self) -> list[int]:
        out = []
        for name in self.files.list_keys(self.PREFIX):
            stem = name[:-len(".json")] if name.endswith(".json") else ""
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        seqs = self._seqs()
        self._last_seq = seqs[-1] if seqs else 0
        for seq in reversed(seqs):
            raw = self.files.read_bytes(f"{self.PREFIX}{seq:016d}.json")
            try:
                record = json.loads(raw)
                body = record["body"]
                if record.get("sha256") != _digest(body) or body.get("seq") != seq:
                    raise ValueError("checksum mismatch")
            except (TypeError, ValueError, KeyError, AttributeError) as e:
                log.warning("%s: commit record %d is damaged (%s); falling back to the one before",
                            self.files.path, seq, e)
                continue
            return seq, body
        if seqs:
            raise CommitError(f"{self.files.path!r}: none of the {len(seqs)} commit records under commits/ is "
                              "valid (every one fails its checksum): the store was damaged from outside")
        return None

    def commit(self, body: dict[str, Any]) -> int:
        """Write `body` as the next record (the commit point); returns its sequence number."""
        if self._last_seq is None:
            self.latest()
        seq = self._last_seq + 1
        body = dict(body, seq=seq)
        record = {"body": body, "sha256": _digest(body)}
        self.files.write_bytes(f"{self.PREFIX}{seq:016d}.json", json.dumps(record, indent=1).encode())
        self._last_seq = seq
        for old in self._seqs()[:-self.keep]:
            self.files.delete(f"{self.PREFIX}{old:016d}.json")
        return seq

    def kept_bodies(self) -> list[dict[str, Any]]:
        """Bodies of every record still on disk that checks out (newest last)."""
        out = []
        for seq in self._seqs():
            raw = self.files.read_bytes(f"{self.PREFIX}{seq:016d}.json")
            try:
                record = json.loads(raw)
                if record.get("sha256") == _digest(record["body"]):
                    out.append(record["body"])
            except (TypeError, ValueError, KeyError, AttributeError):
                continue
        return out
