"""Decoding throughput: jaxcl `generate` vs transformers' PyTorch `generate`, and kNN-LM decoding vs plain decoding.

    python benchmarks/generate.py [--shapes demo,gpt2-small] [--batches 1,8] [--prompt 128] [--new 128]
                                  [--rounds 5] [--knn-keys 1000000] [--store-dir runs/bench/generate_store]
                                  [--dtype float32|bfloat16] [--json out.json]

Same weights on both sides (jaxcl loads the PyTorch model's checkpoint), greedy, KV cache on both sides
(`use_cache=True`), exactly `--new` new tokens per row (no stop token), the same CPU thread count. jaxcl and
PyTorch calls are interleaved round by round in one process; each side's median and quartiles over the rounds
are reported, after one warm-up call each (jaxcl's compile happens there). Tokens/s counts new tokens of all
rows; greedy agreement is the fraction of new tokens equal on both sides (random weights: near-ties can
diverge later in a sequence; it is a sanity check, not a parity test — that is tests/test_generate.py).

kNN-LM decoding (`--knn-keys` > 0, at the GPT-2-small shape): a ScaNN datastore of that many keys of the
model's width (built once and reused from `--store-dir`; keys are Gaussian with the per-dimension mean and
spread of the model's real kNN keys on random text — search cost does not depend on what the keys mean),
k = 16, constant λ = 0.25; each step does one batched search on the host and the mixing on the device. Its
speed is reported as a ratio to plain jaxcl decoding measured in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

SHAPES = {"demo": dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8192),
          "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)}


def _quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def _knn_store(cfg, params, n_keys: int, root: Path, seed: int = 0):
    """A ScaNN datastore of `n_keys` keys shaped like the model's kNN keys (reused when it exists)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcl.memory import Datastore, params_fingerprint
    from jaxcl.models import build

    path = root / f"d{cfg.d_model}-n{n_keys}-seed{seed}"
    fingerprint = params_fingerprint(params)
    if (path / "DONE").is_file():
        store = Datastore.open(str(path))
        if store.manifest.get("model_fingerprint") == fingerprint and len(store) == n_keys:
            return store
    import shutil
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    text = rng.integers(0, cfg.vocab_size, (8, 128))
    real = build(cfg).apply({"params": params}, jnp.asarray(text, jnp.int32)).knn_keys
    real = np.asarray(jax.device_get(real), np.float32).reshape(-1, cfg.d_model)
    mean, std = real.mean(0), real.std(0) + 1e-3
    store = Datastore.create(str(path), dim=cfg.d_model, backend="scann", model_fingerprint=fingerprint,
                             index_options={"segment_rows": 1 << 30})
    t0 = time.perf_counter()
    for start in range(0, n_keys, 131072):
        n = min(131072, n_keys - start)
        keys = (rng.standard_normal((n, cfg.d_model), np.float32) * std + mean).astype(np.float32)
        store.add(keys, rng.integers(0, cfg.vocab_size, n).astype(np.int32))
    store.compact()
    (path / "DONE").write_text("ok")
    print(f"# built a {n_keys:,}-key ScaNN datastore in {time.perf_counter() - t0:.0f} s: {path}", flush=True)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="demo,gpt2-small")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--knn-keys", type=int, default=1_000_000)
    parser.add_argument("--store-dir", default="runs/bench/generate_store")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers

    from common import machine_summary, print_table, write_json
    from jaxcl.generate import generate
    from jaxcl.hf import load_pretrained

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# greedy decoding, prompt {args.prompt} + {args.new} new tokens, {args.dtype}; {machine_summary()}, "
          f"torch {torch.__version__} threads={args.threads}, transformers {transformers.__version__}", flush=True)
    rows, records = [], []
    for shape in args.shapes.split(","):
        kw = SHAPES[shape]
        hf_cfg = transformers.GPT2Config(n_positions=max(1024, args.prompt + args.new), bos_token_id=0,
                                         eos_token_id=0, **kw)
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(hf_cfg).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            cfg, params = load_pretrained(tmp)
        if args.dtype == "bfloat16":
            cfg = cfg.replace(dtype="bfloat16")
            model = model.to(torch.bfloat16)
        memory = None
        if args.knn_keys and shape == "gpt2-small":
            from jaxcl.memory.decoding import KnnMemory
            memory = KnnMemory(_knn_store(cfg, params, args.knn_keys, Path(args.store_dir)), k=16, lam=0.25)
        for batch in batches:
            ids = np.random.RandomState(batch).randint(1, kw["vocab_size"], (batch, args.prompt))
            mask = np.ones_like(ids)
            tids, tmask = torch.as_tensor(ids), torch.as_tensor(mask)

            def run_jax(mem=None):
                out = generate(cfg, params, ids, mask, max_new_tokens=args.new, eos_token_id=[], pad_token_id=0,
                               memory=mem)
                return np.asarray(jax.block_until_ready(out.tokens))

            def run_torch():
                with torch.inference_mode():
                    out = model.generate(input_ids=tids, attention_mask=tmask, do_sample=False, num_beams=1,
                                         max_new_tokens=args.new, min_new_tokens=args.new, use_cache=True)
                return out[:, args.prompt:].numpy()

            sides = {"jaxcl": run_jax, "torch": run_torch}
            if memory is not None:
                sides["jaxcl+knn"] = lambda: run_jax(memory)
            outputs = {name: fn() for name, fn in sides.items()}            # warm-up (and jaxcl's compile)
            agree = float(np.mean(outputs["jaxcl"] == outputs["torch"]))
            times = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, fn in sides.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            tokens = batch * args.new
            q = {name: _quartiles(t) for name, t in times.items()}
            ratio = q["torch"][1] / q["jaxcl"][1]
            record = dict(shape=shape, batch=batch, prompt=args.prompt, new=args.new, dtype=args.dtype,
                          greedy_agreement=agree, ratio_vs_torch=ratio,
                          **{f"{n}_tokens_per_s": tokens / v[1] for n, v in q.items()},
                          **{f"{n}_seconds_q1_median_q3": list(v) for n, v in q.items()})
            knn = ""
            if memory is not None:
                record["knn_vs_plain"] = q["jaxcl"][1] / q["jaxcl+knn"][1]
                record["knn_keys"] = len(memory.store)
                knn = f"{tokens / q['jaxcl+knn'][1]:,.1f} ({record['knn_vs_plain']:.2f}x plain)"
            records.append(record)
            rows.append([shape, batch, tokens / q["jaxcl"][1], tokens / q["torch"][1], f"{ratio:.2f}x",
                         f"{q['jaxcl'][0] * 1e3 / args.new:.1f}-{q['jaxcl'][2] * 1e3 / args.new:.1f}",
                         f"{q['torch'][0] * 1e3 / args.new:.1f}-{q['torch'][2] * 1e3 / args.new:.1f}",
                         f"{agree:.0%}", knn or "-"])
            print(f"  {shape} batch {batch}: jaxcl {tokens / q['jaxcl'][1]:,.1f} tok/s, torch "
                  f"{tokens / q['torch'][1]:,.1f} tok/s ({ratio:.2f}x) {knn}", flush=True)
    print_table(["shape", "batch", "jaxcl tok/s", "torch tok/s", "jaxcl / torch", "jaxcl ms/token (q1-q3)",
                 "torch ms/token (q1-q3)", "greedy agreement", "jaxcl + kNN-LM tok/s"], rows)
    write_json(args.json, {"benchmark": "generate", "machine": machine_summary(), "threads": args.threads,
                           "results": records})


if __name__ == "__main__":
    main()
