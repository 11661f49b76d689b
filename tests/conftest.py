"""Test setup: 8 fake CPU devices (set before jax is imported anywhere) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    # LLVM without its optimisation passes: the suite's programs are tiny, so compiling them dominates and this
    # saves ~8 % of the suite's time (measured on tests/test_elle.py + test_semem.py: 333 s vs 361 s); the
    # programs (fusion, sharding) are XLA's as before and every comparison in a test runs under the same flags
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAXCL_HOST_MALLOC", "system")  # tests calling cli.main in-process keep pytest's malloc
if "JAXCL_CACHE_DIR" not in os.environ:                # the token cache of this test session (never the user's)
    import tempfile
    os.environ["JAXCL_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxcl-test-tokens-")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:       # one XLA compilation cache for the session: the pytest
    import tempfile                                     # workers and the subprocesses tests start (kill/resume,
                                                        # CLI) reuse what another compiled; results are unchanged
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxcl-test-xla-")
    # every program, however small: most of the suite's compiles take 0.05-0.15 s and recur across tests and
    # processes (measured: tests/test_run.py + test_elle.py 270 s with 0 against 305 s with 0.2); an entry a
    # SIGKILLed process leaves truncated fails to load and is compiled again (jax_raise_persistent_cache_errors)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
