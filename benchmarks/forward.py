"""Forward-pass throughput: jaxcl GPT-2 vs `transformers` PyTorch GPT-2, same config, same run, CPU.

    python benchmarks/forward.py [--sizes 1x128,8x128,4x512,16x256] [--threads N] [--rounds 10] [--repeats 3]
                                 [--jaxcl-options none/xla,dots_saveable/auto] [--json out.json]

Both models get identical weights (jaxcl loads the PyTorch model's checkpoint), the same token
batch and the same number of CPU threads. jaxcl's forward is one jitted call per variant
(`--jaxcl-options`: REMAT/ATTENTION[/BLOCK]; remat does not matter without a backward pass);
PyTorch runs in `inference_mode` with its default attention (SDPA). All sides are timed in
`--rounds` interleaved rounds of `--repeats` calls (order rotated every round); the table gives
medians, quartiles and ratios of medians, with the CPU model and allocator setting, under a line
saying whether the machine stayed steady (`common.Steadiness`: the fp32 matmul rate before and after,
the CPU time stolen by the hypervisor; SUSPECT when they moved).
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

    from common import Steadiness, interleaved_times, machine_details, machine_summary, minor_faults_per_call, \
        option_label, print_table, quartiles, write_json
    from jaxcl.hf import load_pretrained
    from jaxcl.models import build

    machine = machine_details()
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
    forwards = {}
    for o in args.options:
        name = option_label(o, with_remat=False)
        model = build(cfg.replace(**o))
        forwards[name] = jax.jit(lambda p, ids, model=model: model.apply({"params": p}, ids).logits)
    baseline = next(iter(forwards))

    print(f"# forward pass, GPT-2 d={args.d_model} L={args.layers} H={args.heads} V={args.vocab} "
          f"({cfg.num_params() / 1e6:.1f} M params), float32; {machine_summary()}; CPU {machine['cpu']} "
          f"({machine['cores']} cores); allocator {machine['allocator']}, THP {machine['transparent_hugepages']}; torch threads={args.threads}; "
          f"{args.rounds} interleaved rounds x {args.repeats} calls; load average {machine['load_average']:.2f}")
    rows, records = [], []
    steadiness = Steadiness(args.repeats)
    for batch, seq in sizes:
        ids = np.random.RandomState(0).randint(0, args.vocab, (batch, seq))
        jids, tids = jnp.asarray(ids, jnp.int32), torch.tensor(ids)
        with torch.inference_mode():
            ref = torch_model(tids).logits.numpy()
        fns, diffs = {}, {}
        for name, forward in forwards.items():
            diffs[name] = float(np.abs(np.asarray(forward(params, jids)) - ref).max())
            fns[name] = lambda forward=forward: forward(params, jids).block_until_ready()

        def run_torch():
            with torch.inference_mode():
                torch_model(tids)

        fns["torch"] = run_torch
        times = interleaved_times(fns, rounds=args.rounds, steps=args.repeats)
        faults = {name: minor_faults_per_call(fn, calls=2) for name, fn in fns.items()}
        q = {name: quartiles(t) for name, t in times.items()}
        tokens = batch * seq
        record = {"batch": batch, "seq": seq, "seconds_per_call": times, "minor_faults_per_call": faults}
        for name in fns:
            q1, med, q3 = q[name]
            rows.append([f"{batch}x{seq}", name, tokens / med, f"{tokens / q3:,.0f}-{tokens / q1:,.0f}",
                         "-" if name == "torch" else f"{q['torch'][1] / med:.3f}",
                         "-" if name == "torch" else f"{q[baseline][1] / med:.3f}",
                         "-" if name == "torch" else f"{diffs[name]:.1e}", f"{faults[name]:,.0f}"])
            record[name] = {"tokens_per_s_median": tokens / med, "vs_torch": q["torch"][1] / med,
                            "max_abs_logit_diff": diffs.get(name)}
        records.append(record)
    steady = steadiness.finish()
    print(steady["line"])
    print_table(["batch x seq", "side (attention)", "tok/s (median)", "tok/s (IQR)", "jaxcl / torch",
                 f"vs {baseline}", "max |Δlogit|", "page faults / call"], rows)
    write_json(args.json, {"benchmark": "forward", "machine": machine, "rounds": args.rounds, "results": records,
                           "steadiness": {k: v for k, v in steady.items() if k != "line"}})


if __name__ == "__main__":
    main()
