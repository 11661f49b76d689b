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


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_cached_step_equals_a_full_forward(scan_layers):
    cfg = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
    params = init_params(cfg, jax.random.key(0))
    ids, mask = left_padded(64, [6, 3], seed=1)
    out = generate(cfg, params, ids, mask, max_new_tokens=8, eos_token_id=[], scan_layers=scan_layers)
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, 8), np.int64)], axis=1)
    logits = build(cfg).apply({"params": params}, jnp.asarray(seq), jnp.asarray(full_mask),
                              positions=positions_from_mask(jnp.asarray(full_mask))).logits
    # greedy: each new token is the argmax of the full forward at the position before it
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, ids.shape[1] - 1:-1], -1)), np.asarray(out.tokens))
    # and every cached step's distribution is the full forward's (float32: <= 1e-4)
    scored = generate(cfg, params, ids, mask, max_new_tokens=8, eos_token_id=[], return_logprobs=True,
                      scan_layers=scan_layers)
    np.testing.assert_array_equal(np.asarray(scored.tokens), np.asarray(out.tokens))
    full = jax.nn.log_softmax(logits[:, ids.shape[1] - 1:-1], -1)
    np.testing.assert_allclose(np.asarray(scored.logprobs), np.asarray(full), atol=1e-4, rtol=0)
    if not scan_layers:      # per-layer params given directly decode the same; the scan needs stacked ones
        from jaxcl.models import unstack_layers
        again = generate(cfg, unstack_layers(params), ids, mask, max_new_tokens=8, eos_token_id=[])
        np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
        with pytest.raises(ValueError, match="scan_layers=True needs stacked"):
            generate(cfg, unstack_layers(params), ids, mask, max_new_tokens=8, scan_layers=True)


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
                                                                  "--max-new-tokens 0: must be at least 1"),
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
    # The run exported as an HF directory decodes to the same greedy text as the run itself.
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    texts = []
    for source in (tmp_path / "run", tmp_path / "exported"):
        assert cli.main(["generate", str(source), "--prompt", "The Lord said", "--max-new-tokens", "8"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("The Lord said") and len(texts[0]) > len("The Lord said\n")
    assert cli.main(["generate", str(tmp_path / "run"), "--prompt", "x", "--memory", str(tmp_path / "nowhere")]) == 2
    assert "--memory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- kNN-LM memory, streaming, mesh, bf16
def full_forward(cfg, params, ids, mask, **kw):
    return build(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                            positions=positions_from_mask(jnp.asarray(mask)), **kw)


def make_memory(tmp_path, cfg, params, rows=12, seq=20, seed=0, **kw):
    """A datastore of this model's real kNN keys over random text (next token as value), as a KnnMemory."""
    from jaxcl.memory import Datastore, params_fingerprint
    from jaxcl.memory.decoding import KnnMemory

    text = np.random.RandomState(seed).randint(3, cfg.vocab_size, (rows, seq))
    out = full_forward(cfg, params, text, np.ones_like(text))
    store = Datastore.create(str(tmp_path / "store"), dim=cfg.d_model, backend="exact",
                             model_fingerprint=params_fingerprint(params))
    store.add(np.asarray(out.knn_keys[:, :-1]).reshape(-1, cfg.d_model), text[:, 1:].reshape(-1))
    return KnnMemory(store, **kw)


def reference_knn_step(cfg, params, memory, seq, mask, exhaustive=True, at=-1, out=None):
    """The mixed next-token log-distribution after `seq[:, :at + 1]` from a full forward of `seq` (causal: the
    same as a forward of the prefix) and an exhaustive search (or, with `exhaustive=False`, the store's own
    search: ScaNN's approximate neighbours). `out`: that forward, if already computed."""
    from jaxcl.memory import knn_lm_logprobs
    from jaxcl.memory.calibrator import calibrator_features

    out = full_forward(cfg, params, seq, mask) if out is None else out
    logits, query = np.asarray(out.logits[:, at]), np.asarray(out.knn_keys[:, at], np.float32)
    if exhaustive:
        keys = memory.store.keys.astype(np.float32)
        d = ((query[:, None, :] - keys[None]) ** 2).sum(-1)
        idx = np.argsort(d, axis=1, kind="stable")[:, :memory.k]
        dists, values = np.take_along_axis(d, idx, 1), memory.store.values[idx]
    else:
        dists, idx = memory.store.search(query, memory.k)
        values = memory.store.values[idx]
    d = dists
    if memory.calibrator is None:
        lam, temp = np.full(len(d), memory.lam, np.float32), memory.temperature
    else:
        logp = np.asarray(jax.nn.log_softmax(logits, -1))
        conf, ent = np.exp(logp).max(-1), -(np.exp(logp) * logp).sum(-1)
        feats = calibrator_features(conf, ent, memory.log_freq[np.asarray(seq)[:, at]], dists, values)
        lam, temp = memory.calibrator.lam(feats), memory.calibrator.temperature
    return np.asarray(knn_lm_logprobs(jnp.asarray(logits), dists, values, lam=lam, temperature=temp))


@pytest.mark.parametrize("calibrated", [False, True])
def test_memory_decoding_equals_knn_lm_on_a_full_forward_and_exact_search(tmp_path, calibrated):
    from flax.core import unfreeze

    from jaxcl.generate import _memory_step
    from jaxcl.memory import DatastoreError
    from jaxcl.memory.calibrator import Calibrator, LambdaNet

    cfg = ModelConfig(family="llama", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
    params = init_params(cfg, jax.random.key(5))
    kw = dict(k=8, lam=0.6, temperature=3.0)
    if calibrated:
        net = unfreeze(LambdaNet(16).init(jax.random.key(1), jnp.zeros((1, 23)))["params"])
        cal = Calibrator("mlp", {"net": net, "log_temperature": np.float32(np.log(2.0))}, np.zeros(23, np.float32),
                         np.ones(23, np.float32), hidden=16)
        kw |= dict(calibrator=cal, log_freq=np.log(np.arange(1, 49, dtype=np.float32)))
    memory = make_memory(tmp_path, cfg, params, **kw)
    ids, mask = left_padded(48, [7, 4, 6], seed=9)
    new = 10
    out = generate(cfg, params, ids, mask, max_new_tokens=new, eos_token_id=[], memory=memory, return_logprobs=True)
    tokens = np.asarray(out.tokens)
    seq = np.concatenate([ids, tokens[:, :new - 1]], axis=1)           # one forward: every step's prefix
    full_mask = np.concatenate([mask, np.ones((3, new - 1), np.int64)], axis=1)
    forward = full_forward(cfg, params, seq, full_mask)
    for t in range(new):
        want = reference_knn_step(cfg, params, memory, seq, full_mask, at=ids.shape[1] + t - 1, out=forward)
        np.testing.assert_allclose(np.asarray(out.logprobs[:, t]), want, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(tokens[:, t], want.argmax(-1))                  # greedy on the mixture
    plain = generate(cfg, params, ids, mask, max_new_tokens=new, eos_token_id=[])
    assert not np.array_equal(np.asarray(plain.tokens), tokens)                       # the memory matters
    compiled = _memory_step._cache_size()
    again = generate(cfg, params, ids[::-1].copy(), mask[::-1].copy(), max_new_tokens=new, eos_token_id=[],
                     memory=memory, return_logprobs=True)
    assert _memory_step._cache_size() == compiled                                     # same shapes: no compile
    np.testing.assert_array_equal(np.asarray(again.tokens), tokens[::-1])
    from jaxcl.models import unstack_layers                                           # per-layer params: same model
    per_layer = generate(cfg, unstack_layers(params), ids, mask, max_new_tokens=new, eos_token_id=[], memory=memory)
    np.testing.assert_array_equal(np.asarray(per_layer.tokens), tokens)
    other = init_params(cfg, jax.random.key(6))                                       # another model's memory
    with pytest.raises(DatastoreError, match="holds keys of model"):
        generate(cfg, other, ids, mask, max_new_tokens=2, memory=memory)


@pytest.mark.parametrize("with_memory", [False, True])
def test_stream_sees_every_token_in_order(tmp_path, with_memory):
    cfg = ModelConfig(family="gpt2", vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=64)
    params = init_params(cfg, jax.random.key(2))
    memory = make_memory(tmp_path, cfg, params, k=4) if with_memory else None
    ids, mask = left_padded(40, [5, 3], seed=3)
    free = np.asarray(generate(cfg, params, ids, mask, max_new_tokens=12, eos_token_id=[], memory=memory).tokens)
    stops = [int(free[0, 3]), int(free[1, 5])]                                       # both rows stop early
    seen = []
    out = generate(cfg, params, ids, mask, max_new_tokens=12, eos_token_id=stops, pad_token_id=0, memory=memory,
                   stream=lambda step, tokens: seen.append((step, tokens.tolist())))
    steps = [s for s, _ in seen]
    assert steps == list(range(len(steps))) and 1 <= len(steps) <= 12
    streamed = np.asarray([t for _, t in seen]).T                                    # [b, steps]
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(streamed, tokens[:, :len(steps)])
    assert (tokens[:, len(steps):] == 0).all() and max(np.asarray(out.lengths)) <= len(steps)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decoding_on_a_mesh_equals_one_device(scan_layers):
    from jax.sharding import Mesh

    from jaxcl.models import abstract_params, param_axes
    from jaxcl.parallel import logical_to_sharding

    cfg = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=64)
    params = init_params(cfg, jax.random.key(3))
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 1, 4), ("data", "fsdp", "tensor"))
    sharded = jax.device_put(params, logical_to_sharding(param_axes(cfg), mesh, shapes=abstract_params(cfg)))
    wq = sharded["layers"]["attn"]["k"]["kernel"]
    assert len(wq.sharding.device_set) == 8 and wq.addressable_shards[0].data.size < wq.size       # really split
    ids, mask = left_padded(64, [6, 2, 5, 4], seed=6)
    kw = dict(max_new_tokens=9, eos_token_id=[], return_logprobs=True, scan_layers=scan_layers)
    one = generate(cfg, params, ids, mask, **kw)
    many = generate(cfg, sharded, ids, mask, mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(many.tokens), np.asarray(one.tokens))
    np.testing.assert_allclose(np.asarray(many.logprobs), np.asarray(one.logprobs), atol=1e-5, rtol=0)


BF16_TOLERANCE = 0.02    # max |Δ log p| of a bfloat16 cached step vs the full forward; measured on CPU (4 seeds):
                         # 0 vs the bfloat16 forward, <= 0.004 vs the float32 forward


def test_bfloat16_cached_steps_match_the_full_forward_within_tolerance():
    """bfloat16 decoding: the cache holds bfloat16 keys/values and the step attends over a different-length
    reduction than the full forward, so the two differ by bfloat16 round-off; each step's log-distribution stays
    within BF16_TOLERANCE of the full forward's in bfloat16 and in float32 (float32 decoding: 1e-4, test above)."""
    cfg = ModelConfig(family="gpt2", vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(4))
    ids, mask = left_padded(64, [8, 5], seed=8)
    out = generate(cfg, params, ids, mask, max_new_tokens=12, eos_token_id=[], return_logprobs=True)
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, 12), np.int64)], axis=1)
    full = jax.nn.log_softmax(full_forward(cfg, params, seq, full_mask).logits[:, ids.shape[1] - 1:-1], -1)
    gap = float(jnp.max(jnp.abs(out.logprobs - full)))
    assert gap <= BF16_TOLERANCE, gap
    f32 = jax.nn.log_softmax(full_forward(cfg.replace(dtype="float32"), params, seq, full_mask).logits[:, ids.shape[1] - 1:-1], -1)
    assert float(jnp.max(jnp.abs(out.logprobs - f32))) <= BF16_TOLERANCE
