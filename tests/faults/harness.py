"""Fault injection: SIGKILL a writer at random moments under CPU contention, reopen, verify, keep working.

One trial: set up a store (or reuse what the last trial left), start a victim (`victims.py`) that commits
in a loop, kill it with SIGKILL after a random delay while busy-loop processes compete for every core,
optionally kill a second victim right after it reopened the store (the "second crash during recovery"),
then reopen in this process and check:
- everything the victims acknowledged (`COMMIT n` printed after a commit returned) is there, bit for bit,
  and the store is at a state some commit produced (never between two);
- nothing needed repair beyond what the design allows (no damaged index segment, no unreadable file);
- the store keeps working: one more commit, reopened and verified again.

Used by `tests/faults/test_faults.py` (the CI version) and `scripts/fault_injection.py` (the long one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tests.compile_cache import killable_env
from tests.faults import victims

ROOT = Path(__file__).resolve().parents[2]
VICTIM = Path(__file__).with_name("victims.py")


class TrialFailure(AssertionError):
    """A verified promise did not hold."""


@dataclasses.dataclass
class Trial:
    case: str
    seed: int
    double_crash: bool
    delay: float                 # seconds after READY until the kill
    acked: list[int]             # what the killed victim(s) acknowledged (last value is what counts)
    state: int                   # the state found on reopening (rows, step or version)
    beyond_ack: bool             # the store holds a commit the victim never acknowledged (killed between commit point and print)
    seconds: float
    error: str | None = None


class Contention:
    """Busy-loop processes, one per core (or `n`), for the lifetime of the context."""

    def __init__(self, n: int | None = None):
        self.n = (os.cpu_count() or 2) if n is None else n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def run_victim(case: str, directory: Path, seed: int, delay: float, timeout: float = 240,
               command: list[str] | None = None) -> tuple[int, list[int]]:
    """Start a victim, SIGKILL it `delay` s after it is READY; returns (state at READY, acknowledged commits).

    `command`: another program to kill instead (e.g. the `jaxcl` CLI), which prints no READY: the delay
    then counts from its start, and a program that finishes before the kill returns (-1, []).
    """
    env = killable_env(dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    env.pop("XLA_FLAGS", None)
    command = command or [sys.executable, str(VICTIM), case, str(directory), str(seed)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)          # its own process group: children can be found
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    acked: list[int] = []
    ready: int | None = None
    deadline, kill_at = time.time() + timeout, None
    if command is not None and VICTIM.name not in " ".join(command):
        kill_at, ready = time.time() + delay, 0

    def take(line: str) -> None:
        nonlocal ready, kill_at
        if not line.endswith("\n"):
            return       # a line the kill cut short (unbuffered stdout writes it piece by piece): not an ack
        word, _, value = line.strip().partition(" ")
        if word == "READY":
            ready, kill_at = int(value), time.time() + delay
        elif word == "COMMIT":
            acked.append(int(value))

    while kill_at is None or time.time() < kill_at:
        try:
            take(lines.get(timeout=0.002 if kill_at is None else max(0.0, min(0.01, kill_at - time.time()))))
            continue
        except queue.Empty:
            pass
        if time.time() > deadline:
            proc.kill()
            raise TrialFailure(f"{case}: victim never became ready in {timeout} s")
        if proc.poll() is not None and lines.empty():
            if kill_at is not None and proc.returncode == 0 and ready == 0:
                return -1, []               # a whole run finished before its kill
            raise TrialFailure(f"{case}: victim exited with {proc.returncode} before the kill: "
                               f"{proc.stderr.read()[-2000:]}")
    proc.send_signal(signal.SIGKILL)         # the main process only, as `kill -9 PID` or the OOM killer does
    proc.wait()
    orphans = _survivors(proc.pid)
    if orphans:
        os.killpg(proc.pid, signal.SIGKILL)
        raise TrialFailure(f"{case}: {orphans} process(es) of the killed victim outlived it (children must die with "
                           "their parent)")
    reader.join(timeout=10)
    while not lines.empty():
        take(lines.get())
    proc.stdout.close()
    proc.stderr.close()
    return ready, acked


def _survivors(group: int, grace: float = 15.0) -> int:
    """How many processes of a killed victim's process group are still alive after `grace` seconds (a child
    still starting up under contention needs a few seconds to notice)."""
    deadline = time.time() + grace
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return 0
        if time.time() > deadline:
            break
        time.sleep(0.05)
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == group and fields[0] != "Z":
                    count += 1
            except (OSError, IndexError, ValueError):
                pass
    return count


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


# ----------------------------------------------------------------------------- scenarios
class Scenario:
    """setup(dir, seed) makes the starting state; verify(dir, start, acked, seed) -> state found."""

    name = ""
    window = 2.0              # the kill lands uniformly in [0, window] s after READY

    def setup(self, directory: Path, seed: int) -> None:
        raise NotImplementedError

    def verify(self, directory: Path, start: int, acked: list[int], seed: int) -> int:
        raise NotImplementedError


class DatastoreScenario(Scenario):
    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"datastore-{backend}"
        self.window = 2.5 if backend == "exact" else 4.0

    def _create(self, directory: Path):
        from jaxcl.memory import Datastore
        opts = victims.scann_options() if self.backend == "scann" else {}
        return Datastore.create(directory, dim=victims.DIM, backend=self.backend, chunk_rows=1024,
                                index_options=opts)

    def setup(self, directory: Path, seed: int) -> None:
        ds = self._create(directory)
        keys, values = victims.rows(np.arange(1500))
        ds.add(keys, values)

    def verify(self, directory: Path, start: int, acked: list[int], seed: int) -> int:
        from jaxcl.memory import Datastore

        watcher = _Warnings()
        logging.getLogger("jaxcl").addHandler(watcher)
        try:
            ds = Datastore.open(directory)
            n = len(ds)
            reachable, total = {start}, start
            for size in victims.batch_sizes(seed):
                total += size
                reachable.add(total)
                if total > n:
                    break
            last = max([start, *acked])
            if n < last:
                raise TrialFailure(f"{self.name}: {n} rows after reopening, but {last} were committed")
            if n not in reachable:
                raise TrialFailure(f"{self.name}: {n} rows is not a state any commit produced ({sorted(reachable)[-4:]})")
            keys, values = victims.rows(np.arange(n))
            if not np.array_equal(ds.keys, keys.astype(np.float16)) or not np.array_equal(ds.values, values):
                bad = np.flatnonzero(np.any(ds.keys != keys.astype(np.float16), axis=1) | (ds.values != values))
                raise TrialFailure(f"{self.name}: {len(bad)} committed rows differ after reopening, first {bad[:5]}")
            self._check_index(ds, n)
            more_keys, more_values = victims.rows(np.arange(n, n + 700))     # it keeps working
            ds.add(more_keys, more_values)
            again = Datastore.open(directory)
            if len(again) != n + 700 or not np.array_equal(again.values[n:], more_values):
                raise TrialFailure(f"{self.name}: the append after recovery was not kept")
            _, ids = again.search(more_keys[-50:], 1)
            if not np.array_equal(ids[:, 0], np.arange(n + 650, n + 700)):
                raise TrialFailure(f"{self.name}: rows appended after recovery are not found by search")
            if watcher.records:
                raise TrialFailure(f"{self.name}: recovery needed repairs: {watcher.records[:3]}")
            return n
        finally:
            logging.getLogger("jaxcl").removeHandler(watcher)

    def _check_index(self, ds, n: int) -> None:
        if self.backend != "scann":
            return
        spans = [(s.start, s.end) for s in ds.index.segments]
        if spans and (spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or spans[-1][1] > n):
            raise TrialFailure(f"{self.name}: index segments {spans} do not tile the committed rows [0, {n})")
        if n - ds.index.frozen_end >= victims.scann_options()["segment_rows"]:
            raise TrialFailure(f"{self.name}: {n - ds.index.frozen_end} rows left unfrozen after reopening")
        # every segment answers for its own rows: the nearest neighbour of a stored key is itself
        probe = np.unique(np.linspace(0, n - 1, 64).astype(int))
        _, ids = ds.search(ds.keys[probe].astype(np.float32), 1)
        if np.mean(ids[:, 0] == probe) < 0.95:
            raise TrialFailure(f"{self.name}: stored keys are not found by search after reopening")


class OrbaxScenario(Scenario):
    def __init__(self, async_save: bool):
        self.async_save = async_save
        self.name = "orbax-async" if async_save else "orbax-sync"
        self.window = 3.0

    def setup(self, directory: Path, seed: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)

    def verify(self, directory: Path, start: int, acked: list[int], seed: int) -> int:
        from jaxcl.config import CheckpointConfig
        from jaxcl.train.checkpoint import Checkpointer

        ckpt = Checkpointer(directory, CheckpointConfig(keep=3, async_save=False))
        try:
            steps = ckpt.all_steps()
            latest = max(steps, default=0)
            last = max([start, *acked])
            if latest < last:
                raise TrialFailure(f"{self.name}: latest step {latest} after reopening, but {last} was committed")
            if latest > last + (2 if self.async_save else 1):
                raise TrialFailure(f"{self.name}: step {latest} exists but at most {last} + in-flight was saved")
            for step in steps:
                target = victims.checkpoint_state(step)
                import orbax.checkpoint as ocp
                restored = ckpt.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
                state, meta = restored["state"], restored["meta"]
                for k, v in target.items():
                    if not np.array_equal(np.asarray(state[k]), v):
                        raise TrialFailure(f"{self.name}: step {step} restores a different {k!r}")
                if meta["step"] != step:
                    raise TrialFailure(f"{self.name}: step {step} has the meta of step {meta['step']}")
            ckpt.save(latest + 1, victims.checkpoint_state(latest + 1), {"step": latest + 1, "seed": seed})
            ckpt.wait()
        finally:
            ckpt.close()
        reopened = Checkpointer(directory, CheckpointConfig(keep=3, async_save=False))
        try:
            if reopened.latest_step() != latest + 1:
                raise TrialFailure(f"{self.name}: the save after recovery was not kept")
        finally:
            reopened.close()
        return latest


class HFScenario(Scenario):
    TOKENIZER = b'{"version": "1.0", "note": "a user file beside the weights"}'

    def __init__(self, exchange: bool):
        self.exchange = exchange
        self.name = "hf-exchange" if exchange else "hf-rename"
        self.window = 2.5

    def setup(self, directory: Path, seed: int) -> None:
        from jaxcl.hf import save_pretrained
        save_pretrained(directory, victims.hf_model(), victims.hf_params(1), max_shard_bytes=1 << 20)
        (directory / "tokenizer.json").write_bytes(self.TOKENIZER)

    def verify(self, directory: Path, start: int, acked: list[int], seed: int) -> int:
        from jaxcl.hf import load_pretrained, save_pretrained
        import jax

        cfg, params = load_pretrained(directory)
        version = victims.hf_version(params)
        last = max([start, *acked])
        if version not in (last, last + 1):
            raise TrialFailure(f"{self.name}: version {version} after reopening; committed {last}")
        expected = victims.hf_params(version)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
            if not np.array_equal(np.asarray(a), b):
                raise TrialFailure(f"{self.name}: the checkpoint mixes versions (a tensor differs from v{version})")
        if (directory / "tokenizer.json").read_bytes() != self.TOKENIZER:
            raise TrialFailure(f"{self.name}: the user's tokenizer.json was lost or changed")
        leftovers = [p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.")]
        if leftovers:
            raise TrialFailure(f"{self.name}: leftovers after recovery: {leftovers}")
        save_pretrained(directory, cfg, victims.hf_params(version + 1), max_shard_bytes=1 << 20)
        if victims.hf_version(load_pretrained(directory)[1]) != version + 1:
            raise TrialFailure(f"{self.name}: the save after recovery was not kept")
        return version


class RunScenario(Scenario):
    """`jaxcl run` killed at a random moment (checkpoints, metrics, datastores, reports in flight), then
    resumed to the end: the report must equal an uninterrupted run's, with no duplicated metrics."""

    CONFIGS = {
        "run-sequential": ("configs/demo.yaml", [
            "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
            "data.seq_len=32", "data.batch_size=8", "data.eval_batches=2", "data.domains=[bible,manpages]",
            "train.pretrain_steps=30", "train.steps=30", "train.log_every=5", "optim.warmup_steps=5",
            "optim.lr=1e-2", "checkpoint.every=4"]),
        "run-semem": ("configs/semem/demo.yaml", [
            "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
            "data.seq_len=64", "data.batch_size=8", "data.eval_batches=2", "data.domains=[bible,wordnet]",
            "train.pretrain_steps=30", "optim.warmup_steps=5", "optim.lr=1e-2", "semem.chunk_tokens=1024",
            "semem.chunks_per_domain=3", "semem.heldout_tokens=256", "semem.eval_tokens=256",
            "semem.calibrator_steps=30", "semem.index_options={segment_rows: 1500}"]),
    }
    # compared between the resumed and the uninterrupted report (wall time and the like differ)
    COMPARED = ("matrix", "summary", "initial_perplexity", "train_tokens", "memory", "models", "baselines")

    def __init__(self, name: str):
        self.name = name
        self.window = 25.0 if name == "run-sequential" else 40.0
        self.reference: dict | None = None

    def command(self, directory: Path) -> list[str]:
        config, overrides = self.CONFIGS[self.name]
        return [sys.executable, "-m", "jaxcl.cli", "run", config, *overrides, f"run.dir={directory}"]

    def _complete(self, directory: Path) -> dict:
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        out = subprocess.run(self.command(directory), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise TrialFailure(f"{self.name}: the resumed run failed: {(out.stdout + out.stderr)[-1500:]}")
        return json.loads((directory / "report.json").read_text())

    def setup(self, directory: Path, seed: int) -> None:
        if self.reference is None:
            ref = directory.parent / f"reference-{self.name}"
            self.reference = json.loads((ref / "report.json").read_text()) if (ref / "report.json").exists() \
                else self._complete(ref)

    def verify(self, directory: Path, start: int, acked: list[int], seed: int) -> int:
        report = self._complete(directory)
        for key in self.COMPARED:
            if key in self.reference and not _close(report.get(key), self.reference[key]):
                raise TrialFailure(f"{self.name}: report[{key!r}] after kill + resume differs from the "
                                   f"uninterrupted run's")
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        keys = [json.dumps({k: r.get(k) for k in ("kind", "stage_index", "step", "domain", "model", "policy",
                                                   "chunk")}, sort_keys=True) for r in records
                if r.get("kind") in ("train", "eval", "semem_chunk")]
        if len(keys) != len(set(keys)):
            raise TrialFailure(f"{self.name}: metrics.jsonl holds duplicated records after the resume")
        return 0


class PrepareScenario(Scenario):
    """`jaxcl prepare` (two worker processes, many small shards) killed at a random moment: whatever the kill
    left, a split that reads as committed holds exactly the reference tokens and document offsets, and the
    next prepare completes the cache (resuming from finished shards) to exactly the reference."""

    name = "prepare"
    window = 12.0             # from the command's start: start-up, then about 5-12 s of tokenizing under contention
    SPLITS = (("scripture", "train"), ("scripture", "valid"), ("man", "train"), ("man", "valid"))

    def __init__(self):
        self.reference: dict | None = None

    @staticmethod
    def _corpus(directory: Path) -> Path:
        from jaxcl.data.corpus import load_text

        src = directory / "src"
        src.mkdir(parents=True)
        bible, man = load_text("bible", "train"), load_text("manpages", "train")
        (src / "scripture.train.txt").write_text(bible * 2)
        (src / "scripture.valid.txt").write_text(load_text("bible", "valid"))
        docs = [d for d in man.split("\n\n\n") if d.strip()]
        (src / "man.train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 2))
        (src / "man.valid.txt").write_text(load_text("manpages", "valid"))
        return src

    def command(self, directory: Path) -> list[str]:
        return [sys.executable, "-m", "jaxcl.cli", "prepare", "configs/demo.yaml", f"data.source={directory / 'src'}",
                f"data.cache={directory / 'cache'}", "data.domains=[scripture,man]",
                "data.prepare_segment_bytes=65536", "data.prepare_processes=2", "--splits", "train,valid"]

    @staticmethod
    def _read(directory: Path) -> dict:
        """{(domain, split): (tokens, document lengths)} of every split that reads as committed."""
        from jaxcl.data.cache import SplitCache, cache_key, split_prefix
        from jaxcl.data.sources import open_source
        from jaxcl.data.tokenizer import load_tokenizer
        from jaxcl.storage import StoreFiles

        tok = load_tokenizer("default")
        key = cache_key(open_source(str(directory / "src")).identity(), tok.fingerprint())
        out = {}
        for d, s in PrepareScenario.SPLITS:
            split = SplitCache.open(StoreFiles(str(directory / "cache")), split_prefix(key, d, s), tok.fingerprint())
            if split is not None:
                out[(d, s)] = (split.read(0, split.tokens), split.document_lengths())
        return out

    def setup(self, directory: Path, seed: int) -> None:
        self._corpus(directory)
        if self.reference is None:
            from jaxcl.data.sources import open_source
            from jaxcl.data.tokenizer import load_tokenizer

            tok, source = load_tokenizer("default"), open_source(str(directory / "src"))
            self.reference = {}
            for d, s in self.SPLITS:
                docs = source.documents(d, s)
                self.reference[(d, s)] = (tok.encode_documents(docs), np.asarray([len(tok.frame(x)) for x in docs]))

    def _check(self, found: dict, when: str) -> None:
        for key, (tokens, lengths) in found.items():
            ref_tokens, ref_lengths = self.reference[key]
            if not (np.array_equal(tokens, ref_tokens) and np.array_equal(lengths, ref_lengths)):
                raise TrialFailure(f"prepare: {when}, committed split {key} differs from the reference tokenization")

    def verify(self, directory: Path, start: int, acked: list[int], seed: int) -> int:
        committed = self._read(directory)
        self._check(committed, "after the kill")
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        out = subprocess.run(self.command(directory), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise TrialFailure(f"prepare: the prepare after the kill failed: {(out.stdout + out.stderr)[-1500:]}")
        complete = self._read(directory)
        if set(complete) != set(self.SPLITS):
            raise TrialFailure(f"prepare: after a full prepare only {sorted(complete)} are committed")
        self._check(complete, "after the resumed prepare")
        return len(committed)


def _close(a, b, rtol: float = 1e-5) -> bool:
    """Equal structure, numbers equal to `rtol` (the runs are deterministic; float formatting aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12
    return a == b


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "datastore-exact": lambda: DatastoreScenario("exact"),
    "datastore-scann": lambda: DatastoreScenario("scann"),
    "orbax-sync": lambda: OrbaxScenario(False),
    "orbax-async": lambda: OrbaxScenario(True),
    "hf-exchange": lambda: HFScenario(True),
    "hf-rename": lambda: HFScenario(False),
    "run-sequential": lambda: RunScenario("run-sequential"),
    "run-semem": lambda: RunScenario("run-semem"),
    "prepare": PrepareScenario,
}


def run_trial(scenario: Scenario, workdir: Path, seed: int, double_crash: bool, rng: np.random.Generator,
              fresh: bool = True) -> Trial:
    """One kill (or two, the second right after recovery) and the verification; never raises."""
    t0 = time.time()
    directory = workdir / scenario.name
    if fresh and directory.exists():
        shutil.rmtree(directory)
    if not directory.exists():
        scenario.setup(directory, seed)
    delay = float(rng.uniform(0, scenario.window))
    start, acked, state, error = 0, [], -1, None
    try:
        command = scenario.command(directory) if hasattr(scenario, "command") else None
        start, acked = run_victim(scenario.name, directory, seed, delay, command=command)
        if double_crash:       # reopen and die again within the first moments of recovery
            early = float(rng.uniform(0, 0.6)) if command is None else float(rng.uniform(3, 10))
            start2, acked2 = run_victim(scenario.name, directory, seed + 1, early, command=command)
            if command is None and start2 < max([start, *acked]):      # a command victim reports no state
                raise TrialFailure(f"{scenario.name}: the second victim reopened at {start2}, "
                                   f"below the committed {max([start, *acked])}")
            start, acked, seed = start2, acked2, seed + 1
        state = scenario.verify(directory, start, acked, seed)
    except TrialFailure as e:
        error = str(e)
    except Exception as e:         # an unreadable store is a failed trial, not a crashed harness
        error = f"{type(e).__name__}: {e}"
    last = max([start, *acked])
    return Trial(scenario.name, seed, double_crash, delay, acked[-3:], state, state > last, time.time() - t0, error)


def run_trials(cases: list[str], trials_per_case: int, workdir: Path, seed: int = 0, contention: int | None = None,
               progress: Callable[[Trial], None] | None = None) -> list[Trial]:
    """`trials_per_case` trials of every case (every third one a double crash), under contention."""
    rng = np.random.default_rng(seed)
    out = []
    with Contention(contention):
        for t in range(trials_per_case):
            for case in cases:
                trial = run_trial(SCENARIOS[case](), workdir, seed * 100_000 + t * 10, t % 3 == 2, rng)
                out.append(trial)
                if progress:
                    progress(trial)
    return out


def summarize(trials: list[Trial]) -> dict:
    """Counts per case: trials, double crashes, kills that found an unacknowledged commit, failures (with their messages)."""
    out = {}
    for t in trials:
        s = out.setdefault(t.case, {"trials": 0, "double_crash": 0, "beyond_ack": 0, "failures": 0,
                                    "errors": [], "seconds": 0.0})
        s["trials"] += 1
        s["double_crash"] += t.double_crash
        s["beyond_ack"] += t.beyond_ack
        s["seconds"] += t.seconds
        if t.error:
            s["failures"] += 1
            s["errors"].append(t.error)
    return out


def to_json(trials: list[Trial]) -> str:
    return json.dumps({"summary": summarize(trials), "trials": [dataclasses.asdict(t) for t in trials]}, indent=1)
