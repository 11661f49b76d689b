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

from jaxcl.errors import DatastoreError
from jaxcl.storage import StoreFiles, is_local, local_path  # noqa: F401  (shared with the token cache)

log = logging.getLogger(__name__)

__all__ = ["StoreFiles", "CommitLog", "CommitError", "is_local", "local_path"]


class CommitError(DatastoreError):
    """No valid commit record where the store says there should be one."""


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
