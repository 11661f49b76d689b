"""Where domain text comes from: the embedded corpus, a local directory, or a local HF dataset.

A source answers two questions: which domains exist (in default stage order) and what the
documents of a domain's split are. Everything is local; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import lzma
import zlib
from pathlib import Path
from typing import Protocol

from jaxcl.config import ConfigError
from jaxcl.errors import DataError, utf8_text

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
    """A data file's text (plain, .gz or .xz); DataError naming the file for a file that is not what its name
    says (not gzip / xz, truncated) or not UTF-8 (with the line and byte)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        elif path.suffix == ".xz":
            with lzma.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, lzma.LZMAError, EOFError, zlib.error) as e:
        kind = "gzip" if path.suffix == ".gz" else "xz"
        raise DataError(f"{path}: not a complete {kind} file ({' '.join(str(e).split()) or type(e).__name__}): "
                        f"recompress it, or drop the .{path.suffix[1:]} suffix if it is plain text") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    return utf8_text(data, str(path), " (data files are UTF-8 text; convert it, e.g. iconv -f latin1 -t utf-8)")


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
        found = [self.directory / f"{domain}.{split}{suffix}" for suffix in self.SUFFIXES
                 if (self.directory / f"{domain}.{split}{suffix}").is_file()]
        if len(found) > 1:
            raise DataError(f"{self.key}={str(self.directory)!r}: domain {domain!r} split {split!r} has "
                            f"{len(found)} files ({', '.join(p.name for p in found)}): keep one")
        for suffix in self.SUFFIXES:
            path = self.directory / f"{domain}.{split}{suffix}"
            if path.is_file():
                text = _read_text(path)
                if ".jsonl" in suffix:
                    documents = [doc for n, line in enumerate(text.splitlines(), 1) if line.strip()
                                 for doc in [self._field(line, path, n)] if doc.strip()]   # blank texts: no document
                else:
                    documents = split_documents(text)
                if not documents:
                    raise DataError(f"{path}: holds no document (domain {domain!r}, split {split!r}): an empty "
                                    "split cannot be trained or evaluated on")
                return documents
        raise ConfigError(f"{self.key}={str(self.directory)!r}: no file for domain {domain!r} split {split!r} "
                          f"(looked for {domain}.{split}.txt / .jsonl)")

    def _field(self, line_text: str, path: Path, line: int) -> str:
        """The text field of one jsonl line; DataError naming `path:line` otherwise."""
        try:
            record = json.loads(line_text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: not JSON ({e.msg} at column {e.colno}): a .jsonl file holds one JSON "
                            "object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: a {type(record).__name__}, not a JSON object with a "
                            f"{self.text_field!r} field (data.text_field)")
        if self.text_field not in record:
            raise DataError(f"{path}:{line}: record has no field {self.text_field!r} (data.text_field; it has "
                            f"{', '.join(map(repr, list(record)[:5])) or 'no fields'})")
        value = record[self.text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{line}: field {self.text_field!r} is a {type(value).__name__}, not a string")
        return value


class HFDatasetSource:
    """A local Hugging Face `datasets` directory (`save_to_disk`): splits train / valid(ation) / test,
    a `domain` column naming each row's domain and a text column."""

    def __init__(self, directory: str | Path, text_field: str = "text", domain_field: str = "domain"):
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"data.source={str(directory)!r} is a datasets directory but the `datasets` "
                              "package is not installed (pip install datasets)") from None
        try:
            self.data = datasets.load_from_disk(str(directory))
        except Exception as e:     # datasets raises JSONDecodeError, FileNotFoundError, ValueError, ...
            from jaxcl.errors import root_message

            raise DataError(f"data.source={str(directory)!r} is not a readable datasets directory "
                            f"({root_message(e)[:300]})") from None
        self.directory = Path(directory)
        self.text_field, self.domain_field = text_field, domain_field
        for name in self.data:
            missing = [c for c in (text_field, domain_field) if c not in self.data[name].column_names]
            if missing:
                raise DataError(f"data.source={str(directory)!r}: split {name!r} has no column {missing[0]!r} "
                                f"(columns: {', '.join(self.data[name].column_names)}; data.text_field names the "
                                "text column, 'domain' the domain)")

    def _split(self, split: str):
        for name in (split, "validation" if split == "valid" else split):
            if name in self.data:
                return self.data[name]
        raise ConfigError(f"datasets directory has no split {split!r} (has {list(self.data)})")

    def domains(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self._split("train")[self.domain_field]))

    def documents(self, domain: str, split: str) -> list[str]:
        rows = self._split(split)
        documents = []
        for i, r in enumerate(rows):
            if r[self.domain_field] != domain:
                continue
            if not isinstance(r[self.text_field], str):
                raise DataError(f"data.source={str(self.directory)!r}: split {split!r} row {i}: "
                                f"{self.text_field!r} is {type(r[self.text_field]).__name__}, not a string")
            if r[self.text_field].strip():
                documents.append(r[self.text_field])
        return documents


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
