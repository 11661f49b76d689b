"""SLM: DTKR task-key retrieval + JARe low-rank increment mixing, continual learning with no task id at inference.

    from jaxcl.slm import dtkr, jare
    bank = dtkr.new_key_bank(max_slots, dim, groups)                      # shared key pool
    keys, _ = dtkr.train_task_keys(task_queries, rng, groups=6, slots=4)  # one task's keys, its texts only
    bank, slots = dtkr.add_task_keys(bank, task, keys)                    # frozen into the next free slots
    # with new_key_bank(..., max_tasks=T): dtkr.add_task_statistics(bank, task, task_queries, 0.01) too,
    # for task_choice="gaussian" (per-task query Gaussians with a pooled covariance)
    slots, weights = dtkr.retrieve(queries, bank.keys, bank.slot_task >= 0, top_k=4)
    increments = jare.init_increment_bank(rng, model_cfg, max_slots=32, rank=8)
    out = build(model_cfg).apply({"params": params}, ids, mask,
                                 adapters=jare.mix_adapters(increments, slots, weights))

The runner (`jaxcl run configs/slm/demo.yaml`) is `jaxcl.slm.run.SlmRun`; the generic low-rank math
lives in `jaxcl.models.lowrank`.
"""

from jaxcl.slm import dtkr, jare

__all__ = ["dtkr", "jare"]
