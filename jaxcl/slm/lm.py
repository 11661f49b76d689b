"""SLM on a decoder LM over the domain stream: DTKR picks per-domain JARe increments for every sequence.

The frozen backbone is `model.init_from` (a pretrained decoder the user brings: GPT-2 / LLaMA family), or
the configured decoder pre-trained on the first domain by the shared pre-training path
(`jaxcl.train.pretrain`: a cached one-stage run in the run directory); it is never trained afterwards. Then, for every domain in order (the first one
included): train the domain's DTKR keys on the sentence-encoder queries of its training sequences,
freeze them into the pool, train the domain's JARe slots with the causal-LM loss (backbone, keys and the
other slots masked), and evaluate the perplexity of every domain's validation sequences with slots
retrieved per sequence from its text alone. Report: the perplexity matrix plus `retrieval_accuracy`.

The baselines (`slm.baselines`: sequential, replay, multitask) run in the same code path on the same
frozen backbone: one shared set of K slots with uniform weights, trained domain after domain, with a
replay buffer of earlier domains, or on all domains at once (the upper bound).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.config import ConfigError
from jaxcl.data.sources import open_source
from jaxcl.data.shuffle import fold_key, index_shuffle
from jaxcl.data.stream import cached_domains
from jaxcl.data.tokenizer import load_tokenizer
from jaxcl.init_from import check_tokenizer_fits, load_params, tokenizer_spec
from jaxcl.models import build
from jaxcl.slm import dtkr, jare, state
from jaxcl.slm.state import task_mixture
from jaxcl.train.losses import causal_lm_nll


class LmStream:
    """The packed token sequences every method reads (`jaxcl.data.stream.cached_domains`), per domain and
    split, with the decoded text's DTKR queries (training rows shuffled and capped at slm.train_examples)."""

    def __init__(self, runner):
        cfg, s = runner.cfg, runner.scfg
        if cfg.data.mixture:
            raise ConfigError("data.mixture: SLM learns one adapter per domain from that domain's rows; it takes no "
                              "mixture (remove data.mixture)")
        if not cfg.model.is_decoder:
            raise ConfigError("slm.mode=lm needs a decoder model (gpt2 or llama), "
                              f"got model.family={cfg.model.family!r}")
        self.tokenizer_spec = tokenizer_spec(cfg)
        self.tokenizer = load_tokenizer(self.tokenizer_spec)
        check_tokenizer_fits(cfg, self.tokenizer, self.tokenizer_spec)
        source = open_source(cfg.data.source, cfg.data.text_field)
        self.domains = tuple(cfg.data.domains) or source.domains()
        if len(self.domains) > s.max_tasks:
            raise ConfigError(f"{len(self.domains)} domains exceed slm.max_tasks={s.max_tasks}")
        n_eval = cfg.data.eval_batches * cfg.data.batch_size
        train, valid = cached_domains(cfg.data, self.tokenizer, self.tokenizer_spec, self.domains, n_eval, source=source)
        self.train, self.valid = {}, {}
        for d in self.domains:
            n = len(train[d])        # a seeded sample of at most slm.train_examples rows, read from the cache
            k = n if s.train_examples is None else min(n, s.train_examples)
            rows = train[d].take(index_shuffle(np.arange(k), n, fold_key(cfg.run.seed)))
            self.train[d] = (rows, self._queries(runner.encoder, rows, f"domain {d!r} train"))
            self.valid[d] = (valid[d], self._queries(runner.encoder, valid[d], f"domain {d!r} valid"))

    def _queries(self, encoder, sequences: np.ndarray, what: str) -> np.ndarray:
        texts = [self.tokenizer.decode(row.tolist()) for row in sequences]
        import warnings
        with warnings.catch_warnings():      # LM sequences are routinely longer than the query encoder's limit
            warnings.simplefilter("ignore", UserWarning)
            ids, mask = encoder.tokenize(texts, what)
        return encoder.queries(texts, ids, mask)


def run_lm(runner, metrics) -> dict[str, Any]:
    """The LM-mode run (see the module docstring); returns {method: stages, matrix, and retrieval (SLM) or
    the seen columns (baselines)}."""
    cfg, s = runner.cfg, runner.scfg
    stream = LmStream(runner)
    model = build(cfg.model)
    rng = np.random.default_rng(cfg.run.seed)
    source, steps0 = backbone_source(runner, stream)
    backbone = load_params(source, cfg.model, rng=jax.random.key(cfg.run.seed))
    plain_nll = jax.jit(lambda p, ids: _nll(model, p, None, ids, None, None))
    initial, _ = _evaluate_row(cfg, stream, len(stream.domains),
                               lambda ids, queries, j: (*plain_nll(backbone, ids), None), metrics, "backbone", "initial")
    steps = _JareSteps(model, s)
    results = {"slm": _run_slm(cfg, s, stream, runner.encoder.dim, backbone, steps, steps0, rng, metrics)}
    results["slm"]["backbone"] = source
    results["slm"]["initial"] = initial
    save_state(runner.run_dir, cfg, results["slm"], stream.tokenizer_spec)
    for index, method in enumerate(s.baselines, start=1):
        results[method] = _run_shared_slots(method, cfg, s, stream, backbone, steps, steps0,
                                            np.random.default_rng([cfg.run.seed, index]), metrics)
    return results


def _nll(model, params, bank, ids, slots, weights):
    """(summed next-token NLL, token count) of `ids` with the bank's `slots` mixed by `weights` (or none)."""
    adapters = None if bank is None else jare.mix_adapters(bank, slots, weights)
    logits = model.apply({"params": params}, ids, adapters=adapters).logits
    total, count, _ = causal_lm_nll(logits, ids, None)
    return total, count


def backbone_source(runner, stream: LmStream) -> tuple[str, int]:
    """Where the frozen backbone comes from (an init_from source) and the training steps it took here:
    `model.init_from`, or the shared pre-training on the first domain (cached in the run directory)."""
    cfg = runner.cfg
    if cfg.init_from:
        return cfg.init_from, 0
    from jaxcl.init_from import parse_init_from, pinned_spec
    from jaxcl.train.pretrain import pretrain, pretraining_config

    run_dir = pretrain(cfg, cfg.model, (stream.domains[0],), runner.run_dir, "backbone")
    steps = pretraining_config(cfg, cfg.model, (stream.domains[0],), run_dir).train.steps
    return pinned_spec(parse_init_from(str(run_dir))), steps


class _JareSteps:
    """The jitted pieces every LM-mode method shares: a masked slot step and the evaluation NLL.

    The backbone is an argument (not a closure constant), so SLM and the baselines run one compiled
    program per shape.
    """

    def __init__(self, model, s):
        self.s = s
        self.tx = optax.adamw(s.lr, weight_decay=s.weight_decay)
        tx = self.tx

        @jax.jit
        def slot_step(backbone, bank, opt_state, ids, slots, weights, mask):
            def loss(b):
                total, count = _nll(model, backbone, b, ids, slots, weights)
                return total / count
            value, grads = jax.value_and_grad(loss)(bank)
            updates, opt_state = tx.update(grads, opt_state, bank)
            return jare.masked_apply(bank, updates, mask), opt_state, value

        @jax.jit
        def retrieved_nll(backbone, bank, pool, ids, queries):
            slots, weights, task = dtkr.retrieve_from_text(queries, pool, s.top_k, s.retrieval == "example",
                                                           s.max_tasks, s.mix, s.task_choice)
            total, count = _nll(model, backbone, bank, ids, slots, weights)
            return total, count, task

        @jax.jit
        def fixed_nll(backbone, bank, ids, slots, weights):
            return _nll(model, backbone, bank, ids, slots, weights)

        self.slot_step, self.retrieved_nll, self.fixed_nll = slot_step, retrieved_nll, fixed_nll

    def new_bank(self, cfg):
        """A fresh preallocated increment bank (`up` zero: the model is the backbone until trained)."""
        s = self.s
        return jare.init_increment_bank(jax.random.key(cfg.run.seed + 1), cfg.model,
                                        max_slots=s.max_tasks * s.slots_per_task, rank=s.rank,
                                        targets=tuple(s.targets), init_std=s.init_std)


def _evaluate_row(cfg, stream: LmStream, seen: int, score_batch, metrics, method: str, stage: str) -> tuple[list, dict]:
    """Validation perplexity of the first `seen` domains (None after) and, where given, retrieval accuracy.

    `score_batch(ids, queries, domain_index)` -> (NLL sum, token count, sequences whose retrieved task is
    the domain or None): the domain index is used only to score retrieval, never by the model.
    """
    row, retrieval = [], {}
    for j, other in enumerate(stream.domains):
        if j >= seen:
            row.append(None)
            continue
        v_seqs, v_queries = stream.valid[other]
        total = count = right = 0.0
        for start in range(0, len(v_seqs), cfg.data.batch_size):
            t, c, hits = score_batch(jnp.asarray(v_seqs[start:start + cfg.data.batch_size]),
                                     jnp.asarray(v_queries[start:start + cfg.data.batch_size]), j)
            total, count = total + float(t), count + float(c)
            right += 0.0 if hits is None else hits
        ppl = math.exp(total / max(count, 1.0))
        row.append(ppl)
        record = dict(kind="eval", method=method, stage=stage, domain=other, perplexity=ppl)
        if hits is not None:
            retrieval[other] = record["retrieval_accuracy"] = 100.0 * right / len(v_seqs)
        metrics.write(**record)
    return row, retrieval


def _run_slm(cfg, s, stream: LmStream, query_dim: int, backbone, steps: _JareSteps, steps0: int, rng,
             metrics) -> dict[str, Any]:
    """SLM: per-domain DTKR keys and JARe slots; evaluation retrieves per sequence from its text alone."""
    from tqdm.auto import tqdm

    bank = steps.new_bank(cfg)
    keys = dtkr.new_key_bank(s.max_tasks * s.slots_per_task, query_dim, s.groups, max_tasks=s.max_tasks)

    def score(ids, queries, j):
        t, c, task = steps.retrieved_nll(backbone, bank, keys, ids, queries)
        hits = float(jnp.sum(task == j)) * (1 if s.retrieval == "example" else len(ids))
        return t, c, hits

    matrix, retrieval = [], {}
    for stage, domain in enumerate(stream.domains):
        seqs, queries = stream.train[domain]
        task_keys, history = dtkr.train_task_keys(
            queries, jax.random.key(cfg.run.seed * 7919 + stage), groups=s.groups, slots=s.slots_per_task,
            epochs=s.key_epochs, batch_size=s.key_batch_size, lr=s.key_lr, mask_prob=s.key_mask_prob, init=s.key_init)
        keys, slots_owned = dtkr.add_task_keys(keys, stage, task_keys)
        keys = dtkr.add_task_statistics(keys, stage, queries, s.gaussian_shrinkage)
        metrics.write(kind="keys", method="slm", stage=domain, loss_per_epoch=history)
        flags = np.zeros(keys.max_slots, bool)
        flags[slots_owned] = True
        mask = jare.slot_mask(bank, flags)
        allowed = jnp.asarray(np.asarray(keys.slot_task) == stage)
        opt_state = steps.tx.init(bank)
        for step in tqdm(range(s.steps), desc=f"slm: {domain}", leave=False):
            rows = rng.integers(len(seqs), size=cfg.data.batch_size)
            r_slots, r_weights = dtkr.retrieve(jnp.asarray(queries[rows]), keys.keys, allowed, s.top_k,
                                               s.retrieval == "example")
            bank, opt_state, loss = steps.slot_step(backbone, bank, opt_state, jnp.asarray(seqs[rows]), r_slots,
                                                    r_weights, mask)
            if step % cfg.train.log_every == 0 or step == s.steps - 1:
                metrics.write(kind="train", method="slm", stage=domain, step=step,
                              global_step=steps0 + stage * s.steps + step, loss=float(loss))
        row, retrieval = _evaluate_row(cfg, stream, stage + 1, score, metrics, "slm", domain)
        matrix.append(row)
    return {"stages": list(stream.domains), "matrix": matrix, "retrieval": retrieval, "bank": bank, "keys": keys,
            "task_weights": task_mixing_weights(keys, stream, s)}


def task_mixing_weights(keys: dtkr.KeyBank, stream: LmStream, s) -> dict[str, dict[str, list]]:
    """Per domain: its slots and fixed mixing weights over its validation queries (`jaxcl.slm.state`)."""
    return {domain: task_mixture(keys, t, stream.valid[domain][1], s.top_k) for t, domain in enumerate(stream.domains)}


def save_state(run_dir, cfg, slm: dict[str, Any], tokenizer: str) -> None:
    """What `jaxcl export` needs from a finished LM-mode run (`jaxcl.slm.state`)."""
    state.save_state(run_dir, bank=slm["bank"], keys=slm["keys"], info={
        "mode": "lm", "backbone": slm["backbone"], "model": cfg.model.to_dict(), "tokenizer": tokenizer,
        "domains": slm["stages"], "targets": list(cfg.slm.targets), "rank": cfg.slm.rank,
        "tasks": slm["task_weights"]})


def _run_shared_slots(method: str, cfg, s, stream: LmStream, backbone, steps: _JareSteps, steps0: int, rng,
                      metrics) -> dict[str, Any]:
    """A baseline in SLM's code path: one shared set of K slots (uniform weights) on the same frozen backbone.

    sequential: domain after domain; replay: each batch row draws from the current domain or from a fixed
    buffer of the first `replay_per_task` training sequences of one earlier domain (sources uniform);
    multitask: one stage over every domain for `steps x domains` steps (the upper bound).
    """
    from tqdm.auto import tqdm

    bank = steps.new_bank(cfg)
    flags = np.zeros(s.max_tasks * s.slots_per_task, bool)
    flags[:s.top_k] = True
    mask = jare.slot_mask(bank, flags)
    slots = jnp.arange(s.top_k, dtype=jnp.int32)[None]                          # [1, K]: the same for every row
    weights = jnp.full((1, s.top_k), 1.0 / s.top_k, jnp.float32)

    def score(ids, queries, j):
        t, c = steps.fixed_nll(backbone, bank, ids, slots, weights)
        return t, c, None

    names = stream.domains
    plan = [("multitask", list(range(len(names))), s.steps * len(names))] if method == "multitask" else \
        [(d, [i], s.steps) for i, d in enumerate(names)]
    matrix, done = [], 0
    for stage_name, current, n_steps in plan:
        pools = [stream.train[names[i]][0] for i in current]
        if method == "replay":
            pools += [stream.train[names[i]][0][:s.replay_per_task] for i in range(current[0])]
        opt_state = steps.tx.init(bank)
        for step in tqdm(range(n_steps), desc=f"{method}: {stage_name}", leave=False):
            src = rng.integers(len(pools), size=cfg.data.batch_size)
            batch = np.stack([pools[p][rng.integers(len(pools[p]))] for p in src])
            bank, opt_state, loss = steps.slot_step(backbone, bank, opt_state, jnp.asarray(batch), slots, weights, mask)
            if step % cfg.train.log_every == 0 or step == n_steps - 1:
                metrics.write(kind="train", method=method, stage=stage_name, step=step,
                              global_step=steps0 + done + step, loss=float(loss))
        done += n_steps
        row, _ = _evaluate_row(cfg, stream, max(current) + 1, score, metrics, method, stage_name)
        matrix.append(row)
    return {"stages": [stage for stage, _, _ in plan], "matrix": matrix, "seen": list(range(len(names)))}


__all__ = ["run_lm", "LmStream", "backbone_source", "save_state", "task_mixing_weights"]
