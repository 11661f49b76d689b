"""Pieces the strategies share: private copies of params-shaped trees, the batches of a finished stage."""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np


def private_copy(tree: Any, shardings: Any) -> Any:
    """A copy of `tree` on `shardings` that shares no buffer with it: a mirror must survive the train
    step donating the state it was taken from."""
    return jax.device_put(tree, shardings, may_alias=False)


def stage_batches(run: Any, stage: int, model_cfg: Any, n: int) -> Iterator[dict[str, np.ndarray]]:
    """The first `n` global batches of `stage`'s training stream (a fresh copy of the stream, so the run's
    own position is untouched), with what the model needs to know about the domain (its prompt)."""
    name = run.stages[stage]
    stream = run.make_stream(stage, name)
    for _ in range(n):
        yield run.domain_batch(name, stream.next_batch(), model_cfg)


__all__ = ["private_copy", "stage_batches"]
