"""Crash-atomic local file and directory replacement: a reader, or a kill at any moment, sees old or new.

Every file jaxcl commits on a local filesystem goes through here (datastore control files, HF exports,
run reports). The building blocks are POSIX guarantees: `rename(2)` within one filesystem is atomic,
`fsync` makes a file's bytes and a directory's entries durable, and Linux's `renameat2(RENAME_EXCHANGE)`
swaps two directories atomically. Temporaries carry the writer's pid (`.<name>.tmp-<pid>-<hex>`) so a
later writer can remove those of dead processes without touching a live writer's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import shutil
from pathlib import Path

__all__ = ["atomic_write_file", "replace_directory", "recover_directory", "temporary_sibling", "writer_alive",
           "check_replaceable", "check_parents", "TMP_MARK"]

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def temporary_sibling(path: Path, mark: str = TMP_MARK) -> Path:
    """A fresh name beside `path` for a temporary of this process: `.<name><mark><pid>-<hex>`."""
    path = Path(path)
    return path.with_name(f".{path.name}{mark}{os.getpid()}-{secrets.token_hex(4)}")


def writer_alive(name: str) -> bool:
    """Whether the process that named a temporary (`...tmp-<pid>-<hex>` / `...old-<pid>-<hex>`) still runs
    on this host (and is not this process)."""
    for mark in (TMP_MARK, OLD_MARK):
        if mark in name:
            try:
                pid = int(name.rsplit(mark, 1)[1].split("-")[0])
            except (IndexError, ValueError):
                return False
            break
    else:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename into it) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_fd(fd: int, data: bytes, durable: bool = True) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    if durable:
        os.fsync(fd)


def atomic_write_file(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` so that a reader (or a kill at any moment) sees the old or the new bytes.

    A unique temporary beside `path` is created exclusively (`O_EXCL`: never a stale file's leftovers),
    written, fsynced and renamed over `path`; then the directory is fsynced so the rename is durable
    (`durable=False` skips both fsyncs, for files a crash may lose but must never tear).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_fd(fd, data, durable)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (before publishing it by rename)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux >= 3.15, glibc >= 2.28); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):           # EINVAL / ENOSYS / EOPNOTSUPP: this filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_replaceable(directory: str | os.PathLike, markers: tuple[str, ...], what: str = "OUT_DIR") -> None:
    """Refuse (`jaxcl.errors.OutputError`, nothing touched) to replace `directory` unless the user's files are
    safe: it may be missing, an empty directory, or a directory holding one of `markers` (the file by which
    jaxcl recognises what it wrote there before, e.g. `jaxcl_export.json`). A path that is a file (or a link
    to one), or a non-empty directory without a marker, is refused: replacing it would move the user's
    files aside and delete them. `what` names the argument in the message."""
    from jaxcl.errors import OutputError

    directory = Path(directory)
    check_parents(directory, what)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        kind = "a symbolic link" if directory.is_symlink() else "a file"
        raise OutputError(f"{what} {str(directory)!r} is {kind}, not a directory jaxcl wrote: choose a new or empty "
                          "directory (nothing was touched)")
    if not directory.is_dir():
        return
    held = sorted(p.name for p in directory.iterdir())
    if held and not any((directory / m).is_file() for m in markers):
        shown = ", ".join(held[:5]) + (" ..." if len(held) > 5 else "")
        raise OutputError(f"{what} {str(directory)!r} holds files jaxcl did not write there ({shown}; it looks for "
                          f"{' or '.join(markers)}): choose a new or empty directory (nothing was touched)")


def check_parents(path: Path, what: str) -> None:
    """OutputError when a parent of `path` is a file (mkdir would say only "File exists")."""
    from jaxcl.errors import OutputError

    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a directory (nothing was "
                                  "touched)")
            return


def replace_directory(staged: Path, directory: Path, markers: tuple[str, ...], what: str = "OUT_DIR") -> None:
    """Publish the complete directory `staged` as `directory`, replacing any old one atomically.

    Only what the caller may replace is replaced (`check_replaceable(directory, markers)`, checked again
    here right before the swap): a file, or a directory of the user's, is never moved or deleted.

    Linux: one `renameat2(RENAME_EXCHANGE)` swaps them, then the old tree (now at the staged name) is
    deleted. Elsewhere: the old directory is renamed aside to `.<name>.old-<pid>-<hex>` and the new one
    renamed in; a kill between the two renames leaves no `directory`, which `recover_directory` (called
    by every reader and writer of such directories) undoes by renaming the old one back. Either way a
    reader finds the old directory or the new one, never a mixture.
    """
    staged, directory = Path(staged), Path(directory)
    check_replaceable(directory, markers, what)
    fsync_tree(staged)
    if not directory.exists():
        os.rename(staged, directory)
        fsync_dir(directory.parent)
        return
    if _renameat2_exchange(staged, directory):
        fsync_dir(directory.parent)
        shutil.rmtree(staged, ignore_errors=True)
        return
    aside = temporary_sibling(directory, OLD_MARK)
    os.rename(directory, aside)
    os.rename(staged, directory)
    fsync_dir(directory.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_directory(directory: str | os.PathLike) -> None:
    """Finish or undo what a killed `replace_directory` left beside `directory`.

    If `directory` is missing and an old version was set aside, the old version is renamed back (the
    new one was never published); staged temporaries and set-aside old versions of dead writers are
    deleted. Safe to call at any time by any reader or writer.
    """
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return
    leftovers = [p for p in parent.glob(f".{directory.name}.*")
                 if (TMP_MARK in p.name or OLD_MARK in p.name) and not writer_alive(p.name)]
    olds = sorted((p for p in leftovers if OLD_MARK in p.name), key=lambda p: p.stat().st_mtime)
    if not directory.exists() and olds:
        os.rename(olds.pop(), directory)
        fsync_dir(parent)
    for p in leftovers:
        if p.exists() and p != directory:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
