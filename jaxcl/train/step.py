"""Jitted train and eval steps over a sharded TrainState (donated) and a sharded batch."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxcl.models import ModelConfig, build
from jaxcl.parallel import batch_sharding, replicated
from jaxcl.train.losses import causal_lm_nll, causal_lm_weights, mask_tokens, masked_lm_nll
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
    """loss_fn(params, batch, rng, deterministic=False) -> (mean NLL, (nll_sum, n_tokens, outputs)).

    `outputs` is what a strategy's loss term may read (`jaxcl.train.strategy`): `logits` [batch, seq, vocab]
    float32, `input_ids` (the model's input: masked for MLM), `attention_mask`, `prompt_ids` (or None) and
    `weights` [batch, seq] (1 where position t's prediction is scored). Unused outputs cost nothing under
    jit. Dropout is active only when training (`deterministic=False`) and the model has dropout.
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
            inputs, weights = ids, causal_lm_weights(ids, mask)
        else:
            corrupted, labels, label_mask = mask_tokens(rng, ids, mask, vocab_size=cfg.vocab_size,
                                                        mask_token_id=mask_token_id, probability=mlm_probability)
            out = model.apply({"params": params}, corrupted, mask, deterministic=deterministic, rngs=rngs,
                              prompt_ids=prompt_ids)
            nll_sum, n, _ = masked_lm_nll(out.logits, labels, label_mask)
            inputs, weights = corrupted, label_mask.astype(jnp.float32)
        outputs = {"logits": out.logits, "input_ids": inputs, "attention_mask": mask, "prompt_ids": prompt_ids,
                   "weights": weights}
        return nll_sum / jnp.maximum(n, 1.0), (nll_sum, n, outputs)

    return loss_fn


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, shardings: TrainState,
                    rules=None, loss_fn: Callable | None = None, batch_keys=DEFAULT_BATCH_KEYS, *,
                    terms: Sequence[tuple[str, Callable]] = (), reference: bool = False) -> Callable:
    """step(state, batch, rng[, reference_batch]) -> (new_state, metrics); the old state's buffers are donated.

    `terms` are strategies' loss terms, (name, fn(params, batch, outputs, state.strategy[name], rng) ->
    scalar), added to the mean NLL the gradient is taken of; `metrics["loss"]` stays the NLL and each term
    is reported as `metrics["penalty/<name>"]`. With `reference`, the step takes a second batch and passes
    the gradient of the NLL on it to `tx.update` as `reference_grads` (A-GEM's memory gradient); the cosine
    between it and the batch's gradient is `metrics["reference_cosine"]` (< 0: they conflict).
    """
    loss_fn = loss_fn or make_loss_fn(cfg)

    def objective(params, strategy_state, batch, rng):
        loss, (nll_sum, n, outputs) = loss_fn(params, batch, rng)
        total, penalties = loss, {}
        for name, term in terms:
            penalties[name] = term(params, batch, outputs, strategy_state[name], rng)
            total = total + penalties[name]
        return total, (loss, nll_sum, n, penalties)

    def step(state: TrainState, batch: Batch, rng: jax.Array, reference_batch: Batch | None = None):
        rng = jax.random.fold_in(rng, state.step)
        (_, (loss, nll_sum, n, penalties)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state.strategy, batch, rng)
        extra, metrics = {}, {}
        if reference:
            ref = jax.grad(lambda p: loss_fn(p, reference_batch, jax.random.fold_in(rng, 2))[0])(state.params)
            extra["reference_grads"] = ref
            metrics["reference_cosine"] = optax.tree.vdot(grads, ref) / jnp.maximum(
                optax.tree.norm(grads) * optax.tree.norm(ref), 1e-30)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        metrics.update({"loss": loss, "nll_sum": nll_sum, "tokens": n, "grad_norm": optax.tree.norm(grads)})
        metrics.update({f"penalty/{k}": v for k, v in penalties.items()})
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_sh = batch_shardings(mesh, rules, batch_keys)
    in_shardings = (shardings, batch_sh, replicated(mesh)) + ((batch_sh,) if reference else ())
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def make_eval_step(cfg: ModelConfig, mesh: Mesh, param_shardings: Any, rules=None,
                   loss_fn: Callable | None = None, batch_keys=DEFAULT_BATCH_KEYS) -> Callable[[Any, Batch], Any]:
    """eval(params, batch) -> (nll_sum, n_tokens) for perplexity (deterministic forward)."""
    loss_fn = loss_fn or make_loss_fn(cfg)

    def evaluate(params, batch: Batch):
        _, (nll_sum, n, _) = loss_fn(params, batch, jax.random.key(0), deterministic=True)
        return nll_sum, n

    batch_sh = batch_shardings(mesh, rules, batch_keys)
    return jax.jit(evaluate, in_shardings=(param_shardings, batch_sh), out_shardings=replicated(mesh))
