"""Where domain text comes from: the embedded corpus, a local directory, or a local HF dataset.

A source answers two questions: which domains exist (in default stage order) and what the
documents of a domain's split are. Everything is local; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path
from typing import Protocol

from jaxcl.config import ConfigError

SPLITS = ("train", "valid", "test")


class TextSource(Protocol):
    def domains(self) -> tuple[str, ...]: ...

    def documents(self, domain: str, split: str) -> list[str]: ...


DOCUMENT_SEPARATOR = "\n\n\n"    # two blank lines, as in the embedded corpus


def split_documents(text: str) -> list[str]:
    """Documents of a plain-text file: blocks separated by two blank lines."""
    return [d.strip("\n") for d in text.split(DOCUMENT_SEPARATOR) if d.strip()]


class EmbeddedSource:
    """The multi-domain corpus shipped inside the package (`jaxcl/data/corpus/`)."""

    def domains(self) -> tuple[str, ...]:
        from jaxcl.data import corpus

        return tuple(corpus.list_domains())

    def documents(self, domain: str, split: str) -> list[str]:
        from jaxcl.data import corpus

        return split_documents(corpus.load_text(domain, split))


def _read_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


class DirectorySource:
    """A directory of `<domain>.<split>.txt|.jsonl` files (optionally .gz / .xz compressed)."""

    SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".txt.gz", ".jsonl.xz", ".txt.xz")

    def __init__(self, directory: str | Path, text_field: str = "text", key: str = "data.source"):
        self.directory = Path(directory)
        self.text_field = text_field
        self.key = key                   # the config key that named the directory (error messages)
        if not self.directory.is_dir():
            raise ConfigError(f"{key}={str(directory)!r}: directory not found")

    def domains(self) -> tuple[str, ...]:
        names = sorted({p.name.split(".train.")[0] for p in self.directory.iterdir()
                        if any(p.name.endswith(".train" + suffix) for suffix in self.SUFFIXES)
                        and not p.name.startswith(".")})
        if not names:
            raise ConfigError(f"{self.key}={str(self.directory)!r} has no <domain>.train.txt|jsonl files")
        return tuple(names)

    def documents(self, domain: str, split: str) -> list[str]:
        for suffix in self.SUFFIXES:
            path = self.directory / f"{domain}.{split}{suffix}"
            if path.is_file():
                text = _read_text(path)
                if ".jsonl" in suffix:
                    return [self._field(json.loads(line), path, n)
                            for n, line in enumerate(text.splitlines(), 1) if line.strip()]
                return split_documents(text)
        raise ConfigError(f"{self.key}={str(self.directory)!r}: no file for domain {domain!r} split {split!r} "
                          f"(looked for {domain}.{split}.txt / .jsonl)")

    def _field(self, record: dict, path: Path, line: int) -> str:
        if self.text_field not in record:
            raise ConfigError(f"{path}:{line}: record has no field {self.text_field!r} (data.text_field)")
        return str(record[self.text_field])


class HFDatasetSource:
    """A local Hugging Face `datasets` directory (`save_to_disk`): splits train / valid(ation) / test,
    a `domain` column naming each row's domain and a text column."""

    def __init__(self, directory: str | Path, text_field: str = "text", domain_field: str = "domain"):
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"data.source={str(directory)!r} is a datasets directory but the `datasets` "
                              "package is not installed (pip install datasets)") from None
        self.data = datasets.load_from_disk(str(directory))
        self.text_field, self.domain_field = text_field, domain_field

    def _split(self, split: str):
        for name in (split, "validation" if split == "valid" else split):
            if name in self.data:
                return self.data[name]
        raise ConfigError(f"datasets directory has no split {split!r} (has {list(self.data)})")

    def domains(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self._split("train")[self.domain_field]))

    def documents(self, domain: str, split: str) -> list[str]:
        rows = self._split(split)
        return [r[self.text_field] for r in rows if r[self.domain_field] == domain]


UNSEEN = "embedded:unseen"
"""The second packaged collection (`jaxcl/data/unseen/`): real text from Debian packages that the embedded
corpus does not contain (GNU Texinfo manuals, Perl's documentation), for streams of unseen domains
(`semem.stream_source`); built by `scripts/build_unseen.py`."""


def open_source(source: str, text_field: str = "text", key: str = "data.source") -> TextSource:
    """`"embedded"` (the corpus), `"embedded:unseen"` (the packaged unseen domains), a directory of
    text/jsonl files, or a `datasets.save_to_disk` directory; `key`: the config key naming it (errors)."""
    if source == "embedded":
        return EmbeddedSource()
    if source == UNSEEN:
        import importlib.resources

        return DirectorySource(Path(str(importlib.resources.files("jaxcl.data") / "unseen")), text_field, key)
    path = Path(source)
    if (path / "dataset_dict.json").is_file():
        return HFDatasetSource(path, text_field)
    return DirectorySource(path, text_field, key)
