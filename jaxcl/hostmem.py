"""Host memory for XLA on CPU: keep the per-call scratch buffer mapped instead of faulting it in every step.

Why: XLA's CPU runtime allocates each executable's temporary buffer (all intermediates of a train step:
~261 MB for GPT-2 d=256 L=4 at 8x128) with `posix_memalign` on an Eigen worker thread and frees it when
the call ends. glibc serves a request that large from a thread arena by `mmap` (a thread arena's heap is
at most 64 MB, and that fallback ignores `M_MMAP_MAX`) and gives it back with `munmap`, so every step
maps fresh zero pages and touches them: 63,717 minor page faults per step at 8x128, the whole buffer
re-zeroed by the kernel each time (measured with `benchmarks/train_step.py`, column "page faults / step").
PyTorch's many smaller tensors suffer the same in part (47,696 per step).

`retain_host_memory()` makes every thread allocate from glibc's main arena (`M_ARENA_MAX` 1), never by
`mmap` (`M_MMAP_MAX` 0), and never gives freed heap memory back (`M_TRIM_THRESHOLD` -1, "disables trimming
completely", mallopt(3)): the buffer is reused step after step and the faults drop to 0. (A finite threshold
is not enough: at the GPT-2-small shape, with PyTorch's model in the same process, the free top of the heap
passed 2 GiB and was trimmed every step, 183,906 faults per step.) The cost: the process keeps its peak heap
(what a caching allocator does); one arena serialises concurrent `malloc` calls (XLA's CPU threads
allocate a few buffers per call). It works only before JAX starts its CPU backend (the worker threads pick
their arena at their first allocation), so `jaxcl`'s command line calls it first thing on hosts without an accelerator plugin.
Programs that import jaxcl can call it before any JAX computation, or set the same options in the
environment before Python starts (what `ENVIRONMENT` lists), which also covers PyTorch in the same process.
Reference: glibc malloc tunables, https://www.gnu.org/software/libc/manual/html_node/Memory-Allocation-Tunables.html
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

__all__ = ["ENVIRONMENT", "SETTING_ENV", "applied", "retain_host_memory", "should_retain", "apply_from_environment"]

ENVIRONMENT = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 62)}
SETTING_ENV = "JAXCL_HOST_MALLOC"            # "retain" | "system" | unset (= retain on CPU-only hosts)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8      # glibc <malloc.h>
applied = False                              # set once retain_host_memory() has changed this process
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def _jax_backend_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(xla_bridge is not None and getattr(xla_bridge, "_backends", None))


def retain_host_memory() -> bool:
    """Apply the allocator options above to this process (glibc only); True when applied.

    Returns False, changing nothing, where it cannot help: not glibc (macOS, musl), or JAX's backend is
    already running in this process (its threads keep their arenas; set `ENVIRONMENT` before Python starts
    instead). Never raises.
    """
    if not sys.platform.startswith("linux") or _jax_backend_started():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global applied
    results = [mallopt(param, value) for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))]
    applied = all(r == 1 for r in results)
    return applied


def should_retain(environ: dict[str, str] | None = None) -> bool:
    """Whether `jaxcl`'s command line retains host memory: `JAXCL_HOST_MALLOC=retain` / `system` decide; unset,
    it does when JAX will compute on the CPU (`JAX_PLATFORMS=cpu`, or no TPU / GPU plugin installed).
    A bad value of JAXCL_HOST_MALLOC is a ValueError naming it."""
    environ = os.environ if environ is None else environ
    setting = environ.get(SETTING_ENV, "").strip().lower()
    if setting not in ("", "retain", "system"):
        raise ValueError(f"{SETTING_ENV}={environ[SETTING_ENV]!r}: choose 'retain' or 'system' (or leave it unset)")
    if setting:
        return setting == "retain"
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def apply_from_environment() -> bool:
    """`should_retain()` then `retain_host_memory()`; what `jaxcl`'s `main` runs before anything imports JAX."""
    return should_retain() and retain_host_memory()
