"""jaxcl model family: GPT-2 and LLaMA decoders, the BERT encoder, one `ModelConfig`.

    from jaxcl.models import ModelConfig, build, init_params
    cfg = ModelConfig(family="llama", vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2)
    params = init_params(cfg, jax.random.key(0))           # plain nested dict, float32
    out = build(cfg).apply({"params": params}, input_ids, attention_mask=mask)
    out.logits, out.knn_keys, out.hidden
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxcl.models.config import ConfigError, ModelConfig
from jaxcl.models.decoder import Decoder
from jaxcl.models.encoder import Encoder, mean_pool
from jaxcl.models.layout import is_unstacked, stack_layers, unstack_layers
from jaxcl.models.outputs import ModelOutput

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "build", "init_params", "param_axes", "abstract_params",
           "mean_pool", "example_input_ids", "without_prompts", "Decoder", "Encoder", "unstack_layers", "stack_layers",
           "is_unstacked"]


def build(cfg: ModelConfig, *, scan_layers: bool = True) -> nn.Module:
    """The Linen module for `cfg`: `Decoder` for gpt2/llama, `Encoder` for bert.

    `scan_layers=False` (decoders only) runs the layers as an unrolled loop over per-layer parameters
    (`layers_0` ...; convert with `unstack_layers`): what decoding uses, see `jaxcl.models.layout`."""
    if not scan_layers and not cfg.is_decoder:
        raise ValueError(f"scan_layers=False is only built for decoders, got model.family={cfg.family!r}")
    return Decoder(cfg, scan_layers=scan_layers) if cfg.is_decoder else Encoder(cfg)


def example_input_ids(cfg: ModelConfig) -> jax.Array:
    """A tiny batch of token ids for tracing `init` (shapes only matter)."""
    return jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)


def init_params(cfg: ModelConfig, rng: jax.Array, *, out_shardings: Any = None) -> dict[str, Any]:
    """Freshly initialised parameters as a plain nested dict (float32, logical boxes removed).

    Jitted, so that `out_shardings` (a matching tree of shardings) creates the parameters already
    sharded, never materialised whole on one device.
    """
    def init(key):
        return nn.meta.unbox(build(cfg).init(key, example_input_ids(cfg))["params"])

    return jax.jit(init, out_shardings=out_shardings)(rng)


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct` tree of the parameters, without allocating anything."""
    boxed = jax.eval_shape(lambda r: build(cfg).init(r, example_input_ids(cfg))["params"], jax.random.key(0))
    return nn.meta.unbox(boxed)


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Logical axis names of every parameter (a tree of `PartitionSpec`s of logical names).

    Stacked layer parameters carry `layers` as their leading axis.
    """
    boxed = jax.eval_shape(lambda r: build(cfg).init(r, example_input_ids(cfg))["params"], jax.random.key(0))
    return nn.get_partition_spec(boxed)


def without_prompts(cfg: ModelConfig, params: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    """The backbone alone (prompt table dropped): what `save_pretrained` can export. Without prompt_ids
    a model with prompts computes exactly what this backbone computes."""
    return cfg.replace(num_prompts=0), {k: v for k, v in params.items() if k != "prompt_embed"}
