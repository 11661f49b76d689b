"""TensorBoard event files next to every run's `metrics.jsonl`: `tensorboard --logdir runs/` shows losses,
perplexities, memory sizes and accuracies of every method.

The events are a pure function of `metrics.jsonl`: each record becomes scalars (`record_scalars`), written
as it is logged; when a resumed run truncates `metrics.jsonl` back to its last commit, the event files are
rebuilt from what remains (`TensorBoardLog.rebuild`), so TensorBoard never shows the steps a killed
invocation logged and the resumed one redid. Writing goes through `tensorboardX`'s synchronous event
writer and protos (a kept library, no TensorFlow needed): a record is on disk when `write` returns (its
`SummaryWriter` queues events on a thread and its `flush` does not wait for the queue).

Tags: `<kind>[/<method|policy|model|phase|split>...]/<field>[/<domain|task|key>]`, e.g.
`train/loss`, `eval/perplexity/bible`, `semem_chunk/semem/memory_size`. The step is the record's
`global_step`, else `tokens_seen` (SeMem streams), else `step`, else a per-tag counter.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["EVENTS_DIR", "TensorBoardLog", "record_scalars"]

EVENTS_DIR = "tensorboard"
QUALIFIERS = ("method", "policy", "model", "phase", "split")
SUFFIXES = ("domain", "task")
STEP_KEYS = ("global_step", "tokens_seen", "step")
SKIP = set(QUALIFIERS) | set(SUFFIXES) | set(STEP_KEYS) | {"kind", "stage", "stage_index"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def record_scalars(record: dict[str, Any], counters: dict[str, int] | None = None) -> Iterator[tuple[str, float, int]]:
    """`(tag, value, step)` for every number in one metrics record (dicts of numbers give one scalar per key;
    strings and lists are not scalars). `counters` numbers records that carry no step, per tag prefix. Tags
    keep TensorBoard's legal characters (`[A-Za-z0-9_./-]`); any other becomes `_` (`semem@-1` -> `semem_-1`)."""
    for tag, value, step in _record_scalars(record, counters):
        yield _ILLEGAL.sub("_", tag), value, step


_ILLEGAL = re.compile(r"[^A-Za-z0-9_./-]")


def _record_scalars(record: dict[str, Any], counters: dict[str, int] | None = None):
    kind = str(record.get("kind", "metrics"))
    if kind == "eval_initial":          # the untrained / loaded model: step 0 of the eval curves
        kind, record = "eval", {**record, "global_step": 0}
    prefix = "/".join([kind] + [str(record[q]) for q in QUALIFIERS if isinstance(record.get(q), str)])
    suffix = next((str(record[s]) for s in SUFFIXES if isinstance(record.get(s), str)), None)
    step = next((int(record[k]) for k in STEP_KEYS if _number(record.get(k)) is not None), None)
    if step is None:
        counters = {} if counters is None else counters
        step = counters.get(prefix, 0)
        counters[prefix] = step + 1
    for field, value in record.items():
        if field in SKIP:
            continue
        if isinstance(value, dict):
            for key, inner in value.items():
                number = _number(inner)
                if number is not None:
                    yield f"{prefix}/{field}/{key}", number, step
            continue
        number = _number(value)
        if number is not None:
            yield (f"{prefix}/{field}/{suffix}" if suffix else f"{prefix}/{field}"), number, step


class TensorBoardLog:
    """Event files under `<run_dir>/tensorboard/`, fed one metrics record at a time (process 0 only)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._writer = None
        self._counters: dict[str, int] = {}

    def _open(self):
        if self._writer is None:
            from tensorboardX.event_file_writer import EventsWriter

            self.directory.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(str(self.directory / "events"), filename_suffix=f".{time.time_ns()}")
        return self._writer

    def write(self, record: dict[str, Any], *, flush: bool = True) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        writer = self._open()
        for tag, value, step in record_scalars(record, self._counters):
            writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(tag, value)))
        if flush:
            writer.flush()

    def rebuild(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the event files by the scalars of `records` (what metrics.jsonl holds after a truncation)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self._counters = {}
        for record in records:
            self.write(record, flush=False)
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
