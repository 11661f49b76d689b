"""Test setup: 8 fake CPU devices (set before jax is imported anywhere) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
