"""Where a run's starting model comes from: `model.init_from` (a pretrained checkpoint the user brings).

    jaxcl run configs/demo.yaml model.init_from=path/to/hf_dir          # config.json + *.safetensors
    jaxcl run configs/demo.yaml model.init_from=runs/base               # a jaxcl run: its latest checkpoint
    jaxcl run configs/demo.yaml model.init_from=runs/base@400           # ... the checkpoint of global step 400
    jaxcl run configs/demo.yaml model.init_from=runs/base@stage1        # ... the model after stage 1

Three steps, each usable on its own:

* `resolve_model_tree` (called by `jaxcl.config.load_config`, before the typed config is built): the
  checkpoint's architecture replaces the config's `model` section, so a config written for one family runs
  from a checkpoint of any family. Keys that do not change the architecture (`NON_ARCHITECTURE_KEYS`: dtype,
  dropout, prompts) keep the config's values. What was replaced is logged; an architecture key given on the
  command line that disagrees with the checkpoint is an error naming the key.
* `tokenizer_spec`: `data.tokenizer: auto` is the checkpoint's tokenizer when its directory holds one (an HF
  directory's `tokenizer.json`, or the tokenizer the source run used), else the shipped one.
* `load_params`: the parameters, each leaf placed straight onto the run's shardings as it is read
  (`load_pretrained(shardings=...)` for HF, an orbax partial restore of `params` for a run directory).
  A loaded prompt table is kept only when the new config asks for prompts of the same shape; otherwise
  the new config's prompts are freshly initialised.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from jaxcl.errors import CheckpointError

log = logging.getLogger(__name__)

__all__ = ["InitSource", "NON_ARCHITECTURE_KEYS", "check_tokenizer_fits", "parse_init_from", "pinned_spec",
           "same_tokenizer", "resolve_model_tree", "source_model_config",
           "tokenizer_spec", "load_params"]

# ModelConfig keys a run may set on top of a loaded checkpoint: they do not change the stored weights'
# shapes or meaning (compute dtype, dropout, the prompt tables a method adds).
NON_ARCHITECTURE_KEYS = frozenset({"dtype", "dropout", "num_prompts", "prompt_length", "remat", "attention",
                                   "attention_block"})


class InitFromError(CheckpointError):
    """`model.init_from` names something that is not a usable checkpoint (the message names the path)."""


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A parsed `model.init_from`: an HF checkpoint directory, or a jaxcl run directory at a step."""

    spec: str
    kind: str                 # "hf" | "run"
    path: Path
    step: int | None = None   # run: the checkpoint's global step (None = latest, or the stage's end)
    stage: int | None = None  # run: the model after this stage

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"


def parse_init_from(spec: str) -> InitSource:
    """Classify `spec` (`PATH`, `PATH@STEP`, `PATH@stageN`) and check that it exists; errors name the path."""
    if not isinstance(spec, str) or not spec.strip():
        raise InitFromError(f"model.init_from must be a directory path, got {spec!r}")
    path, step, stage = spec, None, None
    match = re.fullmatch(r"(.+)@(stage)?(\d+)", spec)
    if match and not Path(spec).exists():
        path = match.group(1)
        if match.group(2):
            stage = int(match.group(3))
        else:
            step = int(match.group(3))
    directory = Path(path).expanduser()
    if not directory.is_dir() and "@" in spec and not match:
        base, suffix = spec.rsplit("@", 1)
        if Path(base).expanduser().is_dir():
            raise InitFromError(f"model.init_from={spec!r}: '@{suffix}' selects no checkpoint: write RUN@STEP (a "
                                "global step, e.g. @400), RUN@stageN (the end of stage N, e.g. @stage0) or RUN alone "
                                "(the latest checkpoint)")
    if directory.exists() and not directory.is_dir():
        raise InitFromError(f"model.init_from={spec!r}: {str(directory)!r} is a file, not a checkpoint directory (give "
                            "the Hugging Face checkpoint directory that holds config.json, or a jaxcl run directory)")
    if not directory.is_dir():
        raise InitFromError(f"model.init_from={spec!r}: directory {str(directory)!r} does not exist")
    if (directory / "config.json").is_file():
        if step is not None or stage is not None:
            raise InitFromError(f"model.init_from={spec!r}: @STEP / @stageN select a checkpoint of a jaxcl run "
                                f"directory, and {str(directory)!r} is a Hugging Face checkpoint")
        return InitSource(spec, "hf", directory.resolve())
    if (directory / "checkpoints").is_dir():
        return InitSource(spec, "run", directory.resolve(), step, stage)
    raise InitFromError(f"model.init_from={spec!r}: {str(directory)!r} is neither a Hugging Face checkpoint "
                        "directory (config.json + *.safetensors) nor a jaxcl run directory (checkpoints/)")


# ----------------------------------------------------------------------------- run directories
def _run_steps(src: InitSource) -> list[int]:
    from jaxcl.train.checkpoint import complete_steps

    steps = complete_steps(src.checkpoints)
    if not steps:
        raise InitFromError(f"model.init_from={src.spec!r}: {str(src.checkpoints)!r} holds no complete checkpoint")
    return steps


def run_step(src: InitSource) -> tuple[int, dict[str, Any]]:
    """The global step a run-directory source names, and that checkpoint's metadata."""
    from jaxcl.train.checkpoint import read_meta

    steps = _run_steps(src)
    if src.stage is not None:
        found = []
        for step in steps:
            meta = read_meta(src.checkpoints, step)
            if meta.get("completed") and meta.get("stage") == src.stage:
                return step, meta
            if meta.get("completed"):
                found.append(meta.get("stage"))
        raise InitFromError(f"model.init_from={src.spec!r}: no checkpoint of the end of stage {src.stage} in "
                            f"{str(src.checkpoints)!r} (stages kept: {sorted(set(found))})")
    step = steps[-1] if src.step is None else src.step
    if step not in steps:
        raise InitFromError(f"model.init_from={src.spec!r}: no checkpoint of step {step} in "
                            f"{str(src.checkpoints)!r} (steps kept: {steps})")
    return step, read_meta(src.checkpoints, step)


def pinned_spec(src: InitSource) -> str:
    """`src` as an absolute path, a run directory pinned to the checkpoint step it names now (`/abs/run@400`):
    what a run records, so that it means the same model from any working directory and after the source run
    trains further."""
    if src.kind == "hf":
        return str(src.path)
    step, _ = run_step(src)
    return f"{src.path}@{step}"


# ----------------------------------------------------------------------------- architecture
def source_model_config(src: InitSource):
    """The `ModelConfig` of the checkpoint `src` names (HF: from config.json and the tensor names)."""
    from jaxcl.models import ModelConfig

    if src.kind == "hf":
        from jaxcl.hf import read_pretrained_config
        return read_pretrained_config(src.path)
    _, meta = run_step(src)
    return ModelConfig.from_dict(meta["model"])


def resolve_model_tree(tree: Mapping[str, Any], explicit: Iterable[str] = ()) -> dict[str, Any]:
    """The config tree with its `model` section replaced by the `model.init_from` checkpoint's architecture.

    `explicit`: the `model.*` keys set on the command line; one that disagrees with the checkpoint (and is
    an architecture key) raises `ConfigError` naming it. Returns `tree` unchanged without `init_from`.
    """
    from jaxcl.models.config import ConfigError

    model = dict(tree.get("model") or {})
    spec = model.get("init_from")
    if spec is None:
        return dict(tree)
    try:
        src = parse_init_from(spec)
        loaded = source_model_config(src).to_dict()
        spec = pinned_spec(src)
    except InitFromError as e:
        raise ConfigError(str(e)) from None
    explicit = set(explicit)
    for key in sorted(explicit - {"init_from"} - NON_ARCHITECTURE_KEYS):
        if key in loaded and model.get(key) != loaded[key]:
            raise ConfigError(f"model.{key}={model.get(key)!r} was given on the command line, but the checkpoint "
                              f"model.init_from={spec!r} has {key}={loaded[key]!r}: drop the override (the "
                              "architecture comes from the checkpoint)")
        if key not in loaded:
            raise ConfigError(f"unknown config key model.{key}")
    replaced = {k: (model[k], loaded[k]) for k in sorted(set(model) & set(loaded) - NON_ARCHITECTURE_KEYS)
                if model[k] is not None and model[k] != loaded[k]}
    if replaced:
        log.info("model.init_from=%s: the checkpoint's architecture replaces %s", spec,
                 ", ".join(f"model.{k}={old!r} -> {new!r}" for k, (old, new) in replaced.items()))
    kept = {k: model[k] for k in NON_ARCHITECTURE_KEYS if k in model}
    unknown = sorted(set(model) - set(loaded) - {"init_from"})
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join('model.' + k for k in unknown)}")
    if loaded.get("num_prompts") and "num_prompts" not in kept:
        kept["num_prompts"] = 0          # a source run's prompts belong to its stream; ask for them explicitly
    return {**tree, "model": {**loaded, **kept, "init_from": spec}}


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_spec(cfg) -> str:
    """What `data.tokenizer` means for `cfg`: `auto` is the init_from checkpoint's tokenizer if it has one
    (HF: `tokenizer.json` in its directory; run: the tokenizer that run used), else the shipped one."""
    spec = cfg.data.tokenizer
    if spec != "auto":
        return spec
    if cfg.init_from is None:
        return "default"
    src = parse_init_from(cfg.init_from)
    if src.kind == "hf":
        if (src.path / "tokenizer.json").is_file():
            return str(src.path)
        from jaxcl.models.config import ConfigError

        raise ConfigError(f"data.tokenizer=auto: model.init_from={cfg.init_from!r} has no tokenizer.json (a fast "
                          "tokenizer), and the shipped one would feed the pretrained model meaningless ids: set "
                          "data.tokenizer to the model's tokenizer.json or tokenizer directory")
    from jaxcl.config import config_from_dict

    _, meta = run_step(src)
    recorded = meta.get("config")
    if recorded is None:
        return "default"
    source_cfg = config_from_dict(recorded)
    return tokenizer_spec(source_cfg)


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two `data.tokenizer` specs name the same tokenizer (the same tokenizer.json bytes)."""
    def file_of(spec: str) -> Path:
        if spec in ("default", "auto"):
            from jaxcl.data.corpus import default_tokenizer_path
            return Path(default_tokenizer_path())
        path = Path(spec).expanduser()
        return path / "tokenizer.json" if path.is_dir() else path

    fa, fb = file_of(a), file_of(b)
    return fa.resolve() == fb.resolve() or (fa.is_file() and fb.is_file() and fa.read_bytes() == fb.read_bytes())


def check_tokenizer_fits(cfg, tokenizer, spec: str) -> None:
    """A tokenizer with more tokens than the model's embedding table has rows is a `ConfigError` naming both."""
    from jaxcl.data.tokenizer import describe_tokenizer
    from jaxcl.models.config import ConfigError

    if cfg.model.vocab_size < tokenizer.vocab_size:
        origin = f" (from model.init_from={cfg.init_from!r})" if cfg.init_from else ""
        raise ConfigError(f"the tokenizer {describe_tokenizer(spec)} has {tokenizer.vocab_size} tokens, but the "
                          f"model's embedding table has model.vocab_size={cfg.model.vocab_size} rows{origin}: use the "
                          "model's own tokenizer (data.tokenizer)")


# ----------------------------------------------------------------------------- parameters
def load_params(spec: str, model_cfg, shardings: Any = None, rng=None) -> Any:
    """Parameters of `model_cfg` from checkpoint `spec`, each leaf placed on `shardings` as it is read
    (default: this process's first local device, for tools that run unsharded).

    `model_cfg` is the run's model config (the checkpoint's architecture plus the run's non-architecture
    keys); prompt tables the checkpoint lacks (or holds in another shape) are initialised from `rng`
    (default `jax.random.key(0)`).
    """
    import jax

    from jaxcl.models import abstract_params

    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_params(model_cfg))
    rng = jax.random.key(0) if rng is None else rng

    src = parse_init_from(spec)
    stored = source_model_config(src)
    backbone_cfg = model_cfg.replace(num_prompts=0)
    compute = {k: getattr(model_cfg, k) for k in ("dtype", "dropout", "remat", "attention", "attention_block")}
    if stored.replace(num_prompts=0, prompt_length=1, **compute) != \
            backbone_cfg.replace(prompt_length=1):
        raise InitFromError(f"model.init_from={spec!r}: the run's model config differs from the checkpoint's "
                            "architecture (resolve the config with jaxcl.config.load_config)")
    backbone_shardings = {k: v for k, v in shardings.items() if k != "prompt_embed"}
    keep_prompts = (model_cfg.num_prompts and stored.num_prompts == model_cfg.num_prompts
                    and stored.prompt_length == model_cfg.prompt_length)
    if src.kind == "hf":
        from jaxcl.hf import load_pretrained

        _, params = load_pretrained(src.path, shardings=backbone_shardings)
    else:
        from jaxcl.train.checkpoint import restore_params

        step, _ = run_step(src)
        wanted = {k: v for k, v in shardings.items() if k != "prompt_embed" or keep_prompts}
        shapes = abstract_params(stored if keep_prompts else stored.replace(num_prompts=0))
        params = restore_params(src.checkpoints, step, shapes, wanted)
        log.info("model.init_from=%s: restored step %d of %s", spec, step, src.checkpoints)
    if model_cfg.num_prompts and "prompt_embed" not in params:
        from jaxcl.transforms import add_prompts

        params, _ = add_prompts(params, backbone_cfg, num_prompts=model_cfg.num_prompts,
                                prompt_length=model_cfg.prompt_length, rng=rng)
        params["prompt_embed"] = jax.device_put(params["prompt_embed"], shardings["prompt_embed"])
    return params
