"""Shared helpers for benchmarks: timing with warmup, medians, and a plain-text table."""

from __future__ import annotations

import argparse
import json
import os
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


def gpt2_benchmark_args(doc: str, default_sizes: str) -> argparse.Namespace:
    """The command line shared by the GPT-2 benchmarks: model shape, batch sizes, threads, repeats."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=default_sizes, help="comma list of BATCHxSEQ")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    return args
