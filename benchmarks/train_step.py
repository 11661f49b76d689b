"""Training throughput: jaxcl GPT-2 train step vs `transformers` PyTorch GPT-2 + AdamW, same run, CPU.

    python benchmarks/train_step.py [--sizes 4x128,8x128,8x256] [--d-model 256 --layers 4 --heads 4]
                                    [--vocab 8192] [--threads N] [--repeats 7] [--json out.json]

One timed iteration is one full optimizer step (forward + backward + clipping + AdamW update) on a
fixed batch; the reported time is the median over `--repeats` steps after warmup (jaxcl's warmup
includes compilation). Both sides are synchronous per step: jaxcl's jitted `make_train_step` is
blocked on its returned state and metrics (the state is donated, so each step's new state is
threaded into the next); PyTorch eager execution is synchronous.

Fairness: identical initial weights (jaxcl loads the PyTorch model's `save_pretrained` checkpoint),
the same token batch, float32 on both sides, the same loss (mean next-token cross-entropy over all
B*(S-1) positions; PyTorch: `model(ids, labels=ids).loss`), AdamW with the same constant lr, betas,
eps and weight decay (decayed: matrices and embeddings; not decayed: biases and norm parameters, as
in `jaxcl.train.weight_decay_mask`), global-norm gradient clipping to the same max norm
(`torch.nn.utils.clip_grad_norm_` / `optax.clip_by_global_norm`). Dropout is off on both sides:
the PyTorch model runs in `train()` mode with `resid_pdrop = embd_pdrop = attn_pdrop = 0.0`, jaxcl
with `dropout = 0.0`. PyTorch uses its default attention (SDPA), `use_cache=False` and the fused
CPU AdamW (its fastest AdamW on CPU); it runs on `--threads` threads, XLA uses its own thread pool
over all cores. As a sanity check the losses of the first two steps of both implementations are
compared: step 1 checks the forward pass at identical weights, step 2 checks that the updates agree.

MFU = model FLOPs per step / step time / peak, with model FLOPs per token = 6 * N + 12 * L * S * d
(the PaLM estimate: 6 FLOPs per matmul parameter for forward + backward, plus the attention
score and value matmuls, counted over the full S x S square). N = all parameters except the
position table, i.e. the non-embedding parameters plus the V x d LM-head matrix (tied to the token
embedding, whose lookup is free but whose output projection is a matmul). The peak is measured in
the same run as the best float32 matmul rate of a jitted `jnp.dot` and of `torch.mm` on 2048 x 2048
matrices (2 * n^3 FLOPs per call, median time), and the higher one is used for both MFUs.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

MATMUL_N = 2048
TOTAL_STEPS = 10_000   # schedule length for `make_optimizer`; with no warmup and min_lr_ratio=1 the lr is constant


def measure_matmul_peak(repeats: int) -> tuple[float, float]:
    """float32 FLOP/s of a MATMUL_N^3 matmul: (jitted jnp.dot, torch.mm)."""
    import jax
    import jax.numpy as jnp
    import torch
    from common import time_call

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (MATMUL_N, MATMUL_N), jnp.float32)
    b = jax.random.normal(kb, (MATMUL_N, MATMUL_N), jnp.float32)
    dot = jax.jit(jnp.dot)
    t_jax = time_call(lambda: dot(a, b).block_until_ready(), repeats=repeats)
    ta, tb = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    t_torch = time_call(lambda: torch.mm(ta, tb), repeats=repeats)
    flops = 2 * MATMUL_N ** 3
    return flops / t_jax, flops / t_torch


def bench_jaxcl(train_step, tx, cfg, params, mesh, ids, repeats: int) -> tuple[list[float], float]:
    """(losses of the first two steps, median step time) from fresh optimizer state at `params`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from common import time_call

    from jaxcl.parallel import batch_sharding
    from jaxcl.train import create_train_state

    # Copies: the step donates its state, which must not take the caller's parameter buffers with it.
    state, _ = create_train_state(cfg, tx, jax.random.key(0), mesh, params=jax.tree.map(jnp.copy, params))
    batch = jax.device_put({"input_ids": ids.astype(np.int32), "attention_mask": np.ones(ids.shape, np.int32)},
                           batch_sharding(mesh))
    rng = jax.random.key(0)

    def run():
        nonlocal state
        state, metrics = train_step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        return metrics

    losses = [float(run()["loss"]) for _ in range(2)]
    return losses, time_call(run, repeats=repeats)


def bench_torch(base_model, optim, ids, repeats: int) -> tuple[list[float], float]:
    """(losses of the first two steps, median step time) for a copy of `base_model` with a fresh AdamW."""
    import torch
    from common import time_call

    model = copy.deepcopy(base_model).train()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps, fused=True)
    tids = torch.from_numpy(ids)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(tids, labels=tids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.clip_norm)
        opt.step()
        return loss

    losses = [run().item() for _ in range(2)]
    return losses, time_call(run, repeats=repeats)


def main() -> None:
    from common import gpt2_benchmark_args

    args = gpt2_benchmark_args(__doc__, "4x128,8x128,8x256")

    import jax
    import numpy as np
    import torch
    import transformers
    from common import machine_summary, print_table, write_json

    from jaxcl.config import MeshConfig, OptimConfig
    from jaxcl.hf import load_pretrained
    from jaxcl.parallel import make_mesh
    from jaxcl.train import make_optimizer, make_train_step, state_shardings

    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    sizes = args.sizes
    max_seq = max(s for _, s in sizes)
    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.d_model, n_layer=args.layers,
                                     n_head=args.heads, n_positions=max_seq, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel(hf_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        cfg, params = load_pretrained(tmp)
    assert cfg.dropout == 0.0, cfg.dropout

    optim = OptimConfig(warmup_steps=0, min_lr_ratio=1.0)   # constant lr, like plain torch AdamW
    tx = make_optimizer(optim, total_steps=TOTAL_STEPS)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    train_step = make_train_step(cfg, tx, mesh, state_shardings(cfg, tx, mesh))

    peak_jax, peak_torch = measure_matmul_peak(args.repeats)
    peak = max(peak_jax, peak_torch)
    n_matmul = cfg.num_params() - cfg.max_seq_len * cfg.d_model

    print(f"# train step (fwd + bwd + clip {optim.clip_norm} + AdamW), GPT-2 d={args.d_model} L={args.layers} "
          f"H={args.heads} V={args.vocab} ({cfg.num_params() / 1e6:.1f} M params, N={n_matmul / 1e6:.1f} M), "
          f"float32; {machine_summary()}, torch {torch.__version__} threads={args.threads}")
    print(f"# fp32 matmul peak ({MATMUL_N}^3): jnp.dot {peak_jax / 1e9:.1f} GFLOP/s, torch.mm "
          f"{peak_torch / 1e9:.1f} GFLOP/s; MFU uses {peak / 1e9:.1f} GFLOP/s and 6*N + 12*L*S*d FLOPs per token; "
          f"1-min load average at start {load_at_start:.2f} (timings need an otherwise idle machine)")
    rows, records = [], []
    for batch, seq in sizes:
        ids = np.random.RandomState(0).randint(0, args.vocab, (batch, seq)).astype(np.int64)
        jax_losses, t_jax = bench_jaxcl(train_step, tx, cfg, params, mesh, ids, args.repeats)
        torch_losses, t_torch = bench_torch(torch_model, optim, ids, args.repeats)
        tokens = batch * seq
        step_flops = tokens * (6 * n_matmul + 12 * cfg.n_layers * seq * cfg.d_model)
        mfu_jax, mfu_torch = step_flops / t_jax / peak, step_flops / t_torch / peak
        loss_diffs = [abs(a - b) for a, b in zip(jax_losses, torch_losses)]
        rows.append([f"{batch}x{seq}", tokens / t_jax, tokens / t_torch, t_torch / t_jax, f"{mfu_jax:.1%}",
                     f"{mfu_torch:.1%}", f"{jax_losses[0]:.4f}", f"{loss_diffs[0]:.1e}", f"{loss_diffs[1]:.1e}"])
        records.append({"batch": batch, "seq": seq, "jaxcl_tokens_per_s": tokens / t_jax,
                        "torch_tokens_per_s": tokens / t_torch, "ratio": t_torch / t_jax, "jaxcl_mfu": mfu_jax,
                        "torch_mfu": mfu_torch, "jaxcl_losses": jax_losses, "torch_losses": torch_losses})
    print_table(["batch x seq", "jaxcl tok/s", "torch tok/s", "jaxcl / torch", "jaxcl MFU", "torch MFU",
                 "loss step 1", "|Δloss| step 1", "|Δloss| step 2"], rows)
    write_json(args.json, {"benchmark": "train_step", "matmul_peak_flops": {"jax": peak_jax, "torch": peak_torch},
                           "load_average_at_start": load_at_start, "results": records})


if __name__ == "__main__":
    main()
