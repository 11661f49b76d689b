"""Mixtures of low-rank weight increments, applied in low-rank form (never materialising a full ΔW).

A *low-rank increment* of a projection `W [d_in, d_out]` is `ΔW = downᵀ up` with `down [r, d_in]` and
`up [r, d_out]` (LoRA: `down` is the input-side "A", `up` the zero-initialised output-side "B"). A
*mixture* of K increments with weights `w` is `ΔW = Σ_k w_k down_kᵀ up_k`, which is what SLM's JARe adds
to the attention output projection; a single LoRA adapter is the special case K = 1, w = 1.

    mix = LowRankMix(down=[G, K, r, d_in], up=[G, K, r, d_out], weights=[G, K])   # G = 1 or batch
    y = x @ W + lowrank_delta(x, mix)          # == x @ (W + Σ_k w_k down_kᵀ up_k)

`G = 1` shares one mixture across the batch (SLM's batch-level retrieval); `G = batch` gives every
example its own mixture (per-example retrieval). The cost is O(tokens · K · r · (d_in + d_out)).

Every `Dense` in `jaxcl.models.layers` accepts an optional `LowRankMix`, and the models take
`adapters={"attn.o": mix_with_layers_axis, ...}` whose leaves carry a leading `layers` axis, so any
method (SLM, plain LoRA, ...) can add increments to any projection of any family without touching the
model code.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import struct

# The projections an adapter may target: "<sub-layer>.<projection>" as named in the parameter tree.
TARGET_MODULES: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.wi", "mlp.wg", "mlp.wo")


@struct.dataclass
class LowRankMix:
    """K low-rank increments and their mixing weights for one projection (optionally per layer).

    down:    [..., G, K, r, d_in]   input-side factors
    up:      [..., G, K, r, d_out]  output-side factors
    weights: [..., G, K]            mixing weights (G = 1: shared by the batch; G = batch: per example)
    Leading `...` is empty for one projection and `[layers]` for the stacked model input.
    """

    down: jax.Array
    up: jax.Array
    weights: jax.Array


def lowrank_delta(x: jax.Array, mix: LowRankMix, n_in: int = 1, out_shape: tuple[int, ...] | None = None) -> jax.Array:
    """`x · Σ_k w_k down_kᵀ up_k` for `x [batch, ..., *in_dims]`, computed through the rank-r factors.

    `n_in` trailing dims of `x` are the (flattened) input features; `out_shape` reshapes the output
    features (default: flat `d_out`). Computed in float32 and returned in `x.dtype`.
    """
    g, k, r, d_in = mix.down.shape
    d_out = mix.up.shape[-1]
    if math.prod(x.shape[x.ndim - n_in:]) != d_in:
        raise ValueError(f"low-rank increment expects {d_in} input features, got input shape {tuple(x.shape)} "
                         f"(last {n_in} dim(s))")
    if mix.weights.shape != (g, k) or mix.up.shape[:3] != (g, k, r):
        raise ValueError(f"inconsistent LowRankMix shapes: down {mix.down.shape}, up {mix.up.shape}, "
                         f"weights {mix.weights.shape}")
    batch = x.shape[0]
    if g not in (1, batch):
        raise ValueError(f"LowRankMix has {g} mixtures for a batch of {batch} (must be 1 or the batch size)")
    lead = x.shape[:x.ndim - n_in]
    xf = x.reshape(batch, -1, d_in).astype(jnp.float32)                          # [b, t, d_in]
    down = mix.down.astype(jnp.float32)
    up = mix.up.astype(jnp.float32) * mix.weights.astype(jnp.float32)[..., None, None]   # fold w_k into up
    if g == 1:
        z = jnp.einsum("bti,kri->btkr", xf, down[0])                             # [b, t, K, r]
        delta = jnp.einsum("btkr,kro->bto", z, up[0])                            # [b, t, d_out]
    else:
        z = jnp.einsum("bti,bkri->btkr", xf, down)
        delta = jnp.einsum("btkr,bkro->bto", z, up)
    return delta.reshape(lead + (tuple(out_shape) if out_shape is not None else (d_out,))).astype(x.dtype)


def materialize_delta(mix: LowRankMix) -> jax.Array:
    """The explicit `Σ_k w_k down_kᵀ up_k` `[G, d_in, d_out]` (reference and debugging only: O(d²))."""
    return jnp.einsum("gk,gkri,gkro->gio", mix.weights, mix.down, mix.up)


def gather_mix(down_bank: jax.Array, up_bank: jax.Array, slots: jax.Array, weights: jax.Array) -> LowRankMix:
    """Select K slots of a stacked increment bank and pair them with their mixing weights.

    down_bank [layers, P, r, d_in], up_bank [layers, P, r, d_out], slots int [G, K], weights [G, K]
    -> LowRankMix with leaves [layers, G, K, ...] (the `adapters` input of the models, scanned over layers).
    """
    if slots.shape != weights.shape or slots.ndim != 2:
        raise ValueError(f"slots and weights must both be [G, K], got {tuple(slots.shape)} and {tuple(weights.shape)}")
    n_layers = down_bank.shape[0]
    return LowRankMix(down=jnp.take(down_bank, slots, axis=1),              # [L, G, K, r, d_in]
                      up=jnp.take(up_bank, slots, axis=1),                  # [L, G, K, r, d_out]
                      weights=jnp.broadcast_to(weights, (n_layers,) + weights.shape))


def check_adapters(adapters: Mapping[str, LowRankMix] | None) -> None:
    """Fail early, naming the key, on adapter targets the models do not have."""
    for name in adapters or {}:
        if name not in TARGET_MODULES:
            raise ValueError(f"unknown adapter target {name!r}; choose from {', '.join(TARGET_MODULES)}")


__all__ = ["LowRankMix", "TARGET_MODULES", "lowrank_delta", "materialize_delta", "gather_mix", "check_adapters"]
