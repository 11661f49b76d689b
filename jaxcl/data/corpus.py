"""The multi-domain text corpus and byte-level BPE tokenizer that ship inside jaxcl.

Five domains of real, freely redistributable text (see ``jaxcl/data/corpus/NOTICE``), each with
``train`` / ``valid`` / ``test`` splits stored xz-compressed in ``jaxcl/data/corpus/``, so the
continual-learning job runs offline with no download: pre-train on ``DOMAINS[0]``, fine-tune on
the others in order, and measure perplexity on every domain's held-out split after each stage.

In every split, documents are separated by ``DOCUMENT_SEPARATOR`` (two blank lines); a document
never contains two blank lines in a row. Rebuild the data with ``scripts/build_corpus.py`` and the
tokenizer with ``scripts/build_tokenizer.py``.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import lzma
import pathlib

from tokenizers import Tokenizer

DOMAINS: tuple[str, ...] = ("bible", "jargon", "wordnet", "manpages", "pydoc")
"""Default stage order: plain English narrative first (the pre-training domain, and the largest
source), then hacker-slang lexicon, dictionary glosses, Unix manual pages and Python API docs,
drifting step by step from everyday prose to technical reference text."""

SPLITS: tuple[str, ...] = ("train", "valid", "test")
DOCUMENT_SEPARATOR = "\n\n\n"

ENDOFTEXT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPARE_DOMAIN_TOKENS: tuple[str, ...] = tuple(f"<|domain_spare_{i}|>" for i in range(8))
TOKENIZER_VOCAB_SIZE = 8192

_PACKAGE = "jaxcl.data"


def domain_token(domain: str) -> str:
    """The special token that marks text of ``domain`` (e.g. for domain prompts in ELLE)."""
    return f"<|domain:{_check_domain(domain)}|>"


def special_tokens() -> tuple[str, ...]:
    """All special tokens of the default tokenizer, in id order (``<|endoftext|>`` is id 0).

    Spare domain tokens leave room to add domains later without changing the vocabulary size.
    """
    return (ENDOFTEXT_TOKEN, PAD_TOKEN, *(domain_token(d) for d in DOMAINS), *SPARE_DOMAIN_TOKENS)


def list_domains() -> tuple[str, ...]:
    """The embedded domains in default stage order (the first one is for pre-training)."""
    return DOMAINS


def _check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"unknown corpus domain {domain!r}; choose one of: {', '.join(DOMAINS)}")
    return domain


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


@functools.lru_cache(maxsize=None)
def load_text(domain: str, split: str) -> str:
    """The whole text of one domain's split, decompressed from the package (cached).

    Raises ``ValueError`` naming the bad value and the valid choices for an unknown domain or split.
    """
    name = f"{_check_domain(domain)}.{_check_split(split)}.txt.xz"
    data = importlib.resources.files(_PACKAGE).joinpath("corpus", name).read_bytes()
    return lzma.decompress(data).decode("utf-8")


def corpus_manifest() -> dict:
    """Sizes, document counts, sha256 sums, sources and licenses of every domain and split.

    Returned fresh each call so callers may modify it.
    """
    text = importlib.resources.files(_PACKAGE).joinpath("corpus", "manifest.json").read_text("utf-8")
    return json.loads(text)


def default_tokenizer_path() -> pathlib.Path:
    """Path of the shipped ``tokenizer.json`` (8192-token byte-level BPE trained on the train splits)."""
    return pathlib.Path(str(importlib.resources.files(_PACKAGE).joinpath("tokenizer", "tokenizer.json")))


def load_default_tokenizer() -> Tokenizer:
    """The shipped tokenizer as a ``tokenizers.Tokenizer``; ``decode(encode(text).ids)`` gives ``text`` back."""
    return Tokenizer.from_file(str(default_tokenizer_path()))
