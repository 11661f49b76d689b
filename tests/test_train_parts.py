"""Losses, masking, optimizer pieces and continual-learning metrics against hand-computed references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.config import OptimConfig
from jaxcl.eval import accuracy_forgetting, average_seen, backward_transfer, perplexity_forgetting
from jaxcl.models import ModelConfig, init_params
from jaxcl.train import causal_lm_nll, learning_rate_schedule, mask_tokens, masked_lm_nll, weight_decay_mask


def log_softmax_np(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_causal_lm_nll_matches_numpy_and_skips_padding():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 5, 7).astype(np.float32)
    ids = rng.randint(0, 7, (2, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    total, n, per_token = causal_lm_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    lp = log_softmax_np(logits)
    expected = [-lp[b, t, ids[b, t + 1]] for b in range(2) for t in range(4) if mask[b, t] and mask[b, t + 1]]
    assert float(n) == len(expected) == 6
    np.testing.assert_allclose(float(total), sum(expected), rtol=1e-5)
    assert float(per_token[1, 2]) == 0.0 and float(per_token[1, 3]) == 0.0


def test_masked_lm_nll_scores_only_masked_positions():
    rng = np.random.RandomState(1)
    logits = rng.randn(1, 4, 6).astype(np.float32)
    labels = np.array([[2, 3, 4, 5]])
    chosen = np.array([[0, 1, 0, 1]])
    total, n, _ = masked_lm_nll(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(chosen))
    lp = log_softmax_np(logits)
    np.testing.assert_allclose(float(total), -(lp[0, 1, 3] + lp[0, 3, 5]), rtol=1e-5)
    assert float(n) == 2


def test_mask_tokens_follows_bert_recipe():
    ids = jnp.full((64, 256), 7, jnp.int32)
    mask = jnp.ones_like(ids).at[:, 200:].set(0)
    corrupted, labels, chosen = mask_tokens(jax.random.key(0), ids, mask, vocab_size=1000, mask_token_id=3,
                                            probability=0.15)
    chosen, corrupted = np.asarray(chosen), np.asarray(corrupted)
    assert not chosen[:, 200:].any()                                   # never padding
    assert abs(chosen[:, :200].mean() - 0.15) < 0.01
    picked = corrupted[chosen]
    assert abs((picked == 3).mean() - 0.8) < 0.02                      # 80 % [MASK]
    assert abs(((picked != 3) & (picked != 7)).mean() - 0.1) < 0.02    # ~10 % random (rarely 7 by chance)
    assert (corrupted[~chosen] == 7).all() and (np.asarray(labels) == 7).all()


def test_learning_rate_schedule_warms_up_then_decays_to_floor():
    schedule = learning_rate_schedule(OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1), total_steps=100)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 1e-4, rtol=1e-5)
    assert float(schedule(50)) < float(schedule(20))


def test_weight_decay_applies_to_matrices_only():
    cfg = ModelConfig(family="gpt2", vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8)
    mask = weight_decay_mask(init_params(cfg, jax.random.key(0)))
    assert mask["embed"]["embedding"] and mask["layers"]["mlp"]["wi"]["kernel"]
    assert not mask["layers"]["mlp"]["wi"]["bias"] and not mask["final_norm"]["scale"]


MATRIX = [[10.0, 50.0, 80.0],
          [14.0, 20.0, 60.0],
          [18.0, 26.0, 30.0]]


def test_perplexity_summaries_golden():
    assert average_seen(MATRIX) == pytest.approx((18 + 26 + 30) / 3)
    assert perplexity_forgetting(MATRIX) == pytest.approx(((18 - 10) + (26 - 20)) / 2)


ACC = [[0.9, 0.1, 0.0],
       [0.7, 0.8, 0.2],
       [0.6, 0.85, 0.9]]


def test_accuracy_summaries_golden():
    assert average_seen(ACC) == pytest.approx((0.6 + 0.85 + 0.9) / 3)
    assert accuracy_forgetting(ACC) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.85)) / 2)
    assert backward_transfer(ACC) == pytest.approx(((0.6 - 0.9) + (0.85 - 0.8)) / 2)


def test_changed_config_keys_are_listed_for_the_resume_warning():
    from jaxcl.train.loop import _changed_keys

    old = {"train": {"steps": 100, "log_every": 10}, "data": {"domains": ["a", "b"]}}
    new = {"train": {"steps": 200, "log_every": 10}, "data": {"domains": ["a", "b"]}, "run": {"seed": 1}}
    assert _changed_keys(old, new) == ["run", "train.steps"]
    assert _changed_keys(old, old) == []
