"""`SlmRun`: SLM (DTKR + JARe) over a sequence of text-classification tasks, with its baselines.

    jaxcl run configs/slm/demo.yaml

For each task in `slm.tasks`: train the task's DTKR keys on its training queries and freeze them into
the pool, then train the task's JARe slots and head columns (everything else masked), then evaluate
every task seen so far on its test split from the text alone. The baselines (sequential fine-tuning,
experience replay, multitask) run through the same `ContinualClassifier` with one shared slot set and the
union head; so do the strategy rows (ewc, lwf, olora: `jaxcl.slm.strategies`). Outputs: config.yaml, metrics.jsonl, report.json (matrix, summary, retrieval_accuracy,
baselines) and accuracy-matrix heatmaps.

The run directory follows `jaxcl.rundir`: a finished run is returned untouched, a changed config is
refused. SLM keeps no checkpoints (a run takes minutes), so an unfinished run starts again from scratch
and its report accounts for the invocation that did the work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jaxcl import rundir
from jaxcl.config import Config, ConfigError
from jaxcl.data.classification import TaskSplit, load_task
from jaxcl.eval.metrics import bootstrap_matrix, retrieval_confusion, summarize
from jaxcl.eval.report import build_report, format_matrix, plot_matrix, write_report
from jaxcl.slm import dtkr
from jaxcl.slm.classifier import ContinualClassifier, LearnerShape
from jaxcl.slm.encoder import SentenceEncoder, resolve_encoder_dir
from jaxcl.slm.strategies import ROWS as STRATEGY_ROWS
from jaxcl.slm.strategies import OLoRARun, SlmStrategyRun, single_device_shardings

log = logging.getLogger(__name__)
EVAL_BATCH = 64


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)


class _Data:
    """One task split, tokenized, with its cached DTKR queries."""

    def __init__(self, split: TaskSplit, encoder: SentenceEncoder):
        if len(split) == 0:
            raise ValueError(f"task {split.task!r} has an empty {split.split} split")
        self.split = split
        self.ids, self.mask = encoder.tokenize(split.texts, f"task {split.task!r} {split.split}")
        self.queries = encoder.queries(split.texts, self.ids, self.mask)
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)


def held_out(train: TaskSplit, n: int) -> tuple[TaskSplit, TaskSplit]:
    """(train without n texts, those n texts as the validation split): a fixed random choice per task (seeded by
    the task's name, the same in every run), for sources without a validation split, e.g. the original
    AG News / Yelp / Amazon / DBpedia / Yahoo CSVs. Raises when the task has no more than n training texts."""
    if n >= len(train):
        raise ConfigError(f"slm.valid_from_train={n} leaves no training text of task {train.task!r} "
                          f"({len(train)} texts)")
    seed = int.from_bytes(hashlib.sha256(train.task.encode()).digest()[:8], "little")
    order = np.random.default_rng(seed).permutation(len(train))
    keep, held = np.sort(order[n:]), np.sort(order[:n])

    def pick(rows, split):
        return dataclasses.replace(train, split=split, texts=tuple(train.texts[i] for i in rows),
                                   labels=train.labels[rows])

    return pick(keep, "train"), pick(held, "valid")


class SlmRun:
    """The `slm` method runner (see the module docstring)."""

    method = "slm"

    def __init__(self, cfg: Config):
        if cfg.run.strategies:
            raise ConfigError(f"run.strategies={list(cfg.run.strategies)}: on SLM's path strategies are baseline rows "
                              "beside SLM (slm.baselines=[sequential, ewc, lwf, olora, ...]); leave run.strategies empty")
        self.cfg, self.scfg = cfg, cfg.slm
        self.run_dir = cfg.run_dir()
        cache = Path(self.scfg.cache_dir) if self.scfg.cache_dir else None
        try:
            self.encoder = SentenceEncoder(resolve_encoder_dir(self._encoder_name()), self.scfg.max_len, cache,
                                           self.scfg.query_layers)
        except ValueError as err:          # bad max_len / query_layers for this encoder: name the config key
            raise ConfigError(str(err)) from err
        if self.encoder.dim % self.scfg.groups:      # checked before any text is encoded
            raise ConfigError(f"slm.groups={self.scfg.groups} must divide the DTKR query width {self.encoder.dim} "
                              f"(= encoder d_model {self.encoder.cfg.d_model} x "
                              f"{max(1, len(self.scfg.query_layers))} slm.query_layers)")
        self.tasks = tuple(self.scfg.tasks)
        self.data: dict[str, dict[str, _Data]] = {}
        if self.scfg.mode == "lm":
            return                        # the domain stream is read by jaxcl.slm.lm
        for name in self.tasks:
            raw = {}
            for split in ("train", "valid", "test"):
                try:
                    raw[split] = load_task(name, split, self.scfg.task_root)
                except FileNotFoundError:
                    if split != "valid":
                        raise
            if "valid" not in raw and self.scfg.valid_from_train:
                raw["train"], raw["valid"] = held_out(raw["train"], self.scfg.valid_from_train)
            caps = {"train": self.scfg.train_examples, "valid": self.scfg.eval_examples,
                    "test": self.scfg.eval_examples}
            self.data[name] = {split: _Data(data.subset(caps[split]), self.encoder) for split, data in raw.items()}

    def _encoder_name(self) -> str:
        """Classification mode's backbone (and DTKR query encoder): `model.init_from` when given (a Hugging Face
        BERT-family directory), else `slm.encoder`. LM mode's init_from is its decoder backbone instead."""
        cfg, s = self.cfg, self.scfg
        if not cfg.init_from or s.mode != "classification":
            return s.encoder
        from jaxcl.init_from import parse_init_from

        src = parse_init_from(cfg.init_from)
        if src.kind != "hf":
            raise ConfigError(f"model.init_from={cfg.init_from!r}: SLM classification starts from a Hugging Face "
                              "BERT-family directory; turn a jaxcl run into one with `jaxcl export RUN_DIR OUT_DIR`")
        if s.encoder != "minilm" and Path(s.encoder).expanduser().resolve() != src.path:
            raise ConfigError(f"model.init_from={cfg.init_from!r} and slm.encoder={s.encoder!r} name two different "
                              "backbones for SLM classification: give one of them")
        return str(src.path)

    # ------------------------------------------------------------------ learners
    def _learner(self, seed_offset: int) -> ContinualClassifier:
        s = self.scfg
        shape = LearnerShape(max_tasks=s.max_tasks, slots_per_task=s.slots_per_task, top_k=s.top_k, rank=s.rank,
                             max_classes=s.max_classes, groups=s.groups, targets=tuple(s.targets),
                             per_example=s.retrieval == "example", head=s.head, mix=s.mix,
                             task_choice=s.task_choice, gaussian_shrinkage=s.gaussian_shrinkage)
        if not hasattr(self, "_tx"):          # one optimizer object: learners share compiled steps
            self._tx = optax.adamw(s.lr, weight_decay=s.weight_decay)
        return ContinualClassifier(self.encoder.cfg, self.encoder.params, shape, self.encoder.dim,
                                   jax.random.key(self.cfg.run.seed * 1000 + seed_offset), self._tx, s.init_std)

    def _batch_rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(n, size=self.scfg.batch_size, replace=n < self.scfg.batch_size)

    def _train_stage(self, learner, method: str, stage: int, name: str, sources: list[tuple[int, _Data, np.ndarray]],
                     steps: int, slm: bool, metrics, rng: np.random.Generator, row: "_StrategyRow | None" = None) -> None:
        """`sources`: (task index, data, example weight pool) mixed uniformly per batch row; `row`: a strategy
        row's view, loss terms and state (terms only from the second task on)."""
        learner.reset_optimizer()
        if slm:
            task = sources[0][0]
            slots, cols = learner.keys.task_slots(task), learner.columns(task)
            allowed = np.zeros(self.scfg.max_classes, bool)
            allowed[cols] = True
        elif row is not None and row.view.per_task_slots:      # O-LoRA: the task's own slots and columns
            slots, cols = row.view.training_slots(stage)[0], learner.columns(stage)
            allowed = learner.col_task != -1
        else:
            slots = np.arange(self.scfg.top_k)
            cols = np.flatnonzero(learner.col_task != -1)
            allowed = learner.col_task != -1
        update_mask = learner.update_mask(slots, cols)
        k = self.scfg.top_k
        bar = _progress(steps, f"{method}: {name}")
        for step in range(steps):
            src = rng.integers(len(sources), size=self.scfg.batch_size)
            ids, mask, labels, queries = [], [], [], []
            for which in src:
                task, data, pool = sources[which]
                i = pool[rng.integers(len(pool))]
                ids.append(data.ids[i]), mask.append(data.mask[i]), queries.append(data.queries[i])
                labels.append(learner.global_labels(task, data.labels[i:i + 1])[0])
            if slm:
                r_slots, r_weights = learner.retrieve_for_training(sources[0][0], np.stack(queries))
            elif row is not None:
                r_slots, r_weights = (x[None, :] for x in row.view.training_slots(stage))
            else:
                r_slots, r_weights = np.arange(k)[None, :], np.full((1, k), 1.0 / k, np.float32)
            inputs = (np.stack(ids), np.stack(mask), np.array(labels, np.int32), r_slots, r_weights, allowed, update_mask)
            penalties = {}
            if row is not None and row.terms:
                loss, penalties = learner.train_step(*inputs, old_cols=row.old_cols, terms=row.terms, strategy=row.state,
                                                     rng=jax.random.fold_in(jax.random.key(self.cfg.run.seed), step))
            else:
                loss = learner.train_step(*inputs)
            if step % 10 == 0 or step == steps - 1:
                metrics.write(kind="train", method=method, stage=name, step=step,
                              global_step=stage * steps + step, loss=float(loss),
                              **{f"penalty/{k_}": float(v) for k_, v in penalties.items()})
            bar.update()
        bar.close()

    def _evaluate(self, learner, task: int, data: _Data, slm: bool, reuse: dict | None = None,
                  fixed: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """Accuracy (prediction = the right task's right column) and retrieval accuracy, text inputs only.

        `reuse` ({(row, chosen task): (column, owners of the retrieved slots)} for this split, SLM only, when
        `learner.predictions_reusable`): a text whose chosen task was already scored with it is not run
        through the encoder again; its prediction is the same by construction (that task's keys, slots and
        columns are frozen), so the matrix is unchanged and each stage encodes only newly routed texts.
        """
        truth = learner.global_labels(task, data.labels)
        n_all = len(data)
        if reuse is not None:
            chosen = np.concatenate([learner.choose_tasks(data.queries[i:i + EVAL_BATCH])
                                     for i in range(0, n_all, EVAL_BATCH)])
            todo = np.array([i for i in range(n_all) if (i, int(chosen[i])) not in reuse], np.int64)
        else:
            todo = np.arange(n_all)
        cols_all = np.zeros(n_all, np.int64)
        chosen_all = np.zeros(n_all, np.int64)
        owners_all: list[np.ndarray | None] = [None] * n_all
        batch_owners = []
        for start in range(0, len(todo), EVAL_BATCH):
            rows = todo[start:start + EVAL_BATCH]
            n = len(rows)
            pad = EVAL_BATCH - n
            ids, mask, queries = (np.pad(x[rows], ((0, pad), (0, 0))) for x in (data.ids, data.mask, data.queries))
            cols, picked, slots = learner.predict(ids, mask, queries, use_retrieval=slm,
                                                  **({} if fixed is None else {"fixed_slots": fixed[0],
                                                                               "fixed_weights": fixed[1]}))
            owners = np.asarray(learner.keys.slot_task)[slots[:n] if len(slots) > 1 else slots]
            if len(slots) > 1:
                for j, i in enumerate(rows):
                    cols_all[i], chosen_all[i], owners_all[i] = cols[j], picked[j], owners[j]
                    if reuse is not None:
                        reuse[(int(i), int(picked[j]))] = (int(cols[j]), owners[j])
            else:                      # one retrieval for the whole batch
                cols_all[rows], chosen_all[rows] = cols[:n], picked[:n]
                batch_owners.append(owners)
        if reuse is not None:
            for i in range(n_all):
                if owners_all[i] is None:
                    cols_all[i], owners_all[i] = reuse[(i, int(chosen[i]))]
                    chosen_all[i] = chosen[i]
        owners = np.concatenate([o.reshape(-1) for o in batch_owners] +
                                [o.reshape(-1) for o in owners_all if o is not None])
        return {"accuracy": 100.0 * np.sum(cols_all == truth) / n_all,
                "retrieval_accuracy": 100.0 * np.sum(chosen_all == task) / n_all,
                "slot_precision": 100.0 * np.sum(owners == task) / max(owners.size, 1),
                "encoded": int(len(todo)), "correct": cols_all == truth, "chosen": chosen_all}

    def _run_method(self, method: str, metrics) -> dict[str, Any]:
        s = self.scfg
        slm = method == "slm"
        # strategy rows start from the sequential row's initialisation (at strength 0 they train like it)
        learner = self._learner({"slm": 0, "sequential": 1, "replay": 2, "multitask": 3}.get(method, 1))
        strategy_row = _StrategyRow(self.cfg, method, learner) if method in STRATEGY_ROWS else None
        rng = np.random.default_rng(self.cfg.run.seed)
        matrix, valid_matrix, key_losses = [], [], {}
        reuse: dict[tuple[str, str], dict] = {}      # SLM: predictions per (text, chosen task), see _evaluate
        correct: list[list[np.ndarray | None]] = []     # per stage and task: which test texts are right
        chosen: dict[int, np.ndarray] = {}               # per task: the task chosen for each test text (last)
        stages = self.tasks if method != "multitask" else ("multitask",)
        retrieval = {}
        for stage, name in enumerate(stages):
            for t in (range(len(self.tasks)) if method == "multitask" else (stage,)):   # columns appear with tasks
                learner.add_task(t, self.data[self.tasks[t]]["train"].split.label_names)
            if slm:
                keys, history = dtkr.train_task_keys(
                    self.data[name]["train"].queries, jax.random.key(self.cfg.run.seed * 7919 + stage),
                    groups=s.groups, slots=s.slots_per_task, epochs=s.key_epochs, batch_size=s.key_batch_size,
                    lr=s.key_lr, mask_prob=s.key_mask_prob, init=s.key_init)
                learner.set_task_keys(stage, keys, self.data[name]["train"].queries)
                key_losses[name] = history
                metrics.write(kind="keys", method=method, stage=name, loss_per_epoch=history)
            if method == "multitask":
                sources = [(t, self.data[n]["train"], np.arange(len(self.data[n]["train"])))
                           for t, n in enumerate(self.tasks)]
                steps = s.steps * len(self.tasks)
            else:
                sources = [(stage, self.data[name]["train"], np.arange(len(self.data[name]["train"])))]
                steps = s.steps
                if method == "replay":
                    for t in range(stage):     # a fixed buffer of the first examples of every old task
                        old = self.data[self.tasks[t]]["train"]
                        sources.append((t, old, np.arange(min(s.replay_per_task, len(old)))))
            if strategy_row is not None:
                strategy_row.begin(stage, self.data[name]["train"])
            self._train_stage(learner, method, stage, name, sources, steps, slm, metrics, rng, strategy_row)
            if strategy_row is not None and stage < len(stages) - 1:
                strategy_row.end(stage)
            seen = len(self.tasks) if method == "multitask" else stage + 1
            row, vrow = [], []
            correct.append([None] * len(self.tasks))
            for t, other in enumerate(self.tasks):
                if t >= seen:
                    row.append(None), vrow.append(None)
                    continue
                reusable = slm and learner.predictions_reusable
                result = self._evaluate(learner, t, self.data[other]["test"], slm,
                                        reuse.setdefault((other, "test"), {}) if reusable else None,
                                        None if strategy_row is None else strategy_row.eval_slots(seen))
                correct[-1][t], chosen[t] = result.pop("correct"), result.pop("chosen")
                row.append(result["accuracy"])
                # SLM's choices are made on validation text, and so are the strategy rows' strengths
                if (slm or strategy_row is not None) and "valid" in self.data[other]:
                    vrow.append(self._evaluate(learner, t, self.data[other]["valid"], slm,
                                               reuse.setdefault((other, "valid"), {}) if reusable else None,
                                               None if strategy_row is None else strategy_row.eval_slots(seen)
                                               )["accuracy"])
                else:
                    vrow.append(None)
                metrics.write(kind="eval", method=method, stage=name, task=other, split="test", **result)
                if slm:
                    retrieval[other] = result
            matrix.append(row)
            valid_matrix.append(vrow)
            log.info("%s after %s: %s", method, name, row)
        out = {"stages": list(stages), "matrix": matrix, "valid_matrix": valid_matrix,
               "summary": summarize(matrix, "accuracy", list(range(seen))),
               "intervals": bootstrap_matrix(correct, list(range(seen)), seed=self.cfg.run.seed)}
        if slm:
            out["confusion"] = retrieval_confusion(   # after the last task, on test (docs/slm.md)
                chosen, self.tasks, {t: self.data[n]["test"].split.texts for t, n in enumerate(self.tasks)})
            out["retrieval"] = retrieval
            out["key_loss"] = key_losses
            out["learner"] = learner
        return out

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        finished = rundir.begin(self.run_dir, self.cfg, self.method)      # before anything is written
        if finished is not None:
            return finished
        acct = rundir.Invocations()
        metrics = rundir.MetricsFile(self.run_dir / "metrics.jsonl")
        metrics.truncate(0)          # no checkpoints: what an interrupted invocation logged is redone
        if self.scfg.mode == "lm":
            return self._run_lm(metrics, acct)
        results = {m: self._run_method(m, metrics) for m in ("slm", *self.scfg.baselines)}
        slm = results.pop("slm")
        final = slm["retrieval"]
        retrieval_accuracy = float(np.mean([r["retrieval_accuracy"] for r in final.values()]))
        invocations = acct.record()
        report = build_report(
            "slm", "accuracy", slm["stages"], self.tasks, slm["matrix"], acct.total(invocations),
            backbone=str(self.encoder.model_dir),
            invocations=invocations, retrieval_accuracy=retrieval_accuracy,
            retrieval={"per_task_final": {k: v["retrieval_accuracy"] for k, v in final.items()},
                       "slot_precision": float(np.mean([r["slot_precision"] for r in final.values()])),
                       "mode": self.scfg.retrieval, "head": self.scfg.head},
            valid_matrix=slm["valid_matrix"], key_loss=slm["key_loss"], intervals=slm["intervals"],
            retrieval_confusion=slm["confusion"],
            label_sets={n: list(self.data[n]["train"].split.label_names) for n in self.tasks},
            baselines={m: {k: r[k] for k in ("stages", "matrix", "valid_matrix", "summary", "intervals")}
                       for m, r in results.items()})
        plot_matrix(report, self.run_dir / "accuracy_matrix.png")
        for m, r in results.items():
            plot_matrix(build_report(m, "accuracy", r["stages"], self.tasks, r["matrix"], 0.0,
                                     intervals=r["intervals"]),
                        self.run_dir / f"accuracy_matrix_{m}.png")
        self._save_state(slm["learner"])
        write_report(self.run_dir, report)          # last: report.json marks the run finished
        print(format_matrix(report))
        print(f"retrieval accuracy {retrieval_accuracy:.2f} %")
        for m, r in results.items():
            print(f"{m}: " + ", ".join(f"{k}={v:.2f}" for k, v in r["summary"].items()))
        print(f"outputs in {self.run_dir}/")
        self.learner = slm["learner"]
        return report

    def run_baselines(self) -> dict[str, dict[str, Any]]:
        """Only the rows of `slm.baselines` (classification mode), without SLM: for adding baseline rows
        (e.g. ewc, lwf, olora) beside SLM runs that have finished already (`benchmarks/slm_orders.py
        --slm-from`), or for choosing a strategy's strength on validation without paying for SLM.

        Each row is trained and evaluated exactly as in `run` (same initialisation, batches and
        evaluation: the row's matrices equal those of a full run of the same config) and written to
        RUN_DIR/baselines/<row>.json as it finishes (atomically); a rerun reuses the finished rows and runs
        the others. The run directory follows `jaxcl.rundir` (config.yaml saved, a changed config refused).
        A directory holding a finished full run returns that run's baselines.

        Returns {row: {"stages", "matrix", "valid_matrix", "summary", "intervals"}}: matrices in accuracy
        points, rows = after each stage, columns = tasks (None where not seen yet); `valid_matrix` holds the
        validation accuracies for the strategy rows (None for sequential / replay / multitask).
        Raises ConfigError when slm.mode is not classification or slm.baselines is empty.
        """
        if self.scfg.mode != "classification":
            raise ConfigError(f"slm.mode={self.scfg.mode}: only classification runs its baselines alone")
        if not self.scfg.baselines:
            raise ConfigError("slm.baselines is empty: a baselines-only run needs at least one row")
        finished = rundir.begin(self.run_dir, self.cfg, self.method)
        keys = ("stages", "matrix", "valid_matrix", "summary", "intervals")
        if finished is not None:
            return {m: finished["baselines"][m] for m in self.scfg.baselines}
        folder = self.run_dir / "baselines"
        metrics = rundir.MetricsFile(self.run_dir / "metrics.jsonl")
        out = {}
        for m in self.scfg.baselines:
            path = folder / f"{m}.json"
            if path.is_file():
                out[m] = rundir.read_report(path)
                print(f"{m}: finished in {path}", flush=True)
                continue
            started = time.perf_counter()
            result = self._run_method(m, metrics)
            out[m] = {k: result[k] for k in keys} | {"wall_seconds": time.perf_counter() - started}
            folder.mkdir(exist_ok=True)
            rundir.atomic_write(path, json.dumps(out[m], indent=2))
            print(f"{m}: " + ", ".join(f"{k}={v:.2f}" for k, v in result["summary"].items()), flush=True)
        return out

    def _save_state(self, learner: ContinualClassifier) -> None:
        """The trained learner, for `jaxcl export` (`jaxcl.slm.state`): bank, keys, head, and per task its slots
        with fixed mixing weights (over its validation queries, else its test queries) and its head columns."""
        from jaxcl.slm.state import save_state, task_mixture

        tasks = {}
        for t, name in enumerate(self.tasks):
            queries = (self.data[name].get("valid") or self.data[name]["test"]).queries
            cols = learner.columns(t)
            tasks[name] = task_mixture(learner.keys, t, queries, self.scfg.top_k) | {
                "columns": [int(c) for c in cols], "labels": list(learner.label_names[t])}
        save_state(self.run_dir, bank=learner.trainable["bank"], keys=learner.keys,
                   tensors={"head/kernel": learner.trainable["head"]["kernel"],
                            "head/bias": learner.trainable["head"]["bias"]},
                   info={"mode": "classification", "backbone": str(self.encoder.model_dir.resolve()),
                         "model": self.encoder.cfg.to_dict(), "tokenizer": str(self.encoder.model_dir.resolve()),
                         "targets": list(self.scfg.targets), "rank": self.scfg.rank, "tasks": tasks,
                         "pooling": "mean of last_hidden_state over attention_mask",
                         "head": "logits = pooled @ head.kernel + head.bias (the task's columns)"})

    def _run_lm(self, metrics, acct: rundir.Invocations) -> dict[str, Any]:
        from jaxcl.slm.lm import run_lm

        results = run_lm(self, metrics)
        slm = results.pop("slm")
        baselines = {m: {"stages": r["stages"], "matrix": r["matrix"],
                         "summary": summarize(r["matrix"], "perplexity", r["seen"])}
                     for m, r in results.items()}
        invocations = acct.record()
        report = build_report("slm", "perplexity", slm["stages"], slm["stages"], slm["matrix"], acct.total(invocations),
                              invocations=invocations,
                              retrieval_accuracy=float(np.mean(list(slm["retrieval"].values()))),
                              retrieval={"per_task_final": slm["retrieval"], "mode": self.scfg.retrieval},
                              baselines=baselines, backbone=slm["backbone"], initial_perplexity=slm["initial"],
                              task_mixing_weights=slm["task_weights"])
        plot_matrix(report, self.run_dir / "perplexity_matrix.png")
        for m, r in results.items():
            plot_matrix(build_report(m, "perplexity", r["stages"], slm["stages"], r["matrix"], 0.0,
                                     seen=r["seen"]),
                        self.run_dir / f"perplexity_matrix_{m}.png")
        write_report(self.run_dir, report)          # last: report.json marks the run finished
        print(format_matrix(report))
        print(f"retrieval accuracy {report['retrieval_accuracy']:.2f} %")
        for m, r in baselines.items():
            print(f"{m}: " + ", ".join(f"{k}={v:.2f}" for k, v in r["summary"].items()))
        print(f"outputs in {self.run_dir}/")
        return report


class _StrategyRow:
    """One strategy row of `slm.baselines` (ewc, lwf, olora): the strategy object of `jaxcl.strategies`, the
    view it reads (`jaxcl.slm.strategies`), its loss terms (built once: one compile) and its state per task."""

    def __init__(self, cfg: Config, method: str, learner: ContinualClassifier):
        from jaxcl.train.strategy import strategy_class

        self.learner = learner
        self.strategy = strategy_class(method)(cfg)
        self.view = (OLoRARun if method == "olora" else SlmStrategyRun)(cfg, learner, [])
        self.strategy.check(self.view)
        self.shardings = single_device_shardings(learner.trainable)
        term = self.strategy.loss_term(self.view, learner.model_cfg)
        self._terms = () if term is None else ((self.strategy.name, term),)
        self.terms, self.state, self.carry, self.old_cols = (), {}, None, None

    def begin(self, stage: int, train: Any) -> None:
        """Before task `stage` (its columns are added): the strategy's state from the previous task's."""
        learner = self.learner
        self.old_cols = (learner.col_task != -1) & (learner.col_task != stage)
        self.view.tasks.append((train, learner.columns(stage), self.old_cols))
        if stage == 0:
            self.terms, self.state = (), {}
            return
        state = self.strategy.begin_stage(self.view, stage, learner.model_cfg, learner.trainable, self.carry,
                                          self.shardings)
        self.state = {self.strategy.name: state} if state else {}
        self.terms = self._terms

    def end(self, stage: int) -> None:
        """After task `stage` (not the last): what the strategy carries to the next task (EWC's Fisher)."""
        self.carry, _ = self.strategy.end_stage(self.view, stage, self.learner.model_cfg, self.learner.trainable,
                                                self.state.get(self.strategy.name), self.shardings)

    def eval_slots(self, seen: int) -> tuple[np.ndarray, np.ndarray] | None:
        """O-LoRA evaluates with every seen task's increments summed; the other rows with the shared slots."""
        if not self.view.per_task_slots:
            return None
        parts = [self.view.training_slots(t) for t in range(seen)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


__all__ = ["SlmRun"]
