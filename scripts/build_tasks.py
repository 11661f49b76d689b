"""Build the five text-classification tasks shipped in jaxcl/data/tasks/ (five sources, five label sets).

Every label comes from where the text was taken (its provenance), never from a model or a heuristic:

  bible_books     which part of the Bible a 3-verse passage is from (the chapter heading's book)
  wordnet_pos     the part of speech of a WordNet gloss (the entry's "n/v/adj/adv" sense marker)
  manpage_section the manual section of a man-page paragraph (the page's manN/ path in
                  jaxcl/data/corpus/manpages.COPYRIGHT, matched by the page's NAME line)
  pydoc_package   the standard-library package whose module a docstring paragraph is in (the file's path
                  under CPython 3.11's Lib/; docstrings read with `ast`, nothing imported)
  debian_section  the Debian archive section of a package whose description it is (the `Section:` field
                  of bookworm main's Packages index; the English description from its Translation-en)

The first three come from the Debian packages the embedded corpus (jaxcl/data/corpus) was built from, read
with scripts/build_corpus.py's own extractors (bible-kjv, dict-wn, manpages, manpages-dev, groff-base: see
that script for `apt-get install`); pydoc_package from the standard library of the interpreter running this
script (must be CPython 3.11; its version is recorded); debian_section from apt's lists of Debian 12
(bookworm) main, checked against the sha256 sums in SOURCE_SHA256 (a machine with other lists gets the exact
files from snapshot.debian.org, see NOTICE; `--apt-lists DIR`).

Held out from pre-training. A downstream score on text the model was pre-trained on measures memorisation,
so no task text may come from the corpus's train splits (what jaxcl pre-trains on). Every candidate text is
checked against all five train splits (whitespace-normalised, `jaxcl.data.overlap`): a text of at least
SPAN characters that shares a SPAN-character span with any of them, or a shorter text that occurs whole in
its domain's train split, is contaminated. A source document (chapter, entry, page, module) of which at
least half the texts are contaminated is left out whole (it is, or mostly is, a train document; its few
clean texts could still be near copies); in the other documents the contaminated texts alone are dropped.
The sources are larger than the corpus (the corpus's train splits are capped at 2 M characters per domain;
its valid and test documents are never trained on), so every task keeps every class. The counts dropped
are recorded in manifest.json, and tests/test_downstream.py checks the shipped files the same way.

Whole source documents (a chapter, a dictionary entry, a man page, a Python module, a Debian source
package) go to one split only, so no document contributes text to two splits: documents are shuffled per
class with a fixed seed and dealt, largest first, to whichever split is furthest below its 70 / 10 / 20 %
share of the class's examples (at least one document per split and class); then, for tasks with a
dominant class, each split is capped per class (`CAPS`). Texts that occur in two documents (boilerplate)
are left out. Run from the repository root:

    python scripts/build_tasks.py            # rewrites jaxcl/data/tasks/*.jsonl and manifest.json
    python scripts/build_tasks.py --tasks bible_books,wordnet_pos   # only these (others kept as they are)
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from jaxcl.data.corpus import DOMAINS, SPLITS, load_text  # noqa: E402
from jaxcl.data.overlap import SpanIndex, normalize  # noqa: E402

import build_corpus  # noqa: E402  (scripts/build_corpus.py: the corpus's own extractors)

OUT = ROOT / "jaxcl" / "data" / "tasks"
SEED = 0
MAX_CHARS = 400
# Examples per class and split, for tasks whose largest classes would otherwise swamp the rest (WordNet
# glosses are 74 % nouns; bookworm has 5x more `net` than `mail` packages). Other tasks keep every text.
CAPS = {"wordnet_pos": {"train": 1600, "valid": 230, "test": 460},
        "debian_section": {"train": 700, "valid": 100, "test": 200}}
FRACTIONS = (0.7, 0.1, 0.2)
SPAN = 80                       # characters of verbatim overlap with a corpus train split that disqualify a text
TASK_DOMAIN = {"bible_books": "bible", "wordnet_pos": "wordnet", "manpage_section": "manpages",
               "pydoc_package": "pydoc", "debian_section": None}

BIBLE_GROUPS = {
    "law": "Genesis Exodus Leviticus Numbers Deuteronomy",
    "history": "Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings 1_Chronicles 2_Chronicles Ezra Nehemiah Esther",
    "wisdom": "Job Psalms Proverbs Ecclesiastes Song_of_Solomon",
    "prophets": "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk "
                "Zephaniah Haggai Zechariah Malachi",
    "gospels_acts": "Matthew Mark Luke John Acts",
    "epistles_revelation": "Romans 1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians "
                           "1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James "
                           "1_Peter 2_Peter 1_John 2_John 3_John Jude Revelation",
}
BOOK_GROUP = {book.replace("_", " "): group for group, books in BIBLE_GROUPS.items() for book in books.split()}
POS_NAMES = {"n": "noun", "v": "verb", "adj": "adjective", "adv": "adverb"}
MAN_SECTIONS = {"2": "man2_system_calls", "3": "man3_library_functions", "4": "man4_special_files",
                "5": "man5_file_formats", "7": "man7_overviews"}
PYDOC_PACKAGES = ("asyncio", "distutils", "email", "http", "idlelib", "importlib", "lib2to3", "logging", "tkinter",
                  "unittest", "urllib", "xml")      # the stdlib packages with >= 100 docstring paragraphs
DEBIAN_SECTIONS = ("games", "graphics", "mail", "math", "net", "science", "sound", "web")   # topical sections
APT_LISTS = Path("/var/lib/apt/lists")
DEBIAN_FILES = {"packages": "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4",
                "translation": "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.lz4"}
SOURCE_SHA256 = {       # of the decompressed lists (Debian 12.15, InRelease dated 2026-07-11)
    "packages": "515e692f2c4121c6fcec444ef100cc18f79a991910615f3a88c8b7becfc94d2f",
    "translation": "62f59c3cdca9786e4f7adf9002f9f5729a684adcb4667e58e448dec9b5a46c7f"}


def clean(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS].rsplit(" ", 1)[0]


def paragraphs(doc: str, min_chars: int = 80) -> list[str]:
    return [clean(p) for p in doc.split("\n\n") if len(" ".join(p.split())) >= min_chars]


# --------------------------------------------------------------------------- per-task extraction
def bible_books():
    """(label, doc_id, texts): 3-verse passages of each chapter of the KJV, labelled with its book's group."""
    for doc in build_corpus.extract_bible():
        head, _, body = build_corpus.clean_text(doc).partition("\n\n")
        book = head.rsplit(" ", 1)[0]
        if book not in BOOK_GROUP:
            raise ValueError(f"unknown Bible book {book!r} in heading {head!r}")
        verses = [re.sub(r"^\d+ ", "", v) for v in body.splitlines() if v.strip()]
        passages = [clean(" ".join(verses[i:i + 3])) for i in range(0, len(verses) - 2, 3)]
        yield BOOK_GROUP[book], head, passages


def wordnet_entries() -> list[str]:
    """Every entry of dict-wn's WordNet 3.0 dictionary (the corpus keeps a deduplicated subset of them)."""
    index = build_corpus.require_path("/usr/share/dictd/wn.index", "dict-wn")
    data = gzip.decompress(build_corpus.require_path("/usr/share/dictd/wn.dict.dz", "dict-wn").read_bytes())
    spans = set()
    for line in index.read_text(encoding="utf-8").split("\n"):
        if line and not line.startswith(("00-database", "00database")):
            _, offset, length = line.split("\t")
            spans.add((build_corpus._dictd_number(offset), build_corpus._dictd_number(length)))
    return [build_corpus.clean_text(data[a:a + n].decode("utf-8")) for a, n in sorted(spans)]


def wordnet_pos():
    """Each dictionary entry's glosses, labelled with the part of speech they are listed under."""
    for doc in wordnet_entries():
        head, _, body = doc.partition("\n")
        for pos_block in re.split(r"\n(?=    (?:n|v|adj|adv) 1:)", "\n" + body):
            m = re.match(r"\s*(n|v|adj|adv) 1:", pos_block)
            if not m:
                continue
            senses = re.split(r"(?:^|\s)(?:(?:n|v|adj|adv) )?\d+: ", pos_block)
            glosses = [clean(re.sub(r"\[(syn|ant|also)[^\]]*\]?", "", s)) for s in senses]
            yield POS_NAMES[m.group(1)], f"{head}/{m.group(1)}", [g for g in glosses if len(g) >= 20]


def manpage_sections():
    """Paragraphs of every man page the corpus may use (manpages, manpages-dev; license-checked by
    build_corpus.select_manpages), labelled with the section of its manN/ source path."""
    pages = [p for p in build_corpus.select_manpages() if p.relpath.split("/")[0][3:] in MAN_SECTIONS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        rendered = list(pool.map(build_corpus.render_manpage, pages))
    for page, text in zip(pages, rendered):
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""     # the NAME paragraph is left out
        yield MAN_SECTIONS[page.relpath.split("/")[0][3:]], page.relpath, paragraphs(body)


def pydoc_packages():
    """Docstring paragraphs of every module of a stdlib package (tests left out), labelled with the package."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit(f"pydoc_package is built from CPython 3.11's standard library; this is {sys.version}")
    lib = Path(sysconfig.get_paths()["stdlib"])
    for package in PYDOC_PACKAGES:
        for path in sorted((lib / package).rglob("*.py")):
            if any(part.startswith("test") for part in path.relative_to(lib).parts):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            docs = [ast.get_docstring(node) for node in ast.walk(tree)
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            yield package, str(path.relative_to(lib)), [p for d in docs if d for p in paragraphs(d)]


def _deb822(path: Path, name: str) -> list[dict[str, str]]:
    """The stanzas of an lz4-compressed apt list, after checking the decompressed file's sha256."""
    raw = subprocess.run(["lz4", "-dc", str(path)], capture_output=True, check=True).stdout
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256[name]:
        raise SystemExit(f"{path}: sha256 {digest} is not the recorded {SOURCE_SHA256[name]}; fetch the 2026-07-11 "
                         "bookworm lists from snapshot.debian.org (see jaxcl/data/tasks/NOTICE) and pass --apt-lists")
    stanzas = []
    for block in raw.decode("utf-8").split("\n\n"):
        fields, key = {}, None
        for line in block.split("\n"):
            if line.startswith(" ") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def debian_sections():
    """Each binary package's description (short line + first paragraph), by archive section; documents are
    source packages, so a -dev, -doc or plugin package lands in the same split as its program."""
    packages = _deb822(APT_LISTS / DEBIAN_FILES["packages"], "packages")
    english = {f["Description-md5"]: f["Description-en"]
               for f in _deb822(APT_LISTS / DEBIAN_FILES["translation"], "translation") if "Description-md5" in f}
    by_source = collections.defaultdict(list)
    for f in packages:
        section = f.get("Section", "").split("/")[-1]
        description = english.get(f.get("Description-md5", ""))
        if section not in DEBIAN_SECTIONS or not description:
            continue
        short, _, long = description.partition("\n")
        first = " ".join(long.split("\n .\n")[0].split())
        text = clean(f"{short.strip()}. {first}" if first else short.strip())
        source = f.get("Source", f["Package"]).split()[0]
        if len(text) >= 40 and text not in by_source[(section, source)]:
            by_source[(section, source)].append(text)
    for (section, source), texts in sorted(by_source.items()):
        yield section, f"{source}/{section}", texts


TASKS = {"bible_books": bible_books, "wordnet_pos": wordnet_pos, "manpage_section": manpage_sections,
         "pydoc_package": pydoc_packages, "debian_section": debian_sections}
SOURCES = {"bible_books": "Debian bible-kjv-text (the corpus's bible source)",
           "wordnet_pos": "Debian dict-wn (the corpus's wordnet source)",
           "manpage_section": "Debian manpages, manpages-dev (the corpus's manpages source)",
           "pydoc_package": f"CPython {sys.version.split()[0]} standard library docstrings",
           "debian_section": "Debian 12 bookworm main: Packages + Translation-en (2026-07-11)"}


_INDEX: SpanIndex | None = None
_TRAIN: dict[str, str] = {}


def contaminated(texts: list[str], domain: str | None) -> list[bool]:
    """Per text: shares a SPAN-character span with any corpus train split, or (shorter than SPAN) occurs whole
    in its domain's train split (whitespace-normalised)."""
    global _INDEX
    if _INDEX is None:
        _TRAIN.update({d: normalize(load_text(d, "train")) for d in DOMAINS})
        _INDEX = SpanIndex(_TRAIN.values(), span=SPAN)
    shared = _INDEX.shared_spans(texts)
    short = [len(normalize(t)) < SPAN for t in texts]
    return [bool(shared[i]) or (short[i] and domain is not None and normalize(t) in _TRAIN[domain])
            for i, t in enumerate(texts)]


def split_task(name: str) -> dict:
    by_class: dict[str, list[tuple[str, list[str]]]] = collections.defaultdict(list)
    extracted = [(label, doc_id, texts) for label, doc_id, texts in TASKS[name]()]
    seen = collections.Counter(t for _, _, texts in extracted for t in texts)
    flat = [t for _, _, texts in extracted for t in texts]
    bad = dict(zip(flat, contaminated(flat, TASK_DOMAIN[name])))
    held_out = {"documents_left_out": 0, "texts_dropped": 0, "documents_kept": 0}
    for label, doc_id, texts in extracted:
        texts = [t for t in texts if seen[t] == 1]          # boilerplate shared by documents is left out
        if not texts:
            continue
        dirty = sum(bad[t] for t in texts)
        if 2 * dirty >= len(texts):                         # (mostly) a train document: left out whole
            held_out["documents_left_out"] += 1
            continue
        held_out["texts_dropped"] += dirty
        held_out["documents_kept"] += 1
        by_class[label].append((doc_id, [t for t in texts if not bad[t]]))
    scarce = sorted(label for label, docs in by_class.items() if len(docs) < 3)
    for label in scarce:       # a class needs a clean document in each split (e.g. man4/man5: 3 and 2 pages left)
        del by_class[label]
    held_out["classes_left_out"] = scarce
    labels = sorted(by_class)
    rng = random.Random(f"{SEED}/{name}")
    out = {s: [] for s in SPLITS}
    for label in labels:
        docs = by_class[label]
        rng.shuffle(docs)
        docs.sort(key=lambda d: -len(d[1]))              # largest first, so every split can reach its share
        total = sum(len(t) for _, t in docs)
        parts = {s: [] for s in SPLITS}
        filled = dict.fromkeys(SPLITS, 0)
        for n, doc in enumerate(docs):
            empty = [s for s in SPLITS if not parts[s]]
            left = len(docs) - n
            choices = empty if len(empty) >= left else SPLITS   # keep one document for every empty split
            split = max(choices, key=lambda s: FRACTIONS[SPLITS.index(s)] * total - filled[s])
            parts[split].append(doc)
            filled[split] += len(doc[1])
        for split in SPLITS:
            texts = [t for _, ts in parts[split] for t in ts]
            rng.shuffle(texts)
            cap = CAPS.get(name, {}).get(split)
            out[split] += [{"text": t, "label": labels.index(label)} for t in texts[:cap]]
    for split in SPLITS:
        rng.shuffle(out[split])
    return {"labels": labels, "splits": out, "held_out": held_out}


def main() -> None:
    global APT_LISTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apt-lists", type=Path, default=APT_LISTS, help="directory of the bookworm apt lists")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="comma-separated tasks to rebuild (the others keep their files and manifest entries)")
    args = parser.parse_args()
    APT_LISTS = args.apt_lists
    chosen = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not chosen or set(chosen) - set(TASKS):
        raise SystemExit(f"--tasks {args.tasks!r}: choose from {', '.join(TASKS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    old = json.loads((OUT / "manifest.json").read_text()) if (OUT / "manifest.json").is_file() else {}
    manifest = {}
    for name in TASKS:
        if name not in chosen:
            if name not in old:
                raise SystemExit(f"{name} has no manifest entry to keep: rebuild it too (--tasks)")
            manifest[name] = old[name]
            continue
        built = split_task(name)
        manifest[name] = {"source": SOURCES[name], "labels": built["labels"], "files": {},
                          "held_out_from_corpus_train": {"span_chars": SPAN, **built["held_out"]}}
        for split, rows in built["splits"].items():
            path = OUT / f"{name}.{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            counts = collections.Counter(r["label"] for r in rows)
            manifest[name]["files"][path.name] = {
                "examples": len(rows), "per_label": [counts.get(i, 0) for i in range(len(built["labels"]))],
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        print(name, built["labels"], {s: len(r) for s, r in built["splits"].items()}, built["held_out"], flush=True)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
