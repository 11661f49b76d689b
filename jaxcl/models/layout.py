"""The two layouts of a model's layer parameters, and the pure transforms between them.

- **stacked** (`params["layers"]`, every leaf with a leading `[n_layers]` axis): the `nn.scan` layout that
  jaxcl trains, checkpoints, grows, exports and shards (logical axis `layers`). One compiled layer body,
  whatever the depth.
- **per layer** (`params["layers_0"]` … `params["layers_{L-1}"]`, the same leaves without the leading axis):
  an unrolled layer loop (`build(cfg, scan_layers=False)`, MaxText's `scan_layers=False`). Decoding uses it:
  inside a scanned loop every layer's weights are sliced out of the stack, and on CPU that slice is a copy
  of every weight for every token (measured: a 12-layer GPT-2-small-shaped MLP stack reads its weights
  1.6x slower through `lax.scan` than from per-layer buffers); an unrolled loop's matmuls read the weight
  buffers directly.

    per_layer = unstack_layers(params)          # one copy of the layer weights
    stack_layers(per_layer) == params           # exact inverse
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["unstack_layers", "stack_layers", "is_unstacked"]

_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def is_unstacked(params: Any) -> bool:
    """True for the per-layer layout (`layers_0`, ...), False for the stacked one (`layers`)."""
    return "layers" not in params and any(_LAYER_KEY.match(k) for k in params)


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Stacked -> per layer: `params["layers"]` (leaves `[L, ...]`) becomes `layers_0` … `layers_{L-1}`;
    every other entry is unchanged (shared, not copied). Per-layer params pass through unchanged.

    Errors: `ValueError` when the tree has neither layout or its layer leaves disagree on `L`."""
    if is_unstacked(params):
        return params
    if "layers" not in params:
        raise ValueError(f"parameters have no 'layers' entry (keys: {sorted(params)}): not a jaxcl model tree")
    stacked = params["layers"]
    counts = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    if len(counts) != 1:
        raise ValueError(f"layer parameters disagree on the number of layers: leading sizes {sorted(counts)}")
    n = counts.pop()
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Per layer -> stacked (the inverse of `unstack_layers`). Stacked params pass through unchanged.

    Errors: `ValueError` when the layer indices are not 0..L-1 or the layers' trees differ in structure."""
    if not is_unstacked(params):
        return params
    indices = sorted(int(m.group(1)) for k in params if (m := _LAYER_KEY.match(k)))
    if indices != list(range(len(indices))):
        raise ValueError(f"per-layer parameters must be layers_0 .. layers_{{L-1}}, got indices {indices}")
    layers = [params[f"layers_{i}"] for i in indices]
    structure = jax.tree.structure(layers[0])
    for i, layer in enumerate(layers):
        if jax.tree.structure(layer) != structure:
            raise ValueError(f"layers_{i} has a different parameter structure than layers_0")
    out = {k: v for k, v in params.items() if not _LAYER_KEY.match(k)}
    out["layers"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
    return out
