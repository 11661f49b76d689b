"""ELLE: learned domain prompts (against a hard-token reference), replay memory and its adaptive
weights, the stage loop (growth, warmup, FLOPs accounting, exact resume) and bad configs."""

import dataclasses
import json
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile_cache import persistent_compilation_cache
from jaxcl.config import ConfigError, load_config
from jaxcl.elle import ElleRun, ReplayMemory, adaptive_weights, memory_rows, planned_stage_flops, replay_plan
from jaxcl.hf import save_pretrained
from jaxcl.hf.config import CheckpointError
from jaxcl.models import ModelConfig, build, init_params, without_prompts
from jaxcl.train.checkpoint import Checkpointer
from jaxcl.train.loop import MetricsLog, Preempted
from jaxcl.transforms import add_prompts, grow

ROOT = Path(__file__).resolve().parents[1]
TINY_ELLE = ["model.max_seq_len=64", "data.seq_len=32", "data.batch_size=8", "data.eval_batches=1",
             "data.domains=[bible,manpages,pydoc]", "train.pretrain_steps=12", "train.steps=12", "train.log_every=4",
             "optim.warmup_steps=3", "optim.lr=3e-3", "checkpoint.every=5", "checkpoint.async_save=false",
             "elle.schedule=[{n_layers: 3, d_model: 96, n_heads: 3, d_ff: 384}, "
             "{n_layers: 3, d_model: 128, n_heads: 4, d_ff: 512}]",
             "elle.warmup_steps=4", "elle.micro_batches=4", "elle.replay_ratio=0.4", "elle.adaptive_every=4",
             "elle.adaptive_eval_batches=1", "elle.memory_fraction=0.05"]


def tiny_arch(n_layers, d_model, n_heads, d_ff):
    return ModelConfig(family="gpt2", vocab_size=8192, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       d_ff=d_ff, max_seq_len=64, num_prompts=3)


def tiny(family, **kw):
    base = dict(family=family, vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    return ModelConfig(**(base | kw))


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("length", [1, 3])
def test_prompts_equal_prepended_tokens_whose_embeddings_are_the_prompt(family, length):
    """Reference: a prompt of P vectors is P extra tokens whose embedding rows hold those vectors."""
    cfg = tiny(family, num_prompts=2, prompt_length=length, tie_embeddings=False if family == "llama" else None)
    params = init_params(cfg, jax.random.key(0))
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, size=(3, 9))
    prompt_ids = np.array([1, 0, 1])
    out = build(cfg).apply({"params": params}, jnp.asarray(ids), prompt_ids=jnp.asarray(prompt_ids))

    # reference: a plain model whose vocabulary ends with the 2 * P prompt rows
    ref_cfg, ref_params = without_prompts(cfg, params)
    ref_cfg = ref_cfg.replace(vocab_size=cfg.vocab_size + 2 * length)
    table = params["prompt_embed"]["embedding"]
    ref_params = dict(ref_params, embed={"embedding": jnp.concatenate([params["embed"]["embedding"], table])})
    if "lm_head" in ref_params:
        ref_params["lm_head"] = {"kernel": jnp.pad(params["lm_head"]["kernel"], ((0, 0), (0, 2 * length)))}
    if "mlm_bias" in ref_params:
        ref_params["mlm_bias"] = jnp.pad(params["mlm_bias"], (0, 2 * length))
    prefix = cfg.vocab_size + prompt_ids[:, None] * length + np.arange(length)[None, :]
    ref = build(ref_cfg).apply({"params": ref_params}, jnp.asarray(np.concatenate([prefix, ids], 1)))
    np.testing.assert_allclose(out.hidden, ref.hidden[:, length:], atol=1e-5)
    if out.logits is not None:
        np.testing.assert_allclose(out.logits, ref.logits[:, length:, :cfg.vocab_size], atol=1e-5)
    plain = build(cfg).apply({"params": params}, jnp.asarray(ids))        # without prompt_ids: the backbone
    backbone = build(without_prompts(cfg, params)[0]).apply({"params": without_prompts(cfg, params)[1]},
                                                            jnp.asarray(ids))
    np.testing.assert_array_equal(plain.hidden, backbone.hidden)
    assert not np.allclose(plain.hidden, out.hidden, atol=1e-3)           # the prompt changes the output


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exact_growth_widens_prompts_and_keeps_prompted_logits(family):
    cfg = tiny(family, n_kv_heads=2 if family == "llama" else None)
    params, cfg = add_prompts(init_params(cfg, jax.random.key(0)), cfg, num_prompts=3, prompt_length=2,
                              rng=jax.random.key(1))
    params["prompt_embed"]["embedding"] = params["prompt_embed"]["embedding"] * 20     # make them matter
    ids = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, size=(2, 7)))
    prompts = jnp.array([2, 0])
    before = build(cfg).apply({"params": params}, ids, prompt_ids=prompts).logits
    new, new_cfg = grow(params, cfg, d_model=56, n_heads=7, n_kv_heads=7 if family == "llama" else None,
                        n_layers=3, rng=jax.random.key(2), method="exact")
    assert new["prompt_embed"]["embedding"].shape == (6, 56) and new_cfg.num_prompts == 3
    after = build(new_cfg).apply({"params": new}, ids, prompt_ids=prompts).logits
    assert float(jnp.abs(after - before).max()) <= 1e-4


def test_add_prompts_extends_and_rejects_bad_requests():
    cfg = tiny("gpt2")
    params, cfg2 = add_prompts(init_params(cfg, jax.random.key(0)), cfg, num_prompts=2, prompt_length=2,
                               rng=jax.random.key(1))
    more, cfg3 = add_prompts(params, cfg2, num_prompts=3, prompt_length=2, rng=jax.random.key(2))
    np.testing.assert_array_equal(more["prompt_embed"]["embedding"][:4], params["prompt_embed"]["embedding"])
    assert more["prompt_embed"]["embedding"].shape == (6, 32) and cfg3.num_prompts == 3
    with pytest.raises(ConfigError, match="length 2"):
        add_prompts(params, cfg2, num_prompts=3, prompt_length=1, rng=jax.random.key(2))
    with pytest.raises(ConfigError, match="already has 2"):
        add_prompts(params, cfg2, num_prompts=1, prompt_length=2, rng=jax.random.key(2))
    with pytest.raises(ValueError, match="num_prompts=0"):
        build(cfg).apply({"params": without_prompts(cfg2, params)[1]}, jnp.zeros((1, 4), jnp.int32),
                         prompt_ids=jnp.zeros((1,), jnp.int32))


def test_save_pretrained_refuses_prompts_and_exports_the_backbone(tmp_path):
    cfg = tiny("gpt2")
    params, cfg2 = add_prompts(init_params(cfg, jax.random.key(0)), cfg, num_prompts=2, prompt_length=1,
                               rng=jax.random.key(1))
    with pytest.raises(CheckpointError, match="without_prompts"):
        save_pretrained(tmp_path / "hf", cfg2, params)
    assert not (tmp_path / "hf").exists()
    save_pretrained(tmp_path / "hf", *without_prompts(cfg2, params))
    assert (tmp_path / "hf" / "config.json").exists()


# ----------------------------------------------------------------------------- replay
def test_replay_plan_replaces_the_expected_share_with_weighted_domains():
    rng = np.random.default_rng(0)
    plans = [replay_plan(rng, 16, 0.1, [1.0, 3.0]) for _ in range(4000)]
    replaced = np.array([len(p) for p in plans])
    assert set(replaced) <= {1, 2}                         # floor(1.6 + U): 1 or 2, as in ELLE
    assert abs(replaced.mean() / 16 - 0.1) < 0.005
    sources = np.array([d for p in plans for _, d in p])
    assert abs((sources == 1).mean() - 0.75) < 0.02
    assert all(len({s for s, _ in p}) == len(p) for p in plans)     # distinct micro-batch slots
    assert replay_plan(rng, 16, 0.1, []) == [] and replay_plan(rng, 16, 0.0, [1.0]) == []


def test_adaptive_weights_follow_elles_rule():
    # domain 0 improved by 20 ppl over 100 tokens, domain 1 by 30 over 300, domain 2 got worse
    prev, now, tokens, w = [500.0, 400.0, 300.0], [480.0, 370.0, 310.0], [100, 300, 50], [1.0, 1.0, 1.0]
    np.testing.assert_allclose(adaptive_weights(prev, now, tokens, w, first_half=True), [0.2, 0.1, 0.2])
    np.testing.assert_allclose(adaptive_weights(prev, now, tokens, w, first_half=False), [0.2, 0.1, 1e-9])
    # the first update of a stage (no previous perplexity) gives 1, as in ELLE's code
    np.testing.assert_allclose(adaptive_weights([None, None], [9.0, 3.0], [0, 10], [0.5, 0.5], True), [1.0, 1.0])
    # a domain that was not replayed since the last update keeps its weight instead of dominating
    np.testing.assert_allclose(adaptive_weights([30.0, 30.0], [29.9, 29.0], [0, 12800], [1e-9, 0.3], False),
                               [1e-9, 1.0 / 12800])


def test_memory_is_a_fixed_fraction_and_mixing_is_a_function_of_the_generator():
    seqs = {d: np.arange(200 * 4).reshape(200, 4) + 1000 * i for i, d in enumerate("abc")}
    rows = memory_rows(200, 0.1, seed=3)
    assert len(rows) == 20 and len(set(rows)) == 20
    np.testing.assert_array_equal(rows, memory_rows(200, 0.1, seed=3))
    memory = ReplayMemory(seqs, "abc", 0.1, seed=0)
    batch = {"input_ids": seqs["c"][:16].copy(), "attention_mask": np.ones((16, 4), np.int32),
             "prompt_ids": np.full(16, 2, np.int32)}
    whole, counts = memory.mix(batch, ("a", "b"), [1.0, 1.0], 0.5, 8, np.random.default_rng(7))
    again, _ = memory.mix(batch, ("a", "b"), [1.0, 1.0], 0.5, 8, np.random.default_rng(7))   # another process
    for k in batch:
        np.testing.assert_array_equal(whole[k], again[k])
    assert (batch["prompt_ids"] == 2).all()                     # the input batch is not modified
    replaced = whole["prompt_ids"] != 2
    # whole micro-batches (of 2 rows) are replaced; the draws are pinned (the same as before the global-batch mix)
    assert replaced.tolist() == [False] * 6 + [True] * 8 + [False] * 2 and counts == {"a": 2, "b": 6}
    assert replaced.sum() == sum(counts.values()) and replaced.sum() % 2 == 0 and 0 < replaced.sum() < 16
    for row, p in zip(whole["input_ids"][replaced], whole["prompt_ids"][replaced]):
        bank = memory.banks["ab"[p]]
        assert any((bank == row).all(1))                  # a memory row of the domain its prompt names


# ----------------------------------------------------------------------------- the stage loop
class _StopAt(ElleRun):
    """An ELLE run that receives SIGTERM after `stop_after` training steps of stage `stop_stage`."""

    def __init__(self, cfg, stop, stop_stage, stop_after):
        super().__init__(cfg)
        self._stop, self._at = stop, (stop_stage, stop_after)

    def after_step(self, stage, step, steps, model_cfg, state, shardings):
        super().after_step(stage, step, steps, model_cfg, state, shardings)
        if (stage, step) == self._at:
            self._stop["signal"] = signal.SIGTERM


class _Recording(ElleRun):
    """Records (stage, phase, input_ids, prompt_ids) of every batch the train steps receive."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.batches = []

    def train_step_fn(self, model_cfg, tx, shardings, **kw):
        step = super().train_step_fn(model_cfg, tx, shardings, **kw)

        def recorded(state, batch, rng):
            self.batches.append((self.replay["stage"], self.replay["phase"], np.asarray(batch["input_ids"]),
                                 np.asarray(batch["prompt_ids"])))
            return step(state, batch, rng)

        return recorded


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """The resume test runs the reference run's programs again (three invocations): compile them once."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


@pytest.fixture(scope="module")
def elle_run(tmp_path_factory, compile_cache):
    run_dir = tmp_path_factory.mktemp("elle")
    cfg = load_config(ROOT / "configs/elle/demo.yaml", TINY_ELLE + [f"run.dir={run_dir}"])
    runner = _Recording(cfg)
    return cfg, runner.run(), run_dir, runner


def test_elle_run_grows_warms_up_replays_and_accounts_flops(elle_run):
    cfg, report, run_dir, _ = elle_run
    assert report["method"] == "elle" and np.array(report["matrix"]).shape == (3, 3)
    assert [(a["n_layers"], a["d_model"]) for a in report["architectures"]] == [(2, 64), (3, 96), (3, 128)]
    np.testing.assert_allclose(report["train_flops"], planned_stage_flops(cfg, 3), rtol=1e-9)
    # by hand: 8 sequences x (32 text + 1 prompt position) through the layers, logits for the 32 text tokens
    archs = [tiny_arch(2, 64, 2, 256), tiny_arch(3, 96, 3, 384), tiny_arch(3, 128, 4, 512)]
    steps = [12, 12 + 4, 12 + 4]                     # warmup steps count toward the stage they precede
    expected = [n * 8 * (33 * a.train_flops_per_token(33, logits=False)
                         + 32 * (a.train_flops_per_token(33) - a.train_flops_per_token(33, logits=False)))
                for n, a in zip(steps, archs)]
    np.testing.assert_allclose(report["train_flops"], expected, rtol=1e-12)
    assert report["warmup_tokens"] == [0, 4 * 8 * 32, 4 * 8 * 32]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warmups = [r for r in records if r["kind"] == "warmup"]
    assert [(r["stage_index"], r["step"]) for r in warmups] == [(1, 4), (2, 4)]
    weights = [r for r in records if r["kind"] == "replay_weights"]
    assert {r["stage_index"] for r in weights} == {1, 2}
    assert all(set(r["weights"]) == {"bible", "manpages"} for r in weights if r["stage_index"] == 2
               and r["phase"] == "train")
    assert all(np.isfinite(v) for row in report["matrix"] for v in row)
    assert report["matrix"][0][0] < report["initial_perplexity"][0]


def test_the_loop_feeds_each_phase_its_domain_and_replays_memory_with_its_own_prompt(elle_run):
    cfg, _, _, runner = elle_run
    train = {i: {tuple(r) for r in runner.train_sequences[d]} for i, d in enumerate(runner.domains)}
    memory = {i: {tuple(r) for r in runner.memory.banks[d]} for i, d in enumerate(runner.domains)}
    phases, replayed = set(), 0
    for stage, phase, ids, prompts in runner.batches:
        current = stage if phase == 1 else stage - 1          # warmup trains on the previous domain's memory
        source = train if phase == 1 else memory
        phases.add((stage, phase))
        for row, p in zip(ids, prompts):
            if p == current:
                assert tuple(row) in source[p]
            else:
                assert p < current and tuple(row) in memory[p], (stage, phase, p)
                replayed += 1
    assert phases == {(0, 1), (1, 0), (1, 1), (2, 0), (2, 1)}
    assert len(runner.batches) == 12 + 2 * (4 + 12)
    assert replayed > 0


class _Interrupted(_StopAt):
    """Also receives SIGTERM during one warmup step."""

    def __init__(self, cfg, stop, warmup_stage=None, **kw):
        super().__init__(cfg, stop, **kw)
        self._warmup_at = warmup_stage

    def _replayed(self, stage, phase, step, stream, domain):
        if phase == 0 and (stage, step) == (self._warmup_at, 2):
            self._stop["signal"] = signal.SIGTERM
        return super()._replayed(stage, phase, step, stream, domain)


def test_elle_resumes_from_warmup_and_mid_stage_to_the_same_result(elle_run, tmp_path):
    cfg, reference, _, _ = elle_run
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(tmp_path)))

    def interrupted_run(**kw):
        stop = {"signal": None}
        runner = _Interrupted(cfg, stop, **kw)
        ckpt = Checkpointer(tmp_path / "checkpoints", cfg.checkpoint)
        with pytest.raises(Preempted):
            runner._run(ckpt, MetricsLog(tmp_path / "metrics.jsonl"), stop)
        ckpt.close()
        return Checkpointer(tmp_path / "checkpoints").restore_meta(Checkpointer(tmp_path / "checkpoints").latest_step())

    meta = interrupted_run(warmup_stage=1, stop_stage=None, stop_after=None)     # SIGTERM inside stage 1's warmup
    assert meta["stage"] == 0 and meta["completed"]                           # -> back to the end of stage 0
    meta = interrupted_run(stop_stage=2, stop_after=6)                         # resumes, then SIGTERM mid stage 2
    assert meta["stage"] == 2 and not meta["completed"] and meta["method_state"]["replay"]["stage"] == 2
    resumed = ElleRun(cfg).run()
    np.testing.assert_allclose(resumed["matrix"], reference["matrix"], rtol=1e-5)
    np.testing.assert_allclose(resumed["train_flops"], reference["train_flops"], rtol=1e-9)
    assert resumed["warmup_tokens"] == reference["warmup_tokens"]
    # Accounting sums the three invocations; what an interrupted one logged after its checkpoint (stage 1's
    # warmup before the first SIGTERM) was dropped on resume and redone once.
    assert len(resumed["invocations"]) == 3
    assert resumed["wall_seconds"] == pytest.approx(sum(i["wall_seconds"] for i in resumed["invocations"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["kind"], r["stage"], r["step"]) for r in records if r["kind"] in ("train", "warmup")]
    assert len(steps) == len(set(steps)) and any(k == "warmup" for k, _, _ in steps)


@pytest.mark.parametrize("overrides, message", [
    (["elle.schedule=[{n_layers: 3}]"], "elle.schedule has 1 entries"),
    (["elle.schedule=[{n_layers: 1}, {n_layers: 3}]"], "n_layers"),
    (["elle.schedule=[{d_model: 80, n_heads: 3}, {n_layers: 3}]"], "d_model"),
    (["elle.micro_batches=3"], "elle.micro_batches=3"),
    (["model.num_prompts=3"], "model.num_prompts"),
    (["elle.replay_ratio=1.5"], "elle.replay_ratio"),
    (["elle.memory_fraction=0"], "elle.memory_fraction"),
])
def test_bad_elle_configs_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        ElleRun(load_config(ROOT / "configs/elle/demo.yaml", TINY_ELLE + overrides + [f"run.dir={tmp_path}"]))


@pytest.mark.parametrize("name", ["demo", "paper_gpt", "paper_bert"])
def test_elle_configs_load_and_their_schedules_grow(name):
    """Every shipped ELLE config resolves, and its growth schedule is valid end to end (sizes only)."""
    cfg = load_config(ROOT / f"configs/elle/{name}.yaml")
    assert cfg.run.method == "elle" and len(cfg.elle.schedule) == 4
    flops = planned_stage_flops(cfg, 5)
    assert all(f > 0 for f in flops)
    if name.startswith("paper"):     # the paper's GPT/BERT-base schedule ends at L12/D768/H12/F3072
        from jaxcl.elle.run import target_sizes
        from jaxcl.transforms import grown_config
        model = cfg.model
        for target in cfg.elle.schedule:
            model = grown_config(model, method="elle", **target_sizes(target))
        assert (model.n_layers, model.d_model, model.n_heads, model.d_ff) == (12, 768, 12, 3072)


def test_training_flops_per_token_golden():
    # attention 4*32*32, MLP 2*32*128, logits 32*61; scores+values 4 * layers * context * 32
    cfg = ModelConfig(family="gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=32)
    assert cfg.train_flops_per_token(16) == 3 * (2 * (2 * (4096 + 8192) + 1952) + 4 * 2 * 16 * 32)
    llama = ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)
    # q,o: 32*32 each; k,v: 32*16 each; SwiGLU: 3*32*64
    assert llama.train_flops_per_token(8) == 3 * (2 * (2048 + 1024 + 6144 + 32 * 61) + 4 * 1 * 8 * 32)


def test_generate_with_an_elle_domain_prompt(elle_run, capsys):
    """An ELLE run decodes with the backbone, or with a trained domain's prompt (`--domain`): the same tokens as
    the full forward with that prompt; a domain whose prompt a stage-0 checkpoint has not trained is refused."""
    from jaxcl import cli
    from jaxcl.generate import generate, positions_from_mask
    from jaxcl.inference import open_decoder
    from jaxcl.models import build

    _, _, run_dir, _ = elle_run
    dec = open_decoder(str(run_dir))
    assert dec.domains == ("bible", "manpages", "pydoc") and dec.trained_domains == 3
    ids = np.asarray([[5, 17, 230, 41], [0, 0, 88, 9]])
    mask = (np.arange(4)[None] >= np.asarray([[0], [2]])).astype(np.int32)
    state, routed = dec.state_for(["a", "b"], "manpages")
    assert routed == ["manpages", "manpages"] and state["prompt_ids"].tolist() == [1, 1]
    out = generate(dec.model_cfg, dec.params, ids, mask, max_new_tokens=6, eos_token_id=[], **state)
    seq = np.concatenate([ids, np.asarray(out.tokens)], 1)
    full_mask = np.concatenate([mask, np.ones((2, 6), np.int32)], 1)
    logits = build(dec.model_cfg).apply({"params": dec.params}, seq, full_mask,
                                        positions=positions_from_mask(full_mask), prompt_ids=state["prompt_ids"]).logits
    np.testing.assert_array_equal(np.asarray(logits[:, 3:-1].argmax(-1)), np.asarray(out.tokens))
    capsys.readouterr()
    assert cli.main(["generate", str(run_dir), "--domain", "pydoc", "--prompt", "The", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert cli.main(["generate", f"{run_dir}@stage0", "--domain", "pydoc", "--prompt", "The"]) == 2
    assert "not trained at this checkpoint" in capsys.readouterr().err
    assert cli.main(["generate", str(run_dir), "--domain", "nope", "--prompt", "The"]) == 2
    assert "not a domain of this run" in capsys.readouterr().err
