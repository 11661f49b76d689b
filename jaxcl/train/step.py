"""Jitted train and eval steps over a sharded TrainState (donated) and a sharded batch."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxcl.models import ModelConfig, build
from jaxcl.parallel import batch_sharding, replicated
from jaxcl.train.losses import causal_lm_nll, mask_tokens, masked_lm_nll
from jaxcl.train.state import TrainState

Batch = dict[str, jax.Array]   # input_ids [batch, seq] int32, attention_mask [batch, seq] int32, prompt_ids [batch]
BATCH_RANKS = {"input_ids": 2, "attention_mask": 2, "prompt_ids": 1}
DEFAULT_BATCH_KEYS = ("input_ids", "attention_mask")


def batch_shardings(mesh: Mesh, rules=None, keys=DEFAULT_BATCH_KEYS) -> dict[str, Any]:
    """Shardings of a batch dict with `keys`: every array is split over the batch axis."""
    unknown = sorted(set(keys) - set(BATCH_RANKS))
    if unknown:
        raise ValueError(f"unknown batch keys {unknown} (known: {sorted(BATCH_RANKS)})")
    return {k: batch_sharding(mesh, rules, BATCH_RANKS[k]) for k in keys}


def make_loss_fn(cfg: ModelConfig, objective: str = "clm", *, mask_token_id: int | None = None,
                 mlm_probability: float = 0.15) -> Callable:
    """loss_fn(params, batch, rng, deterministic=False) -> (mean NLL, (nll_sum, n_tokens)).

    Dropout is active only when training (`deterministic=False`) and the model has dropout.
    """
    model = build(cfg)

    def loss_fn(params, batch: Batch, rng: jax.Array, deterministic: bool = False):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prompt_ids = batch.get("prompt_ids")        # learned prompts (ELLE's domain prompts), if any
        deterministic = deterministic or cfg.dropout == 0.0
        rngs = None if deterministic else {"dropout": jax.random.fold_in(rng, 1)}
        if objective == "clm":
            out = model.apply({"params": params}, ids, mask, deterministic=deterministic, rngs=rngs,
                              prompt_ids=prompt_ids)
            nll_sum, n, _ = causal_lm_nll(out.logits, ids, mask)
        else:
            corrupted, labels, label_mask = mask_tokens(rng, ids, mask, vocab_size=cfg.vocab_size,
                                                        mask_token_id=mask_token_id, probability=mlm_probability)
            out = model.apply({"params": params}, corrupted, mask, deterministic=deterministic, rngs=rngs,
                              prompt_ids=prompt_ids)
            nll_sum, n, _ = masked_lm_nll(out.logits, labels, label_mask)
        return nll_sum / jnp.maximum(n, 1.0), (nll_sum, n)

    return loss_fn


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, shardings: TrainState,
                    rules=None, loss_fn: Callable | None = None,
                    batch_keys=DEFAULT_BATCH_KEYS) -> Callable[[TrainState, Batch, jax.Array], Any]:
    """step(state, batch, rng) -> (new_state, metrics); the old state's buffers are donated."""
    loss_fn = loss_fn or make_loss_fn(cfg)

    def step(state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        (loss, (nll_sum, n)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "nll_sum": nll_sum, "tokens": n, "grad_norm": optax.tree.norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_sh = batch_shardings(mesh, rules, batch_keys)
    return jax.jit(step, in_shardings=(shardings, batch_sh, replicated(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def make_eval_step(cfg: ModelConfig, mesh: Mesh, param_shardings: Any, rules=None,
                   loss_fn: Callable | None = None, batch_keys=DEFAULT_BATCH_KEYS) -> Callable[[Any, Batch], Any]:
    """eval(params, batch) -> (nll_sum, n_tokens) for perplexity (deterministic forward)."""
    loss_fn = loss_fn or make_loss_fn(cfg)

    def evaluate(params, batch: Batch):
        _, (nll_sum, n) = loss_fn(params, batch, jax.random.key(0), deterministic=True)
        return nll_sum, n

    batch_sh = batch_shardings(mesh, rules, batch_keys)
    return jax.jit(evaluate, in_shardings=(param_shardings, batch_sh), out_shardings=replicated(mesh))
