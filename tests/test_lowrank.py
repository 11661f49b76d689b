"""Low-rank increment mixing inside the models equals the explicit `W + Σ w_k down_kᵀ up_k` forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models import ModelConfig, build, init_params
from jaxcl.models.lowrank import LowRankMix, gather_mix, lowrank_delta, materialize_delta

CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=16),
    "llama": ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48),
    "bert": ModelConfig(family="bert", vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=16),
}


def random_bank(rng, n_layers, slots, rank, d_in, d_out):
    k1, k2 = jax.random.split(rng)
    return (jax.random.normal(k1, (n_layers, slots, rank, d_in)) * 0.3,
            jax.random.normal(k2, (n_layers, slots, rank, d_out)) * 0.3)


def with_explicit_delta(params, target, delta):
    """params with `delta [layers, d_in, d_out]` added to the target kernel (reshaped to its layout)."""
    sub, name = target.split(".")
    params = jax.tree.map(lambda x: x, params)
    kernel = params["layers"][sub][name]["kernel"]
    params["layers"][sub][name]["kernel"] = kernel + delta.reshape(kernel.shape)
    return params


@pytest.mark.parametrize("family,per_example", [("gpt2", False), ("llama", True), ("bert", True), ("bert", False)])
def test_mixed_forward_matches_explicit_weights(family, per_example):
    cfg = CONFIGS[family]
    params = init_params(cfg, jax.random.key(0))
    model = build(cfg)
    batch, seq, slots, rank, top_k = 3, 7, 6, 2, 3
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
    d_attn = cfg.n_heads * cfg.head_dim
    down, up = random_bank(jax.random.key(2), cfg.n_layers, slots, rank, d_attn, cfg.d_model)
    groups = batch if per_example else 1
    chosen = jnp.array([[4, 1, 2], [0, 5, 3], [2, 3, 4]])[:groups]                 # [G, K]
    weights = jax.random.uniform(jax.random.key(3), (groups, top_k)) + 0.1
    weights = weights / weights.sum(-1, keepdims=True)
    mix = gather_mix(down, up, chosen, weights)

    mixed = jax.jit(lambda p, x, m: model.apply({"params": p}, x, adapters={"attn.o": m}).hidden)(params, ids, mix)
    for g in range(groups):
        rows = slice(None) if groups == 1 else slice(g, g + 1)
        delta = jnp.einsum("k,lkri,lkro->lio", weights[g], down[:, chosen[g]], up[:, chosen[g]])
        ref = model.apply({"params": with_explicit_delta(params, "attn.o", delta)}, ids[rows]).hidden
        np.testing.assert_allclose(np.asarray(mixed[rows]), np.asarray(ref), atol=1e-5, rtol=0)
    # The increment changed the output, so the comparison above is not trivially true.
    plain = model.apply({"params": params}, ids).hidden
    assert float(jnp.max(jnp.abs(plain - mixed))) > 1e-2


@pytest.mark.parametrize("target", ["attn.q", "mlp.wo"])
def test_other_target_modules(target):
    cfg = CONFIGS["llama"]
    params = init_params(cfg, jax.random.key(0))
    model = build(cfg)
    ids = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
    kernel = params["layers"][target.split(".")[0]][target.split(".")[1]]["kernel"]   # [L, *in, *out]
    d_in = kernel.shape[1]
    d_out = int(np.prod(kernel.shape[2:]))
    down, up = random_bank(jax.random.key(2), cfg.n_layers, 4, 3, d_in, d_out)
    mix = gather_mix(down, up, jnp.array([[0, 2]]), jnp.array([[0.25, 0.75]]))
    out = model.apply({"params": params}, ids, adapters={target: mix}).logits
    delta = jnp.einsum("k,lkri,lkro->lio", jnp.array([0.25, 0.75]), down[:, [0, 2]], up[:, [0, 2]])
    ref = model.apply({"params": with_explicit_delta(params, target, delta)}, ids).logits
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_zero_up_factors_leave_the_model_unchanged():
    cfg = CONFIGS["bert"]
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
    down = jax.random.normal(jax.random.key(2), (cfg.n_layers, 2, 4, cfg.d_model))
    mix = gather_mix(down, jnp.zeros_like(down), jnp.array([[0, 1]]), jnp.array([[0.5, 0.5]]))
    out = build(cfg).apply({"params": params}, ids, adapters={"attn.o": mix}).hidden
    plain = build(cfg).apply({"params": params}, ids).hidden
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-6, rtol=0)


def test_lowrank_delta_equals_materialized_matrix():
    rng = jax.random.split(jax.random.key(0), 4)
    mix = LowRankMix(down=jax.random.normal(rng[0], (1, 3, 2, 12)), up=jax.random.normal(rng[1], (1, 3, 2, 10)),
                     weights=jax.random.uniform(rng[2], (1, 3)))
    x = jax.random.normal(rng[3], (4, 5, 12))
    np.testing.assert_allclose(np.asarray(lowrank_delta(x, mix)), np.asarray(x @ materialize_delta(mix)[0]),
                               atol=1e-5, rtol=1e-5)


def test_bad_shapes_and_targets_are_named():
    mix = LowRankMix(down=jnp.zeros((1, 2, 2, 8)), up=jnp.zeros((1, 2, 2, 8)), weights=jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="8 input features"):
        lowrank_delta(jnp.zeros((2, 3, 6)), mix)
    two = LowRankMix(down=jnp.zeros((2, 2, 2, 8)), up=jnp.zeros((2, 2, 2, 8)), weights=jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="batch of 3"):
        lowrank_delta(jnp.zeros((3, 4, 8)), two)
    cfg = CONFIGS["gpt2"]
    with pytest.raises(ValueError, match="unknown adapter target 'attn.out'"):
        build(cfg).apply({"params": init_params(cfg, jax.random.key(0))}, jnp.zeros((1, 4), jnp.int32),
                         adapters={"attn.out": mix})
