"""Datastore benchmark: add throughput, search queries/s and recall (ScaNN vs exact), kNN-LM eval speed.

    python benchmarks/datastore.py [--n 1000000] [--k 64] [--queries 2000] [--run-dir runs/semem-demo]
                                   [--segment-rows 131072] [--builds 1:2,2:4] [--json out.json]

Keys are real model keys: the decoder's `knn_keys` of the SeMem demo's pre-trained LM (restored from
`--run-dir`'s `pretrain-model0-*` checkpoint; d = its model width) over the embedded corpus (all
domains, train splits), repeated from the start if the corpus has fewer than --n tokens. Queries are
keys of the validation splits (text the store does not hold). Both backends hold the same rows and
answer the same queries in the same process; each timing is a median (benchmarks/common.py). The first
ScaNN build uses the default index options (its add rate includes freezing segments as rows arrive);
`--builds` adds other builds of the same rows (LEAVES_PER_SQRT_N:DIMS_PER_BLOCK, compacted into one
segment), and every build is searched at every `--sweep` setting. The fastest build and setting with
recall >= 0.95 is the one the kNN-LM evaluation uses.
Targets (docs/semem.md): ScaNN >= 10x exact queries/s at recall@64 >= 0.95; kNN-LM evaluation >= 0.5x
the plain LM's tokens/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's jaxcl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="rows in the store")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--run-dir", default="runs/semem-demo", help="a SeMem run whose pre-trained LM gives the keys")
    parser.add_argument("--segment-rows", type=int, default=131072)
    parser.add_argument("--add-batch", type=int, default=65536)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--knnlm-exact", action="store_true", help="also time kNN-LM evaluation on the exact store")
    parser.add_argument("--sweep", default="0.05:16,0.1:16,0.1:32,0.2:16",
                        help="ScaNN query-time settings LEAVES_FRACTION:REORDER (same built index)")
    parser.add_argument("--builds", default="",
                        help="extra ScaNN builds LEAVES_PER_SQRT_N:DIMS_PER_BLOCK (comma list), e.g. 2:2,2:4")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from pathlib import Path

    from common import machine_summary, print_table, time_call, write_json
    from jaxcl.config import load_config
    from jaxcl.data.sources import open_source
    from jaxcl.data.stream import pack_sequences
    from jaxcl.data.tokenizer import load_tokenizer
    from jaxcl.memory import Datastore
    from jaxcl.memory.calibrator import Calibrator
    from jaxcl.memory.selective import knn_keys_of, make_lm_scorer, memory_logprobs, score_sequences
    from jaxcl.train.checkpoint import Checkpointer

    run_dir = Path(args.run_dir)
    pre = sorted(run_dir.glob("pretrain-model0-*"))
    if not pre:
        sys.exit(f"{run_dir} has no pretrain-model0-* directory: run `jaxcl run configs/semem/demo.yaml` first "
                 "(or pass --run-dir)")
    cfg = load_config(pre[0] / "config.yaml")
    model_cfg = cfg.model
    ckpt = Checkpointer(pre[0] / "checkpoints", cfg.checkpoint)
    import orbax.checkpoint as ocp
    step = ckpt.latest_step()
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    params = jax.tree.map(jnp.asarray, restored["state"]["params"])
    ckpt.close()
    tok = load_tokenizer(cfg.data.tokenizer)
    source = open_source(cfg.data.source)
    seq = cfg.data.seq_len

    def sequences(split, limit):
        out, total = [], 0
        for d in source.domains():
            s = pack_sequences(tok.encode_documents(source.documents(d, split)), seq)
            out.append(s)
            total += s.size
            if total >= limit:
                break
        return np.concatenate(out)

    t0 = time.perf_counter()
    train = sequences("train", args.n)
    keys = knn_keys_of(model_cfg, params, train[: -(-args.n // seq)])
    reps = -(-args.n // len(keys))
    keys = np.concatenate([keys] * reps)[: args.n]
    values = np.concatenate([train[: -(-args.n // seq)].reshape(-1)] * reps)[: args.n].astype(np.int32)
    valid = sequences("valid", 10 ** 9)
    queries = knn_keys_of(model_cfg, params, valid[: -(-args.queries // seq)])[: args.queries]
    print(f"{len(keys):,} keys (d={keys.shape[1]}, {reps}x the {len(keys) // reps:,} distinct corpus tokens), "
          f"{len(queries):,} queries; built in {time.perf_counter() - t0:.0f} s")

    rows, results = [], {}
    tmp = tempfile.mkdtemp(prefix="jaxcl-ds-bench-")
    stores = {}
    for backend, opts in (("exact", {}), ("scann", {"segment_rows": args.segment_rows})):
        store = Datastore.create(f"{tmp}/{backend}", dim=keys.shape[1], backend=backend, index_options=opts)
        t = time.perf_counter()
        for s in range(0, len(keys), args.add_batch):
            store.add(keys[s:s + args.add_batch], values[s:s + args.add_batch])
        add_s = time.perf_counter() - t
        t = time.perf_counter()
        store.compact()                                          # ScaNN: one segment over every row
        results.setdefault(backend, {})["compact_s"] = time.perf_counter() - t
        store.search(queries[:8], args.k)                        # place keys / compile
        search_s = time_call(lambda: store.search(queries, args.k), warmup=1, repeats=args.repeats)
        stores[backend] = store
        results[backend].update(add_keys_per_s=len(keys) / add_s, queries_per_s=len(queries) / search_s)
    import dataclasses
    _, exact_ids = stores["exact"].search(queries, args.k)
    exact_qps = results["exact"]["queries_per_s"]
    r = results["exact"]
    rows.append(["exact (JAX)", f"{len(keys):,}", f"{r['add_keys_per_s']:,.0f}", f"{r['compact_s']:.1f}", "-",
                 f"{exact_qps:,.1f}", "1.00x", "1.000"])
    builds = [("default", stores["scann"], results["scann"]["compact_s"])]
    for item in [b for b in args.builds.split(",") if b]:
        per_sqrt, dpb = float(item.split(":")[0]), int(item.split(":")[1])
        store = Datastore.create(f"{tmp}/scann-{per_sqrt:g}-{dpb}", dim=keys.shape[1], backend="scann",
                                 index_options={"segment_rows": len(keys) + 1, "leaves_per_sqrt_n": per_sqrt,
                                                "dims_per_block": dpb})
        store.add(keys, values)
        t = time.perf_counter()
        store.compact()
        builds.append((f"{per_sqrt:g}·√n leaves, {dpb} dims/block", store, time.perf_counter() - t))
    sweep, best = [], None
    for build_name, scann, compact_s in builds:
        base_opts = scann.index.opts
        add_rate = f"{results['scann']['add_keys_per_s']:,.0f}" if build_name == "default" else "-"
        label = "scann" if build_name == "default" else f"scann ({build_name})"
        for item in args.sweep.split(","):
            frac, reorder = float(item.split(":")[0]), int(item.split(":")[1])
            scann.index.opts = dataclasses.replace(base_opts, leaves_to_search=frac, reorder=reorder)
            scann.search(queries[:8], args.k)
            t = time_call(lambda: scann.search(queries, args.k), warmup=1, repeats=args.repeats)
            _, ids = scann.search(queries, args.k)
            rec = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact_ids)]))
            qps = len(queries) / t
            sweep.append({"build": build_name, "leaves_per_sqrt_n": base_opts.leaves_per_sqrt_n,
                          "dims_per_block": base_opts.dims_per_block, "compact_s": compact_s,
                          "leaves_to_search": frac, "reorder": reorder, "queries_per_s": qps, "recall": rec,
                          "store": scann})
            rows.append([label, f"{len(keys):,}", add_rate, f"{compact_s:.1f}", f"{frac:g} / {reorder}x",
                         f"{qps:,.1f}", f"{qps / exact_qps:.2f}x", f"{rec:.3f}"])
            if rec >= 0.95 and (best is None or qps > best["queries_per_s"]):
                best = sweep[-1]
        scann.index.opts = base_opts
    best = best or max(sweep, key=lambda x: x["recall"])
    scann = best["store"]
    scann.index.opts = dataclasses.replace(scann.index.opts, leaves_to_search=best["leaves_to_search"],
                                           reorder=best["reorder"])
    stores["scann"] = scann
    results["scann"]["sweep"] = [{k: v for k, v in x.items() if k != "store"} for x in sweep]
    recall, speedup = best["recall"], best["queries_per_s"] / exact_qps
    print(f"\n{machine_summary()}; k={args.k}, d={keys.shape[1]}")
    print_table(["backend", "keys", "add keys/s", "compact s", "probe / reorder", "search queries/s", "vs exact",
                 f"recall@{args.k}"], rows)
    print(f"chosen ScaNN setting (fastest with recall >= 0.95): build {best['build']}, leaves "
          f"{best['leaves_to_search']:g}, reorder {best['reorder']}x -> {speedup:.1f}x exact at recall {recall:.3f}")

    # kNN-LM evaluation vs plain LM evaluation (tokens/s), the same validation tokens.
    scorer = make_lm_scorer(model_cfg)
    ev = valid[: max(1, args.eval_tokens // seq)]
    score_sequences(scorer, params, ev[:32])
    lm_s = time_call(lambda: score_sequences(scorer, params, ev), warmup=1, repeats=args.repeats)
    calibrator = Calibrator.initial(0.25, 10.0)
    log_freq = np.zeros(model_cfg.vocab_size, np.float32)

    def knn_eval(store):
        tokens = score_sequences(scorer, params, ev)
        return memory_logprobs(tokens, store, calibrator, args.k, log_freq)

    knn_rows = [["plain LM", f"{ev.size / lm_s:,.0f}", "1.00x"]]
    for backend in ("scann", "exact") if args.knnlm_exact else ("scann",):
        t = time_call(lambda: knn_eval(stores[backend]), warmup=1, repeats=args.repeats)
        knn_rows.append([f"kNN-LM ({backend}, {len(keys):,} keys)", f"{ev.size / t:,.0f}", f"{lm_s / t:.2f}x"])
        results[f"knnlm_{backend}_tokens_per_s"] = ev.size / t
    results["lm_tokens_per_s"] = ev.size / lm_s
    print()
    print_table(["evaluation", "tokens/s", "vs plain LM"], knn_rows)
    results.update(recall=recall, scann_speedup=speedup, n=len(keys), d=int(keys.shape[1]), k=args.k,
                   machine=machine_summary())
    write_json(args.json, results)
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
