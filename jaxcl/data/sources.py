"""Where domain text comes from, read as a stream: the embedded corpus, a directory (local or an object-store
URL) of text / jsonl / Parquet files, or a local HF `datasets.save_to_disk` directory.

A source answers which domains exist (in default stage order) and how a domain's split is cut into
`Unit`s: pieces that one worker reads, start to end, in bounded memory, whatever the file size (a
plain file is cut at document boundaries every `segment_bytes`; a compressed file, a Parquet file or
a datasets split is one unit). Reading the units of a split in order gives its documents in order,
the same however the units are shared among processes. Nothing is downloaded: an object-store URL
(`gs://bucket/dir`, `file:///dir`) is read through tensorstore's kvstore, as the token cache is.

Files of a directory source: `<domain>.<split>.<ext>` or a directory `<domain>.<split>/` of such files
(read in name order), ext one of txt, jsonl, parquet (txt and jsonl optionally .gz, .xz or .zst).
A .txt file holds documents separated by two blank lines; a .jsonl file one JSON object per line
with the text in `data.text_field`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from jaxcl.errors import ConfigError
from jaxcl.errors import DataError, one_line

SPLITS = ("train", "valid", "test")
DOCUMENT_SEPARATOR = "\n\n\n"    # two blank lines, as in the embedded corpus
SEGMENT_BYTES = 32 << 20         # plain files are cut into units of about this many bytes
BLOCK_BYTES = 8 << 20            # bytes read at a time
URL_SCHEMES = ("gs://", "s3://", "file://", "http://", "https://", "memory://")
UTF8_ADVICE = " (data files are UTF-8 text; convert it, e.g. iconv -f latin1 -t utf-8)"
OPTIONAL = {"zst": ("zstandard", "zstandard"), "parquet": ("pyarrow", "pyarrow")}

BadDocument = Callable[[str], None]
"""Called with a one-line description of a document that cannot be read (`data.on_bad_document=skip`);
None: raise DataError instead."""


def is_url(location: str) -> bool:
    """Whether `location` is an object-store / kvstore URL (read through tensorstore) rather than a local path."""
    return str(location).startswith(URL_SCHEMES)


def join(location: str, name: str) -> str:
    """`location/name` for a path or a URL."""
    return f"{location.rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


def _kvstore(url: str):
    import tensorstore as ts

    directory, _, key = url.rpartition("/")
    return ts.KvStore.open(directory + "/").result(), key


def url_stamp(url: str) -> str | None:
    """The object's storage generation (changes with its content), or None when it does not exist."""
    kv, key = _kvstore(url)
    try:
        result = kv.read(key, byte_range=slice(0, 1)).result()
    except Exception:        # OUT_OF_RANGE: an empty object
        result = kv.read(key).result()
    return None if result.state == "missing" else result.stamp.generation.hex()


def list_url(url: str) -> list[str]:
    """Names directly under a URL directory (one level), sorted."""
    import tensorstore as ts

    kv = ts.KvStore.open(url.rstrip("/") + "/").result()
    names = {k.decode().split("/")[0] + ("/" if "/" in k.decode() else "") for k in kv.list().result()}
    return sorted(names)


def byte_blocks(location: str, start: int = 0, end: int | None = None, block: int = BLOCK_BYTES) -> Iterator[bytes]:
    """The bytes `[start, end)` of a file or URL object (`end=None`: to its end), `block` bytes at a time.

    Raises DataError naming the location when it cannot be read."""
    if is_url(location):
        kv, key = _kvstore(location)
        offset = start
        while end is None or offset < end:
            stop = offset + block if end is None else min(offset + block, end)
            try:
                data = kv.read(key, byte_range=slice(offset, stop)).result()
            except Exception as e:
                if "OUT_OF_RANGE" not in str(e):
                    raise DataError(f"{location}: cannot be read ({one_line(str(e), 200)})") from None
                data = kv.read(key, byte_range=slice(offset, None)).result()      # the short last block
                if data.value:
                    yield bytes(data.value)
                return
            if data.state == "missing":
                raise DataError(f"{location}: not found")
            yield bytes(data.value)
            offset = stop
        return
    try:
        with open(location, "rb") as f:
            f.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                data = f.read(block if remaining is None else min(block, remaining))
                if not data:
                    return
                if remaining is not None:
                    remaining -= len(data)
                yield data
    except OSError as e:
        raise DataError(f"{location}: cannot be read ({e.strerror or e})") from None


class _BlockReader(io.RawIOBase):
    """A read-only file object over an iterator of byte blocks (for the streaming decompressors)."""

    def __init__(self, blocks: Iterator[bytes]):
        self._blocks, self._buffer = blocks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buffer:
            self._buffer = next(self._blocks, None)
            if self._buffer is None:
                self._buffer = b""
                return 0
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _need(extra: str, location: str):
    module, package = OPTIONAL[extra]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"{location}: reading .{extra} files needs the `{package}` package, which jaxcl does not "
                          f"require: pip install 'jaxcl[data]'") from None


def decompressed_blocks(blocks: Iterator[bytes], compression: str | None, location: str) -> Iterator[bytes]:
    """`blocks` decompressed as a stream (gzip and xz members / zstd frames may follow one another); DataError
    naming the file when it is not what its suffix says or is truncated."""
    if compression is None:
        yield from blocks
        return
    import gzip
    import lzma
    import zlib

    raw = io.BufferedReader(_BlockReader(iter(blocks)), BLOCK_BYTES)
    if compression == "gz":
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
    elif compression == "xz":
        stream = lzma.LZMAFile(raw, "rb")
    else:
        zstd = _need("zst", location)
        stream = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    kind = {"gz": "gzip", "xz": "xz", "zst": "zstd"}[compression]
    try:
        while True:
            data = stream.read(BLOCK_BYTES)
            if not data:
                return
            yield data
    except DataError:
        raise
    except (OSError, EOFError, lzma.LZMAError, zlib.error, Exception) as e:
        if isinstance(e, ConfigError):
            raise
        raise DataError(f"{location}: not a complete {kind} file ({one_line(str(e), 160) or type(e).__name__}): "
                        f"recompress it, or drop the .{compression} suffix if it is plain text") from None


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One data file: where it is, its format (txt, jsonl, parquet) and compression (None, gz, xz, zst)."""

    location: str
    format: str
    compression: str | None = None

    @staticmethod
    def parse(location: str) -> "SourceFile | None":
        """The file's format from its name (`x.jsonl.gz` -> jsonl, gz), or None for an unsupported name."""
        name = location.rstrip("/").rsplit("/", 1)[-1]
        parts = name.split(".")
        compression = parts.pop() if len(parts) > 2 and parts[-1] in ("gz", "xz", "zst") else None
        if len(parts) < 2 or parts[-1] not in ("txt", "jsonl", "parquet") or (parts[-1] == "parquet" and compression):
            return None
        return SourceFile(location, parts[-1], compression)

    def stat(self) -> dict:
        """What identifies the file's content cheaply: size and mtime (local) or generation (URL)."""
        if is_url(self.location):
            return {"generation": url_stamp(self.location)}
        st = os.stat(self.location)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of a split that one worker reads: bytes `[start, end)` of a file (`end=None`: all of it), or
    a datasets split's rows of one domain (`file=None`)."""

    domain: str
    split: str
    file: SourceFile | None
    start: int = 0
    end: int | None = None

    def describe(self) -> str:
        if self.file is None:
            return f"datasets split {self.split!r} of domain {self.domain!r}"
        return self.file.location if self.start == 0 and self.end is None else \
            f"{self.file.location} bytes [{self.start}, {self.end})"


class TextSource(Protocol):
    def domains(self) -> tuple[str, ...]: ...

    def units(self, domain: str, split: str, segment_bytes: int = SEGMENT_BYTES) -> list[Unit]: ...

    def read(self, unit: Unit, bad: BadDocument | None = None, digest=None) -> Iterator[str]: ...

    def documents(self, domain: str, split: str) -> list[str]: ...


def split_documents(text: str) -> list[str]:
    """Documents of a plain-text file: blocks separated by two blank lines (a run of three or more newlines)."""
    return [d.strip("\n") for d in text.split(DOCUMENT_SEPARATOR) if d.strip()]


def _line_of(location: str, offset: int) -> int:
    """1-based line of byte `offset` of an uncompressed file (counted on demand, for error messages)."""
    return sum(block.count(b"\n") for block in byte_blocks(location, 0, offset)) + 1


def _decode(data: bytes, where: Callable[[int], str], line: int, bad: BadDocument | None) -> str | None:
    """`data` (a document starting on line `line`) as UTF-8; DataError naming its bad line, or `bad(...)`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        here = line + data[:e.start].count(b"\n")
        message = f"{where(here)}: byte {e.start} of the document is not UTF-8"
        if bad is None:
            raise DataError(message + UTF8_ADVICE) from None
        bad(message)
        return None


def text_documents(blocks: Iterable[bytes], where: Callable[[int], str], bad: BadDocument | None) -> Iterator[str]:
    """Documents of a .txt byte stream (separated by runs of three or more newlines), in order, each stripped of
    newlines at its ends; blank ones dropped. `where(line)` names a line for errors."""
    buffer, line = b"", 1              # line: of buffer[0]
    for block in blocks:
        buffer += block
        cut = 0
        while True:
            i = buffer.find(b"\n\n\n", cut)
            if i < 0:
                break
            j = i + 3
            while j < len(buffer) and buffer[j:j + 1] == b"\n":
                j += 1
            if j == len(buffer):          # the newline run may continue in the next block
                break
            doc = buffer[cut:i]
            text = _decode(doc, where, line, bad) if doc.strip(b"\n") else None
            if text is not None:
                text = text.strip("\n")
                if text.strip():
                    yield text
            line += buffer.count(b"\n", cut, j)
            cut = j
        buffer = buffer[cut:]
    if buffer.strip(b"\n"):
        text = _decode(buffer, where, line, bad)
        if text is not None and text.strip():
            yield text.strip("\n")


def _where(location: str, start: int):
    """`where(line)` -> `file:line` for a unit's line (1 = its first); a unit that starts inside a file
    counts the lines before it only when an error needs them."""
    def where(line: int) -> str:
        return f"{location}:{(_line_of(location, start) if start else 1) + line - 1}"
    return where


def jsonl_documents(blocks: Iterable[bytes], where: Callable[[int], str], text_field: str,
                    bad: BadDocument | None) -> Iterator[str]:
    """The `text_field` of every line of a .jsonl byte stream, in order; blank lines and blank texts skipped."""
    buffer, line = b"", 1
    for block in list_blocks(blocks):
        buffer += block if block is not None else b""
        last = block is None
        lines = buffer.split(b"\n")
        buffer = b"" if last else lines.pop()
        for raw in lines:
            here = line
            line += 1
            if not raw.strip():
                continue
            text = _json_field(raw, where(here), text_field, bad)
            if text is not None and text.strip():
                yield text


def list_blocks(blocks: Iterable[bytes]) -> Iterator[bytes | None]:
    """`blocks`, then None (end of stream)."""
    yield from blocks
    yield None


def _json_field(raw: bytes, where: str, text_field: str, bad: BadDocument | None) -> str | None:
    """The text field of one jsonl line; DataError naming `file:line` (or `bad(...)`) otherwise."""
    def fail(message: str):
        if bad is None:
            raise DataError(f"{where}: {message}")
        bad(f"{where}: {message}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return fail(f"byte {e.start} of the line is not UTF-8{UTF8_ADVICE}")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return fail(f"not JSON ({e.msg} at column {e.colno}): a .jsonl file holds one JSON object per line")
    if not isinstance(record, dict):
        return fail(f"a {type(record).__name__}, not a JSON object with a {text_field!r} field (data.text_field)")
    if text_field not in record:
        return fail(f"record has no field {text_field!r} (data.text_field; it has "
                    f"{', '.join(map(repr, list(record)[:5])) or 'no fields'})")
    value = record[text_field]
    if not isinstance(value, str):
        return fail(f"field {text_field!r} is a {type(value).__name__}, not a string")
    return value


def parquet_documents(location: str, text_field: str, bad: BadDocument | None) -> Iterator[str]:
    """The `text_field` column of a Parquet file, row group by row group (bounded memory)."""
    pa = _need("parquet", location)
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(location if not is_url(location) else
                                pa.BufferReader(b"".join(byte_blocks(location))))
        if text_field not in handle.schema_arrow.names:
            raise DataError(f"{location}: has no column {text_field!r} (data.text_field; columns: "
                            f"{', '.join(handle.schema_arrow.names[:8])})")
        row = 0
        for batch in handle.iter_batches(batch_size=1024, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str):
                    message = f"{location}: row {row}: {text_field!r} is {type(value).__name__}, not a string"
                    if bad is None:
                        raise DataError(message)
                    bad(message)
                elif value.strip():
                    yield value
    except DataError:
        raise
    except Exception as e:       # pyarrow's ArrowInvalid etc.: a damaged file
        raise DataError(f"{location}: not a readable Parquet file ({one_line(str(e), 200)})") from None


class _Digesting:
    """Wraps a block iterator, feeding every block to a hash (the content hash the cache records)."""

    def __init__(self, blocks: Iterator[bytes], digest):
        self.blocks, self.digest = blocks, digest

    def __iter__(self):
        for b in self.blocks:
            if self.digest is not None:
                self.digest.update(b)
            yield b


class DirectorySource:
    """A directory (local path or URL) of `<domain>.<split>.<ext>` files or `<domain>.<split>/` directories."""

    SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".txt.gz", ".jsonl.xz", ".txt.xz", ".jsonl.zst", ".txt.zst",
                ".parquet")

    def __init__(self, directory: str | Path, text_field: str = "text", key: str = "data.source"):
        # absolute: the cache records files by location, whatever directory a run starts in
        self.directory = str(directory) if is_url(str(directory)) else str(Path(directory).absolute())
        self.text_field = text_field
        self.key = key                   # the config key that named the directory (error messages)
        if is_url(self.directory):
            try:
                self._names = list_url(self.directory)
            except Exception as e:
                raise ConfigError(f"{key}={self.directory!r}: cannot be listed ({one_line(str(e), 200)})") from None
        else:
            if not Path(self.directory).is_dir():
                raise ConfigError(f"{key}={str(directory)!r}: directory not found")
            self._names = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(self.directory).iterdir())

    def _entries(self, domain: str, split: str) -> list[str]:
        prefix = f"{domain}.{split}"
        return [n for n in self._names if not n.startswith(".") and
                (n == prefix + "/" or any(n == prefix + s for s in self.SUFFIXES))]

    def domains(self) -> tuple[str, ...]:
        names = sorted({n.split(".train")[0] for n in self._names if not n.startswith(".") and
                        any(n.endswith(".train" + s) for s in (*self.SUFFIXES, "/"))})
        if not names:
            raise ConfigError(f"{self.key}={self.directory!r} has no <domain>.train.txt|jsonl|parquet files "
                              "(or <domain>.train/ directories)")
        return tuple(names)

    def files(self, domain: str, split: str) -> list[SourceFile]:
        """The split's data files in reading order; ConfigError / DataError when there are none or several."""
        found = self._entries(domain, split)
        if len(found) > 1:
            raise DataError(f"{self.key}={self.directory!r}: domain {domain!r} split {split!r} has "
                            f"{len(found)} files ({', '.join(found)}): keep one")
        if not found:
            raise ConfigError(f"{self.key}={self.directory!r}: no file for domain {domain!r} split {split!r} "
                              f"(looked for {domain}.{split}.txt / .jsonl / .parquet or a {domain}.{split}/ "
                              "directory)")
        if not found[0].endswith("/"):
            return [SourceFile.parse(join(self.directory, found[0]))]
        sub = join(self.directory, found[0].rstrip("/"))
        names = list_url(sub) if is_url(sub) else sorted(p.name for p in Path(sub).iterdir())
        files = [f for f in (SourceFile.parse(join(sub, n)) for n in names if not n.startswith(".")) if f]
        if not files:
            raise DataError(f"{sub}: holds no .txt / .jsonl / .parquet file (domain {domain!r}, split {split!r})")
        return files

    def units(self, domain: str, split: str, segment_bytes: int = SEGMENT_BYTES) -> list[Unit]:
        """The split cut into units: uncompressed local txt / jsonl files at document boundaries about every
        `segment_bytes` (the documents are the same however a file is cut); every other file whole."""
        out = []
        for f in self.files(domain, split):
            if f.compression is None and f.format != "parquet" and not is_url(f.location):
                out += [Unit(domain, split, f, a, b) for a, b in _segments(f, segment_bytes)]
            else:
                out.append(Unit(domain, split, f))
        return out

    def read(self, unit: Unit, bad: BadDocument | None = None, digest=None) -> Iterator[str]:
        """The documents of one unit, in order (streamed); `digest`: a hashlib object fed the raw bytes read."""
        f = unit.file
        if f.format == "parquet":
            if digest is not None:
                for b in byte_blocks(f.location):
                    digest.update(b)
            yield from parquet_documents(f.location, self.text_field, bad)
            return
        raw = _Digesting(byte_blocks(f.location, unit.start, unit.end), digest)
        blocks = decompressed_blocks(iter(raw), f.compression, f.location)
        where = _where(f.location, 0 if f.compression else unit.start)
        if f.format == "jsonl":
            yield from jsonl_documents(blocks, where, self.text_field, bad)
        else:
            yield from text_documents(blocks, where, bad)

    def documents(self, domain: str, split: str) -> list[str]:
        """Every document of the split in order (in memory: for small splits; runs read the token cache)."""
        docs = [d for u in self.units(domain, split) for d in self.read(u)]
        if not docs:
            raise DataError(f"{self.files(domain, split)[0].location}: holds no document (domain {domain!r}, "
                            f"split {split!r}): an empty split cannot be trained or evaluated on")
        return docs

    def identity(self) -> dict:
        return {"kind": "directory", "location": self.directory if is_url(self.directory)
                else str(Path(self.directory).resolve()), "text_field": self.text_field}


def _segments(f: SourceFile, segment_bytes: int) -> list[tuple[int, int | None]]:
    """Byte ranges of an uncompressed local file cut at document boundaries (txt: the first run of three
    newlines at or after each multiple of `segment_bytes`; jsonl: the first newline)."""
    size = os.path.getsize(f.location)
    if size <= segment_bytes:
        return [(0, None)]
    marker = b"\n\n\n" if f.format == "txt" else b"\n"
    cuts = [0]
    with open(f.location, "rb") as h:
        target = segment_bytes
        while target < size:
            h.seek(target)
            window, found = b"", -1
            while found < 0:
                more = h.read(1 << 20)
                if not more:
                    break
                window += more
                found = window.find(marker)
            if found < 0:
                break
            cut = target + found + len(marker) if f.format == "jsonl" else target + found
            if cut >= size:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
            target = max(cut + 1, target + segment_bytes)
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [None])]


class EmbeddedSource(DirectorySource):
    """The multi-domain corpus shipped inside the package (`jaxcl/data/corpus/`, xz-compressed text)."""

    def __init__(self):
        import importlib.resources

        super().__init__(Path(str(importlib.resources.files("jaxcl.data") / "corpus")), key="data.source")

    def domains(self) -> tuple[str, ...]:
        from jaxcl.data import corpus

        return tuple(corpus.list_domains())

    def identity(self) -> dict:
        return {"kind": "embedded"}


class HFDatasetSource:
    """A local Hugging Face `datasets` directory (`save_to_disk`): splits train / valid(ation) / test,
    a `domain` column naming each row's domain and a text column; read through Arrow memory-mapping."""

    def __init__(self, directory: str | Path, text_field: str = "text", domain_field: str = "domain"):
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"data.source={str(directory)!r} is a datasets directory but the `datasets` "
                              "package is not installed: pip install 'jaxcl[data]'") from None
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
        column = self._split("train").select_columns([self.domain_field])
        seen: dict[str, None] = {}
        for batch in column.iter(batch_size=65536):
            seen.update(dict.fromkeys(batch[self.domain_field]))
        return tuple(seen)

    def units(self, domain: str, split: str, segment_bytes: int = SEGMENT_BYTES) -> list[Unit]:
        self._split(split)
        return [Unit(domain, split, None)]

    def read(self, unit: Unit, bad: BadDocument | None = None, digest=None) -> Iterator[str]:
        rows = self._split(unit.split).select_columns([self.domain_field, self.text_field])
        i = 0
        for batch in rows.iter(batch_size=1024):
            for domain, text in zip(batch[self.domain_field], batch[self.text_field]):
                i += 1
                if domain != unit.domain:
                    continue
                if not isinstance(text, str):
                    message = (f"data.source={str(self.directory)!r}: split {unit.split!r} row {i - 1}: "
                               f"{self.text_field!r} is {type(text).__name__}, not a string")
                    if bad is None:
                        raise DataError(message)
                    bad(message)
                    continue
                if digest is not None:
                    digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
                if text.strip():
                    yield text

    def documents(self, domain: str, split: str) -> list[str]:
        return [d for u in self.units(domain, split) for d in self.read(u)]

    def files(self, domain: str, split: str) -> list[SourceFile]:
        return []

    def identity(self) -> dict:
        split_files = sorted({f["filename"] for name in self.data for f in self.data[name].cache_files})
        return {"kind": "datasets", "location": str(self.directory.resolve()), "text_field": self.text_field,
                "files": [{"path": p, **SourceFile(p, "arrow").stat()} for p in split_files]}


UNSEEN = "embedded:unseen"
"""The second packaged collection (`jaxcl/data/unseen/`): real text from Debian packages that the embedded
corpus does not contain (GNU Texinfo manuals, Perl's documentation), for streams of unseen domains
(`semem.stream_source`); built by `scripts/build_unseen.py`."""


def open_source(source: str, text_field: str = "text", key: str = "data.source") -> TextSource:
    """`"embedded"` (the corpus), `"embedded:unseen"` (the packaged unseen domains), a directory (path or URL)
    of text / jsonl / Parquet files, or a `datasets.save_to_disk` directory; `key`: the config key naming it
    (errors)."""
    if source == "embedded":
        return EmbeddedSource()
    if source == UNSEEN:
        import importlib.resources

        return DirectorySource(Path(str(importlib.resources.files("jaxcl.data") / "unseen")), text_field, key)
    if not is_url(source) and (Path(source) / "dataset_dict.json").is_file():
        return HFDatasetSource(Path(source), text_field)
    return DirectorySource(source, text_field, key)


def content_digest():
    """The hash a unit's content is recorded with in the cache manifest."""
    return hashlib.sha256()
