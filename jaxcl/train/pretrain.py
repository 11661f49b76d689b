"""Pre-training a base LM: one stage of the shared loop (`ContinualRun`), cached by its resolved config.

    run_dir = pretrain(cfg, model_cfg, domains=("bible",), root=Path("runs/x"), tag="model0-d128")
    params = load_params(str(run_dir), model_cfg, shardings, rng)      # jaxcl.init_from

Methods that need a base LM (SeMem's frozen LMs; any method given no `model.init_from`) call `pretrain`
instead of writing a loop: the pre-training is a real `jaxcl run` (sharded, checkpointed, resumable, with
its own config.yaml, metrics, TensorBoard events and report) in `<root>/pretrain-<tag>-<key>`, where `key`
hashes every config value that changes what is trained, so a second method or run with the same
pre-training reuses it and a different one never does. The result is referenced like any pretrained
checkpoint (`model.init_from=<that dir>`), which is also how a user pre-trains once with `jaxcl train` /
`jaxcl run` and starts several runs from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

from jaxcl.config import Config, ConfigError, ElleConfig, SememConfig, SlmConfig, config_to_dict
from jaxcl.models import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["pretraining_config", "pretraining_key", "pretrain"]

# Parts of a config that do not change what a pre-training run trains (where it lives, how it is laid out
# and saved, how often it logs) or that a sequential run never reads.
_IGNORED = {"run": ("name", "dir", "method"), "checkpoint": None, "mesh": None, "elle": None, "semem": None,
            "slm": None, "train": ("log_every", "eval_every"),
            "data": ("cache", "prepare_processes", "prepare_segment_bytes")}     # where / how tokens are cached


def pretraining_config(cfg: Config, model_cfg: ModelConfig, domains: Sequence[str], run_dir: str | Path) -> Config:
    """The config of the one-stage sequential run that pre-trains `model_cfg` on `domains` (their training
    splits shuffled together, `train.pretrain_steps` steps, or `train.steps`)."""
    if not domains:
        raise ConfigError("pre-training needs at least one domain")
    from jaxcl.init_from import tokenizer_spec

    train = cfg.train
    steps = train.stage_steps[0] if train.stage_steps else (train.pretrain_steps or train.steps)
    return dataclasses.replace(
        cfg, model=model_cfg, init_from=None,
        run=dataclasses.replace(cfg.run, method="sequential" if len(domains) == 1 else "joint", dir=str(run_dir)),
        # the caller's tokenizer as it resolved (its init_from's, when it has one), never re-resolved to "auto"
        data=dataclasses.replace(cfg.data, domains=tuple(domains), tokenizer=tokenizer_spec(cfg)),
        train=dataclasses.replace(train, steps=steps, pretrain_steps=None, stage_steps=()) if len(domains) == 1
        else dataclasses.replace(train, steps=max(1, steps // len(domains)), pretrain_steps=None,
                                 stage_steps=()),
        checkpoint=dataclasses.replace(cfg.checkpoint, resume=True),
        elle=ElleConfig(), semem=SememConfig(), slm=SlmConfig())


def pretraining_key(cfg: Config) -> str:
    """A short hash of everything in `cfg` that changes what its run trains (the cache key)."""
    tree = config_to_dict(cfg)
    for section, keys in _IGNORED.items():
        if keys is None:
            tree.pop(section, None)
        else:
            for key in keys:
                tree.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]


def pretrain(cfg: Config, model_cfg: ModelConfig, domains: Sequence[str], root: str | Path, tag: str) -> Path:
    """Pre-train (or reuse the cached pre-training of) `model_cfg` on `domains`; returns its run directory,
    usable as `model.init_from`. Resumes a pre-training an earlier invocation left unfinished."""
    from jaxcl.runs import runner_class

    probe = pretraining_config(cfg, model_cfg, domains, Path(root))
    run_dir = (Path(root) / f"pretrain-{tag}-{pretraining_key(probe)}").absolute()
    pre_cfg = dataclasses.replace(probe, run=dataclasses.replace(probe.run, dir=str(run_dir)))
    runner = runner_class(pre_cfg.run.method)(pre_cfg)
    runner.announce_finished = False          # a finished pre-training is the cache working, not news
    if (run_dir / "report.json").is_file():
        log.info("pre-training of %s: reusing %s", tag, run_dir)
    runner.run()
    return run_dir
