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

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
