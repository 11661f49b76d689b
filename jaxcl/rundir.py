"""The run directory contract every runner shares: it always describes the model that was trained.

    finished = rundir.begin(run_dir, cfg, method)     # before anything is written
    if finished is not None:
        return finished                               # a finished run: nothing was changed

- **Compatibility.** `config.yaml` is written once, by the first invocation, and never rewritten: it is
  the record of what the run trains. A later invocation whose config differs from it in a key that
  changes what is trained is refused before anything is written, with one line naming the changed
  dotted keys. Keys that do not change what is trained may differ (`HARMLESS_KEYS`, one place, each
  with its reason), and so may the config sections the runner never reads (`UNUSED_SECTIONS`).
- **Finished runs.** `report.json` is the last file a runner writes (its commit point): a rerun of a
  run that has one says so and returns it, changing no file.
- **Accounting.** `Invocations` records the wall-clock time of each invocation up to its last durable
  commit (a checkpoint, a stream state, the report); a resumed run's report sums them, so work redone
  after a kill is counted once and work kept from an interrupted invocation is not lost.
- **metrics.jsonl** (`MetricsFile`): a commit records the file's byte offset and a resume truncates back
  to it, so the records a killed invocation wrote after its last commit are redone once, not duplicated.
- **Atomic small files** (`atomic_write`, on `jaxcl.atomic_io`): a kill at any moment leaves the old or
  the new version of report.json / config.yaml / a state file.

This module sits at the bottom of the package (it imports only `jaxcl.config` and `jaxcl.atomic_io`),
so every runner can use it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from jaxcl.atomic_io import atomic_write_file, check_parents
from jaxcl.config import Config, ConfigError, config_from_dict, config_to_dict, save_config, yaml_error
from jaxcl.errors import OutputError, RunDirError

log = logging.getLogger(__name__)

__all__ = ["HARMLESS_KEYS", "UNUSED_SECTIONS", "CONFIG_FILE", "REPORT_FILE", "atomic_write", "begin",
           "changed_keys", "normalized_config", "incompatible_keys", "check_compatible", "recorded_config",
           "check_run_directory", "read_report", "is_new", "discard_unstarted", "Invocations", "MetricsFile", "RUN_FILES"]

CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.json"

# Dotted keys (or whole sections) that may differ between the invocations of one run, and why each does
# not change what is trained. Everything not listed here (and not in an unused section) must match.
HARMLESS_KEYS: dict[str, str] = {
    "run.name": "names the run directory; the directory being resumed is already chosen",
    "run.dir": "where the run lives, not what it trains",
    "train.log_every": "how often the training loss is logged; the updates are the same",
    "train.eval_every": "extra evaluations between stage ends only read the parameters",
    "checkpoint.every": "when checkpoints are written; a run resumes exactly from any of them",
    "checkpoint.keep": "how many old checkpoints stay on disk",
    "checkpoint.async_save": "whether saving overlaps training; the saved state is the same",
    "checkpoint.resume": "whether this invocation may continue the run: a property of the invocation",
    "mesh": "how the same arrays are laid out on devices; checkpoints restore onto any mesh",
    "downstream": "end-task fine-tuning settings: read by `jaxcl downstream` after training, never by a run",
    "slm.cache_dir": "a cache of encoder queries, a pure function of the texts and the encoder",
    "data.cache": "where the token cache lives; its tokens are a pure function of the source and the tokenizer",
    "data.prepare_processes": "how many processes tokenize a missing cache; the tokens are the same",
    "data.prepare_segment_bytes": "how files are cut for parallel preparation; the token stream is the same",
}

# Config sections a runner never reads (by `run.method`): they cannot change what it trains.
UNUSED_SECTIONS: dict[str, tuple[str, ...]] = {
    "sequential": ("elle", "semem", "slm"),
    "joint": ("elle", "semem", "slm"),
    "elle": ("semem", "slm"),
    "semem": ("elle", "slm", "strategies"),
    "slm": ("elle", "semem"),
}


# ----------------------------------------------------------------------------- atomic small files
def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text is UTF-8 encoded) so that a kill at any moment leaves the old or the new version
    (`jaxcl.atomic_io.atomic_write_file`: temporary + fsync + rename + directory fsync)."""
    atomic_write_file(path, data.encode() if isinstance(data, str) else bytes(data))
    return Path(path)


# ----------------------------------------------------------------------------- config compatibility
def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def normalized_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A recorded config tree (a run's config.yaml as read) with defaults filled in and values in the types
    this jaxcl reads them as, so it compares key by key with `config_to_dict(cfg)`; as is if it no longer loads."""
    try:
        return config_to_dict(config_from_dict(tree))
    except ConfigError:
        return tree


def _is_harmless(key: str, method: str) -> bool:
    if key.split(".", 1)[0] in UNUSED_SECTIONS.get(method, ()):
        return True
    return any(key == h or key.startswith(h + ".") for h in HARMLESS_KEYS)


# Methods whose runner reads `strategies.<name>` only for the strategies in `run.strategies` (SLM's path also
# reads the sections of its `slm.baselines` rows, so there every section counts).
STRATEGY_READERS = ("sequential", "joint", "elle")


def _unread_strategy(key: str, method: str, active: set[str]) -> bool:
    """Whether `key` is the knob of a strategy this run does not use (`strategies.ewc.strength` on a run
    without EWC): the section is never read, so it cannot change what is trained."""
    parts = key.split(".")
    if method not in STRATEGY_READERS or parts[0] != "strategies" or len(parts) < 2:
        return False
    name = parts[2] if parts[1] == "options" and len(parts) > 2 else parts[1]
    return name != "options" and name not in active


def incompatible_keys(recorded: dict[str, Any], cfg: Config, method: str) -> list[str]:
    """The dotted keys in which `cfg` changes what the run recorded in `recorded` trains: every changed key
    but the harmless ones (`HARMLESS_KEYS`), the sections `method` never reads (`UNUSED_SECTIONS`) and, on
    the LM loops, the knobs of strategies neither config turns on (`run.strategies`)."""
    old = normalized_config(recorded)
    active = set(cfg.run.strategies) | set((old.get("run") or {}).get("strategies") or ())
    return [k for k in changed_keys(old, config_to_dict(cfg))
            if not _is_harmless(k, method) and not _unread_strategy(k, method, active)]


def check_compatible(recorded: dict[str, Any] | None, cfg: Config, method: str, where: str | Path) -> None:
    """Refuse (ConfigError, one line) when `cfg` would change what the run in `where` trains."""
    if recorded is None:
        return
    changed = incompatible_keys(recorded, cfg, method)
    if not changed:
        return
    ways = ("nothing was changed; to train this config start a new run (run.name=NEW or run.dir=NEW_DIR), "
            "or train from scratch with checkpoint.resume=false into an empty run.dir")
    old_method = (recorded.get("run") or {}).get("method")
    if "run.method" in changed:
        raise ConfigError(f"{where} holds a {old_method} run, not a {cfg.run.method} run "
                          f"(changed: {', '.join(changed)}): {ways}")
    raise ConfigError(f"{where} holds a run whose config differs in what is trained "
                      f"(changed: {', '.join(changed)}): {ways}")


def recorded_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The config a run directory records (its config.yaml), or None if it has none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunDirError(f"{yaml_error(path, e)}: the run's config.yaml is not readable YAML, so this run directory "
                          "cannot be checked; use another run.name / run.dir") from None
    if not isinstance(tree, dict):
        raise RunDirError(f"{path} does not hold a jaxcl run config (a YAML mapping): this run directory cannot "
                          "be checked; use another run.name / run.dir")
    return tree


# Names a jaxcl run directory holds (any one marks a directory that jaxcl wrote), and which are directories.
RUN_FILES = (CONFIG_FILE, REPORT_FILE, "checkpoints", "metrics.jsonl", "eval.json")
RUN_ENTRY_KINDS = {CONFIG_FILE: False, REPORT_FILE: False, "checkpoints": True, "metrics.jsonl": False,
                   "eval.json": False, "tensorboard": True}


def check_run_directory(run_dir: str | Path, key: str = "run.dir") -> None:
    """Refuse (OutputError, nothing touched) a run directory that jaxcl must not write into: a path that is
    a file, or a non-empty directory that holds none of a run's files (`RUN_FILES`), e.g. a home directory
    given as run.dir by mistake. A missing or empty directory (hidden files and `*.log` / `*.out` / `*.err`
    a launcher wrote aside), or an earlier run's, is fine."""
    run_dir = Path(run_dir)
    check_parents(run_dir, key)
    if run_dir.is_symlink() and not run_dir.exists():
        raise OutputError(f"{key}={str(run_dir)!r} is a symbolic link to nothing ({os.readlink(run_dir)!r}): point "
                          "it at a directory, or choose another run.name / run.dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"{key}={str(run_dir)!r} is a file, not a run directory: choose another run.name / "
                          "run.dir (the file was not touched)")
    if not run_dir.is_dir():
        return
    for name, want_dir in RUN_ENTRY_KINDS.items():
        path = run_dir / name
        if (path.exists() or path.is_symlink()) and path.is_dir() != want_dir:
            raise RunDirError(f"{str(path)!r} is {'not ' if want_dir else ''}a directory, but a run keeps its "
                              f"{name} there as {'a directory' if want_dir else 'a file'}: move it aside, or "
                              "choose another run.name / run.dir (nothing was written)")
    held = sorted(p.name for p in run_dir.iterdir() if not _beside_a_run(p.name))
    if held and not any((run_dir / name).exists() for name in RUN_FILES):
        raise OutputError(f"{key}={str(run_dir)!r} holds files that are not a jaxcl run's ({', '.join(held[:5])}"
                          f"{' ...' if len(held) > 5 else ''}): give a new or empty directory (nothing was written)")


def _beside_a_run(name: str) -> bool:
    """Files a launcher puts into a run directory before jaxcl starts (a shell's `> run/train.log`, Slurm's
    `--output`, hidden files): jaxcl writes none of these names, so they never stop a first run."""
    return name.startswith(".") or name.endswith((".log", ".out", ".err"))


def read_report(path: str | Path) -> dict[str, Any]:
    """A run's report.json; RunDirError naming it when it is not a JSON object."""
    path = Path(path)
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} cannot be read as a run report ({' '.join(str(e).split())}): the run "
                          "directory is damaged; move report.json aside to resume the run, or use another "
                          "run.name / run.dir") from None
    if not isinstance(report, dict):
        raise RunDirError(f"{path} is not a run report (a JSON object): move it aside to resume the run, or use "
                          "another run.name / run.dir")
    return report


def _process_index() -> int:
    import jax
    return jax.process_index()


def begin(run_dir: str | Path, cfg: Config, method: str, *,
          recorded: Callable[[], dict[str, Any] | None] | None = None, announce: bool = True) -> dict[str, Any] | None:
    """Check the run directory before an invocation writes anything into it.

    Returns the finished run's report (after saying so; nothing is changed) or None: go on, the run
    directory exists and holds the config.yaml that describes the run. Raises ConfigError when this
    config would change what the run trains, or when checkpoint.resume=false meets a non-empty directory.
    `recorded`: where else the run records its config when config.yaml is missing (e.g. checkpoint meta).
    """
    run_dir = Path(run_dir)
    check_run_directory(run_dir)
    if not cfg.checkpoint.resume:
        held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        if held:
            raise ConfigError(f"checkpoint.resume=false but {run_dir} already holds {', '.join(held[:8])}"
                              f"{' ...' if len(held) > 8 else ''}: a run from scratch needs an empty run.dir; "
                              "choose another run.name / run.dir (nothing was changed)")
    else:
        record = recorded_config(run_dir)
        if record is None and recorded is not None:
            record = recorded()
        check_compatible(record, cfg, method, run_dir)
        report_path = run_dir / REPORT_FILE
        if report_path.is_file():
            report = read_report(report_path)
            message = (f"{run_dir} holds a finished run: its report is {report_path} (nothing was changed; to "
                       "train again use a new run.name / run.dir)")
            if announce and _process_index() == 0:
                print(message, flush=True)
            log.info("%s", message)
            return report
    import jax

    if jax.process_count() > 1:        # every process has checked the directory before any writes to it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxcl.rundir.begin")
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0 and not (run_dir / CONFIG_FILE).exists():
        save_config(cfg, run_dir / CONFIG_FILE)        # once: it describes what this run trains
    return None


# ----------------------------------------------------------------------------- a first invocation that fails
# What an invocation writes before its first durable commit; nothing in them is worth keeping on their own.
EPHEMERAL = (CONFIG_FILE, "metrics.jsonl", "tensorboard", "checkpoints")


def is_new(run_dir: str | Path) -> bool:
    """Whether `run_dir` is missing or empty: a run that has not begun."""
    run_dir = Path(run_dir)
    return not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir()))


def discard_unstarted(run_dir: str | Path, *, remove_directory: bool = True) -> bool:
    """Remove what a first invocation wrote into `run_dir` when it failed before its first durable commit, so
    that the corrected command may use the same run.dir (config.yaml would otherwise record the failed
    config, and the corrected one would be refused as "differs in what is trained").

    Only the files a run writes before committing anything (`EPHEMERAL`; a `checkpoints/` without a
    complete step) are removed, and only when nothing else is there; the caller guarantees that the
    directory was new when the invocation began (`is_new`), and passes `remove_directory=False` when it
    existed (empty) before: the user's directory itself stays. Process 0 only. Returns whether it removed.
    """
    from jaxcl.train.checkpoint import complete_steps

    run_dir = Path(run_dir)
    if _process_index() != 0 or not run_dir.is_dir():
        return False
    held = {p.name for p in run_dir.iterdir()}
    if not held <= set(EPHEMERAL) or complete_steps(run_dir / "checkpoints"):
        return False
    for key in [k for k in _EVENT_LOGS if k.parent == run_dir.absolute()]:
        _EVENT_LOGS.pop(key).close()
    for name in held:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if remove_directory:
        run_dir.rmdir()
    log.info("%s: the first invocation failed before its first commit; removed what it had written", run_dir)
    return True


# ----------------------------------------------------------------------------- accounting
class Invocations:
    """Per-invocation accounting of one run, summed in its report.

    A run's durable state (checkpoint meta, a stream state file) stores `record(...)`: the records of the
    earlier invocations it was resumed from plus this invocation's, measured up to that commit. Work a
    killed invocation did after its last commit is not counted (it is redone, and counted, by the next).
    """

    def __init__(self, previous: list[dict[str, Any]] | None = None, *, start: float | None = None):
        self.start = time.time() if start is None else start
        self.previous = [dict(r) for r in previous or []]

    def record(self, **extra: Any) -> list[dict[str, Any]]:
        return self.previous + [{"wall_seconds": time.time() - self.start, **extra}]

    @staticmethod
    def total(records: list[dict[str, Any]], key: str = "wall_seconds") -> float:
        return float(sum(r.get(key, 0.0) for r in records))


# ----------------------------------------------------------------------------- metrics.jsonl
_EVENT_LOGS: dict[Path, Any] = {}


def _events(metrics_path: Path):
    """The TensorBoard log beside `metrics_path` (one writer per run directory in this process)."""
    from jaxcl.eval.tensorboard import EVENTS_DIR, TensorBoardLog

    key = metrics_path.absolute()
    if key not in _EVENT_LOGS:
        _EVENT_LOGS[key] = TensorBoardLog(key.parent / EVENTS_DIR)
    return _EVENT_LOGS[key]


class MetricsFile:
    """Append-only metrics.jsonl written by process 0; `offset()` is what a commit records and
    `truncate(offset)` is how a resume drops the records written after that commit.

    Every record also goes to TensorBoard event files in `tensorboard/` beside it (`jaxcl.eval.tensorboard`);
    a truncation rebuilds them from the records that remain, so both always show the same history."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, **record: Any) -> None:
        if _process_index() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            _events(self.path).write(record)

    def offset(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def truncate(self, offset: int | None) -> None:
        """Drop everything after byte `offset` (None: keep the file as it is)."""
        if offset is None or _process_index() != 0:
            return
        if self.path.exists() and self.offset() > offset:
            with self.path.open("r+b") as f:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] \
            if self.path.exists() else []
        _events(self.path).rebuild(records)
