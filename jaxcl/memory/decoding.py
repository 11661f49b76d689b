"""A kNN-LM memory as decoding and scoring use it: a datastore, k, and λ / T (constant, or SeMem's calibrator).

    from jaxcl.memory.decoding import KnnMemory
    memory = KnnMemory(Datastore.open(path), k=16, lam=0.25, temperature=1.0)   # the kNN-LM of Khandelwal et al.
    memory = KnnMemory.from_run("runs/semem")          # a finished SeMem run: its selective memory + calibrator
    out = generate(cfg, params, ids, mask, max_new_tokens=32, memory=memory)

Every decoding step asks `lookup` for the neighbours of the batch's query keys (one batched search: the
model's `knn_keys` at the current position, `[batch, d_model]`) and the λ / T to mix with; the mixing itself
(`knn_lm_logprobs`) runs on the device. With a calibrator, λ is per token from the same features SeMem trained
it on (`calibrator_features`: the LM's confidence and entropy, the log frequency of the context token in the
stream, the neighbour distances and values), so a memory decodes exactly as the run scored it.

A finished SeMem run leaves, per model and policy, `<run>/<model tag>/<policy>/memory.npz` (calibrator, the
stream's log token frequencies, k, and the LM's checkpoint) beside the datastore; `from_run` reads them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxcl.memory.calibrator import Calibrator, calibrator_features
from jaxcl.memory.datastore import Datastore, DatastoreError, params_fingerprint
from jaxcl.models.layout import stack_layers

__all__ = ["KnnMemory", "MEMORY_FILE", "save_memory_info"]

MEMORY_FILE = "memory.npz"


@dataclasses.dataclass(eq=False)
class KnnMemory:
    """A datastore plus how to mix its neighbours into p_LM (Khandelwal et al. 2020, eq. 2; SeMem §2.4).

    store: keys `[n, d_model]` of one model (its fingerprint in the manifest); k: neighbours per query;
    lam / temperature: the constant λ and T (ignored for λ when `calibrator` is given; T then is the
    calibrator's); calibrator + log_freq `[vocab]` (log token counts of the streamed text): SeMem's per-token
    λ. source: the checkpoint of the LM whose keys the store holds (`from_run`), else None.
    """

    store: Datastore
    k: int = 16
    lam: float = 0.25
    temperature: float = 1.0
    calibrator: Calibrator | None = None
    log_freq: np.ndarray | None = None
    source: str | None = None

    def __post_init__(self):
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"memory k must be a positive integer, got {self.k!r}")
        if not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError(f"memory lam (λ) must be in [0, 1], got {self.lam}")
        if not float(self.temperature) > 0:
            raise ValueError(f"memory temperature must be > 0, got {self.temperature}")
        if self.calibrator is not None and self.log_freq is None:
            raise ValueError("a memory with a calibrator needs log_freq [vocab] (the stream's log token counts)")
        if len(self.store) == 0:
            raise DatastoreError(f"memory {self.store.root!r} is empty: nothing to retrieve")
        self._checked: Any = None

    @property
    def width(self) -> int:
        """Neighbours per query: min(k, rows in the store) (fixed for a call, so shapes never change)."""
        return min(int(self.k), len(self.store))

    def check(self, cfg, params) -> None:
        """Raise `DatastoreError` (one line) unless the store holds keys of exactly this model: the width must
        be `cfg.d_model` and the manifest's fingerprint (when recorded) that of `params`. Checked once per
        params object."""
        if self.store.dim != cfg.d_model:
            raise DatastoreError(f"memory {self.store.root!r} holds keys of width {self.store.dim}; this model's "
                                 f"kNN keys have width d_model={cfg.d_model}")
        if self._checked is params:
            return
        recorded = self.store.manifest.get("model_fingerprint") or ""
        actual = params_fingerprint(stack_layers(params)) if recorded else ""       # of the stacked layout
        if recorded and recorded != actual:
            raise DatastoreError(f"memory {self.store.root!r} holds keys of model {recorded!r}, not of this model "
                                 f"({actual!r}): decode with the LM that built it"
                                 + (f" ({self.source})" if self.source else ""))
        self._checked = params

    def lookup(self, queries: np.ndarray, lm_conf: np.ndarray, lm_entropy: np.ndarray,
               contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.float32]:
        """Neighbours and mixing weights of one decoding step.

        queries [b, d] (the model's knn_keys); lm_conf, lm_entropy [b] (of p_LM); contexts [b] int (the token at
        the query position). Returns dists [b, width] float32 (squared L2, ascending), values [b, width] int32,
        λ [b] float32 and T (float32 scalar).
        """
        dists, ids = self.store.search(np.asarray(queries, np.float32), self.width)
        values = self.store.values[ids].astype(np.int32)
        if self.calibrator is None:
            lam = np.full(len(dists), self.lam, np.float32)
            return dists.astype(np.float32), values, lam, np.float32(self.temperature)
        feats = calibrator_features(np.asarray(lm_conf, np.float32), np.asarray(lm_entropy, np.float32),
                                    self.log_freq[np.asarray(contexts)], dists, values)
        return (dists.astype(np.float32), values, self.calibrator.lam(feats).astype(np.float32),
                np.float32(self.calibrator.temperature))

    @classmethod
    def from_run(cls, run_dir: str | Path, *, policy: str = "semem", model: int = 0) -> "KnnMemory":
        """The memory a finished SeMem run built for its `model`-th LM (0: `model`, then `semem.extra_models`)
        under `policy` ("semem": selective, "full": every token), with its final calibrator. Errors name the
        path and what is missing."""
        run_dir = Path(run_dir)
        tags = sorted((p.name for p in run_dir.glob("model*-d*") if p.is_dir()),
                      key=lambda t: int(t[len("model"):].split("-")[0]))
        if not tags:
            raise DatastoreError(f"{str(run_dir)!r} is not a SeMem run directory (no model*/ memories)")
        if not 0 <= model < len(tags):
            raise DatastoreError(f"{str(run_dir)!r} has SeMem memories of {len(tags)} model(s) ({tags}); "
                                 f"model index {model} is out of range")
        where = run_dir / tags[model] / policy
        info_path = where / MEMORY_FILE
        if not info_path.is_file():
            policies = sorted(p.parent.name for p in (run_dir / tags[model]).glob(f"*/{MEMORY_FILE}"))
            raise DatastoreError(f"{str(info_path)!r} does not exist: the SeMem run has not finished this model"
                                 + (f" (policies with a memory: {policies})" if policies else ""))
        with np.load(info_path) as z:
            info = json.loads(bytes(z["info.json"]).decode())
            calibrator = Calibrator.from_arrays(z, "calibrator/")
            log_freq = np.asarray(z["log_freq"], np.float32)
        store = Datastore.open(str(where / "datastore"))
        return cls(store, k=int(info["k"]), lam=float(info["lam"]), temperature=calibrator.temperature,
                   calibrator=calibrator, log_freq=log_freq, source=info["source"])


def save_memory_info(path: str | Path, *, calibrator: Calibrator, log_freq: np.ndarray, k: int, lam: float,
                     source: str) -> None:
    """Write `memory.npz` (atomically) beside a policy's datastore: what `KnnMemory.from_run` needs."""
    import io

    from jaxcl.rundir import atomic_write

    info = {"k": int(k), "lam": float(lam), "source": source}
    arrays = {"info.json": np.frombuffer(json.dumps(info).encode(), np.uint8),
              "log_freq": np.asarray(log_freq, np.float32)} | calibrator.to_arrays("calibrator/")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(Path(path), buf.getvalue())
