"""The end tasks `jaxcl downstream` fine-tunes on: shipped tasks, or a user's `<task>.<split>.jsonl` files.

    tasks = resolve_tasks(cfg.downstream, domains=("bible", "jargon", ...), only=None)
    tasks["bible_books"].domain, .split("train").texts, .label_names

A task is paired with a domain of the pre-training stream (`downstream.tasks: {domain: task}`); the pair
decides when the task counts as seen (after the stage that trained its domain) and which domain prompt an
ELLE checkpoint is fine-tuned with. Shipped tasks (`jaxcl.data.classification.SHIPPED_TASKS`) hold no text of
the embedded corpus's train splits (`scripts/build_tasks.py`, tested). A user's task directory holds, per
task, `<task>.train.jsonl`, `<task>.test.jsonl` and optionally `<task>.valid.jsonl` (without it, a fixed
10 % of train, at most `max_valid_texts`, is held out as validation), one JSON object per line with a
non-empty string `text` and a `label` (a string or an integer). The label set is the training split's
labels (sorted); a valid or test label outside it is an error naming the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from jaxcl.config import ConfigError, DownstreamConfig
from jaxcl.data.classification import SHIPPED_TASKS, TaskSplit, load_task
from jaxcl.eval.metrics import seed_from_text

__all__ = ["DownstreamTask", "resolve_tasks", "read_task_dir"]

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class DownstreamTask:
    """One end task: its name, the domain it belongs to, and its capped splits (same label names in all)."""

    name: str
    domain: str
    splits: Mapping[str, TaskSplit]
    source: str                         # "shipped" or the task directory

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.splits["train"].label_names

    def split(self, name: str) -> TaskSplit:
        return self.splits[name]


def _subset(split: TaskSplit, n: int, seed: str) -> TaskSplit:
    """A fixed seeded choice of `n` examples (all when n <= 0 or the split is smaller), in file order."""
    if n <= 0 or len(split) <= n:
        return split
    keep = np.sort(np.random.default_rng(seed_from_text(seed)).permutation(len(split))[:n])
    return dataclasses.replace(split, texts=tuple(split.texts[i] for i in keep), labels=split.labels[keep])


def read_task_dir(directory: str | Path, task: str, max_valid_texts: int) -> dict[str, TaskSplit]:
    """The splits of a user's task in `directory` (see the module docstring); errors name file and line."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ConfigError(f"downstream.task_dir={str(directory)!r} is not a directory")
    rows: dict[str, list[tuple[str, object, int]]] = {}
    for split in SPLITS:
        path = root / f"{task}.{split}.jsonl"
        if not path.is_file():
            if split == "valid":
                continue
            raise ConfigError(f"downstream task {task!r}: {path} does not exist (a task needs {task}.train.jsonl and "
                              f"{task}.test.jsonl, and may have {task}.valid.jsonl)")
        out = []
        with path.open(encoding="utf-8") as f:
            try:
                lines = list(f)
            except UnicodeDecodeError:
                raise ConfigError(f"{path} is not UTF-8 text") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ConfigError(f"{path}:{n}: each line needs a non-empty string \"text\"")
            label = row.get("label")
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ConfigError(f"{path}:{n}: \"label\" must be a string or an integer, got {label!r}")
            out.append((row["text"], label, n))
        if not out:
            raise ConfigError(f"{path} holds no examples")
        rows[split] = out
    kinds = {type(label) for split_rows in rows.values() for _, label, _ in split_rows}
    if len(kinds) > 1:
        raise ConfigError(f"downstream task {task!r}: labels mix strings and integers across "
                          f"{root}/{task}.*.jsonl; use one kind")
    names = tuple(str(x) for x in sorted({label for _, label, _ in rows["train"]}))
    if len(names) < 2:
        raise ConfigError(f"{root / f'{task}.train.jsonl'}: a classification task needs at least 2 labels, "
                          f"found {list(names)}")
    index = {label: i for i, label in enumerate(sorted({label for _, label, _ in rows["train"]}))}
    splits = {}
    for split, split_rows in rows.items():
        for _, label, n in split_rows:
            if label not in index:
                raise ConfigError(f"{root / f'{task}.{split}.jsonl'}:{n}: label {label!r} is not in the task's "
                                  f"label set (the labels of {task}.train.jsonl: {list(names)})")
        splits[split] = TaskSplit(task, split, tuple(t for t, _, _ in split_rows),
                                  np.array([index[label] for _, label, _ in split_rows], np.int32), names)
    if "valid" not in splits:          # a fixed 10 % of train (at most max_valid_texts) becomes validation
        train = splits["train"]
        n_valid = max(1, min(max_valid_texts, len(train) // 10))
        order = np.random.default_rng(seed_from_text(f"valid/{task}")).permutation(len(train))
        held, kept = np.sort(order[:n_valid]), np.sort(order[n_valid:])
        splits["valid"] = TaskSplit(task, "valid", tuple(train.texts[i] for i in held), train.labels[held], names)
        splits["train"] = TaskSplit(task, "train", tuple(train.texts[i] for i in kept), train.labels[kept], names)
    return splits


def resolve_tasks(cfg: DownstreamConfig, domains: Sequence[str], only: Sequence[str] | None = None) -> dict[str, DownstreamTask]:
    """The configured tasks whose domain is in `domains` (those in `only` when given), in stream order.

    `only` may name tasks or domains (a domain stands for its task). Pairs of `downstream.tasks` whose domain the
    run never trains are not used. Errors (ConfigError, one line): no pair applies to the run; a name in `only`
    that is neither a used task nor a mapped domain (a domain of the run without a task mapping says so); an
    unknown task (neither shipped nor in `downstream.task_dir`)."""
    by_task = {task: domain for domain, task in cfg.tasks.items() if domain in domains}
    if not by_task:
        raise ConfigError(f"downstream.tasks maps none of the run's domains ({', '.join(domains)}) to a task: add "
                          f"downstream.tasks.<domain>=<task> (it maps {', '.join(cfg.tasks) or 'nothing'})")
    order = list(domains)
    chosen = []
    for name in (only or sorted(by_task, key=lambda t: order.index(by_task[t]))):
        if name in by_task:
            chosen.append(name)
        elif name in cfg.tasks and cfg.tasks[name] in by_task:
            chosen.append(cfg.tasks[name])                  # a domain names its task
        elif name in domains:
            raise ConfigError(f"--tasks {name}: domain {name!r} has no task mapping (downstream.tasks maps "
                              f"{', '.join(f'{d}: {t}' for t, d in by_task.items())}); add "
                              f"downstream.tasks.{name}=<task>")
        else:
            hint = (f"; task {name!r} exists but no domain of the run is mapped to it: add "
                    f"downstream.tasks.<domain>={name}" if name in SHIPPED_TASKS or _in_task_dir(cfg, name) else "")
            raise ConfigError(f"--tasks: unknown task {name!r} (this run's tasks: {', '.join(by_task)}){hint}")
    chosen = list(dict.fromkeys(chosen))
    out = {}
    for task in chosen:
        if cfg.task_dir is not None and _in_task_dir(cfg, task):
            splits, source = read_task_dir(cfg.task_dir, task, cfg.max_valid_texts), str(cfg.task_dir)
        elif task in SHIPPED_TASKS:
            splits, source = {s: load_task(task, s) for s in SPLITS}, "shipped"
        else:
            where = f" or in downstream.task_dir={cfg.task_dir!r}" if cfg.task_dir else " (set downstream.task_dir " \
                "for your own tasks)"
            raise ConfigError(f"downstream.tasks.{by_task[task]}={task!r}: no such task: not shipped "
                              f"({', '.join(SHIPPED_TASKS)}){where}")
        caps = {"train": cfg.max_train_texts, "valid": cfg.max_valid_texts, "test": cfg.max_test_texts}
        splits = {s: _subset(splits[s], caps[s], f"{task}/{s}") for s in SPLITS}
        out[task] = DownstreamTask(task, by_task[task], splits, source)
    return out


def _in_task_dir(cfg: DownstreamConfig, task: str) -> bool:
    return cfg.task_dir is not None and (Path(cfg.task_dir).expanduser() / f"{task}.train.jsonl").is_file()
