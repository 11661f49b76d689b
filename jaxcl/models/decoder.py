"""Causal language models: the GPT-2 and LLaMA families in one module.

GPT-2: learned positions, pre-LN LayerNorm, GELU-tanh MLP, biases, tied output embedding.
LLaMA: RoPE (HF rotate-half layout), RMSNorm, SwiGLU MLP, grouped-query attention, optional tying.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxcl.models.config import ModelConfig
from jaxcl.models.layers import POSITION_AXIS, Dense, build_attention_mask, compute_dtype, make_norm, normal_init, \
    stacked_layers
from jaxcl.models.outputs import ModelOutput


def default_positions(input_ids: jax.Array) -> jax.Array:
    """Positions 0..seq-1 for every row (what HF uses when no position ids are given)."""
    b, s = input_ids.shape
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))


def check_input_ids(cfg: ModelConfig, input_ids: jax.Array, positions: jax.Array | None) -> None:
    """Fail early, naming the shape, on inputs the model cannot run."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if cfg.family != "llama" and positions is None and input_ids.shape[1] > cfg.max_seq_len:
        raise ValueError(f"input_ids has seq={input_ids.shape[1]} > model.max_seq_len={cfg.max_seq_len} "
                         f"(the learned position table)")


class Decoder(nn.Module):
    """A causal LM; `__call__(input_ids [b, s], attention_mask [b, s] | None) -> ModelOutput`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, deterministic: bool = True) -> ModelOutput:
        cfg = self.cfg
        check_input_ids(cfg, input_ids, positions)
        dtype = compute_dtype(cfg)
        b, s = input_ids.shape
        if positions is None:
            positions = default_positions(input_ids)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                         embedding_init=nn.with_logical_partitioning(normal_init(cfg.initializer_range),
                                                                     ("vocab", "embed")), name="embed")
        x = embed(input_ids)                                                   # [b, s, d]
        if cfg.family == "gpt2":
            pos_embed = nn.Embed(cfg.max_seq_len, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                                 embedding_init=nn.with_logical_partitioning(normal_init(cfg.initializer_range),
                                                                             (POSITION_AXIS, "embed")),
                                 name="pos_embed")
            x = x + pos_embed(positions)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic or cfg.dropout == 0.0)(x)
        mask = build_attention_mask(attention_mask, b, s, causal=True)
        (x, ffn_in), _ = stacked_layers(cfg, deterministic)((x, jnp.zeros_like(x)), mask, positions)
        hidden = make_norm(cfg, "final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(hidden)
        else:
            logits = Dense((cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",), use_bias=False,
                           dtype=dtype, kernel_std=cfg.initializer_range, name="lm_head")(hidden)
        return ModelOutput(logits=logits.astype(jnp.float32), hidden=hidden, knn_keys=ffn_in)
