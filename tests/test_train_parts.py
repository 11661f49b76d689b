"""Losses, masking, optimizer pieces and continual-learning metrics against hand-computed references."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.config import OptimConfig
from jaxcl.eval import accuracy_forgetting, average_seen, backward_transfer, balanced_orders, build_report, \
    learned_rows, perplexity_forgetting, seen_domains
from jaxcl.models import ModelConfig, init_params
from jaxcl.train import causal_lm_nll, learning_rate_schedule, mask_tokens, masked_lm_nll, weight_decay_mask


def log_softmax_np(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_causal_lm_nll_matches_numpy_and_skips_padding():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 5, 7).astype(np.float32)
    ids = rng.randint(0, 7, (2, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    total, n, per_token = causal_lm_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    lp = log_softmax_np(logits)
    expected = [-lp[b, t, ids[b, t + 1]] for b in range(2) for t in range(4) if mask[b, t] and mask[b, t + 1]]
    assert float(n) == len(expected) == 6
    np.testing.assert_allclose(float(total), sum(expected), rtol=1e-5)
    assert float(per_token[1, 2]) == 0.0 and float(per_token[1, 3]) == 0.0


def test_masked_lm_nll_scores_only_masked_positions():
    rng = np.random.RandomState(1)
    logits = rng.randn(1, 4, 6).astype(np.float32)
    labels = np.array([[2, 3, 4, 5]])
    chosen = np.array([[0, 1, 0, 1]])
    total, n, _ = masked_lm_nll(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(chosen))
    lp = log_softmax_np(logits)
    np.testing.assert_allclose(float(total), -(lp[0, 1, 3] + lp[0, 3, 5]), rtol=1e-5)
    assert float(n) == 2


def test_mask_tokens_follows_bert_recipe():
    ids = jnp.full((64, 256), 7, jnp.int32)
    mask = jnp.ones_like(ids).at[:, 200:].set(0)
    corrupted, labels, chosen = mask_tokens(jax.random.key(0), ids, mask, vocab_size=1000, mask_token_id=3,
                                            probability=0.15)
    chosen, corrupted = np.asarray(chosen), np.asarray(corrupted)
    assert not chosen[:, 200:].any()                                   # never padding
    assert abs(chosen[:, :200].mean() - 0.15) < 0.01
    picked = corrupted[chosen]
    assert abs((picked == 3).mean() - 0.8) < 0.02                      # 80 % [MASK]
    assert abs(((picked != 3) & (picked != 7)).mean() - 0.1) < 0.02    # ~10 % random (rarely 7 by chance)
    assert (corrupted[~chosen] == 7).all() and (np.asarray(labels) == 7).all()


def test_learning_rate_schedule_warms_up_then_decays_to_floor():
    schedule = learning_rate_schedule(OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1), total_steps=100)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 1e-4, rtol=1e-5)
    assert float(schedule(50)) < float(schedule(20))


def test_weight_decay_applies_to_matrices_only():
    cfg = ModelConfig(family="gpt2", vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8)
    mask = weight_decay_mask(init_params(cfg, jax.random.key(0)))
    assert mask["embed"]["embedding"] and mask["layers"]["mlp"]["wi"]["kernel"]
    assert not mask["layers"]["mlp"]["wi"]["bias"] and not mask["final_norm"]["scale"]


MATRIX = [[10.0, 50.0, 80.0],
          [14.0, 20.0, 60.0],
          [18.0, 26.0, 30.0]]


def test_perplexity_summaries_golden():
    assert average_seen(MATRIX) == pytest.approx((18 + 26 + 30) / 3)
    assert perplexity_forgetting(MATRIX) == pytest.approx(((18 - 10) + (26 - 20)) / 2)


ACC = [[0.9, 0.1, 0.0],
       [0.7, 0.8, 0.2],
       [0.6, 0.85, 0.9]]


def test_accuracy_summaries_golden():
    assert average_seen(ACC) == pytest.approx((0.6 + 0.85 + 0.9) / 3)
    assert accuracy_forgetting(ACC) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.85)) / 2)
    assert backward_transfer(ACC) == pytest.approx(((0.6 - 0.9) + (0.85 - 0.8)) / 2)


def test_a_joint_stage_averages_over_every_domain_it_trained():
    # One multitask / joint stage over three domains: the average is over all three, not only the first.
    report = build_report("multitask", "accuracy", ["multitask"], ["a", "b", "c"], [[0.5, 0.7, 0.9]], 0.0)
    assert report["summary"]["average"] == pytest.approx(0.7)
    assert seen_domains(["joint"], ["a", "b", "c"]) == [0, 1, 2]
    assert seen_domains(["a", "b"], ["a", "b", "c"]) == [0, 1]
    # SeMem: "a" pre-trained, then a custom stream of "d" and "b": "c" was never trained.
    assert seen_domains(["d", "b"], ["a", "b", "c", "d"], also=["a"]) == [0, 1, 3]
    assert average_seen([[0.5, 0.7, 0.9]], seen=2) == pytest.approx(0.6)
    assert average_seen([[0.5, 0.7, 0.9]], seen=[0, 2]) == pytest.approx(0.7)
    report = build_report("semem", "perplexity", ["d", "b"], ["a", "b", "c", "d"], [[1.0, 2.0, 30.0, 4.0]] * 2, 0.0,
                          seen=seen_domains(["d", "b"], ["a", "b", "c", "d"], also=["a"]))
    assert report["summary"]["average"] == pytest.approx((1 + 2 + 4) / 3)


def test_forgetting_compares_each_domain_with_the_stage_that_learned_it():
    # SeMem-like: "a" pre-trained (no stage), stages stream "b" then "c". Row 0 learned b, row 1 learned c.
    matrix = [[10.0, 20.0, 90.0],
              [12.0, 26.0, 40.0]]
    assert learned_rows(["b", "c"], ["a", "b", "c"]) == [None, 0, 1]
    assert perplexity_forgetting(matrix, [None, 0, 1]) == pytest.approx(26.0 - 20.0)      # only b is old
    assert backward_transfer(matrix, [None, 0, 1]) == pytest.approx(6.0)
    report = build_report("semem", "perplexity", ["b", "c"], ["a", "b", "c"], matrix, 0.0)
    assert report["summary"]["forgetting"] == pytest.approx(6.0)
    # The usual protocol is unchanged: the diagonal (stage i learned domain i).
    assert learned_rows(["a", "b", "c"], ["a", "b", "c"]) == [0, 1, 2]
    assert perplexity_forgetting(MATRIX) == perplexity_forgetting(MATRIX, [0, 1, 2])
    assert accuracy_forgetting(ACC) == accuracy_forgetting(ACC, learned_rows(["x", "y", "z"], ["x", "y", "z"]))
    assert learned_rows(["joint"], ["a", "b"]) == [0, 0]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_balanced_orders_put_every_task_everywhere_and_every_pair_adjacent_equally(n):
    tasks = [f"task{i}" for i in range(n)]
    orders = balanced_orders(tasks)
    assert orders[0] == tuple(tasks)                          # the given order comes first
    assert len(orders) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(o) == sorted(tasks) for o in orders)
    positions = collections.Counter((t, i) for o in orders for i, t in enumerate(o))
    pairs = collections.Counter((o[i], o[i + 1]) for o in orders for i in range(n - 1))
    per = len(orders) // n
    assert positions == {(t, i): per for t in tasks for i in range(n)}
    assert pairs == {(a, b): per for a in tasks for b in tasks if a != b}


def test_balanced_orders_golden_and_bad_input():
    assert balanced_orders("ABCD") == [tuple("ABCD"), tuple("BDAC"), tuple("DCBA"), tuple("CADB")]
    assert balanced_orders(["only"]) == [("only",)]
    assert balanced_orders("ABCD", count=2) == [tuple("ABCD"), tuple("BDAC")]
    with pytest.raises(ValueError, match="distinct"):
        balanced_orders(["a", "a"])
    with pytest.raises(ValueError, match="count=5"):
        balanced_orders("ABCD", count=5)


def test_changed_config_keys_are_listed_and_only_harmless_ones_may_change_on_resume():
    from pathlib import Path

    from jaxcl.config import ConfigError, config_to_dict, load_config
    from jaxcl.rundir import changed_keys, check_compatible, incompatible_keys

    old = {"train": {"steps": 100, "log_every": 10}, "data": {"domains": ["a", "b"]}}
    new = {"train": {"steps": 200, "log_every": 10}, "data": {"domains": ["a", "b"]}, "run": {"seed": 1}}
    assert changed_keys(old, new) == ["run", "train.steps"]
    assert changed_keys(old, old) == []

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    recorded = config_to_dict(load_config(demo, ["run.dir=/a"]))
    harmless = load_config(demo, ["run.dir=/b", "run.name=x", "train.log_every=3", "train.eval_every=7",
                                  "checkpoint.every=5", "checkpoint.keep=9", "checkpoint.async_save=false",
                                  "checkpoint.resume=false", "mesh.data=1", "elle.replay_ratio=0.5",
                                  "semem.k=3", "slm.steps=9"])        # elle/semem/slm: unused by sequential
    assert incompatible_keys(recorded, harmless, "sequential") == []
    assert incompatible_keys(recorded, harmless, "elle") == ["elle.replay_ratio"]
    changed = load_config(demo, ["model.n_layers=6", "train.steps=300", "optim.lr=0.1", "run.seed=3"])
    assert incompatible_keys(recorded, changed, "sequential") == ["model.n_layers", "optim.lr", "run.seed",
                                                                  "train.steps"]
    with pytest.raises(ConfigError, match=r"changed: model.n_layers, optim.lr, run.seed, train.steps\)"):
        check_compatible(recorded, changed, "sequential", "runs/demo")
    check_compatible(None, changed, "sequential", "runs/demo")       # nothing recorded yet: a new run
    # a strategy's knobs count only where run.strategies (recorded or new) turns it on; SLM reads them all
    knobs = load_config(demo, ["strategies.ewc.strength=7", "strategies.lwf.temperature=3",
                               "strategies.options.mine={a: 1}"])
    assert incompatible_keys(recorded, knobs, "sequential") == []
    assert incompatible_keys(recorded, knobs, "slm") == ["strategies.ewc.strength", "strategies.lwf.temperature",
                                                         "strategies.options.mine"]
    with_ewc = load_config(demo, ["run.strategies=[ewc]", "strategies.ewc.strength=7",
                                  "strategies.lwf.temperature=3"])
    assert incompatible_keys(recorded, with_ewc, "sequential") == ["run.strategies", "strategies.ewc.strength"]
    recorded_ewc = config_to_dict(load_config(demo, ["run.strategies=[ewc]"]))
    assert incompatible_keys(recorded_ewc, knobs, "elle") == ["run.strategies", "strategies.ewc.strength"]


def test_evaluation_is_deterministic_even_with_dropout():
    from jaxcl.train import make_loss_fn

    cfg = ModelConfig(family="gpt2", vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, dropout=0.3)
    params = init_params(cfg, jax.random.key(0))
    batch = {"input_ids": jnp.asarray(np.random.RandomState(0).randint(0, 32, (2, 8))),
             "attention_mask": jnp.ones((2, 8), jnp.int32)}
    loss_fn = make_loss_fn(cfg)
    evals = [float(loss_fn(params, batch, jax.random.key(k), deterministic=True)[0]) for k in (0, 1)]
    trains = [float(loss_fn(params, batch, jax.random.key(k))[0]) for k in (0, 1)]
    assert evals[0] == evals[1] and trains[0] != trains[1]


def test_checkpoint_meta_is_snapshotted_at_save(tmp_path):
    from jaxcl.config import CheckpointConfig
    from jaxcl.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    matrix = [[1.0]]
    ckpt.save(1, {"x": jnp.zeros(3)}, {"matrix": matrix})
    matrix.append([2.0])                    # the caller moves on while the async write runs
    ckpt.wait()
    assert ckpt.restore_meta(1) == {"matrix": [[1.0]]}
    ckpt.close()


@pytest.mark.parametrize("key,value,message", [("log_every", 0, "train.log_every must be at least 1"),
                                               ("steps", 0, "train.steps and train.pretrain_steps"),
                                               ("eval_every", -1, "train.eval_every must be >= 0")])
def test_train_config_rejects_values_that_would_crash_the_loop(key, value, message):
    from jaxcl.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{key: value})


def test_bootstrap_intervals_resample_texts_once_per_column():
    """Intervals over test texts: a task scored identically after two stages has forgetting exactly 0 in every
    resample (one draw shared by the column's rows); a 50 % task of 400 texts has the binomial width; the
    point estimate lies inside; the same seed gives the same intervals."""
    import numpy as np

    from jaxcl.eval.metrics import bootstrap_matrix, mean_interval, summarize

    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.5                       # task 0: 50 % right, unchanged after stage 1
    b = rng.random(300) < 0.8                       # task 1
    correct = [[a, None], [a.copy(), b]]
    out = bootstrap_matrix(correct, [0, 1], resamples=2000, seed=3)
    assert out["forgetting"] == [0.0, 0.0] and out["backward_transfer"] == [0.0, 0.0]
    lo, hi = out["matrix"][0][0]
    assert lo < 100 * a.mean() < hi and abs((hi - lo) - 2 * 1.96 * 100 * np.sqrt(0.25 / 400)) < 1.5
    assert out["matrix"][0][1] is None and out["matrix"][1][1][0] < 100 * b.mean() < out["matrix"][1][1][1]
    point = summarize([[100 * a.mean(), None], [100 * a.mean(), 100 * b.mean()]], "accuracy", [0, 1])
    assert out["average"][0] < point["average"] < out["average"][1]
    assert bootstrap_matrix(correct, [0, 1], resamples=2000, seed=3) == out
    worse = a.copy()
    worse[np.flatnonzero(a)[:40]] = False           # 40 of the right texts lost: 10 points of forgetting
    dropped = bootstrap_matrix([[a, None], [worse, b]], [0, 1], resamples=2000, seed=3)["forgetting"]
    assert 6 < dropped[0] < 10 < dropped[1] < 14 and 4 < dropped[1] - dropped[0] < 8   # +-1.96 sd of 10 %
    with pytest.raises(ValueError, match="same"):
        bootstrap_matrix([[a], [b]])
    m = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert m["mean"] == 2.5 and 1.0 <= m["low"] < 2.5 < m["high"] <= 4.0 and m["n"] == 4
    assert mean_interval([0.7]) == {"mean": 0.7, "low": 0.7, "high": 0.7, "std": 0.0, "n": 1}


def test_paired_perplexity_bootstrap_pairs_sequences_and_matches_the_delta_method():
    """The paired interval of two policies' group perplexity: identical scores give exactly 0; a shift every
    sequence shares is resolved however noisy the text is (pairing cancels the text's difficulty), and the
    width of a noisy difference matches the delta method (SE of exp(mean) differences); point estimates are
    the reports' group perplexity (mean over domains of exp(mean NLL)); same seed, same numbers."""
    from statistics import NormalDist

    from jaxcl.eval.metrics import paired_perplexity_bootstrap

    rng = np.random.default_rng(0)
    base = {d: rng.normal(5.0, 1.0, size=n) for d, n in (("x", 64), ("y", 48))}      # hard and easy texts
    same = paired_perplexity_bootstrap(base, {d: v.copy() for d, v in base.items()}, resamples=500)
    assert same["difference"] == 0 and same["low"] == same["high"] == 0 and same["detectable"] == 0
    assert same["sequences"] == 112
    assert same["a"] == pytest.approx(np.mean([np.exp(v.mean()) for v in base.values()]))
    shifted = paired_perplexity_bootstrap({d: v - 0.02 for d, v in base.items()}, base, resamples=2000)
    assert shifted["high"] < 0 and shifted["relative"] == pytest.approx(np.exp(-0.02) - 1, abs=1e-3)
    assert shifted["relative_low"] == pytest.approx(shifted["relative_high"], abs=2e-3)   # no text noise left
    unpaired = paired_perplexity_bootstrap({d: rng.normal(5.0, 1.0, size=len(v)) for d, v in base.items()},
                                           base, resamples=2000)
    assert unpaired["high"] - unpaired["low"] > 50 * (shifted["high"] - shifted["low"])
    noise = {d: v + rng.normal(0.0, 0.3, size=len(v)) for d, v in base.items()}
    out = paired_perplexity_bootstrap(noise, base, resamples=4000, seed=1)
    # delta method: d exp(mean a) - exp(mean b) ~ exp(mean) * mean(a - b), averaged over the two domains
    se = np.sqrt(sum((np.exp(base[d].mean()) * np.std(noise[d] - base[d], ddof=1) / np.sqrt(len(base[d]))) ** 2
                     for d in base)) / 2
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    assert out["detectable"] == pytest.approx(z * se, rel=0.15)
    assert out["high"] - out["low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert out["low"] < out["difference"] < out["high"]
    assert paired_perplexity_bootstrap(noise, base, resamples=4000, seed=1) == out
    with pytest.raises(ValueError, match="same domains"):
        paired_perplexity_bootstrap(base, {"x": base["x"]})
    with pytest.raises(ValueError, match="'y'"):
        paired_perplexity_bootstrap(base, {"x": base["x"], "y": base["y"][:5]})


def test_retrieval_confusion_counts_routes_and_accumulates_over_seeds():
    from jaxcl.eval import retrieval_confusion

    tasks = ["a", "b", "c"]
    texts = {0: ["a0", "a1", "a2", "a3"], 1: ["b0", "b1", "b2"], 2: ["c0", "c1"]}
    first = retrieval_confusion({0: np.array([0, 1, 1, 0]), 1: np.array([1, 1, 7]), 2: np.array([2, 0])}, tasks,
                                texts, examples=1)
    assert first["counts"] == [[2, 2, 0], [0, 2, 1], [1, 0, 1]]      # a choice past the last task counts as "c"
    assert first["examples"] == {"a -> b": ["a1"], "b -> c": ["b2"], "c -> a": ["c1"]}
    counts = np.zeros((3, 3), np.int64)
    pairs: dict = {}
    for _ in range(2):                                                  # two seeds routing alike: counts double,
        retrieval_confusion({0: np.array([0, 1, 1, 0])}, tasks, texts, 3, counts=counts, pairs=pairs)
    assert counts[0].tolist() == [4, 4, 0] and pairs == {"a -> b": ["a1", "a2"]}   # examples stay distinct
