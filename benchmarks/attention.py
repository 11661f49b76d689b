"""Causal self-attention alone, forward + backward: jaxcl's implementations vs PyTorch's fused SDPA, CPU.

    python benchmarks/attention.py [--sizes 8x128,8x256,4x512] [--heads 4] [--head-dim 64] [--block 64]
                                   [--threads N] [--rounds 15] [--repeats 3] [--json out.json]

Why: the train step's gap to PyTorch at 256+ tokens sits partly in attention (docs/benchmarks.md, issue
18); this isolates it. One timed call is the value and the q/k/v gradients of sum(attention(q, k, v) * c)
for a fixed cotangent c, float32, no padding:

- `xla`: `jaxcl.models.layers.attend` over the full masked `[s, s]` score matrix (autodiff backward);
- `blocked (autodiff)`: `blocked`'s own forward (same layout, same blocks), differentiated by autodiff
  instead of its custom VJP: what the VJP alone gains;
- `blocked`: `attend_causal_blocks`, jaxcl's CPU default: causal query blocks of `--block` with a
  FlashAttention-style backward (custom VJP);
- `torch`: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` (its fused CPU flash kernel)
  with `backward`, on `--threads` threads.

All sides get the same q, k, v and cotangent (jaxcl reads a `[b, s, s]` causal mask, torch `is_causal`).
They are timed in `--rounds` interleaved rounds of `--repeats` calls (order rotated every round); the table
gives medians, quartiles, ratios of medians, the largest output and gradient difference to torch, and a
steadiness line (`common.Steadiness`: the fp32 matmul rate before and after, hypervisor steal; SUSPECT when
they moved). `--threads` sets torch's threads; XLA uses its own pool over all cores (the default
`--threads` is all cores, so both sides use the same). "Causal GFLOP/s" is a nominal rate: 6 matmuls
(2 forward, 4 backward) over the causal half of the score matrix, each b * heads * s^2 / 2 * head_dim * 2
FLOPs, whatever a side really computes (xla computes the full square; the custom VJP one more q·k dot).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8x128,8x256,4x512", help="comma list of BATCHxSEQ")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64, help="model.attention_block of the blocked sides")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    from jaxcl import hostmem                      # the allocator setting `jaxcl` uses, before JAX starts
    hostmem.apply_from_environment()
    return args


def main() -> None:
    args = parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from common import Steadiness, interleaved_times, machine_details, machine_summary, print_table, quartiles, \
        write_json
    from jaxcl.models import ModelConfig
    from jaxcl.models.layers import _causal_blocks_forward, attend, attend_causal_blocks

    torch.set_num_threads(args.threads)
    machine = machine_details()
    heads, head_dim = args.heads, args.head_dim
    cfg = ModelConfig(family="gpt2", vocab_size=8, d_model=heads * head_dim, n_layers=1, n_heads=heads,
                      attention_block=args.block)

    def autodiff_blocks(q, k, v, mask):           # attend_causal_blocks without its custom VJP
        b, s = q.shape[:2]
        qh, kh, vh = q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        out, _ = _causal_blocks_forward(qh, kh, vh, mask, cfg.attention_block, 1.0 / head_dim ** 0.5, jnp.float32)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, s, heads, head_dim)

    sides = {"xla": lambda q, k, v, mask: attend(q, k, v, mask, "bskd", cfg, jnp.float32),
             "blocked (autodiff)": autodiff_blocks,
             "blocked": lambda q, k, v, mask: attend_causal_blocks(q, k, v, mask, cfg, jnp.float32)}

    def value_and_grads(fn):
        def loss(q, k, v, mask, cotangent):
            out = fn(q, k, v, mask)
            return jnp.sum(out * cotangent), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    compiled = {name: value_and_grads(fn) for name, fn in sides.items()}
    print(f"# causal attention fwd + bwd, {heads} heads x {head_dim}, float32, block {args.block}; "
          f"{machine_summary()}; CPU {machine['cpu']} ({machine['cores']} cores); allocator {machine['allocator']}; "
          f"torch {torch.__version__} threads={args.threads}; {args.rounds} interleaved rounds x {args.repeats} "
          f"calls; 1-min load average at start {machine['load_average']:.2f}")
    steadiness = Steadiness(args.repeats)
    rows, records = [], []
    for batch, seq in args.sizes:
        rng = np.random.RandomState(0)
        q, k, v, cotangent = (rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
                              for _ in range(4))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
        jq = jnp.asarray(q).reshape(batch, seq, heads, 1, head_dim)      # [b, s, kv, group, hd]
        jk, jv, jc = jnp.asarray(k), jnp.asarray(v), jnp.asarray(cotangent)
        tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).contiguous().requires_grad_() for a in (q, k, v))
        tc = torch.from_numpy(cotangent).transpose(1, 2).contiguous()

        def run_torch():
            for t in (tq, tk, tv):
                t.grad = None
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            out.backward(tc)
            return out

        ref_out = run_torch().detach().transpose(1, 2).numpy()
        ref_grads = [t.grad.transpose(1, 2).numpy() for t in (tq, tk, tv)]
        fns, diffs = {}, {}
        for name, fn in compiled.items():
            (_, out), grads = fn(jq, jk, jv, mask, jc)
            out_diff = float(np.abs(np.asarray(out) - ref_out).max())
            grad_diff = max(float(np.abs(np.asarray(g).reshape(r.shape) - r).max()) for g, r in zip(grads, ref_grads))
            diffs[name] = (out_diff, grad_diff)
            fns[name] = lambda fn=fn: jax.block_until_ready(fn(jq, jk, jv, mask, jc))
        fns["torch"] = run_torch
        times = interleaved_times(fns, rounds=args.rounds, steps=args.repeats)
        flops = 6 * batch * heads * seq * seq / 2 * head_dim * 2
        q4 = {name: quartiles(t) for name, t in times.items()}
        record = {"batch": batch, "seq": seq, "causal_flops_per_call": flops, "seconds_per_call": times}
        for name in fns:
            q1, med, q3 = q4[name]
            rows.append([f"{batch}x{seq}", name, f"{med * 1e3:.2f}", f"{q1 * 1e3:.2f}-{q3 * 1e3:.2f}",
                         f"{flops / med / 1e9:.1f}", "-" if name == "torch" else f"{q4['torch'][1] / med:.3f}",
                         "-" if name == "torch" else f"{q4['blocked (autodiff)'][1] / med:.3f}",
                         "-" if name == "torch" else f"{diffs[name][0]:.1e} / {diffs[name][1]:.1e}"])
            record[name] = {"ms_median": med * 1e3, "vs_torch": q4["torch"][1] / med,
                            "diff_to_torch": None if name == "torch" else diffs[name]}
        records.append(record)
    steady = steadiness.finish()
    print(steady["line"])
    print_table(["batch x seq", "side", "ms / call (median)", "ms (IQR)", "causal GFLOP/s", "speed / torch",
                 "vs blocked (autodiff)", "max |Δout| / max |Δgrad| vs torch"], rows)
    write_json(args.json, {"benchmark": "attention", "machine": machine, "rounds": args.rounds,
                           "calls_per_round": args.repeats, "heads": heads, "head_dim": head_dim,
                           "block": args.block, "results": records,
                           "steadiness": {k: v for k, v in steady.items() if k != "line"}})


if __name__ == "__main__":
    main()
