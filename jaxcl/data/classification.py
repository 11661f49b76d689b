"""Text-classification tasks: the small ones shipped in jaxcl/data/tasks/, and the standard 5-task CSVs.

    split = load_task("wordnet_pos", "train")      # TaskSplit(texts, labels [n] int32, label_names)
    split = load_task("ag_news", "test", root="~/data/lamol")   # AG News / Yelp / Amazon / DBpedia / Yahoo

Shipped tasks (labels from provenance; see jaxcl/data/tasks/NOTICE): `SHIPPED_TASKS`. The standard
benchmark (Zhang et al. 2015, as used by MbPA++, LAMOL, IDBR and SLM) is read from a local directory
holding, per task, `<task>/<split>.csv` or the original `<name>_csv/<split>.csv` folders; rows are
`label,field,...` with 1-based labels; the text is the non-empty fields joined with " ". Nothing is
downloaded.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.resources
import json
from pathlib import Path

import numpy as np

SHIPPED_TASKS: tuple[str, ...] = ("bible_books", "wordnet_pos", "manpage_section", "pydoc_package", "debian_section")
SPLITS: tuple[str, ...] = ("train", "valid", "test")

# The standard 5-task benchmark: directory names tried under `root`, and the label names.
BENCHMARK_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ag_news": (("ag_news", "ag_news_csv", "agnews"), ("World", "Sports", "Business", "Sci/Tech")),
    "yelp": (("yelp", "yelp_review_full_csv", "yelp_review_full"), ("1 star", "2 stars", "3 stars", "4 stars",
                                                                    "5 stars")),
    "amazon": (("amazon", "amazon_review_full_csv", "amazon_review_full"), ("1 star", "2 stars", "3 stars",
                                                                            "4 stars", "5 stars")),
    "dbpedia": (("dbpedia", "dbpedia_csv"), ("Company", "EducationalInstitution", "Artist", "Athlete",
                                             "OfficeHolder", "MeanOfTransportation", "Building", "NaturalPlace",
                                             "Village", "Animal", "Plant", "Album", "Film", "WrittenWork")),
    "yahoo": (("yahoo", "yahoo_answers_csv", "yahoo_answers"), ("Society & Culture", "Science & Mathematics",
                                                                "Health", "Education & Reference",
                                                                "Computers & Internet", "Sports",
                                                                "Business & Finance", "Entertainment & Music",
                                                                "Family & Relationships", "Politics & Government")),
}


@dataclasses.dataclass(frozen=True)
class TaskSplit:
    """One split of one task: texts, integer labels `[n]` and the task's label names."""

    task: str
    split: str
    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None) -> "TaskSplit":
        """The first `n` examples (all when None)."""
        if n is None or n >= len(self):
            return self
        return dataclasses.replace(self, texts=self.texts[:n], labels=self.labels[:n])


@functools.lru_cache(maxsize=None)
def shipped_manifest() -> dict:
    """Labels, counts and checksums of the shipped tasks (jaxcl/data/tasks/manifest.json)."""
    return json.loads(importlib.resources.files("jaxcl.data").joinpath("tasks", "manifest.json").read_text("utf-8"))


def load_task(task: str, split: str, root: str | Path | None = None) -> TaskSplit:
    """A shipped task (root=None) or a standard-benchmark task read from CSVs under `root`."""
    if split not in SPLITS:
        raise ValueError(f"unknown task split {split!r}; choose one of: {', '.join(SPLITS)}")
    if root is None:
        return _load_shipped(task, split)
    return load_benchmark_csv(task, split, root)


def _load_shipped(task: str, split: str) -> TaskSplit:
    manifest = shipped_manifest()
    if task not in manifest:
        raise ValueError(f"unknown shipped task {task!r}; choose one of: {', '.join(manifest)} "
                         f"(or give a directory of benchmark CSVs)")
    text = importlib.resources.files("jaxcl.data").joinpath("tasks", f"{task}.{split}.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return TaskSplit(task, split, tuple(r["text"] for r in rows), np.array([r["label"] for r in rows], np.int32),
                     tuple(manifest[task]["labels"]))


def load_benchmark_csv(task: str, split: str, root: str | Path) -> TaskSplit:
    """One split of AG News / Yelp / Amazon / DBpedia / Yahoo from a local directory (1-based CSV labels).

    `valid` reads `valid.csv` (or `dev.csv`) when present; the original release has none, so this
    raises naming the files it looked for, and callers carve validation data out of train themselves.
    """
    if task not in BENCHMARK_TASKS:
        raise ValueError(f"unknown benchmark task {task!r}; choose one of: {', '.join(BENCHMARK_TASKS)}")
    dirs, label_names = BENCHMARK_TASKS[task]
    names = {"train": ("train.csv",), "valid": ("valid.csv", "dev.csv"), "test": ("test.csv",)}[split]
    tried = [Path(root).expanduser() / d / n for d in dirs for n in names]
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no {split} CSV for benchmark task {task!r}; looked for: "
                                + ", ".join(str(p) for p in tried))
    texts, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            try:
                label = int(row[0]) - 1
            except ValueError:
                raise ValueError(f"{path}:{line_no}: first column must be a 1-based integer label, "
                                 f"got {row[0]!r}") from None
            if not 0 <= label < len(label_names):
                raise ValueError(f"{path}:{line_no}: label {label + 1} is outside 1..{len(label_names)} "
                                 f"for task {task!r}")
            text = " ".join(" ".join(field.replace("\\n", " ").split()) for field in row[1:] if field.strip())
            texts.append(text)
            labels.append(label)
    if not texts:
        raise ValueError(f"{path} holds no examples")
    return TaskSplit(task, split, tuple(texts), np.array(labels, np.int32), label_names)


__all__ = ["SHIPPED_TASKS", "SPLITS", "BENCHMARK_TASKS", "TaskSplit", "load_task", "load_benchmark_csv",
           "shipped_manifest"]
