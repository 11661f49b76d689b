"""A persistent XLA compilation cache for one test module (test time only; what is computed is unchanged).

A module whose tests run the same programs several times in this process (a run, then the interrupted and
resumed invocations of the same run) reuses the compiled executables instead of compiling each again. The
cache lives in a fresh temporary directory and is switched off again when the context ends, so other modules
compile as before.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax


@contextlib.contextmanager
def persistent_compilation_cache(directory: Path):
    from jax.experimental.compilation_cache import compilation_cache

    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                 "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)     # small test programs too
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for key, value in saved.items():
            jax.config.update(key, value)
        compilation_cache.reset_cache()
