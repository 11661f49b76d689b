"""Bad checkpoints fail with errors that name the file or tensor; saving never corrupts what exists."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxcl.hf import CheckpointError, load_pretrained, save_pretrained
from jaxcl.models import ModelConfig, init_params

CFG = ModelConfig(family="llama", vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24)


@pytest.fixture
def checkpoint(tmp_path):
    save_pretrained(tmp_path, CFG, init_params(CFG, jax.random.key(0)))
    return tmp_path


def rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load_pretrained(checkpoint)


def test_wrong_shape_is_named_with_both_shapes(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.update({"model.norm.weight": np.ones(17, np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*\(17,\), expected \(16,\)"):
        load_pretrained(checkpoint)


def test_unknown_model_type_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "mamba"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type='mamba' is not supported"):
        load_pretrained(checkpoint)


def test_missing_config_json_is_named(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained(checkpoint)


def test_missing_directory_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_pretrained(tmp_path)


def test_unsupported_option_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["hidden_act"] = "mish"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act='mish'"):
        load_pretrained(checkpoint)


def test_save_with_wrong_params_fails_before_touching_existing_files(checkpoint):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    params = init_params(CFG, jax.random.key(1))
    params["layers"]["attn"]["q"]["kernel"] = params["layers"]["attn"]["q"]["kernel"][:, :, :3]
    with pytest.raises(ValueError, match=r"layers/attn/q/kernel has shape \(2, 16, 3, 4\)"):
        save_pretrained(checkpoint, CFG, params)
    del params["layers"]["attn"]["q"]
    with pytest.raises(ValueError, match="missing layers/attn/q/kernel"):
        save_pretrained(checkpoint, CFG, params)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
