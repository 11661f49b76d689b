"""kNN-LM mixing (Khandelwal et al. 2020): p = (1 - λ) p_LM + λ p_kNN, computed in log space.

p_kNN(y) = Σ_i softmax(-d_i / T) 1[v_i = y] over the retrieved neighbours (squared-L2 distances d_i,
values v_i). Two entry points:

- `knn_lm_logprobs`: the whole mixed distribution `[..., vocab]` (next-word accuracy, generation);
- `knn_lm_target_logprobs`: only log p(target) `[...]` (perplexity and SeMem admission), which needs
  no `[..., vocab]` scatter and is what evaluation uses.

Both are stable for distances in the thousands (softmax subtracts the minimum distance), any k
(1024 included), duplicate values among the neighbours, λ anywhere in [0, 1] (a scalar or one λ
per position) and padded neighbours (`neighbor_mask`, or an infinite distance): a position with no
valid neighbour falls back to p_LM. A probability of exactly zero is -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["knn_lm_logprobs", "knn_lm_target_logprobs", "knn_neighbor_logweights", "mix_logprobs"]


def knn_neighbor_logweights(dists: jax.Array, temperature: float | jax.Array = 1.0,
                            neighbor_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """log softmax(-d / T) over the neighbour axis, and whether the position has any valid neighbour.

    Why separate: both entry points (full vocabulary and target-only) share the same neighbour weights.
    dists [..., k] squared L2; temperature scalar or [...]; neighbor_mask [..., k] bool (True = valid).
    """
    dists = jnp.asarray(dists, jnp.float32)
    valid = jnp.isfinite(dists)
    if neighbor_mask is not None:
        valid = valid & neighbor_mask.astype(bool)
    temperature = jnp.asarray(temperature, jnp.float32)
    if temperature.ndim:
        temperature = temperature[..., None]
    scores = jnp.where(valid, -jnp.where(valid, dists, 0.0) / temperature, -jnp.inf)     # [..., k]
    any_valid = jnp.any(valid, axis=-1)                                                  # [...]
    safe = jnp.where(any_valid[..., None], scores, 0.0)       # a row without neighbours must not make NaNs
    logw = jax.nn.log_softmax(safe, axis=-1)
    return jnp.where(valid, logw, -jnp.inf), any_valid


def mix_logprobs(lm_logp: jax.Array, knn_logp: jax.Array, lam: float | jax.Array,
                 any_valid: jax.Array | None = None) -> jax.Array:
    """log((1 - λ) exp(lm_logp) + λ exp(knn_logp)); λ = 0 where `any_valid` is False.

    lm_logp and knn_logp broadcast together; lam is a scalar or broadcastable to them.
    """
    lam = jnp.asarray(lam, jnp.float32)
    if any_valid is not None:
        lam = jnp.where(any_valid, lam, 0.0)
    lam = jnp.broadcast_to(lam, jnp.broadcast_shapes(lam.shape, lm_logp.shape))
    log_lam = jnp.where(lam > 0, jnp.log(jnp.where(lam > 0, lam, 1.0)), -jnp.inf)
    log_1m = jnp.where(lam < 1, jnp.log1p(-jnp.where(lam < 1, lam, 0.0)), -jnp.inf)
    a, b = log_1m + lm_logp, log_lam + knn_logp
    hi = jnp.maximum(a, b)
    hi_safe = jnp.where(jnp.isfinite(hi), hi, 0.0)
    return jnp.where(jnp.isneginf(hi), -jnp.inf,
                     hi_safe + jnp.log(jnp.exp(a - hi_safe) + jnp.exp(b - hi_safe)))


def knn_lm_logprobs(lm_logits: jax.Array, dists: jax.Array, neighbor_values: jax.Array,
                    lam: float | jax.Array = 0.25, temperature: float | jax.Array = 1.0,
                    neighbor_mask: jax.Array | None = None) -> jax.Array:
    """The mixed next-token log-distribution `[..., vocab]` (float32).

    lm_logits [..., vocab]; dists [..., k] squared-L2 distances; neighbor_values [..., k] int token ids;
    lam: scalar or [...] (per-position λ, e.g. from the calibrator); temperature: scalar or [...].
    """
    vocab = lm_logits.shape[-1]
    lm_logp = jax.nn.log_softmax(jnp.asarray(lm_logits, jnp.float32), axis=-1)          # [..., V]
    logw, any_valid = knn_neighbor_logweights(dists, temperature, neighbor_mask)        # [..., k]
    batch_shape = logw.shape[:-1]
    flat_w = jnp.exp(logw).reshape(-1, logw.shape[-1])                                   # [N, k]
    flat_v = jnp.clip(neighbor_values.reshape(-1, logw.shape[-1]).astype(jnp.int32), 0, vocab - 1)
    rows = jnp.arange(flat_w.shape[0])[:, None]
    p_knn = jnp.zeros((flat_w.shape[0], vocab), jnp.float32).at[rows, flat_v].add(flat_w)   # [N, V]
    knn_logp = jnp.where(p_knn > 0, jnp.log(jnp.where(p_knn > 0, p_knn, 1.0)), -jnp.inf)
    knn_logp = knn_logp.reshape(*batch_shape, vocab)
    lam = jnp.asarray(lam, jnp.float32)
    lam = lam[..., None] if lam.ndim else lam
    return mix_logprobs(lm_logp, knn_logp, lam, any_valid[..., None])


def knn_lm_target_logprobs(lm_target_logprobs: jax.Array, dists: jax.Array, neighbor_values: jax.Array,
                           targets: jax.Array, lam: float | jax.Array = 0.25,
                           temperature: float | jax.Array = 1.0,
                           neighbor_mask: jax.Array | None = None) -> jax.Array:
    """log p(target) under the mixture `[...]`, without building the `[..., vocab]` distribution.

    lm_target_logprobs [...] = log p_LM(target); dists / neighbor_values [..., k]; targets [...] int.
    """
    logw, any_valid = knn_neighbor_logweights(dists, temperature, neighbor_mask)        # [..., k]
    match = neighbor_values.astype(jnp.int32) == targets.astype(jnp.int32)[..., None]
    knn_logp = jax.nn.logsumexp(jnp.where(match, logw, -jnp.inf), axis=-1)              # [...]
    return mix_logprobs(jnp.asarray(lm_target_logprobs, jnp.float32), knn_logp, lam, any_valid)
