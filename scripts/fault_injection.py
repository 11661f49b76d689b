"""The long fault-injection run: hundreds of SIGKILLs at random moments under CPU contention.

    python scripts/fault_injection.py --out runs/faults                  # the default mix, >= 200 trials
    python scripts/fault_injection.py --out runs/faults --cases datastore-scann --trials 50

Every case of `tests/faults/harness.py` (datastore append on both backends with ScaNN segment freezes
and compactions, orbax sync and async saves, `save_pretrained` over a sharded checkpoint with both
directory-swap paths, whole `jaxcl run`s of sequential fine-tuning and SeMem killed and resumed, and
`jaxcl prepare` building a token cache with two worker processes);
every third trial of a case is a double crash (a second kill right after recovery). Trials are
appended to OUT/trials.jsonl as they finish, so an interrupted run resumes where it stopped; the
summary goes to OUT/summary.json and stdout (docs/reliability.md records it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults.harness import SCENARIOS, Contention, Trial, run_trial, summarize  # noqa: E402

# trials per case in the default mix: 312 in all
DEFAULT_MIX = {"datastore-exact": 60, "datastore-scann": 60, "orbax-sync": 25, "orbax-async": 25, "prepare": 100,
               "hf-exchange": 15, "hf-rename": 15, "run-sequential": 6, "run-semem": 6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/faults", help="output folder (trials.jsonl, summary.json)")
    ap.add_argument("--cases", default=",".join(DEFAULT_MIX), help=f"comma-separated, from {', '.join(SCENARIOS)}")
    ap.add_argument("--trials", type=int, default=None, help="trials per case (default: the built-in mix)")
    ap.add_argument("--contention", type=int, default=None, help="busy-loop processes (default: one per core)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in SCENARIOS]
    if unknown:
        ap.error(f"--cases: unknown case(s) {unknown} (valid: {', '.join(SCENARIOS)})")
    plan = {c: args.trials if args.trials is not None else DEFAULT_MIX.get(c, 20) for c in cases}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "trials.jsonl"
    done: list[Trial] = []
    if log_path.exists():
        done = [Trial(**json.loads(line)) for line in log_path.read_text().splitlines() if line.strip()]
    counts = {c: sum(t.case == c for t in done) for c in cases}
    todo = sum(max(0, plan[c] - counts[c]) for c in cases)
    print(f"{sum(counts.values())} trials already in {log_path}; {todo} to run", flush=True)

    import numpy as np
    from tqdm import tqdm

    rng = np.random.default_rng([args.seed, sum(counts.values())])
    start = time.time()
    with Contention(args.contention), tqdm(total=todo, desc="kill trials", dynamic_ncols=True) as bar:
        round_ = 0
        while any(counts[c] < plan[c] for c in cases):
            for case in cases:
                if counts[case] >= plan[case]:
                    continue
                index = counts[case]
                trial = run_trial(SCENARIOS[case](), out / "work", args.seed * 100_000 + index * 10 + round_,
                                  index % 3 == 2, rng)
                with log_path.open("a") as f:
                    f.write(json.dumps(dataclasses.asdict(trial)) + "\n")
                done.append(trial)
                counts[case] += 1
                bar.update()
                bar.set_postfix(failures=sum(t.error is not None for t in done))
                if trial.error:
                    tqdm.write(f"FAILED {case} (seed {trial.seed}): {trial.error}")
            round_ += 1
    summary = summarize([t for t in done if t.case in cases])
    total = {"trials": sum(s["trials"] for s in summary.values()),
             "failures": sum(s["failures"] for s in summary.values()),
             "double_crash": sum(s["double_crash"] for s in summary.values()),
             "seconds_this_invocation": round(time.time() - start, 1)}
    (out / "summary.json").write_text(json.dumps({"total": total, "cases": summary}, indent=1))
    print(f"{'case':18}{'trials':>8}{'double':>8}{'unacked':>9}{'failures':>10}{'s/trial':>9}")
    for case, s in summary.items():
        print(f"{case:18}{s['trials']:>8}{s['double_crash']:>8}{s['beyond_ack']:>9}{s['failures']:>10}"
              f"{s['seconds'] / max(s['trials'], 1):>9.1f}")
    print(f"total: {total['trials']} trials, {total['double_crash']} double crashes, {total['failures']} failures")
    return 1 if total["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
