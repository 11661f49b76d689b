"""The token cache: tokenize once (framed as transformers frames a document), read by memory map, detect change."""

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxcl.config import DataConfig
from jaxcl.data.cache import ConcatRows, SubsetRows, open_splits
from jaxcl.data.corpus import load_text
from jaxcl.data.shuffle import fold_key, index_shuffle
from jaxcl.data.sources import open_source, split_documents
from jaxcl.data.stream import SequenceStream, split_rows
from jaxcl.data.tokenizer import load_tokenizer
from jaxcl.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- tokenizers made here
def _train_tokenizer(kind: str, directory: Path) -> Path:
    """A small tokenizer.json of one family, trained on real text: gpt2 (byte-level BPE, no post-processor
    specials), llama (BPE with a `<s> $A` template: BOS), bert (WordPiece with `[CLS] $A [SEP]`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    text = split_documents(load_text("jargon", "valid"))
    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(text, trainers.WordPieceTrainer(
            vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                    ("[SEP]", tok.token_to_id("[SEP]"))])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


DOCS = ["The quick brown fox.\nIt jumps.", "hacker slang: foo, bar, baz", "x", "Ünïcödé text — with dashes",
        "ends with the end token <|endoftext|>"]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_framing_is_transformers_tokenizer_call_plus_one_eos(tmp_path, kind):
    from transformers import PreTrainedTokenizerFast

    path = _train_tokenizer(kind, tmp_path / kind)
    ours = load_tokenizer(str(path))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    eos = ours.eos_id
    for doc in DOCS:
        ids = hf(doc).input_ids
        expected = ids if ids and ids[-1] == eos else ids + [eos]
        assert ours.frame(doc) == expected, (kind, doc)
        assert ours.frame(doc, eos=False) == ids           # a prompt: exactly tokenizer(prompt)
    first = ours.frame(DOCS[0])
    if kind == "llama":
        assert first[0] == ours.tokenizer.token_to_id("<s>") and first[-1] == eos     # BOS ... EOS
    if kind == "bert":
        assert first[0] == ours.tokenizer.token_to_id("[CLS]") and first[-1] == eos   # [SEP] is the EOS: once
        assert first.count(eos) == 1
    tokens, lengths = ours.frame_documents(DOCS)
    assert tokens.tolist() == [t for d in DOCS for t in ours.frame(d)]
    assert lengths.tolist() == [len(ours.frame(d)) for d in DOCS]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_the_cache_frames_documents_as_the_tokenizer_does(tmp_path, kind):
    path = _train_tokenizer(kind, tmp_path / kind)
    tok = load_tokenizer(str(path))
    src = tmp_path / "src"
    src.mkdir()
    (src / "d.train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 40))
    split = open_splits(source_spec=str(src), text_field="text", tokenizer=tok, tokenizer_spec=str(path),
                        cache=str(tmp_path / "cache"), domains=("d",), splits=("train",), progress=False)[("d", "train")]
    assert split.read(0, split.tokens).tolist() == [t for d in DOCS * 40 for t in tok.frame(d)]
    assert split.document_lengths().tolist() == [len(tok.frame(d)) for d in DOCS * 40]


# ----------------------------------------------------------------------------- equality with tokenizing in memory
def _corpus_dir(tmp_path: Path) -> Path:
    """Real text in every format a directory source reads, with files large enough to be cut into units."""
    d = tmp_path / "corpus"
    d.mkdir()
    bible, manpages = load_text("bible", "train"), load_text("manpages", "valid")
    (d / "scripture.train.txt").write_text(bible[:400_000])
    (d / "scripture.valid.txt").write_text(bible[400_000:440_000])
    docs = split_documents(load_text("pydoc", "train"))
    with gzip.open(d / "pydoc.train.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": x}) + "\n" for x in docs)
    (d / "pydoc.valid.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in docs[:40]))
    (d / "man.train").mkdir()                                  # a split stored as a directory of files
    parts = split_documents(manpages)
    (d / "man.train" / "part-0.txt").write_text("\n\n\n".join(parts[:12]))
    (d / "man.train" / "part-1.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in parts[12:]))
    (d / "man.valid.txt").write_text("\n\n\n".join(parts[:5]))
    return d


def _prepare(src, cache, processes=1, segment=64 << 10, domains=None, splits=("train", "valid"), **kw):
    tok = load_tokenizer("default")
    source = open_source(str(src))
    return open_splits(source_spec=str(src), text_field="text", tokenizer=tok, tokenizer_spec="default",
                       cache=str(cache), domains=domains or source.domains(), splits=splits, processes=processes,
                       progress=False, segment_bytes=segment, **kw)


def test_cache_equals_tokenizing_the_documents_and_processes_do_not_change_it(tmp_path):
    src = _corpus_dir(tmp_path)
    tok, source = load_tokenizer("default"), open_source(str(src))
    one = _prepare(src, tmp_path / "one", processes=1)
    two = _prepare(src, tmp_path / "two", processes=2)
    assert len(one[("scripture", "train")].names) > 4          # the big file was cut into several units
    for key, split in one.items():
        docs = source.documents(*key)
        expected = tok.encode_documents(docs)
        assert split.tokens == len(expected) and split.documents == len(docs)
        np.testing.assert_array_equal(split.read(0, split.tokens), expected)
        np.testing.assert_array_equal(two[key].read(0, two[key].tokens), expected)
        np.testing.assert_array_equal(split.document_lengths(), two[key].document_lengths())
        assert split.dtype == np.uint16                        # an 8,192-token vocabulary: 2 bytes per token
        for frac in ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.25, 0.75)):
            lo, hi = (int(len(docs) * f) for f in frac)
            packed = tok.encode_documents(docs[lo:hi])
            n = len(packed) // 64
            rows = split.rows(64, frac)
            assert rows.shape == (n, 64)
            np.testing.assert_array_equal(np.asarray(rows), packed[:n * 64].reshape(n, 64))
            ids = np.random.default_rng(0).integers(0, n, 50)
            np.testing.assert_array_equal(rows[ids], packed[:n * 64].reshape(n, 64)[ids])


def test_a_url_cache_and_a_url_source_read_the_same_tokens(tmp_path, monkeypatch):
    """The object-store path (tensorstore kvstore: listing, byte-range reads, one PUT per file) on a file:// URL."""
    import functools

    import jaxcl.data.cache
    import jaxcl.data.cache.build
    from jaxcl.storage import StoreFiles

    src = _corpus_dir(tmp_path)
    local = _prepare(src, tmp_path / "local", domains=("scripture", "pydoc"))
    kvstore = functools.partial(StoreFiles, via_tensorstore=True)
    monkeypatch.setattr(jaxcl.data.cache, "StoreFiles", kvstore)
    monkeypatch.setattr(jaxcl.data.cache.build, "StoreFiles", kvstore)
    remote = _prepare(f"file://{src}", f"file://{tmp_path / 'remote'}", domains=("scripture", "pydoc"))
    for key, split in local.items():
        assert not remote[key].files.local
        np.testing.assert_array_equal(remote[key].read(0, remote[key].tokens), split.read(0, split.tokens))
        ids = np.arange(0, len(split.rows(32)), 7)
        np.testing.assert_array_equal(remote[key].rows(32)[ids], split.rows(32)[ids])


def test_row_views_compose_without_copies():
    base = np.arange(60, dtype=np.int32).reshape(20, 3)
    sub = SubsetRows(base, np.array([3, 5, 19]))
    np.testing.assert_array_equal(sub[np.array([2, 0, 0])], base[[19, 3, 3]])
    joint = ConcatRows([base[:4], sub, base[10:12]])
    assert joint.shape == (9, 3)
    np.testing.assert_array_equal(np.asarray(joint), np.concatenate([base[:4], base[[3, 5, 19]], base[10:12]]))
    with pytest.raises(IndexError):
        joint[np.array([9])]


# ----------------------------------------------------------------------------- change detection
def test_a_changed_source_is_prepared_again_and_a_touched_one_is_not(tmp_path):
    src = _corpus_dir(tmp_path)
    first = _prepare(src, tmp_path / "c", domains=("scripture",), splits=("valid",))[("scripture", "valid")]
    manifest = (first.files.root / first.prefix / "manifest.json")
    stamp = manifest.stat().st_mtime_ns
    f = src / "scripture.valid.txt"
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10 ** 9))          # touched: same bytes, new mtime
    again = _prepare(src, tmp_path / "c", domains=("scripture",), splits=("valid",))[("scripture", "valid")]
    assert manifest.stat().st_mtime_ns == stamp and again.tokens == first.tokens
    f.write_text(f.read_text() + "\n\n\nA brand new closing document.")   # changed content
    changed = _prepare(src, tmp_path / "c", domains=("scripture",), splits=("valid",))[("scripture", "valid")]
    assert changed.documents == first.documents + 1
    tok = load_tokenizer("default")
    np.testing.assert_array_equal(changed.read(0, changed.tokens),
                                  tok.encode_documents(open_source(str(src)).documents("scripture", "valid")))
    with open(f, "r+b") as h:                                            # same size, other bytes
        data = bytearray(h.read())
        data[10:15] = b"XXXXX"
        h.seek(0)
        h.write(bytes(data))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 2 * 10 ** 9))
    third = _prepare(src, tmp_path / "c", domains=("scripture",), splits=("valid",))[("scripture", "valid")]
    assert not np.array_equal(third.read(0, 50), changed.read(0, 50))


def test_another_tokenizer_never_reads_this_cache(tmp_path):
    src = _corpus_dir(tmp_path)
    default = _prepare(src, tmp_path / "c", domains=("scripture",), splits=("valid",))[("scripture", "valid")]
    other_path = _train_tokenizer("gpt2", tmp_path / "gpt2")
    other = load_tokenizer(str(other_path))
    split = open_splits(source_spec=str(src), text_field="text", tokenizer=other, tokenizer_spec=str(other_path),
                        cache=str(tmp_path / "c"), domains=("scripture",), splits=("valid",),
                        progress=False)[("scripture", "valid")]
    assert split.prefix != default.prefix                               # its own directory
    np.testing.assert_array_equal(split.read(0, split.tokens),
                                  other.encode_documents(open_source(str(src)).documents("scripture", "valid")))
    # a cache copied under the other tokenizer's name is refused, not read
    import shutil
    shutil.rmtree(split.files.root / split.prefix)
    shutil.copytree(default.files.root / default.prefix, split.files.root / split.prefix)
    with pytest.raises(DataError, match="made with another tokenizer"):
        open_splits(source_spec=str(src), text_field="text", tokenizer=other, tokenizer_spec=str(other_path),
                    cache=str(tmp_path / "c"), domains=("scripture",), splits=("valid",), progress=False)


def test_a_damaged_cache_is_named_not_read(tmp_path):
    src = _corpus_dir(tmp_path)
    split = _prepare(src, tmp_path / "c", domains=("scripture",), splits=("train",))[("scripture", "train")]
    shard = split.files.root / split.prefix / f"{split.names[1]}.tokens"
    with open(shard, "r+b") as h:
        h.truncate(shard.stat().st_size - 2)
    with pytest.raises(DataError, match=r"shard-00001-[0-9a-f]{12}.tokens: \d+ bytes, the manifest says"):
        _prepare(src, tmp_path / "c", domains=("scripture",), splits=("train",))
    (split.files.root / split.prefix / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="damaged token-cache manifest"):
        _prepare(src, tmp_path / "c", domains=("scripture",), splits=("train",))


# ----------------------------------------------------------------------------- bad documents
def test_bad_documents_name_file_and_line_even_deep_in_a_cut_file_or_are_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"text": f"document number {i} " + "word " * 40}) for i in range(3000)]
    lines[2500] = '{"text": oops}'
    lines[2700] = json.dumps({"body": "no text field"})
    (src / "a.train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"a.train.jsonl:2501: not JSON"):
        _prepare(src, tmp_path / "c", domains=("a",), splits=("train",), segment=32 << 10)
    split = _prepare(src, tmp_path / "c2", domains=("a",), splits=("train",), segment=32 << 10,
                     on_bad_document="skip")[("a", "train")]
    assert split.documents == 2998 and split.manifest["skipped"] == 2
    assert any("a.train.jsonl:2701: record has no field 'text'" in m for m in split.manifest["skipped_examples"])
    (src / "b.train.txt").write_bytes(("a document\n" * 3000).encode() + b"\n\n\ncaf\xe9\n\n\nlast one")
    with pytest.raises(DataError, match=r"b.train.txt:3004: byte 3 of the document is not UTF-8"):
        _prepare(src, tmp_path / "c3", domains=("b",), splits=("train",), segment=8 << 10)


def test_an_empty_split_is_refused_with_its_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.train.txt").write_text("\n\n\n\n   \n\n\n")
    with pytest.raises(DataError, match=r"a.train.txt: holds no document"):
        _prepare(src, tmp_path / "c", domains=("a",), splits=("train",))


# ----------------------------------------------------------------------------- two preparers at once
def test_two_processes_preparing_at_once_both_read_one_complete_cache(tmp_path):
    src = _corpus_dir(tmp_path)
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_token_cache import _prepare; "
              f"s = _prepare({str(src)!r}, {str(tmp_path / 'c')!r}, domains=('scripture',), splits=('train',))"
              f"[('scripture', 'train')]; print(s.tokens, s.read(0, s.tokens).sum())")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    reference = _prepare(src, tmp_path / "ref", domains=("scripture",), splits=("train",))[("scripture", "train")]
    assert outs[0][0].split() == [str(reference.tokens), str(int(reference.read(0, reference.tokens).sum()))]


# ----------------------------------------------------------------------------- the stateless stream
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), key=st.integers(0, 2 ** 64 - 1))
def test_index_shuffle_is_a_permutation_for_every_size_and_key(n, key):
    out = index_shuffle(np.arange(n), n, key)
    assert np.array_equal(np.sort(out), np.arange(n))


def test_index_shuffle_looks_random():
    n = 10_000
    a, b = index_shuffle(np.arange(n), n, fold_key(1)), index_shuffle(np.arange(n), n, fold_key(2))
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05
    assert np.mean(a == b) < 0.01
    assert abs(np.mean(a[:n // 2] < n // 2) - 0.5) < 0.03


def test_a_resumed_stream_gives_the_same_batches_from_the_cache(tmp_path):
    data = DataConfig(source=str(_corpus_dir(tmp_path)), cache=str(tmp_path / "c"), seq_len=64, batch_size=8)
    rows = split_rows(data, load_tokenizer("default"), "default", ("scripture",), "train")["scripture"]
    stream = SequenceStream(rows, 8, seed=3)
    batches = [stream.next_batch()["input_ids"] for _ in range(400)]     # > 1 epoch: the epochs reshuffle
    assert len(rows) < 400 * 8
    epoch = np.concatenate([stream.global_row_ids(p) for p in range(0, len(rows) - len(rows) % 8, 8)])
    assert len(set(epoch.tolist())) == len(epoch)                        # without replacement inside an epoch
    for k in (0, 1, 137, 399):
        resumed = SequenceStream(rows, 8, seed=3)
        resumed.restore(SequenceStream(rows, 8, seed=3, position=k * 8).state())
        np.testing.assert_array_equal(resumed.next_batch()["input_ids"], batches[k])
    np.testing.assert_array_equal(batches[5], np.asarray(rows)[stream.global_row_ids(40)])


def test_the_data_config_checks_its_new_keys():
    from jaxcl.config import ConfigError

    with pytest.raises(ConfigError, match="data.on_bad_document must be error or skip"):
        DataConfig(on_bad_document="ignore")
    with pytest.raises(ConfigError, match="data.prepare_processes must be at least 0"):
        dataclasses.replace(DataConfig(), prepare_processes=-1)


# ----------------------------------------------------------------------------- mixtures
def _rows(n: int, tag: int) -> np.ndarray:
    """n distinct rows whose first token names the domain (tag) and second the row id."""
    return np.stack([np.full(n, tag), np.arange(n), np.zeros(n)], 1).astype(np.int32)


def test_mixture_shares_lie_within_binomial_bounds_and_every_domain_is_read_without_replacement():
    from jaxcl.data.stream import MixtureStream

    weights = {"old": 0.3, "new": 0.7, "rare": 0.02}
    rows = {"old": _rows(500, 0), "new": _rows(2000, 1), "rare": _rows(50, 2)}
    stream = MixtureStream(rows, weights, 32, seed=11, domain_index={"old": 0, "new": 1, "rare": 2})
    batches = [stream.next_batch() for _ in range(300)]
    ids = np.concatenate([b["input_ids"] for b in batches])
    n, total = len(ids), sum(weights.values())
    for tag, (name, w) in enumerate(weights.items()):
        p = w / total
        count = int(np.sum(ids[:, 0] == tag))
        assert abs(count - n * p) <= 3 * np.sqrt(n * p * (1 - p)) + 1, (name, count, n * p)
        np.testing.assert_array_equal(np.concatenate([b["prompt_ids"] for b in batches])[ids[:, 0] == tag], tag)
        seen = ids[ids[:, 0] == tag, 1]
        size = len(rows[name])
        first = seen[:size]                          # the domain's first epoch: no row twice
        assert len(np.unique(first)) == len(first)
        if len(seen) >= size:
            assert sorted(first) == list(range(size))
    for block in (ids[:4096], ids[4096:8192]):      # every block of 4,096 rows deals each domain its exact count
        assert [int(np.sum(block[:, 0] == t)) for t in range(3)] == stream.counts.tolist()
    assert stream.counts.tolist() == [1205, 2811, 80]            # 4096 * w / sum(w), largest remainders


def test_a_mixture_stream_resumes_bit_identically_at_any_step():
    from jaxcl.data.stream import MixtureStream

    rows = {"a": _rows(97, 0), "b": _rows(300, 1)}
    stream = MixtureStream(rows, {"a": 1, "b": 3}, 16, seed=5)
    batches = [stream.next_batch()["input_ids"] for _ in range(700)]            # crosses blocks and epochs
    for k in (0, 1, 255, 256, 699):
        resumed = MixtureStream(rows, {"a": 1, "b": 3}, 16, seed=5)
        resumed.restore(MixtureStream(rows, {"a": 1, "b": 3}, 16, seed=5, position=16 * k).state())
        np.testing.assert_array_equal(resumed.next_batch()["input_ids"], batches[k])
    from jaxcl.config import ConfigError
    with pytest.raises(ConfigError, match="data, data.mixture or data.seq_len changed"):
        MixtureStream({"a": _rows(96, 0), "b": rows["b"]}, {"a": 1, "b": 3}, 16, seed=5).restore(stream.state())
    with pytest.raises(ConfigError, match="below 1/4096"):
        MixtureStream(rows, {"a": 1e-6, "b": 1}, 16, seed=5)


def test_a_stage_trains_on_its_mixture_and_other_methods_refuse_one(tmp_path):
    from tests.test_run import TINY, jaxcl

    out = jaxcl("run", "configs/demo.yaml", *TINY, "train.pretrain_steps=10", "train.steps=10",
                "data.mixture={manpages: {bible: 0.5, manpages: 0.5}}", run_dir=tmp_path / "seq")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "seq" / "report.json").read_text())
    assert report["stages"] == ["bible", "manpages"] and len(report["matrix"]) == 2
    for overrides, message in (
            (["data.mixture={wordnet: {bible: 1}}"], "data.mixture.wordnet: not a stage of this sequential run"),
            (["data.mixture={manpages: {pydoc: 1}}"], "data.mixture.manpages.pydoc: not one of data.domains"),
            (["data.mixture={manpages: {bible: 0}}"], "weights must be >= 0 with a positive sum")):
        out = jaxcl("run", "configs/demo.yaml", *TINY, *overrides, run_dir=tmp_path / "bad")
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    out = jaxcl("run", "configs/semem/demo.yaml", *TINY, "data.mixture={bible: {bible: 1}}", run_dir=tmp_path / "sm")
    assert out.returncode == 2 and "SeMem streams its domains" in out.stderr, out.stderr[-2000:]


# ----------------------------------------------------------------------------- placing batches
class _CountingRows:
    """Rows that record which row ids were read."""

    def __init__(self, array):
        self.array, self.read = array, []
        self.shape = array.shape

    def __len__(self):
        return len(self.array)

    def __getitem__(self, ids):
        self.read.extend(np.asarray(ids).tolist())
        return self.array[ids]


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(tensor=8)])
def test_device_batch_reads_each_row_once_and_only_where_devices_need_it(axes):
    import jax

    from jaxcl.config import MeshConfig
    from jaxcl.data.stream import device_batch
    from jaxcl.parallel import batch_sharding, make_mesh

    rows = _CountingRows(np.arange(64 * 5, dtype=np.int32).reshape(64, 5))
    stream = SequenceStream(rows, 16, seed=0)
    batch = stream.next_batch()
    assert rows.read == []                                   # nothing read until placed
    placed = device_batch(batch, batch_sharding(make_mesh(MeshConfig(**axes))))
    assert sorted(rows.read) == sorted(stream.global_row_ids(0).tolist())    # every row once, however replicated
    np.testing.assert_array_equal(np.asarray(jax.device_get(placed["input_ids"])),
                                  rows.array[stream.global_row_ids(0)])


# ----------------------------------------------------------------------------- across hosts
SPLITS_2P = (("scripture", "train"), ("scripture", "valid"), ("pydoc", "train"), ("man", "train"))


def test_two_jax_processes_prepare_the_one_process_cache_and_read_the_same_batches(tmp_path):
    from tests.process_launcher import run_workers

    src = _corpus_dir(tmp_path)                     # tmp_path/corpus: the worker reads OUT_DIR/src
    os.symlink(src, tmp_path / "src")
    results = run_workers("prepare_multiprocess_worker.py", tmp_path, n=2, timeout=400)
    single = _prepare(src, tmp_path / "one", domains=("scripture", "pydoc", "man"))
    stream = SequenceStream(single[("scripture", "train")].rows(32), 8, seed=4)
    expected = np.stack([np.asarray(stream.next_batch()["input_ids"]) for _ in range(5)])
    for r in results:
        for d, s in SPLITS_2P:
            np.testing.assert_array_equal(r[f"{d}/{s}/tokens"], single[(d, s)].read(0, single[(d, s)].tokens))
            np.testing.assert_array_equal(r[f"{d}/{s}/lengths"], single[(d, s)].document_lengths())
        np.testing.assert_array_equal(r["batches"], expected)
    writers = results[0]["scripture/train/writers"]
    assert len(writers) > 4 and writers.tolist() == [i % 2 for i in range(len(writers))]   # shared out, no overlap


def test_zstd_and_parquet_sources_stream_the_same_documents(tmp_path):
    zstd = pytest.importorskip("zstandard", reason="zstandard not installed (in the [test] and [data] extras)")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed (in the [data] extra)")
    import pyarrow as pa

    docs = split_documents(load_text("wordnet", "valid"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.train.jsonl.zst").write_bytes(
        zstd.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs[:300]).encode())
        + zstd.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs[300:]).encode()))
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), src / "b.train.parquet", row_group_size=100)
    source = open_source(str(src))
    assert source.documents("a", "train") == docs and source.documents("b", "train") == docs
    splits = _prepare(src, tmp_path / "c", splits=("train",))
    tok = load_tokenizer("default")
    for d in ("a", "b"):
        np.testing.assert_array_equal(splits[(d, "train")].read(0, splits[(d, "train")].tokens),
                                      tok.encode_documents(docs))
    (src / "c.train.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"c.train.jsonl.zst: not a complete zstd file"):
        open_source(str(src)).documents("c", "train")


def test_jaxcl_prepare_builds_the_cache_a_run_reads_and_reports_it(tmp_path, capsys):
    from jaxcl import cli

    src = _corpus_dir(tmp_path)
    argv = ["prepare", str(ROOT / "configs/demo.yaml"), f"data.source={src}", f"data.cache={tmp_path / 'c'}",
            "data.domains=[scripture,pydoc]", "--splits", "train,valid", "--json", "--processes", "2"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cache"] == str(tmp_path / "c") and summary["tokenizer"] == "default"
    got = {(r["domain"], r["split"]): r for r in summary["splits"]}
    assert set(got) == {(d, s) for d in ("scripture", "pydoc") for s in ("train", "valid")}
    splits = _prepare(src, tmp_path / "c", domains=("scripture", "pydoc"), segment=32 << 20)   # finds it made
    for key, split in splits.items():
        assert got[key]["tokens"] == split.tokens and got[key]["documents"] == split.documents
        assert got[key]["bytes_per_token"] == 2 and got[key]["skipped_documents"] == 0
    assert cli.main(argv) == 0                                  # a second prepare finds everything and says so
    assert json.loads(capsys.readouterr().out)["splits"] == summary["splits"]
