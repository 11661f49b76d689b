"""AdamW with linear warmup, cosine decay and global-norm clipping; no decay on norms and biases."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxcl.config import OptimConfig

DECAYED_LEAVES = ("kernel", "embedding")


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> lr over `warmup_steps`, then cosine down to `lr * min_lr_ratio` at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)


def weight_decay_mask(params: Any) -> Any:
    """True for matrices (kernels, embeddings); False for norm scales and biases."""
    def decayed(path, _):
        return any(getattr(k, "key", None) in DECAYED_LEAVES for k in path)

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer for one training stage of `total_steps` steps."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=weight_decay_mask),
    )
