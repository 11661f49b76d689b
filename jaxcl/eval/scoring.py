"""Sequence scoring for downstream evaluation: per-token log-likelihoods and multiple-choice by likelihood.

    from jaxcl.eval.scoring import sequence_logprobs, multiple_choice
    logp = sequence_logprobs(cfg, params, ids, mask)               # [b, s-1]: log p(ids[:, t+1] | ids[:, :t+1])
    res = multiple_choice(cfg, params, contexts, options)          # k-shot QA: the option the model finds likeliest
    res.choice, res.choice_normalized                              # by summed / by per-token log-likelihood

Both take the same continual-learning state as `jaxcl.generate.generate`: a kNN-LM memory (`KnnMemory`: every
scored token is mixed with its neighbours, `knn_lm_target_logprobs`, λ constant or from SeMem's calibrator),
JARe `adapters` and ELLE `prompt_ids`, so a method is evaluated on what it would generate. Multiple-choice
scoring is the standard zero/k-shot protocol (Brown et al. 2020, §2; the lm-evaluation-harness
`loglikelihood` request): each option's tokens are scored after the context, summed, and optionally
divided by the option's token count ("length-normalised"); the answer is the argmax.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.models import ModelConfig, build, is_unstacked

__all__ = ["sequence_logprobs", "multiple_choice", "MultipleChoice"]


@functools.partial(jax.jit, static_argnums=0)
def _lm_scores(cfg: ModelConfig, params, ids, mask, adapters, prompt_ids):
    """Per target position t (predicting ids[:, t+1]): log p_LM(target), max p, entropy, the kNN query key."""
    out = build(cfg, scan_layers=not is_unstacked(params)).apply({"params": params}, ids, mask, positions=_positions(mask), adapters=adapters,
                           prompt_ids=prompt_ids)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)               # text positions only (prompts dropped)
    gold = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    p = jnp.exp(logp)
    keys = out.knn_keys[:, :-1].astype(jnp.float32)
    return gold, jnp.max(p, axis=-1), -jnp.sum(p * logp, axis=-1), keys


def _positions(mask):
    from jaxcl.generate import positions_from_mask
    return positions_from_mask(mask)


@jax.jit
def _mixed(gold, dists, values, targets, lam, temperature):
    from jaxcl.memory.knnlm import knn_lm_target_logprobs
    return knn_lm_target_logprobs(gold, dists, values, targets, lam=lam, temperature=temperature)


def sequence_logprobs(cfg: ModelConfig, params: Any, input_ids, attention_mask=None, *, memory=None,
                      adapters: dict[str, Any] | None = None, prompt_ids=None) -> np.ndarray:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every position, `[batch, seq - 1]` float32 (natural log).

    Rows may be left- or right-padded (`attention_mask` marks real tokens; positions follow the mask as in
    `generate`); entries whose target is padding, or whose context has no real token, are 0. With `memory`
    (a `KnnMemory` of this model) each real target is scored under the kNN-LM mixture, searched in one batch.
    `adapters` / `prompt_ids` as in `generate`. Errors: a non-decoder, ids not [batch, seq >= 2], a mask of
    another shape, a memory of another model.
    """
    if not cfg.is_decoder:
        raise ValueError(f"sequence scoring needs a decoder (gpt2 or llama), got model.family={cfg.family!r}")
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.shape[0] < 1:
        raise ValueError(f"input_ids must be [batch, seq >= 2] to score a next token, got {tuple(ids.shape)}")
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    if cfg.max_seq_len is not None and ids.shape[1] + (cfg.prompt_length if prompt_ids is not None else 0) \
            > cfg.max_seq_len:
        raise ValueError(f"sequences of {ids.shape[1]} tokens exceed model.max_seq_len={cfg.max_seq_len}")
    if prompt_ids is not None:
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    gold, conf, entropy, keys = jax.device_get(_lm_scores(cfg, params, ids, mask, adapters, prompt_ids))
    m = np.asarray(mask)
    valid = (m[:, 1:] > 0) & (np.cumsum(m, axis=1)[:, :-1] > 0)          # a real target after a real context
    out = np.where(valid, gold, 0.0).astype(np.float32)
    if memory is None or not valid.any():
        return out
    memory.check(cfg, params)
    targets, contexts = np.asarray(ids)[:, 1:][valid], np.asarray(ids)[:, :-1][valid]
    dists, values, lam, temperature = memory.lookup(keys[valid], conf[valid], entropy[valid], contexts)
    out[valid] = np.asarray(_mixed(gold[valid], dists, values, targets, lam, temperature))
    return out


@dataclasses.dataclass
class MultipleChoice:
    """Scores of `n` questions with up to `o` options each (missing options: -inf).

    logprob [n, o]: summed log-likelihood of each option's tokens after the context; tokens [n, o]: their
    count; choice [n]: argmax of logprob; choice_normalized [n]: argmax of logprob / tokens.
    """

    logprob: np.ndarray
    tokens: np.ndarray
    choice: np.ndarray
    choice_normalized: np.ndarray

    def accuracy(self, answers: Sequence[int], normalized: bool = False) -> float:
        """Fraction of questions whose chosen option is `answers[i]`."""
        chosen = self.choice_normalized if normalized else self.choice
        return float(np.mean(chosen == np.asarray(answers)))


def multiple_choice(cfg: ModelConfig, params: Any, contexts: Sequence[Sequence[int]],
                    options: Sequence[Sequence[Sequence[int]]], *, batch_size: int = 16, pad_id: int = 0,
                    memory=None, adapters: dict[str, Any] | None = None, prompt_ids=None) -> MultipleChoice:
    """Score every option of every question by its log-likelihood after the context (see the module docstring).

    contexts: n token-id lists (the k-shot examples and the question; at least one token); options: per
    question, its option token-id lists (each non-empty; tokenize an option with its leading space, as it
    follows the context). Rows are scored in right-padded batches of `batch_size` (lengths bucketed to a
    multiple of 16, so a benchmark compiles a handful of programs). `adapters` must be one mixture for every
    row (G = 1), `prompt_ids` one prompt id (an int). Errors name the question and option.
    """
    if len(contexts) != len(options):
        raise ValueError(f"{len(contexts)} contexts but {len(options)} option lists")
    rows, where = [], []
    for q, (ctx, opts) in enumerate(zip(contexts, options)):
        if not len(ctx):
            raise ValueError(f"question {q}: the context has no tokens")
        if not len(opts):
            raise ValueError(f"question {q}: no options")
        for o, opt in enumerate(opts):
            if not len(opt):
                raise ValueError(f"question {q}, option {o}: the option has no tokens")
            rows.append((list(ctx), list(opt)))
            where.append((q, o))
    width = max(len(opts) for opts in options)
    logprob = np.full((len(contexts), width), -np.inf, np.float64)
    counts = np.zeros((len(contexts), width), np.int64)
    limit = None if cfg.max_seq_len is None else cfg.max_seq_len - (cfg.prompt_length if prompt_ids is not None else 0)
    for (ctx, opt), (q, o) in zip(rows, where):
        if limit is not None and len(ctx) + len(opt) > limit:
            raise ValueError(f"question {q}, option {o}: context + option = {len(ctx) + len(opt)} tokens exceed the "
                             f"model's context of {limit} (model.max_seq_len={cfg.max_seq_len})")
    longest = max(len(c) + len(o) for c, o in rows)
    seq = -(-longest // 16) * 16
    if limit is not None:
        seq = min(seq, limit)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = np.full((batch_size, seq), pad_id, np.int32)
        mask = np.zeros((batch_size, seq), np.int32)
        target = np.zeros((batch_size, seq - 1), bool)
        for r, (ctx, opt) in enumerate(chunk):
            full = ctx + opt
            ids[r, :len(full)], mask[r, :len(full)] = full, 1
            target[r, len(ctx) - 1:len(full) - 1] = True
        mask[len(chunk):, 0] = 1                        # padding rows: one dummy token, never read
        p_ids = None if prompt_ids is None else np.full((batch_size,), int(prompt_ids), np.int32)
        logp = sequence_logprobs(cfg, params, ids, mask, memory=memory, adapters=adapters, prompt_ids=p_ids)
        for r in range(len(chunk)):
            q, o = where[start + r]
            logprob[q, o] = float(np.sum(logp[r][target[r]], dtype=np.float64))
            counts[q, o] = int(target[r].sum())
    norm = np.where(counts > 0, logprob / np.maximum(counts, 1), -np.inf)
    return MultipleChoice(logprob=logprob, tokens=counts, choice=np.argmax(logprob, axis=1),
                          choice_normalized=np.argmax(norm, axis=1))
