"""Hugging Face `config.json` <-> `ModelConfig`, from local files only.

Reading goes through `transformers`' own config classes (`from_dict`, no hub access) so that
defaults and legacy spellings (e.g. `rope_theta` vs v5's `rope_parameters`) resolve exactly as
`transformers` resolves them. Options jaxcl does not implement are rejected with the key's name
instead of being silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxcl.models.config import FAMILIES, ModelConfig

HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu",
}
JAXCL_TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
LLAMA_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}


from jaxcl.errors import CheckpointError  # noqa: E402  (re-exported: jaxcl.hf.CheckpointError)


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The raw `config.json` of a checkpoint directory, with errors naming the path."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{str(directory)!r} is a file, not a checkpoint directory (give the directory that "
                              "holds config.json and the *.safetensors weights)")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: a Hugging Face checkpoint directory needs config.json")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object (a transformers config), got "
                              f"{type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{str(path)!r}: model_type={model_type!r} is not supported by jaxcl "
                              f"(supported: {', '.join(FAMILIES)})")
    return raw


def _hf_config_class(model_type: str):
    import transformers
    return {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig,
            "bert": transformers.BertConfig}[model_type]


def _activation(name: str, key: str, where: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise CheckpointError(f"{where}: {key}={name!r} is not supported (supported: {sorted(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise CheckpointError(f"{where}: {message}")


def model_config_from_hf(raw: dict[str, Any], where: str = "config.json",
                         tensor_names: frozenset[str] = frozenset()) -> ModelConfig:
    """`ModelConfig` for an HF config dict; `tensor_names` lets BERT detect its optional pooler."""
    model_type = raw["model_type"]
    hf = _hf_config_class(model_type).from_dict(dict(raw))
    ids = dict(pad_token_id=_first_id(hf.pad_token_id), bos_token_id=_first_id(hf.bos_token_id),
               eos_token_id=_first_id(hf.eos_token_id))
    if model_type == "gpt2":
        _require(hf.scale_attn_weights, where, "scale_attn_weights=false is not supported")
        _require(not hf.scale_attn_by_inverse_layer_idx, where, "scale_attn_by_inverse_layer_idx=true is not supported")
        _require(not getattr(hf, "add_cross_attention", False), where, "add_cross_attention=true is not supported")
        return ModelConfig(
            family="gpt2", vocab_size=hf.vocab_size, d_model=hf.n_embd, n_layers=hf.n_layer, n_heads=hf.n_head,
            d_ff=hf.n_inner or 4 * hf.n_embd, max_seq_len=hf.n_positions, norm_eps=hf.layer_norm_epsilon,
            activation=_activation(hf.activation_function, "activation_function", where),
            tie_embeddings=bool(hf.tie_word_embeddings), attn_bias=True, mlp_bias=True,
            initializer_range=hf.initializer_range, **ids)
    if model_type == "llama":
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        return ModelConfig(
            family="llama", vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
            n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            d_ff=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
            activation=_activation(hf.hidden_act, "hidden_act", where), tie_embeddings=bool(hf.tie_word_embeddings),
            attn_bias=bool(hf.attention_bias), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            rope_theta=float(theta), rope_scaling=scaling, initializer_range=hf.initializer_range, **ids)
    # bert
    position_type = raw.get("position_embedding_type", "absolute")
    _require(position_type == "absolute", where,
             f"position_embedding_type={position_type!r} is not supported (only 'absolute')")
    _require(not getattr(hf, "is_decoder", False), where, "is_decoder=true is not supported for bert")
    architectures = raw.get("architectures") or []
    if architectures:
        mlm_head = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in architectures)
    else:
        mlm_head = any(n.startswith("cls.predictions.") for n in tensor_names)
    pooler = any(n.endswith("pooler.dense.weight") for n in tensor_names)
    return ModelConfig(
        family="bert", vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, d_ff=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
        norm_eps=hf.layer_norm_eps, activation=_activation(hf.hidden_act, "hidden_act", where),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)), type_vocab_size=hf.type_vocab_size,
        mlm_head=mlm_head, pooler=pooler, initializer_range=hf.initializer_range, **ids)


def _first_id(value):
    """A config's token id as jaxcl keeps it: an int, a tuple of ints (kept whole: Llama-3 stops on
    several eos ids), or None."""
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if value else None
    return None if value is None else int(value)


def _hf_ids(cfg: ModelConfig) -> dict[str, Any]:
    """The special token ids for a transformers config (lists stay lists)."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in (("pad_token_id", cfg.pad_token_id), ("bos_token_id", cfg.bos_token_id),
                               ("eos_token_id", cfg.eos_token_id))}


def generation_config_json(cfg: ModelConfig) -> str | None:
    """`generation_config.json` for a decoder (its bos/eos/pad ids, lists kept), or None for encoders."""
    if not cfg.is_decoder:
        return None
    import transformers

    ids = {k: v for k, v in _hf_ids(cfg).items() if v is not None}
    return transformers.GenerationConfig(**ids).to_json_string(use_diff=True)


def hf_config_from_model(cfg: ModelConfig, architecture: str):
    """A `transformers` config object equivalent to `cfg` (what `save_pretrained` writes)."""
    ids = _hf_ids(cfg)
    if cfg.family == "gpt2":
        kwargs = dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                      n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                      activation_function=JAXCL_TO_HF_ACTIVATION[cfg.activation],
                      tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.initializer_range,
                      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0)
    elif cfg.family == "llama":
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        rope.update(dict(cfg.rope_scaling or ()))
        kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                      intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                      hidden_act=LLAMA_ACTIVATION[cfg.activation], tie_word_embeddings=cfg.tie_embeddings,
                      attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias, rope_parameters=rope,
                      initializer_range=cfg.initializer_range)
    else:
        kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                      num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
                      max_position_embeddings=cfg.max_seq_len, layer_norm_eps=cfg.norm_eps,
                      hidden_act=JAXCL_TO_HF_ACTIVATION[cfg.activation], type_vocab_size=cfg.type_vocab_size,
                      tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.initializer_range,
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0)
    hf = _hf_config_class(cfg.family)(**kwargs, **ids)
    hf.architectures = [architecture]
    return hf
