"""Model growth: exact function preservation (property tests), composition, learnability, jit/sharding,
HF export of a grown model, ELLE's scheme, bad input."""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.config import MeshConfig
from jaxcl.models import ConfigError, ModelConfig, abstract_params, build, init_params, param_axes
from jaxcl.parallel import logical_to_sharding, make_mesh
from jaxcl.train import causal_lm_nll
from jaxcl.transforms import grow

# Random cases per family: each compiles three programs (growth, and the forward before and after), so this is
# the fewest draws of the seeded generators that still cover every kind of growth in ALL_BRANCHES for both
# families (llama's first MHA draw is the 17th); the property test asserts that coverage.
N_CASES = {"gpt2": 8, "llama": 17}     # random cases per family: each family's first cases cover all its branches


def perturbed_params(cfg, seed, scale=0.1):
    """Random params of the model's shapes: N(0, 0.2) weights, norm scales 1 + N(0, scale), biases N(0, scale).

    Drawn with NumPy (no per-shape RNG compilation: the property tests build dozens of models).
    """
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        name = path[-1].key
        base = 1.0 if name == "scale" else 0.0
        std = 0.2 if name in ("kernel", "embedding") else scale
        return jnp.asarray(base + std * rng.randn(*leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


@functools.lru_cache(maxsize=16)
def _forward(cfg):
    """The jitted forward of `cfg`, compiled once per config (a test may evaluate one config several times).

    It is the tests' measuring instrument, not the code under test: it is compiled without XLA's LLVM
    optimizations, which halves the compile time of each of the dozens of random models and changes the
    logits by ~1e-6 (far below the 1e-4 the tests allow); both sides of every comparison use it.
    """
    return jax.jit(lambda p, x: build(cfg).apply({"params": p}, x).logits,
                   compiler_options={"xla_backend_optimization_level": 0})


def logits(cfg, params, ids):
    return np.asarray(_forward(cfg)(params, jnp.asarray(ids, jnp.int32)))


def random_gpt2_case(r: random.Random):
    hd, heads = r.randint(2, 8), r.randint(1, 4)
    cfg = ModelConfig(family="gpt2", vocab_size=r.randint(20, 60), d_model=hd * heads, n_heads=heads,
                      n_layers=r.randint(1, 3), d_ff=r.randint(8, 40), max_seq_len=16)
    hd2, heads2 = hd + r.randint(0, 3), heads + r.randint(0, 3)
    target = dict(d_model=hd2 * heads2, n_heads=heads2, d_ff=cfg.d_ff + r.randint(0, 30),
                  n_layers=cfg.n_layers + r.randint(0, 4))
    return cfg, target


def random_llama_case(r: random.Random):
    hd, kv, group = 2 * r.randint(1, 4), r.randint(1, 3), r.choice([1, 2, 3, 4])
    cfg = ModelConfig(family="llama", vocab_size=r.randint(20, 60), d_model=r.randint(8, 40), n_heads=kv * group,
                      n_kv_heads=kv, head_dim=hd, n_layers=r.randint(1, 3), d_ff=r.randint(8, 40),
                      tie_embeddings=r.random() < 0.3)
    group2 = r.choice([g for g in range(1, group + 1) if group % g == 0])
    kv2 = max(kv, -(-cfg.n_heads // group2)) + r.randint(0, 2)
    target = dict(d_model=cfg.d_model + r.randint(0, 25), n_heads=kv2 * group2, n_kv_heads=kv2,
                  d_ff=cfg.d_ff + r.randint(0, 30), n_layers=cfg.n_layers + r.randint(0, 4))
    return cfg, target


def branches(cfg, target):
    """The kinds of growth one random case exercises (the property test asserts its cases cover them all)."""
    out = {"layers added" if target["n_layers"] > cfg.n_layers else "depth kept",
           "heads added" if target["n_heads"] > cfg.n_heads else "heads kept"}
    if cfg.family == "gpt2":
        out.add("head_dim grows" if target["d_model"] // target["n_heads"] > cfg.head_dim else "head_dim kept")
        out.add("one head" if cfg.n_heads == 1 else "several heads")
    else:
        group, new_group = cfg.n_heads // cfg.n_kv_heads, target["n_heads"] // target["n_kv_heads"]
        out.add("MHA" if group == 1 else "MQA" if cfg.n_kv_heads == 1 else "GQA")
        out.add("kv groups split" if new_group < group else "kv group size kept")
        out.add("tied" if cfg.tie_embeddings else "untied")
        out.add("d_model grows" if target["d_model"] > cfg.d_model else "d_model kept")
        out.add("d_model = n_heads * head_dim" if cfg.d_model == cfg.n_heads * cfg.head_dim else
                "d_model != n_heads * head_dim")
        out.add("new d_model not a multiple of n_heads" if target["d_model"] % target["n_heads"] else
                "new d_model a multiple of n_heads")
    return out


ALL_BRANCHES = {
    "gpt2": {"layers added", "depth kept", "heads added", "heads kept", "head_dim grows", "head_dim kept", "one head",
             "several heads"},
    "llama": {"layers added", "depth kept", "heads added", "heads kept", "MHA", "MQA", "GQA", "kv groups split",
              "kv group size kept", "tied", "untied", "d_model grows", "d_model kept", "d_model = n_heads * head_dim",
              "d_model != n_heads * head_dim", "new d_model not a multiple of n_heads",
              "new d_model a multiple of n_heads"},
}


@pytest.mark.parametrize("make_case", [random_gpt2_case, random_llama_case], ids=["gpt2", "llama"])
def test_exact_growth_preserves_logits_on_random_configs(make_case):
    r = random.Random(make_case.__name__)
    worst = 0.0
    seen = set()
    for case in range(N_CASES[make_case.__name__.split("_")[1]]):
        cfg, target = make_case(r)
        seen |= branches(cfg, target)
        params = perturbed_params(cfg, case)
        ids = np.random.RandomState(case).randint(0, cfg.vocab_size, (2, 7))
        new_params, new_cfg = grow(params, cfg, rng=jax.random.key(case), method="exact", **target)
        assert (new_cfg.d_model, new_cfg.n_heads, new_cfg.n_layers) == \
            (target["d_model"], target["n_heads"], target["n_layers"])
        before, after = logits(cfg, params, ids), logits(new_cfg, new_params, ids)
        assert np.abs(before).max() > 0.05                           # non-trivial logits
        diff = np.abs(before - after).max()
        worst = max(worst, diff)
        assert diff <= 1e-4, (case, cfg, target, diff)
        np.testing.assert_array_equal(before.argmax(-1), after.argmax(-1))
    assert worst > 0.0          # really compared two different computations
    assert seen == ALL_BRANCHES[cfg.family], ALL_BRANCHES[cfg.family] - seen


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_growth_composes(family):
    base = dict(vocab_size=40, d_model=12, n_layers=2, n_heads=2, d_ff=20, max_seq_len=16)
    if family == "gpt2":
        cfg, mid, end = ModelConfig(family="gpt2", **base), dict(d_model=21, n_heads=3, n_layers=3), \
            dict(d_model=32, n_heads=4, n_layers=5, d_ff=41)
    else:
        cfg, mid, end = ModelConfig(family="llama", n_kv_heads=1, **base), \
            dict(d_model=19, n_heads=4, n_kv_heads=2, n_layers=3), dict(d_model=30, n_heads=6, n_kv_heads=6, n_layers=5)
    params = perturbed_params(cfg, 0)
    ids = np.random.RandomState(0).randint(0, 40, (2, 8))
    p_b, cfg_b = grow(params, cfg, rng=jax.random.key(1), **mid)
    p_c, cfg_c = grow(p_b, cfg_b, rng=jax.random.key(2), **end)
    p_direct, cfg_direct = grow(params, cfg, rng=jax.random.key(3), **end)
    assert cfg_c.replace(norm_eps=1) == cfg_direct.replace(norm_eps=1)
    np.testing.assert_allclose(cfg_c.norm_eps, cfg_direct.norm_eps, rtol=1e-12)
    ref = logits(cfg, params, ids)
    np.testing.assert_allclose(logits(cfg_c, p_c, ids), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits(cfg_direct, p_direct, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_new_parameters_are_live(family):
    """Input sides of new units are random (not zero), and one SGD step moves the zeroed output sides."""
    cfg = ModelConfig(family=family, vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16)
    params = perturbed_params(cfg, 0)
    new_params, new_cfg = grow(params, cfg, d_model=24, n_heads=3, d_ff=40, n_layers=3, rng=jax.random.key(0))
    lay = new_params["layers"]
    assert np.abs(np.asarray(lay["mlp"]["wi"]["kernel"][:, :, 24:])).min() > 0       # new FFN units' inputs
    assert np.abs(np.asarray(lay["attn"]["q"]["kernel"][:, 16:])).mean() > 1e-3      # new residual rows
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 40, (4, 10)))

    def loss(p):
        return causal_lm_nll(build(new_cfg).apply({"params": p}, ids).logits, ids, None)[0]

    grads = jax.grad(loss)(new_params)
    stepped = optax.apply_updates(new_params, jax.tree.map(lambda g: -0.1 * g, grads))
    wo_new_units = np.asarray(stepped["layers"]["mlp"]["wo"]["kernel"][:, 24:])
    o_new_head = np.asarray(stepped["layers"]["attn"]["o"]["kernel"][:, 2:])
    assert np.abs(wo_new_units).max() > 1e-6 and np.abs(o_new_head).max() > 1e-6
    # The inserted layer's output projections start at zero and learn as well.
    copies = [i for i in range(3) if not np.any(np.asarray(new_params["layers"]["mlp"]["wo"]["kernel"][i]))]
    assert len(copies) == 1 and np.abs(np.asarray(stepped["layers"]["mlp"]["wo"]["kernel"][copies[0]])).max() > 1e-6


def test_grow_jits_with_the_grown_models_shardings():
    cfg = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
    params = perturbed_params(cfg, 0)
    target = dict(d_model=48, n_heads=8, n_kv_heads=4, d_ff=64, n_layers=4)
    new_cfg = grow(params, cfg, rng=jax.random.key(0), **target)[1]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = logical_to_sharding(param_axes(new_cfg), mesh, shapes=abstract_params(new_cfg))
    grown = jax.jit(lambda p, k: grow(p, cfg, rng=k, **target)[0], out_shardings=shardings)(params, jax.random.key(0))
    eager = grow(params, cfg, rng=jax.random.key(0), **target)[0]
    assert grown["layers"]["mlp"]["wi"]["kernel"].sharding == shardings["layers"]["mlp"]["wi"]["kernel"]
    for a, b in zip(jax.tree.leaves(grown), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_bert_exact_at_integer_width_multiples(tied):
    cfg = ModelConfig(family="bert", vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16,
                      pooler=True, tie_embeddings=tied)
    params = perturbed_params(cfg, 0)
    ids = np.random.RandomState(0).randint(0, 40, (2, 8))
    new_params, new_cfg = grow(params, cfg, d_model=48, n_heads=6, d_ff=80, rng=jax.random.key(0))
    np.testing.assert_allclose(logits(new_cfg, new_params, ids), logits(cfg, params, ids), atol=1e-4, rtol=0)
    # At a non-multiple width, or with added layers, the post-LN statistics change: method="exact" refuses
    # (it would return a different function silently), and allow_inexact=True shows why.
    for target, message in ((dict(d_model=24, n_heads=3), r"d_model=24 is not an integer multiple of 16"),
                            (dict(n_layers=3), r"n_layers=3 adds layers")):
        with pytest.raises(ConfigError, match=message + r".*method='elle'"):
            grow(params, cfg, rng=jax.random.key(0), **target)
        odd_params, odd_cfg = grow(params, cfg, rng=jax.random.key(0), allow_inexact=True, **target)
        assert np.abs(logits(odd_cfg, odd_params, ids) - logits(cfg, params, ids)).max() > 1e-3


def test_elle_method_is_deterministic_and_noise_touches_only_new_slices():
    cfg = ModelConfig(family="gpt2", vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16)
    params = perturbed_params(cfg, 0)
    target = dict(d_model=24, n_heads=3, d_ff=40, n_layers=3)
    a, new_cfg = grow(params, cfg, rng=jax.random.key(5), method="elle", **target)
    b, _ = grow(params, cfg, rng=jax.random.key(5), method="elle", **target)
    noisy, _ = grow(params, cfg, rng=jax.random.key(5), method="elle", noise_std=0.01, **target)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    wi, wi_noisy = np.asarray(a["layers"]["mlp"]["wi"]["kernel"]), np.asarray(noisy["layers"]["mlp"]["wi"]["kernel"])
    np.testing.assert_array_equal(wi[:, :16], wi_noisy[:, :16])          # old input rows: untouched
    assert 0 < np.abs(wi[:, 16:] - wi_noisy[:, 16:]).max() < 0.1       # new input rows: noise
    # ELLE duplicates layers without zeroing: every layer of the grown model is a full copy.
    assert all(np.abs(np.asarray(a["layers"]["mlp"]["wo"]["kernel"][i])).max() > 0 for i in range(3))
    assert logits(new_cfg, a, np.zeros((1, 4), int)).shape == (1, 4, 40)


@pytest.mark.parametrize("cfg,target,method", [
    (ModelConfig(family="gpt2", vocab_size=12, d_model=6, n_layers=2, n_heads=2, d_ff=8, max_seq_len=6),
     dict(d_model=12, n_heads=3, d_ff=10, n_layers=3), "exact"),
    (ModelConfig(family="llama", vocab_size=12, d_model=8, n_heads=4, n_kv_heads=2, head_dim=2, n_layers=1, d_ff=8),
     dict(d_model=10, n_heads=6, n_kv_heads=3, d_ff=10, n_layers=2), "exact"),
    (ModelConfig(family="gpt2", vocab_size=12, d_model=6, n_layers=2, n_heads=2, d_ff=8, max_seq_len=6),
     dict(d_model=9, n_heads=3, d_ff=12, n_layers=3), "elle"),
], ids=["gpt2-exact", "llama-gqa-exact", "gpt2-elle-noise"])
def test_grow_importance_gives_each_copy_its_sources_value(cfg, target, method):
    """Reference from the growth's Jacobian: a grown coordinate whose Jacobian row has exactly one non-zero
    entry (a copy, a split copy, a rescaled coordinate) gets that source's importance, every other one (random,
    zero, one and mean fills, zeroed projections of inserted layers) 0; the index maps (ELLE's random ones
    included) are the ones `grow` draws from the same rng."""
    from jax.flatten_util import ravel_pytree

    from jaxcl.transforms import grow_importance

    rng, noise = jax.random.key(3), 0.01 if method == "elle" else 0.0
    flat, unravel = ravel_pytree(perturbed_params(cfg, 0))
    grown = lambda x: ravel_pytree(grow(unravel(x), cfg, rng=rng, method=method, noise_std=noise, **target)[0])[0]
    jac = np.asarray(jax.jacfwd(grown)(flat))                                       # [new, old]
    importance = np.random.RandomState(1).uniform(1.0, 2.0, flat.shape).astype(np.float32)
    out = ravel_pytree(grow_importance(unravel(jnp.asarray(importance)), cfg, rng=rng, method=method,
                                       noise_std=noise, **target))[0]
    single = (jac != 0).sum(axis=1) == 1
    expected = np.where(single, importance[np.argmax(jac != 0, axis=1)], 0.0)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert (np.asarray(out) >= 0).all() and single.sum() > flat.size      # copies exist: the test has teeth
    if method == "exact":
        assert (~single).sum() > 0                                          # and new coordinates


@pytest.mark.parametrize("target,message", [
    (dict(d_model=8), "d_model=8 would shrink the model"),
    (dict(n_layers=1), "n_layers=1 would shrink"),
    (dict(d_model=20, n_heads=3), "n_heads=3 does not divide d_model=20"),
    (dict(d_model=20, n_heads=4, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=4"),
    (dict(d_model=24, n_heads=6), "head_dim would shrink from 8 to 4"),
])
def test_bad_growth_targets_are_named(target, message):
    cfg = ModelConfig(family="gpt2", vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)
    with pytest.raises(ConfigError, match=message):
        grow(init_params(cfg, jax.random.key(0)), cfg, rng=jax.random.key(0), **target)


def test_exact_gqa_growth_needs_nested_groups():
    cfg = ModelConfig(family="llama", vocab_size=40, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=24)
    with pytest.raises(ConfigError, match="new kv group size n_heads/n_kv_heads=3 must divide the old one"):
        grow(init_params(cfg, jax.random.key(0)), cfg, n_heads=6, n_kv_heads=2, rng=jax.random.key(0))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grown_model_exports_to_transformers_with_same_logits(tmp_path, family):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[torch]'")
    import transformers

    from jaxcl.hf import save_pretrained

    cfg = ModelConfig(family=family, vocab_size=48, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=32)
    params = perturbed_params(cfg, 0)
    new_params, new_cfg = grow(params, cfg, d_model=27, n_heads=3, d_ff=40, n_layers=4, rng=jax.random.key(0))
    save_pretrained(tmp_path, new_cfg, new_params)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ids = np.random.RandomState(0).randint(0, 48, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ref, logits(new_cfg, new_params, ids), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ref, logits(cfg, params, ids), atol=1e-4, rtol=0)


def test_grow_command_on_a_checkpoint(tmp_path):
    import subprocess
    import sys

    from jaxcl.hf import load_pretrained, save_pretrained

    cfg = ModelConfig(family="llama", vocab_size=48, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24)
    params = perturbed_params(cfg, 3)
    save_pretrained(tmp_path / "small", cfg, params)
    cmd = [sys.executable, "-m", "jaxcl.cli", "grow", str(tmp_path / "small"), str(tmp_path / "big"),
           "--d-model", "32", "--n-heads", "8", "--n-kv-heads", "4", "--n-layers", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "L2/D16/H4/F24" in out.stdout and "L3/D32/H8/F24" in out.stdout
    new_cfg, new_params = load_pretrained(tmp_path / "big")
    ids = np.random.RandomState(0).randint(0, 48, (2, 6))
    np.testing.assert_allclose(logits(new_cfg, new_params, ids), logits(cfg, params, ids), atol=1e-4, rtol=0)
    bad = subprocess.run([*cmd[:4], str(tmp_path / "small"), str(tmp_path / "small")], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "is IN_DIR" in bad.stderr
    shrink = subprocess.run([*cmd[:5], str(tmp_path / "x"), "--d-model", "8"], capture_output=True, text=True,
                            timeout=300)
    assert shrink.returncode == 2 and "d_model=8 would shrink" in shrink.stderr
    # jaxcl runs LLaMA with d_model not divisible by n_heads (explicit head_dim); transformers refuses it,
    # so the export fails with a clear error before writing anything.
    odd = subprocess.run([*cmd[:4], str(tmp_path / "small"), str(tmp_path / "odd"), "--d-model", "28",
                          "--n-heads", "8", "--n-kv-heads", "4"],
                         capture_output=True, text=True, timeout=300)
    assert odd.returncode == 2 and "transformers cannot represent this llama config" in odd.stderr
    assert not (tmp_path / "odd" / "model.safetensors").exists()
