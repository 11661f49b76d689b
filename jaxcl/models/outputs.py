"""The output record every jaxcl model returns (the public `out.logits / out.knn_keys / out.hidden`)."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class ModelOutput:
    """What a forward pass returns.

    logits:   [batch, seq, vocab] float32, or None for a BERT without its MLM head.
    hidden:   [batch, seq, d_model] final hidden state after the final norm.
    knn_keys: [batch, seq, d_model] the final block's FFN input after its norm (kNN-LM keys).
    pooled:   [batch, d_model] BERT's tanh pooler output on [CLS] when the model has a pooler.
    hidden_states: [n_layers + 1, batch, seq, d_model] with `output_hidden_states=True`, laid out as
              `transformers`' hidden_states: the embedding output, then every layer's output (for
              decoders the last entry has the final norm applied, so it equals `hidden`).
    """

    logits: jax.Array | None
    hidden: jax.Array
    knn_keys: jax.Array
    pooled: jax.Array | None = None
    hidden_states: jax.Array | None = None
    cache: tuple | None = None         # decoders called with `cache=`: the updated (k, v) [L, b, T, kv, hd]
