"""Pieces the strategies share: private copies of params-shaped trees."""

from __future__ import annotations

from typing import Any

import jax


def private_copy(tree: Any, shardings: Any) -> Any:
    """A copy of `tree` on `shardings` that shares no buffer with it: a mirror must survive the train
    step donating the state it was taken from."""
    return jax.device_put(tree, shardings, may_alias=False)


__all__ = ["private_copy"]
