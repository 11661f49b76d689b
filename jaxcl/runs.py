"""Which runner a `run.method` names.

The registry maps a method name to "module:Class" and imports lazily, so `jaxcl.train` never imports
the method packages (the dependency direction is cli -> elle|memory|slm -> train). Every runner takes a
`Config` and its `.run()` returns the report dict it also writes to `report.json`.
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxcl.config import Config
from jaxcl.models.config import ConfigError

RUNNERS: dict[str, str] = {
    "sequential": "jaxcl.train.loop:ContinualRun",
    "joint": "jaxcl.train.loop:JointRun",
    "elle": "jaxcl.elle.run:ElleRun",
    "semem": "jaxcl.memory.run:SememRun",
    "slm": "jaxcl.slm.run:SlmRun",
}


def runner_class(method: str) -> type:
    """Import the runner class for `method`; an unknown name is a config error naming the key."""
    if method not in RUNNERS:
        raise ConfigError(f"run.method={method!r} is not available (available: {', '.join(RUNNERS)})")
    module, _, name = RUNNERS[method].partition(":")
    return getattr(importlib.import_module(module), name)


def run_config(cfg: Config) -> dict[str, Any]:
    """Run the job `cfg.run.method` names and return its report.

    A first invocation (the run directory was missing or empty) that stops on bad input (`InputError`, e.g.
    a damaged `model.init_from` checkpoint found after the run began) before its first durable commit leaves
    the directory as it found it (`jaxcl.rundir.discard_unstarted`): correcting the command and running it
    again is then a new run, not a refused "changed" one. Any other failure (a bug, Ctrl-C) keeps what it
    wrote, for the user to look at.
    """
    from pathlib import Path

    from jaxcl import rundir
    from jaxcl.errors import InputError

    runner = runner_class(cfg.run.method)(cfg)
    run_dir = Path(getattr(runner, "run_dir", cfg.run_dir()))      # a joint run writes runs/<name>-joint
    new, existed = rundir.is_new(run_dir), run_dir.exists()
    try:
        return runner.run()
    except InputError:
        if new:
            try:
                rundir.discard_unstarted(run_dir, remove_directory=not existed)
            except OSError:           # cleaning up must never hide the error that stopped the run
                pass
        raise


__all__ = ["RUNNERS", "run_config", "runner_class"]
