"""A finished SLM LM-mode run's adapters at inference: DTKR retrieval from the text picks the JARe mixture.

    adapters = SlmAdapters.from_run("runs/slm-lm")
    mix, tasks = adapters.select(["The Lord said unto Moses"])      # per text, from its text alone (no task id)
    out = generate(cfg, params, ids, mask, max_new_tokens=32, adapters=mix)
    mix = adapters.for_task("bible", batch=4)                       # or one task's fixed mixture (as exported)

`select` embeds each text with the run's sentence encoder (`slm.encoder`, `slm.max_len`, `slm.query_layers`)
and retrieves exactly as the run's evaluation did (`dtkr.retrieve_from_text` with `slm.top_k`,
`slm.retrieval`, `slm.mix`, `slm.task_choice`), so a prompt decodes with the adapter mixture the method
would have chosen for it (Song et al. 2023, SLM §3.3: no task id at inference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jaxcl.slm import dtkr, jare

__all__ = ["SlmAdapters"]


class SlmAdapters:
    """The JARe bank, DTKR keys and retrieval settings of a finished SLM LM-mode run."""

    def __init__(self, run_dir: str | Path):
        from jaxcl.config import ConfigError, config_from_dict
        from jaxcl.rundir import recorded_config
        from jaxcl.slm.encoder import SentenceEncoder, resolve_encoder_dir
        from jaxcl.slm.state import load_state

        self.run_dir = Path(run_dir)
        tensors, info = load_state(self.run_dir)
        if info.get("mode") != "lm":
            raise ConfigError(f"{str(self.run_dir)!r} is an SLM {info.get('mode')} run: only LM-mode runs "
                              "(slm.mode=lm) have a language model to decode with")
        tree = recorded_config(self.run_dir)
        if tree is None:
            raise FileNotFoundError(f"{str(self.run_dir / 'config.yaml')!r} is missing: the run's retrieval settings "
                                    "are recorded there")
        self.settings = config_from_dict(tree).slm
        self.info = info
        self.domains: tuple[str, ...] = tuple(info["domains"])
        self.bank = {t: {"down": jnp.asarray(tensors[f"bank/{t}/down"]), "up": jnp.asarray(tensors[f"bank/{t}/up"])}
                     for t in info["targets"]}
        self.keys = dtkr.KeyBank(keys=jnp.asarray(tensors["keys/keys"]),
                                 slot_task=jnp.asarray(tensors["keys/slot_task"]),
                                 **{f: jnp.asarray(tensors[f"keys/{f}"]) for f in dtkr.KeyBank.STATISTICS
                                    if f"keys/{f}" in tensors})
        s = self.settings
        self.encoder = SentenceEncoder(resolve_encoder_dir(s.encoder), s.max_len, None, query_layers=s.query_layers)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "SlmAdapters":
        return cls(run_dir)

    @property
    def backbone(self) -> str:
        """The frozen backbone's checkpoint (an init_from spec)."""
        return self.info["backbone"]

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        """DTKR queries `[n, dim]` of `texts` (the run's encoder; long texts truncated to slm.max_len)."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ids, mask = self.encoder.tokenize(list(texts), "prompts")
        return self.encoder.embed(ids, mask)

    def select(self, texts: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
        """(adapters for `generate` — G = len(texts) with per-example retrieval, else 1 — and the task each
        text was routed to)."""
        s = self.settings
        slots, weights, task = dtkr.retrieve_from_text(jnp.asarray(self.queries(texts)), self.keys, s.top_k,
                                                       s.retrieval == "example", s.max_tasks, s.mix, s.task_choice)
        names = [self.domains[int(t)] if 0 <= int(t) < len(self.domains) else f"task{int(t)}" for t in np.asarray(task)]
        if len(names) == 1 and len(texts) > 1:
            names = names * len(texts)
        return jare.mix_adapters(self.bank, slots, weights), names

    def for_task(self, name: str) -> dict[str, Any]:
        """Task `name`'s fixed mixture (its slots, mean retrieval weights; what `jaxcl export` writes), G = 1."""
        from jaxcl.config import ConfigError

        if name not in self.info["tasks"]:
            raise ConfigError(f"--domain {name!r} is not a task of this SLM run (tasks: {', '.join(self.domains)})")
        task = self.info["tasks"][name]
        return jare.mix_adapters(self.bank, jnp.asarray([task["slots"]], jnp.int32),
                                 jnp.asarray([task["weights"]], jnp.float32))
