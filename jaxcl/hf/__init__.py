"""Hugging Face interop: read and write `transformers`-compatible checkpoints (safetensors).

    from jaxcl.hf import load_pretrained, save_pretrained
    cfg, params = load_pretrained("path/to/hf_dir")
    save_pretrained("out_dir", cfg, params)
"""

from jaxcl.hf.checkpoint import load_pretrained, read_pretrained_config, save_pretrained
from jaxcl.hf.config import CheckpointError, hf_config_from_model, model_config_from_hf, read_config_json
from jaxcl.hf.mapping import table_for

__all__ = ["load_pretrained", "read_pretrained_config", "save_pretrained", "CheckpointError", "model_config_from_hf", "hf_config_from_model",
           "read_config_json", "table_for"]
