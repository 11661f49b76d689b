"""Declarative jaxcl <-> Hugging Face parameter tables, one per family.

Each `Entry` links one HF tensor to one or more jaxcl leaves and says how HF lays it out
(`Layout`). The same table drives loading, saving and shape checking, so the two directions can
never drift apart. Per-layer entries have `{i}` in their key and address the stacked `layers`
parameters (leading axis = layer index).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from jaxcl.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How HF stores a tensor relative to jaxcl's `[*in_dims, *out_dims]` kernels.

    n_in:       how many leading jaxcl dims are input dims (0 for vectors).
    transposed: HF keeps `[out, in]` (torch `nn.Linear`); otherwise `[in, out]` (GPT-2 `Conv1D`,
                embeddings).
    Several jaxcl leaves in one entry are concatenated along HF's output axis (GPT-2's fused c_attn).
    """

    n_in: int
    transposed: bool = False

    def hf_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """The HF tensor shape that corresponds to jaxcl leaves of `shapes`."""
        outs = sum(math.prod(s[self.n_in:]) for s in shapes)
        if self.n_in == 0:
            return (outs,)
        shape = (math.prod(shapes[0][:self.n_in]), outs)
        return shape[::-1] if self.transposed else shape

    def to_jax(self, tensor: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
        """Split/reshape one HF tensor into jaxcl leaves of `shapes`."""
        matrix = tensor.T if self.transposed else tensor
        sizes = [math.prod(s[self.n_in:]) for s in shapes]
        parts = np.split(matrix, np.cumsum(sizes)[:-1], axis=-1) if len(shapes) > 1 else [matrix]
        return [np.ascontiguousarray(p).reshape(s) for p, s in zip(parts, shapes)]

    def to_hf(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Inverse of `to_jax`."""
        if self.n_in == 0:
            flat = [a.reshape(-1) for a in arrays]
        else:
            flat = [a.reshape(math.prod(a.shape[:self.n_in]), -1) for a in arrays]
        matrix = np.concatenate(flat, axis=-1) if len(flat) > 1 else flat[0]
        return np.ascontiguousarray(matrix.T if self.transposed else matrix)


VECTOR = Layout(0)
TABLE = Layout(1)                      # embeddings and GPT-2 Conv1D: [in, out] as jaxcl
LINEAR = Layout(1, transposed=True)    # torch nn.Linear: [out, in]
LINEAR_FROM_HEADS = Layout(2, transposed=True)   # o_proj: jaxcl [heads, head_dim, embed]
CONV1D_FROM_HEADS = Layout(2)                    # GPT-2 attn.c_proj


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor <-> jaxcl leaves. `in_base`: the key lives under the base-model prefix."""

    hf: str
    params: tuple[Path, ...]
    layout: Layout
    in_base: bool = True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


@dataclasses.dataclass(frozen=True)
class FamilyTable:
    """Everything the HF bridge needs to know about one family."""

    model_type: str
    base_prefix: str          # prefix of base-model keys inside the LM-head architecture
    entries: tuple[Entry, ...]
    architecture: str         # what save_pretrained writes into config.json


def _norm(hf: str, path: Path, bias: bool = True) -> list[Entry]:
    out = [Entry(hf + ".weight", (path + ("scale",),), VECTOR)]
    if bias:
        out.append(Entry(hf + ".bias", (path + ("bias",),), VECTOR))
    return out


def _dense(hf: str, path: Path, layout: Layout, bias: bool, in_base: bool = True) -> list[Entry]:
    out = [Entry(hf + ".weight", (path + ("kernel",),), layout, in_base)]
    if bias:
        out.append(Entry(hf + ".bias", (path + ("bias",),), VECTOR, in_base))
    return out


L = ("layers",)


def gpt2_table(cfg: ModelConfig) -> FamilyTable:
    attn = L + ("attn",)
    entries = [
        Entry("wte.weight", (("embed", "embedding"),), TABLE),
        Entry("wpe.weight", (("pos_embed", "embedding"),), TABLE),
        *_norm("h.{i}.ln_1", L + ("attn_norm",)),
        Entry("h.{i}.attn.c_attn.weight", tuple(attn + (n, "kernel") for n in "qkv"), TABLE),
        Entry("h.{i}.attn.c_attn.bias", tuple(attn + (n, "bias") for n in "qkv"), VECTOR),
        *_dense("h.{i}.attn.c_proj", attn + ("o",), CONV1D_FROM_HEADS, True),
        *_norm("h.{i}.ln_2", L + ("mlp_norm",)),
        *_dense("h.{i}.mlp.c_fc", L + ("mlp", "wi"), TABLE, True),
        *_dense("h.{i}.mlp.c_proj", L + ("mlp", "wo"), TABLE, True),
        *_norm("ln_f", ("final_norm",)),
    ]
    if not cfg.tie_embeddings:
        entries.append(Entry("lm_head.weight", (("lm_head", "kernel"),), LINEAR, in_base=False))
    return FamilyTable("gpt2", "transformer.", tuple(entries), "GPT2LMHeadModel")


def llama_table(cfg: ModelConfig) -> FamilyTable:
    attn = L + ("attn",)
    entries = [
        Entry("embed_tokens.weight", (("embed", "embedding"),), TABLE),
        *_norm("layers.{i}.input_layernorm", L + ("attn_norm",), bias=False),
        *_dense("layers.{i}.self_attn.q_proj", attn + ("q",), LINEAR, cfg.attn_bias),
        *_dense("layers.{i}.self_attn.k_proj", attn + ("k",), LINEAR, cfg.attn_bias),
        *_dense("layers.{i}.self_attn.v_proj", attn + ("v",), LINEAR, cfg.attn_bias),
        *_dense("layers.{i}.self_attn.o_proj", attn + ("o",), LINEAR_FROM_HEADS, cfg.attn_bias),
        *_norm("layers.{i}.post_attention_layernorm", L + ("mlp_norm",), bias=False),
        *_dense("layers.{i}.mlp.gate_proj", L + ("mlp", "wg"), LINEAR, cfg.mlp_bias),
        *_dense("layers.{i}.mlp.up_proj", L + ("mlp", "wi"), LINEAR, cfg.mlp_bias),
        *_dense("layers.{i}.mlp.down_proj", L + ("mlp", "wo"), LINEAR, cfg.mlp_bias),
        *_norm("norm", ("final_norm",), bias=False),
    ]
    if not cfg.tie_embeddings:
        entries.append(Entry("lm_head.weight", (("lm_head", "kernel"),), LINEAR, in_base=False))
    return FamilyTable("llama", "model.", tuple(entries), "LlamaForCausalLM")


def bert_table(cfg: ModelConfig) -> FamilyTable:
    attn, layer = L + ("attn",), "encoder.layer.{i}."
    entries = [
        Entry("embeddings.word_embeddings.weight", (("embed", "embedding"),), TABLE),
        Entry("embeddings.position_embeddings.weight", (("pos_embed", "embedding"),), TABLE),
        Entry("embeddings.token_type_embeddings.weight", (("type_embed", "embedding"),), TABLE),
        *_norm("embeddings.LayerNorm", ("embed_norm",)),
        *_dense(layer + "attention.self.query", attn + ("q",), LINEAR, True),
        *_dense(layer + "attention.self.key", attn + ("k",), LINEAR, True),
        *_dense(layer + "attention.self.value", attn + ("v",), LINEAR, True),
        *_dense(layer + "attention.output.dense", attn + ("o",), LINEAR_FROM_HEADS, True),
        *_norm(layer + "attention.output.LayerNorm", L + ("attn_norm",)),
        *_dense(layer + "intermediate.dense", L + ("mlp", "wi"), LINEAR, True),
        *_dense(layer + "output.dense", L + ("mlp", "wo"), LINEAR, True),
        *_norm(layer + "output.LayerNorm", L + ("mlp_norm",)),
    ]
    if cfg.pooler:
        entries += _dense("pooler.dense", ("pooler",), LINEAR, True)
    if cfg.mlm_head:
        entries += _dense("cls.predictions.transform.dense", ("mlm_dense",), LINEAR, True, in_base=False)
        entries += [Entry(e.hf, e.params, e.layout, in_base=False)
                    for e in _norm("cls.predictions.transform.LayerNorm", ("mlm_norm",))]
        entries.append(Entry("cls.predictions.bias", (("mlm_bias",),), VECTOR, in_base=False))
        if not cfg.tie_embeddings:
            entries.append(Entry("cls.predictions.decoder.weight", (("lm_head", "kernel"),), LINEAR, in_base=False))
    architecture = "BertForMaskedLM" if cfg.mlm_head else "BertModel"
    return FamilyTable("bert", "bert.", tuple(entries), architecture)


TABLES = {"gpt2": gpt2_table, "llama": llama_table, "bert": bert_table}

# Older checkpoints name some tensors differently; tried in order when a key is missing.
LEGACY_ALIASES: dict[str, tuple[str, ...]] = {
    "cls.predictions.bias": ("cls.predictions.decoder.bias",),
}


def table_for(cfg: ModelConfig) -> FamilyTable:
    """The mapping table of `cfg`'s family, specialised to its options (biases, tying, heads)."""
    return TABLES[cfg.family](cfg)


def legacy_names(key: str) -> tuple[str, ...]:
    """Alternative spellings of `key` in old checkpoints (LayerNorm gamma/beta, decoder bias)."""
    names = list(LEGACY_ALIASES.get(key, ()))
    if "LayerNorm" in key or key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        if key.endswith(".weight"):
            names.append(key[: -len(".weight")] + ".gamma")
        elif key.endswith(".bias"):
            names.append(key[: -len(".bias")] + ".beta")
    return tuple(names)
