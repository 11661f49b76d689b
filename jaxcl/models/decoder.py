"""Causal language models: the GPT-2 and LLaMA families in one module.

GPT-2: learned positions, pre-LN LayerNorm, GELU-tanh MLP, biases, tied output embedding.
LLaMA: RoPE (HF rotate-half layout), RMSNorm, SwiGLU MLP, grouped-query attention, optional tying.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxcl.models.config import ModelConfig
from jaxcl.models.layers import POSITION_AXIS, Dense, build_attention_mask, compute_dtype, embedding_table, \
    make_norm, prepend_prompts, prompt_table, stacked_layers, unrolled_layers
from jaxcl.models.lowrank import check_adapters
from jaxcl.models.outputs import ModelOutput


def default_positions(input_ids: jax.Array) -> jax.Array:
    """Positions 0..seq-1 for every row (what HF uses when no position ids are given)."""
    b, s = input_ids.shape
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))


def checked_positions(cfg: ModelConfig, input_ids: jax.Array, positions: jax.Array | None) -> jax.Array:
    """The positions to use; fails early, naming the shape, on inputs the model cannot run."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if positions is not None:
        return positions
    if cfg.family != "llama" and input_ids.shape[1] > cfg.max_seq_len:
        raise ValueError(f"input_ids has seq={input_ids.shape[1]} > model.max_seq_len={cfg.max_seq_len} "
                         f"(the learned position table)")
    return default_positions(input_ids)


class Decoder(nn.Module):
    """A causal LM; `__call__(input_ids [b, s], attention_mask [b, s] | None) -> ModelOutput`.

    With `prompt_ids` [b] (and `cfg.num_prompts` > 0) each row is prefixed by its learned prompt;
    outputs still cover only the `s` text positions.

    `scan_layers=False`: the layers run as an unrolled loop over per-layer parameters (`layers_0` ...,
    `jaxcl.models.layout`); the KV cache is then `(k, v)` tuples of per-layer `[b, kv_heads, T, head_dim]`.
    """

    cfg: ModelConfig
    scan_layers: bool = True

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, deterministic: bool = True,
                 prompt_ids: jax.Array | None = None, adapters=None,
                 output_hidden_states: bool = False, cache=None, cache_index=None,
                 cache_mask: jax.Array | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """With a KV cache (`jaxcl.generate`): `cache` is `(k, v)` `[L, b, kv_heads, T, head_dim]` (heads before
        slots: the attention contracts each head's slots without transposing the cache), the new
        tokens' keys/values are written at `[cache_index, cache_index + s)`, and `cache_mask` `[b, T]` marks
        the cache positions holding real tokens (the new ones included); `positions` must be given. The
        updated cache is `out.cache`. Prompts must be part of the cached prefix (pass `prompt_ids` only on the
        call that fills the cache from index 0).

        `logits_to_keep` > 0: logits only for the last that many positions (`[b, logits_to_keep, V]`, as
        transformers' `logits_to_keep`): a prefill needs only the last position's, and the output projection
        over every prompt position is the largest matmul of a prefill at a large vocabulary."""
        cfg = self.cfg
        check_adapters(adapters)
        positions = checked_positions(cfg, input_ids, positions)
        dtype = compute_dtype(cfg)
        embed = embedding_table(cfg, cfg.vocab_size, "vocab", "embed")
        x = embed(input_ids)                                                   # [b, s, d]
        x, attention_mask, positions, n_prefix = prepend_prompts(cfg, prompt_table(cfg), prompt_ids, x, attention_mask,
                                                                 positions, self.is_initializing())
        b, s = x.shape[:2]                                                     # s includes the prompt
        if cfg.family == "gpt2":
            x = x + embedding_table(cfg, cfg.max_seq_len, POSITION_AXIS, "pos_embed")(positions)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic or cfg.dropout == 0.0)(x)
        layer_cache = None
        if cache is None:
            mask = build_attention_mask(attention_mask, b, s, causal=True)
        else:
            k_cache, v_cache = cache
            stacked = not isinstance(k_cache, (tuple, list))
            if stacked != self.scan_layers:
                raise ValueError("the KV cache must be [L, b, kv_heads, T, head_dim] arrays with scan_layers=True "
                                 "and tuples of per-layer [b, kv_heads, T, head_dim] arrays with scan_layers=False")
            total = k_cache.shape[3] if stacked else k_cache[0].shape[2]
            if cache_mask is None or cache_mask.shape != (b, total):
                raise ValueError(f"a KV-cache call needs cache_mask [batch, cache_len] = {(b, total)}")
            query_at = cache_index + jnp.arange(s)                                  # cache slot of each query
            causal = jnp.arange(total)[None, :] <= query_at[:, None]                # [s, T]
            mask = cache_mask.astype(bool)[:, None, :] & causal[None]               # [b, s, T]
            index = jnp.full((cfg.n_layers,), cache_index, jnp.int32) if stacked else cache_index
            layer_cache = (k_cache, v_cache, index)
        embedded = x
        carry = (x, jnp.zeros_like(x))
        if self.scan_layers:
            (x, ffn_in), (per_layer, new_entries) = stacked_layers(cfg, deterministic, collect=output_hidden_states)(
                carry, mask, positions, dict(adapters or {}), layer_cache)
        else:
            (x, ffn_in), (per_layer, new_entries) = unrolled_layers(
                cfg, deterministic, output_hidden_states, carry, mask, positions, dict(adapters or {}), layer_cache)
        new_cache = None
        if cache is not None:    # one write of the s new slots of every layer (in place in a decode loop); the
            new_cache = jax.tree.map(      # slot axis is second to last in both layouts
                lambda c, e: jax.lax.dynamic_update_slice(c, e.astype(c.dtype), (0,) * (c.ndim - 2) + (cache_index, 0)),
                tuple(cache), tuple(new_entries))
        hidden = make_norm(cfg, "final_norm")(x)[:, n_prefix:]               # [b, s_text, d]
        ffn_in = ffn_in[:, n_prefix:]
        hidden_states = None
        if output_hidden_states:          # [L + 1, b, s_text, d]; the last layer's entry is after final_norm
            inner = jnp.concatenate([embedded[None], per_layer[:-1]], axis=0)[:, :, n_prefix:]
            hidden_states = jnp.concatenate([inner, hidden[None]], axis=0)
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be a non-negative int, got {logits_to_keep!r}")
        head_in = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        if cfg.tie_embeddings:
            logits = embed.attend(head_in)
        else:
            logits = Dense((cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",), use_bias=False,
                           dtype=dtype, kernel_std=cfg.initializer_range, name="lm_head")(head_in)
        return ModelOutput(logits=logits.astype(jnp.float32), hidden=hidden, knn_keys=ffn_in,
                           hidden_states=hidden_states, cache=new_cache)
