"""KV-cache decoding: greedy parity with transformers' generate, an exact cache, sampling invariants, one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torch_models import build_hf_model, torch, transformers

from jaxcl.generate import filter_logits, generate, positions_from_mask
from jaxcl.hf import load_pretrained
from jaxcl.models import ModelConfig, build, init_params

CASES = {
    "gpt2": ("gpt2", dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=96)),
    "llama-gqa-rope3": ("llama", dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False,
                                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                                           original_max_position_embeddings=16))),
}


def left_padded(vocab: int, lengths, seed: int = 0):
    rng = np.random.RandomState(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.randint(3, vocab, n)
        mask[i, width - n:] = 1
    return ids, mask


def hf_greedy(model, ids, mask, new, stops, pad):
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                             max_new_tokens=new, min_new_tokens=0, eos_token_id=stops, pad_token_id=pad,
                             num_beams=1).numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=pad)


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_equals_transformers_generate_with_left_padding_and_stop_lists(tmp_path, name):
    family, kwargs = CASES[name]
    model = build_hf_model(family, kwargs, seed=3)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    ids, mask = left_padded(cfg.vocab_size, [9, 5, 7])
    new = 32
    free = generate(cfg, params, ids, mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(free.tokens), hf_greedy(model, ids, mask, new, None, 0))
    # Stop ids from a list: tokens rows 1 and 2 emit early on (row 0 may run on).
    tokens = np.asarray(free.tokens)
    stops = [int(tokens[1, 4]), int(tokens[2, 10])]
    out = generate(cfg, params, ids, mask, max_new_tokens=new, eos_token_id=stops, pad_token_id=0)
    reference = hf_greedy(model, ids, mask, new, stops, 0)
    np.testing.assert_array_equal(np.asarray(out.tokens), reference)
    lengths = np.asarray(out.lengths)
    assert lengths[1] <= 5 and lengths[2] <= 11
    for row, n in enumerate(lengths):                   # the stop token is the row's last, then padding
        assert (n == new or int(out.tokens[row, n - 1]) in stops) and (np.asarray(out.tokens[row, n:]) == 0).all()


def test_every_cached_step_equals_a_full_forward():
    cfg = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
    params = init_params(cfg, jax.random.key(0))
    ids, mask = left_padded(64, [6, 3], seed=1)
    out = generate(cfg, params, ids, mask, max_new_tokens=8, eos_token_id=[])
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, 8), np.int64)], axis=1)
    logits = build(cfg).apply({"params": params}, jnp.asarray(seq), jnp.asarray(full_mask),
                              positions=positions_from_mask(jnp.asarray(full_mask))).logits
    # greedy: each new token is the argmax of the full forward at the position before it
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, ids.shape[1] - 1:-1], -1)), np.asarray(out.tokens))


def test_sampling_is_reproducible_filtered_and_one_compile():
    cfg = ModelConfig(family="gpt2", vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=64)
    params = init_params(cfg, jax.random.key(0))
    ids, mask = left_padded(50, [4, 6], seed=2)
    kw = dict(max_new_tokens=12, temperature=1.3, top_k=5, rng=jax.random.key(7), eos_token_id=[])
    a = generate(cfg, params, ids, mask, **kw)
    b = generate(cfg, params, ids, mask, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    from jaxcl.generate import _generate
    compiled = _generate._cache_size()
    generate(cfg, params, ids + 1, mask, **(kw | {"rng": jax.random.key(8)}))      # same shapes: no compile
    assert _generate._cache_size() == compiled
    # near-zero temperature is greedy
    cold = generate(cfg, params, ids, mask, **(kw | {"temperature": 1e-4, "top_k": 0}))
    greedy = generate(cfg, params, ids, mask, max_new_tokens=12, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(cold.tokens), np.asarray(greedy.tokens))


@pytest.mark.parametrize("seed", range(20))
def test_top_k_and_top_p_never_leave_the_allowed_set(seed):
    rng = np.random.RandomState(seed)
    logits = jnp.asarray(rng.randn(4, 30) * 3, jnp.float32)
    k, p = int(rng.randint(1, 10)), float(rng.uniform(0.05, 1.0))
    kept = np.asarray(filter_logits(logits, top_k=k, top_p=p)) > jnp.finfo(jnp.float32).min
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for row in range(4):
        order = np.argsort(-probs[row])
        allowed = set(order[:k])
        top = np.asarray(jax.nn.softmax(np.where(np.isin(np.arange(30), order[:k]), logits[row], -np.inf)))
        ranked = np.argsort(-top)
        mass = np.cumsum(top[ranked]) - top[ranked]
        allowed &= set(ranked[mass < p])
        assert set(np.flatnonzero(kept[row])) == allowed and len(allowed) >= 1
    draws = jax.random.categorical(jax.random.key(seed), filter_logits(logits, k, p), shape=(200, 4))
    assert all(kept[r, int(t)] for row in np.asarray(draws) for r, t in enumerate(row))


def test_bad_generate_inputs_are_named():
    cfg = ModelConfig(family="gpt2", vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    params = init_params(cfg, jax.random.key(0))
    for kwargs, message in ((dict(input_ids=np.zeros((1, 0), int), max_new_tokens=2), "non-empty"),
                            (dict(input_ids=np.zeros((1, 4), int), max_new_tokens=0), "max_new_tokens"),
                            (dict(input_ids=np.zeros((1, 10), int), max_new_tokens=8), "exceeds model.max_seq_len=16"),
                            (dict(input_ids=np.zeros((1, 4), int), max_new_tokens=2, temperature=0.5), "needs rng")):
        with pytest.raises(ValueError, match=message):
            generate(cfg, params, **kwargs)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapters_and_prompts_decode_like_the_full_forward(family):
    from jaxcl.slm import jare
    cfg = ModelConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64,
                      num_prompts=2, prompt_length=3)
    params = init_params(cfg, jax.random.key(1))
    bank = jare.init_increment_bank(jax.random.key(2), cfg, max_slots=4, rank=2, targets=("attn.o", "mlp.wi"))
    bank = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(3), x.shape), bank)   # non-zero up
    adapters = jare.mix_adapters(bank, jnp.asarray([[1, 3]]), jnp.asarray([[0.7, 0.3]]))
    ids, mask = left_padded(64, [5, 8], seed=4)
    prompt_ids = jnp.asarray([1, 0])
    out = generate(cfg, params, ids, mask, max_new_tokens=10, eos_token_id=[], adapters=adapters,
                   prompt_ids=prompt_ids)
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, 10), np.int64)], axis=1)
    logits = build(cfg).apply({"params": params}, jnp.asarray(seq), jnp.asarray(full_mask),
                              positions=positions_from_mask(jnp.asarray(full_mask)), adapters=adapters,
                              prompt_ids=prompt_ids).logits
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, ids.shape[1] - 1:-1], -1)), np.asarray(out.tokens))
    plain = generate(cfg, params, ids, mask, max_new_tokens=10, eos_token_id=[])
    assert not np.array_equal(np.asarray(plain.tokens), np.asarray(out.tokens))     # they matter


def test_generate_command_on_an_hf_directory_and_on_a_run(tmp_path, capsys):
    from pathlib import Path

    from jaxcl import cli
    from jaxcl.data.corpus import default_tokenizer_path

    model = build_hf_model("gpt2", dict(vocab_size=8192, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                        bos_token_id=0, eos_token_id=0), seed=5)
    model.save_pretrained(tmp_path / "hf")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(default_tokenizer_path()), eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "hf")
    prompt = "In the beginning God created"
    assert cli.main(["generate", str(tmp_path / "hf"), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    ids = fast(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        reference = model.generate(**ids, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=0)
    expected = prompt + fast.decode([t for t in reference[0, ids["input_ids"].shape[1]:].tolist() if t != 0],
                                    skip_special_tokens=True)
    assert printed == expected
    for args, message in ((["--prompt", " "], "empty --prompt"), (["--prompt", "x", "--max-new-tokens", "0"],
                                                                  "max_new_tokens must be a positive integer"),
                          (["--prompt", "x", "--max-new-tokens", "80"], "exceeds model.max_seq_len=64")):
        assert cli.main(["generate", str(tmp_path / "hf"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # A jaxcl run directory (its latest checkpoint and its tokenizer), prompts from a file.
    root = Path(__file__).resolve().parents[1]
    tiny = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
            "data.seq_len=32", "data.batch_size=8", "data.eval_batches=1", "data.domains=[bible,wordnet]",
            "train.pretrain_steps=2", "train.steps=2", "checkpoint.async_save=false", f"run.dir={tmp_path / 'run'}"]
    assert cli.main(["run", str(root / "configs" / "demo.yaml"), *tiny]) == 0
    (tmp_path / "prompts.txt").write_text("The Lord said\nA noun is\n")
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path / "run"), "--prompts-file", str(tmp_path / "prompts.txt"),
                     "--max-new-tokens", "4", "--temperature", "0.8", "--top-p", "0.9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("The Lord said") and lines[2].startswith("A noun is") and lines[1] == "---"
