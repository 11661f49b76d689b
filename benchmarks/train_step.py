"""Training throughput: jaxcl GPT-2 train step vs `transformers` PyTorch GPT-2 + AdamW, same run, CPU.

    python benchmarks/train_step.py [--sizes 4x128,8x128,8x256] [--d-model 256 --layers 4 --heads 4]
                                    [--vocab 8192] [--threads N] [--rounds 10] [--repeats 3]
                                    [--jaxcl-options none/xla,dots_saveable/auto] [--host-malloc auto] [--json out.json]

One timed iteration is one full optimizer step (forward + backward + clipping + AdamW update) on a
fixed batch. Every jaxcl variant (`--jaxcl-options`: model.remat / model.attention / block; the first
is the baseline, jaxcl's defaults) and PyTorch are timed in `--rounds` interleaved rounds of `--repeats`
steps each, the order rotated every round, after warmup (jaxcl's includes compilation); the table
gives medians and quartiles over rounds, the ratios of medians, each side's MFU, the CPU model and the
allocator setting both sides ran with (MALLOC_* / GLIBC_TUNABLES / LD_PRELOAD, from the environment) and
each side's minor page faults per step (a count, `common.minor_faults_per_call`). Both sides are
synchronous per step: jaxcl's jitted `make_train_step` is blocked on its returned state and metrics
(the state is donated, so each step's new state is threaded into the next); PyTorch eager execution
is synchronous.

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
the same run, before and after the timings, as the best float32 matmul rate of a jitted `jnp.dot` and
of `torch.mm` on 2048 x 2048 matrices (2 * n^3 FLOPs per call, median time), and the highest is used
for both MFUs. The two measurements and the CPU time stolen by the hypervisor over the run
(`common.Steadiness`) are printed above the table; a run where they moved is marked SUSPECT.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

TOTAL_STEPS = 10_000   # schedule length for `make_optimizer`; with no warmup and min_lr_ratio=1 the lr is constant


def jaxcl_stepper(train_step, tx, cfg, params, mesh, ids) -> tuple[list[float], object]:
    """(losses of the first two steps, a function running one blocked step) from fresh optimizer state."""
    import jax
    import jax.numpy as jnp
    import numpy as np

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

    return [float(run()["loss"]) for _ in range(2)], run


def torch_stepper(base_model, optim, ids) -> tuple[list[float], object]:
    """(losses of the first two steps, a function running one step) for a copy of `base_model` + fresh AdamW."""
    import torch

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

    return [run().item() for _ in range(2)], run


def main() -> None:
    from common import gpt2_benchmark_args

    args = gpt2_benchmark_args(__doc__, "4x128,8x128,8x256")

    import jax
    import numpy as np
    import torch
    import transformers

    from common import MATMUL_N, Steadiness, interleaved_times, machine_details, machine_summary, \
        minor_faults_per_call, option_label, print_table, quartiles, write_json

    from jaxcl.config import MeshConfig, OptimConfig
    from jaxcl.hf import load_pretrained
    from jaxcl.parallel import make_mesh
    from jaxcl.train import make_optimizer, make_train_step, state_shardings

    machine = machine_details()
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
    variants = {option_label(o): cfg.replace(**o) for o in args.options}
    steps = {name: make_train_step(c, tx, mesh, state_shardings(c, tx, mesh)) for name, c in variants.items()}

    steadiness = Steadiness(args.repeats)
    peak_jax, peak_torch = steadiness.start
    n_matmul = cfg.num_params() - cfg.max_seq_len * cfg.d_model
    baseline = next(iter(variants))

    print(f"# train step (fwd + bwd + clip {optim.clip_norm} + AdamW), GPT-2 d={args.d_model} L={args.layers} "
          f"H={args.heads} V={args.vocab} ({cfg.num_params() / 1e6:.1f} M params, N={n_matmul / 1e6:.1f} M), "
          f"float32; {machine_summary()}; CPU {machine['cpu']} ({machine['cores']} cores); allocator "
          f"{machine['allocator']}, THP {machine['transparent_hugepages']}; torch {torch.__version__} threads={args.threads}")
    print(f"# fp32 matmul peak ({MATMUL_N}^3, at the start): jnp.dot {peak_jax / 1e9:.1f} GFLOP/s, torch.mm "
          f"{peak_torch / 1e9:.1f} GFLOP/s; MFU uses the best rate measured at the start or the end and "
          f"6*N + 12*L*S*d FLOPs per token; {args.rounds} interleaved rounds x {args.repeats} steps; 1-min load "
          f"average at start {machine['load_average']:.2f} (timings need an otherwise idle machine)")
    records = []
    for batch, seq in sizes:
        ids = np.random.RandomState(0).randint(0, args.vocab, (batch, seq)).astype(np.int64)
        fns, losses = {}, {}
        for name, c in variants.items():
            losses[name], fns[name] = jaxcl_stepper(steps[name], tx, c, params, mesh, ids)
        losses["torch"], fns["torch"] = torch_stepper(torch_model, optim, ids)
        times = interleaved_times(fns, rounds=args.rounds, steps=args.repeats)
        faults = {name: minor_faults_per_call(fn, calls=2) for name, fn in fns.items()}
        tokens = batch * seq
        step_flops = tokens * (6 * n_matmul + 12 * cfg.n_layers * seq * cfg.d_model)
        record = {"batch": batch, "seq": seq, "step_flops": step_flops, "losses": losses, "seconds_per_step": times,
                  "minor_faults_per_step": faults}
        records.append(record)
    steady = steadiness.finish()
    peak = max(*steady["matmul_start"], *steady["matmul_end"])
    rows = []
    for record in records:
        batch, seq, step_flops, losses = record["batch"], record["seq"], record["step_flops"], record["losses"]
        tokens = batch * seq
        q = {name: quartiles(t) for name, t in record["seconds_per_step"].items()}
        faults = record["minor_faults_per_step"]
        for name in q:
            q1, med, q3 = q[name]
            diffs = [abs(a - b) for a, b in zip(losses[name], losses["torch"])]
            rows.append([f"{batch}x{seq}", name, tokens / med, f"{tokens / q3:,.0f}-{tokens / q1:,.0f}",
                         f"{step_flops / med / peak:.1%}",
                         "-" if name == "torch" else f"{q['torch'][1] / med:.3f}",
                         "-" if name == "torch" else f"{q[baseline][1] / med:.3f}",
                         f"{diffs[0]:.1e} / {diffs[1]:.1e}" if name != "torch" else f"{losses[name][0]:.4f}",
                         f"{faults[name]:,.0f}"])
            record[name] = {"tokens_per_s_median": tokens / med, "mfu": step_flops / med / peak,
                            "vs_torch": q["torch"][1] / med, "vs_baseline": q[baseline][1] / med}
    print(steady["line"])
    print_table(["batch x seq", "side (remat/attention)", "tok/s (median)", "tok/s (IQR)", "MFU",
                 "jaxcl / torch", f"vs {baseline}", "|Δloss| steps 1 / 2 (torch: loss)", "page faults / step"],
                rows)
    write_json(args.json, {"benchmark": "train_step", "machine": machine, "matmul_peak_flops": peak,
                           "steadiness": {k: v for k, v in steady.items() if k != "line"}, "rounds": args.rounds,
                           "steps_per_round": args.repeats, "results": records})


if __name__ == "__main__":
    main()
