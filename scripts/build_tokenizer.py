#!/usr/bin/env python3
"""Train jaxcl's default tokenizer: a byte-level BPE on the embedded corpus' train splits.

Usage (from the repository root, after ``scripts/build_corpus.py`` if the corpus changed)::

    python scripts/build_tokenizer.py      # writes jaxcl/data/tokenizer/tokenizer.json

Only the train splits are read, so valid/test perplexities are measured on text the tokenizer
never saw. The vocabulary has 8192 entries: the special tokens (``<|endoftext|>`` = 0,
``<|pad|>`` = 1, one ``<|domain:NAME|>`` per domain, eight spare domain tokens), the 256 byte
symbols, and BPE merges for the rest. Byte-level pre-tokenization and decoding make every string
encodable and ``decode(encode(text).ids) == text`` for text without special-token strings.

Training is deterministic (documents are fed in corpus order; repeated runs, in one process or
in several, give byte-identical files); as a guard the script trains twice and refuses to write
if the two results differ. It prints tokens per character on every domain's valid split.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxcl.data import corpus

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "jaxcl" / "data" / "tokenizer" / "tokenizer.json"


def training_documents() -> list[str]:
    """Every train-split document of every domain, in stage order then corpus order."""
    return [document
            for domain in corpus.list_domains()
            for document in corpus.load_text(domain, "train").split(corpus.DOCUMENT_SEPARATOR)]


def train_tokenizer(documents: list[str]) -> Tokenizer:
    """A byte-level BPE with the special tokens first, so their ids are fixed (0, 1, 2, ...)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=corpus.TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(corpus.special_tokens()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """Refuse to ship a tokenizer whose size or special-token ids differ from the contract."""
    if tokenizer.get_vocab_size() != corpus.TOKENIZER_VOCAB_SIZE:
        raise RuntimeError(f"vocab size {tokenizer.get_vocab_size()} != {corpus.TOKENIZER_VOCAB_SIZE}")
    for expected_id, token in enumerate(corpus.special_tokens()):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"{token} has id {tokenizer.token_to_id(token)}, expected {expected_id}")


def report(tokenizer: Tokenizer) -> None:
    """Tokens per character on each valid split, and the round trip on each, for the record."""
    for domain in corpus.list_domains():
        text = corpus.load_text(domain, "valid")
        ids = tokenizer.encode(text).ids
        exact = tokenizer.decode(ids) == text
        print(f"{domain:9s} valid: {len(ids):>8,} tokens / {len(text):>8,} chars = "
              f"{len(ids) / len(text):.3f} tokens/char, round trip {'exact' if exact else 'BROKEN'}")


def main(argv: list[str] | None = None) -> int:
    """Train twice, check determinism and the special-token contract, then write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help=f"output file (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    documents = training_documents()
    first, second = train_tokenizer(documents), train_tokenizer(documents)
    if first.to_str() != second.to_str():
        print("error: two training runs gave different tokenizers; not writing", file=sys.stderr)
        return 1
    check_tokenizer(first)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    first.save(str(args.out), pretty=True)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, "
          f"{first.get_vocab_size()} tokens, trained on {len(documents):,} documents)")
    report(first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
