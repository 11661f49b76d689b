"""Token-level losses returned as (sum of NLL, number of scored tokens), so that they add across
batches, hosts and devices exactly and perplexity is exp(total NLL / total tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def causal_lm_nll(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None):
    """Next-token NLL: position t predicts token t+1; only pairs of two real tokens are scored.

    logits [batch, seq, vocab], input_ids/attention_mask [batch, seq] -> (nll_sum, n_tokens), and the
    per-token NLL [batch, seq-1] with zeros where not scored.

    The cross-entropy runs over all `seq` positions with the last one weighted 0 (its target is a wrapped-around
    token) instead of over `logits[:, :-1]`: slicing would copy the `[batch, seq, vocab]` logits and its
    gradient would pad and scatter them back; each position's value is the same either way.
    """
    targets = jnp.roll(input_ids, -1, axis=1)                  # position t predicts token t+1
    weights = causal_lm_weights(input_ids, attention_mask)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets) * weights
    return jnp.sum(nll), jnp.sum(weights), nll[:, :-1]


def causal_lm_weights(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """[batch, seq] float32: 1 where position t is scored (it and t+1 are real tokens, t is not last), else 0."""
    last = jnp.arange(input_ids.shape[1]) < input_ids.shape[1] - 1
    weights = jnp.broadcast_to(last, input_ids.shape).astype(jnp.float32)
    if attention_mask is not None:
        weights = weights * (attention_mask * jnp.roll(attention_mask, -1, axis=1)).astype(jnp.float32)
    return weights


def masked_lm_nll(logits: jax.Array, labels: jax.Array, label_mask: jax.Array):
    """MLM NLL on the masked positions only: (nll_sum, n_tokens, per-token NLL [batch, seq])."""
    weights = label_mask.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels) * weights
    return jnp.sum(nll), jnp.sum(weights), nll


def mask_tokens(rng: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *, vocab_size: int,
                mask_token_id: int, probability: float = 0.15, special_ids: tuple[int, ...] = ()):
    """BERT masking: choose `probability` of real tokens; 80 % -> [MASK], 10 % random, 10 % kept.

    Returns (corrupted ids, labels = original ids, label_mask of chosen positions).
    """
    k_choose, k_kind, k_rand = jax.random.split(rng, 3)
    eligible = attention_mask.astype(bool)
    for sid in special_ids:
        eligible &= input_ids != sid
    chosen = eligible & (jax.random.uniform(k_choose, input_ids.shape) < probability)
    kind = jax.random.uniform(k_kind, input_ids.shape)
    random_ids = jax.random.randint(k_rand, input_ids.shape, 0, vocab_size, dtype=input_ids.dtype)
    corrupted = jnp.where(chosen & (kind < 0.8), mask_token_id, input_ids)
    corrupted = jnp.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, corrupted)
    return corrupted, input_ids, chosen
