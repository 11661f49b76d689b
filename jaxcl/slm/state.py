"""What a finished SLM run keeps for `jaxcl export`: its JARe bank, DTKR keys and each task's fixed mixture.

    save_state(run_dir, bank=..., keys=..., tensors={...}, info={...})     # both modes, before report.json
    tensors, info = load_state(run_dir)

`slm_state.safetensors` holds `bank/<target>/down|up` [L, P, r, d], `keys/keys`, `keys/slot_task`, the task
statistics `keys/task_mean|task_count|scatter|precision` when the bank keeps them, and any
mode-specific tensors (classification: `head/kernel`, `head/bias`); `slm_state.json` holds the backbone's
source, its model config, the tokenizer, and per task its slots with one fixed mixing weight each
(`task_mixture`) plus mode-specific fields. Both files are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxcl.slm import dtkr

__all__ = ["STATE_JSON", "STATE_TENSORS", "WEIGHTS_NOTE", "task_mixture", "save_state", "load_state"]

STATE_TENSORS = "slm_state.safetensors"
STATE_JSON = "slm_state.json"
WEIGHTS_NOTE = ("mean DTKR retrieval weight per slot (top-K over the task's own keys, as in training) over the "
                "task's validation queries; slots outside a query's top-K count 0")


def task_mixture(keys: dtkr.KeyBank, task: int, queries: np.ndarray, top_k: int) -> dict[str, list]:
    """Task `task`'s own slots and one fixed weight per slot: the mean retrieval weight (top-K among the task's
    keys) over `queries` [n, dim]. The weights of a query sum to 1, so their mean does too."""
    owned = keys.task_slots(task)
    allowed = jnp.asarray(np.asarray(keys.slot_task) == task)
    slots, weights = dtkr.retrieve(jnp.asarray(queries), keys.keys, allowed, top_k, True)
    dense = np.zeros(keys.max_slots, np.float64)
    np.add.at(dense, np.asarray(slots).ravel(), np.asarray(weights, np.float64).ravel())
    dense /= max(len(np.asarray(slots)), 1)
    return {"slots": [int(p) for p in owned], "weights": [float(dense[p]) for p in owned]}


def save_state(run_dir: str | Path, *, bank: dict[str, Any], keys: dtkr.KeyBank, info: dict[str, Any],
               tensors: dict[str, Any] | None = None) -> None:
    """Write `slm_state.safetensors` and `slm_state.json` (atomically; the caller writes report.json after)."""
    from safetensors.numpy import save

    from jaxcl.rundir import atomic_write

    out = {f"bank/{t}/{f}": np.asarray(v) for t, factors in bank.items() for f, v in factors.items()}
    out |= {"keys/keys": np.asarray(keys.keys), "keys/slot_task": np.asarray(keys.slot_task)}
    if keys.has_statistics:       # task_choice="gaussian" reads them
        out |= {f"keys/{f}": np.asarray(getattr(keys, f)) for f in keys.STATISTICS}
    out |= {k: np.asarray(v) for k, v in (tensors or {}).items()}
    atomic_write(Path(run_dir) / STATE_TENSORS, save(out))
    atomic_write(Path(run_dir) / STATE_JSON, json.dumps({**info, "weights": WEIGHTS_NOTE}, indent=2))


def load_state(run_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, info) of a finished SLM run; FileNotFoundError when it has none."""
    from safetensors.numpy import load_file

    run_dir = Path(run_dir)
    if not (run_dir / STATE_JSON).is_file() or not (run_dir / STATE_TENSORS).is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no {STATE_JSON}: the SLM run has not finished")
    return load_file(run_dir / STATE_TENSORS), json.loads((run_dir / STATE_JSON).read_text())
