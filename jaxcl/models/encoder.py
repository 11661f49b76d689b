"""The BERT encoder family: post-LN blocks, token-type embeddings, MLM head, pooler, mean pooling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxcl.models.config import ModelConfig
from jaxcl.models.decoder import checked_positions
from jaxcl.models.layers import ACTIVATION_FNS, POSITION_AXIS, Dense, build_attention_mask, compute_dtype, \
    embedding_table, make_norm, prepend_prompts, prompt_table, stacked_layers
from jaxcl.models.lowrank import check_adapters
from jaxcl.models.outputs import ModelOutput


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Average `hidden` [b, s, d] over real tokens -> [b, d] (sentence-transformers' mean pooling)."""
    if attention_mask is None:
        return jnp.mean(hidden.astype(jnp.float32), axis=1)
    m = attention_mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.clip(jnp.sum(m, axis=1), 1e-9)


class Encoder(nn.Module):
    """BERT; `__call__(input_ids, attention_mask, token_type_ids) -> ModelOutput` (bidirectional)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, token_type_ids: jax.Array | None = None,
                 deterministic: bool = True, prompt_ids: jax.Array | None = None, adapters=None,
                 output_hidden_states: bool = False) -> ModelOutput:
        cfg = self.cfg
        check_adapters(adapters)
        positions = checked_positions(cfg, input_ids, positions)
        dtype = compute_dtype(cfg)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embed = embedding_table(cfg, cfg.vocab_size, "vocab", "embed")
        x, attention_mask, positions, n_prefix = prepend_prompts(cfg, prompt_table(cfg), prompt_ids, embed(input_ids),
                                                                 attention_mask, positions, self.is_initializing())
        if n_prefix:
            token_type_ids = jnp.concatenate([jnp.zeros((x.shape[0], n_prefix), token_type_ids.dtype),
                                              token_type_ids], axis=1)
        b, s = x.shape[:2]                                                     # s includes the prompt
        x = x + embedding_table(cfg, cfg.max_seq_len, POSITION_AXIS, "pos_embed")(positions)
        x = x + embedding_table(cfg, cfg.type_vocab_size, None, "type_embed")(token_type_ids)
        x = make_norm(cfg, "embed_norm")(x)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic or cfg.dropout == 0.0)(x)
        mask = build_attention_mask(attention_mask, b, s, causal=False)
        (hidden, ffn_in), (per_layer, _) = stacked_layers(cfg, deterministic, collect=output_hidden_states)(
            (x, jnp.zeros_like(x)), mask, positions, dict(adapters or {}), None)
        hidden, ffn_in = hidden[:, n_prefix:], ffn_in[:, n_prefix:]            # [b, s_text, d]
        hidden_states = None
        if output_hidden_states:                                               # [L + 1, b, s_text, d]
            hidden_states = jnp.concatenate([x[None], per_layer], axis=0)[:, :, n_prefix:]

        logits = None
        if cfg.mlm_head:
            kw = dict(in_axes=("embed",), dtype=dtype, kernel_std=cfg.initializer_range)
            h = Dense((cfg.d_model,), out_axes=("embed_out",), name="mlm_dense", **kw)(hidden)
            h = make_norm(cfg, "mlm_norm")(ACTIVATION_FNS[cfg.activation](h))
            bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                              (cfg.vocab_size,), jnp.float32)
            if cfg.tie_embeddings:
                decoded = embed.attend(h)
            else:
                decoded = Dense((cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",), use_bias=False,
                                dtype=dtype, kernel_std=cfg.initializer_range, name="lm_head")(h)
            logits = (decoded + bias.astype(dtype)).astype(jnp.float32)
        pooled = None
        if cfg.pooler:
            pooled = jnp.tanh(Dense((cfg.d_model,), in_axes=("embed",), out_axes=("embed_out",), dtype=dtype,
                                    kernel_std=cfg.initializer_range, name="pooler")(hidden[:, 0]))
        return ModelOutput(logits=logits, hidden=hidden, knn_keys=ffn_in, pooled=pooled, hidden_states=hidden_states)
