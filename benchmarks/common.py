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


MATMUL_N = 2048


def matmul_peak(repeats: int) -> tuple[float, float]:
    """float32 FLOP/s of a MATMUL_N^3 matmul, median of `repeats` calls: (jitted jnp.dot, torch.mm)."""
    import jax
    import jax.numpy as jnp
    import torch

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (MATMUL_N, MATMUL_N), jnp.float32)
    b = jax.random.normal(kb, (MATMUL_N, MATMUL_N), jnp.float32)
    dot = jax.jit(jnp.dot)
    t_jax = time_call(lambda: dot(a, b).block_until_ready(), repeats=repeats)
    ta, tb = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    t_torch = time_call(lambda: torch.mm(ta, tb), repeats=repeats)
    flops = 2 * MATMUL_N ** 3
    return flops / t_jax, flops / t_torch


def _cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) CPU time since boot from /proc/stat's `cpu` line, or None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


class Steadiness:
    """Was the machine steady through a timing run? On a shared VM, another guest can halve the CPU for
    minutes (session 14 measured a matmul peak of 106 GFLOP/s where the same box gave 192 ten minutes
    before); timings from such a run are void, and nothing in their own table says so. This measures the
    fp32 matmul rate (`matmul_peak`) when constructed and in `finish`, and the share of CPU time stolen by
    the hypervisor over the run (/proc/stat `steal`); a change of the rate by more than `TOLERANCE` or a
    steal share above `MAX_STEAL` marks the run as suspect."""

    TOLERANCE = 0.15
    MAX_STEAL = 0.02

    def __init__(self, repeats: int):
        self.repeats = repeats
        self._jiffies = _cpu_jiffies()
        self.start = matmul_peak(repeats)

    def finish(self) -> dict[str, object]:
        """{"matmul_start", "matmul_end" (FLOP/s, (jax, torch)), "rate_change" (end / start − 1 of the better
        side), "steal_share" (None where /proc/stat is unreadable), "suspect", "line" (a `#` header line)}."""
        end = matmul_peak(self.repeats)
        jiffies = _cpu_jiffies()
        steal = None
        if self._jiffies is not None and jiffies is not None and jiffies[1] > self._jiffies[1]:
            steal = (jiffies[0] - self._jiffies[0]) / (jiffies[1] - self._jiffies[1])
        change = max(end) / max(self.start) - 1.0
        suspect = abs(change) > self.TOLERANCE or (steal is not None and steal > self.MAX_STEAL)
        line = (f"# steadiness: fp32 matmul {max(self.start) / 1e9:.1f} GFLOP/s at the start, {max(end) / 1e9:.1f} at "
                f"the end ({change:+.0%}); CPU steal {'unknown' if steal is None else f'{steal:.1%}'} of the run"
                + (" -- SUSPECT: the machine was not steady, rerun on an idle one" if suspect else ""))
        return {"matmul_start": self.start, "matmul_end": end, "rate_change": change, "steal_share": steal,
                "suspect": suspect, "line": line}


def interleaved_times(fns: dict[str, Callable[[], object]], *, rounds: int, steps: int = 1,
                      warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every function, measured in `rounds` interleaved rounds (each round times `steps`
    calls of each function, in an order rotated every round), so that slow drift of the machine (thermal, other
    load, allocator state) hits every side alike. Returns {name: [seconds per call, one per round]}."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def minor_faults_per_call(fn: Callable[[], object], calls: int = 5) -> float:
    """Minor page faults of this process per call of `fn` (getrusage ru_minflt over `calls` calls, after one
    warm call). A count, not a time, so it is valid on a busy machine: each fault is a page of freshly mapped
    memory touched for the first time, i.e. the allocator handing a call memory it had returned to the OS."""
    import resource

    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def machine_details() -> dict[str, object]:
    """What a timing depends on besides the code: CPU model, cores, the allocator settings both sides share
    (MALLOC_*, GLIBC_TUNABLES and LD_PRELOAD in the environment), transparent huge pages and the 1-minute
    load average."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    allocator = {k: v for k, v in os.environ.items()
                 if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        thp = "unknown"
    from jaxcl import hostmem

    if hostmem.applied:
        allocator = {**allocator, "jaxcl.hostmem": "retained (main arena only, no mmap, no trim)"}
    return {"cpu": model, "cores": os.cpu_count(), "allocator": allocator or "glibc malloc defaults",
            "transparent_hugepages": thp, "load_average": os.getloadavg()[0]}


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
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (medians, quartiles)")
    parser.add_argument("--jaxcl-options", default="none/xla,dots_saveable/auto",
                        help="comma list of jaxcl compute options REMAT/ATTENTION[/BLOCK] timed side by side "
                             "(model.remat / model.attention / model.attention_block, default block: ModelConfig's); "
                             "the first is the baseline: none/xla is jaxcl before issue 18, dots_saveable/auto its "
                             "defaults now")
    parser.add_argument("--json", default=None)
    parser.add_argument("--host-malloc", choices=("auto", "retain", "system"), default="auto",
                        help="glibc allocator options for the whole process, both sides alike (jaxcl.hostmem): "
                             "auto = what `jaxcl` does (retain on CPU-only hosts; JAXCL_HOST_MALLOC decides)")
    args = parser.parse_args()
    if args.host_malloc != "auto":
        os.environ["JAXCL_HOST_MALLOC"] = args.host_malloc
    from jaxcl import hostmem                      # before anything starts JAX's CPU backend
    hostmem.apply_from_environment()
    from jaxcl.models import ModelConfig          # (imports jax: after the allocator choice above)

    default_block = ModelConfig.__dataclass_fields__["attention_block"].default
    args.options = []
    for spec in args.jaxcl_options.split(","):
        remat, attention, *block = spec.split("/")
        args.options.append({"remat": remat, "attention": attention,
                             "attention_block": int(block[0]) if block else default_block})
    args.sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    return args


def option_label(option: dict, with_remat: bool = True) -> str:
    """A compute-option dict as the tables name it: REMAT/ATTENTION[/BLOCK] (the block where it is used)."""
    label = (f"{option['remat']}/" if with_remat else "") + option["attention"]
    return label + (f"/{option['attention_block']}" if option["attention"] in ("blocked", "auto") else "")


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


def format_interval(stat: dict | None) -> str:
    """`mean [low, high]` of a `jaxcl.eval.metrics.mean_interval` result, "-" for None."""
    return "-" if stat is None else f"{stat['mean']:.2f} [{stat['low']:.2f}, {stat['high']:.2f}]"


def publish_result(done, fill: Callable[[object], None], *, commit_message: str | None = None):
    """Make the results folder `done` appear whole: `fill(tmp)` writes into `done.partial`, which then replaces
    `done` by a rename (a kill leaves the old folder or a `.partial` that the next call clears). With
    `commit_message`, the folder is git-committed at once (benchmarks that finish across sessions)."""
    import shutil
    from pathlib import Path

    done = Path(done)
    tmp = done.with_name(done.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    shutil.rmtree(done, ignore_errors=True)
    tmp.rename(done)
    if commit_message:
        commit_paths([done], commit_message)
    return done


def commit_paths(paths, message: str) -> bool:
    """git-commit exactly `paths` (files or folders of this repository) with `message`; False, and no commit,
    when they hold no change (benchmarks that finish across sessions commit their results as they land)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    names = [str(p) for p in paths]
    subprocess.run(["git", "add", *names], cwd=root, check=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet", "--", *names], cwd=root).returncode == 0:
        return False
    subprocess.run(["git", "commit", "-q", "-m", message, "--", *names], cwd=root, check=True)
    return True
