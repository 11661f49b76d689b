"""Shared helpers for benchmarks: timing with warmup, medians, and a plain-text table."""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable, Sequence


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 7, min_seconds: float = 0.0) -> float:
    """Median wall time of `fn()` in seconds (fn must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Print and return a GitHub-markdown table (so it can be pasted into docs/benchmarks.md)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text)
    return text


def machine_summary() -> str:
    import jax

    return (f"{platform.processor() or platform.machine()}, {len(jax.devices())} {jax.default_backend()} device(s), "
            f"jax {jax.__version__}, python {platform.python_version()}")


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
