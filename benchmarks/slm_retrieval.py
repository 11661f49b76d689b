"""DTKR task retrieval alone, offline: which task the keys pick for each text, as a confusion matrix over tasks.

    python benchmarks/slm_retrieval.py [--config configs/slm/demo.yaml] [--split valid] [--seeds 0,1,2]
                                       [--out runs/slm-retrieval] [key=value ...]

SLM forgets only through retrieval (a text routed to another task's slots and head), so the retrieval
settings (`slm.query_layers`, `slm.groups`, `slm.slots_per_task`, `slm.top_k`, `slm.task_choice`, the key
training keys) can be compared without training a single adapter: this trains every task's keys on its
training queries exactly as `SlmRun` does (`dtkr.train_task_keys`, same seeds per task position), puts all
tasks in one pool and routes every text of `--split` by `ContinualClassifier.choose_tasks`. Queries come
from the run's query cache (`slm.cache_dir`), so a later `jaxcl run` of the same config reuses them.

Model choices are made on `--split valid` (the default). `--split test` exists for the report of a finished
choice only. Prints the retrieval accuracy per task (mean and range over seeds), the confusion matrix (rows:
the text's task, columns: the chosen task, summed over seeds) and, per confused pair, example texts; writes
retrieval.json and confusion.png into --out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_summary, parse_seeds, print_table, run_comparison_parser  # noqa: E402


def route(run, split: str, seed: int) -> dict[str, np.ndarray]:
    """{task: chosen task index per text of `split`} with keys trained as `SlmRun` trains them for `seed`."""
    import jax

    from jaxcl.slm import dtkr

    s = run.scfg
    learner = run._learner(0)
    for stage, name in enumerate(run.tasks):
        learner.add_task(stage, run.data[name]["train"].split.label_names)
        keys, _ = dtkr.train_task_keys(
            run.data[name]["train"].queries, jax.random.key(seed * 7919 + stage), groups=s.groups,
            slots=s.slots_per_task, epochs=s.key_epochs, batch_size=s.key_batch_size, lr=s.key_lr,
            mask_prob=s.key_mask_prob, init=s.key_init)
        learner.set_task_keys(stage, keys, run.data[name]["train"].queries)
    return {name: learner.choose_tasks(run.data[name][split].queries) for name in run.tasks}


def _plot(confusion: np.ndarray, tasks: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = 100.0 * confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2, 1.1 * len(tasks) + 1.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{share[i, j]:.1f}", ha="center", va="center",
                    color="white" if share[i, j] > 50 else "black", fontsize=9)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set(xlabel="task chosen by DTKR", ylabel="the text's task", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = run_comparison_parser(__doc__, "configs/slm/demo.yaml", "runs/slm-retrieval", "0,1,2")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--examples", type=int, default=3, help="example texts per confused pair")
    args = parser.parse_args()

    from jaxcl.config import load_config
    from jaxcl.slm.run import SlmRun

    seeds = parse_seeds(parser, args.seeds)
    cfg = load_config(args.config, list(args.overrides))
    if cfg.run.method != "slm" or cfg.slm.mode != "classification":
        parser.error(f"{args.config}: needs run.method slm and slm.mode classification")
    run = SlmRun(cfg)
    tasks = list(run.tasks)
    from jaxcl.eval.metrics import retrieval_confusion

    confusion = np.zeros((len(tasks), len(tasks)), np.int64)      # summed over seeds
    per_seed = {}
    examples: dict[str, list[str]] = {}
    texts = {i: run.data[name][args.split].split.texts for i, name in enumerate(tasks)}
    for seed in seeds:
        chosen = route(run, args.split, seed)
        retrieval_confusion({i: chosen[name] for i, name in enumerate(tasks)}, tasks, texts, args.examples,
                            counts=confusion, pairs=examples)
        per_seed[seed] = {name: 100.0 * float(np.mean(chosen[name] == i)) for i, name in enumerate(tasks)}
        per_seed[seed]["mean"] = float(np.mean([per_seed[seed][n] for n in tasks]))
    rows = []
    for name in [*tasks, "mean"]:
        values = [per_seed[s][name] for s in seeds]
        rows.append([name, float(np.mean(values)), min(values), max(values)])
    print(f"\n{machine_summary()}; config {args.config} {' '.join(args.overrides)}; split {args.split}; "
          f"seeds {seeds}")
    print_table(["task", "retrieval % mean", "min", "max"], rows)
    print("\nconfusion (rows: the text's task; columns: chosen; summed over seeds)")
    print_table(["task", *tasks], [[name, *confusion[i].tolist()] for i, name in enumerate(tasks)])
    worst = sorted(((confusion[i, j], f"{tasks[i]} -> {tasks[j]}") for i in range(len(tasks))
                    for j in range(len(tasks)) if i != j and confusion[i, j]), reverse=True)
    for count, pair in worst[:5]:
        print(f"\n{pair}: {count} texts, e.g.")
        for text in examples[pair]:
            print(f"  - {text[:160]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(
        {"config": args.config, "overrides": args.overrides, "split": args.split, "seeds": seeds, "tasks": tasks,
         "per_seed": per_seed, "confusion": confusion.tolist(), "examples": examples}, indent=2))
    _plot(confusion, tasks, out / "confusion.png", f"DTKR task retrieval on {args.split} ({len(seeds)} key seeds)")
    print(f"\noutputs in {out}/: retrieval.json, confusion.png")


if __name__ == "__main__":
    main()
