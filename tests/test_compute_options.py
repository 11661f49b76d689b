"""Compute options (`model.remat`, `model.attention`) and the loss layout change how, never what, is computed:
the loss and every gradient equal the reference path (no remat, full masked attention) within 1e-5, for GPT-2
and LLaMA with grouped-query attention, with padding, learned prompts and low-rank adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.models import ConfigError, ModelConfig, build, init_params
from jaxcl.models.lowrank import gather_mix
from jaxcl.train import causal_lm_nll

REFERENCE = dict(remat="none", attention="xla")      # every residual saved, the full masked score matrix
BASE = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                        num_prompts=2, prompt_length=3, **REFERENCE),
    "llama": ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                         num_prompts=2, prompt_length=3, **REFERENCE),
}
# every remat policy with full attention, every attention with no remat, and the likely CPU choice combined
OPTIONS = [dict(remat=r, attention=a, attention_block=16) for r, a in (
    ("full", "xla"), ("dots_saveable", "xla"), ("dots_with_no_batch_dims_saveable", "xla"),
    ("none", "blocked"), ("none", "dot_product_attention"), ("dots_saveable", "blocked"), ("dots_saveable", "auto"))]


def batch(cfg, seq=37):
    ids = jax.random.randint(jax.random.key(1), (3, seq), 0, cfg.vocab_size)
    mask = np.ones((3, seq), np.int32)
    mask[1, -9:] = 0                                  # right padding
    mask[2, :6] = 0                                   # left padding (positions still count from the first slot)
    return ids, jnp.asarray(mask), jnp.array([0, 1, 1])


def adapters(cfg):
    d_attn = cfg.n_heads * cfg.head_dim
    k = jax.random.split(jax.random.key(5), 4)
    bank_o = (jax.random.normal(k[0], (cfg.n_layers, 4, 2, d_attn)) * 0.3,
              jax.random.normal(k[1], (cfg.n_layers, 4, 2, cfg.d_model)) * 0.3)
    bank_wi = (jax.random.normal(k[2], (cfg.n_layers, 4, 2, cfg.d_model)) * 0.3,
               jax.random.normal(k[3], (cfg.n_layers, 4, 2, cfg.d_ff)) * 0.3)
    slots, weights = jnp.array([[0, 2], [1, 3], [3, 0]]), jnp.array([[0.3, 0.7], [0.5, 0.5], [0.9, 0.1]])
    return {"attn.o": gather_mix(*bank_o, slots, weights), "mlp.wi": gather_mix(*bank_wi, slots, weights)}


def loss_and_grads(cfg, params, mix):
    ids, mask, prompts = batch(cfg)
    model = build(cfg)

    def loss(p, m):
        out = model.apply({"params": p}, ids, mask, prompt_ids=prompts, adapters=m)
        total, count, _ = causal_lm_nll(out.logits, ids, mask)
        return total / count

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, mix)


@pytest.mark.parametrize("family", list(BASE))
def test_every_remat_policy_and_attention_gives_the_reference_loss_and_gradients(family):
    cfg = BASE[family]
    params = init_params(cfg, jax.random.key(0))
    mix = adapters(cfg)
    ref_loss, ref_grads = loss_and_grads(cfg, params, mix)
    assert np.isfinite(float(ref_loss))
    for option in OPTIONS:
        loss, grads = loss_and_grads(cfg.replace(**option), params, mix)
        assert abs(float(loss) - float(ref_loss)) <= 1e-5, option
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0,
                                       err_msg=f"{option} {jax.tree_util.keystr(path)}")
    # the blocks were really used: 37 prompt-free text positions + 3 prompt slots > the 16-query block
    assert 37 + cfg.prompt_length > 16


def test_auto_attention_picks_per_backend_and_the_defaults_are_the_measured_cpu_choice():
    from jaxcl.models.layers import attention_impl

    cfg = ModelConfig(family="gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4)
    assert (cfg.remat, cfg.attention, cfg.attention_block) == ("dots_saveable", "auto", 64)   # docs/benchmarks.md
    assert [attention_impl(cfg, b) for b in ("cpu", "gpu", "tpu")] == ["blocked", "dot_product_attention", "xla"]
    assert attention_impl(cfg) == "blocked"                      # the test suite runs on CPU
    assert attention_impl(cfg.replace(attention="xla"), "cpu") == "xla"


def test_blocked_attention_forward_equals_full_with_a_ragged_last_block():
    cfg = BASE["llama"].replace(num_prompts=0)
    params = init_params(cfg, jax.random.key(0))
    ids, mask, _ = batch(cfg, seq=50)
    real = np.asarray(mask, bool)     # a padding query attends to nothing real: its output is unused filler
    full = np.asarray(build(cfg).apply({"params": params}, ids, mask).logits)[real]
    for block in (7, 16, 64):
        out = build(cfg.replace(attention="blocked", attention_block=block)).apply({"params": params}, ids, mask)
        np.testing.assert_allclose(np.asarray(out.logits)[real], full, atol=1e-5, rtol=0)


def test_loss_over_full_length_logits_equals_the_sliced_reference():
    """The per-token NLL and its sum equal cross-entropy over `logits[:, :-1]` against `ids[:, 1:]`."""
    logits = jax.random.normal(jax.random.key(0), (3, 9, 13)) * 3
    ids = jax.random.randint(jax.random.key(1), (3, 9), 0, 13)
    mask = jnp.array([[1] * 9, [1] * 6 + [0] * 3, [0] * 2 + [1] * 7])
    total, count, nll = causal_lm_nll(logits, ids, mask)
    weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]) * weights
    np.testing.assert_allclose(np.asarray(nll), np.asarray(ref), atol=1e-6, rtol=0)
    assert abs(float(total) - float(ref.sum())) < 1e-5 and float(count) == float(weights.sum()) == 8 + 5 + 6
    total, count, nll = causal_lm_nll(logits, ids, None)
    assert nll.shape == (3, 8) and float(count) == 24


@pytest.mark.parametrize("kwargs,message", [(dict(remat="some"), "model.remat='some'"),
                                            (dict(attention="flash"), "model.attention='flash'"),
                                            (dict(attention_block=0), "model.attention_block")])
def test_bad_compute_options_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BASE["gpt2"].replace(**kwargs)


def _plain_blocked_attention(q, k, v, mask, cfg):
    """The blocked attention as plain autodiff sees it (per-block masked softmax, no custom VJP)."""
    from jaxcl.models.layers import attend

    step, s = cfg.attention_block, q.shape[1]
    return jnp.concatenate([attend(q[:, i:i + step], k[:, :i + step], v[:, :i + step],
                                   mask[:, i:i + step, :i + step], "bskd", cfg, jnp.float32)
                            for i in range(0, s, step)], axis=1)


def test_blocked_attention_backward_equals_autodiff_including_fully_masked_rows():
    """The FlashAttention-style VJP of `attend_causal_blocks` equals autodiff of the per-block softmax for q, k
    and v: grouped queries, a ragged last block, and a cotangent on every row, left-padding rows (whose every
    key is masked) included."""
    from jaxcl.models.layers import attend_causal_blocks, build_attention_mask

    cfg = ModelConfig(family="llama", vocab_size=61, d_model=48, n_layers=1, n_heads=6, n_kv_heads=2,
                      attention_block=8)
    b, s = 2, 21
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (b, s, 2, 3, cfg.head_dim)) * 2
    k = jax.random.normal(keys[1], (b, s, 2, cfg.head_dim)) * 2
    v = jax.random.normal(keys[2], (b, s, 2, cfg.head_dim))
    cotangent = jax.random.normal(keys[3], (b, s, cfg.n_heads, cfg.head_dim))
    padding = jnp.ones((b, s), jnp.int32).at[1, :5].set(0)
    mask = build_attention_mask(padding, b, s, causal=True)

    def vjp(fn):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask, cfg), q, k, v)
        return out, pullback(cotangent)

    out, grads = vjp(lambda *a: attend_causal_blocks(*a, jnp.float32))
    ref_out, ref_grads = vjp(_plain_blocked_attention)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0)
    for name, a, r in zip("qkv", grads, ref_grads):
        assert float(jnp.max(jnp.abs(r))) > 0.1, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("remat", ["dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_keeps_the_attention_output_and_softmax_stats_not_the_score_matrix(remat, capsys):
    """Under a saving remat policy the blocked attention's residuals are its inputs, output and per-row softmax
    statistics: no `[query block, keys]` score or probability matrix is stored, and its forward is not re-run."""
    import re

    from jax.ad_checkpoint import print_saved_residuals

    from jaxcl.models.layers import ATTENTION_RESIDUALS, attend_causal_blocks, remat_policy

    cfg = ModelConfig(family="gpt2", vocab_size=61, d_model=32, n_layers=1, n_heads=4, remat=remat,
                      attention_block=6)           # head_dim 8: no score block [.., 6, 6|12|18|24] is mistaken for one
    s = 24
    q = jnp.ones((2, s, 4, 1, cfg.head_dim))
    k = v = jnp.ones((2, s, 4, cfg.head_dim))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (2, s, s))
    fn = jax.checkpoint(lambda q, k, v: jnp.sum(attend_causal_blocks(q, k, v, mask, cfg, jnp.float32)),
                        policy=remat_policy(cfg))
    print_saved_residuals(fn, q, k, v)
    saved = capsys.readouterr().out.strip().splitlines()
    assert {name for name in ATTENTION_RESIDUALS if any(f"'{name}'" in line for line in saved)} == \
        set(ATTENTION_RESIDUALS), saved
    shapes = [tuple(int(n) for n in re.match(r"\w+\[([\d,]*)\]", line).group(1).split(",") if n) for line in saved]
    assert (2, 4, 1, s, 2) in shapes and (2, 4, 1, s, cfg.head_dim) in shapes, saved
    assert not [shape for shape in shapes if len(shape) >= 2 and shape[-2] == 6 and shape[-1] in (6, 12, 18, 24)], saved
    assert remat_policy(cfg.replace(remat="full")) is None


def test_blocked_attention_in_bfloat16_is_as_close_to_float32_as_full_attention():
    """In bfloat16 the blocked attention's custom VJP (probabilities cast to bf16 for the dots, normalised after
    the value dot) keeps the loss and gradients as close to the float32 reference as full attention does."""
    cfg = BASE["llama"].replace(num_prompts=0)
    params = init_params(cfg, jax.random.key(0))
    ids, mask, _ = batch(cfg, seq=40)

    def loss_and_grads_in(c):
        model = build(c)

        def loss(p):
            total, count, _ = causal_lm_nll(model.apply({"params": p}, ids, mask).logits, ids, mask)
            return total / count

        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grads = loss_and_grads_in(cfg)

    def errors(attention):
        loss, grads = loss_and_grads_in(cfg.replace(dtype="bfloat16", attention=attention, remat="dots_saveable",
                                                    attention_block=16))
        rel = max(float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
                  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
        return abs(float(loss) - float(ref_loss)), rel

    (full_loss_err, full_grad_err), (blocked_loss_err, blocked_grad_err) = errors("xla"), errors("blocked")
    assert 0 < full_grad_err < 0.05 and blocked_grad_err < 1.5 * full_grad_err, (full_grad_err, blocked_grad_err)
    assert blocked_loss_err < max(2 * full_loss_err, 1e-3), (full_loss_err, blocked_loss_err)
