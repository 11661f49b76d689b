"""Bring your own model: runs start from a pretrained checkpoint (`model.init_from`) with its tokenizer, and
`jaxcl export` gives the result back as a Hugging Face checkpoint that transformers loads with the same logits.

Checkpoints are made here with transformers (random weights) and a BPE tokenizer trained here on the embedded
corpus, different from the shipped one, so using the checkpoint's tokenizer is observable.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from torch_models import build_hf_model, torch, transformers

from jaxcl import cli
from jaxcl.config import ConfigError, load_config
from jaxcl.data.sources import open_source
from jaxcl.hf import load_pretrained
from jaxcl.models import build

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
SMALL = ["data.seq_len=32", "data.batch_size=8", "data.eval_batches=1", "data.domains=[bible,wordnet]",
         "train.pretrain_steps=3", "train.steps=3", "train.log_every=1", "optim.warmup_steps=1",
         "checkpoint.every=2", "checkpoint.async_save=false"]
EVAL_DATA = ("data.seq_len=32", "data.batch_size=8", "data.eval_batches=1", "data.domains=[bible,wordnet]")
SPECIALS = {"gpt2": ["<|endoftext|>"], "llama": ["<unk>", "<s>", "</s>"],
            "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}
FAMILIES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama-gqa": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, tie_word_embeddings=False),
    "llama-tied": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                       intermediate_size=48, tie_word_embeddings=True),
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 max_position_embeddings=64),
}


def train_tokenizer(family: str, vocab: int = 300):
    """A byte-level BPE of `vocab` tokens trained on a slice of the embedded corpus (not the shipped one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    source = open_source("embedded")
    texts = source.documents("bible", "train")[:300] + source.documents("wordnet", "train")[:300]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS[family],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def hf_tokenizer(family: str, tok):
    special = {"gpt2": dict(eos_token="<|endoftext|>", bos_token="<|endoftext|>"),
               "llama": dict(eos_token="</s>", bos_token="<s>", unk_token="<unk>"),
               "bert": dict(sep_token="[SEP]", cls_token="[CLS]", pad_token="[PAD]", mask_token="[MASK]",
                            unk_token="[UNK]")}[family]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One HF directory (model + its own tokenizer) per family case, written by transformers."""
    out = {}
    for name, kwargs in FAMILIES.items():
        family = name.split("-")[0]
        tok = train_tokenizer(family)
        vocab = tok.get_vocab_size()
        directory = tmp_path_factory.mktemp(name)
        ids = {"gpt2": dict(bos_token_id=0, eos_token_id=0),
               "llama": dict(bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>")),
               "bert": dict(pad_token_id=0)}[family]
        model = build_hf_model(family, dict(kwargs, vocab_size=vocab, **ids), seed=len(name))
        model.save_pretrained(directory)
        hf_tokenizer(family, tok).save_pretrained(directory)
        out[name] = directory
    return out


@pytest.fixture(scope="module")
def demo_run(checkpoints, tmp_path_factory):
    """`jaxcl run configs/demo.yaml` (SMALL) from a checkpoint, made once per checkpoint; the tests only read it."""
    runs = {}

    def get(name: str) -> Path:
        if name not in runs:
            run_dir = tmp_path_factory.mktemp(f"run-{name}") / "run"
            run("run", DEMO, f"model.init_from={checkpoints[name]}", f"run.dir={run_dir}", *SMALL)
            runs[name] = run_dir
        return runs[name]

    return get


@pytest.fixture(scope="module")
def hf_eval(tmp_path_factory):
    """`jaxcl eval configs/demo.yaml ARGS --hf HF_DIR`'s per-domain results, evaluated once per (HF_DIR, ARGS)."""
    results = {}

    def get(hf_dir: Path, *args: str) -> dict:
        if (hf_dir, args) not in results:
            out = tmp_path_factory.mktemp("eval")
            run("eval", DEMO, *args, f"run.dir={out}", "--hf", str(hf_dir))
            results[hf_dir, args] = json.loads((out / "eval.json").read_text())["domains"]
        return results[hf_dir, args]

    return get


def run(*args):
    code = cli.main(list(args))
    assert code == 0, f"jaxcl {' '.join(args)} exited with {code}"


def transformers_nll(directory: Path, sequences: np.ndarray) -> float:
    """Mean next-token NLL of packed sequences under transformers' own model and loss."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        out = model(torch.as_tensor(sequences, dtype=torch.long), labels=torch.as_tensor(sequences, dtype=torch.long))
    return float(out.loss)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-tied"])
def test_run_starts_from_the_checkpoint_with_its_tokenizer_and_exports_it_back(checkpoints, demo_run, hf_eval,
                                                                             tmp_path, name):
    hf_dir = checkpoints[name]
    cfg = load_config(DEMO, [f"model.init_from={hf_dir}", *SMALL])
    assert cfg.model == load_pretrained(hf_dir)[0]            # the architecture is the checkpoint's
    run_dir = demo_run(name)        # `jaxcl run DEMO model.init_from=HF_DIR SMALL`
    report = json.loads((run_dir / "report.json").read_text())
    from test_tensorboard import read_scalars
    tags = {t for t, _, _ in read_scalars(run_dir / "tensorboard")}
    assert {"train/loss", "eval/perplexity/bible", "eval/perplexity/wordnet"} <= tags

    # Stage 0 starts from the checkpoint: its evaluation equals `jaxcl eval --hf` and transformers' loss.
    from jaxcl.train.loop import ContinualRun
    runner = ContinualRun(cfg)
    assert runner.tokenizer.vocab_size == 300 and runner.tokenizer_spec == str(hf_dir.resolve())
    evaluated = hf_eval(hf_dir, *SMALL)
    for d, ppl in zip(report["eval_on"], report["initial_perplexity"]):
        assert ppl == pytest.approx(evaluated[d]["perplexity"], rel=1e-5)
        reference = transformers_nll(hf_dir, runner.valid_sequences[d][:8])
        assert math.log(ppl) == pytest.approx(reference, abs=1e-4)

    # Export: transformers and AutoTokenizer load it; logits equal jaxcl's forward of the final model.
    out = tmp_path / "export"
    run("export", str(run_dir), str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "In the beginning God created the heaven and the earth."
    ids = runner.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    from jaxcl.models import ModelConfig
    from jaxcl.train.checkpoint import complete_steps, read_meta, restore_params
    from jaxcl.models import abstract_params
    steps = complete_steps(run_dir / "checkpoints")
    meta = read_meta(run_dir / "checkpoints", steps[-1])
    assert meta["completed"] and meta["stage"] == 1
    final_cfg = ModelConfig.from_dict(meta["model"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = abstract_params(final_cfg)
    params = restore_params(run_dir / "checkpoints", steps[-1], shapes, jax.tree.map(lambda _: device, shapes))
    ours = np.asarray(build(final_cfg).apply({"params": params}, jnp.asarray([ids])).logits)
    with torch.no_grad():
        theirs = model(torch.as_tensor([ids])).logits.numpy()
    assert np.abs(ours).max() > 0.1
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # The trained model moved away from the checkpoint (the export is the run's model, not the input's).
    start = load_pretrained(hf_dir)[1]
    assert not np.allclose(np.asarray(build(final_cfg).apply({"params": start}, jnp.asarray([ids])).logits), ours)

    if name != "gpt2":        # the run-directory source is family-independent: tested once
        return
    # A run directory as init_from continues from its checkpoint (the model after stage 0 here).
    stage0 = load_config(DEMO, [f"model.init_from={run_dir}@stage0", *SMALL])
    assert stage0.model == final_cfg and stage0.init_from == f"{run_dir.resolve()}@3"     # pinned: stage 0 ends at 3
    again = tmp_path / "again"
    run("run", DEMO, f"model.init_from={run_dir}@stage0", f"run.dir={again}", *SMALL)
    first_row = json.loads((again / "report.json").read_text())["initial_perplexity"]
    assert first_row == pytest.approx(report["matrix"][0], rel=1e-5)     # = the source run after stage 0
    exported0 = tmp_path / "export0"
    run("export", str(run_dir), str(exported0), "--stage", "0")
    assert json.loads((exported0 / "jaxcl_export.json").read_text())["stage"] == 0


def test_bert_checkpoint_runs_with_mlm_and_exports_for_masked_lm(checkpoints, tmp_path):
    hf_dir = checkpoints["bert"]
    run_dir = tmp_path / "run"
    run("run", DEMO, f"model.init_from={hf_dir}", "train.objective=mlm", f"run.dir={run_dir}", *SMALL)
    report = json.loads((run_dir / "report.json").read_text())
    run("eval", DEMO, "train.objective=mlm", *SMALL, f"run.dir={tmp_path / 'eval'}", "--hf", str(hf_dir))
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["domains"]
    # transformers' own MLM loss on the same tokens: jaxcl evaluates with a fixed masking key, reproduced here.
    from jaxcl.train.loop import ContinualRun
    from jaxcl.train.losses import mask_tokens
    runner = ContinualRun(load_config(DEMO, [f"model.init_from={hf_dir}", "train.objective=mlm", *SMALL]))
    reference = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    for d, ppl in zip(report["eval_on"], report["initial_perplexity"]):
        assert ppl == pytest.approx(evaluated[d]["perplexity"], rel=1e-5)
        seqs = runner.valid_sequences[d][:8]
        corrupted, _, chosen = mask_tokens(jax.random.key(0), jnp.asarray(seqs), jnp.ones(seqs.shape, jnp.int32),
                                           vocab_size=runner.cfg.model.vocab_size, mask_token_id=runner.tokenizer.mask_id)
        labels = np.where(np.asarray(chosen), seqs, -100)
        with torch.no_grad():
            loss = reference(input_ids=torch.as_tensor(np.asarray(corrupted), dtype=torch.long),
                             labels=torch.as_tensor(labels, dtype=torch.long)).loss
        assert math.log(ppl) == pytest.approx(float(loss), abs=1e-4)
    out = tmp_path / "export"
    run("export", str(run_dir), str(out))
    model = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.mask_token == "[MASK]"
    cfg, params = load_pretrained(out)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
    ours = np.asarray(build(cfg).apply({"params": params}, jnp.asarray(ids)).logits)
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_elle_starts_from_the_checkpoint_and_exports_the_grown_model_with_its_prompts(checkpoints, hf_eval, tmp_path):
    hf_dir = checkpoints["gpt2"]
    elle = str(ROOT / "configs" / "elle" / "demo.yaml")
    overrides = [f"model.init_from={hf_dir}", *SMALL, "elle.schedule=[{d_model: 48, n_heads: 6, n_layers: 3}]",
                 "elle.warmup_steps=1", "elle.micro_batches=2", "elle.adaptive_every=0"]
    run_dir = tmp_path / "run"
    run("run", elle, *overrides, f"run.dir={run_dir}")
    report = json.loads((run_dir / "report.json").read_text())
    assert [a["d_model"] for a in report["architectures"]] == [32, 48]     # grows from the loaded size
    evaluated = hf_eval(hf_dir, *SMALL)
    assert report["initial_perplexity"] == pytest.approx([evaluated[d]["perplexity"] for d in report["eval_on"]],
                                                         rel=1e-5)
    out = tmp_path / "export"
    run("export", str(run_dir), str(out))
    cfg, _ = load_pretrained(out)
    assert (cfg.d_model, cfg.n_layers, cfg.num_prompts) == (48, 3, 0)
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["rows"] == {"bible": [0, 1], "wordnet": [1, 2]}
    from safetensors.numpy import load_file
    assert load_file(out / "prompts.safetensors")["prompt_embed"].shape == (2, 48)
    # The exported backbone is the grown model: transformers' logits equal jaxcl's for the final checkpoint
    # without prompt ids (the backbone computes exactly that).
    from jaxcl.models import ModelConfig, abstract_params, without_prompts
    from jaxcl.train.checkpoint import complete_steps, read_meta, restore_params
    step = complete_steps(run_dir / "checkpoints")[-1]
    final_cfg = ModelConfig.from_dict(read_meta(run_dir / "checkpoints", step)["model"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = abstract_params(final_cfg)
    final = restore_params(run_dir / "checkpoints", step, shapes, jax.tree.map(lambda _: device, shapes))
    backbone_cfg, backbone = without_prompts(final_cfg, final)
    ids = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 10))
    ours = np.asarray(build(backbone_cfg).apply({"params": backbone}, jnp.asarray(ids)).logits)
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # A run directory of ELLE as init_from continues from its grown size (prompts are the new run's own).
    cfg2 = load_config(elle, [f"model.init_from={run_dir}", *SMALL, "elle.schedule=[]"])
    assert (cfg2.model.d_model, cfg2.model.n_layers, cfg2.model.num_prompts) == (48, 3, 0)


# ----------------------------------------------------------------------------- bad input: one line each
def test_bad_init_from_and_export_inputs_are_one_line_errors(checkpoints, tmp_path, capsys):
    hf_dir = checkpoints["gpt2"]
    cases = [
        (["run", DEMO, f"model.init_from={tmp_path / 'nope'}"], "does not exist"),
        (["run", DEMO, f"model.init_from={tmp_path}"], "is neither a Hugging Face checkpoint"),
        (["run", DEMO, f"model.init_from={hf_dir}", "model.d_model=64"],
         "model.d_model=64 was given on the command line, but the checkpoint"),
        (["run", DEMO, f"model.init_from={hf_dir}", "data.tokenizer=default", f"run.dir={tmp_path / 'r'}"],
         "has 8192 tokens, but the model's embedding table has model.vocab_size=300"),
        (["export", str(tmp_path / "nope"), str(tmp_path / "o")], "does not exist"),
        (["export", str(hf_dir), str(tmp_path / "o")], "is not a jaxcl run directory"),
    ]
    for args, message in cases:
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_export_stage_and_task_errors(checkpoints, demo_run, tmp_path, capsys):
    run_dir = demo_run("gpt2")      # `jaxcl run DEMO model.init_from=<gpt2> SMALL`, shared with the test above
    capsys.readouterr()
    for args, message in ((["--stage", "2"], "--stage 2 is out of range: the run has stages 0..1"),
                          (["--task", "x"], "--task 'x': tasks belong to SLM runs")):
        assert cli.main(["export", str(run_dir), str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert cli.main(["export", str(run_dir), str(tmp_path / "busy")]) == 2
    assert "holds files jaxcl did not write there (notes.txt" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    # An unchanged explicit override that agrees with the checkpoint is fine; non-architecture keys apply.
    cfg = load_config(DEMO, [f"model.init_from={checkpoints['gpt2']}", "model.d_model=32", "model.dropout=0.1"])
    assert cfg.model.d_model == 32 and cfg.model.dropout == 0.1
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(DEMO, [f"model.init_from={checkpoints['gpt2']}", "model.bogus=1"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    # Recorded as resolved: an absolute source and the tokenizer it gave, not "auto".
    assert saved["model"]["init_from"] == str(checkpoints["gpt2"].resolve())
    assert saved["data"]["tokenizer"] == str(checkpoints["gpt2"].resolve())
    # A source without a fast tokenizer: "auto" refuses to fall back to the shipped one.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((checkpoints["gpt2"] / name).read_bytes())
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        load_config(DEMO, [f"model.init_from={bare}"])
    assert load_config(DEMO, [f"model.init_from={bare}", f"data.tokenizer={checkpoints['gpt2']}"]).model.vocab_size == 300


def test_semem_freezes_the_loaded_model(checkpoints, hf_eval, tmp_path):
    hf_dir = checkpoints["llama-gqa"]
    semem = str(ROOT / "configs" / "semem" / "demo.yaml")
    overrides = [f"model.init_from={hf_dir}", "data.seq_len=32", "data.batch_size=8", "data.eval_batches=1",
                 "data.domains=[bible,wordnet]", "semem.chunk_tokens=512",
                 "semem.chunks_per_domain=2", "semem.heldout_tokens=128", "semem.eval_tokens=256",
                 "semem.calibrator_steps=5", "semem.extra_models=[]", "semem.sweep=[]", "semem.random_control=false",
                 "semem.stream_source=null"]
    run_dir = tmp_path / "run"
    run("run", semem, *overrides, f"run.dir={run_dir}")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["init_from"] == str(hf_dir)
    assert not list(run_dir.glob("pretrain-*"))          # nothing was pre-trained
    evaluated = hf_eval(hf_dir, *EVAL_DATA)
    assert report["initial_perplexity"] == pytest.approx([evaluated[d]["perplexity"] for d in report["eval_on"]],
                                                         rel=1e-5)
    assert report["memory"][-1]["memory_size"] > 0
    stores = [p for p in run_dir.rglob("manifest.json")]
    assert stores and all(json.loads(p.read_text())["dim"] == 32 for p in stores)


def test_pretraining_is_one_cached_run_of_the_shared_loop(tmp_path):
    import dataclasses

    from jaxcl.train.pretrain import pretrain

    tiny = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
            *SMALL]
    cfg = load_config(DEMO, tiny)
    first = pretrain(cfg, cfg.model, ("bible",), tmp_path, "m")
    report = json.loads((first / "report.json").read_text())
    assert report["method"] == "sequential" and report["stages"] == ["bible"]
    assert yaml.safe_load((first / "config.yaml").read_text())["data"]["domains"] == ["bible"]
    before = (first / "report.json").stat().st_mtime_ns
    # Where it lives, how it is saved and logged: the same pre-training, reused untouched.
    same = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="other"),
                               checkpoint=dataclasses.replace(cfg.checkpoint, every=1),
                               train=dataclasses.replace(cfg.train, log_every=2))
    assert pretrain(same, same.model, ("bible",), tmp_path, "m") == first
    assert (first / "report.json").stat().st_mtime_ns == before
    # What is trained changes: a new run.
    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * 2))
    assert pretrain(other, other.model, ("bible",), tmp_path, "m") != first
    # The result is an init_from source like any checkpoint.
    loaded = load_config(DEMO, [f"model.init_from={first}", *SMALL])
    assert loaded.model == cfg.model


@pytest.mark.parametrize("name,targets", [("gpt2", "[attn.q,attn.v,attn.o,mlp.wi]"),
                                          ("llama-gqa", "[attn.o,mlp.wg,mlp.wo]")])
def test_slm_lm_mode_uses_the_checkpoint_as_backbone_and_exports_peft_adapters(checkpoints, hf_eval, tmp_path, name,
                                                                             targets):
    peft = pytest.importorskip("peft")
    hf_dir = checkpoints[name]
    config = str(ROOT / "configs" / "slm" / "demo_lm.yaml")
    run_dir = tmp_path / "run"
    run("run", config, f"model.init_from={hf_dir}", "data.seq_len=32", "data.batch_size=8", "data.eval_batches=1",
        "data.domains=[bible,wordnet]", "slm.train_examples=32", "slm.steps=4", "slm.max_len=32", "slm.key_epochs=1",
        "slm.lr=5e-2", "slm.baselines=[]", f"slm.targets={targets}", f"slm.cache_dir={tmp_path / 'cache'}",
        f"run.dir={run_dir}")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["backbone"] == str(hf_dir) and not list(run_dir.glob("pretrain-*"))
    evaluated = hf_eval(hf_dir, *EVAL_DATA)
    assert report["initial_perplexity"] == pytest.approx([evaluated[d]["perplexity"] for d in report["eval_on"]],
                                                         rel=1e-5)
    weights = report["task_mixing_weights"]
    assert set(weights) == {"bible", "wordnet"} and all(len(w["slots"]) == 4 for w in weights.values())
    assert all(abs(sum(w["weights"]) - 1.0) < 1e-5 for w in weights.values())    # a mean of convex mixtures

    out = tmp_path / "export"
    run("export", str(run_dir), str(out))
    from safetensors.numpy import load_file
    from jaxcl.slm import jare
    state = load_file(run_dir / "slm_state.safetensors")
    cfg, params = load_pretrained(out)
    bank = {t: {"down": jnp.asarray(state[f"bank/{t}/down"]), "up": jnp.asarray(state[f"bank/{t}/up"])}
            for t in targets.strip("[]").split(",")}
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 10))
    base = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        plain = base(torch.as_tensor(ids)).logits.numpy()
    for task in ("bible", "wordnet"):
        slots = jnp.asarray([weights[task]["slots"]], jnp.int32)
        w = jnp.asarray([weights[task]["weights"]], jnp.float32)
        ours = np.asarray(build(cfg).apply({"params": params}, jnp.asarray(ids),
                                           adapters=jare.mix_adapters(bank, slots, w)).logits)
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out),
                                               out / "adapters" / task).eval()
        with torch.no_grad():
            theirs = model(torch.as_tensor(ids)).logits.numpy()
        assert np.abs(ours - plain).max() > 1e-3            # the adapter changes the model: the test can fail
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # One task only; an unknown task and --stage are one-line errors.
    run("export", str(run_dir), str(tmp_path / "one"), "--task", "wordnet")
    assert [p.name for p in (tmp_path / "one" / "adapters").iterdir()] == ["wordnet"]
    assert cli.main(["export", str(run_dir), str(tmp_path / "x"), "--task", "nope"]) == 2
    assert cli.main(["export", str(run_dir), str(tmp_path / "x"), "--stage", "0"]) == 2


def test_slm_classification_starts_from_the_bert_checkpoint(checkpoints, tmp_path, capsys):
    hf_dir = checkpoints["bert"]
    config = str(ROOT / "configs" / "slm" / "demo.yaml")
    small = ["slm.tasks=[wordnet_pos,bible_books]", "slm.train_examples=16", "slm.eval_examples=8", "slm.steps=4",
             "slm.lr=5e-2", "slm.targets=[attn.q,attn.o,mlp.wo]",
             "slm.max_len=32", "slm.key_epochs=1", "slm.groups=4", "slm.baselines=[]", "slm.cache_dir=null",
             "slm.query_layers=[1,2]"]
    run_dir = tmp_path / "run"
    run("run", config, f"model.init_from={hf_dir}", *small, f"run.dir={run_dir}")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["backbone"] == str(hf_dir.resolve()) and len(report["matrix"]) == 2

    # Export: the encoder for AutoModel, one PEFT adapter + head per task, equal to jaxcl's mixed encoder.
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file
    from jaxcl.models import mean_pool
    from jaxcl.slm import jare
    out = tmp_path / "export"
    run("export", str(run_dir), str(out))
    state = json.loads((run_dir / "slm_state.json").read_text())
    tensors = load_file(run_dir / "slm_state.safetensors")
    cfg, params = load_pretrained(out)
    bank = {t: {"down": jnp.asarray(tensors[f"bank/{t}/down"]), "up": jnp.asarray(tensors[f"bank/{t}/up"])}
            for t in state["targets"]}
    rng = np.random.RandomState(2)
    ids, mask = rng.randint(5, cfg.vocab_size, (2, 12)), np.ones((2, 12), np.int64)
    mask[1, 8:] = 0
    with torch.no_grad():
        plain = transformers.AutoModel.from_pretrained(out).eval()(
            input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()
    for task, info in state["tasks"].items():
        mix = jare.mix_adapters(bank, jnp.asarray([info["slots"]]), jnp.asarray([info["weights"]], jnp.float32))
        hidden = build(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), adapters=mix).hidden
        model = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(out),
                                               out / "adapters" / task).eval()
        with torch.no_grad():
            theirs = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()
        real = mask.astype(bool)
        assert np.abs(np.asarray(hidden)[real] - plain[real]).max() > 1e-3      # the adapter matters
        np.testing.assert_allclose(theirs[real], np.asarray(hidden)[real], atol=1e-4, rtol=0)
        head = load_file(out / "adapters" / task / "head.safetensors")
        pooled = np.asarray(mean_pool(jnp.asarray(theirs), jnp.asarray(mask)))
        ours = np.asarray(mean_pool(hidden, jnp.asarray(mask))) @ tensors["head/kernel"] + tensors["head/bias"]
        np.testing.assert_allclose(pooled @ head["kernel"] + head["bias"], ours[:, info["columns"]], atol=1e-4)
        assert json.loads((out / "adapters" / task / "head.json").read_text())["labels"] == info["labels"]
    capsys.readouterr()
    assert cli.main(["run", config, f"model.init_from={hf_dir}", "slm.encoder=minilm_other", *small,
                     f"run.dir={tmp_path / 'x'}"]) == 2
    assert "name two different backbones" in capsys.readouterr().err
