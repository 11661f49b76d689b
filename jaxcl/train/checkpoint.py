"""Orbax checkpoints behind one small wrapper: sharded state + JSON metadata, keep-N, async,
resume from the latest step onto whatever mesh the restoring run uses, preemption-aware."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxcl.config import CheckpointConfig
from jaxcl.errors import CheckpointError, reading, root_message
from jaxcl.train.state import TrainState

log = logging.getLogger(__name__)


def _reading(directory: str | Path, step: int):
    """Any failure while reading checkpoint `step` of `directory` (a truncated or deleted array file, damaged
    metadata: orbax and tensorstore raise many types, the file named several causes deep) as one
    CheckpointError that names the checkpoint and that file."""
    return reading(f"checkpoint {str(Path(directory) / str(step))!r}",
                   "the checkpoint is damaged; restore it from a copy, or resume/start from another step or run")


def abstract_like(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the *current* mesh's shardings: the restore target (resharding)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


# Files each item writes last; a step without them was published before its items were (seen with
# async saves killed by SIGKILL: orbax renamed the step while "meta" was still missing).
ITEM_MARKERS = {"state": "_METADATA", "meta": "metadata"}


def step_complete(directory: str | Path, step: int) -> bool:
    """Whether checkpoint `step` under `directory` holds every item (state and meta)."""
    root = Path(directory) / str(step)
    return all((root / item / marker).is_file() for item, marker in ITEM_MARKERS.items())


def complete_steps(directory: str | Path) -> list[int]:
    """The complete checkpoint steps in `directory`, ascending, read from the file system (no orbax manager:
    cheap enough for config resolution and tools that only look)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(s for s in steps if step_complete(directory, s))


def read_meta(directory: str | Path, step: int) -> dict[str, Any]:
    """The JSON metadata of checkpoint `step` (what `Checkpointer.save` stored beside the state)."""
    path = Path(directory) / str(step) / "meta" / ITEM_MARKERS["meta"]
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {str(path)!r} cannot be read: {root_message(e)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata {str(path)!r} is not a JSON object")
    return meta


def restore_params(directory: str | Path, step: int, shapes: Any, shardings: Any) -> Any:
    """Only the `params` of the TrainState saved at `step`, each leaf restored onto its sharding (an orbax
    partial restore: the optimizer moments are never read). `shapes`: abstract params (ShapeDtypeStructs)."""
    target = {"params": abstract_like(shapes, shardings)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    manager = ocp.CheckpointManager(Path(directory).absolute(),
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        with _reading(directory, step):
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
    finally:
        manager.close()
    return out["state"]["params"]


def _saved_tree(state: Any) -> Any:
    """What is written for `state`: a TrainState as the dict of its fields, without `strategy` when no strategy
    keeps device state (so checkpoints of runs without strategies keep the layout they always had)."""
    if not isinstance(state, TrainState):
        return state
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if state.strategy:
        tree["strategy"] = state.strategy
    return tree


class Checkpointer:
    """`save(step, state, meta)` / `restore(step, abstract_state)`; steps are global and increasing.

    Retention keeps the latest `cfg.keep` steps plus every step in `keep_steps` (the runs pass their
    stage ends, so `model.init_from=RUN@stageN` and `jaxcl export --stage N` always find them).
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig(), *,
                 keep_steps: tuple[int, ...] = ()):
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

        self.directory = Path(directory).absolute()
        policy = pp.AnyPreservationPolicy([pp.LatestN(cfg.keep)] + ([pp.CustomSteps(list(keep_steps))]
                                                                      if keep_steps else []))
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._drop_incomplete()

    ITEM_MARKERS = ITEM_MARKERS

    def _complete(self, step: int) -> bool:
        return step_complete(self.directory, step)

    def _drop_incomplete(self) -> None:
        """Delete steps that orbax lists but that miss an item (a kill during an async save), so that
        `latest_step` is always a step that restores; process 0 deletes, every process skips them."""
        bad = [s for s in self.manager.all_steps() if not self._complete(s)]
        if not bad:
            return
        log.warning("checkpoints %s in %s are incomplete (killed while saving): %s", bad, self.directory,
                    "deleting them" if jax.process_index() == 0 else "ignoring them")
        if jax.process_index() == 0:
            for step in bad:
                shutil.rmtree(self.directory / str(step), ignore_errors=True)
        self.manager.reload()

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Steps that hold every item, ascending."""
        return sorted(s for s in self.manager.all_steps() if self._complete(s))

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = True) -> bool:
        """Save (asynchronously when configured); `meta` must be JSON-serialisable.

        `meta` is snapshotted now: the async writer serialises it later, after the caller may have
        changed the lists inside it.
        """
        meta = json.loads(json.dumps(meta))
        saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_saved_tree(state)),
                                                                meta=ocp.args.JsonSave(meta)), force=force)
        if saved:
            log.info("checkpoint %d -> %s", step, self.directory)
        return saved

    def restore_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata saved with `step` (CheckpointError naming the file if it cannot be read)."""
        with _reading(self.directory, step):
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint metadata {str(self.directory / str(step) / 'meta')!r} is not a JSON "
                                  "object")
        return meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """State placed on the shardings in `abstract_state` (may differ from the saving mesh), and meta."""
        with _reading(self.directory, step):
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_saved_tree(abstract_state)), meta=ocp.args.JsonRestore()))
        state = out["state"]
        if isinstance(abstract_state, TrainState):
            state = TrainState(**state) if "strategy" in state else TrainState(**state, strategy={})
        return state, out["meta"]

    def reached_preemption(self, step: int) -> bool:
        """True when the TPU runtime announced a preemption (all hosts agree on the step)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
