"""A sequence classifier on any jaxcl backbone: pooled features -> one linear head. Pure functions over
`{"backbone": params, "head": {"kernel" [d, C], "bias" [C]}}`.

    ids, mask = encode_texts(tokenizer, texts, max_len)              # [n, max_len] int32 each
    params = {"backbone": lm_params, "head": init_head(rng, d_model, n_classes)}
    logits = classifier_logits(model_cfg, params, ids, mask, prompt_ids=None, pooling="last")   # [n, C]

Pooling (`resolve_pooling`):
- decoders (GPT-2, LLaMA): `last`, the final hidden state (after the final norm) at the last non-pad token,
  which is the EOS that ends every document in pre-training (Radford et al. 2018, sec. 3.3: the last
  token's activation feeds the classifier; transformers' GPT2ForSequenceClassification pools the same
  position), or `mean` over the text tokens;
- BERT: `pooler` ([CLS] through BERT's tanh pooler, Devlin et al. 2019, sec. 3, which is what
  BertForSequenceClassification uses) when the model has one, else `mean`.
Texts are framed as pre-training frames documents (`TextTokenizer.frame`: BOS where the tokenizer adds
one, the text, EOS), right-padded; a text longer than `max_len` keeps its first max_len - 1 tokens and
its last one (the EOS / [SEP]), so `last` always pools an end-of-text token.

Domain prompts: `prompt_ids` [b] prefixes each row with its learned prompt exactly as in pre-training
(the model's own `prompt_ids` path; outputs cover the text positions only, so pooling is unchanged), and
the prompt vectors are part of `params["backbone"]` and are fine-tuned with the model.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.models import ConfigError, ModelConfig, build, mean_pool

__all__ = ["encode_texts", "init_head", "resolve_pooling", "pooled_features", "classifier_logits",
           "classification_loss", "make_train_step", "make_predict"]


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, mask, truncated): `[n, max_len]` int32 token ids right-padded with the tokenizer's pad id, the
    attention mask, and how many texts were cut (first max_len - 1 tokens + the final token kept)."""
    ids = np.full((len(texts), max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    truncated = 0
    for i, text in enumerate(texts):
        tokens = tokenizer.frame(text)
        if len(tokens) > max_len:
            truncated += 1
            tokens = tokens[:max_len - 1] + tokens[-1:]
        ids[i, :len(tokens)] = tokens
        mask[i, :len(tokens)] = 1
    return ids, mask, truncated


def init_head(rng: jax.Array, d_model: int, n_classes: int) -> dict[str, jax.Array]:
    """The linear head: kernel ~ N(0, 0.02^2) `[d_model, n_classes]` (BERT's and GPT-2's init), bias 0."""
    return {"kernel": 0.02 * jax.random.normal(rng, (d_model, n_classes), jnp.float32),
            "bias": jnp.zeros((n_classes,), jnp.float32)}


def resolve_pooling(model_cfg: ModelConfig, pooling: str) -> str:
    """`auto` -> `last` (decoders) / `pooler` (BERT with a pooler) / `mean`; checks the others apply.
    Raises ConfigError naming `downstream.pooling` for a pooling the model cannot do."""
    if pooling == "auto":
        if model_cfg.is_decoder:
            return "last"
        return "pooler" if getattr(model_cfg, "pooler", False) else "mean"
    if pooling == "pooler" and (model_cfg.is_decoder or not getattr(model_cfg, "pooler", False)):
        raise ConfigError(f"downstream.pooling=pooler: the {model_cfg.family} model has no pooler; use last or mean")
    if pooling not in ("last", "mean", "pooler"):
        raise ConfigError(f"downstream.pooling={pooling!r} is not one of auto, last, mean, pooler")
    return pooling


def pooled_features(model_cfg: ModelConfig, backbone: Any, ids: jax.Array, mask: jax.Array,
                    prompt_ids: jax.Array | None, pooling: str, *, deterministic: bool = True,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
    """`[b, d_model]` float32 features of each text (see the module docstring for `pooling`)."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    # A decoder's vocabulary projection is not needed (only its hidden states are): keep one position's logits.
    extra = {"logits_to_keep": 1} if model_cfg.is_decoder else {}
    out = build(model_cfg).apply({"params": backbone}, ids, mask, deterministic=deterministic, prompt_ids=prompt_ids,
                                 rngs=rngs, **extra)
    hidden = out.hidden.astype(jnp.float32)                                         # [b, s, d]
    if pooling == "pooler":
        return out.pooled.astype(jnp.float32)
    if pooling == "mean":
        return mean_pool(hidden, mask)
    last = jnp.maximum(mask.sum(axis=1) - 1, 0)                                     # [b] last real token
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def classifier_logits(model_cfg: ModelConfig, params: Any, ids: jax.Array, mask: jax.Array,
                      prompt_ids: jax.Array | None = None, pooling: str = "last", class_mask: jax.Array | None = None,
                      **kwargs) -> jax.Array:
    """`[b, columns]` float32 logits: pooled features @ head kernel + bias. `class_mask` [columns] bool: columns
    beyond a task's classes (a head padded so that tasks with different label counts share one compiled
    step) get -1e9, so they are never predicted and carry no probability or gradient."""
    x = pooled_features(model_cfg, params["backbone"], ids, mask, prompt_ids, pooling, **kwargs)
    logits = x @ params["head"]["kernel"] + params["head"]["bias"]
    return logits if class_mask is None else jnp.where(class_mask, logits, -1e9)


def classification_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean softmax cross-entropy (nats); `weights` [b] is 0 for padding rows of a short batch."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (ce * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, pooling: str, *,
                    with_prompts: bool, shardings: Any = None):
    """A jitted `(params, opt_state, batch, dropout_rng, lr) -> (params, opt_state, loss)`; `batch` holds ids, mask
    [b, s], labels, weights [b], class_mask [columns] (and prompt_ids [b] when `with_prompts`). `tx` is built with a peak learning
    rate of 1 and its updates are scaled by the traced scalar `lr` (AdamW's step, decoupled weight decay
    included, is linear in the learning rate), so one compiled step serves every rate of a grid. Params and
    optimizer state are donated; `shardings` (params, opt_state) keeps them on the run's mesh."""
    dropout = model_cfg.dropout > 0

    def step(params, opt_state, batch, rng, lr):
        def loss_fn(p):
            logits = classifier_logits(model_cfg, p, batch["ids"], batch["mask"],
                                       batch["prompt_ids"] if with_prompts else None, pooling, batch["class_mask"],
                                       deterministic=not dropout, dropout_rng=rng if dropout else None)
            return classification_loss(logits, batch["labels"], batch["weights"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: (u * lr).astype(u.dtype), updates)
        return optax.apply_updates(params, updates), opt_state, loss

    kwargs = {}
    if shardings is not None:
        kwargs = {"out_shardings": (shardings[0], shardings[1], None)}
    return jax.jit(step, donate_argnums=(0, 1), **kwargs)


def make_predict(model_cfg: ModelConfig, pooling: str, *, with_prompts: bool):
    """A jitted `(params, ids, mask, prompt_ids, class_mask) -> [b] int32` arg-max class."""
    def predict(params, ids, mask, prompt_ids, class_mask):
        logits = classifier_logits(model_cfg, params, ids, mask, prompt_ids if with_prompts else None, pooling,
                                   class_mask)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.jit(predict)
