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


def run_comparison_parser(doc: str, config: str, out: str, seeds: str) -> argparse.ArgumentParser:
    """The command line shared by benchmarks that repeat `jaxcl run`s over seeds (more options may be added)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config)
    parser.add_argument("--out", default=out)
    parser.add_argument("--seeds", default=seeds, help="comma list of run.seed values")
    parser.add_argument("--rerun", action="store_true", help="run again even where a report.json exists")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every run")
    return parser


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    seeds = [int(s) for s in text.split(",") if s]
    if not seeds:
        parser.error("--seeds needs at least one seed")
    return seeds


def finished_or_run(cfg, run_dir, *, rerun: bool, banner: str = "") -> dict:
    """The report of the run in `run_dir` if it finished with exactly `cfg`, else `cfg` run there.

    A finished run with a different config is an error (never silently mixed into a comparison);
    `rerun` deletes a finished run and starts it afresh. An unfinished run directory is kept, so a
    runner that resumes from its checkpoints (ELLE, sequential) goes on where it stopped.
    """
    import shutil
    import sys
    from pathlib import Path

    from jaxcl.config import load_config
    from jaxcl.runs import run_config

    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if report_path.exists():
        if not rerun:
            if load_config(run_dir / "config.yaml") != cfg:
                sys.exit(f"{run_dir} holds a finished run with a different config: delete it or pass --rerun")
            return json.loads(report_path.read_text())
        shutil.rmtree(run_dir)
    if banner:
        print(banner, flush=True)
    return run_config(cfg)
