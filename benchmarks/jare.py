"""JARe forward cost: DTKR retrieval + K-of-P low-rank increments mixed into every layer, vs the plain model.

    python benchmarks/jare.py [--family bert] [--sizes 8x128,32x64] [--slots 8,32,64,128] [--json out.json]

Both functions are jitted and fed the same token batch. The JARe forward takes the batch's cached
sentence queries, retrieves the top-K of P slots (grouped cosine over the key pool) and adds
`Σ_k w_k down_kᵀ up_k` to the attention output projection of every layer in low-rank form. Default
model: all-MiniLM-L6-v2's shape (6 layers, d 384) with random weights, rank 8, K = 4. Timings are medians
after warmup; plain and JARe calls alternate and the ratio is the median of per-pair time ratios
(the target is ≤ 1.3 at P = 64).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def paired_times(plain, mixed, repeats: int) -> tuple[float, float, float]:
    """Median plain time, median JARe time and median of per-pair ratios, the two calls alternating.

    Alternating the two calls and taking the ratio per pair cancels most of the drift of a shared,
    loaded machine (the load changes over seconds, a pair takes milliseconds).
    """
    import statistics
    import time

    for _ in range(2):
        plain(), mixed()
    t_plain, t_mixed, ratios = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        mixed()
        t2 = time.perf_counter()
        t_plain.append(t1 - t0)
        t_mixed.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(t_plain), statistics.median(t_mixed), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="bert", choices=["bert", "gpt2", "llama"])
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--sizes", default="8x128,32x64")
    parser.add_argument("--slots", default="8,32,64,128")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from common import machine_summary, print_table, write_json
    from jaxcl.models import ModelConfig, build, init_params
    from jaxcl.slm import dtkr, jare

    cfg = ModelConfig(family=args.family, vocab_size=30522, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, max_seq_len=512)
    model = build(cfg)
    params = init_params(cfg, jax.random.key(0))

    def plain(params, ids):
        return model.apply({"params": params}, ids).hidden

    def mixed(params, bank, keys, allowed, ids, queries, per_example):
        slots, weights = dtkr.retrieve(queries, keys, allowed, args.top_k, per_example)
        return model.apply({"params": params}, ids, adapters=jare.mix_adapters(bank, slots, weights)).hidden

    plain_jit = jax.jit(plain)
    mixed_jit = jax.jit(mixed, static_argnums=(6,))
    rows, payload = [], {"machine": machine_summary(), "rows": []}
    for size in args.sizes.split(","):
        batch, seq = (int(v) for v in size.split("x"))
        ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
        queries = jax.random.normal(jax.random.key(2), (batch, cfg.d_model))
        plain_call = lambda: plain_jit(params, ids).block_until_ready()  # noqa: E731
        for n_slots in (int(p) for p in args.slots.split(",")):
            bank = jare.init_increment_bank(jax.random.key(3), cfg, max_slots=n_slots, rank=args.rank)
            bank = jax.tree.map(lambda x: x + 0.01, bank)                       # non-zero increments
            keys = jax.random.normal(jax.random.key(4), (args.groups, n_slots, cfg.d_model // args.groups))
            allowed = jnp.ones((n_slots,), bool)
            for per_example in (False, True):
                mixed_call = lambda: mixed_jit(params, bank, keys, allowed, ids, queries,  # noqa: E731
                                               per_example).block_until_ready()
                t_plain, t_mixed, ratio = paired_times(plain_call, mixed_call, args.repeats)
                mode = "per-example" if per_example else "per-batch"
                rows.append((f"{batch}x{seq}", n_slots, args.top_k, mode, batch * seq / t_plain,
                             batch * seq / t_mixed, ratio))
                payload["rows"].append(dict(zip(("size", "slots", "top_k", "retrieval", "plain_tok_s", "jare_tok_s",
                                                 "ratio"), rows[-1])))
    print(f"# JARe forward vs plain frozen {args.family} (d={cfg.d_model}, L={cfg.n_layers}, rank {args.rank}), "
          f"{machine_summary()}")
    print_table(["batch x seq", "P slots", "K", "retrieval", "plain tok/s", "JARe tok/s", "time ratio"], rows)
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
