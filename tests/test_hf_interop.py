"""Hugging Face interop defects found in public bug reports, each with its failing input and the right value.

- a config saying `tie_word_embeddings: true` over weights that hold a *different* output head: transformers
  uses the stored head, untied (and warns); jaxcl must give transformers' logits, not the tied ones;
- Llama-3 style id lists (`eos_token_id: [2, 5, 7]`) survive load -> save in config.json and
  generation_config.json, and YAML configs;
- a sharded index that names a tensor missing from its shard: the error names tensor, shard and index;
- `grow(method="exact")` on post-LN BERT where it cannot be exact: tested in tests/test_grow.py.
"""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from torch_models import build_hf_model, random_batch, torch, torch_outputs, transformers

from jaxcl.config import config_from_dict, load_config, save_config
from jaxcl.hf import CheckpointError, load_pretrained, save_pretrained
from jaxcl.models import ModelConfig, build, init_params

TIED = {
    "llama": dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=40, tie_word_embeddings=True),
    "gpt2": dict(vocab_size=59, n_embd=24, n_layer=2, n_head=3, n_positions=32, tie_word_embeddings=True),
}
HEAD_KEY = {"llama": "lm_head.weight", "gpt2": "lm_head.weight"}


def _write_with_head(tmp_path, family, head):
    from safetensors.torch import load_file, save_file

    model = build_hf_model(family, TIED[family], seed=4)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert HEAD_KEY[family] not in tensors                  # transformers itself does not store a tied head
    embed = next(v for k, v in tensors.items() if k.endswith(("embed_tokens.weight", "wte.weight")))
    tensors[HEAD_KEY[family]] = head(embed)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_config_with_a_different_stored_head_loads_the_stored_head_like_transformers(tmp_path, family, caplog):
    gen = torch.Generator().manual_seed(0)
    reference = _write_with_head(tmp_path, family, lambda e: 0.3 * torch.randn(e.shape, generator=gen))
    assert reference.lm_head.weight.data_ptr() != reference.get_input_embeddings().weight.data_ptr()
    with caplog.at_level(logging.WARNING, logger="jaxcl.hf.checkpoint"):
        cfg, params = load_pretrained(tmp_path)
    assert not cfg.tie_embeddings and "lm_head" in params
    assert "tie_word_embeddings=true" in caplog.text and "lm_head.weight" in caplog.text
    ids, mask = random_batch(cfg.vocab_size, batch=2, seq=9, padding=None, seed=1)
    ref_logits = torch_outputs(reference, ids, mask)[0]
    out = build(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32)).logits
    np.testing.assert_allclose(np.asarray(out), ref_logits, atol=1e-4, rtol=0)
    # The tied reading (what jaxcl did before) is far from it: the test can fail.
    tied = build(cfg.replace(tie_embeddings=True)).apply(
        {"params": {k: v for k, v in params.items() if k != "lm_head"}}, jnp.asarray(ids, jnp.int32)).logits
    assert np.abs(np.asarray(tied) - ref_logits).max() > 1e-2
    # Saved back, the config says what the weights are.
    save_pretrained(tmp_path / "out", cfg, params)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_stored_head_equal_to_the_embeddings_stays_tied(tmp_path):
    _write_with_head(tmp_path, "llama", lambda e: e.clone())
    cfg, params = load_pretrained(tmp_path)
    assert cfg.tie_embeddings and "lm_head" not in params


def test_token_id_lists_survive_load_and_save(tmp_path):
    kwargs = dict(TIED["llama"], tie_word_embeddings=False, eos_token_id=[2, 5, 7], bos_token_id=1, pad_token_id=0)
    build_hf_model("llama", kwargs).save_pretrained(tmp_path / "hf")
    cfg, params = load_pretrained(tmp_path / "hf")
    assert cfg.eos_token_id == (2, 5, 7) and cfg.bos_token_id == 1 and cfg.pad_token_id == 0
    assert cfg.token_ids("eos_token_id") == (2, 5, 7) and cfg.token_ids("bos_token_id") == (1,)
    save_pretrained(tmp_path / "out", cfg, params)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["eos_token_id"] == [2, 5, 7] and saved["bos_token_id"] == 1
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 5, 7]
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [2, 5, 7]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").eos_token_id == [2, 5, 7]
    assert load_pretrained(tmp_path / "out")[0] == cfg
    # And through a run's YAML config (what every run saves and resumes from).
    run_cfg = config_from_dict({"model": cfg.to_dict()})
    save_config(run_cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").model.eos_token_id == (2, 5, 7)


@pytest.mark.parametrize("bad", [[2, "x"], -1, True])
def test_bad_token_ids_are_named(bad):
    with pytest.raises(ValueError, match="model.eos_token_id must be a token id"):
        ModelConfig(family="gpt2", vocab_size=10, d_model=8, n_layers=1, n_heads=2, eos_token_id=bad)


def test_index_naming_a_tensor_missing_from_its_shard_names_tensor_shard_and_index(tmp_path):
    cfg = ModelConfig(family="llama", vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24)
    import jax
    save_pretrained(tmp_path, cfg, init_params(cfg, jax.random.key(0)), max_shard_bytes=4_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    name = "model.layers.1.mlp.up_proj.weight"
    wrong = next(s for s in shards if s != index["weight_map"][name])
    index["weight_map"][name] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path)
    message = str(err.value)
    assert name in message and wrong in message and "model.safetensors.index.json" in message
