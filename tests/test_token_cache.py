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
    shard = split.files.root / split.prefix / "shard-00001.tokens"
    with open(shard, "r+b") as h:
        h.truncate(shard.stat().st_size - 2)
    with pytest.raises(DataError, match=r"shard-00001.tokens: \d+ bytes, the manifest says"):
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
