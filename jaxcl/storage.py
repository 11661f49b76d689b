"""Files under a root that is a local directory or an object-store URL: whole-value reads, atomic writes.

Shared by the kNN-LM datastore (`jaxcl.memory.storage`, which documents the write discipline) and the
token cache (`jaxcl.data.cache`). Local paths (and `file://` URLs) write a unique temporary, fsync it and
rename it over the key; object stores (`gs://`, `s3://`, ... through tensorstore's kvstore) take one
all-or-nothing PUT per key. Either way a reader sees a key's old bytes or its new bytes, never a mix.
"""

from __future__ import annotations

from pathlib import Path

from jaxcl.atomic_io import TMP_MARK, atomic_write_file, writer_alive

__all__ = ["StoreFiles", "is_local", "local_path"]


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

    def __init__(self, path: str, *, via_tensorstore: bool = False):
        """`via_tensorstore`: read and write a `file://` URL through tensorstore's kvstore, as an object store is
        (tests of the object-store path on a local directory)."""
        self.path = str(path)
        self.local = is_local(self.path) and not via_tensorstore
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
            import tensorstore as ts
            self.kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()      # exactly this key

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
