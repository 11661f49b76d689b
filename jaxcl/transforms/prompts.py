"""Prompt insertion as a checkpoint transform: give a model learned prompt vectors (ELLE's domain prompts).

    params, cfg = add_prompts(params, cfg, num_prompts=5, prompt_length=1, rng=jax.random.key(0))

The model's function on inputs without `prompt_ids` is unchanged (the table is only read when
prompts are asked for); `grow` widens the table like any embedding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcl.models.config import ConfigError, ModelConfig


def add_prompts(params: dict[str, Any], cfg: ModelConfig, *, num_prompts: int, prompt_length: int,
                rng: jax.Array) -> tuple[dict[str, Any], ModelConfig]:
    """Return `(params, cfg)` with `num_prompts` prompts of `prompt_length` vectors each.

    New prompt vectors are drawn like token embeddings (normal, `initializer_range`). A model that
    already has prompts keeps them and gets more (same `prompt_length` only).
    """
    if num_prompts < 1 or prompt_length < 1:
        raise ConfigError(f"add_prompts: num_prompts={num_prompts} and prompt_length={prompt_length} must be >= 1")
    old = params.get("prompt_embed", {}).get("embedding") if cfg.num_prompts else None
    if old is not None and cfg.prompt_length != prompt_length:
        raise ConfigError(f"add_prompts: the model's prompts have length {cfg.prompt_length}, not {prompt_length}")
    if old is not None and num_prompts < cfg.num_prompts:
        raise ConfigError(f"add_prompts: the model already has {cfg.num_prompts} prompts (> {num_prompts})")
    n_old = cfg.num_prompts if old is not None else 0
    new_rows = (num_prompts - n_old) * prompt_length
    fresh = cfg.initializer_range * jax.random.normal(rng, (new_rows, cfg.d_model), jnp.float32)   # [rows, d]
    table = fresh if old is None else jnp.concatenate([jnp.asarray(old), fresh], axis=0)
    out = dict(params)
    out["prompt_embed"] = {"embedding": table}
    return out, cfg.replace(num_prompts=num_prompts, prompt_length=prompt_length)


__all__ = ["add_prompts"]
