"""Downstream evaluation: end-task fine-tuning of a run's stage checkpoints, and the downstream matrix.

    from jaxcl.downstream import DownstreamRun
    result = DownstreamRun("runs/elle-demo", stages=[4], seeds=[0]).run()     # = jaxcl downstream runs/elle-demo

    from jaxcl.downstream import finetune, resolve_tasks                       # one cell, in your own code
    result = finetune(model_cfg, params, task, tokenizer=tok, settings=cfg.downstream, lr=3e-4, seed=0, prompt_id=None)

Modules: `tasks` (which tasks, paired with which domain; users' task directories), `classifier` (pooled
features -> linear head, pure functions), `finetune` (one cell), `run` (rows x tasks x seeds, the learning-rate
grid, resumable cells, downstream.json, heatmaps, TensorBoard). See docs/downstream.md.
"""

from jaxcl.downstream.classifier import classifier_logits, encode_texts, init_head, pooled_features, resolve_pooling
from jaxcl.downstream.finetune import FinetuneResult, finetune, finetune_steps
from jaxcl.downstream.run import DownstreamRun, Row, build_summary, params_checksum
from jaxcl.downstream.tasks import DownstreamTask, read_task_dir, resolve_tasks

__all__ = ["DownstreamRun", "Row", "build_summary", "params_checksum", "finetune", "finetune_steps", "FinetuneResult",
           "DownstreamTask", "resolve_tasks", "read_task_dir", "classifier_logits", "pooled_features", "init_head",
           "encode_texts", "resolve_pooling"]
