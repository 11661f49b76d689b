#!/usr/bin/env python3
"""Rebuild the embedded multi-domain corpus in ``jaxcl/data/corpus/`` from Debian packages.

The corpus is the library's default stream of text domains for continual learning: five kinds of
real, freely redistributable English text, each extracted from a Debian package, cleaned, split
into train/valid/test by document and shipped xz-compressed inside the package.

Sources (install them once, as root, on Debian 12 "bookworm")::

    apt-get update
    apt-get install -y bible-kjv bible-kjv-text jargon-text dict-wn manpages manpages-dev \
        groff-base python3.11 libpython3.11-stdlib

Rebuild (from the repository root)::

    python scripts/build_corpus.py            # writes jaxcl/data/corpus/
    python scripts/build_tokenizer.py         # then retrain the tokenizer on the new train splits

The build installs nothing: it stops with a message naming the missing package or path. It is
deterministic: documents come out in source order, the split uses a fixed seed, the xz streams
use fixed settings (xz has no timestamp), and JSON is written with sorted keys, so two runs on
the same package versions give byte-identical files. The package versions used are recorded in
``manifest.json`` and ``NOTICE``; different versions give different (but still valid) text, which
the sha256 sums in the manifest make visible.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import gzip
import hashlib
import json
import lzma
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import textwrap
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "jaxcl" / "data" / "corpus"

SEED = "jaxcl-corpus-v1"
SPLITS = ("train", "valid", "test")
HELDOUT_CHARS = 110_000        # target size of valid and of test (about 5 % of a full domain)
TRAIN_CAP_CHARS = 2_000_000    # keeps the whole corpus well under 10 MB compressed
MAX_DOC_CHARS = 20_000         # longer documents are cut at paragraph breaks into chunks
DEDUP_MIN_CHARS = 100          # repeated paragraphs at least this long are kept only once
DOC_SEPARATOR = "\n\n\n"       # documents are separated by two blank lines; inside one, at most one
XZ_PRESET = 9 | lzma.PRESET_EXTREME

CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


class MissingSource(RuntimeError):
    """A Debian package or file the build needs is not installed."""


@dataclass
class Domain:
    """One text domain: where it comes from, under which license, and how to extract it."""

    name: str
    description: str
    packages: tuple[str, ...]
    license: str
    processing: str
    extract: Callable[[], list[str]]
    versions: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Environment checks
# --------------------------------------------------------------------------------------------

def require_path(path: str, package: str) -> pathlib.Path:
    """Fail early, naming the package to install, when a source file or tool is missing."""
    p = pathlib.Path(path)
    if not p.exists():
        raise MissingSource(f"{path} not found: install the Debian package '{package}' "
                            f"(apt-get install -y {package})")
    return p


def package_version(package: str) -> str:
    """Installed Debian version of ``package``, recorded so the build is traceable."""
    require_path("/usr/bin/dpkg-query", "dpkg")
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                            capture_output=True, text=True, env=CLEAN_ENV)
    status, _, version = result.stdout.partition("\t")
    if result.returncode != 0 or not status.endswith(" installed"):
        raise MissingSource(f"Debian package '{package}' is not installed "
                            f"(apt-get install -y {package})")
    return version


def package_files(package: str) -> list[str]:
    """Paths installed by ``package`` (sorted), so page selection does not depend on the disk."""
    result = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True,
                            env=CLEAN_ENV, check=True)
    return sorted(result.stdout.split("\n"))


# --------------------------------------------------------------------------------------------
# Text cleaning shared by all domains
# --------------------------------------------------------------------------------------------

_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_UNICODE_SPACE = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise whitespace so every domain has the same conventions.

    NFC unicode, LF line ends, no overstrike or other control characters, unicode spaces
    (no-break, thin, ...) as plain spaces, tabs expanded, no trailing spaces, at most one blank
    line in a row (two are reserved for document breaks).
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    while _OVERSTRIKE.search(text):
        text = _OVERSTRIKE.sub("", text)
    text = _UNICODE_SPACE.sub(" ", _CONTROL.sub("", text.replace("\f", "\n")))
    lines = [line.expandtabs(8).rstrip() for line in text.split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")


def chunk_document(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """Cut a long document at paragraph breaks so no single piece dominates a held-out split."""
    if len(text) <= limit:
        return [text]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) + 2 > limit:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    chunks.append("\n\n".join(current))
    return chunks


# --------------------------------------------------------------------------------------------
# bible: King James Version (bible-kjv-text, read with the `bible` program from bible-kjv)
# --------------------------------------------------------------------------------------------

def extract_bible() -> list[str]:
    """One document per chapter: a 'Book N' heading, a blank line, then one numbered verse a line."""
    require_path("/usr/lib/bible.data", "bible-kjv-text")
    bible = require_path("/usr/bin/bible", "bible-kjv")
    # -l sets the line width; a huge width keeps every verse on a single line.
    result = subprocess.run([str(bible), "-l100000", "Gen1:1-Rev22:21"], capture_output=True,
                            env=CLEAN_ENV, check=True)
    text = result.stdout.decode("ascii")
    chapters: list[str] = []
    heading, verses = None, []
    for line in text.split("\n"):
        if not line.strip():
            continue
        if not line.startswith(" "):              # "Genesis 1", "1 Samuel 3": chapter heading
            if heading:
                chapters.append(heading + "\n\n" + "\n".join(verses))
            heading, verses = line.strip(), []
        else:                                     # "  12 And God said, ..."
            verses.append(" ".join(line.split()))
    chapters.append(heading + "\n\n" + "\n".join(verses))
    if len(chapters) != 1189:
        raise RuntimeError(f"expected the 1189 chapters of the KJV, got {len(chapters)}")
    return chapters


# --------------------------------------------------------------------------------------------
# jargon: the Jargon File 4.4.7 (jargon-text)
# --------------------------------------------------------------------------------------------

_JARGON_SECTION = re.compile(r"^(Chapter \d+\. .*|Appendix [A-Z]\. .*|Glossary|Bibliography|"
                             r" {10,}(Welcome to the Jargon File|Part [IV]+\. .*))$")
_JARGON_ENTRY = re.compile(r"^   :[^\n]+:")
_JARGON_LETTER = re.compile(r"^  \S$")


def _strip_margin(text: str, width: int = 3) -> str:
    """Remove the File's left margin paragraph by paragraph, keeping alignment inside each one."""
    paragraphs = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.split("\n")
        cut = min([width] + [len(line) - len(line.lstrip(" ")) for line in lines if line.strip()])
        paragraphs.append("\n".join(line[cut:] for line in lines))
    return "\n\n".join(paragraphs)


def _drop_tables_of_contents(paragraphs: list[str]) -> list[str]:
    """Drop 'Table of Contents' blocks: the heading and the one-line titles listed after it."""
    kept: list[str] = []
    in_toc = False
    for paragraph in paragraphs:
        if paragraph.strip() == "Table of Contents":
            in_toc = True
            continue
        if in_toc and "\n" not in paragraph and len(paragraph.strip()) <= 60:
            continue
        in_toc = False
        kept.append(paragraph)
    return kept


def _jargon_glossary_entries(paragraphs: list[str]) -> list[str]:
    """Lexicon entries (':headword: ...' plus its body); per-letter title lists are dropped."""
    entries: list[list[str]] = []
    in_title_list = True
    for paragraph in paragraphs:
        if _JARGON_LETTER.match(paragraph):
            in_title_list = True                  # a letter heading is followed by a title list
        elif _JARGON_ENTRY.match(paragraph):
            in_title_list = False
            entries.append([paragraph])
        elif not in_title_list and entries:
            entries[-1].append(paragraph)
    return ["\n\n".join(entry) for entry in entries]


def extract_jargon() -> list[str]:
    """Front-matter chapters and appendices as documents, and every lexicon entry as one."""
    path = require_path("/usr/share/doc/jargon-text/jargon.txt.gz", "jargon-text")
    text = clean_text(gzip.decompress(path.read_bytes()).decode("utf-8"))
    sections: list[tuple[str, list[str]]] = []
    for paragraph in text.split("\n\n"):
        first_line = paragraph.split("\n", 1)[0]
        if "\n" not in paragraph and _JARGON_SECTION.match(first_line):
            sections.append((first_line.strip(), [first_line.strip()]))
        elif sections:
            sections[-1][1].append(paragraph)
    documents: list[str] = []
    for title, paragraphs in sections:
        if title == "Glossary":
            documents.extend(_jargon_glossary_entries(paragraphs[1:]))
            continue
        body = _drop_tables_of_contents(paragraphs[1:])
        if body and not title.startswith("Part "):
            documents.append("\n\n".join([title, *body]))
    return [_strip_margin(document) for document in documents]


# --------------------------------------------------------------------------------------------
# manpages: the Linux man-pages project (manpages, manpages-dev), rendered by groff
# --------------------------------------------------------------------------------------------

# Only pages whose own SPDX tag is one of these permissive / verbatim-copy licenses are used;
# GPL-licensed pages (and pages without a tag) are left out.
MANPAGE_LICENSES = ("Linux-man-pages-copyleft", "BSD-2-Clause", "BSD-3-Clause", "MIT")
_SPDX = re.compile(r'^\.\\"\s*SPDX-License-Identifier:\s*(\S+)\s*$', re.M)
_MAN_HEADER = re.compile(r"^\S+\(\w+\)\s.*\S+\(\w+\)$")


@dataclass
class ManPage:
    """A roff source page selected for the corpus, with its license tag and copyright header."""

    relpath: str
    source: str
    license: str
    copyright: str


@functools.cache
def select_manpages() -> list[ManPage]:
    """Real (not '.so' alias) pages of manpages/manpages-dev whose SPDX license is allowed."""
    require_path("/usr/bin/groff", "groff-base")
    pages: list[ManPage] = []
    for package in ("manpages", "manpages-dev"):
        package_version(package)
        for path in package_files(package):
            match = re.fullmatch(r"/usr/share/man/(man\w+/[^/]+)\.gz", path)
            if not match or os.path.islink(path):
                continue
            source = gzip.decompress(pathlib.Path(path).read_bytes()).decode("utf-8")
            body = [line for line in source.split("\n") if line and not line.startswith(('.\\"', "'\\\""))]
            if body and body[0].startswith(".so "):
                continue
            spdx = _SPDX.search(source)
            if not spdx or spdx.group(1) not in MANPAGE_LICENSES:
                continue
            header = source[: spdx.start()].split("\n")
            notice = "\n".join(line[3:].strip() for line in header if line.startswith('.\\"'))
            pages.append(ManPage(match.group(1), source, spdx.group(1), notice.strip()))
    return pages


def render_manpage(page: ManPage) -> str:
    """Plain-text rendering: 78 columns, left-adjusted, no hyphenation, no bold/underline."""
    result = subprocess.run(
        ["groff", "-k", "-t", "-e", "-man", "-Tutf8", "-rcR=1", "-rLL=78n", "-rLT=78n", "-rHY=0",
         "-P-cbou"],
        input=(".ad l\n" + page.source).encode("utf-8"), capture_output=True, env=CLEAN_ENV,
        check=True)
    lines = clean_text(result.stdout.decode("utf-8")).split("\n")
    if lines and _MAN_HEADER.match(lines[0]):
        lines = lines[1:]
    if lines and lines[-1].startswith("Linux man-pages"):
        lines = lines[:-1]
    return clean_text("\n".join(lines))


def extract_manpages() -> list[str]:
    """Every selected page rendered to text, one page per document (long pages chunked later)."""
    pages = select_manpages()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(render_manpage, pages))


def manpages_copyright_listing() -> str:
    """Per-page copyright headers: the man-pages licenses ask that rendered copies credit them."""
    blocks = [f"== {page.relpath} (SPDX-License-Identifier: {page.license})\n{page.copyright}"
              for page in select_manpages()]
    return ("Copyright notices of the Linux man-pages used in manpages.*.txt.xz, copied from the\n"
            "header comment of each page's roff source (Debian packages manpages, manpages-dev).\n\n"
            + "\n\n".join(blocks) + "\n")


# --------------------------------------------------------------------------------------------
# pydoc: Python 3.11 standard-library documentation rendered by pydoc (libpython3.11-stdlib)
# --------------------------------------------------------------------------------------------

# Modules left out: ones that misbehave on import (this, antigravity), test suites, ones Debian
# ships in other packages (so the result does not depend on what else is installed), the codec
# tables, and modules whose files carry a license other than the PSF license in Debian's
# copyright file (logging, multiprocessing, sqlite3, async*, tarfile, turtle, and the modules with
# their own notices: http.cookies, trace, uu, xmlrpc).
PYDOC_EXCLUDED = (
    "this", "antigravity", "test", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
    "distutils", "ensurepip", "venv", "pydoc_data", "dbm.gnu", "encodings.", "logging",
    "multiprocessing", "sqlite3", "asyncio", "asyncore", "asynchat", "tarfile", "http.cookies",
    "trace", "uu", "xmlrpc", "xxlimited", "xxsubtype", "xxlimited_35",
)

_PYDOC_RENDERER = r"""
import contextlib, importlib, io, json, pkgutil, pydoc, sys, warnings
excluded = tuple(sys.argv[1:])

def wanted(name):
    parts = name.split(".")
    if any(p.startswith("_") or p in ("test", "tests", "idle_test") for p in parts):
        return False
    return not any(name == e or name.startswith(e if e.endswith(".") else e + ".") for e in excluded)

def importable(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False

warnings.simplefilter("ignore")
names = []
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for top in sorted(n for n in sys.stdlib_module_names if wanted(n)):
        if not importable(top):
            continue
        names.append(top)
        module = sys.modules[top]
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, top + ".", onerror=lambda n: None):
                if wanted(info.name) and importable(info.name):
                    names.append(info.name)
    docs = [(n, pydoc.plaintext.document(sys.modules[n], n)) for n in sorted(set(names))]
json.dump(docs, sys.stdout)
"""

_PYDOC_DROPPED_SECTIONS = ("MODULE REFERENCE", "DATA", "FILE")
_PYDOC_SECTION = re.compile(r"^(?=[A-Z][A-Z ]+$)", re.M)
_PYDOC_RULE = re.compile(r"^(?:\s*\|)+  -{70}$")
_PYDOC_INHERITED = re.compile(r"^((?:\s*\|)+)  \w[\w ]* inherited from .+:$")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _drop_inherited_members(text: str) -> str:
    """Remove pydoc's 'Methods inherited from X:' sections, which repeat X's docs in subclasses.

    A section runs from its header to the next horizontal rule of the class body; the rule in
    front of a dropped section goes with it.
    """
    out: list[str] = []
    pending_rule = None
    skip_prefix = None
    for line in text.split("\n"):
        if _PYDOC_RULE.match(line):
            pending_rule, skip_prefix = line, None
            continue
        inherited = _PYDOC_INHERITED.match(line)
        if inherited:
            pending_rule, skip_prefix = None, inherited.group(1)
            continue
        if skip_prefix is not None and line.startswith(skip_prefix):
            continue
        skip_prefix = None
        if pending_rule is not None:
            out.append(pending_rule)
            pending_rule = None
        out.append(line)
    return "\n".join(out)


def clean_pydoc(text: str) -> str:
    """Keep NAME/DESCRIPTION/CLASSES/FUNCTIONS...; drop the URL boilerplate, values and paths.

    DATA shows run-time values (os.environ, sys.path), FILE shows install paths and MODULE
    REFERENCE is the same paragraph in every module, so none of them is documentation text.
    """
    sections = [s for s in _PYDOC_SECTION.split(text)
                if s.strip() and s.split("\n", 1)[0].strip() not in _PYDOC_DROPPED_SECTIONS]
    text = _ADDRESS.sub("", "".join(sections))
    return clean_text(_drop_inherited_members(clean_text(text)))


def extract_pydoc() -> list[str]:
    """One document per importable, wanted stdlib module, rendered by Debian's python3.11."""
    python = require_path("/usr/bin/python3.11", "python3.11")
    require_path("/usr/lib/python3.11/json/decoder.py", "libpython3.11-stdlib")
    # -S: no site-packages, so only the standard library is visible; the environment is fixed.
    result = subprocess.run([str(python), "-s", "-S", "-c", _PYDOC_RENDERER, *PYDOC_EXCLUDED],
                            capture_output=True, env=CLEAN_ENV, check=True, cwd="/")
    rendered = json.loads(result.stdout)
    return [clean_pydoc(text) for _, text in rendered]


# --------------------------------------------------------------------------------------------
# wordnet: WordNet 3.0 glosses (dict-wn, dictd format)
# --------------------------------------------------------------------------------------------

_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_WN_SENSE = re.compile(r"^\s+(?:(?:n|v|adj|adv)\s+)?\d+:\s", re.M)
_WN_XREF = re.compile(r"\[(?:syn|ant):[^\]]*\]")


def _dictd_number(digits: str) -> int:
    """Decode dictd's base-64 offsets and lengths."""
    value = 0
    for digit in digits:
        value = value * 64 + _DICTD_DIGITS.index(digit)
    return value


def _sense_keys(entry: str) -> list[str]:
    """The gloss of each sense, whitespace-collapsed and without the synonym lists."""
    body = entry.split("\n", 1)[1] if "\n" in entry else ""
    senses = _WN_SENSE.split(body)
    return [" ".join(_WN_XREF.sub("", sense).split()) for sense in senses if sense.strip()]


def extract_wordnet() -> list[str]:
    """Dictionary entries in alphabetical order, keeping only entries whose glosses are new.

    The dictd file repeats a synset's gloss under every one of its words; an entry is kept only
    if none of its glosses appeared in an entry kept before it (entries visited in a seeded
    random order), so no gloss occurs twice in the domain and splits cannot share one.
    """
    index = require_path("/usr/share/dictd/wn.index", "dict-wn")
    data = gzip.decompress(require_path("/usr/share/dictd/wn.dict.dz", "dict-wn").read_bytes())
    spans = set()
    for line in index.read_text(encoding="utf-8").split("\n"):
        if not line or line.startswith("00-database") or line.startswith("00database"):
            continue
        _, offset, length = line.split("\t")
        spans.add((_dictd_number(offset), _dictd_number(length)))
    entries = [clean_text(data[start:start + size].decode("utf-8")) for start, size in sorted(spans)]
    order = list(range(len(entries)))
    random.Random(f"{SEED}:wordnet-dedup").shuffle(order)
    seen: set[str] = set()
    kept = []
    for i in order:
        keys = _sense_keys(entries[i])
        if keys and not seen.intersection(keys):
            seen.update(keys)
            kept.append(i)
    return [entries[i] for i in sorted(kept)]


# --------------------------------------------------------------------------------------------
# Splitting, writing, manifest and NOTICE
# --------------------------------------------------------------------------------------------

def split_documents(documents: list[str], domain: str) -> dict[str, list[str]]:
    """Assign whole documents to splits in a seeded random order: valid, then test, then train.

    Valid and test each get documents until they hold HELDOUT_CHARS characters; train takes
    the rest up to TRAIN_CAP_CHARS. Every split keeps its documents in source order.
    """
    order = list(range(len(documents)))
    random.Random(f"{SEED}:{domain}").shuffle(order)
    limits = {"valid": HELDOUT_CHARS, "test": HELDOUT_CHARS, "train": TRAIN_CAP_CHARS}
    chosen: dict[str, list[int]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for i in order:
        split = next((s for s in ("valid", "test", "train") if sizes[s] < limits[s]), None)
        if split is None:
            break
        chosen[split].append(i)
        sizes[split] += len(documents[i])
    return {split: [documents[i] for i in sorted(chosen[split])] for split in SPLITS}


def prepare_documents(raw: list[str]) -> list[str]:
    """Clean, drop repeated paragraphs, then chunk; returns the domain's documents in order.

    A paragraph of at least DEDUP_MIN_CHARS characters that already occurred earlier in the
    domain (whitespace-insensitive) is dropped, so boilerplate such as a class documented under
    two module names cannot end up in both train and a held-out split. A document that loses
    more than half of its text this way is a near-duplicate and is dropped whole.
    """
    seen: set[str] = set()
    documents = []
    for text in raw:
        paragraphs = clean_text(text).split("\n\n")
        kept = []
        for paragraph in paragraphs:
            key = " ".join(paragraph.split())
            if len(key) >= DEDUP_MIN_CHARS and key in seen:
                continue
            seen.add(key)
            kept.append(paragraph)
        document = "\n\n".join(kept).strip("\n")
        if document and 2 * len(document) >= sum(len(p) + 2 for p in paragraphs):
            documents.extend(chunk_document(document))
    return documents


def write_xz(path: pathlib.Path, text: str) -> None:
    """xz with fixed settings; the xz container stores no timestamp or file name."""
    path.write_bytes(lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ,
                                   check=lzma.CHECK_CRC64, preset=XZ_PRESET))


def debian_license_paragraph(copyright_file: str, name: str) -> str:
    """The text of a stand-alone 'License: NAME' paragraph of a machine-readable copyright file."""
    text = pathlib.Path(copyright_file).read_text(encoding="utf-8")
    match = re.search(rf"^License: {re.escape(name)}\n((?: .*\n?)+)", text, re.M)
    if not match:
        raise RuntimeError(f"no 'License: {name}' paragraph in {copyright_file}")
    lines = [line[1:].rstrip() for line in match.group(1).rstrip("\n").split("\n")]
    return "\n".join("" if line == "." else line for line in lines)


def psf_license_text() -> str:
    """The PSF License Agreement version 2 as shipped in Debian's python3.11 copyright file."""
    text = require_path("/usr/share/doc/libpython3.11-stdlib/copyright",
                        "libpython3.11-stdlib").read_text(encoding="utf-8")
    start = text.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    end = text.index("BEOPEN.COM LICENSE AGREEMENT", start)
    return text[start:end].strip()


DOMAINS = (
    Domain(
        name="bible",
        description="The King James Version of the Bible (1611): all 66 books, one chapter a document.",
        packages=("bible-kjv-text", "bible-kjv"),
        license="Public domain (the KJV text); Debian packaging GPL-2+",
        processing="Text printed with `bible -l100000 Gen1:1-Rev22:21`; each chapter became a "
                   "document: a 'Book N' heading, a blank line, then one 'N verse text' line per verse.",
        extract=extract_bible,
    ),
    Domain(
        name="jargon",
        description="The Jargon File 4.4.7 (Eric S. Raymond et al.), the lexicon of hacker slang.",
        packages=("jargon-text",),
        license="Public domain",
        processing="jargon.txt from the package; the front-matter chapters and appendices are "
                   "documents, every lexicon entry is a document; tables of contents and the "
                   "per-letter title lists were dropped and the common 3-space indent removed.",
        extract=extract_jargon,
    ),
    Domain(
        name="wordnet",
        description="WordNet 3.0 dictionary entries: parts of speech, glosses, example phrases, synonyms.",
        packages=("dict-wn",),
        license="WordNet 3.0 license (permissive, BSD-like; full text below)",
        processing="Entries read from the dictd database via its index, in alphabetical order; an "
                   "entry is kept only if none of its glosses appeared in an earlier kept entry "
                   "(visited in a seeded random order), so the repeated synset glosses appear once.",
        extract=extract_wordnet,
    ),
    Domain(
        name="manpages",
        description="Linux man-pages 6.03: system calls, C library, file formats, overviews.",
        packages=("manpages", "manpages-dev", "groff-base"),
        license="Per page: " + ", ".join(MANPAGE_LICENSES) + " (from each page's SPDX tag); "
                "GPL-licensed and untagged pages were left out",
        processing="Each page's roff source rendered with groff 1.22 (`groff -k -t -e -man -Tutf8 "
                   "-rcR=1 -rLL=78n -rHY=0 -P-cbou`, left-adjusted), running header and footer "
                   "removed; '.so' alias pages skipped. Copyright notices of every page used are "
                   "in manpages.COPYRIGHT.",
        extract=extract_manpages,
    ),
    Domain(
        name="pydoc",
        description="Python 3.11 standard-library reference text as printed by pydoc.",
        packages=("libpython3.11-stdlib", "python3.11-minimal"),
        license="PSF License Agreement version 2 (full text below)",
        processing="`pydoc.plaintext.document(module)` for each importable public stdlib module "
                   "and submodule under Debian's /usr/bin/python3.11 -S; MODULE REFERENCE, DATA "
                   "and FILE sections, inherited-member blocks and object addresses removed. "
                   "Modules under other licenses, test suites and separately packaged modules "
                   "were left out (see PYDOC_EXCLUDED in scripts/build_corpus.py).",
        extract=extract_pydoc,
    ),
)


def build_notice(domains: tuple[Domain, ...]) -> str:
    """NOTICE: every source with its Debian package version, license, and what was done to it."""
    intro = (
        "Every file <domain>.<split>.txt.xz in this directory holds real text extracted from the "
        "Debian 12 (bookworm) packages named below by scripts/build_corpus.py; no text was "
        "generated or paraphrased. For all domains the text was normalised (NFC, LF line ends, "
        "unicode spaces as plain spaces, tabs expanded, control characters, overstrike and "
        "trailing spaces removed, runs of blank lines collapsed to one). A paragraph of "
        f"{DEDUP_MIN_CHARS}+ characters that already occurred earlier in its domain was dropped, "
        "as was a document that lost more than half of its text that way. Documents longer than "
        f"{MAX_DOC_CHARS:,} characters were cut at paragraph breaks. Whole documents were then "
        "assigned to valid, test and train with a fixed seed (train capped at "
        f"{TRAIN_CAP_CHARS:,} characters). Documents are separated by two blank lines."
    )
    parts = ["jaxcl embedded text corpus: sources, licenses and processing", "=" * 62, "",
             textwrap.fill(intro, width=96), ""]
    for domain in domains:
        versions = ", ".join(f"{p} {v}" for p, v in domain.versions.items())
        parts += [f"[{domain.name}] {domain.description}",
                  f"  Debian packages: {versions}",
                  textwrap.fill(f"License: {domain.license}", width=96, initial_indent="  ",
                                subsequent_indent="    "),
                  textwrap.fill(f"Processing: {domain.processing}", width=96,
                                initial_indent="  ", subsequent_indent="    "),
                  ""]
    parts += [
        "Licenses that require their text to accompany copies",
        "-" * 52,
        "",
        "WordNet 3.0 (wordnet.*), from /usr/share/doc/dict-wn/copyright:",
        "",
        debian_license_paragraph("/usr/share/doc/dict-wn/copyright", "WordNet3.0"),
        "",
        "PSF License Agreement (pydoc.*), from /usr/share/doc/libpython3.11-stdlib/copyright:",
        "",
        psf_license_text(),
        "",
    ]
    manpage_licenses = {"Linux-man-pages-copyleft": "Linux-man-pages-copyleft",
                        "BSD-3-Clause": "BSD-3-clause", "BSD-2-Clause": "BSD-2-clause", "MIT": "Expat"}
    for spdx, debian_name in manpage_licenses.items():
        parts += [f"{spdx} (manpages.*), from /usr/share/doc/manpages/copyright "
                  f"('License: {debian_name}'):", "",
                  debian_license_paragraph("/usr/share/doc/manpages/copyright", debian_name), ""]
    return "\n".join(parts)


def build(out_dir: pathlib.Path) -> dict:
    """Extract, split and write every domain; return the manifest that was written.

    Everything is extracted before anything is written, so a missing source leaves the
    previous corpus untouched.
    """
    for domain in DOMAINS:
        domain.versions = {p: package_version(p) for p in domain.packages}
    prepared = {domain.name: prepare_documents(domain.extract()) for domain in DOMAINS}
    notice, copyright_listing = build_notice(DOMAINS), manpages_copyright_listing()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "format": "xz-compressed UTF-8 text, documents separated by two blank lines",
        "document_separator": DOC_SEPARATOR,
        "seed": SEED,
        "stage_order": [domain.name for domain in DOMAINS],
        "domains": {},
    }
    for domain in DOMAINS:
        documents = prepared[domain.name]
        entry = {"description": domain.description, "license": domain.license,
                 "sources": domain.versions, "documents_available": len(documents),
                 "chars_available": sum(len(d) for d in documents), "splits": {}}
        for split, docs in split_documents(documents, domain.name).items():
            text = DOC_SEPARATOR.join(docs) + "\n"
            filename = f"{domain.name}.{split}.txt.xz"
            write_xz(out_dir / filename, text)
            entry["splits"][split] = {
                "file": filename, "chars": len(text), "documents": len(docs),
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "compressed_bytes": (out_dir / filename).stat().st_size,
            }
            print(f"{domain.name:9s} {split:5s} {len(text):>9,} chars {len(docs):>6,} docs "
                  f"{entry['splits'][split]['compressed_bytes']:>9,} bytes xz", flush=True)
        manifest["domains"][domain.name] = entry
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")
    (out_dir / "NOTICE").write_text(notice, encoding="utf-8")
    (out_dir / "manpages.COPYRIGHT").write_text(copyright_listing, encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit status 2 names a missing Debian package."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    if shutil.which("dpkg-query", path=CLEAN_ENV["PATH"]) is None:
        print("error: this build reads Debian packages and needs dpkg-query (Debian/Ubuntu)",
              file=sys.stderr)
        return 2
    try:
        build(args.out)
    except MissingSource as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {args.out} ({total:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
