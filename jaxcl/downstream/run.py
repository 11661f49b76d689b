"""`jaxcl downstream RUN_DIR`: fine-tune every chosen stage checkpoint on every chosen end task; the downstream
matrix with intervals.

    result = DownstreamRun("runs/elle-demo", stages="all", seeds=[0]).run()     # also: jaxcl downstream ...
    result["variants"]["prompt"]["accuracy"]["matrix"]      # [rows][tasks], null where not evaluated

Rows are the run's stage-end checkpoints (`RUN@stageN`; a joint run has one, its final model) and, with
`hf=DIR`, a Hugging Face checkpoint as the reference row before them. Columns are the configured tasks
(`downstream.tasks: {domain: task}`): after stage i a task is *seen* when its domain was trained by then,
so the seen cells form the usual continual-learning matrix and the others measure forward transfer.

Protocol (ELLE, Qin et al. 2022, sec. 4.1 and thunlp/ELLE's fine-tuning scripts; ContinualLM, Ke et al.
2023, evaluates every domain's end task after each stage):
- each cell fine-tunes a copy of the whole model with a new linear head (`jaxcl.downstream.finetune`) with
  one seed per pre-training seed (`seeds`, default the run's `run.seed`);
- the learning rate comes from `downstream.lrs`, chosen once per task on the stage-0 checkpoint's
  validation macro-F1 (ties: the smaller rate) with the first seed, then held fixed for every row, seed
  and variant (`grid.json`); the test split is read once per cell, never for a choice;
- an ELLE checkpoint is fine-tuned with its task's domain prompt (`prompt_ids` = the domain's index in the
  stream, exactly as pre-training fed it) once that domain was trained, and without a prompt before;
  `prompts=False` (`--no-prompts`) is the same checkpoint with the prompt omitted: the two variants are
  kept side by side and compared, paired.

Statistics (`jaxcl.eval.metrics.classification_scores`): accuracy and macro-F1 in points, averaged over
seeds, with 95 % percentile intervals from a bootstrap over test texts; every score of a task uses the
same resamples (`text_draws(n, R, task)`), so differences between rows, variants and runs are paired.
Forgetting of a task = its best score after its domain was learned minus its score in the last row.

Output in `<out>` (default `RUN_DIR/downstream/`): `cells/<variant>/<row>/<task>/seed<s>.json` (one per
fine-tuning, written atomically when it finishes: a killed invocation loses at most the cell in flight, and
a rerun reuses every finished cell whose checkpoint and settings still match), `grid/` and `grid.json`,
`downstream.json` (everything above, rebuilt from all cells on disk), `downstream_<variant>.png` heatmaps
and `tensorboard/`.

Multi-host (a TPU slice): every process runs the same cells on the run's mesh (`mesh.*`; batches sharded over
the data axes, parameters as the run laid them out); process 0 reads and writes the files and broadcasts what
to compute and which learning rates were chosen, so the output directory need only be visible to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxcl import rundir
from jaxcl.config import Config, ConfigError, config_from_dict, config_to_dict
from jaxcl.downstream.finetune import finetune, finetune_steps
from jaxcl.downstream.tasks import DownstreamTask, resolve_tasks
from jaxcl.errors import RunDirError
from jaxcl.eval.metrics import classification_scores, percentile_interval, text_draws

log = logging.getLogger(__name__)

__all__ = ["DownstreamRun", "Row", "build_summary", "params_checksum", "OUT_DIR"]

OUT_DIR = "downstream"
METHODS = ("sequential", "elle", "joint")
LEVEL = 0.95
METRICS = ("accuracy", "macro_f1")


@dataclasses.dataclass(frozen=True)
class Row:
    """One checkpoint the tasks are fine-tuned from."""

    name: str                 # "stage3", "joint" or "reference"
    label: str                # what the matrix row says: "after manpages", "joint (final)", "reference (HF)"
    spec: str                 # a model.init_from spec: "/abs/run@stage3" or an HF directory
    stage: int | None         # the run's stage index (None: the HF reference)
    step: int | None          # the checkpoint's global step
    trained: tuple[str, ...]  # domains trained by the end of this row
    identity: str             # a cheap fingerprint of the checkpoint files (meta bytes or the HF config + weights)


def _process_index() -> int:
    import jax

    return jax.process_index()


def _from_process_0(value: Any) -> Any:
    """`value` as process 0 has it (a number or a flat array), on every process: what to compute and which
    rate was chosen are decided where the files are read and written, so every host runs the same cells."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def _write(path: Path, text: str) -> None:
    """Atomic write by process 0 (every process computes the same cells; one writes them)."""
    if _process_index() == 0:
        rundir.atomic_write(path, text)


def params_checksum(params: Any) -> str:
    """A content fingerprint of a parameter tree, computed where the arrays live (sharded, multi-host safe):
    per leaf the wrapping uint32 sum of its float32 bit patterns times position-dependent odd weights (exact
    integer arithmetic, so independent of sharding and summation order), hashed with the leaf paths."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def sums(tree):
        def one(x):
            bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
            weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
            return jnp.sum(bits * weights, dtype=jnp.uint32)
        return jax.tree.map(one, tree)

    h = hashlib.sha256()
    for path, value in sorted(jax.tree_util.tree_leaves_with_path(jax.device_get(sums(params))),
                              key=lambda t: jax.tree_util.keystr(t[0])):
        h.update(f"{jax.tree_util.keystr(path)}={int(value)};".encode())
    return h.hexdigest()[:16]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _task_data_sha(task: DownstreamTask) -> str:
    h = hashlib.sha256()
    for split in ("train", "valid", "test"):
        s = task.split(split)
        h.update(split.encode())
        h.update(json.dumps([list(s.texts), s.labels.tolist(), list(s.label_names)]).encode())
    return h.hexdigest()[:16]


class DownstreamRun:
    """See the module docstring. Arguments mirror `jaxcl downstream`:

    run_dir: a jaxcl run directory (sequential, joint or ELLE), or with `hf` alone an output directory.
    stages: "all" or a list of stage indices; tasks: names (default every configured task);
    seeds: fine-tuning seeds (default the run's run.seed); hf: an HF checkpoint directory as the reference row;
    prompts: fine-tune an ELLE run's checkpoints with their domain prompts (default downstream.prompts);
    seen_only: only the cells of tasks whose domain the row has trained (the reference row: every task);
    overrides: `downstream.*` and `mesh.*` dotted overrides; out: output directory (default RUN_DIR/downstream).
    Errors (ConfigError / RunDirError, one line): not a run directory, a method without a fine-tunable
    backbone (SeMem, SLM), a stage that does not exist, an unknown task, a domain with no task mapping.
    """

    def __init__(self, run_dir: str | Path, *, stages: str | Sequence[int] = "all", tasks: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, hf: str | None = None, prompts: bool | None = None,
                 seen_only: bool = False, overrides: Sequence[str] = (), out: str | Path | None = None):
        self.run_dir = Path(run_dir)
        self.hf = str(Path(hf).expanduser().resolve()) if hf else None
        self.cfg, self.has_run = self._config(overrides)
        self.settings = self.cfg.downstream
        self.out = Path(out) if out else self.run_dir / OUT_DIR
        self.method = self.cfg.run.method if self.has_run else "reference"
        if self.has_run and self.method not in METHODS:
            raise ConfigError(f"{self.run_dir} is a {self.method} run: downstream fine-tuning applies to "
                              f"{', '.join(METHODS)} runs (SeMem and SLM keep their backbone frozen)")
        self.domains = self._domains()
        self.rows = self._rows(stages)
        self.tasks = resolve_tasks(self.settings, self.domains if self.has_run else tuple(self.settings.tasks),
                                   tasks)
        self.seeds = sorted(set(int(s) for s in seeds)) if seeds else [self.cfg.run.seed]
        if any(s < 0 or s >= 2 ** 31 for s in self.seeds):
            raise ConfigError(f"--seeds must be in 0..2**31-1, got {self.seeds}")
        self.prompted_model = self.has_run and self.method == "elle" and self.cfg.elle.prompt_length > 0
        self.prompts = (self.settings.prompts if prompts is None else prompts) and self.prompted_model
        self.variant = "prompt" if self.prompts else ("no_prompt" if self.prompted_model else "plain")
        self.seen_only = seen_only
        from jaxcl.downstream.classifier import resolve_pooling
        from jaxcl.init_from import parse_init_from, source_model_config

        for row in self.rows:                 # a pooling a row's model cannot do fails before anything is written
            resolve_pooling(source_model_config(parse_init_from(row.spec)), self.settings.pooling)
        self._tokenizers: dict[str, Any] = {}
        self._mesh, self._rules = None, None

    # ------------------------------------------------------------------ what to evaluate
    def _config(self, overrides: Sequence[str]) -> tuple[Config, bool]:
        from jaxcl.config import _merge, parse_overrides

        extra = parse_overrides(overrides)
        bad = sorted(set(extra) - {"downstream", "mesh"})
        if bad:
            raise ConfigError(f"jaxcl downstream takes downstream.* and mesh.* overrides only, got "
                              f"{', '.join(k + '.*' for k in bad)} (the run's other settings are what it trained with)")
        recorded = rundir.recorded_config(self.run_dir) if self.run_dir.is_dir() else None
        if recorded is not None and isinstance(extra.get("downstream"), dict) and "tasks" in extra["downstream"]:
            recorded = {**recorded, "downstream": {k: v for k, v in (recorded.get("downstream") or {}).items()
                                                   if k != "tasks"}}      # a tasks override replaces the mapping
        if recorded is not None:
            try:
                config_from_dict(recorded)
            except ConfigError as e:
                raise ConfigError(f"{self.run_dir}/config.yaml: {e}") from None
            return config_from_dict(_merge(recorded, extra)), True      # an override's error names its key
        if self.hf is None:
            what = "does not exist" if not self.run_dir.exists() else "holds no jaxcl run (no config.yaml)"
            raise RunDirError(f"{self.run_dir} {what}: give a run directory of jaxcl run / jaxcl train, or --hf DIR "
                              "to fine-tune a Hugging Face checkpoint (results go to RUN_DIR/downstream)")
        from jaxcl.init_from import resolve_model_tree, tokenizer_spec

        tree = resolve_model_tree(_merge({"model": {"init_from": self.hf}, "data": {"tokenizer": "auto"}}, extra))
        probe = config_from_dict(tree)
        tree["data"] = {**tree["data"], "tokenizer": tokenizer_spec(probe)}
        return config_from_dict(tree), False

    def _domains(self) -> tuple[str, ...]:
        if not self.has_run:
            return ()
        from jaxcl.data.sources import open_source

        return tuple(self.cfg.data.domains) or open_source(self.cfg.data.source, self.cfg.data.text_field).domains()

    def _rows(self, stages) -> list[Row]:
        rows = []
        if self.hf is not None:
            from jaxcl.init_from import parse_init_from

            src = parse_init_from(self.hf)
            files = sorted(p for p in src.path.iterdir() if p.suffix in (".json", ".safetensors"))
            identity = _sha([(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files])
            rows.append(Row("reference", "reference (HF)", self.hf, None, None, (), identity))
        if not self.has_run:
            if stages != "all":
                raise ConfigError(f"--stages {stages}: {self.run_dir} holds no run; --hf alone evaluates the "
                                  "reference row only")
            return rows
        from jaxcl.train.checkpoint import ITEM_MARKERS, complete_steps, read_meta

        directory = self.run_dir / "checkpoints"
        ends: dict[int, int] = {}
        for step in complete_steps(directory):
            meta = read_meta(directory, step)
            if meta.get("completed") and meta.get("stage") is not None:
                ends[int(meta["stage"])] = step
        n_stages = 1 if self.method == "joint" else len(self.domains)
        if stages == "all":
            chosen = sorted(ends)
            if not chosen:
                raise RunDirError(f"{directory} holds no stage-end checkpoint yet: finish at least stage 0 "
                                  "(jaxcl run resumes where it stopped)")
        else:
            chosen = sorted(set(int(s) for s in stages))
            for s in chosen:
                if not 0 <= s < n_stages:
                    raise ConfigError(f"--stages {s}: the {self.method} run has stages 0..{n_stages - 1}")
                if s not in ends:
                    raise ConfigError(f"--stages {s}: no checkpoint of the end of stage {s} in {directory} "
                                      f"(stages kept: {sorted(ends) or 'none'})")
        for s in chosen:
            meta_path = directory / str(ends[s]) / "meta" / ITEM_MARKERS["meta"]
            identity = hashlib.sha256(meta_path.read_bytes()).hexdigest()[:16]
            spec = f"{self.run_dir.resolve()}@stage{s}"
            if self.method == "joint":
                rows.append(Row("joint", "joint (final)", spec, s, ends[s], tuple(self.domains), identity))
            else:
                trained = tuple(self.domains[:s + 1]) + tuple(d for st in self.domains[:s + 1]
                                                              for d in self.cfg.data.mixture.get(st, {}))
                rows.append(Row(f"stage{s}", f"after {self.domains[s]}", spec, s, ends[s],
                                tuple(dict.fromkeys(trained)), identity))
        return rows

    def seen(self, row: Row, task: DownstreamTask) -> bool:
        """Whether `row` has trained `task`'s domain (the reference row: never)."""
        return task.domain in row.trained

    def prompt_id(self, row: Row, task: DownstreamTask, prompts: bool) -> int | None:
        """The domain prompt `task` is fine-tuned with from `row` (None: no prompt)."""
        if not (prompts and self.prompted_model and row.stage is not None and self.seen(row, task)):
            return None
        return self.domains.index(task.domain)

    # ------------------------------------------------------------------ loading
    def tokenizer_for(self, row: Row):
        from jaxcl.data.tokenizer import load_tokenizer
        from jaxcl.init_from import tokenizer_spec

        spec = self.cfg.data.tokenizer if row.stage is not None else tokenizer_spec(
            dataclasses.replace(self.cfg, init_from=row.spec,
                                data=dataclasses.replace(self.cfg.data, tokenizer="auto")))
        if spec not in self._tokenizers:
            self._tokenizers[spec] = load_tokenizer(spec)
        return self._tokenizers[spec]

    @property
    def mesh(self):
        if self._mesh is None:
            from jaxcl.parallel import make_mesh, resolve_rules

            self._mesh, self._rules = make_mesh(self.cfg.mesh), resolve_rules(self.cfg.mesh.rules)
        return self._mesh

    def load(self, row: Row) -> tuple[Any, Any]:
        """(model config, params on the mesh) of `row`'s checkpoint."""
        from jaxcl.init_from import load_params, parse_init_from, source_model_config
        from jaxcl.models import abstract_params, param_axes
        from jaxcl.parallel import logical_to_sharding

        model_cfg = source_model_config(parse_init_from(row.spec))
        mesh = self.mesh
        shardings = logical_to_sharding(param_axes(model_cfg), mesh, self._rules, shapes=abstract_params(model_cfg))
        return model_cfg, load_params(row.spec, model_cfg, shardings)

    # ------------------------------------------------------------------ cells
    def settings_key(self, task: DownstreamTask, tokenizer) -> dict[str, Any]:
        """What a cell's result depends on besides its checkpoint, seed, learning rate and prompt."""
        s = config_to_dict(self.settings)
        for k in ("prompts", "bootstrap_resamples", "lrs", "tasks", "task_dir"):
            s.pop(k)
        return {"settings": s, "tokenizer": tokenizer.fingerprint(), "task": task.name,
                "task_data": _task_data_sha(task), "clip_norm": self.cfg.optim.clip_norm}

    def cell_path(self, variant: str, row: Row, task: str, seed: int) -> Path:
        return self.out / "cells" / variant / row.name / task / f"seed{seed}.json"

    def _read_cell(self, path: Path, row: Row, key: dict, lr: float) -> dict | None:
        if not path.is_file():
            return None
        try:
            cell = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None                       # unreadable: recomputed (cells are written atomically)
        if cell.get("checkpoint", {}).get("identity") != row.identity or cell.get("key") != _sha(key) \
                or cell.get("lr") != lr:
            return None
        return cell

    def _finetune_cell(self, row, model_cfg, params, fingerprint, task, seed, lr, prompt_id, evaluate, key):
        tok = self.tokenizer_for(row)
        result = finetune(model_cfg, params, task, tokenizer=tok, settings=self.settings, lr=lr, seed=seed,
                          prompt_id=prompt_id, evaluate=evaluate, clip_norm=self.cfg.optim.clip_norm,
                          mesh=self.mesh, rules=self._rules)
        split = evaluate[0]
        scores = classification_scores(result.predictions[split], task.split(split).labels, len(task.label_names))
        return {"row": row.name, "row_label": row.label, "stage": row.stage, "task": task.name, "seed": seed,
                "lr": lr, "prompt_id": prompt_id, "split": split,
                "checkpoint": {"spec": row.spec, "step": row.step, "identity": row.identity,
                               "fingerprint": fingerprint},
                "key": _sha(key), "settings": key, **scores,
                "predictions": result.predictions[split].tolist(), "train_loss": result.train_loss,
                "steps": result.steps, "truncated": result.truncated, "seconds": result.seconds}

    # ------------------------------------------------------------------ the learning-rate grid
    def _grid_row(self) -> Row:
        stage0 = [r for r in self.rows if r.stage == 0]
        if stage0:
            return stage0[0]
        if self.has_run:           # stage 0 not among the chosen rows: it is still where the grid is chosen
            return self._rows([0])[-1]
        return self.rows[0]

    def choose_lrs(self, progress) -> dict[str, float]:
        """Per task: the learning rate of `downstream.lrs` with the best validation macro-F1 on the stage-0
        checkpoint (first seed); `grid.json` keeps every score. Chosen once: later invocations reuse it."""
        path = self.out / "grid.json"
        grid = json.loads(path.read_text()) if path.is_file() else {"tasks": {}}
        lrs = list(self.settings.lrs)
        row, loaded = self._grid_row(), None
        chosen = {}
        for name, task in self.tasks.items():
            key = self.settings_key(task, self.tokenizer_for(row))
            entry = grid["tasks"].get(name)
            reuse = bool(entry and entry["key"] == _sha(key) and entry["lrs"] == lrs and entry["identity"] == row.identity)
            if bool(_from_process_0(reuse)):
                chosen[name] = float(_from_process_0(entry["lr"] if reuse else 0.0))
                continue
            if len(lrs) == 1:
                chosen[name] = lrs[0]
                grid["tasks"][name] = {"lr": lrs[0], "lrs": lrs, "key": _sha(key), "identity": row.identity,
                                       "row": row.name, "valid_macro_f1": {}, "seed": self.seeds[0]}
                continue
            scores = {}
            for lr in lrs:
                cell_path = self.out / "grid" / name / f"lr{lr:g}.json"
                cell = self._read_cell(cell_path, row, key, lr)
                if bool(_from_process_0(cell is None)):
                    if loaded is None:
                        loaded = self.load(row) + (None,)
                        loaded = (loaded[0], loaded[1], params_checksum(loaded[1]))
                    progress.set_postfix_str(f"grid {name} lr={lr:g}")
                    cell = self._finetune_cell(row, loaded[0], loaded[1], loaded[2], task, self.seeds[0], lr,
                                               self.prompt_id(row, task, self.prompts), ("valid",), key)
                    _write(cell_path, json.dumps(cell))
                scores[lr] = float(_from_process_0(cell["macro_f1"] if cell is not None else 0.0))
            best = max(lrs, key=lambda lr: (scores[lr], -lr))
            chosen[name] = best
            grid["tasks"][name] = {"lr": best, "lrs": lrs, "key": _sha(key), "identity": row.identity, "row": row.name,
                                   "seed": self.seeds[0], "prompts": self.prompts,
                                   "valid_macro_f1": {f"{lr:g}": scores[lr] for lr in lrs}}
            _write(path, json.dumps(grid, indent=2))
        _write(path, json.dumps(grid, indent=2))
        return chosen

    # ------------------------------------------------------------------ the run
    def planned_cells(self) -> list[tuple[Row, DownstreamTask, int]]:
        return [(row, task, seed) for row in self.rows for task in self.tasks.values() for seed in self.seeds
                if not self.seen_only or row.stage is None or self.seen(row, task)]

    def run(self) -> dict[str, Any]:
        """Fine-tune every missing cell, then rebuild downstream.json, the heatmaps and TensorBoard."""
        from tqdm.auto import tqdm

        if _process_index() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        start = time.time()
        cells = self.planned_cells()
        with tqdm(total=len(cells), desc="downstream", dynamic_ncols=True) as progress:
            lrs = self.choose_lrs(progress)
            current = None
            for row, task, seed in cells:
                key = self.settings_key(task, self.tokenizer_for(row))
                path = self.cell_path(self.variant, row, task.name, seed)
                if bool(_from_process_0(self._read_cell(path, row, key, lrs[task.name]) is None)):
                    if current is None or current[0] != row:
                        current = None                                   # free the previous row's params
                        model_cfg, params = self.load(row)
                        current = (row, model_cfg, params, params_checksum(params))
                    progress.set_postfix_str(f"{row.name} {task.name} seed {seed}")
                    cell = self._finetune_cell(row, current[1], current[2], current[3], task, seed, lrs[task.name],
                                               self.prompt_id(row, task, self.prompts), ("test",), key)
                    _write(path, json.dumps(cell))
                progress.update(1)
        result = self.summarize(lrs)
        result["seconds_this_invocation"] = time.time() - start
        _write(self.out / "downstream.json", json.dumps(result, indent=2))
        if _process_index() == 0:
            self._plots(result)
            self._tensorboard(result)
        return result

    # ------------------------------------------------------------------ results
    def _all_cells(self, lrs: dict[str, float]) -> dict[str, dict[tuple[str, str], dict[int, dict]]]:
        """variant -> (row, task) -> seed -> cell, for every valid cell on disk of this run's rows and tasks."""
        found: dict[str, dict] = {}
        root = self.out / "cells"
        for variant_dir in sorted(root.iterdir()) if root.is_dir() else []:
            for row in self.rows:
                for task in self.tasks.values():
                    key = self.settings_key(task, self.tokenizer_for(row))
                    task_dir = variant_dir / row.name / task.name
                    for path in sorted(task_dir.glob("seed*.json")) if task_dir.is_dir() else []:
                        cell = self._read_cell(path, row, key, lrs[task.name])
                        if cell is not None and cell["seed"] in self.seeds:
                            found.setdefault(variant_dir.name, {}).setdefault((row.name, task.name), {})[
                                cell["seed"]] = cell
        return found

    def summarize(self, lrs: dict[str, float]) -> dict[str, Any]:
        tasks = list(self.tasks.values())
        found = self._all_cells(lrs)
        result = {
            "run_dir": str(self.run_dir), "method": self.method, "hf_reference": self.hf,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "tasks": [{"name": t.name, "domain": t.domain, "labels": list(t.label_names), "source": t.source,
                       **{f"n_{s}": len(t.split(s)) for s in ("train", "valid", "test")},
                       "steps_per_cell": finetune_steps(len(t.split("train")), self.settings)} for t in tasks],
            "seeds": self.seeds, "lr": lrs, "settings": config_to_dict(self.settings), "level": LEVEL,
            "resamples": self.settings.bootstrap_resamples,
            "seen": [[self.seen(r, t) for t in tasks] for r in self.rows],
        }
        result.update(build_summary(self.rows, tasks, found, self.settings.bootstrap_resamples,
                                    seen=lambda r, t: self.seen(r, t)))
        result["fine_tune_seconds"] = sum(sum(c["seconds"].values()) for v in found.values() for cells in v.values()
                                          for c in cells.values())
        return result

    def _plots(self, result: dict[str, Any]) -> None:
        from jaxcl.eval.report import plot_matrix

        for variant, block in result["variants"].items():
            acc = block["accuracy"]
            summary = block["summary"]["average"]["accuracy"]
            report = {"method": f"{self.method} downstream ({variant})", "metric": "accuracy",
                      "stages": [r["label"].replace("after ", "") for r in result["rows"]],
                      "eval_on": [t["name"] for t in result["tasks"]], "matrix": acc["matrix"],
                      "highlight": [(i, j) for j in range(len(result["tasks"])) for i in range(len(result["rows"]))
                                    if result["seen"][i][j] and (i == 0 or not result["seen"][i - 1][j])],
                      "summary": {"final average": summary["value"]} if summary else {},
                      "intervals": {"matrix": acc["intervals"],
                                    **({"final average": [summary["low"], summary["high"]]} if summary else {})}}
            if any(v is not None for row in acc["matrix"] for v in row):
                plot_matrix(report, self.out / f"downstream_{variant}.png")

    def _tensorboard(self, result: dict[str, Any]) -> None:
        from jaxcl.eval.tensorboard import TensorBoardLog

        records = []
        for variant, block in result["variants"].items():
            for i, row in enumerate(result["rows"]):
                for j, task in enumerate(result["tasks"]):
                    if block["accuracy"]["matrix"][i][j] is None:
                        continue
                    records.append({"kind": "downstream", "method": variant, "step": i, "task": task["name"],
                                    **{m: block[m]["matrix"][i][j] for m in METRICS}})
        TensorBoardLog(self.out / "tensorboard").rebuild(records)


def build_summary(rows: Sequence[Row], tasks: Sequence[DownstreamTask], found: dict, resamples: int,
                  seen=None) -> dict[str, Any]:
    """The matrices, intervals, summaries and the prompt ablation from `found` (variant -> (row, task) -> seed
    -> cell). A cell with several seeds averages them; resamples are shared per task (paired)."""
    seen = seen or (lambda r, t: True)
    draws = {t.name: text_draws(len(t.split("test")), resamples, t.name) for t in tasks}
    labels = {t.name: t.split("test").labels for t in tasks}
    n_classes = {t.name: len(t.label_names) for t in tasks}
    boot: dict[str, dict[tuple[int, int], dict[str, np.ndarray]]] = {}
    out: dict[str, Any] = {"variants": {}}
    for variant, cells in found.items():
        block = {m: {"matrix": [[None] * len(tasks) for _ in rows], "intervals": [[None] * len(tasks) for _ in rows]}
                 for m in METRICS}
        block["seeds"] = [[0] * len(tasks) for _ in rows]
        block["fingerprints"] = [[None] * len(tasks) for _ in rows]
        boot[variant] = {}
        for i, row in enumerate(rows):
            for j, task in enumerate(tasks):
                by_seed = cells.get((row.name, task.name))
                if not by_seed:
                    continue
                preds = np.stack([np.asarray(by_seed[s]["predictions"]) for s in sorted(by_seed)])
                point = classification_scores(preds, labels[task.name], n_classes[task.name])
                resampled = classification_scores(preds, labels[task.name], n_classes[task.name], draws[task.name])
                boot[variant][(i, j)] = resampled
                for m in METRICS:
                    block[m]["matrix"][i][j] = point[m]
                    block[m]["intervals"][i][j] = percentile_interval(resampled[m], LEVEL)
                block["seeds"][i][j] = len(by_seed)
                block["fingerprints"][i][j] = sorted({c["checkpoint"]["fingerprint"] for c in by_seed.values()})
        block["summary"] = _summary(rows, tasks, block, boot[variant], seen)
        out["variants"][variant] = block
    if "prompt" in boot and "no_prompt" in boot:
        out["prompt_ablation"] = _paired_difference(rows, tasks, out["variants"]["prompt"],
                                                    out["variants"]["no_prompt"], boot["prompt"], boot["no_prompt"],
                                                    seen)
    return out


def _stat(values: np.ndarray, point: float) -> dict[str, float]:
    low, high = percentile_interval(values, LEVEL)
    return {"value": float(point), "low": low, "high": high}


def _final_row(rows: Sequence[Row]) -> int | None:
    staged = [i for i, r in enumerate(rows) if r.stage is not None]
    return staged[-1] if staged else (len(rows) - 1 if rows else None)


def _summary(rows, tasks, block, boot, seen) -> dict[str, Any]:
    """Final-row average over its seen tasks (every task for a reference-only matrix) and per-task forgetting
    (best score from the row that learned the task's domain on, minus the final row), with intervals."""
    final = _final_row(rows)
    summary: dict[str, Any] = {"final_row": None if final is None else rows[final].name, "average": {},
                               "forgetting": {}}
    if final is None:
        return summary
    cols = [j for j, t in enumerate(tasks) if (final, j) in boot and (seen(rows[final], t) or rows[final].stage is None)]
    summary["average_over"] = [tasks[j].name for j in cols]
    for m in METRICS:
        if cols:
            summary["average"][m] = _stat(np.mean([boot[(final, j)][m] for j in cols], axis=0),
                                          np.mean([block[m]["matrix"][final][j] for j in cols]))
        else:
            summary["average"][m] = None
    per_task = {m: {} for m in METRICS}
    for j, task in enumerate(tasks):
        learned = [i for i, r in enumerate(rows) if r.stage is not None and seen(r, task) and (i, j) in boot]
        if not learned or learned[0] == final or (final, j) not in boot:
            continue
        for m in METRICS:
            best = np.max([boot[(i, j)][m] for i in learned], axis=0)
            point = max(block[m]["matrix"][i][j] for i in learned) - block[m]["matrix"][final][j]
            per_task[m][task.name] = _stat(best - boot[(final, j)][m], point)
    for m in METRICS:
        summary["forgetting"][m] = per_task[m]
        if per_task[m]:
            names = list(per_task[m])
            j_of = {t.name: j for j, t in enumerate(tasks)}
            learned_rows = {n: [i for i, r in enumerate(rows) if r.stage is not None and seen(r, tasks[j_of[n]])
                                and (i, j_of[n]) in boot] for n in names}
            samples = np.mean([np.max([boot[(i, j_of[n])][m] for i in learned_rows[n]], axis=0)
                               - boot[(final, j_of[n])][m] for n in names], axis=0)
            summary["forgetting"][f"mean_{m}"] = _stat(samples, np.mean([per_task[m][n]["value"] for n in names]))
    return summary


def _paired_difference(rows, tasks, a, b, boot_a, boot_b, seen) -> dict[str, Any]:
    """prompt - no_prompt per cell (where both exist) and on the final row's average, paired over texts."""
    out: dict[str, Any] = {m: [[None] * len(tasks) for _ in rows] for m in METRICS}
    for i in range(len(rows)):
        for j in range(len(tasks)):
            if (i, j) in boot_a and (i, j) in boot_b:
                for m in METRICS:
                    out[m][i][j] = _stat(boot_a[(i, j)][m] - boot_b[(i, j)][m],
                                         a[m]["matrix"][i][j] - b[m]["matrix"][i][j])
    final = _final_row(rows)
    cols = [j for j, t in enumerate(tasks) if final is not None and (final, j) in boot_a and (final, j) in boot_b
            and seen(rows[final], t)]
    out["final_average"] = {m: _stat(np.mean([boot_a[(final, j)][m] - boot_b[(final, j)][m] for j in cols], axis=0),
                                     np.mean([a[m]["matrix"][final][j] - b[m]["matrix"][final][j] for j in cols]))
                            if cols else None for m in METRICS}
    return out
