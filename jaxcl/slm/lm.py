"""SLM on a decoder LM over the domain stream: DTKR picks per-domain JARe increments for every sequence.

Stage 0 pre-trains the configured decoder (GPT-2 / LLaMA family, `model:`) on the first domain with all
parameters (it is the frozen backbone from then on). Then, for every domain in order (the first one
included): train the domain's DTKR keys on the sentence-encoder queries of its training sequences,
freeze them into the pool, train the domain's JARe slots with the causal-LM loss (backbone, keys and the
other slots masked), and evaluate the perplexity of every domain's validation sequences with slots
retrieved per sequence from its text alone. Report: the perplexity matrix plus `retrieval_accuracy`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.config import ConfigError
from jaxcl.data.sources import open_source
from jaxcl.data.stream import pack_sequences
from jaxcl.data.tokenizer import load_tokenizer
from jaxcl.models import build, init_params
from jaxcl.slm import dtkr, jare
from jaxcl.train.losses import causal_lm_nll
from jaxcl.train.optimizer import make_optimizer


class LmStream:
    """Packed token sequences per domain and split, with the decoded text's DTKR queries."""

    def __init__(self, runner):
        cfg, s = runner.cfg, runner.scfg
        if not cfg.model.is_decoder:
            raise ConfigError("slm.mode=lm needs a decoder model (gpt2 or llama), "
                              f"got model.family={cfg.model.family!r}")
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                              f"({self.tokenizer.vocab_size})")
        source = open_source(cfg.data.source, cfg.data.text_field)
        self.domains = tuple(cfg.data.domains) or source.domains()
        if len(self.domains) > s.max_tasks:
            raise ConfigError(f"{len(self.domains)} domains exceed slm.max_tasks={s.max_tasks}")
        n_eval = cfg.data.eval_batches * cfg.data.batch_size
        self.train, self.valid = {}, {}
        for d in self.domains:
            train = pack_sequences(self.tokenizer.encode_documents(source.documents(d, "train")), cfg.data.seq_len,
                                   f"domain {d!r} train split")
            rng = np.random.default_rng(cfg.run.seed)
            train = train[rng.permutation(len(train))][:s.train_examples]
            valid = pack_sequences(self.tokenizer.encode_documents(source.documents(d, "valid")), cfg.data.seq_len,
                                   f"domain {d!r} valid split")[:n_eval]
            self.train[d] = (train, self._queries(runner.encoder, train, f"domain {d!r} train"))
            self.valid[d] = (valid, self._queries(runner.encoder, valid, f"domain {d!r} valid"))

    def _queries(self, encoder, sequences: np.ndarray, what: str) -> np.ndarray:
        texts = [self.tokenizer.decode(row.tolist()) for row in sequences]
        import warnings
        with warnings.catch_warnings():      # LM sequences are routinely longer than the query encoder's limit
            warnings.simplefilter("ignore", UserWarning)
            ids, mask = encoder.tokenize(texts, what)
        return encoder.queries(texts, ids, mask)


def run_lm(runner, metrics) -> dict[str, Any]:
    """The LM-mode run (see the module docstring); returns the report's fields."""
    cfg, s = runner.cfg, runner.scfg
    stream = LmStream(runner)
    model_cfg = cfg.model
    model = build(model_cfg)
    rng = np.random.default_rng(cfg.run.seed)

    def nll(params, bank, ids, slots, weights):
        adapters = None if bank is None else jare.mix_adapters(bank, slots, weights)
        logits = model.apply({"params": params}, ids, adapters=adapters).logits
        total, count, _ = causal_lm_nll(logits, ids, None)
        return total, count

    # ---- stage 0: the backbone, pre-trained on the first domain and frozen afterwards
    first = stream.domains[0]
    steps0 = cfg.train.pretrain_steps or cfg.train.steps
    params = init_params(model_cfg, jax.random.key(cfg.run.seed))
    tx0 = make_optimizer(cfg.optim, steps0)
    opt0 = tx0.init(params)

    @jax.jit
    def pretrain_step(params, opt_state, ids):
        def loss(p):
            total, count = nll(p, None, ids, None, None)
            return total / count
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx0.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    from tqdm.auto import tqdm
    train0 = stream.train[first][0]
    for step in tqdm(range(steps0), desc=f"pre-train backbone on {first}", leave=False):
        batch = train0[rng.integers(len(train0), size=cfg.data.batch_size)]
        params, opt0, loss = pretrain_step(params, opt0, jnp.asarray(batch))
        if step % cfg.train.log_every == 0:
            metrics.write(kind="train", method="slm", stage=f"pretrain:{first}", step=step, global_step=step,
                          loss=float(loss))
    backbone = params

    # ---- JARe bank + key pool, preallocated for max_tasks domains
    bank = jare.init_increment_bank(jax.random.key(cfg.run.seed + 1), model_cfg,
                                    max_slots=s.max_tasks * s.slots_per_task, rank=s.rank,
                                    targets=tuple(s.targets), init_std=s.init_std)
    keys = dtkr.new_key_bank(s.max_tasks * s.slots_per_task, runner.encoder.dim, s.groups)
    tx = optax.adamw(s.lr, weight_decay=s.weight_decay)

    @jax.jit
    def slot_step(backbone, bank, opt_state, ids, slots, weights, mask):      # backbone: an argument, not a constant
        def loss(b):
            total, count = nll(backbone, b, ids, slots, weights)
            return total / count
        value, grads = jax.value_and_grad(loss)(bank)
        updates, opt_state = tx.update(grads, opt_state, bank)
        return jare.masked_apply(bank, updates, mask), opt_state, value

    @jax.jit
    def eval_nll(backbone, bank, pool, ids, queries):
        slots, weights, task = dtkr.retrieve_from_text(queries, pool, s.top_k, s.retrieval == "example",
                                                       s.max_tasks, s.mix, s.task_choice)
        total, count = nll(backbone, bank, ids, slots, weights)
        return total, count, task

    matrix, retrieval = [], {}
    for stage, domain in enumerate(stream.domains):
        seqs, queries = stream.train[domain]
        task_keys, history = dtkr.train_task_keys(
            queries, jax.random.key(cfg.run.seed * 7919 + stage), groups=s.groups, slots=s.slots_per_task,
            epochs=s.key_epochs, batch_size=s.key_batch_size, lr=s.key_lr, mask_prob=s.key_mask_prob, init=s.key_init)
        keys, slots_owned = dtkr.add_task_keys(keys, stage, task_keys)
        metrics.write(kind="keys", method="slm", stage=domain, loss_per_epoch=history)
        flags = np.zeros(keys.max_slots, bool)
        flags[slots_owned] = True
        mask = jare.slot_mask(bank, flags)
        allowed = jnp.asarray(np.asarray(keys.slot_task) == stage)
        opt_state = tx.init(bank)
        for step in tqdm(range(s.steps), desc=f"slm: {domain}", leave=False):
            rows = rng.integers(len(seqs), size=cfg.data.batch_size)
            r_slots, r_weights = dtkr.retrieve(jnp.asarray(queries[rows]), keys.keys, allowed, s.top_k,
                                               s.retrieval == "example")
            bank, opt_state, loss = slot_step(backbone, bank, opt_state, jnp.asarray(seqs[rows]), r_slots, r_weights,
                                              mask)
            if step % cfg.train.log_every == 0 or step == s.steps - 1:
                metrics.write(kind="train", method="slm", stage=domain, step=step,
                              global_step=steps0 + stage * s.steps + step, loss=float(loss))
        row = []
        for j, other in enumerate(stream.domains):
            if j > stage:
                row.append(None)
                continue
            v_seqs, v_queries = stream.valid[other]
            total = count = right = 0.0
            for start in range(0, len(v_seqs), cfg.data.batch_size):
                t, c, task = eval_nll(backbone, bank, keys, jnp.asarray(v_seqs[start:start + cfg.data.batch_size]),
                                      jnp.asarray(v_queries[start:start + cfg.data.batch_size]))
                total, count = total + float(t), count + float(c)
                right += float(jnp.sum(task == j)) * (1 if s.retrieval == "example" else
                                                      len(v_seqs[start:start + cfg.data.batch_size]))
            ppl = math.exp(total / max(count, 1.0))
            row.append(ppl)
            retrieval[other] = 100.0 * right / len(v_seqs)
            metrics.write(kind="eval", method="slm", stage=domain, domain=other, perplexity=ppl,
                          retrieval_accuracy=retrieval[other])
        matrix.append(row)
    return {"stages": list(stream.domains), "matrix": matrix, "retrieval": retrieval, "time": time.time()}


__all__ = ["run_lm", "LmStream"]
