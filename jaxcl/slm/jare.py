"""JARe: a preallocated bank of per-slot low-rank increments, mixed by retrieval weights in the forward.

    bank = init_increment_bank(rng, model_cfg, max_slots=32, rank=8, targets=("attn.o",))
    adapters = mix_adapters(bank, slots, weights)          # slots/weights [G, K] from DTKR
    out = build(model_cfg).apply({"params": params}, ids, mask, adapters=adapters)

Every target projection gets `down [layers, P, r, d_in]` (random, input side) and `up [layers, P, r,
d_out]` (zero, output side), so a fresh slot adds nothing. Slots are preallocated: adding a task only
writes new values into its slot range, shapes never change, and the jitted forward never recompiles.
The bank carries the logical axes `layers, slots, lora_rank`, so a mesh rule for `slots` shards it.

Freezing is done on *updates*: `masked_apply` keeps every entry outside the trainable mask exactly
(bit-identical) equal to its old value, whatever the optimizer (AdamW's weight decay included) did.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxcl.models import ModelConfig
from jaxcl.models.lowrank import TARGET_MODULES, LowRankMix, gather_mix

BANK_AXES = ("layers", "slots", "lora_rank", None)     # logical axes of every down / up factor


def target_dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(d_in, d_out) of a target projection, flattened the way `jaxcl.models.lowrank` sees it."""
    attn_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    dims = {"attn.q": (cfg.d_model, attn_width), "attn.k": (cfg.d_model, kv_width), "attn.v": (cfg.d_model, kv_width),
            "attn.o": (attn_width, cfg.d_model), "mlp.wi": (cfg.d_model, cfg.d_ff), "mlp.wg": (cfg.d_model, cfg.d_ff),
            "mlp.wo": (cfg.d_ff, cfg.d_model)}
    if target not in TARGET_MODULES:
        raise ValueError(f"slm.targets: unknown target {target!r}; choose from {', '.join(TARGET_MODULES)}")
    if target == "mlp.wg" and cfg.family != "llama":
        raise ValueError("slm.targets: 'mlp.wg' exists only in the llama family")
    return dims[target]


def init_increment_bank(rng: jax.Array, cfg: ModelConfig, *, max_slots: int, rank: int,
                        targets: Sequence[str] = ("attn.o",), init_std: float | None = None) -> dict[str, Any]:
    """{target: {"down": N(0, init_std) [L, P, r, d_in], "up": zeros [L, P, r, d_out]}} for every target.

    `init_std` defaults to 1/sqrt(d_in) (the official code uses 1.0 with BERT-base; a scale-free default
    keeps the first updates comparable across widths).
    """
    bank = {}
    for target, key in zip(targets, jax.random.split(rng, len(targets))):
        d_in, d_out = target_dims(cfg, target)
        std = init_std if init_std is not None else 1.0 / math.sqrt(d_in)
        bank[target] = {"down": std * jax.random.normal(key, (cfg.n_layers, max_slots, rank, d_in), jnp.float32),
                        "up": jnp.zeros((cfg.n_layers, max_slots, rank, d_out), jnp.float32)}
    return bank


def bank_axes(bank: dict[str, Any]) -> dict[str, Any]:
    """Logical PartitionSpecs of a bank (for `jaxcl.parallel.logical_to_sharding`)."""
    return jax.tree.map(lambda _: PartitionSpec(*BANK_AXES), bank)


def mix_adapters(bank: dict[str, Any], slots: jax.Array, weights: jax.Array) -> dict[str, LowRankMix]:
    """The models' `adapters` input: each target's retrieved slots mixed by `weights` ([G, K] each)."""
    return {t: gather_mix(f["down"], f["up"], slots, weights) for t, f in bank.items()}


def slot_mask(bank: dict[str, Any], trainable_slots: np.ndarray | jax.Array) -> dict[str, Any]:
    """A bool tree shaped like `bank` that is True on the entries of the trainable slots (bool [P])."""
    trainable = jnp.asarray(trainable_slots, bool)
    return jax.tree.map(lambda x: jnp.broadcast_to(trainable[None, :, None, None], x.shape), bank)


def masked_apply(params: Any, updates: Any, mask: Any) -> Any:
    """`params + updates` where `mask`, else `params` unchanged bit for bit (masks updates, not gradients)."""
    return jax.tree.map(lambda p, u, m: jnp.where(m, p + u.astype(p.dtype), p), params, updates, mask)


__all__ = ["BANK_AXES", "target_dims", "init_increment_bank", "bank_axes", "mix_adapters", "slot_mask",
           "masked_apply"]
