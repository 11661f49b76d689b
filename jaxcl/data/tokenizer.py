"""Tokenizers: the shipped BPE (`"default"`) or any local `tokenizer.json` / HF tokenizer directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxcl.errors import ConfigError
from jaxcl.errors import TokenizerError, one_line

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "[SEP]", "<eos>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
MASK_CANDIDATES = ("<|mask|>", "[MASK]", "<mask>")


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special ids the data pipeline needs."""

    tokenizer: object
    eos_id: int
    pad_id: int
    mask_id: int | None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def frame(self, text: str, *, eos: bool = True) -> list[int]:
        """`text` as the tokenizer frames one document: what transformers' `tokenizer(text).input_ids` gives
        (the tokenizer.json's post-processor: BOS for LLaMA-family tokenizers, `[CLS] ... [SEP]` for BERT,
        nothing for GPT-2), then one EOS unless that already ends with it (Levanter's `enforce_eos`).
        `eos=False`: without the added EOS (a prompt to continue)."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return ids + [self.eos_id] if eos and (not ids or ids[-1] != self.eos_id) else ids

    def frame_documents(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens `[sum of lengths]`, lengths `[len(documents)]`): every document framed (`frame`) and
        concatenated, documents in order. Tokens are int32."""
        encodings = self.tokenizer.encode_batch(documents, add_special_tokens=True)
        lengths = np.empty(len(encodings), np.int64)
        flat: list[int] = []
        eos = self.eos_id
        for i, enc in enumerate(encodings):
            ids = enc.ids
            flat += ids
            if not ids or ids[-1] != eos:
                flat.append(eos)
            lengths[i] = len(ids) + (not ids or ids[-1] != eos)
        return np.asarray(flat, np.int32), lengths

    def encode_documents(self, documents: list[str]) -> np.ndarray:
        """All documents framed (`frame`) as one int32 token stream: documents never run together."""
        return self.frame_documents(documents)[0]

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's canonical JSON (vocabulary, merges, normalizer, pre- and post-processor)
        and the EOS id: two tokenizers with the same fingerprint give the same token streams."""
        import hashlib

        return hashlib.sha256(f"{self.eos_id}\n{self.tokenizer.to_str()}".encode()).hexdigest()

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _first_id(tok, candidates) -> int | None:
    for token in candidates:
        idx = tok.token_to_id(token)
        if idx is not None:
            return idx
    return None


def read_tokenizer_file(path: str | Path):
    """`tokenizers.Tokenizer.from_file(path)`, with a damaged file (truncated JSON, a wrong schema, bytes that
    are not UTF-8: tokenizers raises a bare Exception for each) as one TokenizerError naming the file."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{str(path)!r} not found (a tokenizer.json is needed)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"{str(path)!r} is not a tokenizers tokenizer.json ({one_line(str(e), 200)}): give a "
                             "complete tokenizer.json") from None


def describe_tokenizer(spec: str) -> str:
    """How error messages name a tokenizer spec."""
    return "shipped with jaxcl (data.tokenizer=default)" if spec in ("default", "auto") else repr(spec)


def load_tokenizer(spec: str = "default") -> TextTokenizer:
    """`"default"` (shipped with jaxcl), a `tokenizer.json` path, or a directory containing one.

    `"auto"` means "default" here; runs resolve it against `model.init_from` first
    (`jaxcl.init_from.tokenizer_spec`)."""
    if spec in ("default", "auto"):
        from jaxcl.data.corpus import default_tokenizer_path
        path = Path(default_tokenizer_path())
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"data.tokenizer={spec!r}: {str(path)!r} not found")
    tok = read_tokenizer_file(path)
    tok.no_truncation()            # a tokenizer.json may carry a model's truncation / padding: never cut a document
    tok.no_padding()
    eos = _first_id(tok, EOS_CANDIDATES)
    if eos is None:
        raise TokenizerError(f"data.tokenizer={spec!r} has none of the end-of-text tokens {EOS_CANDIDATES}")
    pad = _first_id(tok, PAD_CANDIDATES)
    return TextTokenizer(tok, eos_id=eos, pad_id=eos if pad is None else pad,
                         mask_id=_first_id(tok, MASK_CANDIDATES))
