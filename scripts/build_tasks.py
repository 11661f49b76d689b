"""Build the small text-classification tasks shipped in jaxcl/data/tasks/ from the embedded corpus.

Every label comes from where the text was taken (its provenance), never from a model or a heuristic:

  bible_books     which part of the Bible a 3-verse passage is from (the chapter heading's book)
  wordnet_pos     the part of speech of a WordNet gloss (the entry's "n/v/adj/adv" sense marker)
  manpage_section the manual section of a man-page paragraph (the page's manN/ path in
                  jaxcl/data/corpus/manpages.COPYRIGHT, matched by the page's NAME line)
  pydoc_package   the standard-library package a pydoc paragraph documents (the page's NAME line)

Whole source documents (a chapter, a dictionary entry, a man page, a module's pydoc page) go to one
split only, so no document contributes text to two splits: documents are shuffled per class with a
fixed seed and dealt, largest first, to whichever split is furthest below its 70 / 10 / 20 % share of
the class's examples (at least one document per split and class), then each split is capped per class.
Run from the repository root:

    python scripts/build_tasks.py            # rewrites jaxcl/data/tasks/*.jsonl and manifest.json
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxcl.data.corpus import DOCUMENT_SEPARATOR, SPLITS, load_text  # noqa: E402

OUT = ROOT / "jaxcl" / "data" / "tasks"
SEED = 0
MAX_CHARS = 400
CAPS = {"train": 120, "valid": 24, "test": 48}     # examples per class and split
FRACTIONS = (0.7, 0.1, 0.2)

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
PYDOC_PACKAGES = ("email", "xml", "urllib", "importlib", "wsgiref", "curses", "http")


def all_documents(domain: str) -> list[str]:
    return [d for split in SPLITS for d in load_text(domain, split).split(DOCUMENT_SEPARATOR) if d.strip()]


def clean(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS].rsplit(" ", 1)[0]


def paragraphs(doc: str, min_chars: int = 80) -> list[str]:
    return [clean(p) for p in doc.split("\n\n") if len(" ".join(p.split())) >= min_chars]


# --------------------------------------------------------------------------- per-task extraction
def bible_books():
    """(label, doc_id, texts): 3-verse passages of each chapter, labelled with its book's group."""
    for doc in all_documents("bible"):
        head, _, body = doc.partition("\n\n")
        book = head.rsplit(" ", 1)[0]
        if book not in BOOK_GROUP:
            raise ValueError(f"unknown Bible book {book!r} in heading {head!r}")
        verses = [re.sub(r"^\d+ ", "", v) for v in body.splitlines() if v.strip()]
        passages = [clean(" ".join(verses[i:i + 3])) for i in range(0, len(verses) - 2, 3)]
        yield BOOK_GROUP[book], head, passages


def wordnet_pos():
    """Each dictionary entry's glosses, labelled with the part of speech they are listed under."""
    for doc in all_documents("wordnet"):
        head, _, body = doc.partition("\n")
        for pos_block in re.split(r"\n(?=    (?:n|v|adj|adv) 1:)", "\n" + body):
            m = re.match(r"\s*(n|v|adj|adv) 1:", pos_block)
            if not m:
                continue
            senses = re.split(r"(?:^|\s)(?:(?:n|v|adj|adv) )?\d+: ", pos_block)
            glosses = [clean(re.sub(r"\[(syn|ant|also)[^\]]*\]?", "", s)) for s in senses]
            yield POS_NAMES[m.group(1)], f"{head}/{m.group(1)}", [g for g in glosses if len(g) >= 20]


def manpage_sections():
    """Paragraphs of each man page (NAME line -> manN/ path in manpages.COPYRIGHT) by section."""
    copyright_text = (ROOT / "jaxcl" / "data" / "corpus" / "manpages.COPYRIGHT").read_text()
    sections = collections.defaultdict(set)
    for m in re.finditer(r"^== man(\d)/(.+)\.\d\S* ", copyright_text, re.M):
        sections[m.group(2)].add(m.group(1))
    for doc in all_documents("manpages"):
        m = re.match(r"NAME\n\s+(.+?) - ", doc)
        if not m:
            continue                                    # a continuation of a page cut at 20,000 characters
        names = [n.strip() for n in m.group(1).split(",")]
        found = {s for n in names for s in sections.get(n, ())}
        if len(found) != 1 or (section := found.pop()) not in MAN_SECTIONS:
            continue                                    # unknown or ambiguous page
        body = doc.split("\n\n", 1)[1] if "\n\n" in doc else ""
        yield MAN_SECTIONS[section], names[0], paragraphs(body)


def pydoc_packages():
    """Paragraphs of each module's pydoc page, labelled with the module's top-level package."""
    for doc in all_documents("pydoc"):
        m = re.match(r"NAME\n\s+(\S+)", doc)
        if not m or m.group(1).split(".")[0] not in PYDOC_PACKAGES:
            continue
        body = doc.split("\n\n", 1)[1] if "\n\n" in doc else ""
        yield m.group(1).split(".")[0], m.group(1), paragraphs(body)


TASKS = {"bible_books": bible_books, "wordnet_pos": wordnet_pos, "manpage_section": manpage_sections,
         "pydoc_package": pydoc_packages}
SOURCES = {"bible_books": "bible", "wordnet_pos": "wordnet", "manpage_section": "manpages",
           "pydoc_package": "pydoc"}


def split_task(name: str) -> dict:
    by_class: dict[str, list[tuple[str, list[str]]]] = collections.defaultdict(list)
    extracted = [(label, doc_id, texts) for label, doc_id, texts in TASKS[name]()]
    seen = collections.Counter(t for _, _, texts in extracted for t in texts)
    for label, doc_id, texts in extracted:
        texts = [t for t in texts if seen[t] == 1]          # boilerplate shared by documents is left out
        if texts:
            by_class[label].append((doc_id, texts))
    labels = sorted(by_class)
    rng = random.Random(f"{SEED}/{name}")
    out = {s: [] for s in SPLITS}
    for label in labels:
        docs = by_class[label]
        rng.shuffle(docs)
        if len(docs) < 3:
            raise ValueError(f"task {name}: class {label!r} has only {len(docs)} source documents")
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
            out[split] += [{"text": t, "label": labels.index(label)} for t in texts[:CAPS[split]]]
    for split in SPLITS:
        rng.shuffle(out[split])
    return {"labels": labels, "splits": out}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in TASKS:
        built = split_task(name)
        manifest[name] = {"source_domain": SOURCES[name], "labels": built["labels"], "files": {}}
        for split, rows in built["splits"].items():
            path = OUT / f"{name}.{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            counts = collections.Counter(r["label"] for r in rows)
            manifest[name]["files"][path.name] = {
                "examples": len(rows), "per_label": [counts.get(i, 0) for i in range(len(built["labels"]))],
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        print(name, built["labels"], {s: len(r) for s, r in built["splits"].items()})
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
