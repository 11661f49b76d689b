"""Multi-host start-up: `jax.distributed.initialize` where there is more than one process."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)
_initialized = False


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join the multi-host job, once per process.

    On Cloud TPU pods JAX discovers the coordinator itself (no arguments). Elsewhere (CPU or GPU
    clusters, the two-process tests) pass the coordinator address and process ids explicitly or set
    `JAXCL_COORDINATOR`, `JAXCL_NUM_PROCESSES`, `JAXCL_PROCESS_ID`. A single plain process is a no-op.
    """
    global _initialized
    if _initialized:
        return
    coordinator = coordinator or os.environ.get("JAXCL_COORDINATOR")
    if num_processes is None and "JAXCL_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXCL_NUM_PROCESSES"])
    if process_id is None and "JAXCL_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXCL_PROCESS_ID"])
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif _on_tpu_pod():
        jax.distributed.initialize()
    else:
        return
    _initialized = True
    log.info("process %d of %d joined (%d local / %d global devices)", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _on_tpu_pod() -> bool:
    """True on a multi-host Cloud TPU VM (its metadata names more than one worker)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    return bool(hosts) and ("," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ)
