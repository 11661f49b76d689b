"""Sequence scoring and multiple-choice by likelihood: parity with transformers, consistency with generate and
with one-question-at-a-time scoring, the memory / prompt state, and named errors."""

import jax
import numpy as np
import pytest

from test_generate import left_padded, make_memory
from torch_models import build_hf_model, torch

from jaxcl.eval.scoring import multiple_choice, sequence_logprobs
from jaxcl.generate import generate
from jaxcl.hf import load_pretrained
from jaxcl.models import ModelConfig, init_params


@pytest.mark.parametrize("family,kwargs", [
    ("gpt2", dict(vocab_size=91, n_embd=32, n_layer=2, n_head=4, n_positions=40)),
    ("llama", dict(vocab_size=95, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                   intermediate_size=64)),
])
def test_sequence_logprobs_equal_transformers_per_row(tmp_path, family, kwargs):
    model = build_hf_model(family, kwargs, seed=11)
    model.save_pretrained(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    lengths = [9, 4, 7]
    ids, mask = left_padded(cfg.vocab_size, lengths, seed=2)
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)       # the same rows, right-padded
    for r, n in enumerate(lengths):
        right_ids[r, :n], right_mask[r, :n] = ids[r, -n:], 1
    left = sequence_logprobs(cfg, params, ids, mask)
    right = sequence_logprobs(cfg, params, right_ids, right_mask)
    for r, n in enumerate(lengths):
        row = torch.as_tensor(ids[r:r + 1, -n:])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=row).logits[0, :-1].double(), -1)
        want = logp.gather(-1, row[0, 1:, None])[:, 0].numpy()
        np.testing.assert_allclose(left[r, -(n - 1):], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(right[r, :n - 1], want, atol=1e-4, rtol=0)
        assert (left[r, :-(n - 1)] == 0).all() and (right[r, n - 1:] == 0).all()   # padding scores nothing


def test_scoring_with_a_memory_is_what_generate_sampled_from(tmp_path):
    cfg = ModelConfig(family="gpt2", vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_seq_len=48)
    params = init_params(cfg, jax.random.key(8))
    memory = make_memory(tmp_path, cfg, params, k=6, lam=0.5, temperature=2.0)
    ids, mask = left_padded(40, [6, 3], seed=4)
    out = generate(cfg, params, ids, mask, max_new_tokens=8, eos_token_id=[], memory=memory, return_logprobs=True)
    tokens = np.asarray(out.tokens)
    seq = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    scored = sequence_logprobs(cfg, params, seq, full_mask, memory=memory)[:, ids.shape[1] - 1:]
    chosen = np.take_along_axis(np.asarray(out.logprobs), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(scored, chosen, atol=1e-5, rtol=0)
    plain = sequence_logprobs(cfg, params, seq, full_mask)[:, ids.shape[1] - 1:]
    assert np.abs(plain - scored).max() > 1e-2                 # the memory changes the scores


@pytest.mark.parametrize("with_prompt", [False, True])
def test_multiple_choice_equals_scoring_each_option_alone(with_prompt):
    cfg = ModelConfig(family="llama", vocab_size=60, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                      max_seq_len=64, num_prompts=2 if with_prompt else 0, prompt_length=3)
    params = init_params(cfg, jax.random.key(3))
    rng = np.random.RandomState(0)
    contexts = [list(rng.randint(3, 60, n)) for n in (5, 12, 2, 8, 3)]
    options = [[list(rng.randint(3, 60, m)) for m in sizes] for sizes in ([1, 3, 2], [4, 1], [2, 2, 5, 1], [3], [1, 6])]
    prompt = 1 if with_prompt else None
    res = multiple_choice(cfg, params, contexts, options, batch_size=4, prompt_ids=prompt)
    for q, (ctx, opts) in enumerate(zip(contexts, options)):
        for o, opt in enumerate(opts):
            seq = np.asarray([ctx + opt])
            lp = sequence_logprobs(cfg, params, seq, prompt_ids=None if prompt is None else [prompt])
            np.testing.assert_allclose(res.logprob[q, o], lp[0, len(ctx) - 1:].sum(), atol=1e-4)
            assert res.tokens[q, o] == len(opt)
        assert np.isneginf(res.logprob[q, len(opts):]).all()
        assert res.choice[q] == np.argmax(res.logprob[q, :len(opts)])
        assert res.choice_normalized[q] == np.argmax(res.logprob[q, :len(opts)] / np.asarray([len(o) for o in opts]))
    assert res.accuracy(res.choice) == 1.0 and res.accuracy(res.choice_normalized, normalized=True) == 1.0
    if with_prompt:                                            # the prompt is part of what is scored
        plain = multiple_choice(cfg, params, contexts, options, batch_size=4)
        real = np.isfinite(res.logprob)
        assert np.abs(plain.logprob[real] - res.logprob[real]).max() > 1e-3


def test_bad_scoring_inputs_are_named():
    cfg = ModelConfig(family="gpt2", vocab_size=30, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    params = init_params(cfg, jax.random.key(0))
    for call, message in ((lambda: sequence_logprobs(cfg, params, np.zeros((2, 1), int)), "seq >= 2"),
                          (lambda: sequence_logprobs(cfg, params, np.zeros((1, 20), int)), "max_seq_len=16"),
                          (lambda: multiple_choice(cfg, params, [[1]], [[[2], []]]), "question 0, option 1"),
                          (lambda: multiple_choice(cfg, params, [[]], [[[2]]]), "question 0: the context"),
                          (lambda: multiple_choice(cfg, params, [[1] * 10], [[[2] * 7]]), "exceed the model's context")):
        with pytest.raises(ValueError, match=message):
            call()
