"""save_pretrained -> transformers.from_pretrained gives the same logits; save -> load is bit-identical."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.hf import load_pretrained, save_pretrained
from jaxcl.models import ModelConfig, build, init_params

CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=97, d_model=40, n_layers=2, n_heads=5, max_seq_len=24),
    "llama-gqa": ModelConfig(family="llama", vocab_size=89, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2,
                             d_ff=56, max_seq_len=64),
    "llama-tied-bias": ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4,
                                   d_ff=24, tie_embeddings=True, attn_bias=True, mlp_bias=True, rope_theta=5e5),
    "bert-mlm": ModelConfig(family="bert", vocab_size=71, d_model=36, n_layers=2, n_heads=3, d_ff=44, max_seq_len=20),
    "bert-pooler": ModelConfig(family="bert", vocab_size=53, d_model=24, n_layers=1, n_heads=2, max_seq_len=16,
                               mlm_head=False, pooler=True),
}


def random_params(cfg, seed=0):
    """Init, then push every leaf to O(1) scale so that mismatches show up in the outputs."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_then_load_is_bit_identical(tmp_path, name):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    save_pretrained(tmp_path, cfg, params)
    cfg2, params2 = load_pretrained(tmp_path)
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_save_writes_index_and_loads_back(tmp_path):
    cfg = CONFIGS["llama-gqa"]
    params = random_params(cfg, seed=3)
    save_pretrained(tmp_path, cfg, params, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and not (tmp_path / "model.safetensors").exists()
    _, params2 = load_pretrained(tmp_path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Saving again unsharded removes the old shards instead of mixing layouts.
    save_pretrained(tmp_path, cfg, params)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_checkpoint_runs_identically_in_transformers(tmp_path, name):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[torch]'")
    import transformers

    cfg = CONFIGS[name]
    params = random_params(cfg, seed=7)
    save_pretrained(tmp_path, cfg, params)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    out = build(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    auto = (transformers.AutoModelForCausalLM if cfg.is_decoder
            else transformers.AutoModelForMaskedLM if cfg.mlm_head else transformers.AutoModel)
    model = auto.from_pretrained(str(tmp_path), local_files_only=True).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    real = mask.astype(bool)
    if cfg.has_lm_head:
        assert np.abs(ref.logits.numpy()[real]).max() > 0.5
        np.testing.assert_allclose(np.asarray(out.logits)[real], ref.logits.numpy()[real], atol=1e-4, rtol=0)
    else:
        np.testing.assert_allclose(np.asarray(out.hidden)[real], ref.last_hidden_state.numpy()[real], atol=1e-4)
        np.testing.assert_allclose(np.asarray(out.pooled), ref.pooler_output.numpy(), atol=1e-4, rtol=0)
