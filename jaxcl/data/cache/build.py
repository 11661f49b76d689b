"""Preparing a token cache: tokenize every document once, in parallel, across hosts, resumably.

Each split of a domain is cut into units (`jaxcl.data.sources`); each unit becomes one shard, written
by whichever worker tokenizes it: a local process pool (`data.prepare_processes`) and, in a multi-host
JAX job, every process takes units `i` with `i % process_count == process_index`, so no process reads
the whole corpus. Shards are named by unit index, so the concatenated stream is the documents in
source order whatever the number of processes. A shard is written to a temporary, fsynced and renamed
(or uploaded in one PUT), then its record; once every shard is recorded, process 0 writes the split's
`manifest.json`, the commit. A killed prepare leaves shards and temporaries: the next one keeps the
shards whose record matches the unit and the file's current stat, and rewrites the rest. Two prepares
of the same split at once (two runs that both found it missing) write identical bytes to the same
names, and a local lock makes the second wait for the first and then read its cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jaxcl.atomic_io import TMP_MARK, fsync_dir, temporary_sibling, writer_alive
from jaxcl.data.cache.layout import FORMAT, MANIFEST, shard_name, split_prefix, token_dtype
from jaxcl.data.sources import SEGMENT_BYTES, SourceFile, Unit, content_digest, open_source
from jaxcl.errors import DataError
from jaxcl.storage import StoreFiles

log = logging.getLogger(__name__)

BATCH_CHARS = 1 << 21        # documents are tokenized in batches of about this many characters
MAX_REPORTED = 20            # skipped documents named in a record


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a worker needs to tokenize one unit into one shard (picklable)."""

    source: str
    text_field: str
    tokenizer: str
    root: str
    prefix: str
    index: int
    unit: Unit
    dtype: str
    on_bad_document: str
    process_index: int = 0         # the JAX process that tokenizes it (recorded in the shard's record)


def unit_record(unit: Unit) -> dict:
    return {"file": unit.file.location if unit.file else None, "start": unit.start, "end": unit.end}


_TOKENIZERS: dict[str, Any] = {}
_SOURCES: dict[tuple, Any] = {}


def _worker_init(parent: int) -> None:
    """Worker set-up: one core each (the pool is the parallelism), and death with the parent: a prepare killed
    with SIGKILL must not leave workers tokenizing (they would hold its files and its output pipes)."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:                                     # Linux: the kernel sends SIGKILL when the parent dies
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:               # the parent died before prctl took effect (e.g. while this started)
        os._exit(1)

    import threading

    def watch() -> None:                     # elsewhere (and as a second line): poll the parent
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def tokenize_unit(job: Job) -> dict:
    """Tokenize one unit into shard `job.index` of the split; returns the shard's record (also written)."""
    from jaxcl.data.tokenizer import load_tokenizer

    if job.tokenizer not in _TOKENIZERS:
        _TOKENIZERS[job.tokenizer] = load_tokenizer(job.tokenizer)
    tok = _TOKENIZERS[job.tokenizer]
    if (job.source, job.text_field) not in _SOURCES:
        _SOURCES[(job.source, job.text_field)] = open_source(job.source, job.text_field)
    source = _SOURCES[(job.source, job.text_field)]
    files = StoreFiles(job.root)
    dtype = np.dtype(job.dtype)
    stat = job.unit.file.stat() if job.unit.file is not None else None
    name = shard_name(job.index, {"unit": unit_record(job.unit), "stat": stat, "dtype": dtype.str})
    skipped: list[str] = []
    count = {"skipped": 0}

    def bad(message: str) -> None:
        count["skipped"] += 1
        if len(skipped) < MAX_REPORTED:
            skipped.append(message)

    digest = content_digest()
    if files.local:
        directory = files.root / job.prefix
        directory.mkdir(parents=True, exist_ok=True)
        final = {ext: directory / f"{name}.{ext}" for ext in ("tokens", "docs")}
    else:
        directory = Path(tempfile.mkdtemp(prefix="jaxcl-shard-"))
        final = None
    temps = {ext: temporary_sibling(directory / f"{name}.{ext}") for ext in ("tokens", "docs")}
    crc, tokens, documents = 0, 0, 0
    try:
        with open(temps["tokens"], "xb") as ft, open(temps["docs"], "xb") as fd:
            def flush(batch: list[str]) -> None:
                nonlocal crc, tokens, documents
                ids, lengths = tok.frame_documents(batch)
                if ids.size and int(ids.max()) > np.iinfo(dtype).max:
                    raise DataError(f"tokenizer {job.tokenizer!r} gave id {int(ids.max())}, beyond {dtype}")
                data = ids.astype(dtype).tobytes()
                ft.write(data)
                crc = zlib.crc32(data, crc)
                ends = tokens + np.cumsum(lengths, dtype=np.int64)
                fd.write(ends.astype("<u8").tobytes())
                tokens += int(ids.size)
                documents += len(batch)

            batch, chars = [], 0
            on_bad = bad if job.on_bad_document == "skip" else None
            for doc in source.read(job.unit, on_bad, digest):
                batch.append(doc)
                chars += len(doc)
                if chars >= BATCH_CHARS:
                    flush(batch)
                    batch, chars = [], 0
            if batch:
                flush(batch)
            for f in (ft, fd):
                f.flush()
                os.fsync(f.fileno())
        record = {"format": FORMAT, "name": name, "unit": unit_record(job.unit), "stat": stat, "tokens": tokens,
                  "documents": documents, "crc32": crc, "sha256": digest.hexdigest(),
                  "skipped": count["skipped"], "skipped_examples": skipped, "process_index": job.process_index}
        if files.local:
            for ext in ("tokens", "docs"):
                os.replace(temps[ext], final[ext])
            fsync_dir(directory)
        else:
            for ext in ("tokens", "docs"):
                files.write_bytes(f"{job.prefix}{name}.{ext}", temps[ext].read_bytes())
        files.write_bytes(f"{job.prefix}{name}.json", json.dumps(record, indent=1).encode())
        return record
    finally:
        for t in temps.values():
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
        if not files.local:
            with contextlib.suppress(OSError):
                directory.rmdir()


def _done(files: StoreFiles, prefix: str, index: int, unit: Unit, dtype: np.dtype) -> dict | None:
    """The record of shard `index` when it is complete for this unit and its file as it is now, else None."""
    stat = unit.file.stat() if unit.file is not None else None
    name = shard_name(index, {"unit": unit_record(unit), "stat": stat, "dtype": dtype.str})
    raw = files.read_bytes(f"{prefix}{name}.json")
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if record.get("format") != FORMAT or record.get("unit") != unit_record(unit):
        return None
    if record.get("stat") != stat:
        return None
    sizes = files.sizes(prefix, [f"{name}.tokens", f"{name}.docs"])
    expected = {f"{name}.tokens": record["tokens"] * dtype.itemsize, f"{name}.docs": record["documents"] * 8}
    if any(k not in sizes or sizes[k] not in (None, v) for k, v in expected.items()):
        return None
    return record


@contextlib.contextmanager
def split_lock(files: StoreFiles, prefix: str):
    """An exclusive lock on a local split directory (held until the block ends; released if the process dies):
    a second prepare of the same split waits, then finds it committed. Object stores: no lock (concurrent
    prepares write identical bytes, so either commit is the same cache)."""
    if not files.local:
        yield
        return
    import fcntl

    directory = files.root / prefix
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process preparing %s", directory)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_temporaries(files: StoreFiles, prefix: str) -> None:
    """Delete shard temporaries that killed writers left in a local split directory."""
    if not files.local or not (files.root / prefix).is_dir():
        return
    for p in (files.root / prefix).glob(f".*{TMP_MARK}*"):
        if not writer_alive(p.name):
            p.unlink(missing_ok=True)


def _barrier(tag: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


def prepare_splits(*, source_spec: str, text_field: str, source, tokenizer, tokenizer_spec: str, root: str,
                   key: str, splits: list[tuple[str, str]], processes: int, on_bad_document: str = "error",
                   segment_bytes: int = SEGMENT_BYTES, progress=None, process_index: int = 0,
                   process_count: int = 1, plan: dict | None = None) -> dict[tuple[str, str], dict]:
    """Tokenize the given (domain, split)s into shards and commit each one's manifest; returns the manifests.

    The units of all the splits form one list (in split order, then unit order); this process tokenizes
    the units `i % process_count == process_index` of it that are not already done, with `processes`
    local workers in one pool (1: in this process); after every process finished, process 0 commits
    each split. Raises DataError (with the file and line) for a bad document when
    `on_bad_document="error"`, and for a split with no document at all.
    """
    files = StoreFiles(root)
    dtype = token_dtype(tokenizer.tokenizer.get_vocab_size(with_added_tokens=True))
    plan = plan or {(d, s): source.units(d, s, segment_bytes) for d, s in splits}     # the caller's, if planned
    if process_index == 0:           # only here: another host's live temporaries are not this host's to judge
        for d, s in splits:
            remove_temporaries(files, split_prefix(key, d, s))
    _barrier(f"jaxcl-prepare-start-{key}")
    jobs, kept = [], 0
    for d, s in splits:
        prefix = split_prefix(key, d, s)
        for i, unit in enumerate(plan[(d, s)]):
            owner = len(jobs) + kept
            if owner % process_count != process_index:
                kept += 1          # (another process's unit: counted so that ownership is global)
                continue
            if _done(files, prefix, i, unit, dtype) is not None:
                kept += 1
                if progress is not None:
                    progress.update()
                continue
            jobs.append(Job(source_spec, text_field, tokenizer_spec, root, prefix, i, unit, dtype.str,
                            on_bad_document, process_index))
    workers = max(1, min(processes, len(jobs)))
    if workers == 1:
        for job in jobs:
            tokenize_unit(job)
            if progress is not None:
                progress.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            for _ in pool.map(tokenize_unit, jobs):
                if progress is not None:
                    progress.update()
    _barrier(f"jaxcl-prepare-{key}")
    manifests: dict[tuple[str, str], dict] = {}
    if process_index == 0:
        for d, s in splits:
            prefix, units = split_prefix(key, d, s), plan[(d, s)]
            records = []
            for i, unit in enumerate(units):
                record = _done(files, prefix, i, unit, dtype)
                if record is None:
                    raise DataError(f"{files.where(prefix)}: shard {i} ({unit.describe()}) is missing after every "
                                    "process prepared its share: in a multi-host job data.cache must be storage "
                                    "all hosts share (a gs:// URL or a shared filesystem)")
                records.append(record)
            manifest = _manifest(source, tokenizer, d, s, dtype, records, units)
            if manifest["documents"] == 0:
                where = units[0].describe() if units else f"domain {d!r} split {s!r}"
                raise DataError(f"{where}: holds no document (domain {d!r}, split {s!r}): an empty split cannot be "
                                "trained or evaluated on")
            files.write_bytes(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())
            if manifest["skipped"]:
                log.warning("%s/%s: skipped %d bad documents (data.on_bad_document=skip), e.g. %s", d, s,
                            manifest["skipped"], manifest["skipped_examples"][0])
            manifests[(d, s)] = manifest
    _barrier(f"jaxcl-prepared-{key}")
    return manifests


def _manifest(source, tokenizer, domain, split, dtype, records, units) -> dict:
    stats: dict[str, Any] = {}
    for unit, record in zip(units, records):
        if unit.file is not None:
            stats[unit.file.location] = record["stat"]
    examples = [m for r in records for m in r.get("skipped_examples", [])][:MAX_REPORTED]
    return {"format": FORMAT, "domain": domain, "split": split, "dtype": dtype.str,
            "tokenizer": tokenizer.fingerprint(), "source": source.identity(), "files": stats,
            "shards": [{k: r[k] for k in ("name", "tokens", "documents", "crc32", "sha256", "unit")} for r in records],
            "tokens": sum(r["tokens"] for r in records), "documents": sum(r["documents"] for r in records),
            "skipped": sum(r.get("skipped", 0) for r in records), "skipped_examples": examples,
            "prepared_unix": int(time.time())}


def stale_files(manifest: dict, source) -> list[str]:
    """Source files of a committed split that changed since it was prepared (size or content): a file whose
    size and mtime (or generation) are as recorded is unchanged; one whose stamp moved but whose bytes hash
    as recorded (e.g. touched, or copied with its content) is unchanged too."""
    changed, stamps = [], {}
    if hasattr(source, "files"):                   # a file added to (or removed from) a split directory
        now_files = {f.location for f in source.files(manifest["domain"], manifest["split"])}
        recorded_files = set(manifest["files"])
        if now_files and now_files != recorded_files:
            return sorted(now_files ^ recorded_files)
    for shard in manifest["shards"]:
        location = shard["unit"]["file"]
        if location is None or location in changed:
            continue
        recorded = manifest["files"].get(location)
        if location not in stamps:                  # one stat (or one object read) per file, not per shard
            try:
                parsed = SourceFile.parse(location)
                stamps[location] = parsed.stat() if parsed else None
            except (OSError, DataError):
                stamps[location] = None
        now = stamps[location]
        if now == recorded:
            continue
        if now is None or ("size" in (recorded or {}) and now.get("size") != recorded.get("size")):
            changed.append(location)
            continue
        unit = Unit(manifest["domain"], manifest["split"], SourceFile.parse(location),
                    shard["unit"]["start"], shard["unit"]["end"])
        digest = content_digest()
        try:
            for _ in source.read(unit, lambda message: None, digest):
                pass
        except Exception:
            changed.append(location)
            continue
        if digest.hexdigest() != shard["sha256"]:
            changed.append(location)
    return sorted(set(changed))


__all__ = ["Job", "prepare_splits", "split_lock", "stale_files", "tokenize_unit"]
