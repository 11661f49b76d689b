"""`load_pretrained` / `save_pretrained`: Hugging Face safetensors directories <-> jaxcl params.

Loading reads one tensor at a time from the safetensors files (no torch, no network), checks every
shape against the target model before converting it, and can place each leaf straight onto its
`NamedSharding`. Saving writes the whole checkpoint into a staged sibling directory and publishes it
with one atomic directory swap (`jaxcl.atomic_io.replace_directory`), so after a kill at any moment the
directory holds the complete old checkpoint or the complete new one, never shards of both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np

from jaxcl.atomic_io import check_replaceable, recover_directory, replace_directory, temporary_sibling
from jaxcl.errors import reading
from jaxcl.hf.config import (CheckpointError, generation_config_json, hf_config_from_model, model_config_from_hf,
                             read_config_json)
from jaxcl.hf.mapping import Entry, FamilyTable, legacy_names, table_for
from jaxcl.models import ModelConfig, abstract_params

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
# Buffers some exporters write that are not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq")

ParamPath = tuple[str, ...]
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")     # safetensors dtype names jaxcl reads as weights


# ----------------------------------------------------------------------------- reading
def _reading(file: Path):
    """A safetensors or index file that cannot be parsed (truncated, not safetensors, bad JSON) becomes one
    CheckpointError naming it."""
    return reading(repr(str(file)), "the checkpoint file is damaged or incomplete; copy it again")


class SafetensorsReader:
    """Lazy, per-tensor access to all safetensors files of a checkpoint directory."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.directory = directory
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            with _reading(index):
                weight_map = json.loads(index.read_text())
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{str(index)!r} has no 'weight_map'")
            self.locations = {name: directory / file for name, file in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                other = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".msgpack")]
                hint = f" (found {other}: only safetensors weights are supported)" if other else ""
                raise FileNotFoundError(f"no *.safetensors weights in {str(directory)!r}{hint}")
            self.locations = {}
            for file in files:
                with _reading(file), safe_open(file, framework="numpy") as handle:
                    for name in handle.keys():
                        self.locations[name] = file
        for file in set(self.locations.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{str(file)!r} is listed in {SAFETENSORS_INDEX} but does not exist")
        self._index = index if index.is_file() else None
        self._handles: dict[tuple[Path, str], Any] = {}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.locations)

    def _handle(self, file: Path, framework: str):
        key = (file, framework)
        if key not in self._handles:
            with _reading(file):
                self._handles[key] = self._safe_open(file, framework=framework)
        return self._handles[key]

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bfloat16 tensors are read through the flax backend)."""
        file = self.locations[name]
        handle = self._handle(file, "numpy")
        if name not in handle.keys():      # an index that disagrees with its shards
            raise CheckpointError(f"tensor {name!r} is not in {str(file)!r}, although {str(self._index)!r} says it "
                                  f"is there (the shard holds {len(handle.keys())} other tensors)")
        with _reading(file):
            dtype = handle.get_slice(name).get_dtype()
            if dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor {name!r} in {str(file)!r} is {dtype}, not a floating-point weight")
            if dtype == "BF16":
                array = np.asarray(self._handle(file, "flax").get_tensor(name), dtype=np.float32)
            else:
                array = np.asarray(handle.get_tensor(name), dtype=np.float32)
        if not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise CheckpointError(f"tensor {name!r} in {str(file)!r} holds {bad} NaN or infinite values of "
                                  f"{np.size(array)}: the checkpoint is damaged (or its training diverged)")
        return array


def _flatten(tree: dict[str, Any], prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    out: dict[ParamPath, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat: dict[ParamPath, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _hf_key(entry: Entry, prefix: str, layer: int | None) -> str:
    key = entry.hf.format(i=layer) if entry.per_layer else entry.hf
    return prefix + key if entry.in_base else key


def _layer_indices(entry: Entry, cfg: ModelConfig) -> Iterable[int | None]:
    return range(cfg.n_layers) if entry.per_layer else (None,)


def _leaf_shapes(entry: Entry, shapes: dict[ParamPath, tuple[int, ...]]) -> list[tuple[int, ...]]:
    return [shapes[p][1:] if entry.per_layer else shapes[p] for p in entry.params]


def _base_prefix(table: FamilyTable, names: frozenset[str]) -> str:
    return table.base_prefix if any(n.startswith(table.base_prefix) for n in names) else ""


def read_pretrained_config(directory: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` `load_pretrained(directory)` would return, without reading the weights (only the
    tensor names, and the output head when a tied config stores one)."""
    directory = Path(directory)
    recover_directory(directory)
    raw = read_config_json(directory)
    reader = SafetensorsReader(directory)
    return _untie_stored_head(_model_config(raw, directory, reader), reader, directory)


def _model_config(raw: dict[str, Any], directory: Path, reader: SafetensorsReader) -> ModelConfig:
    """`model_config_from_hf`, with a ModelConfig check failing on a value the file holds named as that file
    (`model.d_model must be ...` alone names a key the user never wrote)."""
    try:
        return model_config_from_hf(raw, where=str(directory / "config.json"), tensor_names=reader.names)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{str(directory / 'config.json')!r}: {' '.join(str(e).split())}") from None


def load_pretrained(directory: str | os.PathLike, *, shardings: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Read an HF checkpoint directory (config.json + *.safetensors) into `(ModelConfig, params)`.

    `shardings`: optional tree of `jax.sharding.Sharding` matching the params (e.g. from
    `jaxcl.parallel`); each leaf is placed directly onto its sharding.
    Errors name the missing/mis-shaped tensor and the directory.
    """
    directory = Path(directory)
    recover_directory(directory)          # a save killed mid-swap left the old version aside
    raw = read_config_json(directory)
    reader = SafetensorsReader(directory)
    cfg = _untie_stored_head(_model_config(raw, directory, reader), reader, directory)
    table = table_for(cfg)
    prefix = _base_prefix(table, reader.names)
    shapes = {p: tuple(s.shape) for p, s in _flatten(abstract_params(cfg)).items()}
    arrays = {p: np.empty(s, np.float32) for p, s in shapes.items()}
    used: set[str] = set()

    for entry in table.entries:
        leaf_shapes = _leaf_shapes(entry, shapes)
        expected = entry.layout.hf_shape(leaf_shapes)
        for layer in _layer_indices(entry, cfg):
            key = _hf_key(entry, prefix, layer)
            found = next((k for k in (key, *legacy_names(key)) if k in reader.locations), None)
            if found is None:
                raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {str(directory)!r} "
                                      f"(needed for jaxcl parameter {'/'.join(entry.params[0])})")
            tensor = reader.get(found)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(
                    f"tensor {found!r} in {str(reader.locations[found])!r} has shape {tuple(tensor.shape)}, "
                    f"expected {expected} from config.json")
            used.add(found)
            for path, part in zip(entry.params, entry.layout.to_jax(tensor, leaf_shapes)):
                if layer is None:
                    arrays[path] = part
                else:
                    arrays[path][layer] = part

    unused = sorted(n for n in reader.names - used if not n.endswith(IGNORED_SUFFIXES))
    if unused:
        log.warning("load_pretrained(%s): %d tensors not used by jaxcl: %s", directory, len(unused),
                    ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
    params = _unflatten(arrays)
    if shardings is None:
        params = jax.tree.map(jax.numpy.asarray, params)
    else:
        params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
    return cfg, params


def _untie_stored_head(cfg: ModelConfig, reader: SafetensorsReader, directory: Path) -> ModelConfig:
    """A config that says tied embeddings while the weights hold a *different* output head is loaded
    untied with the stored head, as transformers does (`PreTrainedModel.tie_weights` skips tying when
    both tensors are present and differ, and warns). A stored head equal to the embeddings stays tied."""
    if not cfg.tie_embeddings or not cfg.has_lm_head:
        return cfg
    untied = cfg.replace(tie_embeddings=False)
    table = table_for(untied)
    prefix = _base_prefix(table, reader.names)
    head = next(e for e in table.entries if e.params == (("lm_head", "kernel"),))
    embed = next(e for e in table.entries if e.params == (("embed", "embedding"),))
    head_key = _hf_key(head, prefix, None)
    if head_key not in reader.locations:
        return cfg
    stored, embedding = reader.get(head_key), reader.get(_hf_key(embed, prefix, None))
    if stored.shape == embedding.shape and np.array_equal(stored, embedding):
        return cfg
    log.warning("load_pretrained(%s): config.json says tie_word_embeddings=true, but the weights hold an output "
                "head %r that differs from the token embeddings; using the stored head, untied (as transformers "
                "does). Set tie_word_embeddings=false in config.json to silence this.", directory, head_key)
    return untied


# ----------------------------------------------------------------------------- writing
def _to_host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), dtype=np.float32)


def _check_params(cfg: ModelConfig, flat: dict[ParamPath, Any]) -> dict[ParamPath, tuple[int, ...]]:
    shapes = {p: tuple(s.shape) for p, s in _flatten(abstract_params(cfg)).items()}
    missing = sorted(set(shapes) - set(flat))
    extra = sorted(set(flat) - set(shapes))
    if missing:
        raise ValueError(f"params are missing {'/'.join(missing[0])} (and {len(missing) - 1} more) for this config")
    if extra:
        raise ValueError(f"params have {'/'.join(extra[0])} which this config does not use")
    for path, shape in shapes.items():
        if tuple(np.shape(flat[path])) != shape:
            raise ValueError(f"param {'/'.join(path)} has shape {tuple(np.shape(flat[path]))}, "
                             f"config expects {shape}")
    return shapes


def _stage_other_files(directory: Path, staged: Path) -> None:
    """Hard-link (or copy) what an existing checkpoint directory holds besides the files a save writes
    (tokenizer, README, generation config ...) into the staged directory, so the swap keeps them."""
    if not directory.is_dir():
        return
    for item in directory.iterdir():
        if item.name in (SAFETENSORS_INDEX, "config.json", GENERATION_CONFIG) or (item.name.startswith("model")
                                                              and item.name.endswith(".safetensors")):
            continue
        if item.is_dir():
            shutil.copytree(item, staged / item.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(item, staged / item.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def save_pretrained(directory: str | os.PathLike, cfg: ModelConfig, params: dict[str, Any], *,
                    max_shard_bytes: int = 5 * 2**30, markers: tuple[str, ...] = ("config.json",),
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `params` as an HF checkpoint (config.json + safetensors) loadable by `from_pretrained`.

    `directory` may be missing, empty, or a directory holding one of `markers` (default: an HF checkpoint,
    whose model is replaced); a file or any other non-empty directory is refused before anything is
    written (`jaxcl.errors.OutputError`, `jaxcl.atomic_io.check_replaceable`). `extra_files` (name -> bytes)
    are written into the checkpoint with it (e.g. a provenance record).

    Crash-atomic: everything is written into a staged sibling directory (other files already in
    `directory`, e.g. a tokenizer, are carried over by hard links) and published with one atomic swap,
    so after a kill at any moment `directory` is the complete old checkpoint or the complete new one.
    In multi-process runs every process must call this (sharded leaves are gathered); only process 0
    writes.
    """
    directory = Path(directory)
    if cfg.num_prompts:
        raise CheckpointError(f"the model has learned prompts (model.num_prompts={cfg.num_prompts}), which Hugging "
                              "Face checkpoints cannot hold: export the backbone with "
                              "jaxcl.models.without_prompts(cfg, params)")
    flat = _flatten(params)
    shapes = _check_params(cfg, flat)
    table = table_for(cfg)
    has_head = cfg.is_decoder or cfg.mlm_head
    prefix = table.base_prefix if has_head else ""
    host = {p: _to_host(v) for p, v in flat.items()}
    tensors: dict[str, np.ndarray] = {}
    for entry in table.entries:
        for layer in _layer_indices(entry, cfg):
            parts = [host[p] if layer is None else host[p][layer] for p in entry.params]
            tensors[_hf_key(entry, prefix, layer)] = entry.layout.to_hf(parts)
    assert set(p for e in table.entries for p in e.params) == set(shapes), "mapping table does not cover params"
    try:      # before writing anything: transformers may refuse the config
        hf_config = hf_config_from_model(cfg, table.architecture)
    except Exception as e:   # transformers' config validators raise several error types
        reason = " ".join(str(e).split())
        raise CheckpointError(f"transformers cannot represent this {cfg.family} config: {reason[-300:]}") from None
    check_replaceable(directory, markers, "directory")
    if jax.process_index() != 0:
        return directory

    recover_directory(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staged = temporary_sibling(directory)
    staged.mkdir()
    try:
        _stage_other_files(directory, staged)
        _write_checkpoint_files(staged, tensors, max_shard_bytes)
        (staged / "config.json").write_bytes(hf_config.to_json_string(use_diff=False).encode())
        generation = generation_config_json(cfg)
        if generation is not None:
            (staged / GENERATION_CONFIG).write_text(generation)
        for name, data in (extra_files or {}).items():
            (staged / name).unlink(missing_ok=True)       # a hard link to the old directory's copy: never write through
            (staged / name).write_bytes(data)
        replace_directory(staged, directory, markers, "directory")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return directory


def _write_checkpoint_files(directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """The safetensors files (one, or shards of at most `max_shard_bytes` plus the HF index)."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / SAFETENSORS_SINGLE, metadata=metadata)
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata=metadata)
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
