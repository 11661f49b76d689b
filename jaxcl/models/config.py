"""`ModelConfig`: one typed description for every jaxcl architecture.

GPT-2, LLaMA and BERT share one config so that transforms (growth, adapters), the HF mapping
tables and the trainer can treat every model the same way. Family-dependent defaults are filled in
by `ModelConfig.__post_init__`; every field is validated there so a bad config fails at construction
with a message naming the field, not deep inside a jitted forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

FAMILIES = ("gpt2", "llama", "bert")
DECODER_FAMILIES = ("gpt2", "llama")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")
# Remat policies for the layer block (jax.checkpoint_policies): "none" saves every residual of the block for the
# backward pass; "full" saves only the block's inputs and recomputes the rest; the dots policies keep the matmul
# outputs and recompute the cheap elementwise work between them (MaxText's common choices).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLS = ("auto", "xla", "blocked", "dot_product_attention")
# What attention="auto" runs on each JAX backend (`jaxcl.models.layers.attention_impl`): blocked causal query
# blocks on CPU (the fastest measured there, docs/benchmarks.md), jax.nn.dot_product_attention on GPU (cuDNN's
# fused kernel where it supports the inputs, else XLA), the full masked matrix elsewhere (TPU: XLA fuses it).
AUTO_ATTENTION = {"cpu": "blocked", "gpu": "dot_product_attention"}

# Family defaults for fields left as None.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(activation="gelu_tanh", tie_embeddings=True, attn_bias=True, mlp_bias=True,
                 norm_eps=1e-5, max_seq_len=1024),
    "llama": dict(activation="silu", tie_embeddings=False, attn_bias=False, mlp_bias=False,
                  norm_eps=1e-6, max_seq_len=2048),
    "bert": dict(activation="gelu", tie_embeddings=True, attn_bias=True, mlp_bias=True,
                 norm_eps=1e-12, max_seq_len=512),
}


from jaxcl.errors import ConfigError  # noqa: E402  (re-exported: jaxcl.models.config.ConfigError)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a jaxcl model (hashable, so it can be a static jit argument).

    Shapes follow the names used in parameter logical axes: `d_model` is `embed`, `n_heads` is
    `heads`, `n_kv_heads` is `kv_heads`, `head_dim` is `head_dim`, `d_ff` is `mlp`.
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None      # None -> n_heads (MHA); < n_heads -> grouped-query attention
    head_dim: int | None = None        # None -> d_model // n_heads
    d_ff: int | None = None            # None -> 4 * d_model
    max_seq_len: int | None = None     # learned position table size (GPT-2, BERT); RoPE ignores it
    norm_eps: float | None = None
    activation: str | None = None      # gelu_tanh | gelu | relu | silu (SwiGLU gate for LLaMA)
    tie_embeddings: bool | None = None  # output projection shares the token embedding
    attn_bias: bool | None = None      # biases on q/k/v/o projections
    mlp_bias: bool | None = None       # biases on MLP projections
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_parameters, as sorted items
    type_vocab_size: int = 2           # BERT token types
    mlm_head: bool = True              # BERT: BertForMaskedLM head (transform + tied decoder)
    pooler: bool = False               # BERT: tanh pooler on [CLS] (BertModel)
    dropout: float = 0.0               # residual / embedding dropout when deterministic=False
    num_prompts: int = 0               # learned prompt tables (ELLE: one per domain); 0 = none
    prompt_length: int = 1             # prompt vectors per table, prepended when `prompt_ids` is given
    dtype: str = "float32"             # compute dtype; parameters are always float32
    # How the same function is computed (never what): exact alternatives, chosen per machine.
    remat: str = "dots_saveable"       # rematerialisation of the layer block under differentiation (REMAT_POLICIES;
                                       # "none" = save every residual)
    attention: str = "auto"            # auto (per backend: AUTO_ATTENTION) | xla (full scores, masked) | blocked
                                       # (causal query blocks read only the keys up to the block's end) |
                                       # dot_product_attention (jax.nn's; cuDNN on GPU)
    attention_block: int = 64          # query block of blocked attention
    initializer_range: float = 0.02
    pad_token_id: int | tuple[int, ...] | None = None   # one id, or several (Llama-3 lists several eos ids)
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r} is not one of {FAMILIES}")
        for key, value in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                value = tuple(value)
                object.__setattr__(self, key, value)
            ids = value if isinstance(value, tuple) else (value,)
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"model.{key} must be a token id, a list of token ids or null, got {value!r}")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                    "type_vocab_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
            if value >= 2 ** 31:       # arrays index with int32 (and no host holds such a table)
                raise ConfigError(f"model.{key}={value} is too large (at most 2**31 - 1)")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                    "set model.head_dim explicitly or pick a dividing head count")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ConfigError(f"model.head_dim must be a positive integer, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}")
        if self.family != "llama" and self.n_kv_heads != self.n_heads:
            raise ConfigError(f"model.n_kv_heads: grouped-query attention is only supported for llama, "
                              f"family is {self.family!r}")
        if self.family == "llama" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={self.activation!r} is not one of {ACTIVATIONS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r} is not one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
        if not (isinstance(self.attention_block, int) and not isinstance(self.attention_block, bool)
                and self.attention_block >= 1):
            raise ConfigError(f"model.attention_block must be a positive integer, got {self.attention_block!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ConfigError(f"model.norm_eps must be a positive float, got {self.norm_eps!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.num_prompts, int) and self.num_prompts >= 0):
            raise ConfigError(f"model.num_prompts must be a non-negative integer, got {self.num_prompts!r}")
        if not (isinstance(self.prompt_length, int) and self.prompt_length >= 1):
            raise ConfigError(f"model.prompt_length must be a positive integer, got {self.prompt_length!r}")
        if self.rope_scaling is not None:
            rope_type = dict(self.rope_scaling).get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ConfigError(f"model.rope_scaling.rope_type={rope_type!r} is not supported "
                                  f"(supported: {ROPE_TYPES})")

    # ------------------------------------------------------------------ helpers
    @property
    def is_decoder(self) -> bool:
        """True for causal LMs (GPT-2, LLaMA); False for the bidirectional BERT encoder."""
        return self.family in DECODER_FAMILIES

    @property
    def has_lm_head(self) -> bool:
        """Whether the model produces vocabulary logits (decoders always; BERT with its MLM head)."""
        return self.is_decoder or self.mlm_head

    def token_ids(self, key: str) -> tuple[int, ...]:
        """`pad_token_id`, `bos_token_id` or `eos_token_id` as a tuple (empty when unset)."""
        value = getattr(self, key)
        return () if value is None else value if isinstance(value, tuple) else (value,)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (round-trips through `from_dict`)."""
        out = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping; unknown keys are an error naming the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join('model.' + k for k in unknown)}")
        if "family" not in data:
            raise ConfigError("model.family is required")
        return cls(**dict(data))

    def train_flops_per_token(self, context: int, logits: bool = True) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) at a context of `context` positions.

        Forward: 2 FLOPs per weight of every matmul (attention projections, MLP, output logits) plus the
        attention scores and weighted values, 4 x context x n_heads x head_dim per layer. Embedding
        lookups and norms are not counted. `logits=False` leaves out the output head (for positions
        that produce no logits, like prompt positions). Used to compare methods at equal compute.
        """
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        q_out, kv_out = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * q_out + 2 * d * kv_out + q_out * d
        mlp = (2 if self.family == "llama" else 1) * d * f + f * d
        head = d * self.vocab_size if self.has_lm_head and logits else 0
        if self.family == "bert" and self.mlm_head and logits:
            head += d * d
        forward = 2.0 * (self.n_layers * (attn + mlp) + head) + 4.0 * self.n_layers * context * q_out
        return 3.0 * forward

    def num_params(self) -> int:
        """Parameter count of the model this config builds (for logs and FLOP estimates)."""
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        q_out, kv_out = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * q_out + 2 * d * kv_out + q_out * d
        if self.attn_bias:
            attn += q_out + 2 * kv_out + d
        n_in = 2 if self.family == "llama" else 1
        mlp = n_in * d * f + f * d + ((n_in * f + d) if self.mlp_bias else 0)
        norm = d if self.family == "llama" else 2 * d
        total = self.n_layers * (attn + mlp + 2 * norm) + (self.vocab_size + self.num_prompts * self.prompt_length) * d
        if self.family in ("gpt2", "bert"):
            total += self.max_seq_len * d
        if self.family == "bert":
            total += self.type_vocab_size * d + norm
            if self.mlm_head:
                total += d * d + d + norm + self.vocab_size
            if self.pooler:
                total += d * d + d
        else:
            total += norm
            if not self.tie_embeddings:
                total += d * self.vocab_size
        return total
