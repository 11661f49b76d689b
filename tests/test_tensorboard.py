"""TensorBoard event files beside metrics.jsonl: the same history, also after a resume truncates the log."""

import struct
from pathlib import Path

import pytest

from jaxcl.eval.tensorboard import record_scalars
from jaxcl.rundir import MetricsFile


def read_scalars(directory: Path) -> list[tuple[str, float, int]]:
    """Every scalar in the TFRecord event files of `directory` (parsed with tensorboardX's Event proto)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.append((value.tag, pytest.approx(value.simple_value, rel=1e-6), event.step))
    return out


def test_records_become_tagged_scalars():
    train = dict(kind="train", stage="bible", stage_index=0, step=5, global_step=5, loss=2.5, lr=1e-3)
    assert list(record_scalars(train)) == [("train/loss", 2.5, 5), ("train/lr", 1e-3, 5)]
    evaluation = dict(kind="eval", stage="bible", domain="wordnet", global_step=10, perplexity=30.0)
    assert list(record_scalars(evaluation)) == [("eval/perplexity/wordnet", 30.0, 10)]
    assert list(record_scalars(dict(kind="eval_initial", perplexity={"bible": 99.0}))) == \
        [("eval/perplexity/bible", 99.0, 0)]
    chunk = dict(kind="semem_chunk", policy="semem", model="m0", tokens_seen=512, memory_size=40, domain="wordnet")
    assert list(record_scalars(chunk)) == [("semem_chunk/semem/m0/memory_size/wordnet", 40.0, 512)]
    counters = {}
    stepless = [list(record_scalars(dict(kind="keys", loss=float(i)), counters)) for i in range(2)]
    assert stepless == [[("keys/loss", 0.0, 0)], [("keys/loss", 1.0, 1)]]


def test_events_follow_metrics_jsonl_through_a_truncation(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    metrics.truncate(0)                                   # a run from scratch
    for step in range(1, 4):
        metrics.write(kind="train", stage="a", step=step, global_step=step, loss=float(step))
    committed = metrics.offset()                          # a checkpoint at step 3
    for step in range(4, 6):                              # logged, then the process is killed
        metrics.write(kind="train", stage="a", step=step, global_step=step, loss=100.0 + step)
    assert [s for _, _, s in read_scalars(tmp_path / "tensorboard")] == [1, 2, 3, 4, 5]

    resumed = MetricsFile(tmp_path / "metrics.jsonl")     # the next invocation
    resumed.truncate(committed)
    for step in range(4, 6):
        resumed.write(kind="train", stage="a", step=step, global_step=step, loss=float(step))
    scalars = read_scalars(tmp_path / "tensorboard")
    assert [(t, s) for t, _, s in scalars] == [("train/loss", s) for s in range(1, 6)]
    assert [v for _, v, _ in scalars] == [1.0, 2.0, 3.0, 4.0, 5.0]     # the killed invocation's values are gone
