"""Stacked vs per-layer parameter layouts: exact transforms, the unrolled model computes what the scan computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxcl.models import ModelConfig, build, init_params, is_unstacked, stack_layers, unstack_layers


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unrolled_layers_compute_the_scanned_model(family):
    from jaxcl.slm import jare
    cfg = ModelConfig(family=family, vocab_size=61, d_model=32, n_layers=3, n_heads=4,
                      n_kv_heads=2 if family == "llama" else None, d_ff=48, max_seq_len=64, num_prompts=2,
                      prompt_length=2)
    params = init_params(cfg, jax.random.key(0))
    per_layer = unstack_layers(params)
    assert is_unstacked(per_layer) and not is_unstacked(params)
    assert sorted(k for k in per_layer if k.startswith("layers")) == ["layers_0", "layers_1", "layers_2"]
    # the transforms are exact inverses, and the unrolled model's own init has exactly this structure
    jax.tree.map(np.testing.assert_array_equal, stack_layers(per_layer), params)
    np.testing.assert_array_equal(per_layer["layers_2"]["mlp"]["wi"]["kernel"], params["layers"]["mlp"]["wi"]["kernel"][2])
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 61, (2, 7)))
    init = nn.meta.unbox(build(cfg, scan_layers=False).init(jax.random.key(0), ids)["params"])
    assert jax.tree.structure(init) == jax.tree.structure(per_layer)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, per_layer)
    # same outputs with padding, prompts and adapters (adapters keep their layers axis)
    bank = jare.init_increment_bank(jax.random.key(2), cfg, max_slots=3, rank=2, targets=("attn.q", "mlp.wo"))
    bank = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape), bank)
    adapters = jare.mix_adapters(bank, jnp.asarray([[0, 2]]), jnp.asarray([[0.6, 0.4]]))
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    kw = dict(attention_mask=mask, adapters=adapters, prompt_ids=jnp.asarray([1, 0]), output_hidden_states=True)
    a = build(cfg).apply({"params": params}, ids, **kw)
    b = build(cfg, scan_layers=False).apply({"params": per_layer}, ids, **kw)
    for name in ("logits", "knn_keys", "hidden", "hidden_states"):
        np.testing.assert_allclose(np.asarray(getattr(b, name)), np.asarray(getattr(a, name)), atol=1e-5, rtol=0,
                                   err_msg=name)
    # logits_to_keep: only the last positions' logits, equal to the full ones
    last = build(cfg).apply({"params": params}, ids, attention_mask=mask, logits_to_keep=2).logits
    assert last.shape == (2, 2, 61)
    full = build(cfg).apply({"params": params}, ids, attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -2:]), atol=1e-5, rtol=0)


def test_layout_errors_are_named():
    cfg = ModelConfig(family="gpt2", vocab_size=31, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)
    params = init_params(cfg, jax.random.key(0))
    per_layer = unstack_layers(params)
    assert unstack_layers(per_layer) is per_layer and stack_layers(params) is params
    with pytest.raises(ValueError, match="layers_0 .. layers_"):
        stack_layers({k: v for k, v in per_layer.items() if k != "layers_0"} | {"layers_5": per_layer["layers_0"]})
    with pytest.raises(ValueError, match="no 'layers' entry"):
        unstack_layers({"embed": params["embed"]})
    with pytest.raises(ValueError, match="only built for decoders"):
        build(ModelConfig(family="bert", vocab_size=31, d_model=16, n_layers=2, n_heads=2), scan_layers=False)
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="logits_to_keep"):
        build(cfg).apply({"params": params}, ids, logits_to_keep=-1)
    # a KV cache of the other layout is refused
    cache = (jnp.zeros((2, 1, 2, 8, 8)), jnp.zeros((2, 1, 2, 8, 8)))
    with pytest.raises(ValueError, match="scan_layers=False"):
        build(cfg, scan_layers=False).apply({"params": per_layer}, ids, positions=jnp.zeros((1, 4), jnp.int32),
                                            cache=cache, cache_index=0, cache_mask=jnp.ones((1, 8), jnp.int32))
