"""Downstream evaluation: clean tasks (no text from the corpus's train splits), end-task fine-tuning of stage
checkpoints (`jaxcl.downstream`), the downstream matrix and `jaxcl downstream`."""

from __future__ import annotations

import numpy as np
import pytest

from jaxcl.data.classification import load_task, shipped_manifest
from jaxcl.data.corpus import DOMAINS, load_text
from jaxcl.data.overlap import SpanIndex, contained, normalize

DOMAIN_TASKS = {"bible": "bible_books", "wordnet": "wordnet_pos", "manpages": "manpage_section",
                "pydoc": "pydoc_package"}


# ----------------------------------------------------------------------------- clean tasks
def test_span_index_finds_exactly_the_shared_windows():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    reference = [" ".join(rng.choice(words, 400)) for _ in range(3)]
    copied = "prefix words " + reference[1][500:530] + " suffix"           # a 30-character span of document 1
    near = reference[2][100:129] + "!"                                    # 29 shared, then a change
    texts = [copied, near, "completely different text here, long enough", "", "short"]
    index = SpanIndex(reference, span=30)
    brute = [any(normalize(t)[i:i + 30] in r for r in reference for i in range(len(normalize(t)) - 29))
             for t in texts]
    assert index.shared_spans(texts).tolist() == brute == [True, False, False, False, False]
    assert index.first_shared(copied) == reference[1][500:530]
    assert index.first_shared(near) is None
    # whitespace is normalised on both sides; a window never spans two reference strings
    assert SpanIndex(["a  b\n\nc d"], span=5).shared_spans(["x a b c d"]).tolist() == [True]
    assert SpanIndex(["abcde", "fghij"], span=6).shared_spans(["abcdef", "efghij"]).tolist() == [False, False]
    assert contained(["b c", "b  d"], "a b\nc d").tolist() == [True, False]
    with pytest.raises(ValueError, match="span"):
        SpanIndex(["x"], span=0)


def test_no_task_text_shares_an_80_character_span_with_any_corpus_train_split():
    """Issue 31: the four domain tasks are held out from pre-training. Every text of every split, against all
    five train splits; texts shorter than 80 characters must not occur whole in their domain's train split."""
    train = {d: load_text(d, "train") for d in DOMAINS}
    index = SpanIndex(train.values(), span=80)
    for domain, task in DOMAIN_TASKS.items():
        assert shipped_manifest()[task]["held_out_from_corpus_train"]["span_chars"] == 80
        for split in ("train", "valid", "test"):
            texts = load_task(task, split).texts
            hits = [t for t, hit in zip(texts, index.shared_spans(texts)) if hit]
            confirmed = [(t, index.first_shared(t)) for t in hits]
            confirmed = [c for c in confirmed if c[1] is not None]        # a 2^-64 hash collision is no overlap
            assert not confirmed, f"{task}.{split}: {len(confirmed)} texts share a span, e.g. {confirmed[0]}"
            short = [t for t in texts if len(normalize(t)) < 80]
            inside = [t for t, c in zip(short, contained(short, train[domain])) if c]
            assert not inside, f"{task}.{split}: {len(inside)} short texts occur in {domain}'s train split: {inside[:3]}"


# ----------------------------------------------------------------------------- fixtures: tiny runs and a toy task
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
        "data.seq_len=32", "data.batch_size=8", "data.eval_batches=1", "data.domains=[bible,manpages]",
        "train.pretrain_steps=12", "train.steps=12", "train.log_every=4", "optim.warmup_steps=1",
        "checkpoint.every=0", "checkpoint.async_save=false"]
# small cells: a handful of texts, one epoch, one learning rate (the grid is tested on its own)
CELLS = ["downstream.tasks={bible: bible_books, manpages: manpage_section}", "downstream.max_train_texts=64",
         "downstream.max_valid_texts=16", "downstream.max_test_texts=64", "downstream.epochs=2",
         "downstream.max_len=32", "downstream.lrs=[0.03]", "downstream.batch_size=16",
         "downstream.bootstrap_resamples=200"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-stage sequential run and a 2-stage ELLE run (with domain prompts) of a tiny GPT-2."""
    from jaxcl import cli

    root = tmp_path_factory.mktemp("downstream")
    seq, elle = root / "seq", root / "elle"
    assert cli.main(["run", str(ROOT / "configs" / "demo.yaml"), *TINY, f"run.dir={seq}"]) == 0
    assert cli.main(["run", str(ROOT / "configs" / "elle" / "demo.yaml"), *TINY, f"run.dir={elle}",
                     "elle.schedule=[{n_layers: 2}]", "elle.warmup_steps=1", "elle.micro_batches=2"]) == 0
    joint = root / "joint"
    assert cli.main(["train", str(ROOT / "configs" / "demo.yaml"), *TINY, f"run.dir={joint}", "train.pretrain_steps=3",
                     "train.steps=3"]) == 0
    return {"root": root, "seq": seq, "elle": elle, "joint": joint}


@pytest.fixture(scope="module")
def seq_matrix(runs):
    """The sequential run's matrix from one uninterrupted `DownstreamRun` (its output directory, its result)."""
    from jaxcl.downstream import DownstreamRun

    out = runs["root"] / "seq-matrix"
    return out, DownstreamRun(runs["seq"], overrides=CELLS, out=out).run()


def _toy_task_dir(path, n_train=64, n_test=32):
    """Two classes that a model separates by their words alone (labels as strings)."""
    import json

    rng = np.random.default_rng(0)
    words = {"fruit": ["apple", "pear", "plum", "cherry"], "river": ["stream", "brook", "delta", "canal"]}
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", 16), ("test", n_test)):
        rows = []
        for i in range(n):
            label = ("fruit", "river")[i % 2]
            rows.append({"text": " ".join(rng.choice(words[label], 6)), "label": label})
        (path / f"toy.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _toy(tmp_path):
    from jaxcl.config import DownstreamConfig
    from jaxcl.data.tokenizer import load_tokenizer
    from jaxcl.downstream import resolve_tasks
    from jaxcl.models import ModelConfig, init_params

    import jax

    cfg = ModelConfig(family="gpt2", vocab_size=8192, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
    settings = DownstreamConfig(tasks={"bible": "toy"}, task_dir=str(_toy_task_dir(tmp_path / "tasks")), epochs=4,
                                max_len=16, lrs=(3e-3,), batch_size=16)
    task = resolve_tasks(settings, ("bible",))["toy"]
    return cfg, init_params(cfg, jax.random.key(0)), task, settings, load_tokenizer("default")


# ----------------------------------------------------------------------------- one cell
def test_finetuning_learns_a_separable_task_changes_the_backbone_and_is_deterministic(tmp_path):
    import jax

    from jaxcl.downstream import finetune

    cfg, params, task, settings, tok = _toy(tmp_path)
    before = jax.tree.map(np.asarray, params)
    runs = [finetune(cfg, params, task, tokenizer=tok, settings=settings, lr=3e-3, seed=7, prompt_id=None,
                     evaluate=("valid", "test"), keep_params=True) for _ in range(2)]
    a, b = runs
    assert (a.predictions["test"] == task.split("test").labels).all()          # 100 % on held-out texts
    assert a.train_loss[-1] < 0.5 * a.train_loss[0]
    moved = [float(np.abs(np.asarray(x) - y).max()) for x, y in zip(jax.tree.leaves(a.params["backbone"]),
                                                                    jax.tree.leaves(before))]
    assert min(moved) > 0                                                         # every backbone leaf trained
    assert all((np.asarray(x) == y).all() for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(before)))
    # the same seed: the same losses, predictions and parameters, bit for bit; another seed: another model
    assert a.train_loss == b.train_loss and all((a.predictions[s] == b.predictions[s]).all() for s in a.predictions)
    assert all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(jax.tree.leaves(a.params),
                                                                       jax.tree.leaves(b.params)))
    c = finetune(cfg, params, task, tokenizer=tok, settings=settings, lr=3e-3, seed=8, prompt_id=None)
    assert c.train_loss != a.train_loss


def test_scores_match_a_per_class_reference_and_resamples_are_paired():
    from jaxcl.eval.metrics import classification_scores, text_draws

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    preds = np.where(rng.random((3, 300)) < 0.6, y, rng.integers(0, 5, (3, 300)))
    def reference(p, t):
        f1 = []
        for c in np.unique(t):
            tp, fp, fn = ((p == c) & (t == c)).sum(), ((p == c) & (t != c)).sum(), ((p != c) & (t == c)).sum()
            f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return 100 * (p == t).mean(), 100 * np.mean(f1)
    got = classification_scores(preds, y, 5)
    want = np.mean([reference(p, y) for p in preds], axis=0)
    assert got["accuracy"] == pytest.approx(want[0]) and got["macro_f1"] == pytest.approx(want[1])
    draws = text_draws(300, 50, "task")
    boot = classification_scores(preds, y, 5, draws)
    for r in (0, 17, 49):
        ref = np.mean([reference(p[draws[r]], y[draws[r]]) for p in preds], axis=0)
        assert boot["accuracy"][r] == pytest.approx(ref[0]) and boot["macro_f1"][r] == pytest.approx(ref[1])
    assert (text_draws(300, 50, "task") == draws).all() and not (text_draws(300, 50, "other") == draws).all()


def test_summary_forgetting_is_best_after_learning_minus_last():
    from jaxcl.config import DownstreamConfig
    from jaxcl.downstream import Row, build_summary, resolve_tasks

    tasks = list(resolve_tasks(DownstreamConfig(tasks={"a": "bible_books", "b": "wordnet_pos"}, max_test_texts=100),
                               ("a", "b")).values())
    rows = [Row(f"stage{i}", f"after {d}", "x", i, i, trained, "id") for i, (d, trained) in
            enumerate([("a", ("a",)), ("b", ("a", "b"))])]
    y = tasks[0].split("test").labels
    wrong = (y + 1) % len(tasks[0].label_names)
    half = np.where(np.arange(len(y)) < 50, y, wrong)                  # 50 % right
    found = {"plain": {("stage0", "bible_books"): {0: {"predictions": y.tolist(), "checkpoint": {"fingerprint": "f0"}}},
                       ("stage1", "bible_books"): {0: {"predictions": half.tolist(), "checkpoint": {"fingerprint": "f1"}}},
                       ("stage1", "wordnet_pos"): {0: {"predictions": tasks[1].split("test").labels.tolist(),
                                                       "checkpoint": {"fingerprint": "f1"}}}}}
    out = build_summary(rows, tasks, found, 300, seen=lambda r, t: t.domain in r.trained)
    block = out["variants"]["plain"]
    assert block["accuracy"]["matrix"] == [[100.0, None], [50.0, 100.0]]
    forgetting = block["summary"]["forgetting"]["accuracy"]["bible_books"]
    assert forgetting["value"] == 50.0 and forgetting["low"] < 50.0 < forgetting["high"]
    assert block["summary"]["average"]["accuracy"]["value"] == 75.0 and block["summary"]["average_over"] == \
        ["bible_books", "wordnet_pos"]


# ----------------------------------------------------------------------------- the matrix of a run
def test_two_checkpoints_give_different_rows_and_the_same_checkpoint_the_same_row(runs, seq_matrix, tmp_path):
    """Stage 0 and stage 1 differ; stage 1 exported as a Hugging Face checkpoint and fine-tuned as the --hf
    reference row (another code path to the same weights) gives stage 1's row exactly."""
    from jaxcl import cli
    from jaxcl.downstream import DownstreamRun

    out, result = seq_matrix
    acc = result["variants"]["plain"]["accuracy"]["matrix"]
    assert [r["name"] for r in result["rows"]] == ["stage0", "stage1"] and all(v is not None for r in acc for v in r)
    cells = {(r, t): json_cell(out, "plain", r, t) for r in ("stage0", "stage1")
             for t in ("bible_books", "manpage_section")}
    assert any(cells[("stage0", t)]["predictions"] != cells[("stage1", t)]["predictions"]
               for t in ("bible_books", "manpage_section"))
    assert result["variants"]["plain"]["macro_f1"]["matrix"][0] != result["variants"]["plain"]["macro_f1"]["matrix"][1]
    assert cells[("stage0", "bible_books")]["checkpoint"]["fingerprint"] != \
        cells[("stage1", "bible_books")]["checkpoint"]["fingerprint"]
    assert result["seen"] == [[True, False], [True, True]]
    assert cli.main(["export", str(runs["seq"]), str(tmp_path / "hf"), "--stage", "1"]) == 0
    ref = DownstreamRun(tmp_path / "ref", hf=str(tmp_path / "hf"), overrides=CELLS).run()
    assert [r["name"] for r in ref["rows"]] == ["reference"]
    for t in ("bible_books", "manpage_section"):
        assert json_cell(tmp_path / "ref" / "downstream", "plain", "reference", t)["predictions"] == \
            cells[("stage1", t)]["predictions"]
    assert ref["variants"]["plain"]["accuracy"]["matrix"][0] == acc[1]


def json_cell(out, variant, row, task, seed=0):
    import json

    return json.loads((out / "cells" / variant / row / task / f"seed{seed}.json").read_text())


def test_elle_checkpoints_are_fine_tuned_with_the_domain_prompt_fed_as_in_pretraining(runs, tmp_path):
    import jax
    import jax.numpy as jnp

    from jaxcl.data.tokenizer import load_tokenizer
    from jaxcl.downstream import DownstreamRun, encode_texts, finetune, init_head, pooled_features
    from jaxcl.downstream.finetune import _task_seed
    from jaxcl.models import build

    run = DownstreamRun(runs["elle"], overrides=CELLS, out=tmp_path / "d")
    assert run.variant == "prompt" and run.domains == ("bible", "manpages")
    stage0, stage1 = run.rows
    bible, man = run.tasks["bible_books"], run.tasks["manpage_section"]
    # prompt p is the p-th domain of the stream, as ELLE's batches carry it; an untrained domain gets none
    assert [run.prompt_id(stage0, bible, True), run.prompt_id(stage0, man, True)] == [0, None]
    assert [run.prompt_id(stage1, bible, True), run.prompt_id(stage1, man, True)] == [0, 1]
    assert run.prompt_id(stage1, man, False) is None
    model_cfg, params = run.load(stage1)
    assert model_cfg.num_prompts == 2
    tok = load_tokenizer("default")
    ids, mask, _ = encode_texts(tok, man.split("test").texts[:8], 32)
    pid = jnp.full((8,), 1, jnp.int32)
    feats = pooled_features(model_cfg, params, ids, mask, pid, "last")
    # the pre-training forward: the model called with the batch's prompt_ids (what jaxcl.train.step's loss does)
    out = build(model_cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), prompt_ids=pid)
    last = mask.sum(1) - 1
    np.testing.assert_array_equal(np.asarray(feats), np.asarray(out.hidden)[np.arange(8), last])
    plain = pooled_features(model_cfg, params, ids, mask, None, "last")
    assert float(jnp.abs(feats - plain).max()) > 1e-3                          # the prompt changes the features
    # finetune feeds it: with a vanishing rate the predictions are the initial head's on the prompted features
    import dataclasses

    quick = dataclasses.replace(run.settings, max_train_texts=16, epochs=1)     # the updates vanish anyway
    result = finetune(model_cfg, params, man, tokenizer=tok, settings=quick, lr=1e-30, seed=0, prompt_id=1)
    head = init_head(jax.random.split(jax.random.key(_task_seed(0, man.name)))[0], model_cfg.d_model, 8)
    ids, mask, _ = encode_texts(tok, man.split("test").texts, 32)
    logits = pooled_features(model_cfg, params, ids, mask, jnp.full((len(ids),), 1, jnp.int32), "last") @ \
        head["kernel"][:, :4] + head["bias"][:4]
    np.testing.assert_array_equal(result.predictions["test"], np.asarray(jnp.argmax(logits, -1)))
    # both variants side by side, compared paired
    DownstreamRun(runs["elle"], overrides=CELLS, out=tmp_path / "d", tasks=["manpages"], stages=[1]).run()  # a domain
    DownstreamRun(runs["elle"], overrides=CELLS, out=tmp_path / "d", tasks=["manpage_section"], stages=[1],   # names
                  prompts=False).run()                                                                       # its task
    import json

    both = json.loads((tmp_path / "d" / "downstream.json").read_text())
    assert set(both["variants"]) == {"prompt", "no_prompt"} and [r["name"] for r in both["rows"]] == ["stage1"]
    after = both["prompt_ablation"]["accuracy"][0][0]
    assert after["low"] <= after["value"] <= after["high"]
    prompted, plain = (json_cell(tmp_path / "d", v, "stage1", "manpage_section") for v in ("prompt", "no_prompt"))
    assert (prompted["prompt_id"], plain["prompt_id"]) == (1, None)
    assert (tmp_path / "d" / "downstream_prompt.png").is_file() and (tmp_path / "d" / "tensorboard").is_dir()


def test_a_killed_downstream_run_resumes_to_the_same_matrix(runs, seq_matrix, tmp_path):
    """`jaxcl downstream` killed (SIGKILL) at a random moment after its first finished cell (a cell in flight),
    then run to the end (through the Python API, in this process): the same downstream.json matrices and summary as one uninterrupted invocation. (Cells
    are written with jaxcl's atomic writes, whose kill tests are tests/faults/.)"""
    import json
    import os
    import random
    import subprocess
    import sys
    import time

    from tests.compile_cache import killable_env

    want = seq_matrix[1]
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "jaxcl.cli", "downstream", str(runs["seq"]), "--tasks", "bible_books", "--out",
            str(out), *CELLS]                 # one task (2 cells): a cell's result does not depend on the others
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=killable_env({**os.environ, "PYTHONPATH": str(ROOT)}))
    deadline = time.time() + 300
    while not list(out.glob("cells/*/*/*/*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 1.0))          # the second cell in flight, or just written
    proc.kill()
    proc.wait()
    assert proc.returncode in (-9, 0), proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    from jaxcl.downstream import DownstreamRun                # the rerun: the Python API on the same directory

    DownstreamRun(runs["seq"], overrides=CELLS, out=out, tasks=["bible_books"]).run()
    got = json.loads((out / "downstream.json").read_text())
    assert [t["name"] for t in got["tasks"]] == ["bible_books"] and want["tasks"][0]["name"] == "bible_books"
    for m in ("accuracy", "macro_f1"):
        for key in ("matrix", "intervals"):
            assert [row[:1] for row in want["variants"]["plain"][m][key]] == got["variants"]["plain"][m][key]
    for m in ("accuracy", "macro_f1"):
        assert got["variants"]["plain"]["summary"]["forgetting"][m]["bible_books"] == \
            want["variants"]["plain"]["summary"]["forgetting"][m]["bible_books"]


def test_a_joint_run_has_one_row_its_final_model_with_every_task_seen(runs, tmp_path):
    from jaxcl.downstream import DownstreamRun

    run = DownstreamRun(runs["joint"], overrides=CELLS, tasks=["bible"], out=tmp_path / "j")
    assert [(r.name, r.stage, r.trained) for r in run.rows] == [("joint", 0, ("bible", "manpages"))]
    result = run.run()
    assert result["method"] == "joint" and result["seen"] == [[True]]
    block = result["variants"]["plain"]
    assert block["summary"]["final_row"] == "joint" and block["summary"]["average_over"] == ["bible_books"]
    assert block["summary"]["average"]["accuracy"]["value"] == block["accuracy"]["matrix"][0][0]
    assert block["summary"]["forgetting"]["accuracy"] == {}                       # one row: nothing to forget
