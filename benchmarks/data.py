"""The data path at corpus scale: the token cache against today's in-memory tokenization, 10 MB to 4 GB of text.

The corpus is the embedded one repeated: five domains, each `<domain>.train.txt` of size/5 bytes (valid and
test splits as shipped). For every size it measures, each in its own process tree (peak RSS summed over
the tree, sampled every 0.1 s; RssAnon beside VmRSS because memory-mapped cache pages count in VmRSS):

- `old`: what every run did before the cache (and still the baseline): read each domain's documents into
  Python strings and tokenize them in memory (`TextTokenizer.encode_documents`), as `tokenize_domains` did;
- `prepare-p1`, `prepare-p2`: `jaxcl prepare` with 1 and 2 worker processes (tokens/s, MB of text/s);
- `sequential`, `joint`, `elle`: a 20-step run of each reading the prepared cache (peak RSS, wall time);
- bytes on disk per token of the cache; loader throughput (SequenceStream over the cache at the demo
  shape) against the train step's tokens/s from the same size's sequential run.

Ratios against the 10 MB size (and against `old`) are printed at the end and written to `summary.json`.
Resumable: every finished measurement is kept in `OUT/results.json` and not redone.

    python benchmarks/data.py --out runs/bench-data --sizes 10M,100M,1G,4G
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("bible", "jargon", "wordnet", "manpages", "pydoc")
UNITS = {"K": 1e3, "M": 1e6, "G": 1e9}
RUN_OVERRIDES = ["data.domains=[bible,jargon,wordnet,manpages,pydoc]", "train.stage_steps=[4,4,4,4,4]",
                 "train.log_every=1", "data.eval_batches=2", "checkpoint.every=0"]
CONFIGS = {"sequential": "configs/demo.yaml", "joint": "configs/demo.yaml", "elle": "configs/elle/demo.yaml"}


def parse_size(text: str) -> int:
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def tree_rss(root: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes summed over `root` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, anon, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total, anon


def measure(command: list[str], env: dict | None = None) -> dict:
    """Run `command`; its wall time, exit status, stdout and peak (summed) RSS of its process tree."""
    start = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    peak = {"rss": 0, "anon": 0}

    def sample():
        while proc.poll() is None:
            rss, anon = tree_rss(proc.pid)
            peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": round(time.time() - start, 2), "peak_rss_mb": round(peak["rss"] / 2 ** 20, 1),
            "peak_anon_mb": round(peak["anon"] / 2 ** 20, 1), "stdout": out}


def make_corpus(directory: Path, size: int) -> None:
    """Five domains of `size / 5` bytes of training text each (the embedded domain repeated, whole documents)."""
    if (directory / ".complete").exists():
        return
    from jaxcl.data.corpus import load_text

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for d in DOMAINS:
        text = load_text(d, "train").strip("\n") + "\n\n\n"
        data = text.encode()
        need = size // len(DOMAINS)
        with open(directory / f"{d}.train.txt", "wb") as f:
            written = 0
            while written < need:
                piece = data if written + len(data) <= need else data[:need - written]
                f.write(piece)
                written += len(piece)
        for split in ("valid", "test"):
            (directory / f"{d}.{split}.txt").write_text(load_text(d, split))
    (directory / ".complete").write_text("")


def old_path(directory: str) -> None:
    """Today's path before the cache, in this process: every domain's documents read and tokenized in memory."""
    import numpy as np

    from jaxcl.data.sources import open_source
    from jaxcl.data.stream import pack_sequences
    from jaxcl.data.tokenizer import load_tokenizer

    tok, source = load_tokenizer("default"), open_source(directory)
    start, tokens, kept = time.time(), 0, []
    for d in DOMAINS:
        ids = tok.encode_documents(source.documents(d, "train"))
        kept.append(pack_sequences(ids, 128))
        tokens += len(ids)
    print(json.dumps({"tokens": tokens, "tokenize_seconds": time.time() - start,
                      "rows": int(sum(len(k) for k in kept)), "checksum": int(np.sum([k[0, 0] for k in kept]))}))


def startup(source: str, cache: str, repeats: int = 3) -> None:
    """Start-up to the first train step's batch, in this process, with a prepared cache: build the run (config,
    mesh, tokenizer, opening every domain's cached splits, reading the valid rows), then the first global
    batch placed on the mesh. Median of `repeats` (the first includes imports). Prints JSON."""
    import statistics

    import jax

    from jaxcl.config import load_config
    from jaxcl.data.stream import device_batch
    from jaxcl.parallel import batch_sharding
    from jaxcl.train.loop import ContinualRun

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cfg = load_config(str(ROOT / "configs/demo.yaml"), [f"data.source={source}", f"data.cache={cache}",
                                                           *RUN_OVERRIDES, "run.dir=/tmp/jaxcl-bench-startup"])
        run = ContinualRun(cfg)
        stream = run.make_stream(0, run.stages[0])
        batch = device_batch(run.domain_batch(run.stages[0], stream.next_batch(), cfg.model),
                             batch_sharding(run.mesh, run.rules))
        jax.block_until_ready(batch)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"startup_seconds": times, "startup_median": statistics.median(times)}))


def loader_rate(source: str, cache: str, batch: int = 16, seq: int = 128, steps: int = 300) -> dict:
    """Tokens/s of SequenceStream.next_batch over the prepared cache (demo shape), in this process."""
    from jaxcl.config import DataConfig
    from jaxcl.data.stream import SequenceStream, split_rows
    from jaxcl.data.tokenizer import load_tokenizer

    data = DataConfig(source=source, cache=cache, seq_len=seq, batch_size=batch)
    rows = split_rows(data, load_tokenizer("default"), "default", ("bible",), "train")["bible"]
    stream = SequenceStream(rows, batch, seed=0)
    stream.next_batch()
    start = time.perf_counter()
    for _ in range(steps):
        stream.next_batch()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": steps * batch * seq / seconds, "rows": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench-data")
    ap.add_argument("--sizes", default="10M,100M,1G,4G")
    ap.add_argument("--old-up-to", default="100M", help="measure the in-memory path up to this size")
    ap.add_argument("--p1-up-to", default="1G", help="measure 1-process prepare up to this size")
    ap.add_argument("--drop-corpora", action="store_true", help="remove each size's text and cache after use (> 100M)")
    ap.add_argument("--runs", default="sequential,joint,elle")
    ap.add_argument("--runs-at", default="", help="sizes with the 20-step runs (default: every size)")
    args = ap.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def keep(key: str, value: dict) -> dict:
        results[key] = value
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{key}: {json.dumps({k: v for k, v in value.items() if k != 'stdout'})}", flush=True)
        return value

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in sizes:
        n = parse_size(size)
        run_sizes = [x for x in args.runs_at.split(",") if x] or sizes
        wanted = ([f"{size}/old"] if n <= parse_size(args.old_up_to) else []) + \
            [f"{size}/prepare-p{p}" for p in (1, 2) if p == 2 or n <= parse_size(args.p1_up_to)] + \
            ([f"{size}/run-{m}" for m in args.runs.split(",") if m] + [f"{size}/startup"] if size in run_sizes else []) \
            + [f"{size}/loader"]
        if all(k in results for k in wanted):
            continue
        corpus = out / f"corpus-{size}"
        make_corpus(corpus, n)
        if n <= parse_size(args.old_up_to) and f"{size}/old" not in results:
            r = measure([sys.executable, __file__, "_old", str(corpus)])
            r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
            keep(f"{size}/old", r)
        for p in (1, 2):
            key = f"{size}/prepare-p{p}"
            if key in results or (p == 1 and n > parse_size(args.p1_up_to)):
                continue
            cache = out / f"cache-{size}-p{p}"
            shutil.rmtree(cache, ignore_errors=True)
            r = measure([sys.executable, "-m", "jaxcl.cli", "prepare", "configs/demo.yaml", f"data.source={corpus}",
                         f"data.cache={cache}", "data.domains=[]", f"data.prepare_processes={p}", "--json"])
            text = r.pop("stdout")
            summary = json.loads(text[text.index("{"):])
            tokens = sum(s["tokens"] for s in summary["splits"])
            disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
            r.update(tokens=tokens, tokens_per_s=round(tokens / r["seconds"]), text_mb_per_s=round(n / 2 ** 20 / r["seconds"], 2),
                     bytes_on_disk=disk, bytes_per_token=round(disk / tokens, 4))
            keep(key, r)
            if p == 1:
                shutil.rmtree(cache, ignore_errors=True)      # the runs read the 2-process cache
        cache = out / f"cache-{size}-p2"
        for method in [m for m in args.runs.split(",") if m] if size in run_sizes else []:
            key = f"{size}/run-{method}"
            if key in results:
                continue
            run_dir = out / "runs" / f"{size}-{method}"
            shutil.rmtree(run_dir, ignore_errors=True)
            command = [sys.executable, "-m", "jaxcl.cli", "train" if method == "joint" else "run", CONFIGS[method],
                       f"data.source={corpus}", f"data.cache={cache}", f"run.dir={run_dir}", *RUN_OVERRIDES]
            if method == "elle":
                command.append("elle.warmup_steps=2")
            r = measure(command)
            r.pop("stdout")
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rates = sorted(x["tokens_per_s"] for x in records if x.get("kind") == "train" and x.get("step", 0) > 1)
            r["train_tokens_per_s_median"] = rates[len(rates) // 2] if rates else None
            keep(key, r)
        if f"{size}/loader" not in results:
            keep(f"{size}/loader", loader_rate(str(corpus), str(cache)))
        if f"{size}/startup" not in results and size in run_sizes:
            r = measure([sys.executable, __file__, "_startup", str(corpus), str(cache)])
            r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
            keep(f"{size}/startup", r)
        if args.drop_corpora and n > parse_size("100M"):         # when the disk holds one big size at a time
            shutil.rmtree(corpus, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)

    base = sizes[0]
    summary = {"baseline_size": base, "ratios": {}}
    for size in sizes[1:] + sizes[:1]:
        row = {}
        for job in ("prepare-p2", "run-sequential", "run-joint", "run-elle"):
            a, b = results.get(f"{size}/{job}"), results.get(f"{base}/{job}")
            if a and b:
                row[f"{job} peak RSS x"] = round(a["peak_rss_mb"] / b["peak_rss_mb"], 3)
                row[f"{job} extra seconds"] = round(a["seconds"] - b["seconds"], 2)
        old, prep = results.get(f"{size}/old"), results.get(f"{size}/prepare-p2")
        if old and prep:
            row["old peak RSS / prepare-p2 peak RSS"] = round(old["peak_rss_mb"] / prep["peak_rss_mb"], 2)
        p1, p2 = results.get(f"{size}/prepare-p1"), results.get(f"{size}/prepare-p2")
        if p1 and p2:
            row["prepare p2 / p1 throughput"] = round(p2["tokens_per_s"] / p1["tokens_per_s"], 2)
        seq, loader = results.get(f"{size}/run-sequential"), results.get(f"{size}/loader")
        if seq and loader and seq.get("train_tokens_per_s_median"):
            row["loader / train step tokens/s"] = round(loader["tokens_per_s"] / seq["train_tokens_per_s_median"], 1)
        summary["ratios"][size] = row
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_old":
        old_path(sys.argv[2])
    elif len(sys.argv) > 3 and sys.argv[1] == "_startup":
        startup(sys.argv[2], sys.argv[3])
    else:
        main()
