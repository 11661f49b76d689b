"""Text generation with a KV cache for the decoders (GPT-2, LLaMA), with the continual-learning state in the loop.

    from jaxcl.generate import generate
    out = generate(cfg, params, input_ids, attention_mask, max_new_tokens=64, eos_token_id=[2, 5])
    out.tokens     # [batch, max_new_tokens] int32; after a row's stop token: the pad id
    out.lengths    # [batch] new tokens per row, its stop token included

How it runs: one prefill call writes the (left-padded) prompts' keys and values into a cache of
`prompt + max_new_tokens` slots (per layer `[batch, kv_heads, slots, head_dim]`: grouped-query attention caches
only the kv heads; the layers run unrolled over per-layer weights unless `scan_layers=True`), then one decode step per token under `lax.while_loop` (which ends when every row has
stopped) reads the cache and writes one slot. Shapes are fixed, so the whole call is one jitted program per (batch, prompt length, max_new_tokens,
sampling settings): repeated calls never recompile. Positions come from the attention mask
(`positions_from_mask`, as transformers derives `position_ids` for left-padded batches), for learned
positions (GPT-2) and RoPE (LLaMA) alike.

Continual-learning state, applied at every step exactly as in the full forward:
- `memory=` a kNN-LM memory (`jaxcl.memory.decoding.KnnMemory`: a datastore, k, λ and T or SeMem's
  calibrator): each step searches the batch's query keys (the model's `knn_keys` at the current position) in
  one batched host-side search and mixes p_kNN into the next-token distribution on the device
  (`knn_lm_logprobs`) before sampling. The loop then runs on the host (one jitted step per token: the search
  is host work), still one compile per shape;
- `adapters=` JARe / LoRA mixtures (`jaxcl.slm.jare.mix_adapters`; SLM's DTKR retrieval from the prompt
  text: `jaxcl.slm.retrieval.SlmAdapters`);
- `prompt_ids=` ELLE domain prompts (cached with the prefix).

On a mesh (`mesh=`, `rules=`): the prompts are sharded over the batch rule and the KV cache by the same logical
rules as the parameters (`batch` and `kv_heads`), so a sharded model decodes without gathering its weights.

Sampling: `temperature=0` is greedy (argmax, transformers' `do_sample=False`); otherwise logits / temperature,
then top-k, then top-p (nucleus) filtering, then a categorical draw from `jax.random.fold_in(rng, step)`.
With a memory the same applies to the mixed log-probabilities.

`stream=` a callable `(step, tokens [batch])` sees every chosen token as soon as it exists (the command line
prints text as it is generated).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcl.models import ModelConfig, build, is_unstacked, unstack_layers

__all__ = ["GenerateOutput", "generate", "positions_from_mask", "filter_logits", "next_token_logprobs"]


@struct.dataclass
class GenerateOutput:
    """`tokens` [batch, max_new_tokens] int32 (pad id after a row's stop token), `lengths` [batch] int32;
    `logprobs` [batch, max_new_tokens, vocab] float32: the distribution each token was chosen from (with a
    memory: the mixed one; before temperature and filtering), only with `return_logprobs=True`."""

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array | None = None


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position of every token of a left- (or right-) padded batch: the count of real tokens before it
    (`cumsum(mask) - 1`, padding at 0), as transformers builds `position_ids` in `generate`. [b, s] int32."""
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits `[b, vocab]` with everything outside the top-k and outside the smallest set whose probability
    reaches top_p set to -inf (the most likely token always stays)."""
    neg = jnp.finfo(logits.dtype).min
    logits = jnp.maximum(logits, neg)            # -inf (a memory's impossible tokens) -> the dtype's minimum
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
             prompt_ids=None, cache_dtype: str | None = None, return_logprobs: bool = False,
             stream: Callable[[int, np.ndarray], None] | None = None, mesh=None, rules=None,
             scan_layers: bool = False) -> GenerateOutput:
    """Continue every row of `input_ids` [batch, prompt] (left-padded; `attention_mask` marks real tokens)
    by up to `max_new_tokens` tokens.

    eos_token_id: one id or a list (Llama-3 stops on several); default `cfg.eos_token_id`. A row stops after
    its first stop token; later slots hold `pad_token_id` (default `cfg.pad_token_id`, else the first stop
    id, else 0). `memory`: a `KnnMemory` (kNN-LM / SeMem) of this model. `adapters`: fixed low-rank mixtures
    (`{"attn.o": LowRankMix, ...}`, G = 1 or batch). `prompt_ids` [batch]: ELLE domain prompts. `cache_dtype`:
    the KV cache's dtype (default: the compute dtype). `stream(step, tokens [batch])`: called as tokens are
    chosen (in step order). `mesh` / `rules`: decode on a device mesh (params already placed by the same rules).
    `scan_layers`: False (default) runs the layers unrolled over per-layer weights (`jaxcl.models.layout`), made
    from stacked `params` by one copy of the layer weights per call (pass `unstack_layers(params)` to reuse one
    copy across calls); on CPU the scanned loop re-reads every weight through a per-token slice copy. True keeps
    the scanned layers (no copy: for memory-bound accelerators where the scan costs nothing).

    Errors (ValueError, one line each): a non-decoder, an empty prompt, `max_new_tokens` < 1, a prompt plus new
    tokens longer than the model's context (`model.max_seq_len`), a temperature < 0, top-p outside (0, 1],
    sampling without `rng`; a memory of another model (`DatastoreError`, a ValueError).
    """
    if not cfg.is_decoder:
        raise ValueError(f"generate needs a decoder (gpt2 or llama), got model.family={cfg.family!r}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids must be a non-empty [batch, prompt] array, got shape {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    prefix = cfg.prompt_length if prompt_ids is not None else 0
    total = prefix + input_ids.shape[1] + int(max_new_tokens)
    if cfg.max_seq_len is not None and total > cfg.max_seq_len:
        raise ValueError(f"prompt ({input_ids.shape[1]} tokens{f' + {prefix} prompt vectors' if prefix else ''}) + "
                         f"max_new_tokens={max_new_tokens} = {total} exceeds model.max_seq_len={cfg.max_seq_len}")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"temperature must be >= 0, top_p in (0, 1] and top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
    mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if not bool(jnp.all(jnp.any(mask > 0, axis=-1))):
        raise ValueError("a row of attention_mask has no real token: every prompt needs at least one")
    if prompt_ids is not None:
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        if prompt_ids.shape != (input_ids.shape[0],) or not cfg.num_prompts:
            raise ValueError(f"prompt_ids must be [batch]={input_ids.shape[0]} ids of a model with prompts "
                             f"(model.num_prompts={cfg.num_prompts}), got shape {tuple(prompt_ids.shape)}")
        if bool(jnp.any((prompt_ids < 0) | (prompt_ids >= cfg.num_prompts))):
            raise ValueError(f"prompt_ids must be in [0, model.num_prompts={cfg.num_prompts})")
    if memory is not None:
        memory.check(cfg, params)
    if scan_layers and is_unstacked(params):
        raise ValueError("scan_layers=True needs stacked parameters (params['layers']); got per-layer layers_0 ...")
    if not scan_layers:
        params = _unstack(params)
    stops = _as_ids(eos_token_id) or cfg.token_ids("eos_token_id")
    pad = pad_token_id if pad_token_id is not None else (cfg.token_ids("pad_token_id") or stops or (0,))[0]
    settings = _Settings(cfg, int(max_new_tokens), float(temperature), int(top_k), float(top_p), stops, int(pad),
                         cache_dtype or cfg.dtype, bool(return_logprobs), stream is not None, mesh,
                         None if rules is None else tuple((n, tuple(a)) for n, a in rules), bool(scan_layers))
    rng = jax.random.key(0) if rng is None else rng
    if mesh is not None:
        from jaxcl.parallel import batch_sharding
        input_ids = jax.device_put(input_ids, batch_sharding(mesh, rules))
        mask = jax.device_put(mask, batch_sharding(mesh, rules))
    if memory is not None:
        return _generate_with_memory(settings, params, input_ids, mask, rng, adapters, prompt_ids, memory, stream)
    if stream is None:
        return _generate(settings, params, input_ids, mask, rng, adapters, prompt_ids)
    _SINK.append(stream)
    try:
        out = _generate(settings, params, input_ids, mask, rng, adapters, prompt_ids)
        jax.block_until_ready(out.tokens)
        jax.effects_barrier()
    finally:
        _SINK.pop()
    return out


def next_token_logprobs(logits: jax.Array, dists=None, neighbor_values=None, lam=None, temperature=None) -> jax.Array:
    """log p(next token) `[b, vocab]` float32 from LM logits `[b, vocab]`, mixed with a memory's neighbours
    (`knn_lm_logprobs`, dists / values `[b, k]`, λ `[b]`, T scalar) when they are given."""
    if dists is None:
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    from jaxcl.memory.knnlm import knn_lm_logprobs
    return knn_lm_logprobs(logits, dists, neighbor_values, lam=lam, temperature=temperature)


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
    return_logprobs: bool = False
    streaming: bool = False
    mesh: Any = None
    rules: Any = None
    scan_layers: bool = False


_SINK: list[Callable[[int, np.ndarray], None]] = []      # the current call's `stream` (jitted code calls _emit)


def _emit(step, tokens) -> None:
    if _SINK:
        _SINK[-1](int(step), np.asarray(tokens))


def _pick(settings: _Settings, logits: jax.Array, rng: jax.Array, step) -> jax.Array:
    if settings.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
    return jax.random.categorical(jax.random.fold_in(rng, step), logits, axis=-1).astype(jnp.int32)


def _constrain(settings: _Settings, x: jax.Array, names: tuple) -> jax.Array:
    if settings.mesh is None:
        return x
    from jaxcl.parallel import with_logical_constraint
    return with_logical_constraint(x, names, settings.mesh, settings.rules)


_CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


@jax.jit
def _unstack(params):
    return unstack_layers(params)


def _constrain_cache(settings: _Settings, cache):
    """The KV cache (stacked `[L, b, kv, T, hd]` arrays or per-layer tuples) under the mesh's logical rules."""
    axes = _CACHE_AXES if settings.scan_layers else _CACHE_AXES[1:]
    return jax.tree.map(lambda c: _constrain(settings, c, axes), cache)


def _prefill(settings: _Settings, model, params, input_ids, mask, adapters, prompt_ids):
    """Fill a fresh cache with the prompts: (model output at the last prompt position, cache, cache_mask,
    the next position of every row)."""
    cfg = settings.cfg
    b, length = input_ids.shape
    prefix = cfg.prompt_length if prompt_ids is not None else 0
    slots = prefix + length + settings.max_new_tokens
    dtype = jnp.dtype(settings.cache_dtype)
    shape = (b, cfg.n_kv_heads, slots, cfg.head_dim)
    if settings.scan_layers:
        cache = tuple(jnp.zeros((cfg.n_layers,) + shape, dtype) for _ in range(2))
    else:
        cache = tuple(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)) for _ in range(2))
    cache = _constrain_cache(settings, cache)
    cache_mask = jnp.zeros((b, slots), jnp.int32).at[:, :prefix].set(1).at[:, prefix:prefix + length].set(mask)
    out = model.apply({"params": params}, input_ids, mask, positions=positions_from_mask(mask), prompt_ids=prompt_ids,
                      adapters=adapters, cache=cache, cache_index=0, cache_mask=cache_mask, logits_to_keep=1)
    next_pos = prefix + jnp.sum(mask, axis=-1).astype(jnp.int32)               # [b] position of the next token
    return out, out.cache, cache_mask, next_pos


def _decode_one(settings: _Settings, model, params, adapters, token, t, cache, cache_mask, next_pos, prefix, length):
    """Forward new token `t - 1` of every row (written at its cache slot): the model output at it."""
    index = prefix + length + t - 1
    cache_mask = cache_mask.at[:, index].set(1)
    out = model.apply({"params": params}, token[:, None], None, positions=(next_pos + t - 1)[:, None],
                      adapters=adapters, cache=cache, cache_index=index, cache_mask=cache_mask)
    return out, _constrain_cache(settings, out.cache), cache_mask


@functools.partial(jax.jit, static_argnums=0)
def _generate(settings: _Settings, params, input_ids, mask, rng, adapters, prompt_ids) -> GenerateOutput:
    cfg = settings.cfg
    model = build(cfg, scan_layers=settings.scan_layers)
    b, length = input_ids.shape
    new = settings.max_new_tokens
    prefix = cfg.prompt_length if prompt_ids is not None else 0
    out, cache, cache_mask, next_pos = _prefill(settings, model, params, input_ids, mask, adapters, prompt_ids)
    stops = jnp.asarray(settings.stops or (-1,), jnp.int32)
    logp = next_token_logprobs(out.logits[:, -1])
    first = _pick(settings, logp, rng, 0)
    tokens = jnp.full((b, new), settings.pad, jnp.int32).at[:, 0].set(first)
    scores = jnp.zeros((b, new, cfg.vocab_size) if settings.return_logprobs else (0,), jnp.float32)
    if settings.return_logprobs:
        scores = scores.at[:, 0].set(logp)
    if settings.streaming:
        jax.debug.callback(_emit, 0, first, ordered=True)
    done = jnp.isin(first, stops)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
        t, done = state[0], state[4]
        return (t < new) & ~jnp.all(done)

    def body(state):
        t, tokens, cache, cache_mask, done, lengths, scores = state
        step, cache, cache_mask = _decode_one(settings, model, params, adapters, tokens[:, t - 1], t, cache,
                                              cache_mask, next_pos, prefix, length)
        logp = next_token_logprobs(step.logits[:, 0])
        token = jnp.where(done, settings.pad, _pick(settings, logp, rng, t))
        if settings.return_logprobs:
            scores = scores.at[:, t].set(logp)
        if settings.streaming:
            jax.debug.callback(_emit, t, token, ordered=True)
        lengths = lengths + (~done).astype(jnp.int32)
        return t + 1, tokens.at[:, t].set(token), cache, cache_mask, done | jnp.isin(token, stops), lengths, scores

    state = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, cache_mask, done, lengths, scores))
    _, tokens, _, _, _, lengths, scores = state
    return GenerateOutput(tokens=tokens, lengths=lengths, logprobs=scores if settings.return_logprobs else None)


# ----------------------------------------------------------------------------- decoding with a kNN-LM memory
def _lm_features(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The calibrator's distribution features of p_LM: (max probability [b], entropy [b])."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    return jnp.max(p, axis=-1), -jnp.sum(p * logp, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _memory_prefill(settings: _Settings, params, input_ids, mask, adapters, prompt_ids):
    model = build(settings.cfg, scan_layers=settings.scan_layers)
    out, cache, cache_mask, next_pos = _prefill(settings, model, params, input_ids, mask, adapters, prompt_ids)
    logits = out.logits[:, -1]
    conf, entropy = _lm_features(logits)
    b, new = input_ids.shape[0], settings.max_new_tokens
    state = {"cache": cache, "cache_mask": cache_mask, "next_pos": next_pos, "logits": logits,
             "tokens": jnp.full((b, new), settings.pad, jnp.int32), "done": jnp.zeros((b,), bool),
             "lengths": jnp.zeros((b,), jnp.int32),
             "scores": jnp.zeros((b, new, settings.cfg.vocab_size) if settings.return_logprobs else (0,), jnp.float32)}
    return state, (out.knn_keys[:, -1].astype(jnp.float32), conf, entropy, input_ids[:, -1])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _memory_step(settings: _Settings, length: int, params, adapters, state, t, dists, values, lam, temperature, rng):
    """Choose token t from the mixed distribution, then forward it: the new state and the next query."""
    model = build(settings.cfg, scan_layers=settings.scan_layers)
    prefix = state["cache_mask"].shape[1] - length - settings.max_new_tokens
    logp = next_token_logprobs(state["logits"], dists, values, lam, temperature)
    done = state["done"]
    token = jnp.where(done, settings.pad, _pick(settings, logp, rng, t))
    stops = jnp.asarray(settings.stops or (-1,), jnp.int32)
    scores = state["scores"].at[:, t].set(logp) if settings.return_logprobs else state["scores"]
    new_state = dict(state, tokens=state["tokens"].at[:, t].set(token), done=done | jnp.isin(token, stops),
                     lengths=state["lengths"] + (~done).astype(jnp.int32), scores=scores)
    out, cache, cache_mask = _decode_one(settings, model, params, adapters, token, t + 1, state["cache"],
                                         state["cache_mask"], state["next_pos"], prefix, length)
    logits = out.logits[:, 0]
    conf, entropy = _lm_features(logits)
    new_state.update(cache=cache, cache_mask=cache_mask, logits=logits)
    return new_state, (out.knn_keys[:, 0].astype(jnp.float32), conf, entropy, token)


def _generate_with_memory(settings: _Settings, params, input_ids, mask, rng, adapters, prompt_ids, memory,
                          stream) -> GenerateOutput:
    """The host loop: per token one batched datastore search and one jitted step (mix, choose, forward)."""
    length = int(input_ids.shape[1])
    state, query = _memory_prefill(settings, params, input_ids, mask, adapters, prompt_ids)
    for t in range(settings.max_new_tokens):
        keys, conf, entropy, contexts = jax.device_get(query)
        dists, values, lam, temperature = memory.lookup(keys, conf, entropy, contexts)
        state, query = _memory_step(settings, length, params, adapters, state, np.int32(t), dists, values, lam,
                                    temperature, rng)
        if stream is not None or t % 8 == 7:
            tokens, done = jax.device_get((state["tokens"][:, t], state["done"]))
            if stream is not None:
                stream(t, tokens)
            if done.all():
                break
    return GenerateOutput(tokens=state["tokens"], lengths=state["lengths"],
                          logprobs=state["scores"] if settings.return_logprobs else None)
