"""Forward-pass throughput: jaxcl GPT-2 vs `transformers` PyTorch GPT-2, same config, same run, CPU.

    python benchmarks/forward.py [--sizes 1x128,8x128,8x512] [--threads N] [--json out.json]

Both models get identical weights (jaxcl loads the PyTorch model's checkpoint), the same token
batch and the same number of CPU threads; each timing is a median after warmup. jaxcl's forward is
one jitted call; PyTorch runs in `inference_mode` with its default attention (SDPA).
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    from common import gpt2_benchmark_args

    args = gpt2_benchmark_args(__doc__, "1x128,8x128,4x512,16x256")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from common import machine_summary, print_table, time_call, write_json
    from jaxcl.hf import load_pretrained
    from jaxcl.models import build

    torch.set_num_threads(args.threads)
    sizes = args.sizes
    max_seq = max(s for _, s in sizes)
    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.d_model, n_layer=args.layers,
                                     n_head=args.heads, n_positions=max_seq, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        cfg, params = load_pretrained(tmp)
    model = build(cfg)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids).logits)

    print(f"# forward pass, GPT-2 d={args.d_model} L={args.layers} H={args.heads} V={args.vocab} "
          f"({cfg.num_params() / 1e6:.1f} M params), float32; {machine_summary()}, torch threads={args.threads}")
    rows, records = [], []
    for batch, seq in sizes:
        ids = np.random.RandomState(0).randint(0, args.vocab, (batch, seq))
        jids, tids = jnp.asarray(ids, jnp.int32), torch.tensor(ids)
        ours = np.asarray(forward(params, jids))
        with torch.inference_mode():
            ref = torch_model(tids).logits.numpy()
        max_diff = float(np.abs(ours - ref).max())

        def run_jax():
            forward(params, jids).block_until_ready()

        def run_torch():
            with torch.inference_mode():
                torch_model(tids)

        t_jax = time_call(run_jax, repeats=args.repeats)
        t_torch = time_call(run_torch, repeats=args.repeats)
        tokens = batch * seq
        rows.append([f"{batch}x{seq}", tokens / t_jax, tokens / t_torch, t_torch / t_jax, f"{max_diff:.1e}"])
        records.append(dict(batch=batch, seq=seq, jaxcl_tokens_per_s=tokens / t_jax,
                            torch_tokens_per_s=tokens / t_torch, ratio=t_torch / t_jax, max_abs_logit_diff=max_diff))
    print_table(["batch x seq", "jaxcl tok/s", "torch tok/s", "jaxcl / torch", "max |Δlogit|"], rows)
    write_json(args.json, {"benchmark": "forward", "results": records})


if __name__ == "__main__":
    main()
