"""Text generation with a KV cache for the decoders (GPT-2, LLaMA), with the continual-learning state in the loop.

    from jaxcl.generate import generate
    out = generate(cfg, params, input_ids, attention_mask, max_new_tokens=64, eos_token_id=[2, 5])
    out.tokens     # [batch, max_new_tokens] int32; after a row's stop token: the pad id
    out.lengths    # [batch] new tokens per row, its stop token included

How it runs: one prefill call writes the (left-padded) prompts' keys and values into a cache of
`prompt + max_new_tokens` slots (`[layers, batch, slots, kv_heads, head_dim]`: grouped-query attention caches
only the kv heads), then one decode step per token under `lax.fori_loop` reads the cache and writes one slot.
Shapes are fixed, so the whole call is one jitted program per (batch, prompt length, max_new_tokens,
sampling settings): repeated calls never recompile. Positions come from the attention mask
(`positions_from_mask`, as transformers derives `position_ids` for left-padded batches), for learned
positions (GPT-2) and RoPE (LLaMA) alike.

Continual-learning state: `adapters=` (JARe / LoRA mixtures, `jaxcl.slm.jare.mix_adapters`) and
`prompt_ids=` (ELLE domain prompts, cached with the prefix) apply at every step exactly as in the full
forward. Decoding with a kNN-LM memory and SLM's DTKR retrieval from the prompt text are not built yet.

Sampling: `temperature=0` is greedy (argmax, transformers' `do_sample=False`); otherwise logits / temperature,
then top-k, then top-p (nucleus) filtering, then a categorical draw from `jax.random.fold_in(rng, step)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcl.models import ModelConfig, build

__all__ = ["GenerateOutput", "generate", "positions_from_mask", "filter_logits"]


@struct.dataclass
class GenerateOutput:
    """`tokens` [batch, max_new_tokens] int32 (pad id after a row's stop token), `lengths` [batch] int32."""

    tokens: jax.Array
    lengths: jax.Array


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position of every token of a left- (or right-) padded batch: the count of real tokens before it
    (`cumsum(mask) - 1`, padding at 0), as transformers builds `position_ids` in `generate`. [b, s] int32."""
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits `[b, vocab]` with everything outside the top-k and outside the smallest set whose probability
    reaches top_p set to -inf (the most likely token always stays)."""
    neg = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                    # mass of the tokens ranked above
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def _as_ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def generate(cfg: ModelConfig, params: Any, input_ids, attention_mask=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             rng: jax.Array | None = None, memory=None, adapters: dict[str, Any] | None = None,
             prompt_ids=None, cache_dtype: str | None = None) -> GenerateOutput:
    """Continue every row of `input_ids` [batch, prompt] (left-padded; `attention_mask` marks real tokens)
    by up to `max_new_tokens` tokens.

    eos_token_id: one id or a list (Llama-3 stops on several); default `cfg.eos_token_id`. A row stops after
    its first stop token; later slots hold `pad_token_id` (default `cfg.pad_token_id`, else the first stop
    id, else 0). `adapters`: fixed low-rank mixtures (`{"attn.o": LowRankMix, ...}`, G = 1 or batch).
    `prompt_ids` [batch]: ELLE domain prompts. `cache_dtype`: the KV cache's dtype (default: the compute
    dtype). Errors: a non-decoder, an empty prompt, `max_new_tokens` < 1, a prompt plus new tokens longer than
    the learned position table (GPT-2), a temperature < 0, top-p outside (0, 1], or sampling without `rng`.
    """
    if memory is not None:
        raise NotImplementedError("generate(memory=...): kNN-LM decoding is not built yet (issue 15); decode "
                                  "without memory, or score with jaxcl.memory.knn_lm_logprobs")
    if not cfg.is_decoder:
        raise ValueError(f"generate needs a decoder (gpt2 or llama), got model.family={cfg.family!r}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids must be a non-empty [batch, prompt] array, got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    prefix = cfg.prompt_length if prompt_ids is not None else 0
    total = prefix + input_ids.shape[1] + max_new_tokens
    if cfg.family != "llama" and total > cfg.max_seq_len:
        raise ValueError(f"prompt ({input_ids.shape[1]} tokens{f' + {prefix} prompt vectors' if prefix else ''}) + "
                         f"max_new_tokens={max_new_tokens} = {total} exceeds model.max_seq_len={cfg.max_seq_len}")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"temperature must be >= 0, top_p in (0, 1] and top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
    mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    stops = _as_ids(eos_token_id) or cfg.token_ids("eos_token_id")
    pad = pad_token_id if pad_token_id is not None else (cfg.token_ids("pad_token_id") or stops or (0,))[0]
    settings = _Settings(cfg, max_new_tokens, float(temperature), int(top_k), float(top_p), stops, int(pad),
                         cache_dtype or cfg.dtype)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(settings, params, input_ids, mask, rng, adapters,
                     None if prompt_ids is None else jnp.asarray(prompt_ids, jnp.int32))


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything static about a generate call (part of the compile key)."""

    cfg: ModelConfig
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stops: tuple[int, ...]
    pad: int
    cache_dtype: str


def _pick(settings: _Settings, logits: jax.Array, rng: jax.Array, step) -> jax.Array:
    if settings.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
    return jax.random.categorical(jax.random.fold_in(rng, step), logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _generate(settings: _Settings, params, input_ids, mask, rng, adapters, prompt_ids) -> GenerateOutput:
    cfg = settings.cfg
    model = build(cfg)
    b, length = input_ids.shape
    prefix = cfg.prompt_length if prompt_ids is not None else 0
    slots = prefix + length + settings.max_new_tokens
    dtype = jnp.dtype(settings.cache_dtype)
    shape = (cfg.n_layers, b, slots, cfg.n_kv_heads, cfg.head_dim)
    cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    cache_mask = jnp.zeros((b, slots), jnp.int32).at[:, :prefix].set(1).at[:, prefix:prefix + length].set(mask)
    positions = positions_from_mask(mask)
    out = model.apply({"params": params}, input_ids, mask, positions=positions, prompt_ids=prompt_ids,
                      adapters=adapters, cache=cache, cache_index=0, cache_mask=cache_mask)
    next_pos = prefix + jnp.sum(mask, axis=-1).astype(jnp.int32)               # [b] position of the next token
    stops = jnp.asarray(settings.stops or (-1,), jnp.int32)
    first = _pick(settings, out.logits[:, -1], rng, 0)
    tokens = jnp.full((b, settings.max_new_tokens), settings.pad, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stops)
    lengths = jnp.ones((b,), jnp.int32)

    def body(t, state):
        tokens, cache, cache_mask, done, lengths = state
        token = tokens[:, t - 1]
        index = prefix + length + t - 1                                           # its cache slot
        cache_mask = cache_mask.at[:, index].set(1)
        step = model.apply({"params": params}, token[:, None], None, positions=(next_pos + t - 1)[:, None],
                           adapters=adapters, cache=cache, cache_index=index, cache_mask=cache_mask)
        new = _pick(settings, step.logits[:, 0], rng, t)
        new = jnp.where(done, settings.pad, new)
        tokens = tokens.at[:, t].set(new)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(new, stops)
        return tokens, step.cache, cache_mask, done, lengths

    tokens, _, _, _, lengths = jax.lax.fori_loop(1, settings.max_new_tokens, body,
                                                 (tokens, out.cache, cache_mask, done, lengths))
    return GenerateOutput(tokens=tokens, lengths=lengths)
