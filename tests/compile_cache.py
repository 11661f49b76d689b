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


def killable_env(env: dict | None = None) -> dict:
    """The environment for a process a test will kill: without the session's shared XLA cache
    (tests/conftest.py). JAX writes a cache entry in place (no temporary and rename), so a SIGKILL can leave a
    truncated entry, and the next process to load that program aborts in C++ (seen in session 22: a pytest
    worker died in `test_a_composed_sharded_run_resumes_to_the_same_result` right after the kill). Processes
    that are not killed keep sharing the cache; a killed one compiles its programs itself."""
    import os

    env = dict(os.environ if env is None else env)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    return env
