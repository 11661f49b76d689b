"""What a directory decodes with: the model, its tokenizer, and the continual-learning state a run left.

    from jaxcl.inference import open_decoder
    dec = open_decoder("hf_dir")                      # a Hugging Face checkpoint (tokenizer.json beside it)
    dec = open_decoder("runs/elle@stage2")            # a run's checkpoint (PATH, PATH@STEP, PATH@stageN)
    dec = open_decoder("runs/semem", memory=True)     # a SeMem run: its frozen LM + selective memory + calibrator
    dec = open_decoder("runs/slm-lm")                 # an SLM LM-mode run: backbone + DTKR / JARe per prompt
    state, routed = dec.state_for(texts, domain=None) # generate(..., **state): adapters / prompt_ids / memory

`state_for` is where the methods' inference rules live: ELLE decodes with the backbone, or with a trained
domain's prompt when `domain` names one; SLM routes every prompt by DTKR retrieval from its text (no task id),
or uses a named task's fixed mixture; a memory (`--memory`) mixes p_kNN into every step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from jaxcl.config import ConfigError

__all__ = ["Decoder", "open_decoder"]


@dataclasses.dataclass
class Decoder:
    """A model ready to decode: config, params (one local device), tokenizer spec, and its method state."""

    model_cfg: Any
    params: Any
    tokenizer: str
    method: str | None = None          # the run's method (None: a Hugging Face directory)
    domains: tuple[str, ...] = ()      # ELLE: prompt i is domain i's
    trained_domains: int = 0           # ELLE: prompts of domains[:trained_domains] are trained at this checkpoint
    memory: Any = None                 # a KnnMemory
    slm: Any = None                    # SlmAdapters

    def state_for(self, texts: Sequence[str], domain: str | None = None) -> tuple[dict[str, Any], list[str] | None]:
        """(keyword arguments for `generate` / scoring, and the domain each text is decoded as, or None)."""
        import numpy as np

        state: dict[str, Any] = {"memory": self.memory}
        if self.slm is not None:
            if domain is not None:
                state["adapters"] = self.slm.for_task(domain)
                return state, [domain] * len(texts)
            state["adapters"], routed = self.slm.select(texts)
            return state, routed
        if domain is None:
            return state, None
        if not self.domains or not self.model_cfg.num_prompts:
            raise ConfigError(f"--domain {domain!r}: this model has no domain prompts or tasks (only ELLE runs with "
                              "elle.prompt_length > 0 and SLM LM-mode runs do)")
        if domain not in self.domains:
            raise ConfigError(f"--domain {domain!r} is not a domain of this run (domains: {', '.join(self.domains)})")
        index = self.domains.index(domain)
        if index >= self.trained_domains:
            raise ConfigError(f"--domain {domain!r}: its prompt is not trained at this checkpoint (domains trained: "
                              f"{', '.join(self.domains[:self.trained_domains]) or 'none'}); pick a later @stageN")
        state["prompt_ids"] = np.full((len(texts),), index, np.int32)
        return state, [domain] * len(texts)


def _memory_from(spec: str | bool, run_dir: Path | None, policy: str, model: int):
    """A KnnMemory from `--memory` (True: the run's own; a path: a SeMem run dir or a datastore)."""
    from jaxcl.memory.datastore import Datastore, DatastoreError
    from jaxcl.memory.decoding import KnnMemory

    if spec is True or spec == "":
        if run_dir is None:
            raise ConfigError("--memory without a path needs a SeMem run directory as the source; give --memory PATH "
                              "(a datastore or a SeMem run directory)")
        return KnnMemory.from_run(run_dir, policy=policy, model=model)
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"--memory {spec!r}: directory does not exist")
    if any(path.glob("model*-d*")):
        return KnnMemory.from_run(path, policy=policy, model=model)
    try:
        return KnnMemory(Datastore.open(str(path)))
    except DatastoreError as e:
        raise ConfigError(f"--memory {spec!r}: {e}") from None


def _method(run_dir: Path) -> str | None:
    """The method of the run in `run_dir` (its config.yaml), or None for a directory that is not a run."""
    from jaxcl.rundir import recorded_config

    tree = recorded_config(run_dir) if (run_dir / "config.yaml").is_file() else None
    return None if tree is None else (tree.get("run") or {}).get("method", "sequential")


def open_decoder(path: str, *, memory: bool | str = False, policy: str = "semem", model: int = 0) -> Decoder:
    """Open `path` (an HF directory, a run directory `PATH[@STEP|@stageN]`, a SeMem or SLM LM-mode run) for decoding.

    memory: False (none), True (a SeMem run's own memory of `policy` for its `model`-th LM), or a path (a SeMem
    run directory or a datastore: constant λ = 0.25, T = 1, k = 16). Errors are one line naming the path.
    """
    from jaxcl.config import config_from_dict
    from jaxcl.init_from import load_params, parse_init_from, run_step, source_model_config, tokenizer_spec
    from jaxcl.models import ModelConfig
    from jaxcl.rundir import recorded_config

    base = Path(path.split("@")[0] if "@" in path and not Path(path).exists() else path)
    method = _method(base) if base.is_dir() else None
    run_dir = base if method is not None else None
    knn = _memory_from(memory, run_dir if method == "semem" else None, policy, model) if memory is not False else None
    if method == "slm":
        from jaxcl.slm.retrieval import SlmAdapters

        slm = SlmAdapters.from_run(base)
        model_cfg = ModelConfig.from_dict(slm.info["model"])
        params = load_params(slm.backbone, model_cfg)
        dec = Decoder(model_cfg, params, slm.info["tokenizer"], method, slm=slm, memory=knn)
    elif method == "semem":
        from jaxcl.memory.decoding import KnnMemory

        lm = knn if knn is not None and knn.source else KnnMemory.from_run(base, policy=policy, model=model)
        src = parse_init_from(lm.source)
        model_cfg = source_model_config(src)
        dec = Decoder(model_cfg, load_params(lm.source, model_cfg), tokenizer_spec(config_from_dict(recorded_config(base))),
                      method, memory=knn)
    else:
        src = parse_init_from(path)
        model_cfg = source_model_config(src)
        params = load_params(path, model_cfg)
        if src.kind == "hf":
            if not (Path(src.path) / "tokenizer.json").is_file():
                raise FileNotFoundError(f"{str(src.path)!r} has no tokenizer.json: decoding needs the model's "
                                        "tokenizer beside it")
            dec = Decoder(model_cfg, params, str(src.path), memory=knn)
        else:
            _, meta = run_step(src)
            cfg = config_from_dict(meta["config"])
            dec = Decoder(model_cfg, params, tokenizer_spec(cfg), cfg.run.method,
                          domains=tuple(meta.get("domains") or cfg.data.domains),
                          trained_domains=int(meta.get("stage", -1)) + 1, memory=knn)
    if dec.memory is not None:
        dec.memory.check(dec.model_cfg, dec.params)     # another model's memory: one line, before any output
    return dec
