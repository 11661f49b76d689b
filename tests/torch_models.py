"""Reference PyTorch `transformers` models built locally from tiny random configs (no download)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[torch]' to run parity tests")
transformers = pytest.importorskip("transformers")

# (name, HF class, HF config kwargs) — odd vocab sizes, head counts that are not powers of two, GQA.
GPT2_CONFIGS = [
    ("gpt2-odd", dict(vocab_size=101, n_embd=48, n_layer=2, n_head=6, n_positions=32)),
    ("gpt2-3heads", dict(vocab_size=257, n_embd=30, n_layer=3, n_head=3, n_positions=24, n_inner=52)),
]
LLAMA_CONFIGS = [
    ("llama-gqa", dict(vocab_size=103, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2, intermediate_size=72)),
    ("llama-mqa-tied", dict(vocab_size=99, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=1, intermediate_size=40, tie_word_embeddings=True)),
    ("llama-headdim-rope3", dict(vocab_size=111, hidden_size=36, num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=3, head_dim=10, intermediate_size=50, attention_bias=True,
                                 rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                      low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_position_embeddings=8))),
]
BERT_CONFIGS = [
    ("bert-odd", dict(vocab_size=105, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      intermediate_size=80, max_position_embeddings=32)),
    ("bert-3heads", dict(vocab_size=77, hidden_size=36, num_hidden_layers=1, num_attention_heads=3,
                         intermediate_size=20, max_position_embeddings=16, hidden_act="gelu_new")),
]


def randomize_(model, seed: int) -> None:
    """Replace HF's small default init with O(1)-scale random weights, so differences show in logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 1:          # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def build_hf_model(family: str, kwargs: dict, seed: int = 0, head: bool = True):
    """A randomly initialised HF model in eval mode (dropout off)."""
    t = transformers
    kwargs = dict(kwargs)
    if family == "gpt2":
        kwargs.setdefault("bos_token_id", 0)
        kwargs.setdefault("eos_token_id", 0)
        config, cls = t.GPT2Config(**kwargs), (t.GPT2LMHeadModel if head else t.GPT2Model)
    elif family == "llama":
        config, cls = t.LlamaConfig(**kwargs), (t.LlamaForCausalLM if head else t.LlamaModel)
    else:
        config, cls = t.BertConfig(**kwargs), (t.BertForMaskedLM if head else t.BertModel)
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize_(model, seed)
    return model


def torch_outputs(model, ids: np.ndarray, mask: np.ndarray | None):
    """(logits, final hidden state, last block's FFN input, all hidden states [L+1, b, s, d]) from a HF model."""
    captured = {}
    base = model.base_model
    layers = base.h if hasattr(base, "h") else (base.layers if hasattr(base, "layers") else base.encoder.layer)
    ffn = getattr(layers[-1], "mlp", None) or layers[-1].intermediate

    def capture(module, args, output):      # must return None: a returned value replaces the output
        captured["ffn_in"] = args[0]

    hook = ffn.register_forward_hook(capture)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                        output_hidden_states=True)
    finally:
        hook.remove()
    logits = out.logits.numpy() if hasattr(out, "logits") else None
    all_hidden = np.stack([h.numpy() for h in out.hidden_states])
    return logits, out.hidden_states[-1].numpy(), captured["ffn_in"].numpy(), all_hidden


def random_batch(vocab: int, batch: int, seq: int, padding: str | None, seed: int = 0):
    """Token ids and a 0/1 mask with ragged left or right padding (row 0 is never padded)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, size=(batch, seq)).astype(np.int64)
    if padding is None:
        return ids, None
    mask = np.ones((batch, seq), np.int64)
    for row in range(1, batch):
        n_pad = rng.randint(1, seq - 1)
        if padding == "right":
            mask[row, seq - n_pad:] = 0
        else:
            mask[row, :n_pad] = 0
    ids = np.where(mask.astype(bool), ids, 0)
    return ids, mask
