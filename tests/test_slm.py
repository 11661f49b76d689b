"""SLM: DTKR retrieval and key training, JARe freezing (bit-identical), no recompiles, sharding, bad input."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from jaxcl.models import ModelConfig, init_params
from jaxcl.parallel import logical_to_sharding
from jaxcl.slm import dtkr, jare
from jaxcl.slm.classifier import ContinualClassifier, LearnerShape

TINY = ModelConfig(family="bert", vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=12, mlm_head=False,
                   pooler=False)


# ----------------------------------------------------------------------------- DTKR
def test_grouped_cosine_matches_per_group_numpy():
    rng = np.random.default_rng(0)
    q, keys = rng.normal(size=(3, 12)).astype(np.float32), rng.normal(size=(4, 5, 3)).astype(np.float32)
    sim = np.asarray(dtkr.grouped_cosine(jnp.asarray(q), jnp.asarray(keys)))
    for n in range(3):
        for g in range(4):
            for p in range(5):
                a, b = q[n, 3 * g:3 * g + 3], keys[g, p]
                assert sim[n, g, p] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-5)


def test_retrieve_top_k_weights_and_masks():
    keys = jnp.eye(4)[:, None, :].repeat(1, axis=1).reshape(1, 4, 4)      # 1 group, slot p = e_p
    q = jnp.array([[1.0, 0.5, 0.2, 0.0]])
    slots, w = dtkr.retrieve(q, keys, jnp.array([True, True, True, True]), top_k=2)
    assert slots.tolist() == [[0, 1]]
    np.testing.assert_allclose(np.asarray(w), [[1.0 / 1.5, 0.5 / 1.5]], rtol=1e-6)
    slots, _ = dtkr.retrieve(q, keys, jnp.array([False, True, True, True]), top_k=2)
    assert slots.tolist() == [[1, 2]]                                       # a masked slot is never chosen
    both = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    per_batch, _ = dtkr.retrieve(both, keys, jnp.ones(4, bool), top_k=1, per_example=False)
    per_example, _ = dtkr.retrieve(both, keys, jnp.ones(4, bool), top_k=1, per_example=True)
    assert per_batch.shape == (1, 1) and per_example.tolist() == [[0], [3]]


def test_retrieval_from_text_mixes_only_the_chosen_tasks_slots_with_mix_task():
    # 1 group, 3 tasks x 2 slots; the query is closest to slot 0 (task 0) but task 1 owns the runners-up.
    keys = jnp.asarray(np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.9, 0.4, 0.0], [0.8, 0.6, 0.0],
                                  [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], np.float32))
    bank = dtkr.KeyBank(keys=keys, slot_task=jnp.array([0, 0, 1, 1, 2, dtkr.FREE], jnp.int32))
    q = jnp.array([[1.0, 0.2, 0.0]])
    slots, weights, task = dtkr.retrieve_from_text(q, bank, top_k=2, per_example=True, n_tasks=3, mix="global")
    ref_slots, ref_w = dtkr.retrieve(q, keys, bank.slot_task != dtkr.FREE, 2)
    np.testing.assert_array_equal(slots, ref_slots)
    np.testing.assert_array_equal(weights, ref_w)
    assert slots.tolist() == [[0, 2]] and task.tolist() == [0]              # the global top-2 spans two tasks
    slots, weights, task = dtkr.retrieve_from_text(q, bank, top_k=2, per_example=True, n_tasks=3, mix="task")
    assert task.tolist() == [0] and sorted(slots[0].tolist()) == [0, 1]     # only task 0's slots are mixed
    assert float(weights.sum()) == pytest.approx(1.0)
    batch = jnp.array([[1.0, 0.1, 0.0], [1.0, 0.2, 0.0]])                   # per-batch: one retrieval, one task
    slots, weights, task = dtkr.retrieve_from_text(batch, bank, top_k=2, per_example=False, n_tasks=3, mix="task")
    assert slots.shape == weights.shape == (1, 2) and task.tolist() == [0] and sorted(slots[0].tolist()) == [0, 1]
    with pytest.raises(ValueError, match="slm.mix='nearest'"):
        dtkr.retrieve_from_text(q, bank, top_k=2, per_example=True, n_tasks=3, mix="nearest")


def test_best_keys_task_choice_judges_every_task_on_its_own_top_k():
    # Same pool as above: task 0 owns the single best key (slot 0) and one useless key; task 1's two keys
    # both fit the query. The vote follows the best key; best_keys averages each task's own top-2.
    keys = jnp.asarray(np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.9, 0.4, 0.0], [0.8, 0.6, 0.0],
                                  [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], np.float32))
    bank = dtkr.KeyBank(keys=keys, slot_task=jnp.array([0, 0, 1, 1, 2, dtkr.FREE], jnp.int32))
    q = jnp.array([[1.0, 0.2, 0.0], [0.0, 0.3, 1.0]])
    scores = np.asarray(dtkr.grouped_cosine(q, keys).mean(axis=1))
    owners = np.array([0, 0, 1, 1, 2, -1])
    expected = [int(np.argmax([np.sort(row[owners == t])[::-1][:2].mean() for t in range(3)])) for row in scores]
    task = dtkr.best_keys_task(q, bank, top_k=2, per_example=True, n_tasks=4)      # task 3 has no slots
    assert task.tolist() == expected == [1, 0]
    _, _, voted = dtkr.retrieve_from_text(q[:1], bank, top_k=2, per_example=True, n_tasks=4)
    assert voted.tolist() == [0]
    slots, weights, task = dtkr.retrieve_from_text(q[:1], bank, top_k=2, per_example=True, n_tasks=4, mix="task",
                                                   task_choice="best_keys")
    assert task.tolist() == [1] and sorted(slots[0].tolist()) == [2, 3]
    batch_task = dtkr.best_keys_task(q, bank, top_k=2, per_example=False, n_tasks=4)
    assert batch_task.shape == (1,) and batch_task.tolist() == [int(np.argmax(
        [np.sort(scores.mean(0)[owners == t])[::-1][:2].mean() for t in range(3)]))]
    with pytest.raises(ValueError, match="slm.task_choice='nearest'"):
        dtkr.retrieve_from_text(q, bank, top_k=2, per_example=True, n_tasks=3, task_choice="nearest")


def _lda_reference(train, queries, shrinkage, per_example=True):
    """Linear discriminant analysis in float64 from all the data at once: argmin Mahalanobis distance to each
    task's mean under the pooled within-task covariance, shrunk towards (tr C / h) I."""
    means = [x.mean(0) for x in train]
    scatter = sum((x - m).T @ (x - m) for x, m in zip(train, means))
    cov = scatter / (sum(len(x) for x in train) - len(train))
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    prec = np.linalg.inv(cov)
    dist = np.stack([np.einsum("nd,de,ne->n", queries - m, prec, queries - m) for m in means], 1)
    if not per_example:
        dist = dist.mean(0, keepdims=True)
    gap = np.diff(np.sort(dist, axis=1)[:, :2], axis=1)[:, 0] if dist.shape[1] > 1 else np.full(len(dist), np.inf)
    return dist.argmin(1), gap > 1e-3 * np.abs(dist).max()      # (choice, the choices float32 must reproduce)


def test_gaussian_task_choice_is_lda_over_the_tasks_added_so_far():
    # Three tasks whose means differ along a low-variance direction the cosine to their keys cannot see:
    # each task's queries spread widely along a shared axis, the tasks are separated only by small offsets.
    rng = np.random.default_rng(3)
    dim = 12
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    scale = np.r_[8.0, 6.0, np.full(dim - 2, 0.3)]
    offsets = [np.zeros(dim), 1.5 * basis[:, 5], -1.5 * basis[:, 7]]
    draw = lambda t, n: (rng.normal(size=(n, dim)) * scale) @ basis.T + offsets[t] + 1.0
    train = [draw(t, 200) for t in range(3)]
    test = np.concatenate([draw(t, 100) for t in range(3)])
    truth = np.repeat(np.arange(3), 100)
    bank = dtkr.new_key_bank(8, dim, groups=2, max_tasks=4)
    for t in range(3):
        bank, _ = dtkr.add_task_keys(bank, t, dtkr.data_mean_keys(jax.random.key(t), train[t], 2, 2))
        bank = dtkr.add_task_statistics(bank, t, train[t], shrinkage=0.05)
        # after each task: the same choice as LDA fitted on the tasks so far (never a task not yet added)
        got = np.asarray(dtkr.gaussian_task(jnp.asarray(test, jnp.float32), bank, True, n_tasks=4))
        assert got.max() <= t
        ref, clear = _lda_reference(train[:t + 1], test, 0.05)
        assert clear.mean() > 0.95                      # near-ties (a float64 gap below 1e-3 of the scale) aside
        np.testing.assert_array_equal(got[clear], ref[clear])
    # the pooled scatter is the sum of the per-task scatters (incremental == all at once)
    np.testing.assert_allclose(np.asarray(bank.scatter), sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in train),
                               rtol=1e-5, atol=1e-3)
    gaussian = np.asarray(dtkr.retrieve_from_text(jnp.asarray(test, jnp.float32), bank, 2, True, 4, "task",
                                                  "gaussian")[2])
    best_keys = np.asarray(dtkr.retrieve_from_text(jnp.asarray(test, jnp.float32), bank, 2, True, 4, "task",
                                                   "best_keys")[2])
    assert np.mean(gaussian == truth) >= 0.95 > np.mean(best_keys == truth) + 0.2
    batch = jnp.asarray(test[100:110], jnp.float32)
    assert dtkr.gaussian_task(batch, bank, False, 4).tolist() == _lda_reference(train, test[100:110], 0.05,
                                                                               per_example=False)[0].tolist() == [1]


def test_task_statistics_reject_bad_input():
    bank = dtkr.new_key_bank(4, 6, groups=2, max_tasks=2)
    x = np.random.default_rng(0).normal(size=(5, 6))
    bank = dtkr.add_task_statistics(bank, 0, x, 0.1)
    with pytest.raises(ValueError, match="task 0 already has query statistics"):
        dtkr.add_task_statistics(bank, 0, x, 0.1)
    with pytest.raises(ValueError, match=r"shape \(0, 6\)"):
        dtkr.add_task_statistics(bank, 1, np.zeros((0, 6)), 0.1)
    with pytest.raises(ValueError, match=r"shape \(5, 4\)"):
        dtkr.add_task_statistics(bank, 1, x[:, :4], 0.1)
    with pytest.raises(ValueError, match="gaussian_shrinkage=0"):
        dtkr.add_task_statistics(bank, 1, x, 0.0)
    with pytest.raises(ValueError, match="outside the bank's 2 task statistics"):
        dtkr.add_task_statistics(bank, 2, x, 0.1)
    plain = dtkr.new_key_bank(4, 6, groups=2)
    with pytest.raises(ValueError, match="keeps no task statistics"):
        dtkr.add_task_statistics(plain, 0, x, 0.1)
    with pytest.raises(ValueError, match="task_choice='gaussian' needs the task statistics"):
        dtkr.retrieve_from_text(jnp.asarray(x, jnp.float32), plain, 1, True, 2, "task", "gaussian")
    one = dtkr.add_task_statistics(dtkr.new_key_bank(4, 6, groups=2, max_tasks=2), 1, x[:1], 0.1)   # one query:
    assert np.all(np.isfinite(np.asarray(one.precision)))                      # zero scatter stays invertible
    assert dtkr.gaussian_task(jnp.asarray(x, jnp.float32), one, True, 2).tolist() == [1] * 5


def test_key_training_separates_two_tasks_and_the_pool_rejects_a_task_twice():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, 24)).astype(np.float32) * 3
    data = [centers[t] + rng.normal(size=(80, 24)).astype(np.float32) for t in range(2)]
    bank = dtkr.new_key_bank(8, 24, groups=3)
    for t in range(2):
        keys, history = dtkr.train_task_keys(data[t][:60], jax.random.key(t), groups=3, slots=4, epochs=12,
                                             batch_size=8, lr=5e-2, init="orthogonal")
        assert history[-1] < history[0]                                     # the key loss goes down
        bank, slots = dtkr.add_task_keys(bank, t, keys)
        assert slots.tolist() == list(range(4 * t, 4 * t + 4))
    for t in range(2):
        slots, w = dtkr.retrieve(jnp.asarray(data[t][60:]), bank.keys, bank.slot_task >= 0, top_k=2)
        chosen = dtkr.chosen_task(slots, w, bank.slot_task, 2)
        assert float(jnp.mean(chosen == t)) >= 0.95
    with pytest.raises(ValueError, match="already owns key slots"):
        dtkr.add_task_keys(bank, 1, keys)
    with pytest.raises(ValueError, match="empty task"):
        dtkr.train_task_keys(np.zeros((0, 24), np.float32), jax.random.key(0), groups=3, slots=4)
    full = dtkr.new_key_bank(4, 24, groups=3)
    full, _ = dtkr.add_task_keys(full, 0, keys)
    with pytest.raises(ValueError, match="0 free slots"):
        dtkr.add_task_keys(full, 1, keys)


# ----------------------------------------------------------------------------- JARe learner
def make_learner(per_example=True):
    params = init_params(TINY, jax.random.key(0))
    shape = LearnerShape(max_tasks=3, slots_per_task=2, top_k=2, rank=2, max_classes=8, groups=2,
                         per_example=per_example)
    return ContinualClassifier(TINY, params, shape, query_dim=8, rng=jax.random.key(1),
                               tx=optax.adamw(1e-2, weight_decay=0.1))


def train_task(learner, task, rng, steps=3):
    learner.add_task(task, ("a", "b", "c"))
    queries = rng.normal(size=(6, 8)).astype(np.float32) + 5 * task
    learner.set_task_keys(task, dtkr.data_mean_keys(jax.random.key(task), queries, 2, 2), queries)
    learner.reset_optimizer()
    ids = rng.integers(1, TINY.vocab_size, size=(6, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    labels = learner.global_labels(task, rng.integers(0, 3, size=6))
    allowed = learner.col_task == task
    update = learner.update_mask(learner.keys.task_slots(task), learner.columns(task))
    for _ in range(steps):
        slots, weights = learner.retrieve_for_training(task, queries)
        learner.train_step(ids, mask, labels, slots, weights, allowed, update)
    return ids, mask, queries


def snapshot(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_training_a_task_leaves_backbone_keys_and_old_slots_bit_identical():
    learner = make_learner()
    rng = np.random.default_rng(0)
    train_task(learner, 0, rng)
    before = snapshot({"backbone": learner.backbone, "trainable": learner.trainable, "keys": learner.keys.keys})
    old_slots, old_cols = learner.keys.task_slots(0), learner.columns(0)
    train_task(learner, 1, rng)
    after = snapshot({"backbone": learner.backbone, "trainable": learner.trainable, "keys": learner.keys.keys})
    jax.tree.map(np.testing.assert_array_equal, before["backbone"], after["backbone"])
    np.testing.assert_array_equal(before["keys"][:, old_slots], after["keys"][:, old_slots])
    for target, factors in after["trainable"]["bank"].items():
        for name, value in factors.items():
            old = before["trainable"]["bank"][target][name]
            np.testing.assert_array_equal(old[:, old_slots], value[:, old_slots])   # bit-identical
            free = np.setdiff1d(np.arange(learner.shape.max_slots), learner.keys.task_slots(1))
            np.testing.assert_array_equal(old[:, free], value[:, free])
    new_slots = learner.keys.task_slots(1)
    assert not np.array_equal(before["trainable"]["bank"]["attn.o"]["up"][:, new_slots],
                              after["trainable"]["bank"]["attn.o"]["up"][:, new_slots])   # task 1 did learn
    np.testing.assert_array_equal(before["trainable"]["head"]["kernel"][:, old_cols],
                                  after["trainable"]["head"]["kernel"][:, old_cols])
    np.testing.assert_array_equal(before["trainable"]["head"]["bias"][old_cols],
                                  after["trainable"]["head"]["bias"][old_cols])


def test_adding_tasks_never_recompiles_and_predict_takes_text_inputs_only():
    learner = make_learner()
    rng = np.random.default_rng(1)
    ids, mask, queries = train_task(learner, 0, rng, steps=1)
    learner.predict(ids, mask, queries)
    compiled = (learner._train_step._cache_size(), learner._predict._cache_size())
    ids1, mask1, queries1 = train_task(learner, 1, rng, steps=1)
    cols, task, _ = learner.predict(ids1, mask1, queries1)
    assert (learner._train_step._cache_size(), learner._predict._cache_size()) == compiled
    assert set(task.tolist()) <= {0, 1}
    assert all(learner.col_task[c] == t for c, t in zip(cols, task))        # head chosen by retrieval
    # By construction: the evaluation entry point has no task argument.
    assert "task" not in inspect.signature(learner.predict).parameters


def test_bank_shards_slots_on_a_mesh():
    bank = jare.init_increment_bank(jax.random.key(0), TINY, max_slots=8, rank=2)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("data", "fsdp", "tensor"))
    shardings = logical_to_sharding(jare.bank_axes(bank), mesh, shapes=bank)
    placed = jax.device_put(bank, shardings)
    spec = placed["attn.o"]["down"].sharding.spec
    assert spec[1] == "tensor"                                               # the slots axis
    assert placed["attn.o"]["down"].addressable_shards[0].data.shape[1] == 2
    slots, weights = jnp.array([[1, 6]]), jnp.array([[0.5, 0.5]])
    sharded = jax.jit(jare.mix_adapters)(placed, slots, weights)["attn.o"].down
    expected = jare.mix_adapters(bank, slots, weights)["attn.o"].down
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(expected))


def test_masked_apply_keeps_negative_zero_and_frozen_entries_exact():
    params = {"w": jnp.array([-0.0, 1.0, 2.0])}
    updates = {"w": jnp.array([0.0, 0.5, -0.25])}
    out = jare.masked_apply(params, updates, {"w": jnp.array([False, False, True])})
    assert np.signbit(np.asarray(out["w"])[0]) and float(out["w"][1]) == 1.0 and float(out["w"][2]) == 1.75


def test_bad_learner_input_is_named():
    learner = make_learner()
    learner.add_task(0, ("a",))
    with pytest.raises(ValueError, match="already added"):
        learner.add_task(0, ("a",))
    with pytest.raises(ValueError, match="no labels"):
        learner.add_task(1, ())
    with pytest.raises(ValueError, match="max_classes"):
        learner.add_task(1, tuple("abcdefghij"))
    with pytest.raises(ValueError, match="slm.targets"):
        jare.target_dims(TINY, "attn.out")
