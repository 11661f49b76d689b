"""`jaxcl export RUN_DIR OUT_DIR [--stage N]`: what a run learned, as files the rest of the ecosystem reads.

The model at the end of the run (or after stage N) becomes a Hugging Face checkpoint (`config.json`,
`generation_config.json`, safetensors; `jaxcl.hf.save_pretrained`, crash-atomic) plus the run's tokenizer as
transformers saves it (`tokenizer.json`, `tokenizer_config.json`), so `AutoModelForCausalLM` /
`AutoModelForMaskedLM` and `AutoTokenizer` load it and give jaxcl's logits. ELLE's domain prompts are not
part of a transformers model: the backbone is exported without them (without prompt ids it computes
exactly what the run's model computes), and the prompt table is saved beside it (`prompts.safetensors` +
`prompts.json`, one row block per domain). `jaxcl_export.json` records where the export came from.

SLM: the frozen backbone as above (decoder-LM mode: the decoder; classification: the BERT-family encoder, as
`AutoModel` loads it), and per task (`--task NAME`, default all) its JARe increments as a PEFT LoRA adapter
in `adapters/<task>/` (classification adds the task's head columns, `head.safetensors` + `head.json`) (`adapter_config.json`, `adapter_model.safetensors`,
target modules named as transformers names them). A JARe mixture of S slots with fixed weights w is the
LoRA of rank S·r with `lora_A = concat_k(w_k · down_k)` and `lora_B = concat_k(up_k)ᵀ` (`lora_alpha = r`, so
the scaling is 1): the merged model equals jaxcl's mixed forward for that domain's slots with those weights,
the mean DTKR retrieval weights over the domain's validation queries (`slm_state.json`).

Stage-end checkpoints are kept by every run's retention policy (`ContinualRun.stage_ends`), so `--stage`
finds them however many periodic checkpoints came after.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from jaxcl.errors import InputError  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["ExportError", "export_run", "save_tokenizer"]

EXPORTABLE = ("sequential", "joint", "elle", "slm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja")


class ExportError(InputError):
    """The run directory or the requested stage / task cannot be exported (the message says which)."""


def _recorded_config(run_dir: Path):
    from jaxcl.config import ConfigError, config_from_dict, yaml_error
    from jaxcl.train.checkpoint import complete_steps, read_meta

    if not run_dir.is_dir():
        raise ExportError(f"run directory {str(run_dir)!r} does not exist")
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml
        try:
            tree = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise ExportError(f"{yaml_error(path, e)}: the run's config.yaml is not readable YAML") from None
        try:
            return config_from_dict(tree if isinstance(tree, dict) else {})
        except ConfigError as e:
            reason = " ".join(str(e).split())
            raise ExportError(f"{str(path)!r} is not a jaxcl run config: {reason[:300]}") from None
    steps = complete_steps(run_dir / "checkpoints")
    if not steps:
        raise ExportError(f"{str(run_dir)!r} is not a jaxcl run directory (no config.yaml, no checkpoints/)")
    return config_from_dict(read_meta(run_dir / "checkpoints", steps[-1])["config"])


def _choose_step(run_dir: Path, stage: int | None) -> tuple[int, dict[str, Any]]:
    from jaxcl.train.checkpoint import complete_steps, read_meta

    directory = run_dir / "checkpoints"
    steps = complete_steps(directory)
    if not steps:
        raise ExportError(f"{str(run_dir)!r} holds no complete checkpoint in checkpoints/")
    latest = read_meta(directory, steps[-1])
    n_stages = len(latest.get("stages", []))
    if stage is None:
        if not (latest.get("completed") and latest.get("stage") == n_stages - 1):
            log.warning("%s has not finished (latest checkpoint: stage %s, step %s of it): exporting that model",
                        run_dir, latest.get("stage"), latest.get("stage_step"))
        return steps[-1], latest
    if not 0 <= stage < n_stages:
        raise ExportError(f"--stage {stage} is out of range: the run has stages 0..{n_stages - 1} "
                          f"({', '.join(latest.get('stages', []))})")
    kept = []
    for step in steps:
        meta = read_meta(directory, step)
        if meta.get("completed"):
            if meta.get("stage") == stage:
                return step, meta
            kept.append(meta.get("stage"))
    raise ExportError(f"--stage {stage}: the run has not completed that stage, or its checkpoint is gone "
                      f"(stage ends kept in {str(directory)!r}: {kept})")


EXPORT_MARKER = "jaxcl_export.json"     # what marks a directory as an earlier export (it may be replaced)


def _publish(out_dir: Path, write) -> None:
    """Run `write(staged)` into a staged sibling of `out_dir` and publish it with one directory swap: after a
    kill OUT_DIR is the previous export or this one, never a model without its tokenizer or adapters. Only
    a missing or empty OUT_DIR, or an earlier export, is replaced (`atomic_io.check_replaceable`)."""
    from jaxcl.atomic_io import recover_directory, replace_directory, temporary_sibling

    recover_directory(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = temporary_sibling(out_dir)
    try:
        write(staged)
        replace_directory(staged, out_dir, (EXPORT_MARKER,))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _fill_special_ids(model_cfg, spec: str):
    """Special ids a model config lacks (a model trained from scratch) from the run's tokenizer, so
    transformers' generate stops where the run's documents end."""
    from jaxcl.data.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    fill = {}
    if model_cfg.eos_token_id is None and model_cfg.is_decoder:
        fill["eos_token_id"] = tok.eos_id
    if model_cfg.pad_token_id is None:
        fill["pad_token_id"] = tok.pad_id
    return model_cfg.replace(**fill)


# ----------------------------------------------------------------------------- SLM: PEFT LoRA adapters
# jaxcl adapter target -> (HF module under layer i, rows of the HF output this target fills: None = all)
PEFT_MODULES = {
    "gpt2": {"attn.q": ("transformer.h.{i}.attn.c_attn", 0), "attn.k": ("transformer.h.{i}.attn.c_attn", 1),
             "attn.v": ("transformer.h.{i}.attn.c_attn", 2), "attn.o": ("transformer.h.{i}.attn.c_proj", None),
             "mlp.wi": ("transformer.h.{i}.mlp.c_fc", None), "mlp.wo": ("transformer.h.{i}.mlp.c_proj", None)},
    # the encoder as AutoModel / BertModel loads it (SLM classification's backbone)
    "bert": {"attn.q": ("encoder.layer.{i}.attention.self.query", None),
             "attn.k": ("encoder.layer.{i}.attention.self.key", None),
             "attn.v": ("encoder.layer.{i}.attention.self.value", None),
             "attn.o": ("encoder.layer.{i}.attention.output.dense", None),
             "mlp.wi": ("encoder.layer.{i}.intermediate.dense", None), "mlp.wo": ("encoder.layer.{i}.output.dense", None)},
    "llama": {"attn.q": ("model.layers.{i}.self_attn.q_proj", None), "attn.k": ("model.layers.{i}.self_attn.k_proj", None),
              "attn.v": ("model.layers.{i}.self_attn.v_proj", None), "attn.o": ("model.layers.{i}.self_attn.o_proj", None),
              "mlp.wg": ("model.layers.{i}.mlp.gate_proj", None), "mlp.wi": ("model.layers.{i}.mlp.up_proj", None),
              "mlp.wo": ("model.layers.{i}.mlp.down_proj", None)},
}


def peft_lora_tensors(model_cfg, bank: dict[str, dict[str, Any]], slots, weights) -> tuple[dict[str, Any], dict[str, int]]:
    """The PEFT LoRA tensors (`base_model.model.<module>.lora_A/B.weight`) of the JARe mixture of `slots` with
    fixed `weights`, and each module's rank. `bank[target]["down"]`: [L, P, r, d_in], `["up"]`: [L, P, r, d_out].
    GPT-2's fused c_attn gets one adapter whose B fills the q / k / v row block of each target."""
    import numpy as np

    table = PEFT_MODULES[model_cfg.family]
    slots, w = np.asarray(slots), np.asarray(weights, np.float32)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, int | None]]] = {}
    for target, factors in bank.items():
        down, up = np.asarray(factors["down"], np.float32), np.asarray(factors["up"], np.float32)
        module, block = table[target]
        for layer in range(down.shape[0]):
            a = np.concatenate([w[k] * down[layer, p] for k, p in enumerate(slots)])        # [S r, d_in]
            b = np.concatenate([up[layer, p] for p in slots]).T                              # [d_out, S r]
            parts.setdefault(module.format(i=layer), []).append((a, b, block))
    tensors, ranks = {}, {}
    for module, pieces in parts.items():
        a = np.concatenate([p[0] for p in pieces])
        if pieces[0][2] is None:
            b = pieces[0][1]
        else:                                      # fused q/k/v: block rows, zeros where a target is absent
            d_out = pieces[0][1].shape[0]
            b = np.zeros((3 * d_out, a.shape[0]), np.float32)
            col = 0
            for _, piece_b, block in pieces:
                b[block * d_out:(block + 1) * d_out, col:col + piece_b.shape[1]] = piece_b
                col += piece_b.shape[1]
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b)
        ranks[module] = int(a.shape[0])
    return tensors, ranks


def _adapter_config(model_cfg, ranks: dict[str, int], base: str) -> dict[str, Any]:
    r = max(ranks.values())
    pattern = {m: v for m, v in ranks.items() if v != r}
    task_type = "CAUSAL_LM" if model_cfg.is_decoder else "FEATURE_EXTRACTION"
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base, "r": r, "lora_alpha": r,
            "target_modules": sorted(ranks), "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": model_cfg.family == "gpt2",
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None}


def _export_slm(cfg, run_dir: Path, out_dir: Path, stage: int | None, task: str | None) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    from jaxcl.hf import save_pretrained
    from jaxcl.init_from import load_params
    from jaxcl.models import ModelConfig
    from jaxcl.slm.state import load_state

    if stage is not None:
        raise ExportError("--stage: an SLM run keeps its final state only (each task's adapter is in it): use --task")
    try:
        tensors, state = load_state(run_dir)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    tasks = list(state["tasks"])
    if task is not None and task not in tasks:
        raise ExportError(f"--task {task!r} is not a task of this run (tasks: {', '.join(tasks)})")
    model_cfg = ModelConfig.from_dict(state["model"])
    params = load_params(state["backbone"], model_cfg)
    bank = {t: {"down": tensors[f"bank/{t}/down"], "up": tensors[f"bank/{t}/up"]} for t in state["targets"]}
    spec = state["tokenizer"]
    model_cfg = _fill_special_ids(model_cfg, spec)
    chosen = tasks if task is None else [task]

    def write(staged: Path) -> None:
        save_pretrained(staged, model_cfg, params)
        save_tokenizer(spec, staged)
        for name in chosen:
            info = state["tasks"][name]
            adapter = staged / "adapters" / name
            adapter.mkdir(parents=True)
            lora, ranks = peft_lora_tensors(model_cfg, bank, info["slots"], info["weights"])
            save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
            (adapter / "adapter_config.json").write_text(json.dumps(
                _adapter_config(model_cfg, ranks, str(out_dir.resolve())), indent=2))
            if "columns" in info:          # classification: the task's head columns over mean-pooled states
                cols = np.asarray(info["columns"])
                save_file({"kernel": np.ascontiguousarray(tensors["head/kernel"][:, cols]),
                           "bias": np.ascontiguousarray(tensors["head/bias"][cols])}, adapter / "head.safetensors")
                (adapter / "head.json").write_text(json.dumps({
                    "labels": info["labels"], "pooling": state["pooling"], "logits": "pooled @ kernel + bias",
                    "load": "peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(OUT_DIR), "
                            "OUT_DIR/adapters/<task>)"}, indent=2))
        (staged / EXPORT_MARKER).write_text(json.dumps({
            "run_dir": str(run_dir.resolve()), "method": "slm", "mode": state.get("mode", "lm"),
            "backbone": state["backbone"], "tasks": {n: state["tasks"][n] for n in chosen},
            "weights": state["weights"], "tokenizer": spec}, indent=2))

    _publish(out_dir, write)
    log.info("exported SLM run %s (backbone + %d adapters) -> %s", run_dir, len(chosen), out_dir)
    return out_dir


def save_tokenizer(spec: str, out_dir: str | Path) -> dict[str, int | None]:
    """Write tokenizer `spec` (a `data.tokenizer` value, resolved) into `out_dir` as transformers saves one;
    returns its special ids (eos, pad, mask). A Hugging Face tokenizer directory is copied file by file."""
    from jaxcl.data.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    tok = load_tokenizer(spec)
    source = Path(spec) if spec not in ("default", "auto") else None
    if source is not None and source.is_dir() and (source / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out_dir / name)
    else:
        import transformers
        from jaxcl.data.corpus import default_tokenizer_path

        path = Path(default_tokenizer_path()) if source is None else (source / "tokenizer.json" if source.is_dir()
                                                                      else source)
        names = {"eos_token": tok.eos_id, "pad_token": tok.pad_id, "mask_token": tok.mask_id}
        special = {k: tok.tokenizer.id_to_token(v) for k, v in names.items() if v is not None}
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), **special)
        fast.save_pretrained(out_dir)
    return {"eos": tok.eos_id, "pad": tok.pad_id, "mask": tok.mask_id}


def export_run(run_dir: str | Path, out_dir: str | Path, *, stage: int | None = None,
               task: str | None = None) -> Path:
    """Export run `run_dir`'s model (after `stage`, default: the end of the run) to `out_dir`.

    Errors (`ExportError`, one line): a missing or non-run directory, a stage out of range or not kept,
    `--task` for a run without tasks, a method whose export is not available.
    """
    import numpy as np

    from jaxcl.atomic_io import check_replaceable
    from jaxcl.hf import save_pretrained
    from jaxcl.init_from import load_params, tokenizer_spec
    from jaxcl.models import ModelConfig, without_prompts

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = _recorded_config(run_dir)
    method = cfg.run.method
    if task is not None and method != "slm":
        raise ExportError(f"--task {task!r}: tasks belong to SLM runs, and {str(run_dir)!r} is a {method} run")
    if method not in EXPORTABLE:
        raise ExportError(f"{str(run_dir)!r} is a {method} run; jaxcl export handles {', '.join(EXPORTABLE)} runs "
                          "(their model is the run's checkpoint)")
    if out_dir.resolve() == run_dir.resolve() or run_dir.resolve() in out_dir.resolve().parents:
        raise ExportError(f"OUT_DIR {str(out_dir)!r} is inside the run directory: export somewhere else")
    check_replaceable(out_dir, (EXPORT_MARKER,))      # before any work: a user's file or directory stays as it is
    if method == "slm":
        return _export_slm(cfg, run_dir, out_dir, stage, task)
    step, meta = _choose_step(run_dir, stage)
    model_cfg = ModelConfig.from_dict(meta["model"])
    params = load_params(f"{run_dir}@{step}", model_cfg)
    prompts = None
    if model_cfg.num_prompts:
        prompts = np.asarray(params["prompt_embed"]["embedding"])
        model_cfg, params = without_prompts(model_cfg, params)
    spec = tokenizer_spec(cfg)
    model_cfg = _fill_special_ids(model_cfg, spec)

    def write(staged: Path) -> None:
        save_pretrained(staged, model_cfg, params)
        save_tokenizer(spec, staged)
        if prompts is not None:
            from safetensors.numpy import save_file

            length, count = meta["model"]["prompt_length"], meta["model"]["num_prompts"]
            save_file({"prompt_embed": prompts}, staged / "prompts.safetensors")
            (staged / "prompts.json").write_text(json.dumps({
                "prompt_length": length, "num_prompts": count,
                "rows": {d: [i * length, (i + 1) * length] for i, d in enumerate(meta.get("domains", [])[:count])},
                "note": "ELLE domain prompts: rows [start, end) of prompt_embed, prepended to the token embeddings "
                        "of that domain's text"}, indent=2))
        (staged / EXPORT_MARKER).write_text(json.dumps({
            "run_dir": str(run_dir.resolve()), "method": method, "step": step, "stage": meta.get("stage"),
            "stage_name": (meta.get("stages") or [None])[meta.get("stage", 0)], "completed": meta.get("completed"),
            "tokenizer": spec, "init_from": cfg.init_from}, indent=2))

    _publish(out_dir, write)
    log.info("exported %s (step %d, stage %s) -> %s", run_dir, step, meta.get("stage"), out_dir)
    return out_dir
