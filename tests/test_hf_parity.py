"""jaxcl models loaded from HF checkpoints reproduce `transformers` PyTorch outputs (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest

from torch_models import BERT_CONFIGS, GPT2_CONFIGS, LLAMA_CONFIGS, build_hf_model, random_batch, torch_outputs

from jaxcl.hf import load_pretrained
from jaxcl.models import build

CASES = ([("gpt2",) + c for c in GPT2_CONFIGS] + [("llama",) + c for c in LLAMA_CONFIGS]
         + [("bert",) + c for c in BERT_CONFIGS])
TOL = 1e-4


@pytest.mark.parametrize("family,name,kwargs", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_logits_hidden_states_and_knn_keys_match_transformers(tmp_path, family, name, kwargs, padding):
    hf_model = build_hf_model(family, kwargs, seed=len(name))
    hf_model.save_pretrained(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    assert cfg.family == family

    ids, mask = random_batch(cfg.vocab_size, batch=3, seq=12, padding=padding, seed=len(name))
    ref_logits, ref_hidden, ref_ffn_in, ref_all = torch_outputs(hf_model, ids, mask)
    out = build(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32),
                           None if mask is None else jnp.asarray(mask), output_hidden_states=True)
    real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    assert out.logits.dtype == jnp.float32 and out.logits.shape == ref_logits.shape
    # Logits must be O(1)-scale for the tolerance to mean something.
    assert np.abs(ref_logits[real]).max() > 0.5
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref_logits[real], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.hidden)[real], ref_hidden[real], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.knn_keys)[real], ref_ffn_in[real], atol=TOL, rtol=0)
    # Every layer's output, laid out as transformers' hidden_states (embeddings first).
    assert out.hidden_states.shape == ref_all.shape == (cfg.n_layers + 1,) + ref_hidden.shape
    np.testing.assert_allclose(np.asarray(out.hidden_states)[:, real], ref_all[:, real], atol=TOL, rtol=0)


def test_gqa_really_groups_heads(tmp_path):
    """Guard against a silent MHA fallback: the GQA case has fewer kv heads in the loaded params."""
    hf_model = build_hf_model("llama", LLAMA_CONFIGS[0][1])
    hf_model.save_pretrained(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    assert (cfg.n_heads, cfg.n_kv_heads) == (6, 2)
    assert params["layers"]["attn"]["k"]["kernel"].shape == (2, 48, 2, 8)
    assert params["layers"]["attn"]["q"]["kernel"].shape == (2, 48, 6, 8)


def test_bert_base_model_with_pooler(tmp_path):
    """An HF `BertModel` (no MLM head, with pooler) loads; hidden states and pooler match."""
    import torch

    hf_model = build_hf_model("bert", BERT_CONFIGS[0][1], head=False)
    hf_model.save_pretrained(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    assert cfg.pooler and not cfg.mlm_head
    ids, mask = random_batch(cfg.vocab_size, batch=2, seq=9, padding="right")
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = build(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    assert out.logits is None
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.hidden)[real], ref.last_hidden_state.numpy()[real], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.pooled), ref.pooler_output.numpy(), atol=TOL, rtol=0)


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    """bf16 safetensors (common for released LLaMA weights) load as the same values in float32."""
    import torch

    hf_model = build_hf_model("llama", LLAMA_CONFIGS[0][1]).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    _, params = load_pretrained(tmp_path)
    ref = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()     # [heads*hd, d]
    got = np.asarray(params["layers"]["attn"]["q"]["kernel"][1]).reshape(ref.shape[1], -1).T
    np.testing.assert_array_equal(got, ref)
