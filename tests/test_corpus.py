"""The embedded corpus and default tokenizer: complete, consistent with the manifest, leak-free,
really multi-domain, and the tokenizer honours its contract (size, special ids, round trips)."""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import lzma
import pathlib
import re
import sys

import numpy as np
import pytest

from jaxcl.data import corpus

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MIN_TRAIN_CHARS = 1_000_000
MIN_HELDOUT_CHARS = 50_000
MAX_CORPUS_BYTES = 10_000_000
LEAK_PARAGRAPH_CHARS = 100      # the build keeps every paragraph this long at most once per domain


def _documents(domain: str, split: str) -> list[str]:
    return corpus.load_text(domain, split).strip("\n").split(corpus.DOCUMENT_SEPARATOR)


def _long_paragraphs(domain: str, split: str) -> set[str]:
    paragraphs = (" ".join(p.split()) for d in _documents(domain, split) for p in d.split("\n\n"))
    return {p for p in paragraphs if len(p) >= LEAK_PARAGRAPH_CHARS}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return corpus.corpus_manifest()


@pytest.fixture(scope="module")
def tokenizer():
    return corpus.load_default_tokenizer()


def test_domains_match_manifest_and_have_five_or_more(manifest):
    assert corpus.list_domains() == corpus.DOMAINS
    assert len(corpus.DOMAINS) >= 5 and len(set(corpus.DOMAINS)) == len(corpus.DOMAINS)
    assert set(manifest["domains"]) == set(corpus.DOMAINS)
    assert tuple(manifest["stage_order"]) == corpus.DOMAINS


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_every_split_loads_with_enough_text(domain):
    sizes = {split: len(corpus.load_text(domain, split)) for split in corpus.SPLITS}
    assert sizes["train"] >= MIN_TRAIN_CHARS, sizes
    assert sizes["valid"] >= MIN_HELDOUT_CHARS and sizes["test"] >= MIN_HELDOUT_CHARS, sizes
    for split in corpus.SPLITS:
        documents = _documents(domain, split)
        assert documents and all(d.strip() for d in documents), (domain, split)
        assert all("\n\n\n" not in d for d in documents)


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_text_matches_manifest(domain, manifest):
    entry = manifest["domains"][domain]
    assert entry["license"] and entry["sources"] and all(entry["sources"].values())
    for split in corpus.SPLITS:
        text = corpus.load_text(domain, split)
        recorded = entry["splits"][split]
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == recorded["sha256"], (domain, split)
        assert len(text) == recorded["chars"]
        assert len(_documents(domain, split)) == recorded["documents"]


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_splits_share_no_document_or_long_paragraph(domain):
    documents = {split: {" ".join(d.split()) for d in _documents(domain, split)} for split in corpus.SPLITS}
    paragraphs = {split: _long_paragraphs(domain, split) for split in corpus.SPLITS}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not documents[a] & documents[b], (domain, a, b)
        shared = paragraphs[a] & paragraphs[b]
        assert not shared, f"{domain}: {len(shared)} paragraphs in both {a} and {b}, e.g. {next(iter(shared))[:80]!r}"


def test_held_out_splits_are_about_five_percent():
    for domain in corpus.DOMAINS:
        train = len(corpus.load_text(domain, "train"))
        for split in ("valid", "test"):
            assert 0.03 <= len(corpus.load_text(domain, split)) / train <= 0.12, (domain, split)


def test_corpus_directory_is_small_and_documented(manifest):
    directory = importlib.resources.files("jaxcl.data").joinpath("corpus")
    files = [f for f in directory.iterdir() if f.is_file()]
    assert sum(len(f.read_bytes()) for f in files) <= MAX_CORPUS_BYTES
    notice = directory.joinpath("NOTICE").read_text("utf-8")
    for domain, entry in manifest["domains"].items():
        assert f"[{domain}]" in notice
        for package, version in entry["sources"].items():
            assert f"{package} {version}" in notice, (domain, package)
    expected = {f"{d}.{s}.txt.xz" for d in corpus.DOMAINS for s in corpus.SPLITS}
    assert expected <= {f.name for f in files}


@pytest.mark.parametrize("bad", ["Bible", "shakespeare", ""])
def test_unknown_domain_is_named_in_the_error(bad):
    with pytest.raises(ValueError, match=re.escape(f"domain {bad!r}") + ".*bible, jargon"):
        corpus.load_text(bad, "train")
    with pytest.raises(ValueError, match=re.escape(f"domain {bad!r}")):
        corpus.domain_token(bad)


@pytest.mark.parametrize("bad", ["validation", "dev", "TRAIN"])
def test_unknown_split_is_named_in_the_error(bad):
    with pytest.raises(ValueError, match=re.escape(f"split {bad!r}") + ".*train, valid, test"):
        corpus.load_text("bible", bad)


def test_tokenizer_size_and_special_ids(tokenizer):
    assert corpus.default_tokenizer_path().is_file()
    assert tokenizer.get_vocab_size() == corpus.TOKENIZER_VOCAB_SIZE == 8192
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.token_to_id("<|pad|>") == 1
    specials = corpus.special_tokens()
    assert len(specials) == 2 + len(corpus.DOMAINS) + 8
    for expected_id, token in enumerate(specials):
        assert tokenizer.token_to_id(token) == expected_id, token
        assert tokenizer.encode(token).ids == [expected_id], token
    for domain in corpus.DOMAINS:
        assert corpus.domain_token(domain) in specials
    assert {f"<|domain_spare_{i}|>" for i in range(8)} <= set(specials)


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_tokenizer_round_trips_each_domain(tokenizer, domain):
    text = corpus.load_text(domain, "valid")
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < 0.5 * len(text)          # the BPE really compresses in-domain text


@pytest.mark.parametrize("text", [
    "  leading spaces, trailing spaces  \n\n\ttab and CRLF\r\n",
    "Ünïcödé — “quotes”, emoji 🙂, CJK 漢字, NUL-free control \x07 bell",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n",
])
def test_tokenizer_round_trips_arbitrary_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_domains_are_really_different(tokenizer):
    """A token-unigram model fit on one domain's train text predicts its own valid split best,
    by at least a bit per token over every other domain's model."""
    vocab = tokenizer.get_vocab_size()

    def ids(text: str) -> np.ndarray:
        encodings = tokenizer.encode_batch(text.split(corpus.DOCUMENT_SEPARATOR))
        return np.concatenate([np.asarray(e.ids, np.int64) for e in encodings])

    log_probs = {}
    for domain in corpus.DOMAINS:
        counts = np.bincount(ids(corpus.load_text(domain, "train")[:400_000]), minlength=vocab) + 0.1
        log_probs[domain] = np.log2(counts / counts.sum())
    for target in corpus.DOMAINS:
        valid = ids(corpus.load_text(target, "valid"))
        cross_entropy = {model: -log_probs[model][valid].mean() for model in corpus.DOMAINS}
        own = cross_entropy.pop(target)
        closest = min(cross_entropy, key=cross_entropy.get)
        assert own + 1.0 < cross_entropy[closest], (target, own, closest, cross_entropy[closest])


@pytest.fixture(scope="module")
def build():
    """scripts/build_corpus.py as a module (its pure helpers need no Debian packages)."""
    spec = importlib.util.spec_from_file_location("build_corpus", REPO_ROOT / "scripts" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module             # dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_build_cleaning_normalises_whitespace_and_overstrike(build):
    raw = "B\bBo\bol\bld\bd   \r\nx\f\n\n\n\n\tindented\u00a0nbsp\x07\n\n\n"
    assert build.clean_text(raw) == "Bold\nx\n\n        indented nbsp"


def test_build_split_is_deterministic_disjoint_and_capped(build):
    rng = np.random.default_rng(0)
    documents = [f"doc {i} " + "x" * int(rng.integers(100, 5_000)) for i in range(2_000)]
    first = build.split_documents(documents, "demo")
    assert first == build.split_documents(documents, "demo")
    assert first != build.split_documents(documents, "other-domain")
    seen = [d for split in build.SPLITS for d in first[split]]
    assert len(seen) == len(set(seen))
    for split in ("valid", "test"):
        size = sum(len(d) for d in first[split])
        assert build.HELDOUT_CHARS <= size < build.HELDOUT_CHARS + max(map(len, documents))
    for split in build.SPLITS:                  # each split keeps source order
        positions = [documents.index(d) for d in first[split]]
        assert positions == sorted(positions)


def test_build_drops_repeated_paragraphs_and_chunks_long_documents(build):
    boilerplate = "This paragraph is long boilerplate that several documents repeat word for word. " * 2
    long_document = "\n\n".join(f"paragraph {i} " + "y" * 990 for i in range(60))
    second = "second " + "z" * 300
    only_boilerplate = "third"
    documents = build.prepare_documents([f"first\n\n{boilerplate}", f"{second}\n\n{boilerplate}",
                                         f"{only_boilerplate}\n\n{boilerplate}", long_document])
    assert documents[0] == f"first\n\n{boilerplate.strip()}"
    assert documents[1] == second               # the repeat is gone, the rest of the document stays
    chunks = documents[2:]                      # the third was mostly a repeat, so it went whole
    assert len(chunks) > 1 and all(len(c) <= build.MAX_DOC_CHARS for c in chunks)
    assert "\n\n".join(chunks) == long_document


def test_unseen_collection_matches_its_manifest_and_shares_nothing_with_the_corpus():
    """`embedded:unseen` (scripts/build_unseen.py): real Debian text the corpus and tokenizer never saw."""
    from jaxcl.data.sources import UNSEEN, open_source

    directory = importlib.resources.files("jaxcl.data").joinpath("unseen")
    unseen = json.loads(directory.joinpath("manifest.json").read_text("utf-8"))
    source = open_source(UNSEEN)
    assert set(source.domains()) == set(unseen["domains"]) and len(unseen["domains"]) >= 2
    assert not set(unseen["domains"]) & set(corpus.DOMAINS)
    notice = " ".join(directory.joinpath("NOTICE").read_text("utf-8").split())
    corpus_paragraphs = set().union(*(_long_paragraphs(d, "train") for d in corpus.DOMAINS))
    for domain, entry in unseen["domains"].items():
        assert entry["license"] and entry["sources"] and all(f"{p} {v}" in notice for p, v in entry["sources"].items())
        paragraphs = {}
        for split in corpus.SPLITS:
            with lzma.open(directory.joinpath(entry["splits"][split]["file"]), "rt", encoding="utf-8") as f:
                text = f.read()
            assert hashlib.sha256(text.encode("utf-8")).hexdigest() == entry["splits"][split]["sha256"]
            docs = source.documents(domain, split)
            assert len(docs) == entry["splits"][split]["documents"] > 0
            paragraphs[split] = {q for d in docs for p in d.split("\n\n") for q in [" ".join(p.split())]
                                 if len(q) >= LEAK_PARAGRAPH_CHARS}
        assert not paragraphs["train"] & (paragraphs["valid"] | paragraphs["test"]), domain
        assert not set().union(*paragraphs.values()) & corpus_paragraphs, domain
