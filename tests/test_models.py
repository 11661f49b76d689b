"""Model-family invariants that need no reference implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcl.models import ConfigError, ModelConfig, abstract_params, build, init_params, mean_pool, param_axes

CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=67, d_model=32, n_layers=2, n_heads=4, max_seq_len=32),
    "llama": ModelConfig(family="llama", vocab_size=67, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48),
    "bert": ModelConfig(family="bert", vocab_size=67, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, pooler=True),
}
KNOWN_AXES = {"vocab", "embed", "embed_out", "heads", "kv_heads", "head_dim", "mlp", "layers", "position", None}


def apply(cfg, params, ids, mask=None, **kw):
    return build(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32),
                            None if mask is None else jnp.asarray(mask), **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_param_has_logical_axes_and_float32(name):
    cfg = CONFIGS[name]
    axes = param_axes(cfg)
    shapes = abstract_params(cfg)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_axes) == len(flat_shapes)
    for spec, shape in zip(flat_axes, flat_shapes):
        assert len(spec) == len(shape.shape) and set(spec) <= KNOWN_AXES and shape.dtype == jnp.float32
    for spec in jax.tree.leaves(axes["layers"], is_leaf=lambda x: isinstance(x, PartitionSpec)):
        assert spec[0] == "layers"
    assert sum(s.size for s in flat_shapes) == cfg.num_params()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_is_causal(name):
    cfg = CONFIGS[name]
    params = init_params(cfg, jax.random.key(0))
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 10))
    changed = ids.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % cfg.vocab_size
    a, b = apply(cfg, params, ids), apply(cfg, params, changed)
    np.testing.assert_array_equal(np.asarray(a.logits[:, :6]), np.asarray(b.logits[:, :6]))
    assert not np.allclose(np.asarray(a.logits[:, 6:]), np.asarray(b.logits[:, 6:]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_right_padding_does_not_change_real_positions(name):
    cfg = CONFIGS[name]
    params = init_params(cfg, jax.random.key(1))
    ids = np.random.RandomState(1).randint(1, cfg.vocab_size, (1, 7))
    padded = np.concatenate([ids, np.zeros((1, 5), int)], axis=1)
    mask = np.concatenate([np.ones((1, 7), int), np.zeros((1, 5), int)], axis=1)
    short, long = apply(cfg, params, ids), apply(cfg, params, padded, mask)
    np.testing.assert_allclose(np.asarray(long.hidden[:, :7]), np.asarray(short.hidden), atol=1e-5)
    np.testing.assert_allclose(np.asarray(mean_pool(long.hidden, jnp.asarray(mask))),
                               np.asarray(short.hidden.mean(axis=1)), atol=1e-5)


def test_left_padding_with_explicit_positions_matches_unpadded():
    """Left-padded batches give the unpadded result when positions count from the first real token."""
    cfg = CONFIGS["llama"]
    params = init_params(cfg, jax.random.key(2))
    ids = np.random.RandomState(2).randint(1, cfg.vocab_size, (1, 6))
    padded = np.concatenate([np.zeros((1, 3), int), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), int), np.ones((1, 6), int)], axis=1)
    positions = jnp.asarray(np.maximum(np.cumsum(mask, axis=1) - 1, 0), jnp.int32)
    out = apply(cfg, params, padded, mask, positions=positions)
    np.testing.assert_allclose(np.asarray(out.logits[:, 3:]), np.asarray(apply(cfg, params, ids).logits), atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
    cfg = CONFIGS[name]
    params = init_params(cfg.replace(dtype="bfloat16"), jax.random.key(3))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    ids = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 8))
    lo, hi = apply(cfg.replace(dtype="bfloat16"), params, ids), apply(cfg, params, ids)
    ref = hi.logits if hi.logits is not None else hi.hidden
    got = lo.logits if lo.logits is not None else lo.hidden
    assert got.dtype == (jnp.float32 if lo.logits is not None else jnp.bfloat16)
    err = np.abs(np.asarray(got, np.float32) - np.asarray(ref))
    assert err.max() < 0.1 * np.abs(np.asarray(ref)).max() and err.max() > 0   # really ran in bf16


def test_dropout_is_active_only_when_not_deterministic():
    cfg = CONFIGS["gpt2"].replace(dropout=0.3)
    params = init_params(cfg, jax.random.key(4))
    ids = np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 8))
    det = apply(cfg, params, ids)
    np.testing.assert_array_equal(np.asarray(det.logits), np.asarray(apply(cfg, params, ids).logits))
    drop = apply(cfg, params, ids, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert not np.allclose(np.asarray(drop.logits), np.asarray(det.logits))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_sharded_forward_on_8_devices_equals_single_device(name):
    """Params sharded by their logical axes on a (data=2, fsdp=2, tensor=2) mesh give the same outputs."""
    cfg = CONFIGS[name].replace(vocab_size=64)     # a shardable vocabulary
    params = init_params(cfg, jax.random.key(5))
    ids = np.random.RandomState(5).randint(0, cfg.vocab_size, (4, 8))
    ref = apply(cfg, params, ids)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
    shardings = nn.logical_to_mesh_sharding(param_axes(cfg), mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert len(sharded["layers"]["mlp"]["wi"]["kernel"].sharding.device_set) == 8
    batch = jax.device_put(jnp.asarray(ids, jnp.int32), NamedSharding(mesh, PartitionSpec("data")))
    out = jax.jit(lambda p, x: build(cfg).apply({"params": p}, x))(sharded, batch)
    np.testing.assert_allclose(np.asarray(out.hidden), np.asarray(ref.hidden), atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(family="gpt3"), "model.family='gpt3'"),
    (dict(n_heads=5), "model.n_heads=5 does not divide model.d_model=32"),
    (dict(family="llama", n_kv_heads=3), "model.n_kv_heads=3 does not divide model.n_heads=4"),
    (dict(n_kv_heads=2), "grouped-query attention is only supported for llama"),
    (dict(d_model=0), "model.d_model must be a positive integer"),
    (dict(activation="mish"), "model.activation='mish'"),
    (dict(dtype="float64"), "model.dtype='float64'"),
])
def test_bad_model_config_names_the_key(kwargs, message):
    base = dict(family="gpt2", vocab_size=10, d_model=32, n_layers=1, n_heads=4)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**{**base, **kwargs})


def test_config_dict_round_trip_and_unknown_keys():
    cfg = CONFIGS["llama"].replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="model.n_head"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_head": 4})


def test_too_long_input_names_the_shape():
    cfg = CONFIGS["gpt2"]
    with pytest.raises(ValueError, match=r"seq=40 > model.max_seq_len=32"):
        apply(cfg, init_params(cfg, jax.random.key(0)), np.zeros((1, 40), int))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_hidden_states_cover_text_positions_and_end_in_hidden_with_prompts(family):
    cfg = ModelConfig(family=family, vocab_size=40, d_model=16, n_layers=3, n_heads=2, max_seq_len=16,
                      num_prompts=2, prompt_length=2)
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 40, size=(2, 6)), jnp.int32)
    model = build(cfg)
    out = model.apply({"params": params}, ids, prompt_ids=jnp.array([0, 1]), output_hidden_states=True)
    assert out.hidden_states.shape == (cfg.n_layers + 1, 2, 6, 16)
    np.testing.assert_array_equal(out.hidden_states[-1], out.hidden)      # last entry: the returned hidden
    plain = model.apply({"params": params}, ids, prompt_ids=jnp.array([0, 1]))
    assert plain.hidden_states is None
    np.testing.assert_allclose(plain.logits, out.logits, atol=1e-6)      # collecting changes nothing
    # Layer l's state depends on the prompt: different prompts give different states after layer 1.
    other = model.apply({"params": params}, ids, prompt_ids=jnp.array([1, 0]), output_hidden_states=True)
    assert not np.allclose(other.hidden_states[1], out.hidden_states[1])
