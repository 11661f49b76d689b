"""`jaxcl` console script.

    jaxcl run CONFIG [key=value ...]     the continual-learning job run.method names (default: sequential)
    jaxcl train CONFIG [key=value ...]   joint training on all configured domains at once (multitask reference)
    jaxcl eval CONFIG [key=value ...] [--hf DIR]
                                         perplexity of every domain for the run's latest checkpoint
                                         (or an HF checkpoint directory)
    jaxcl export RUN_DIR OUT_DIR [--stage N]
                                         the run's model (end of run, or after stage N) as a Hugging Face
                                         checkpoint with the run's tokenizer
    jaxcl generate RUN_OR_HF_DIR [--prompt TEXT ...] [--prompts-file F|-] [--max-new-tokens N] [--temperature T]
                   [--top-k K] [--top-p P] [--seed S] [--memory [PATH]] [--memory-policy semem|full]
                   [--domain NAME] [--no-stream]
                                         continue each prompt with the run's (or HF checkpoint's) model, with
                                         its state: a SeMem memory, SLM's DTKR-chosen adapters, an ELLE prompt;
                                         a single prompt's text is printed as it is generated
    jaxcl downstream RUN_DIR [--stages all|N,...] [--tasks T,...] [--seeds S,...] [--hf DIR] [--no-prompts]
                     [--seen-only] [--out DIR] [downstream.key=value ...]
                                         fine-tune every stage checkpoint on the end tasks (a linear head on
                                         the whole model): the downstream matrix with intervals
    jaxcl grow IN_DIR OUT_DIR [--d-model N] [--n-heads N] [--n-kv-heads N] [--d-ff N] [--n-layers N]
               [--method exact|elle] [--seed S] [--noise-std X] [--allow-inexact]
                                         grow a Hugging Face checkpoint; the result loads in transformers
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from jaxcl.config import Config


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("asyncio").addFilter(_drop_abandoned_orbax_reads)
    logging.getLogger("absl").addFilter(_drop_read_only_notes)


def _drop_abandoned_orbax_reads(record: logging.LogRecord) -> bool:
    """asyncio's "Task exception was never retrieved" for the other reads of a checkpoint that orbax stopped
    waiting for after one failed (that failure is reported as the one error line; see
    _quiet_abandoned_reads). Any other asyncio record is kept."""
    if not record.getMessage().startswith("Task exception was never retrieved") or not record.exc_info:
        return True
    tb = record.exc_info[2]
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return True


def _drop_read_only_notes(record: logging.LogRecord) -> bool:
    """orbax warns twice whenever a checkpoint is opened read-only (every export, eval, generate, init_from),
    which is what jaxcl asks for: not worth a user's attention."""
    message = record.getMessage()
    return not (message.startswith("CheckpointManagerOptions.read_only=True")
                or message.startswith("Given directory is read only"))


def _load(args) -> Config:
    from jaxcl.config import load_config
    from jaxcl.errors import InputError

    overrides = list(args.overrides)
    if getattr(args, "hf", None):      # evaluate the checkpoint as a run from it would: its architecture and tokenizer
        overrides.append(f"model.init_from={args.hf}")
        try:
            return load_config(args.config, overrides)
        except InputError as e:
            raise _named_as(e, args.hf, "--hf ") from None
    return load_config(args.config, overrides)


def _named_as(error: Exception, spec: str, name: str) -> Exception:
    from jaxcl.config import ConfigError
    from jaxcl.errors import InputError

    """`error` with `model.init_from='SPEC'` in its message said as the user gave SPEC (`--hf 'SPEC'`, or the
    positional directory of `jaxcl generate`): the same type, one line."""
    message = str(error).replace(f"model.init_from={spec!r}", f"{name}{spec!r}")
    try:
        return type(error)(message) if isinstance(error, InputError) else ConfigError(message)
    except TypeError:          # an error type whose constructor takes more than a message
        return ConfigError(message)


def cmd_run(args, method: str | None = None) -> int:
    from jaxcl.parallel import initialize_distributed
    from jaxcl.runs import run_config

    initialize_distributed()
    cfg = _load(args)
    if method is not None:
        import dataclasses
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, method=method))
    run_config(cfg)
    return 0


def cmd_prepare(args) -> int:
    """`jaxcl prepare CONFIG [overrides]`: build the token cache a run of CONFIG reads (every domain of data.source,
    or data.domains, and of semem.stream_source when set; the splits of --splits), then print what it holds."""
    import json
    import time

    import jax

    from jaxcl.data.cache import cache_root, open_splits
    from jaxcl.data.sources import open_source
    from jaxcl.data.tokenizer import load_tokenizer
    from jaxcl.init_from import tokenizer_spec
    from jaxcl.parallel import initialize_distributed

    initialize_distributed()
    cfg = _load(args)
    data = cfg.data
    if args.processes is not None:
        import dataclasses
        data = dataclasses.replace(data, prepare_processes=args.processes)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    bad = [s for s in splits if s not in ("train", "valid", "test")]
    if bad or not splits:
        from jaxcl.errors import ConfigError
        raise ConfigError(f"--splits {args.splits!r}: give a comma-separated list of train, valid, test")
    spec = tokenizer_spec(cfg)
    tok = load_tokenizer(spec)
    targets = [(data.source, "data.source", tuple(data.domains))]
    if cfg.semem.stream_source:
        targets.append((cfg.semem.stream_source, "semem.stream_source", ()))
    start, rows = time.time(), []
    for source_spec, key, domains in targets:
        source = open_source(source_spec, data.text_field, key)
        domains = domains or source.domains()
        if key == "semem.stream_source":
            domains = tuple(d for d in domains if d not in _prepared_domains(rows))
        caches = open_splits(source_spec=source_spec, text_field=data.text_field, tokenizer=tok, tokenizer_spec=spec,
                             cache=data.cache, domains=domains, splits=splits, processes=data.prepare_processes,
                             on_bad_document=data.on_bad_document, key_name=key, source=source,
                             segment_bytes=data.prepare_segment_bytes)
        for (d, s), c in caches.items():
            rows.append({"source": source_spec, "domain": d, "split": s, "documents": c.documents, "tokens": c.tokens,
                         "bytes_per_token": c.dtype.itemsize, "skipped_documents": c.manifest.get("skipped", 0),
                         "location": c.files.where(c.prefix)})
    if jax.process_index() == 0:
        summary = {"cache": cache_root(data.cache), "tokenizer": spec, "seconds": round(time.time() - start, 2),
                   "splits": rows}
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            print(f"{'domain':<16}{'split':<7}{'documents':>11}{'tokens':>14}  skipped")
            for r in rows:
                print(f"{r['domain']:<16}{r['split']:<7}{r['documents']:>11,}{r['tokens']:>14,}  {r['skipped_documents']}")
            print(f"token cache: {cache_root(data.cache)} ({sum(r['tokens'] for r in rows):,} tokens, "
                  f"{summary['seconds']} s)")
    return 0


def _prepared_domains(rows) -> set:
    """Domains already in the summary (a stream source repeating a domain of data.source is not listed twice)."""
    return {r["domain"] for r in rows}


def cmd_eval(args) -> int:
    import jax

    from jaxcl.models import ModelConfig, abstract_params, param_axes
    from jaxcl.parallel import initialize_distributed, logical_to_sharding
    from jaxcl.train.checkpoint import complete_steps, read_meta, restore_params
    from jaxcl.train.loop import ContinualRun

    from jaxcl import rundir

    initialize_distributed()
    cfg = _load(args)
    rundir.check_run_directory(cfg.run_dir())      # eval.json goes into it: never into a user's directory
    runner = ContinualRun(cfg)
    if args.hf:
        from jaxcl.hf import load_pretrained, read_pretrained_config

        model_cfg = read_pretrained_config(args.hf)
        shardings = logical_to_sharding(param_axes(model_cfg), runner.mesh, runner.rules,
                                        shapes=abstract_params(model_cfg))
        model_cfg, params = load_pretrained(args.hf, shardings=shardings)
        source = args.hf
    else:
        directory = runner.run_dir / "checkpoints"
        steps = complete_steps(directory)
        if not steps:
            from jaxcl.errors import RunDirError
            raise RunDirError(f"no checkpoint in {directory}: train the run first (jaxcl run CONFIG), or evaluate an "
                              "HF checkpoint with --hf DIR")
        step = steps[-1]
        model_cfg = ModelConfig.from_dict(read_meta(directory, step)["model"])
        shapes = abstract_params(model_cfg)
        shardings = logical_to_sharding(param_axes(model_cfg), runner.mesh, runner.rules, shapes=shapes)
        params = restore_params(directory, step, shapes, shardings)
        source = f"{directory} step {step}"
    results = runner.evaluate(model_cfg, params, shardings)
    print(f"perplexity ({source}):")
    for d, v in results.items():
        print(f"  {d:>16}: {v['perplexity']:.3f}")
    mean = math.exp(sum(v["nll"] for v in results.values()) / len(results))
    print(f"  {'geo-mean':>16}: {mean:.3f}")
    if jax.process_index() == 0:
        rundir.atomic_write(runner.run_dir / "eval.json", json.dumps({"source": source, "domains": results}, indent=2))
    return 0


def cmd_downstream(args) -> int:
    """`jaxcl downstream RUN_DIR [...]`: the downstream matrix of a run (jaxcl.downstream.DownstreamRun)."""
    from jaxcl.downstream import DownstreamRun
    from jaxcl.errors import ConfigError

    def int_list(text: str, flag: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 0,2") from None
        if not values:
            raise ConfigError(f"{flag} {text!r}: give at least one integer")
        return values

    stages = "all" if args.stages.strip() == "all" else int_list(args.stages, "--stages")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    seeds = int_list(args.seeds, "--seeds") if args.seeds else None
    run = DownstreamRun(args.run_dir, stages=stages, tasks=tasks, seeds=seeds, hf=args.hf,
                        prompts=False if args.no_prompts else None, seen_only=args.seen_only,
                        overrides=args.overrides, out=args.out)
    result = run.run()
    block = result["variants"].get(run.variant, {})
    names = [t["name"] for t in result["tasks"]]
    print(f"downstream accuracy ({run.variant}; seeds {', '.join(map(str, result['seeds']))}; "
          f"95 % intervals over test texts) -> {run.out / 'downstream.json'}")
    print(f"  {'':>22}" + "".join(f"{n:>24}" for n in names))
    for i, row in enumerate(result["rows"]):
        cells = []
        for j in range(len(names)):
            value = block.get("accuracy", {}).get("matrix", [[None] * len(names)] * (i + 1))[i][j]
            lo_hi = block.get("accuracy", {}).get("intervals", [[None] * len(names)] * (i + 1))[i][j]
            cells.append(f"{'-':>24}" if value is None else f"{value:>10.1f} [{lo_hi[0]:5.1f}, {lo_hi[1]:5.1f}]")
        print(f"  {row['label']:>22}" + "".join(cells))
    average = (block.get("summary") or {}).get("average", {}).get("accuracy")
    if average:
        print(f"  final average {average['value']:.2f} [{average['low']:.2f}, {average['high']:.2f}]")
    return 0


def cmd_export(args) -> int:
    from jaxcl.export import export_run

    out = export_run(args.run_dir, args.out_dir, stage=args.stage, task=args.task)
    print(f"exported {args.run_dir} -> {out}")
    return 0


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from jaxcl.config import ConfigError
    from jaxcl.data.tokenizer import load_tokenizer
    from jaxcl.generate import generate
    from jaxcl.inference import open_decoder

    for bad, flag in ((args.max_new_tokens < 1, f"--max-new-tokens {args.max_new_tokens}: must be at least 1"),
                      (not math.isfinite(args.temperature) or args.temperature < 0,
                       f"--temperature {args.temperature}: must be >= 0 (0 = greedy)"),
                      (not 0.0 < args.top_p <= 1.0, f"--top-p {args.top_p}: must be in (0, 1]"),
                      (args.top_k < 0, f"--top-k {args.top_k}: must be >= 0 (0 = all tokens)")):
        if bad:               # before the model is loaded
            raise ConfigError(flag)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += _read_prompts(args.prompts_file)
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT or --prompts-file FILE (one prompt per line, - for stdin)")
    if any(not p.strip() for p in prompts):
        raise ConfigError("an empty --prompt: give some text to continue")
    memory = False if args.memory is None else (True if args.memory == "" else args.memory)
    try:
        dec = open_decoder(args.source, memory=memory, policy=args.memory_policy)
    except ValueError as e:            # DatastoreError, InitFromError: one line naming the path
        raise ConfigError(str(_named_as(e, args.source, ""))) from None
    tok = load_tokenizer(dec.tokenizer)
    encoded = [tok.frame(p, eos=False) for p in prompts]      # as transformers frames a prompt (BOS for LLaMA)
    if any(not ids for ids in encoded):
        raise ConfigError("a prompt encodes to no tokens")
    width = max(len(ids) for ids in encoded)
    ids = np.full((len(prompts), width), tok.pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    stops = list(dec.model_cfg.token_ids("eos_token_id")) or [tok.eos_id]
    state, routed = dec.state_for(prompts, args.domain)
    if routed is not None and (args.domain is None or args.verbose):
        for prompt, name in zip(prompts, routed):
            print(f"[{name}] {prompt[:60]}", file=sys.stderr)
    streaming = len(prompts) == 1 and not args.no_stream
    printer = _StreamPrinter(tok.tokenizer, stops, prompts[0]) if streaming else None
    try:
        out = generate(dec.model_cfg, dec.params, ids, mask, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=stops,
                       pad_token_id=tok.pad_id, rng=jax.random.key(args.seed), stream=printer, **state)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if printer is not None:
        printer.finish()
        return 0
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row, prompt in enumerate(prompts):
        new = [int(t) for t in tokens[row, :lengths[row]] if int(t) not in stops]
        print(prompt + tok.tokenizer.decode(new, skip_special_tokens=True), flush=True)
        if len(prompts) > 1:
            print("---", flush=True)
    return 0


def _read_prompts(name: str) -> list[str]:
    """The non-blank lines of `--prompts-file` (`-`: standard input); ConfigError naming the file when it is
    missing, a directory, not UTF-8 (with the line) or holds no prompt."""
    from jaxcl.config import ConfigError

    if name == "-":
        data, where = sys.stdin.buffer.read(), "--prompts-file - (standard input)"
    else:
        where = f"--prompts-file {name!r}"
        try:
            with open(name, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            raise ConfigError(f"{where} is a directory: give a text file with one prompt per line") from None
        except FileNotFoundError:
            raise ConfigError(f"{where} not found") from None
        except OSError as e:
            raise ConfigError(f"{where} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{where}: line {line} is not UTF-8 text (byte {e.start})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{where} holds no prompt (one prompt per non-blank line)")
    return prompts


class _StreamPrinter:
    """Prints one prompt's continuation as tokens arrive (`generate(stream=...)`): each step decodes the
    tokens so far and writes what the text gained (so multi-token characters appear whole)."""

    def __init__(self, tokenizer, stops, prompt: str):
        self.tokenizer, self.stops, self.ids, self.shown, self.done = tokenizer, set(stops), [], "", False
        self.prompt = prompt            # written with the first token (an input error prints nothing to stdout)

    def _start(self) -> None:
        if self.prompt is not None:
            sys.stdout.write(self.prompt)
            self.prompt = None

    def __call__(self, step: int, tokens) -> None:
        self._start()
        token = int(tokens[0])
        if self.done or token in self.stops:
            self.done = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self) -> None:
        self._start()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        sys.stdout.write((text[len(self.shown):] if text.startswith(self.shown) else "") + "\n")
        sys.stdout.flush()


GROW_MARKER = "jaxcl_grow.json"     # marks a directory `jaxcl grow` wrote (it may replace it); provenance
SIZE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff")


def cmd_grow(args) -> int:
    from pathlib import Path

    import jax

    from jaxcl.hf import load_pretrained, save_pretrained
    from jaxcl.transforms import grow

    from jaxcl.atomic_io import check_replaceable
    from jaxcl.errors import OutputError

    if Path(args.out_dir).resolve() == Path(args.in_dir).resolve():
        raise OutputError(f"OUT_DIR {args.out_dir!r} is IN_DIR: write the grown model somewhere else")
    check_replaceable(args.out_dir, (GROW_MARKER,))       # before any work: a user's file or directory stays as is
    cfg, params = load_pretrained(args.in_dir)
    new_params, new_cfg = grow(params, cfg, d_model=args.d_model, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                               d_ff=args.d_ff, n_layers=args.n_layers, rng=jax.random.key(args.seed),
                               method=args.method, noise_std=args.noise_std,
                               allow_inexact=args.allow_inexact)
    record = {"source": str(Path(args.in_dir).resolve()), "method": args.method, "seed": args.seed,
              "noise_std": args.noise_std, "from": {k: getattr(cfg, k) for k in SIZE_KEYS},
              "to": {k: getattr(new_cfg, k) for k in SIZE_KEYS}}
    save_pretrained(args.out_dir, new_cfg, new_params, markers=(GROW_MARKER,),
                    extra_files={GROW_MARKER: json.dumps(record, indent=2).encode()})
    print(f"grew {cfg.family} L{cfg.n_layers}/D{cfg.d_model}/H{cfg.n_heads}/F{cfg.d_ff} "
          f"({cfg.num_params() / 1e6:.2f} M) -> L{new_cfg.n_layers}/D{new_cfg.d_model}/H{new_cfg.n_heads}/"
          f"F{new_cfg.d_ff} ({new_cfg.num_params() / 1e6:.2f} M), method={args.method}: {args.out_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from jaxcl import hostmem

    try:      # first: it must run before anything starts JAX's CPU backend (jaxcl.hostmem says why)
        hostmem.apply_from_environment()
    except ValueError as e:
        print(f"jaxcl: error: {e}", file=sys.stderr)
        return 2
    parser = _Parser(prog="jaxcl", description="Continual learning of language models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the continual-learning job of run.method"),
                            ("train", "joint training on all domains (multitask reference)"),
                            ("eval", "evaluate the latest checkpoint (or --hf DIR) on every domain")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.steps=200")
        if name == "eval":
            p.add_argument("--hf", default=None, help="evaluate this Hugging Face checkpoint directory instead")
    q = sub.add_parser("prepare", help="tokenize a config's data once into the token cache (data.cache)")
    q.add_argument("config", help="YAML config file (see configs/)")
    q.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. data.cache=gs://bucket/tokens")
    q.add_argument("--splits", default="train,valid,test", help="comma-separated splits (default: all three)")
    q.add_argument("--processes", type=int, default=None, help="local worker processes (default data.prepare_processes; "
                   "0 = every core)")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    x = sub.add_parser("export", help="export a run's model as a Hugging Face checkpoint with its tokenizer")
    x.add_argument("run_dir")
    x.add_argument("out_dir")
    x.add_argument("--stage", type=int, default=None, help="the model after this stage (default: the run's end)")
    x.add_argument("--task", default=None, help="SLM runs: this task's adapter")
    n = sub.add_parser("generate", help="continue prompts with a run's or an HF checkpoint's model (KV cache)")
    n.add_argument("source", help="an HF dir, a jaxcl run directory (latest checkpoint, or RUN@STEP / RUN@stageN), "
                                  "a SeMem run or an SLM LM-mode run")
    n.add_argument("--prompt", action="append", help="text to continue (repeat for a batch)")
    n.add_argument("--prompts-file", default=None, help="one prompt per line; - reads stdin")
    n.add_argument("--max-new-tokens", type=int, default=64)
    n.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    n.add_argument("--top-k", type=int, default=0)
    n.add_argument("--top-p", type=float, default=1.0)
    n.add_argument("--seed", type=_seed, default=0)
    n.add_argument("--memory", nargs="?", const="", default=None, metavar="PATH",
                   help="decode with a kNN-LM memory: a SeMem run's own (no PATH), or PATH = a SeMem run or a datastore")
    n.add_argument("--memory-policy", choices=("semem", "full"), default="semem",
                   help="which of a SeMem run's memories (selective, or full memorization)")
    n.add_argument("--domain", default=None,
                   help="ELLE: decode with this domain's prompt; SLM: this task's adapter (default: DTKR retrieval)")
    n.add_argument("--no-stream", action="store_true", help="print a single prompt's text at the end, not as it grows")
    n.add_argument("--verbose", action="store_true", help="print the domain each prompt is decoded as (stderr)")
    d = sub.add_parser("downstream", help="fine-tune a run's stage checkpoints on end tasks: the downstream matrix")
    d.add_argument("run_dir", help="a jaxcl run directory (sequential, joint or ELLE); with --hf alone, where the "
                                   "results go")
    d.add_argument("overrides", nargs="*", default=[], help="downstream.* / mesh.* overrides, e.g. "
                                                            "downstream.max_train_texts=500")
    d.add_argument("--stages", default="all", help="all (default) or comma-separated stage indices, e.g. 0,4")
    d.add_argument("--tasks", default=None, help="comma-separated tasks (default: every task of downstream.tasks)")
    d.add_argument("--seeds", default=None, help="comma-separated fine-tuning seeds (default: the run's run.seed)")
    d.add_argument("--hf", default=None, help="a Hugging Face checkpoint directory: the reference row")
    d.add_argument("--no-prompts", action="store_true", help="ELLE runs: fine-tune without the domain prompts")
    d.add_argument("--seen-only", action="store_true",
                   help="only the tasks whose domain each stage has trained (skip forward-transfer cells)")
    d.add_argument("--out", default=None, help="output directory (default RUN_DIR/downstream)")
    g = sub.add_parser("grow", help="grow a Hugging Face checkpoint (width and depth)")
    g.add_argument("in_dir")
    g.add_argument("out_dir")
    for flag in ("--d-model", "--n-heads", "--n-kv-heads", "--d-ff", "--n-layers"):
        g.add_argument(flag, type=_size, default=None, help="target size (default: unchanged)")
    g.add_argument("--method", choices=("exact", "elle"), default="exact")
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--noise-std", type=_noise, default=0.0, help="ELLE copy noise (method=elle)")
    g.add_argument("--allow-inexact", action="store_true",
                   help="method=exact on a post-LN BERT at a non-multiple width or with added layers (not exact)")
    _quiet_abandoned_reads()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in sub.choices:      # options may stand anywhere among positionals and key=value overrides
        args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    _setup_logging()
    from jaxcl.errors import InputError, one_line

    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "train":
            return cmd_run(args, method="joint")
        if args.command == "grow":
            return cmd_grow(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "prepare":
            return cmd_prepare(args)
        if args.command == "downstream":
            return cmd_downstream(args)
        return cmd_eval(args)
    except (InputError, OSError, OverflowError, MemoryError, RuntimeError) as e:
        # bad input, a file the system refused, a value too large to hold: one line, no traceback
        if isinstance(e, RuntimeError) and not str(e).startswith(_RUNTIME_INPUT_ERRORS):
            raise                  # a bug: its traceback is what a report needs
        _close_progress_bars()
        if isinstance(e, OSError) and e.filename:
            message = f"{e.filename}: {e.strerror or e}"
        elif isinstance(e, (OverflowError, MemoryError)):
            message = f"a value is too large for this machine ({type(e).__name__}: {e or 'out of memory'})"
        else:
            message = str(e)
        print(f"jaxcl {args.command}: error: {one_line(message, 2000)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"jaxcl {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130


# RuntimeErrors that are about the user's input or environment, not jaxcl's code.
_RUNTIME_INPUT_ERRORS = ("Symlink loop", "Unable to initialize backend")


def _seed(text: str) -> int:
    """argparse type of --seed: an integer in 0..2**63-1 (what jax.random.key takes)."""
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text}: a seed is an integer in 0..2**63-1")
    return value


def _size(text: str) -> int:
    """argparse type of grow's sizes: a positive integer below 2**31."""
    value = int(text)
    if not 0 < value < 2 ** 31:
        raise argparse.ArgumentTypeError(f"{text}: a size is a positive integer below 2**31")
    return value


def _noise(text: str) -> float:
    """argparse type of --noise-std: a finite number >= 0."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: the noise standard deviation is a finite number >= 0")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`jaxcl run: error: ...`), like every other jaxcl error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _quiet_abandoned_reads() -> None:
    """Keep an error the last thing printed: when one read of a checkpoint fails, orbax stops waiting for the
    others, and tensorstore's callbacks for those (finished later, on its threads) find the asyncio loop
    closed; each `RuntimeError('Event loop is closed')` would be printed as an unraisable traceback around
    the error line. Only that exception from asyncio's own check is dropped; everything else reaches the
    previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxcl", False):
        return

    def hook(unraisable):
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"):
            return
        previous(unraisable)

    hook._jaxcl = True
    sys.unraisablehook = hook


def _close_progress_bars() -> None:
    """Close every live tqdm bar, so an error printed next is the last line (not drawn over, or redrawn
    under, by a bar that a failing step left open)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:       # a half-built bar: nothing more to clean
            pass


if __name__ == "__main__":
    sys.exit(main())
