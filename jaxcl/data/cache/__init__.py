"""The token cache: every document tokenized once, read by memory map from then on.

Runs, `jaxcl eval` and `jaxcl prepare` all go through `open_splits`: it returns each requested
(domain, split) as a committed `SplitCache`, preparing (with a progress bar) what is missing or stale
first. The layout is in `jaxcl.data.cache.layout`, preparation in `.build`, reading in `.reader`.
Anchors: Levanter's tokenized cache (shards + ledger, tensorstore for object stores), Megatron's
`.bin/.idx` and nanoGPT's uint16 memmap (tokenize once, memory-map forever).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from jaxcl.data.cache.build import prepare_splits, split_lock, stale_files
from jaxcl.data.cache.layout import MANIFEST, cache_key, default_cache_root, split_prefix
from jaxcl.data.cache.reader import ConcatRows, PackedRows, Rows, SplitCache, SubsetRows
from jaxcl.errors import ConfigError
from jaxcl.storage import StoreFiles

log = logging.getLogger(__name__)


def cache_root(cache: str) -> str:
    """`data.cache` resolved: "" -> the per-user default (`default_cache_root`)."""
    return cache or default_cache_root()


def open_splits(*, source_spec: str, text_field: str, tokenizer, tokenizer_spec: str, cache: str,
                domains, splits=("train", "valid"), processes: int = 0, on_bad_document: str = "error",
                key_name: str = "data.source", progress: bool = True, source=None,
                segment_bytes: int | None = None) -> dict[tuple[str, str], SplitCache]:
    """Every (domain, split) of `source_spec` as a committed split of the token cache under `cache`.

    A split that is committed for this tokenizer and whose source files are unchanged is opened (one stat per
    file); one that is missing, or whose files changed, is prepared first (`processes` local workers, 0 = all
    cores; every JAX process takes its share in a multi-host job). Raises DataError for a bad document (file
    and line), a damaged or foreign cache, or an empty split.
    """
    import jax

    from jaxcl.data.sources import SEGMENT_BYTES, open_source

    source = source if source is not None else open_source(source_spec, text_field, key_name)
    root = cache_root(cache)
    try:
        files = StoreFiles(root)
    except Exception as e:
        raise ConfigError(f"data.cache={root!r}: cannot be opened ({' '.join(str(e).split())[:200]})") from None
    fingerprint = tokenizer.fingerprint()
    key = cache_key(source.identity(), fingerprint)
    processes = processes or os.cpu_count() or 1
    out: dict[tuple[str, str], SplitCache] = {}
    need = []
    for d in domains:
        for s in splits:
            opened = _open_fresh(files, key, d, s, fingerprint, source, on_bad_document)
            if opened is None:
                need.append((d, s))
            else:
                out[(d, s)] = opened
    if jax.process_count() > 1:          # every process must take part in (or skip) the same preparations
        import numpy as np
        from jax.experimental import multihost_utils

        flags = np.asarray([(d, s) in need for d in domains for s in splits], np.int32)
        flags = np.asarray(multihost_utils.process_allgather(flags)).max(axis=0)
        need = [(d, s) for (d, s), f in zip([(d, s) for d in domains for s in splits], flags) if f]
    if not need:
        return out
    bar = None
    plan = {(d, s): source.units(d, s, segment_bytes or SEGMENT_BYTES) for d, s in need}   # planned once
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, plan.values())), desc="preparing the token cache", unit="shard",
                   dynamic_ncols=True, file=sys.stderr)
    try:
        with contextlib.ExitStack() as locks:
            if jax.process_count() == 1:           # sorted: two preparers never wait on each other in a cycle
                for d, s in sorted(need):
                    locks.enter_context(split_lock(files, split_prefix(key, d, s)))
            todo = []
            for d, s in need:
                opened = _open_fresh(files, key, d, s, fingerprint, source, on_bad_document)   # made meanwhile?
                if opened is None:
                    files.delete(split_prefix(key, d, s) + MANIFEST)    # a stale commit is withdrawn first
                    todo.append((d, s))
                else:
                    out[(d, s)] = opened
                    if bar is not None:
                        bar.update(len(plan[(d, s)]))
            if jax.process_count() > 1:      # one list on every process, or the barriers inside would hang
                import numpy as np
                from jax.experimental import multihost_utils

                flags = np.asarray([(d, s) in todo for d, s in need], np.int32)
                flags = np.asarray(multihost_utils.process_allgather(flags)).max(axis=0)
                todo = [(d, s) for (d, s), f in zip(need, flags) if f]
                for d, s in todo:
                    out.pop((d, s), None)
            if todo:
                prepare_splits(source_spec=source_spec, text_field=text_field, source=source, tokenizer=tokenizer,
                               tokenizer_spec=tokenizer_spec, root=root, key=key, splits=todo, processes=processes,
                               on_bad_document=on_bad_document, segment_bytes=segment_bytes or SEGMENT_BYTES,
                               progress=bar, process_index=jax.process_index(), process_count=jax.process_count(),
                               plan={k: plan[k] for k in todo})
            for d, s in todo:
                out[(d, s)] = SplitCache.open(files, split_prefix(key, d, s), fingerprint)
    finally:
        if bar is not None:
            bar.close()
    return {(d, s): out[(d, s)] for d in domains for s in splits}


def _open_fresh(files, key, domain, split, fingerprint, source, on_bad_document="error") -> SplitCache | None:
    """The committed split when its source files are unchanged; None when it must be prepared (again).
    DataError when it was prepared skipping bad documents and this run asks for them to be errors."""
    opened = SplitCache.open(files, split_prefix(key, domain, split), fingerprint)
    if opened is None:
        return None
    skipped = opened.manifest.get("skipped", 0)
    if skipped and on_bad_document == "error":
        from jaxcl.errors import DataError

        examples = opened.manifest.get("skipped_examples") or ["?"]
        raise DataError(f"{files.where(opened.prefix)}: prepared with data.on_bad_document=skip, which left out "
                        f"{skipped} documents (e.g. {examples[0]}); this run has data.on_bad_document=error: fix the "
                        "files (the split is then prepared again) or set data.on_bad_document=skip")
    changed = stale_files(opened.manifest, source)
    if changed:
        log.warning("%s/%s: %s changed since the token cache was prepared: preparing it again", domain, split,
                    ", ".join(changed[:3]))
        return None
    return opened


__all__ = ["ConcatRows", "PackedRows", "Rows", "SplitCache", "SubsetRows", "cache_root", "default_cache_root",
           "open_splits"]
