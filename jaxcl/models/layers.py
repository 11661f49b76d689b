"""Building blocks shared by every jaxcl family: projections, norms, RoPE, attention, MLPs.

Every parameter is created through `nn.with_logical_partitioning`, so `jax.eval_shape(model.init)`
yields logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`, ...)
that `jaxcl.parallel` maps onto a device mesh. Parameters are float32; `dtype` is the compute dtype.
Projections keep heads as their own axis (`[embed, heads, head_dim]`) so that growth, head sharding
and per-head adapters never need reshapes of flattened matrices.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from jaxcl.models.config import AUTO_ATTENTION, ModelConfig
from jaxcl.models.lowrank import LowRankMix, lowrank_delta

# Logical axis of the learned position table (not sharded by the default rules).
POSITION_AXIS = "position"


def compute_dtype(cfg: ModelConfig):
    """The jnp dtype a config computes in (parameters stay float32)."""
    return jnp.dtype(cfg.dtype)


def normal_init(std: float):
    return jax.nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """`y = x · kernel (+ bias)` contracting the last `len(in_axes)` dims of `x`.

    `kernel` has shape `x.shape[-n_in:] + features` with logical axes `in_axes + out_axes`.
    """

    features: Sequence[int]
    in_axes: Sequence[str]
    out_axes: Sequence[str]
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernel_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array, lowrank: LowRankMix | None = None) -> jax.Array:
        """`lowrank`: optional mixture of low-rank increments added to `kernel` (in low-rank form)."""
        n_in = len(self.in_axes)
        features = tuple(self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(normal_init(self.kernel_std), tuple(self.in_axes) + tuple(self.out_axes)),
            tuple(x.shape[-n_in:]) + features, jnp.float32)
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype),
            (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.out_axes)),
                              features, jnp.float32)
            y = y + bias.astype(self.dtype)
        if lowrank is not None:
            y = y + lowrank_delta(x, lowrank, n_in, features).astype(y.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (GPT-2, BERT)."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (LLaMA); the scale is applied after casting back, as HF does."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


def embedding_table(cfg: ModelConfig, num_embeddings: int, axis: str | None, name: str) -> nn.Embed:
    """A `[num_embeddings, d_model]` lookup table (tokens, positions, token types) with logical axes."""
    return nn.Embed(num_embeddings, cfg.d_model, dtype=compute_dtype(cfg), param_dtype=jnp.float32, name=name,
                    embedding_init=nn.with_logical_partitioning(normal_init(cfg.initializer_range), (axis, "embed")))


def prompt_table(cfg: ModelConfig) -> nn.Embed | None:
    """The learned prompts, `[num_prompts * prompt_length, d_model]` (rows p*P .. p*P+P-1 are prompt p)."""
    if not cfg.num_prompts:
        return None
    return embedding_table(cfg, cfg.num_prompts * cfg.prompt_length, None, "prompt_embed")


def prepend_prompts(cfg: ModelConfig, table: nn.Embed | None, prompt_ids: jax.Array | None, x: jax.Array,
                    attention_mask: jax.Array | None, positions: jax.Array,
                    initializing: bool) -> tuple[jax.Array, jax.Array | None, jax.Array, int]:
    """Put prompt `prompt_ids[b]`'s vectors in front of row b; returns (x, mask, positions, n_prefix).

    `x` is `[b, s, d]` token embeddings and `positions` the text's `[b, s]` positions; the prompt takes
    positions 0..P-1 and the text moves up by P (as a prepended token would). Without `prompt_ids` the
    model runs unchanged (the table is only touched at init, so it exists in the parameters).
    Ids must lie in [0, num_prompts): like token ids, they are not range-checked inside jit (an
    out-of-range id reads NaN rows).
    """
    if prompt_ids is None:
        if table is not None and initializing:
            table(jnp.zeros((1,), jnp.int32))
        return x, attention_mask, positions, 0
    if table is None:
        raise ValueError("prompt_ids were given but the model has no prompts (model.num_prompts=0)")
    b, s, _ = x.shape
    if prompt_ids.shape != (b,):
        raise ValueError(f"prompt_ids must be [batch]={b}, got shape {tuple(prompt_ids.shape)}")
    n = cfg.prompt_length
    if cfg.family != "llama" and s + n > cfg.max_seq_len:
        raise ValueError(f"input_ids has seq={s}, plus {n} prompt vectors > model.max_seq_len={cfg.max_seq_len}")
    rows = prompt_ids[:, None].astype(jnp.int32) * n + jnp.arange(n, dtype=jnp.int32)[None, :]   # [b, P]
    x = jnp.concatenate([table(rows).astype(x.dtype), x], axis=1)                              # [b, P+s, d]
    if attention_mask is not None:
        attention_mask = jnp.concatenate([jnp.ones((b, n), attention_mask.dtype), attention_mask], axis=1)
    prefix_positions = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype)[None, :], (b, n))
    positions = jnp.concatenate([prefix_positions, positions + n], axis=1)                    # [b, P+s]
    return x, attention_mask, positions, n


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    """The family's norm: RMSNorm for LLaMA, LayerNorm otherwise."""
    cls = RMSNorm if cfg.family == "llama" else LayerNorm
    return cls(eps=cfg.norm_eps, dtype=compute_dtype(cfg), name=name)


# ----------------------------------------------------------------------------- RoPE
def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` of HF's rotary embedding, with its scaling variants."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = dict(cfg.rope_scaling or ())
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate `x` `[batch, seq, heads, head_dim]` in HF's rotate-half layout (no q/k permutation)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)   # [batch, seq, head_dim/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]          # [batch, seq, 1, head_dim]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- attention
def build_attention_mask(attention_mask: jax.Array | None, batch: int, seq: int, causal: bool) -> jax.Array:
    """Boolean `[batch, q, k]` mask: key is real (padding mask) and, for decoders, not in the future."""
    keep = jnp.ones((batch, 1, seq), bool) if attention_mask is None else attention_mask.astype(bool)[:, None, :]
    if causal:
        keep = keep & jnp.tril(jnp.ones((seq, seq), bool))[None]
    return keep


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv: str, cfg: ModelConfig, dtype) -> jax.Array:
    """Softmax attention of grouped queries: q `[b, q, kv_heads, groups, head_dim]`, k/v `[b, s, kv_heads, head_dim]`
    (`kv="bskd"`) or `[b, kv_heads, s, head_dim]` (`"bksd"`, the cache layout), mask `[b, q, s]` (True = attend)
    -> `[b, q, n_heads, head_dim]`. Scores in float32; masked scores are float32's minimum, so they add exactly 0."""
    b, sq = q.shape[:2]
    scores = jnp.einsum(f"bqkgd,{kv}->bkgqs", q, k, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores, mask, cfg, dtype)                      # [b, kv, group, q, k]
    return jnp.einsum(f"bkgqs,{kv}->bqkgd", probs, v).reshape(b, sq, cfg.n_heads, cfg.head_dim)


def _masked_softmax(scores: jax.Array, mask: jax.Array, cfg: ModelConfig, dtype) -> jax.Array:
    """softmax(scores / sqrt(head_dim)) over keys, masked: scores `[b, kv, group, q, k]` float32, mask `[b, q, k]`."""
    return jax.nn.softmax(_scale_and_mask(scores, mask, 1.0 / math.sqrt(cfg.head_dim)), axis=-1).astype(dtype)


def _scale_and_mask(scores: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """float32 scores `[b, kv, group, q, k]` times `scale`, masked keys (mask `[b, q, k]` False) set to float32's
    minimum, so they add exactly 0 after the softmax's exp."""
    return jnp.where(mask[:, None, None, :, :], scores * scale, jnp.finfo(jnp.float32).min)


# Names of the blocked attention's saved residuals (its output, and per row the max score and the log of the
# exponentials' sum, whose sum is the log-sum-exp): `remat_policy` adds them to every saving policy, so a
# rematerialised block keeps them instead of re-running the attention forward.
ATTENTION_RESIDUALS = ("attention_out", "attention_softmax_stats")


def attend_causal_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: ModelConfig,
                         dtype) -> jax.Array:
    """`attend` for a decoder without a cache, in causal query blocks of `cfg.attention_block`: block [i, j)
    reads only keys [0, j). Every key after j is masked for all of the block's queries (`mask` is causal), so
    this skips about half of the score matrix and computes the same function, except for query rows whose
    every key is masked (left-padding positions: their uniform average runs over [0, j) instead of [0, s);
    no real token reads them). Shapes as `attend` with `kv="bskd"`; q, k and v are put heads-major once
    (`[b, kv, (group,) s, head_dim]`), so the blocks' dots slice contiguous memory instead of each
    transposing its own slice.

    The backward pass is FlashAttention's (Dao et al. 2022, arXiv:2205.14135, Appendix B, Algorithm 4; keys
    not tiled): it keeps only the output and each row's max score and log-sum of exponentials (kept apart, not
    summed into the log-sum-exp, so a fully masked row recomputes its exact 1 / j weights), recomputes a
    block's probabilities from them, and forms the softmax gradient with rowsum(dO * O) instead of a pass over
    the probabilities, so it needs no `[q, k]` residual. Gradients equal plain autodiff's to float32 rounding
    (tests/test_compute_options.py). The price is one more q·k dot per block in the backward pass, paid back
    by not writing and re-reading the probabilities (`benchmarks/attention.py`)."""
    b, s = q.shape[:2]
    qh, kh, vh = q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = _causal_blocks(qh, kh, vh, mask, cfg.attention_block, 1.0 / math.sqrt(cfg.head_dim), jnp.dtype(dtype))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, cfg.n_heads, cfg.head_dim)


def _block_bounds(s: int, step: int):
    return [(i, min(i + step, s)) for i in range(0, s, step)]


def _block_scores(qh: jax.Array, kh: jax.Array, mask: jax.Array, i: int, j: int, scale: float) -> jax.Array:
    """Scaled, masked float32 scores `[b, kv, group, j - i, j]` of query block [i, j) over keys [0, j) (scaled in
    float32, as `attend` does, so a bfloat16 q is not rounded again)."""
    scores = jnp.einsum("bkgqd,bksd->bkgqs", qh[:, :, :, i:j], kh[:, :, :j], preferred_element_type=jnp.float32)
    return _scale_and_mask(scores, mask[:, i:j, :j], scale)


def _causal_blocks_forward(qh, kh, vh, mask, step, scale, dtype):
    """(output `[b, kv, group, s, head_dim]` in `dtype`, softmax statistics `[b, kv, group, s, 2]` float32:
    each row's max score and the log of its exponentials' sum)."""
    outs, stats = [], []
    for i, j in _block_bounds(qh.shape[3], step):
        scores = _block_scores(qh, kh, mask, i, j, scale)
        top = jnp.max(scores, axis=-1, keepdims=True)
        unnorm = jnp.exp(scores - top)
        total = jnp.sum(unnorm, axis=-1, keepdims=True)
        pv = jnp.einsum("bkgqs,bksd->bkgqd", unnorm.astype(dtype), vh[:, :, :j], preferred_element_type=jnp.float32)
        outs.append((pv / total).astype(dtype))
        stats.append(jnp.concatenate([top, jnp.log(total)], axis=-1))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(stats, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _causal_blocks(qh, kh, vh, mask, step, scale, dtype):
    return _causal_blocks_forward(qh, kh, vh, mask, step, scale, dtype)[0]


def _causal_blocks_fwd(qh, kh, vh, mask, step, scale, dtype):
    out, stats = _causal_blocks_forward(qh, kh, vh, mask, step, scale, dtype)
    out, stats = checkpoint_name(out, ATTENTION_RESIDUALS[0]), checkpoint_name(stats, ATTENTION_RESIDUALS[1])
    return out, (qh, kh, vh, mask, out, stats)


def _causal_blocks_bwd(step, scale, dtype, residuals, d_out):
    qh, kh, vh, mask, out, stats = residuals
    # rowsum(dP * P) = rowsum(dO * O) (FlashAttention's D): one pass over [s, head_dim] instead of [s, s]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_q, d_k, d_v = [], jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
    for i, j in _block_bounds(qh.shape[3], step):
        mask_ij = mask[:, None, None, i:j, :j]
        top, log_total = stats[:, :, :, i:j, :1], stats[:, :, :, i:j, 1:]
        probs = jnp.exp(_block_scores(qh, kh, mask, i, j, scale) - top - log_total)   # fully masked rows: 1 / j
        d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_out[:, :, :, i:j], vh[:, :, :j], preferred_element_type=jnp.float32)
        # gradient of the unscaled q·k dot: the softmax gradient times the scale
        d_scores = (jnp.where(mask_ij, probs * (d_probs - delta[:, :, :, i:j]), 0.0) * scale).astype(dtype)
        d_q.append(jnp.einsum("bkgqs,bksd->bkgqd", d_scores, kh[:, :, :j], preferred_element_type=jnp.float32))
        d_k = d_k.at[:, :, :j].add(jnp.einsum("bkgqs,bkgqd->bksd", d_scores, qh[:, :, :, i:j],
                                              preferred_element_type=jnp.float32))
        d_v = d_v.at[:, :, :j].add(jnp.einsum("bkgqs,bkgqd->bksd", probs.astype(dtype), d_out[:, :, :, i:j],
                                              preferred_element_type=jnp.float32))
    d_q = jnp.concatenate(d_q, axis=3)
    return d_q.astype(qh.dtype), d_k.astype(kh.dtype), d_v.astype(vh.dtype), None


_causal_blocks.defvjp(_causal_blocks_fwd, _causal_blocks_bwd)


def attention_impl(cfg: ModelConfig, backend: str | None = None) -> str:
    """The attention implementation `cfg.attention` names on `backend` (default: JAX's default backend):
    itself, or for "auto" the backend's entry of `AUTO_ATTENTION` ("xla" where it has none). All of them
    compute the same function (tests/test_compute_options.py); only speed and memory differ."""
    if cfg.attention != "auto":
        return cfg.attention
    return AUTO_ATTENTION.get(backend or jax.default_backend(), "xla")


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention; q head h reads kv head h // (n_heads // n_kv_heads).

    `cfg.attention` picks how (never what) is computed when there is no KV cache (`attention_impl`; "auto"
    picks per backend): "xla" (full score matrix, masked), "blocked" (decoders, `attend_causal_blocks`:
    causal query blocks of `cfg.attention_block` that read only the keys up to the block's end) or
    "dot_product_attention" (`jax.nn.dot_product_attention`, which uses cuDNN's fused kernel on GPU).
    Decoding with a cache always uses the full path over the cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, adapters=None, cache=None):
        """`adapters`: optional {"q"|"k"|"v"|"o": LowRankMix} increments of this layer's projections.

        `cache`: optional `(k, v, index)` of this layer, k/v `[b, kv_heads, T, head_dim]` and a scalar
        int `index`: the queries attend over all T cached positions with the new keys/values at
        `[index, index + s)` (`mask` is then `[b, s, T]`). Returns `(out, (k_new, v_new))` with a cache — only
        the new entries `[b, kv_heads, s, head_dim]`, which the caller writes into its cache, so a decode step
        moves one slot per layer instead of re-stacking the whole cache — else `out`.
        """
        cfg = self.cfg
        adapters = adapters or {}
        dtype = compute_dtype(cfg)
        b, s, _ = x.shape
        kw = dict(in_axes=("embed",), use_bias=cfg.attn_bias, dtype=dtype, kernel_std=cfg.initializer_range)
        q_shape, kv_shape = (cfg.n_heads, cfg.head_dim), (cfg.n_kv_heads, cfg.head_dim)
        q = Dense(q_shape, out_axes=("heads", "head_dim"), name="q", **kw)(x, adapters.get("q"))
        k = Dense(kv_shape, out_axes=("kv_heads", "head_dim"), name="k", **kw)(x, adapters.get("k"))
        v = Dense(kv_shape, out_axes=("kv_heads", "head_dim"), name="v", **kw)(x, adapters.get("v"))
        if cfg.family == "llama":
            inv_freq = rope_inverse_frequencies(cfg)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        groups = cfg.n_heads // cfg.n_kv_heads
        q = q.reshape(b, s, cfg.n_kv_heads, groups, cfg.head_dim)          # [b, q, kv, group, hd]
        kv = "bskd"                  # keys/values [b, s, kv, hd] as projected
        if cache is not None:        # heads-major cache [b, kv, T, hd]: the dots below batch over (b, kv) as stored
            k_cache, v_cache, index = cache
            new_cache = (k.transpose(0, 2, 1, 3).astype(k_cache.dtype), v.transpose(0, 2, 1, 3).astype(v_cache.dtype))
            k = jax.lax.dynamic_update_slice(k_cache, new_cache[0], (0, 0, index, 0)).astype(dtype)
            v = jax.lax.dynamic_update_slice(v_cache, new_cache[1], (0, 0, index, 0)).astype(dtype)
            kv = "bksd"
        impl = attention_impl(cfg)
        if cache is None and impl == "dot_product_attention":
            out = jax.nn.dot_product_attention(q.reshape(b, s, cfg.n_heads, cfg.head_dim), k, v,
                                               mask=mask[:, None], scale=1.0 / math.sqrt(cfg.head_dim))
        elif cache is None and impl == "blocked" and cfg.is_decoder and s > cfg.attention_block:
            out = attend_causal_blocks(q, k, v, mask, cfg, dtype)
        else:
            out = attend(q, k, v, mask, kv, cfg, dtype)
        out = Dense((cfg.d_model,), in_axes=("heads", "head_dim"), out_axes=("embed",), use_bias=cfg.attn_bias,
                    dtype=dtype, kernel_std=cfg.initializer_range, name="o")(out, adapters.get("o"))
        return out if cache is None else (out, new_cache)


ACTIVATION_FNS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class MLP(nn.Module):
    """Feed-forward block: `wo(act(wi x))`, or SwiGLU `wo(act(wg x) * wi x)` for LLaMA."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, adapters=None) -> jax.Array:
        """`adapters`: optional {"wi"|"wg"|"wo": LowRankMix} increments of this layer's projections."""
        cfg = self.cfg
        adapters = adapters or {}
        kw = dict(use_bias=cfg.mlp_bias, dtype=compute_dtype(cfg), kernel_std=cfg.initializer_range)
        act = ACTIVATION_FNS[cfg.activation]
        up = Dense((cfg.d_ff,), in_axes=("embed",), out_axes=("mlp",), name="wi", **kw)(x, adapters.get("wi"))
        if cfg.family == "llama":
            gate = Dense((cfg.d_ff,), in_axes=("embed",), out_axes=("mlp",), name="wg", **kw)(x, adapters.get("wg"))
            h = act(gate) * up
        else:
            h = act(up)
        return Dense((cfg.d_model,), in_axes=("mlp",), out_axes=("embed",), name="wo", **kw)(h, adapters.get("wo"))


class Block(nn.Module):
    """One transformer layer, written as an `nn.scan` body over the stacked `layers` axis.

    carry = (residual stream `[b, s, d]`, FFN input of this layer `[b, s, d]`). Pre-LN for decoders
    (GPT-2, LLaMA), post-LN for BERT. The FFN input after its norm (pre-LN) or after the attention
    sub-layer's norm (post-LN) is what kNN-LM uses as its key. `adapters` maps "attn.o"-style target
    names (`jaxcl.models.lowrank.TARGET_MODULES`) to this layer's `LowRankMix` (scanned over layers).
    """

    cfg: ModelConfig
    deterministic: bool = True
    collect: bool = False          # also emit this layer's output as a scan output (hidden_states)

    @nn.compact
    def __call__(self, carry, mask: jax.Array, positions: jax.Array, adapters=None, cache=None):
        """`cache`: this layer's `(k, v)` and the shared write index (decoding); the new entries `(k, v)`
        `[b, kv_heads, s, head_dim]` are returned as a scan output."""
        cfg = self.cfg
        x, _ = carry
        adapters = adapters or {}
        attn_adapters = {k.split(".", 1)[1]: v for k, v in adapters.items() if k.startswith("attn.")}
        mlp_adapters = {k.split(".", 1)[1]: v for k, v in adapters.items() if k.startswith("mlp.")}
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic or cfg.dropout == 0.0)
        attn = Attention(cfg, name="attn")
        mlp = MLP(cfg, name="mlp")
        new_cache = None
        if cfg.is_decoder:
            attended = attn(make_norm(cfg, "attn_norm")(x), mask, positions, attn_adapters, cache)
            if cache is not None:
                attended, new_cache = attended
            x = x + drop(attended)
            ffn_in = make_norm(cfg, "mlp_norm")(x)
            x = x + drop(mlp(ffn_in, mlp_adapters))
        else:
            ffn_in = make_norm(cfg, "attn_norm")(x + drop(attn(x, mask, positions, attn_adapters)))
            x = make_norm(cfg, "mlp_norm")(ffn_in + drop(mlp(ffn_in, mlp_adapters)))
        return (x, ffn_in), ((x if self.collect else None), new_cache)


def remat_policy(cfg: ModelConfig):
    """The `jax.checkpoint` policy `cfg.remat` names (None for "full": save nothing). The saving policies also
    keep `ATTENTION_RESIDUALS`: the blocked attention's output `[b, kv, group, s, head_dim]` (d_model values per
    token) and its softmax statistics `[b, kv, group, s, 2]` (each row's max score and log-sum of
    exponentials), so a rematerialised block does not re-run the attention forward in its backward pass."""
    policies = jax.checkpoint_policies
    policy = {"full": None, "dots_saveable": policies.dots_saveable,
              "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable}[cfg.remat]
    if policy is None:
        return None
    return policies.save_from_both_policies(policy, policies.save_only_these_names(*ATTENTION_RESIDUALS))


def block_class(cfg: ModelConfig, in_scan: bool = True) -> type[nn.Module]:
    """`Block`, or `Block` under `nn.remat` with `remat_policy(cfg)` (the backward pass then recomputes what the
    policy does not save instead of reading stored residuals: less memory, often less time on CPU where the
    stored buffers are written and re-read). Same values and gradients either way."""
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=remat_policy(cfg), prevent_cse=not in_scan)


def stacked_layers(cfg: ModelConfig, deterministic: bool, name: str = "layers", collect: bool = False) -> nn.Module:
    """All `n_layers` blocks as one scanned module with a leading `layers` axis on every parameter.

    With `collect`, the scan also returns every layer's output `[n_layers, b, s, d]` (hidden_states).
    """
    scanned = nn.scan(
        block_class(cfg),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0),       # mask, positions, adapters and cache [layers, ...]
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, deterministic, collect, name=name)


def unrolled_layers(cfg: ModelConfig, deterministic: bool, collect: bool, carry, mask: jax.Array,
                    positions: jax.Array, adapters, cache):
    """The same `n_layers` blocks as `stacked_layers`, as an unrolled loop of modules `layers_0` … (the
    per-layer parameter layout of `jaxcl.models.layout`); call it inside a parent's compact method.

    `adapters` keep their leading `layers` axis (layer i reads index i); `cache` is `(k, v, index)` with k and
    v sequences of `n_layers` per-layer caches `[b, kv_heads, T, head_dim]`. Returns what the scan returns:
    `(carry, (outputs [L, b, s, d] | None, (k_new, v_new) per-layer tuples | None))`.
    """
    outputs, k_new, v_new = [], [], []
    for i in range(cfg.n_layers):
        layer_adapters = jax.tree.map(lambda a, i=i: a[i], adapters)
        layer_cache = None if cache is None else (cache[0][i], cache[1][i], cache[2])
        carry, (out, entries) = block_class(cfg, in_scan=False)(cfg, deterministic, collect, name=f"layers_{i}")(
            carry, mask, positions, layer_adapters, layer_cache)
        outputs.append(out)
        if entries is not None:
            k_new.append(entries[0])
            v_new.append(entries[1])
    return carry, (jnp.stack(outputs) if collect else None, (tuple(k_new), tuple(v_new)) if cache is not None else None)

