"""Where a token cache lives and what its files are.

    <data.cache>/<key>/<domain>/<split>/
        shard-00000.tokens   the framed documents' tokens, little-endian uint16 (vocabulary <= 65,536) or uint32
        shard-00000.docs     each document's end offset in the shard's tokens, little-endian uint64
        shard-00000.json     the shard's record: its source unit, counts, CRC-32 of its tokens, sha256 of its bytes
        manifest.json        the commit record of the split (written last): format, tokenizer fingerprint,
                             every source file with its size / mtime or generation, every shard with counts

`key` is a hash of (format version, the source's identity, the tokenizer's fingerprint), so another
tokenizer or another source never shares files. A split exists for readers only once `manifest.json` is
there and every shard file it lists has its exact size; shards without a manifest are a prepare in
progress (or killed: the next prepare resumes from them).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT = 1
MANIFEST = "manifest.json"


def default_cache_root() -> str:
    """`$JAXCL_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxcl/tokens`, else `~/.cache/jaxcl/tokens` (data.cache="")."""
    if os.environ.get("JAXCL_CACHE_DIR"):
        return os.environ["JAXCL_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "jaxcl" / "tokens")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (little-endian on disk)."""
    return np.dtype("<u2") if vocab_size <= 2 ** 16 else np.dtype("<u4")


def cache_key(source_identity: dict, tokenizer_fingerprint: str) -> str:
    """The cache directory name of a (source, tokenizer) pair."""
    body = json.dumps({"format": FORMAT, "source": source_identity, "tokenizer": tokenizer_fingerprint},
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def split_prefix(key: str, domain: str, split: str) -> str:
    return f"{key}/{domain}/{split}/"


def shard_name(index: int, identity: dict | None = None) -> str:
    """`shard-<index>-<hash>`: the hash covers the unit and its file's stamp, so a shard prepared again for
    changed text (or another cut) gets a new name and never overwrites one that a running reader maps."""
    if identity is None:
        return f"shard-{index:05d}"
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"shard-{index:05d}-{digest}"


__all__ = ["FORMAT", "MANIFEST", "cache_key", "default_cache_root", "shard_name", "split_prefix", "token_dtype"]
