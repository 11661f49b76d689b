"""The bad-input battery: every `jaxcl` command, given malformed input, fails the way docs/reliability.md promises.

Each case runs the real command line (`jaxcl.cli.main`, in this process: most cases need no training) on inputs
built here, and asserts
- exit status 2 and no traceback (an uncaught exception would fail the test itself);
- exactly one line of stderr says `jaxcl COMMAND: error: ...`, it is the last line (no progress bar drawn after
  it), and it names the offending key, path, line or tensor (the case's `expect` substrings);
- every file the user already had, and every byte of every store or run, is unchanged, and nothing new was
  written beside them (the case's whole directory and the shared fixtures are compared byte for byte).
A few cases also run as a separate process (`test_*_as_a_process`), where a traceback would be printed.

Cases are registered per kind of input (`KINDS`); `test_the_battery_covers_every_kind` keeps the counts that
docs/reliability.md reports honest.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest

from jaxcl import cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
         "data.seq_len=32", "data.batch_size=8", "data.eval_batches=1", "data.domains=[bible,manpages]",
         "train.pretrain_steps=2", "train.steps=2", "train.log_every=1", "optim.warmup_steps=1",
         "checkpoint.every=2", "checkpoint.async_save=false"]
KINDS = ("config file", "override", "data source", "tokenizer", "HF checkpoint", "orbax checkpoint", "run directory",
         "datastore", "output path", "generate", "downstream", "command line")


# ----------------------------------------------------------------------------- shared fixtures
class World:
    """Inputs built once per module: a trained tiny run, a tiny HF checkpoint, a datastore, a data directory."""

    def __init__(self, root: Path):
        self.root = root
        self.run = root / "run"
        self.hf = root / "hf"
        self.store = root / "store"
        self.data = root / "data"


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` (hidden ones too): a file's bytes, None for a directory."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = Path(path).read_bytes() if not os.path.islink(path) else b"->"
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from jaxcl.data import corpus
    from jaxcl.hf import save_pretrained
    from jaxcl.memory import Datastore
    from jaxcl.models import ModelConfig, init_params

    w = World(tmp_path_factory.mktemp("world"))
    assert cli.main(["run", DEMO, *SMALL, f"run.dir={w.run}"]) == 0
    cfg = ModelConfig(family="gpt2", vocab_size=8192, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
    save_pretrained(w.hf, cfg, init_params(cfg, jax.random.key(0)))
    shutil.copyfile(corpus.default_tokenizer_path(), w.hf / "tokenizer.json")
    store = Datastore.create(str(w.store), dim=32, backend="exact")
    rng = np.random.default_rng(0)
    store.add(rng.normal(size=(300, 32)).astype(np.float32), rng.integers(0, 8192, 300).astype(np.int32))
    w.data.mkdir()
    text = corpus.load_text("bible", "valid")
    for split, part in (("train", text[:60_000]), ("valid", text[60_000:80_000]), ("test", text[80_000:90_000])):
        (w.data / f"alpha.{split}.txt").write_text(part)
    w.snapshot = {name: _snapshot(getattr(w, name)) for name in ("run", "hf", "store", "data")}
    return w


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- the registry
Case = collections.namedtuple("Case", "kind name build")
CASES: list[Case] = []


def case(kind: str, name: str):
    """Register `build(world, tmp) -> (argv, expect)`: the command line and the substrings its error names."""
    assert kind in KINDS, kind

    def register(build: Callable):
        CASES.append(Case(kind, name, build))
        return build
    return register


def cases(kind: str, table: list[tuple]):
    """Register many `(name, build)` pairs of one kind."""
    for name, build in table:
        case(kind, name)(build)


def run_argv(tmp: Path, *overrides: str) -> list[str]:
    return ["run", DEMO, *SMALL, f"run.dir={tmp / 'run'}", *overrides]


# ----------------------------------------------------------------------------- config files
def _config_file(text: str | bytes, name: str = "c.yaml"):
    def build(w, tmp):
        path = tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["run", str(path), f"run.dir={tmp / 'run'}"], [str(path)]
    return build


BASES = f"base: [{ROOT / 'configs' / 'base.yaml'}, {ROOT / 'configs' / 'models' / 'gpt2_tiny.yaml'}]\n"
cases("config file", [
    ("missing", lambda w, tmp: (["run", str(tmp / "nope.yaml")], [str(tmp / "nope.yaml"), "not found"])),
    ("a directory", lambda w, tmp: (["run", str(tmp)], [str(tmp), "is a directory"])),
    ("mapping value where none may be", lambda w, tmp: _with_line(
        _config_file("model:\n  d_model: 64\n   n_layers: 2\n")(w, tmp), ":3:12:")),
    ("unclosed flow list", lambda w, tmp: _with_line(_config_file("data:\n  domains: [bible, jargon\n")(w, tmp), ":3:1:")),
    ("unclosed quote", lambda w, tmp: _with_line(_config_file('run:\n  name: "abc\n')(w, tmp), ":3:1:")),
    ("tab indentation", lambda w, tmp: _with_line(_config_file("run:\n\tname: x\n")(w, tmp), ":2:1:")),
    ("not UTF-8", lambda w, tmp: _with_line(_config_file(b"run:\n  name: caf\xe9\n")(w, tmp), "not UTF-8")),
    ("a list at the top", lambda w, tmp: _with_line(_config_file("- a\n- b\n")(w, tmp), "mapping at the top level")),
    ("empty file", lambda w, tmp: _with_line(_config_file("")(w, tmp), "missing required config key model", drop=True)),
    ("unknown top-level key", lambda w, tmp: _with_line(_config_file(BASES + "trian:\n  steps: 3\n")(w, tmp),
                                                         "unknown config key(s): trian", drop=True)),
    ("unknown nested key", lambda w, tmp: _with_line(_config_file(BASES + "train:\n  stepz: 3\n")(w, tmp),
                                                      "train.stepz", drop=True)),
    ("missing base file", lambda w, tmp: _with_line(_config_file("base: nothere.yaml\n")(w, tmp), "nothere.yaml",
                                                     drop=True)),
    ("base includes itself", lambda w, tmp: _with_line(_config_file("base: c.yaml\n")(w, tmp), "includes itself",
                                                        drop=True)),
    ("section not a mapping", lambda w, tmp: _with_line(_config_file(BASES + "data: 5\n")(w, tmp),
                                                         "data must be a mapping", drop=True)),
    ("string where an integer belongs", lambda w, tmp: _with_line(
        _config_file(BASES + "model:\n  d_model: abc\n")(w, tmp), "model.d_model", drop=True)),
    ("boolean where an integer belongs", lambda w, tmp: _with_line(
        _config_file(BASES + "train:\n  steps: true\n")(w, tmp), "train.steps must be an integer", drop=True)),
    ("list of the wrong length", lambda w, tmp: _with_line(
        _config_file(BASES + "data:\n  train_documents: [0.5]\n")(w, tmp), "data.train_documents", drop=True)),
    ("a number that is not finite", lambda w, tmp: _with_line(
        _config_file(BASES + "optim:\n  lr: .inf\n")(w, tmp), "optim.lr must be a finite number", drop=True)),
    ("a key given twice", lambda w, tmp: _with_line(
        _config_file(BASES + "optim:\n  lr: 0.5\n  lr: 0.002\n")(w, tmp), ":4:3: key 'lr' is given twice (first on line 3)")),
    ("base not a file name", lambda w, tmp: _with_line(_config_file("base: [5]\n")(w, tmp), "base must be a file name")),
    ("a key that is a number", lambda w, tmp: _with_line(_config_file(BASES + "1: 2\n")(w, tmp),
                                                          "config key 1 is not a name", drop=True)),
    ("a symbolic-link loop", lambda w, tmp: (os.symlink(tmp / "loop2", tmp / "loop1") or
                                             os.symlink(tmp / "loop1", tmp / "loop2") or
                                             ["run", str(tmp / "loop1")], ["loop1"])),
])


def _with_line(built, expect: str, drop: bool = False):
    argv, names = built
    return argv, ([expect] if drop else names + [expect])


# ----------------------------------------------------------------------------- overrides (values and keys)
OVERRIDES = [
    ("train.stepz=3", "unknown config key(s): train.stepz"),
    ("train.steps=many", "train.steps must be an integer, got 'many'"),
    ("train.steps=0", "train.steps"),
    ("train.steps=-5", "train.steps"),
    ("train.log_every=0", "train.log_every"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.mlm_probability=1.5", "train.mlm_probability"),
    ("train.objective=rlhf", "train.objective"),
    ("data.seq_len=0", "data.seq_len must be at least 2, got 0"),
    ("data.seq_len=-5", "data.seq_len must be at least 2, got -5"),
    ("data.seq_len=1", "data.seq_len"),
    ("data.seq_len=100000", "data.seq_len=100000 exceeds model.max_seq_len"),
    ("data.batch_size=0", "data.batch_size must be at least 1"),
    ("data.batch_size=12", "data.batch_size=12 is not divisible by the data-parallel size 8"),
    ("data.eval_batches=0", "data.eval_batches must be at least 1"),
    ("data.domains=[bible,klingon]", "unknown domain 'klingon'"),
    ("data.domains=[bible,bible]", "data.domains lists a domain twice"),
    ("data.train_documents=[0.5,0.2]", "data.train_documents"),
    ("data.tokenizer=/no/such/tokenizer.json", "data.tokenizer='/no/such/tokenizer.json'"),
    ("data.source=/no/such/dir", "data.source='/no/such/dir'"),
    ("data.text_field=", "data.text_field is empty"),
    ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("optim.b1=1.5", "optim.b1"),
    ("optim.b2=-0.1", "optim.b2"),
    ("optim.eps=0", "optim.eps"),
    ("optim.clip_norm=0", "optim.clip_norm"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.every=-1", "checkpoint.every"),
    ("mesh.data=0", "mesh.data"),
    ("mesh.tensor=-2", "mesh.tensor"),
    ("mesh.fsdp=-1", "at most one axis may be -1 (of mesh.data, mesh.fsdp, mesh.tensor)"),
    ("mesh.dcn_data=0", "mesh.dcn_data must be >= 1 or -1"),
    ("mesh.data=3", "mesh"),
    ("model.d_model=0", "model.d_model"),
    ("model.family=mamba", "model.family"),
    ("run.name=", "run.name=''"),
    ("run.method=bogus", "run.method='bogus'"),
    ("run.seed=-1", "run.seed"),
    ("train.steps", "must look like key.path=value"),
    ("=5", "empty key"),
    ("train..steps=1", "empty key"),
    ("train.steps.x=1", "train.steps"),
    ("train.stage_steps=[1]", "train.stage_steps has 1 entries for 2 domains"),
    ("elle.memory_fraction=0", "elle.memory_fraction"),
    ("elle.replay_ratio=1", "elle.replay_ratio"),
    ("semem.k=0", "semem.k"),
    ("semem.lam=2", "semem.lam"),
    ("semem.test_tokens=-1", "semem.test_tokens must be >= 0, got -1"),
    ("slm.top_k=0", "slm.top_k"),
    ("slm.baselines=[bogus]", "slm.baselines"),
    ("slm.lr=0", "slm.lr"),
    ("data.batch_size=99999999999999999999", "data.batch_size=99999999999999999999 is too large"),
    ("model.max_seq_len=9999999999", "model.max_seq_len=9999999999 is too large"),
    ("model.rope_theta=-1", "model.rope_theta must be > 0"),
    ("run.strategies=[bogus]", "run.strategies: unknown strategy 'bogus'"),
    ("run.strategies=[os:path]", "run.strategies: 'os:path' is not a jaxcl.train.strategy.Strategy subclass"),
    ("run.strategies=[no.such.module:X]", "run.strategies: cannot import 'no.such.module:X'"),
    ("strategies.ewc.strength=-1", "strategies.ewc.strength must be >= 0, got -1.0"),
    ("strategies.lwf.temperature=0", "strategies.lwf.temperature must be > 0"),
    ("strategies.agem.memory_fraction=0", "strategies.agem.memory_fraction must be in (0, 1]"),
    ("strategies.replay.ratio=1", "strategies.replay.ratio must be in [0, 1)"),
    ("strategies.ewc.lambda=3", "unknown config key(s): strategies.ewc.lambda"),
    ("strategies.olora.strength=-0.5", "strategies.olora.strength must be >= 0, got -0.5"),
    ("slm.baselines=[agem]", "slm.baselines: unknown ['agem']"),
]
cases("override", [(o, (lambda o, e: lambda w, tmp: (run_argv(tmp, o), [e]))(o, e)) for o, e in OVERRIDES])


def _init_from(value: Callable[[World, Path], str], *expect: str):
    return lambda w, tmp: (run_argv(tmp, f"model.init_from={value(w, tmp)}"), [*expect])


def _file(tmp: Path) -> str:
    (tmp / "weights.bin").write_bytes(b"\0" * 64)
    return str(tmp / "weights.bin")


cases("override", [
    ("replay on an ELLE run", lambda w, tmp: (run_argv(tmp, "run.method=elle", "elle.micro_batches=8",
                                                        "run.strategies=[replay]"), ["replay on an ELLE run"])),
    ("A-GEM on a SeMem run", lambda w, tmp: (run_argv(tmp, "run.method=semem", "run.strategies=[agem]"),
                                             ["SeMem keeps its LM frozen"])),
    ("EWC on a joint run", lambda w, tmp: (["train", DEMO, *SMALL, f"run.dir={tmp / 'run'}", "run.strategies=[ewc]"],
                                           ["a joint run has one stage"])),
    ("O-LoRA on a full-parameter run", lambda w, tmp: (run_argv(tmp, "run.strategies=[olora]"),
                                                        ["olora needs SLM's per-task low-rank increments"])),
    ("strategies through run.strategies on SLM", lambda w, tmp: (
        run_argv(tmp, "run.method=slm", "run.strategies=[ewc]"), ["on SLM's path strategies are baseline rows"])),
    ("replay micro-batches", lambda w, tmp: (run_argv(tmp, "run.strategies=[replay]", "strategies.replay.micro_batches=3"),
                                             ["strategies.replay.micro_batches=3 must divide"])),
    ("an ELLE schedule that shrinks", lambda w, tmp: (
        run_argv(tmp, "run.method=elle", "elle.micro_batches=8", "elle.schedule=[{d_model: 16}]"),
        ["elle.schedule[0]", "shrink"])),
    ("init_from a file", _init_from(lambda w, tmp: _file(tmp), "is a file, not a checkpoint directory")),
    ("init_from missing", _init_from(lambda w, tmp: str(tmp / "nope"), "does not exist")),
    ("init_from RUN@-1", _init_from(lambda w, tmp: f"{w.run}@-1", "'@-1' selects no checkpoint")),
    ("init_from RUN@latest", _init_from(lambda w, tmp: f"{w.run}@latest", "'@latest' selects no checkpoint")),
    ("init_from RUN@999", _init_from(lambda w, tmp: f"{w.run}@999", "no checkpoint of step 999")),
    ("init_from RUN@stage9", _init_from(lambda w, tmp: f"{w.run}@stage9", "no checkpoint of the end of stage 9")),
    ("init_from HF@5", _init_from(lambda w, tmp: f"{w.hf}@5", "is a Hugging Face checkpoint")),
    ("init_from an unrelated directory", _init_from(lambda w, tmp: str(tmp), "is neither a Hugging Face checkpoint")),
    ("init_from with a clashing architecture key", lambda w, tmp: (
        ["run", DEMO, f"model.init_from={w.hf}", "model.d_model=48", f"run.dir={tmp / 'run'}"], ["model.d_model"])),
])


# ----------------------------------------------------------------------------- data sources
def _data(files: dict[str, bytes], *expect: str, field: str | None = None):
    """A data directory with domain `alpha` whose files are the world's, replaced by `files`."""
    def build(w, tmp):
        d = copy_of(w.data, tmp / "data")
        for name, data in files.items():
            for old in d.glob(name.split(".")[0] + "." + name.split(".")[1] + ".*"):
                old.unlink()
            (d / name).write_bytes(data)
        extra = [f"data.text_field={field}"] if field else []
        expect_ = [e.replace("{d}", str(d)) for e in expect]
        return run_argv(tmp, f"data.source={d}", "data.domains=[alpha]", *extra), expect_
    return build


TEXT = ("In the beginning was the word.\n\n\n" * 400).encode()
cases("data source", [
    ("txt not UTF-8", _data({"alpha.train.txt": TEXT[:500] + b"\n\xff\xfe bad\n" + TEXT},
                            "{d}/alpha.train.txt:", "not UTF-8")),
    ("jsonl not UTF-8", _data({"alpha.train.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n'},
                              "{d}/alpha.train.jsonl:2:", "not UTF-8")),
    ("jsonl line not JSON", _data({"alpha.train.jsonl": b'{"text": "ok"}\n{"text": oops}\n'},
                                  "{d}/alpha.train.jsonl:2:", "not JSON")),
    ("jsonl line a number", _data({"alpha.train.jsonl": b'{"text": "ok"}\n123\n'}, "{d}/alpha.train.jsonl:2:",
                                  "a int, not a JSON object")),
    ("jsonl line a list", _data({"alpha.train.jsonl": b'[1, 2]\n'}, "{d}/alpha.train.jsonl:1:", "a list")),
    ("jsonl without the text field", _data({"alpha.train.jsonl": b'{"body": "x"}\n'}, "{d}/alpha.train.jsonl:1:",
                                           "no field 'text'")),
    ("jsonl text a number", _data({"alpha.train.jsonl": b'{"text": 5}\n'}, "{d}/alpha.train.jsonl:1:",
                                  "is a int, not a string")),
    ("jsonl text_field another name", _data({"alpha.train.jsonl": b'{"text": "x"}\n'},
                                            "{d}/alpha.train.jsonl:1:", "no field 'body'", field="body")),
    ("txt.gz not gzip", _data({"alpha.train.txt.gz": TEXT}, "{d}/alpha.train.txt.gz", "not a complete gzip")),
    ("txt.gz truncated", _data({"alpha.train.txt.gz": gzip.compress(os.urandom(5000) + TEXT)[:3000]},
                               "{d}/alpha.train.txt.gz", "not a complete gzip")),
    ("txt.xz not xz", _data({"alpha.train.txt.xz": TEXT}, "{d}/alpha.train.txt.xz", "not a complete xz")),
    ("empty train split", _data({"alpha.train.txt": b""}, "{d}/alpha.train.txt", "holds no document")),
    ("blank valid split", _data({"alpha.valid.txt": b"\n\n\n\n"}, "{d}/alpha.valid.txt", "holds no document")),
    ("split shorter than a sequence", _data({"alpha.valid.txt": b"tiny"}, "alpha", "valid",
                                            "fewer than data.seq_len=32")),
    ("no train files", lambda w, tmp: (run_argv(tmp, f"data.source={tmp}"), ["has no <domain>.train.txt|jsonl"])),
    ("missing valid split", lambda w, tmp: _drop_split(w, tmp, "valid")),
    ("data.source a file", lambda w, tmp: (run_argv(tmp, f"data.source={_file(tmp)}"), ["directory not found"])),
    ("jsonl of blank texts", _data({"alpha.train.jsonl": b'{"text": ""}\n{"text": " "}\n{"text": "\\n\\t"}\n' * 50},
                                   "{d}/alpha.train.jsonl", "holds no document")),
    ("a txt and a jsonl for one split", lambda w, tmp: _both_files(w, tmp)),
    ("datasets directory with a damaged dataset_dict.json", lambda w, tmp: _datasets(tmp, "broken")),
    ("datasets directory without a domain column", lambda w, tmp: _datasets(tmp, "no domain")),
    ("datasets directory with a null text", lambda w, tmp: _datasets(tmp, "null text")),
])


cases("data source", [
    ("data.on_bad_document unknown", lambda w, tmp: (run_argv(tmp, "data.on_bad_document=ignore"),
                                                     ["data.on_bad_document must be error or skip"])),
    ("data.mixture weight below zero", lambda w, tmp: (run_argv(tmp, "data.mixture={manpages: {bible: -1}}"),
                                                       ["data.mixture.manpages", ">= 0"])),
    ("data.mixture of a stage the run lacks", lambda w, tmp: (run_argv(tmp, "data.mixture={pydoc: {bible: 1}}"),
                                                              ["data.mixture.pydoc: not a stage"])),
    ("data.cache under a file", lambda w, tmp: (run_argv(tmp, f"data.cache={_file(tmp)}/tokens"), [str(tmp)])),
    ("prepare with an unknown split", lambda w, tmp: (["prepare", DEMO, "--splits", "train,dev"],
                                                      ["--splits", "train, valid, test"])),
    ("prepare of a missing source", lambda w, tmp: (["prepare", DEMO, f"data.source={tmp / 'nope'}"],
                                                    ["data.source=", "directory not found"])),
    ("prepare with processes below zero", lambda w, tmp: (["prepare", DEMO, "--processes", "-1"],
                                                          ["data.prepare_processes must be at least 0"])),
])


def _both_files(w, tmp):
    d = copy_of(w.data, tmp / "data")
    (d / "alpha.train.jsonl").write_text('{"text": "x"}\n')
    return run_argv(tmp, f"data.source={d}", "data.domains=[alpha]"), ["alpha.train.jsonl, alpha.train.txt",
                                                                        "keep one"]


def _datasets(tmp: Path, damage: str):
    import datasets

    text = ["In the beginning. " * 40] * 4
    rows = {"text": [None] + text[1:] if damage == "null text" else text, "domain": ["alpha"] * 4}
    if damage == "no domain":
        rows["dom"] = rows.pop("domain")
    d = tmp / "hfdata"
    datasets.DatasetDict({split: datasets.Dataset.from_dict(rows) for split in ("train", "validation", "test")}
                         ).save_to_disk(str(d))
    if damage == "broken":
        (d / "dataset_dict.json").write_text("{oops")
    expect = {"broken": "is not a readable datasets directory", "no domain": "has no column 'domain'",
              "null text": "row 0: 'text' is NoneType, not a string"}[damage]
    return run_argv(tmp, f"data.source={d}", "data.domains=[alpha]"), [str(d), expect]


def _drop_split(w, tmp, split):
    d = copy_of(w.data, tmp / "data")
    (d / f"alpha.{split}.txt").unlink()
    return run_argv(tmp, f"data.source={d}", "data.domains=[alpha]"), [f"no file for domain 'alpha' split '{split}'"]


# ----------------------------------------------------------------------------- tokenizers
def _tokenizer(data: bytes | None, *expect: str, name: str = "tokenizer.json"):
    def build(w, tmp):
        path = tmp / name
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
        return run_argv(tmp, f"data.tokenizer={path}"), [e.replace("{p}", str(path)) for e in expect]
    return build


def _shipped_tokenizer() -> bytes:
    from jaxcl.data import corpus

    return Path(corpus.default_tokenizer_path()).read_bytes()


def _no_eos_tokenizer() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


cases("tokenizer", [
    ("truncated tokenizer.json", lambda w, tmp: _tokenizer(_shipped_tokenizer()[:5000], "{p}",
                                                           "is not a tokenizers tokenizer.json")(w, tmp)),
    ("wrong schema", _tokenizer(b'{"foo": 1}', "{p}", "is not a tokenizers tokenizer.json")),
    ("not UTF-8", _tokenizer(b'{"version": "1.0", "x": "\xff"}', "{p}", "is not a tokenizers tokenizer.json")),
    ("empty file", _tokenizer(b"", "{p}", "is not a tokenizers tokenizer.json")),
    ("a directory without tokenizer.json", _tokenizer(None, "not found", name="tokdir")),
    ("no end-of-text token", lambda w, tmp: _tokenizer(_no_eos_tokenizer(), "{p}", "end-of-text")(w, tmp)),
    ("larger than the model's vocabulary", lambda w, tmp: (
        run_argv(tmp, f"data.tokenizer={w.hf / 'tokenizer.json'}", "model.vocab_size=100"), ["8192 tokens"])),
])


# ----------------------------------------------------------------------------- Hugging Face checkpoints
def _hf(damage: Callable[[Path], None]):
    def make(w, tmp) -> Path:
        d = copy_of(w.hf, tmp / "hf")
        damage(d)
        return d
    return make


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _rewrite_json(name: str, edit) -> Callable[[Path], None]:
    def damage(d: Path):
        (d / name).write_bytes(edit((d / name).read_bytes()))
    return damage


def _drop_tensor(d: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors[next(name for name in tensors if name.endswith("h.1.mlp.c_fc.weight"))]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _rewrite_tensors(d: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = {k: edit(v) for k, v in load_file(d / "model.safetensors").items()}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _hf_cases(command: str, make, expect):
    def build(w, tmp):
        d = make(w, tmp)
        argv = {"init_from": run_argv(tmp, f"model.init_from={d}"),
                "generate": ["generate", str(d), "--prompt", "In the beginning", "--max-new-tokens", "2"],
                "grow": ["grow", str(d), str(tmp / "grown"), "--d-model", "48"],
                "eval": ["eval", DEMO, *SMALL, "--hf", str(d), f"run.dir={tmp / 'eval'}"]}[command]
        return argv, [e.replace("{d}", str(d)) for e in expect]
    return build


TRUNCATED = _hf(lambda d: _truncate(d / "model.safetensors"))
cases("HF checkpoint", [
    *[(f"truncated safetensors via {c}", _hf_cases(c, TRUNCATED, ["{d}/model.safetensors", "cannot be read"]))
      for c in ("init_from", "generate", "grow", "eval")],
    ("safetensors of random bytes via generate", _hf_cases(
        "generate", _hf(lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096))),
        ["{d}/model.safetensors", "cannot be read"])),
    ("missing tensor via grow", _hf_cases("grow", _hf(_drop_tensor), ["h.1.mlp.c_fc.weight", "missing"])),
    ("config.json not JSON via generate", _hf_cases(
        "generate", _hf(_rewrite_json("config.json", lambda b: b[:40])), ["{d}/config.json", "not valid JSON"])),
    ("config.json a list via grow", _hf_cases(
        "grow", _hf(_rewrite_json("config.json", lambda b: b"[1, 2]")), ["{d}/config.json", "JSON object"])),
    ("config.json not UTF-8 via init_from", _hf_cases(
        "init_from", _hf(_rewrite_json("config.json", lambda b: b"\xff" + b)), ["{d}/config.json", "not valid JSON"])),
    ("unknown model_type via init_from", _hf_cases(
        "init_from", _hf(_rewrite_json("config.json", lambda b: b.replace(b'"gpt2"', b'"mamba"'))),
        ["model_type='mamba'"])),
    ("no safetensors via generate", _hf_cases(
        "generate", _hf(lambda d: (d / "model.safetensors").unlink()), ["no *.safetensors weights in", "{d}"])),
    ("index naming a missing shard via grow", _hf_cases(
        "grow", _hf(lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"wte.weight": "model-00001-of-00002.safetensors"}}))),
        ["model-00001-of-00002.safetensors", "does not exist"])),
    ("no tokenizer via generate", _hf_cases(
        "generate", _hf(lambda d: (d / "tokenizer.json").unlink()), ["{d}", "tokenizer"])),
    ("weights that are NaN via generate", _hf_cases(
        "generate", _hf(lambda d: _rewrite_tensors(d, lambda t: np.full_like(t, np.nan))), ["NaN or infinite"])),
    ("integer weights via eval", _hf_cases(
        "eval", _hf(lambda d: _rewrite_tensors(d, lambda t: t.astype(np.int32))), ["I32, not a floating-point"])),
    ("a negative width in config.json via generate", _hf_cases(
        "generate", _hf(_rewrite_json("config.json", lambda b: b.replace(b'"n_embd": 32', b'"n_embd": -32'))),
        ["{d}/config.json", "must be a positive integer"])),
    ("grow IN a file", lambda w, tmp: (["grow", _file(tmp), str(tmp / "out"), "--d-model", "48"],
                                       ["weights.bin", "is a file, not a checkpoint directory"])),
    ("grow IN missing", lambda w, tmp: (["grow", str(tmp / "nope"), str(tmp / "out")], ["nope", "does not exist"])),
    ("grow to a smaller width", lambda w, tmp: (["grow", str(w.hf), str(tmp / "out"), "--d-model", "16"],
                                                ["d_model"])),
    ("grow heads that do not divide the width", lambda w, tmp: (
        ["grow", str(w.hf), str(tmp / "out"), "--d-model", "48", "--n-heads", "5"], ["n_heads"])),
])


# ----------------------------------------------------------------------------- orbax checkpoints of a run
def _largest_array_file(run: Path) -> Path:
    files = [p for p in (run / "checkpoints").rglob("*") if p.is_file() and "/state/" in str(p)
             and not p.name.startswith("_")]
    return max(files, key=lambda p: p.stat().st_size)


def _damaged_run(w, tmp, damage) -> Path:
    run = copy_of(w.run, tmp / "run")
    for step in (run / "checkpoints").iterdir():
        if step.name.isdigit():
            damage(step)
    return run


def _truncate_state(step: Path) -> None:
    """An interrupted copy: every array data file of the state cut to a tenth."""
    files = [p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, sorted(step.rglob("*"))
    for path in files:
        _truncate(path, 0.1)


def _orbax(command: str, damage=_truncate_state, expect=("cannot be read", "checkpoint")):
    def build(w, tmp):
        run = _damaged_run(w, tmp, damage)
        argv = {"export": ["export", str(run), str(tmp / "out")],
                "generate": ["generate", str(run), "--prompt", "In the beginning", "--max-new-tokens", "2"],
                "eval": ["eval", DEMO, *SMALL, f"run.dir={run}"],
                "init_from": ["run", DEMO, *SMALL, f"model.init_from={run}", f"run.dir={tmp / 'next'}"],
                "resume": None}[command]
        if argv is None:       # an unfinished run: the next invocation restores the state of its first stage's end
            (run / "report.json").unlink()
            steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
            for step in steps[1:]:
                shutil.rmtree(run / "checkpoints" / str(step))
            argv = ["run", DEMO, *SMALL, f"run.dir={run}"]
        return argv, [str(run / "checkpoints"), *expect]
    return build


def _meta_garbage(step: Path) -> None:
    (step / "meta" / "metadata").write_bytes(b"{not json")


cases("orbax checkpoint", [
    *[(f"truncated array file via {c}", _orbax(c)) for c in ("export", "generate", "eval", "init_from", "resume")],
    ("damaged metadata via export", _orbax("export", _meta_garbage, ("metadata", "cannot be read"))),
    ("damaged metadata via generate", _orbax("generate", _meta_garbage, ("metadata", "cannot be read"))),
    ("damaged metadata via init_from", _orbax("init_from", _meta_garbage, ("metadata", "cannot be read"))),
    ("metadata not an object via export", _orbax("export", lambda s: (s / "meta" / "metadata").write_text("[1]"),
                                                 ("metadata", "not a JSON object"))),
])


# ----------------------------------------------------------------------------- run directories
def _rundir(edit, *expect, argv=None):
    def build(w, tmp):
        run = copy_of(w.run, tmp / "run")
        edit(run)
        return (argv or (lambda r: ["run", DEMO, *SMALL, f"run.dir={r}"]))(run), [e.replace("{r}", str(run))
                                                                                for e in expect]
    return build


cases("run directory", [
    ("run.dir a file", lambda w, tmp: (run_argv(tmp, f"run.dir={_file(tmp)}"), ["weights.bin", "is a file"])),
    ("run.dir a directory of other files", lambda w, tmp: (
        _user_dir(tmp) and run_argv(tmp, f"run.dir={tmp / 'mine'}"), [str(tmp / "mine"), "not a jaxcl run's"])),
    ("report.json not JSON", _rundir(lambda r: (r / "report.json").write_text('{"matrix": [1,'),
                                     "{r}/report.json", "cannot be read as a run report")),
    ("report.json a list", _rundir(lambda r: (r / "report.json").write_text("[]"), "{r}/report.json",
                                   "not a run report")),
    ("report.json not UTF-8", _rundir(lambda r: (r / "report.json").write_bytes(b"\xff\xfe"), "{r}/report.json")),
    ("config.yaml not YAML", _rundir(lambda r: (r / "config.yaml").write_text("model: [1,\n"), "{r}/config.yaml:2:1:",
                                     "not readable YAML")),
    ("config.yaml a list", _rundir(lambda r: (r / "config.yaml").write_text("- 1\n"), "{r}/config.yaml",
                                   "does not hold a jaxcl run config")),
    ("a changed training key", _rundir(lambda r: None, "changed: optim.lr",
                                       argv=lambda r: ["run", DEMO, *SMALL, "optim.lr=0.5", f"run.dir={r}"])),
    ("another method in the run directory", _rundir(lambda r: None, "holds a sequential run, not a joint run",
                                                    argv=lambda r: ["train", DEMO, *SMALL, f"run.dir={r}"])),
    ("resume=false on a used directory", _rundir(
        lambda r: None, "checkpoint.resume=false",
        argv=lambda r: ["run", DEMO, *SMALL, "checkpoint.resume=false", f"run.dir={r}"])),
    ("checkpoints a file", _rundir(lambda r: shutil.rmtree(r / "checkpoints") or (r / "report.json").unlink() or
                                   (r / "checkpoints").write_text("mine\n"), "{r}/checkpoints", "is not a directory")),
    ("tensorboard a file", _rundir(lambda r: shutil.rmtree(r / "tensorboard") or
                                   (r / "tensorboard").write_text("mine\n"), "{r}/tensorboard", "is not a directory")),
    ("run.dir a link to nothing", lambda w, tmp: (os.symlink(tmp / "gone", tmp / "link") or
                                                  run_argv(tmp, f"run.dir={tmp / 'link'}"), ["link to nothing"])),
    ("run.dir under a file", lambda w, tmp: (run_argv(tmp, f"run.dir={_file(tmp)}/run"),
                                             ["weights.bin' is a file, not a directory"])),
    ("eval without checkpoints", lambda w, tmp: (["eval", DEMO, *SMALL, f"run.dir={tmp / 'empty'}"],
                                                 ["no checkpoint in", "empty"])),
    ("eval into a file", lambda w, tmp: (["eval", DEMO, *SMALL, f"run.dir={_file(tmp)}"], ["is a file"])),
    ("eval into a directory of other files", lambda w, tmp: (
        _user_dir(tmp) and ["eval", DEMO, *SMALL, "--hf", str(w.hf), f"run.dir={tmp / 'mine'}"],
        ["not a jaxcl run's"])),
    ("export a run directory that is not one", lambda w, tmp: (
        _user_dir(tmp) and ["export", str(tmp / "mine"), str(tmp / "out")], ["is not a jaxcl run directory"])),
    ("export a missing run", lambda w, tmp: (["export", str(tmp / "nope"), str(tmp / "out")], ["does not exist"])),
    ("export a stage out of range", lambda w, tmp: (["export", str(w.run), str(tmp / "out"), "--stage", "9"],
                                                    ["--stage 9 is out of range"])),
    ("export a negative stage", lambda w, tmp: (["export", str(w.run), str(tmp / "out"), "--stage", "-1"],
                                                ["--stage -1 is out of range"])),
    ("export --task of a sequential run", lambda w, tmp: (["export", str(w.run), str(tmp / "out"), "--task", "x"],
                                                          ["tasks belong to SLM runs"])),
    ("export with a damaged config.yaml", _rundir(lambda r: (r / "config.yaml").write_text("model: [\n"),
                                                  "{r}/config.yaml:2:1:", argv=lambda r: ["export", str(r), str(r.parent / "o")])),
])


def _user_dir(tmp: Path) -> bool:
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return True


# ----------------------------------------------------------------------------- datastores
def _store(damage, *expect):
    def build(w, tmp):
        store = copy_of(w.store, tmp / "store")
        damage(store)
        return (["generate", str(w.hf), "--memory", str(store), "--prompt", "In the beginning", "--max-new-tokens",
                 "2"], [e.replace("{s}", str(store)) for e in expect])
    return build


def _chunk(store: Path, array: str) -> Path:
    files = sorted(p for p in (store / array).rglob("*") if p.is_file() and not p.name.startswith("."))
    return files[0]


cases("datastore", [
    ("values chunk deleted", _store(lambda s: _chunk(s, "values").unlink(), "{s}", "values")),
    ("keys chunk deleted", _store(lambda s: _chunk(s, "keys").unlink(), "{s}", "keys")),
    ("values chunk truncated", _store(lambda s: _truncate(_chunk(s, "values"), 0.5), "{s}", "values")),
    ("keys chunk overwritten", _store(lambda s: _chunk(s, "keys").write_bytes(b"\0" * 7), "{s}", "keys")),
    ("manifest not JSON", _store(lambda s: (s / "manifest.json").write_text("{oops"), "{s}")),
    ("every commit record damaged", _store(lambda s: [p.write_text("{") for p in (s / "commits").iterdir()],
                                           "{s}", "commit")),
    ("not a datastore", lambda w, tmp: (_user_dir(tmp) and ["generate", str(w.hf), "--memory", str(tmp / "mine"),
                                                              "--prompt", "x"], [str(tmp / "mine")])),
    ("missing path", lambda w, tmp: (["generate", str(w.hf), "--memory", str(tmp / "nope"), "--prompt", "x"],
                                     ["nope", "does not exist"])),
    ("another model's width", lambda w, tmp: _other_width_store(w, tmp)),
    ("--memory without a path on an HF model", lambda w, tmp: (["generate", str(w.hf), "--memory", "--prompt", "x"],
                                                               ["--memory without a path"])),
])


def _other_width_store(w, tmp):
    from jaxcl.memory import Datastore

    store = Datastore.create(str(tmp / "wide"), dim=8, backend="exact")
    store.add(np.zeros((4, 8), np.float32), np.zeros(4, np.int32))
    return ["generate", str(w.hf), "--memory", str(tmp / "wide"), "--prompt", "x"], ["8"]


# ----------------------------------------------------------------------------- where commands write
def _a_file(tmp: Path) -> Path:
    path = tmp / "out"
    path.write_text("the user's own file: it must survive\n")
    return path


cases("output path", [
    ("export OUT an existing file", lambda w, tmp: (["export", str(w.run), str(_a_file(tmp))],
                                                   [str(tmp / "out"), "is a file"])),
    ("export OUT a directory of other files", lambda w, tmp: (
        _user_dir(tmp) and ["export", str(w.run), str(tmp / "mine")], [str(tmp / "mine"), "jaxcl did not write"])),
    ("export OUT inside the run", lambda w, tmp: (["export", str(w.run), str(w.run / "hf")],
                                                  ["is inside the run directory"])),
    ("export OUT a link to a directory", lambda w, tmp: (
        _user_dir(tmp) and os.symlink(tmp / "mine", tmp / "link") is None and
        ["export", str(w.run), str(tmp / "link")], ["is a symbolic link"])),
    ("grow OUT an existing file", lambda w, tmp: (["grow", str(w.hf), str(_a_file(tmp)), "--d-model", "48"],
                                                 [str(tmp / "out"), "is a file"])),
    ("grow OUT a directory of other files", lambda w, tmp: (
        _user_dir(tmp) and ["grow", str(w.hf), str(tmp / "mine"), "--d-model", "48"],
        [str(tmp / "mine"), "jaxcl did not write"])),
    ("grow OUT an HF checkpoint jaxcl did not grow", lambda w, tmp: (
        ["grow", str(w.hf), str(copy_of(w.hf, tmp / "other")), "--d-model", "48"], ["jaxcl_grow.json"])),
    ("export OUT under a file", lambda w, tmp: (["export", str(w.run), f"{_a_file(tmp)}/x"],
                                                [f"{str(tmp / 'out')!r} is a file, not a directory"])),
    ("grow OUT under a file", lambda w, tmp: (["grow", str(w.hf), f"{_a_file(tmp)}/x", "--d-model", "48"],
                                              [f"{str(tmp / 'out')!r} is a file, not a directory"])),
    ("grow OUT is IN", lambda w, tmp: (["grow", str(w.hf), str(w.hf), "--d-model", "48"], ["is IN_DIR"])),
    ("eval.json into a file run.dir", lambda w, tmp: (["eval", DEMO, *SMALL, "--hf", str(w.hf),
                                                       f"run.dir={_a_file(tmp)}"], ["is a file"])),
])


# ----------------------------------------------------------------------------- generate
def _gen(*args: str, expect: list[str], source=lambda w: w.hf, stdin: bytes | None = None):
    def build(w, tmp):
        argv = ["generate", str(source(w)), *[a.replace("{t}", str(tmp)) for a in args]]
        return argv, [e.replace("{t}", str(tmp)) for e in expect]
    return build


def _prompts(tmp: Path, data: bytes) -> str:
    (tmp / "prompts.txt").write_bytes(data)
    return str(tmp / "prompts.txt")


cases("generate", [
    ("source missing", lambda w, tmp: (["generate", str(tmp / "nope"), "--prompt", "x"],
                                       [f"error: {str(tmp / 'nope')!r}: directory", "does not exist"])),
    ("source a file", lambda w, tmp: (["generate", _file(tmp), "--prompt", "x"], ["weights.bin", "is a file"])),
    ("source an unrelated directory", lambda w, tmp: (
        _user_dir(tmp) and ["generate", str(tmp / "mine"), "--prompt", "x"], [str(tmp / "mine")])),
    ("no prompt", _gen(expect=["no prompt"])),
    ("an empty prompt", _gen("--prompt", "", expect=["empty --prompt"])),
    ("prompts file missing", _gen("--prompts-file", "{t}/nope.txt", expect=["{t}/nope.txt", "not found"])),
    ("prompts file a directory", _gen("--prompts-file", "{t}", expect=["{t}", "is a directory"])),
    ("prompts file not UTF-8", lambda w, tmp: (
        ["generate", str(w.hf), "--prompts-file", _prompts(tmp, b"fine\n\xff bad\n")],
        [str(tmp / "prompts.txt"), "line 2 is not UTF-8"])),
    ("prompts file empty", lambda w, tmp: (["generate", str(w.hf), "--prompts-file", _prompts(tmp, b"\n  \n")],
                                           [str(tmp / "prompts.txt"), "holds no prompt"])),
    ("max-new-tokens 0", _gen("--prompt", "x", "--max-new-tokens", "0", expect=["--max-new-tokens 0"])),
    ("max-new-tokens negative", _gen("--prompt", "x", "--max-new-tokens", "-3", expect=["--max-new-tokens -3"])),
    ("max-new-tokens not a number", _gen("--prompt", "x", "--max-new-tokens", "many",
                                         expect=["--max-new-tokens", "invalid int value"])),
    ("temperature negative", _gen("--prompt", "x", "--temperature", "-1", "--max-new-tokens", "2", expect=["--temperature -1.0"])),
    ("top-p zero", _gen("--prompt", "x", "--top-p", "0", "--max-new-tokens", "2", expect=["--top-p 0.0"])),
    ("top-p above one", _gen("--prompt", "x", "--top-p", "1.5", "--max-new-tokens", "2", expect=["--top-p 1.5"])),
    ("top-k negative", _gen("--prompt", "x", "--top-k", "-1", "--max-new-tokens", "2", expect=["--top-k -1"])),
    ("a domain of an HF model", _gen("--prompt", "x", "--domain", "bible", expect=["--domain 'bible'"])),
    ("a domain the run does not have", _gen("--prompt", "x", "--domain", "klingon", source=lambda w: w.run,
                                            expect=["--domain 'klingon'"])),
    ("memory policy unknown", _gen("--prompt", "x", "--memory-policy", "all", expect=["--memory-policy"])),
    ("--memory on a sequential run", _gen("--prompt", "x", "--memory", source=lambda w: w.run,
                                          expect=["--memory without a path"])),
    ("RUN@-1", lambda w, tmp: (["generate", f"{w.run}@-1", "--prompt", "x"], ["'@-1' selects no checkpoint"])),
    ("seed negative", _gen("--prompt", "x", "--seed", "-1", expect=["--seed", "0..2**63-1"])),
    ("seed too large", _gen("--prompt", "x", "--seed", str(10 ** 23), expect=["--seed", "0..2**63-1"])),
])


# ----------------------------------------------------------------------------- jaxcl downstream
def _task_dir(tmp: Path, test_rows: str, name: str = "mytask", test: bool = True) -> str:
    """A user's task directory: labels a/b in train, `test_rows` as the test split's lines."""
    d = tmp / "tasks"
    d.mkdir(exist_ok=True)
    (d / f"{name}.train.jsonl").write_text('{"text": "one", "label": "a"}\n{"text": "two", "label": "b"}\n')
    if test:
        (d / f"{name}.test.jsonl").write_text(test_rows)
    return str(d)


OUTSIDE_LABEL = '{"text": "x", "label": "a"}\n{"text": "y", "label": "c"}\n'


def _semem_copy(w, tmp: Path) -> str:
    run = copy_of(w.run, tmp / "semem-run")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("method: sequential", "method: semem"))
    return str(run)


cases("downstream", [
    ("a stage that does not exist", lambda w, tmp: (["downstream", str(w.run), "--stages", "0,5"],
                                                    ["--stages 5", "stages 0..1"])),
    ("stages not numbers", lambda w, tmp: (["downstream", str(w.run), "--stages", "last"], ["--stages 'last'"])),
    ("an unknown task", lambda w, tmp: (["downstream", str(w.run), "--tasks", "klingon"], ["unknown task 'klingon'"])),
    ("a shipped task no domain maps", lambda w, tmp: (["downstream", str(w.run), "--tasks", "debian_section"],
                                                      ["'debian_section' exists but no domain", "downstream.tasks."])),
    ("a domain with no task mapping", lambda w, tmp: (
        ["downstream", str(w.run), "--tasks", "bible", "downstream.tasks={manpages: manpage_section}"],
        ["--tasks bible", "domain 'bible' has no task mapping"])),
    ("no mapping applies to the run", lambda w, tmp: (["downstream", str(w.run), "downstream.tasks={jargon: x}"],
                                                      ["downstream.tasks maps none of the run's domains"])),
    ("a label outside the task's label set", lambda w, tmp: (
        ["downstream", str(w.run), f"downstream.task_dir={_task_dir(tmp, OUTSIDE_LABEL)}",
         "downstream.tasks={bible: mytask}"],
        ["mytask.test.jsonl:2", "label 'c' is not in the task's label set"])),
    ("a task without a test split", lambda w, tmp: (
        ["downstream", str(w.run), f"downstream.task_dir={_task_dir(tmp, '', test=False)}",
         "downstream.tasks={bible: mytask}"], ["mytask.test.jsonl does not exist"])),
    ("a task line that is not JSON", lambda w, tmp: (
        ["downstream", str(w.run), f"downstream.task_dir={_task_dir(tmp, '{oops')}", "downstream.tasks={bible: mytask}"],
        ["mytask.test.jsonl:1", "not a JSON object"])),
    ("not a run directory", lambda w, tmp: (["downstream", str(tmp / "nope")], [str(tmp / "nope"), "does not exist"])),
    ("a SeMem run", lambda w, tmp: (["downstream", _semem_copy(w, tmp)], ["is a semem run", "frozen"])),
    ("an override of what the run trained", lambda w, tmp: (["downstream", str(w.run), "train.steps=3"],
                                                            ["downstream.* and mesh.* overrides only", "train.*"])),
    ("seeds not numbers", lambda w, tmp: (["downstream", str(w.run), "--seeds", "a"], ["--seeds 'a'"])),
    ("an empty learning-rate grid", lambda w, tmp: (["downstream", str(w.run), "downstream.lrs=[]"],
                                                    ["downstream.lrs"])),
    ("a pooling the model cannot do", lambda w, tmp: (["downstream", str(w.run), "downstream.pooling=pooler"],
                                                      ["downstream.pooling=pooler", "no pooler"])),
])


# ----------------------------------------------------------------------------- the command line itself
cases("command line", [
    ("no command", lambda w, tmp: ([], ["required"])),
    ("unknown command", lambda w, tmp: (["fly"], ["invalid choice: 'fly'"])),
    ("run without a config", lambda w, tmp: (["run"], ["the following arguments are required: config"])),
    ("export without OUT_DIR", lambda w, tmp: (["export", str(w.run)], ["out_dir"])),
    ("grow with an unknown option", lambda w, tmp: (["grow", str(w.hf), str(tmp / "o"), "--width", "3"],
                                                    ["unrecognized arguments: --width"])),
    ("export --stage not a number", lambda w, tmp: (["export", str(w.run), str(tmp / "o"), "--stage", "last"],
                                                    ["--stage", "invalid int value: 'last'"])),
    ("an option between overrides is parsed", lambda w, tmp: (
        ["eval", DEMO, "--hf", str(tmp / "nope"), f"run.dir={tmp / 'e'}"], [f"--hf {str(tmp / 'nope')!r}",
                                                                            "does not exist"])),
    ("grow --seed too large", lambda w, tmp: (["grow", str(w.hf), str(tmp / "o"), "--seed", str(10 ** 23)],
                                              ["--seed", "0..2**63-1"])),
    ("grow a size too large", lambda w, tmp: (["grow", str(w.hf), str(tmp / "o"), "--d-model", str(2 * 10 ** 11)],
                                              ["--d-model", "below 2**31"])),
    ("grow noise not a number", lambda w, tmp: (["grow", str(w.hf), str(tmp / "o"), "--noise-std", "nan"],
                                                ["--noise-std", "finite number >= 0"])),
    ("grow --method unknown", lambda w, tmp: (["grow", str(w.hf), str(tmp / "o"), "--method", "magic"],
                                              ["--method", "invalid choice"])),
])


# ----------------------------------------------------------------------------- the test
def _error_lines(stderr: str) -> tuple[list[str], str]:
    lines = [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    return [line for line in lines if " error: " in line or line.startswith("jaxcl: error")], lines[-1] if lines else ""


@pytest.mark.parametrize("c", CASES, ids=[f"{c.kind}: {c.name}" for c in CASES])
def test_bad_input(c: Case, world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # a default runs/<name> would land here, and be seen
    tmp = tmp_path / "case"
    tmp.mkdir()
    argv, expect = c.build(world, tmp)
    before = _snapshot(tmp)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:                           # argparse exits (after printing one line)
        code = e.code
    out = capsys.readouterr()
    errors, last = _error_lines(out.err)
    assert code == 2, (code, out.err[-3000:])
    assert "Traceback" not in out.err and "Traceback" not in out.out, out.err[-3000:]
    assert len(errors) == 1 and errors[0] == last, out.err[-3000:]
    for text in expect:
        assert text in errors[0], (text, errors[0])
    print(f"[{c.kind}] {c.name}: {errors[0]}")        # shown with pytest -rP: what a user reads
    assert not _changed(before, _snapshot(tmp)), f"changed or added under the case's directory: {_changed(before, _snapshot(tmp))}"
    assert not any(p.name != "case" for p in tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())
    for name, snap in world.snapshot.items():
        assert not _changed(snap, _snapshot(getattr(world, name))), f"the shared {name} changed"


def _changed(before: dict, after: dict) -> list[str]:
    """The entries added, removed or changed between two snapshots (names only: a compact message)."""
    return sorted(k for k in set(before) | set(after) if before.get(k, 0) != after.get(k, 0))


def test_the_battery_covers_every_kind():
    counts = collections.Counter(c.kind for c in CASES)
    assert set(counts) == set(KINDS), counts
    assert len(CASES) >= 120 and min(counts.values()) >= 5, counts
    assert len({(c.kind, c.name) for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- positive controls
def test_an_export_and_a_grow_may_replace_what_they_wrote_before(world, tmp_path):
    for _ in range(2):
        assert cli.main(["export", str(world.run), str(tmp_path / "export")]) == 0
        assert cli.main(["grow", str(world.hf), str(tmp_path / "grown"), "--d-model", "48"]) == 0
    assert (tmp_path / "export" / "jaxcl_export.json").is_file()
    assert json.loads((tmp_path / "grown" / "jaxcl_grow.json").read_text())["to"]["d_model"] == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "grown"]     # no hidden leftovers


def test_options_stand_anywhere_among_positionals_and_overrides(world, tmp_path, capsys):
    assert cli.main(["generate", "--max-new-tokens", "2", str(world.hf), "--prompt", "In the", "--no-stream"]) == 0
    assert cli.main(["export", "--stage", "0", str(world.run), str(tmp_path / "o")]) == 0
    assert cli.main(["eval", DEMO, *SMALL[:4], "--hf", str(world.hf), *SMALL[4:], f"run.dir={tmp_path / 'e'}"]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["source"] == str(world.hf)


def test_a_first_invocation_that_fails_leaves_the_run_directory_for_the_corrected_command(world, tmp_path):
    # The run fails after it began (its init_from checkpoint is damaged): the run directory it had created is
    # removed, so the corrected command is a new run in the same run.dir, not refused as "changed".
    damaged = _damaged_run(world, tmp_path, _truncate_state)
    run_dir = tmp_path / "next"
    assert cli.main(["run", DEMO, *SMALL, f"model.init_from={damaged}", f"run.dir={run_dir}"]) == 2
    assert not run_dir.exists()
    assert cli.main(["run", DEMO, *SMALL, f"model.init_from={world.run}", f"run.dir={run_dir}"]) == 0
    assert json.loads((run_dir / "report.json").read_text())["method"] == "sequential"
    # A run.dir the user created (empty) stays, emptied of what the failed invocation wrote.
    (tmp_path / "mine").mkdir()
    assert cli.main(["run", DEMO, *SMALL, f"model.init_from={damaged}", f"run.dir={tmp_path / 'mine'}"]) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    # An invocation that fails in a run that had committed work leaves every byte of it.
    before = _snapshot(run_dir)
    assert cli.main(["run", DEMO, *SMALL, f"model.init_from={world.run}", "optim.lr=0.5", f"run.dir={run_dir}"]) == 2
    assert not _changed(before, _snapshot(run_dir))


def test_what_a_launcher_writes_into_a_new_run_dir_does_not_make_it_a_users_directory(tmp_path):
    from jaxcl import rundir
    from jaxcl.errors import OutputError

    (tmp_path / "train.log").write_text("shell redirection\n")
    (tmp_path / "slurm-12.out").write_text("")
    (tmp_path / ".nfs0001").write_text("")
    rundir.check_run_directory(tmp_path)                   # accepted: a first run may start here
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputError, match=r"holds files that are not a jaxcl run's \(notes.txt\)"):
        rundir.check_run_directory(tmp_path)


def test_an_error_whose_type_takes_more_than_a_message_is_still_one_line():
    from jaxcl.config import ConfigError

    renamed = cli._named_as(json.JSONDecodeError("Expecting value", "{", 1), "/r", "")
    assert isinstance(renamed, ConfigError) and "Expecting value" in str(renamed)


# ----------------------------------------------------------------------------- as a process
def _process(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "jaxcl.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_errors_after_a_progress_bar_are_the_last_line_as_a_process(world, tmp_path):
    d = copy_of(world.data, tmp_path / "data")
    (d / "alpha.valid.txt").write_bytes(b"fine\n\xff\n")
    out = _process("run", DEMO, *SMALL, f"data.source={d}", "data.domains=[alpha]", f"run.dir={tmp_path / 'r'}",
                   cwd=tmp_path)
    lines = [line for line in re.split(r"[\r\n]+", out.stderr) if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[-1].startswith("jaxcl run: error: ") and f"{d}/alpha.valid.txt:2:" in lines[-1], lines[-3:]
    assert not (tmp_path / "r").exists()


def test_a_damaged_checkpoint_is_one_line_as_a_process(world, tmp_path):
    # orbax abandons the other reads when one fails; their late callbacks must not print tracebacks
    run = _damaged_run(world, tmp_path, _truncate_state)
    for argv in (["export", str(run), str(tmp_path / "o")],
                 ["generate", str(run), "--prompt", "In the", "--max-new-tokens", "2"]):
        out = _process(*argv, cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line]
        assert lines == errors and str(run / "checkpoints") in errors[0], lines[-3:]     # the only line
        assert "tensorstore_spec" not in errors[0] and len(errors[0]) < 1200, errors[0]
