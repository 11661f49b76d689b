"""jaxcl.hostmem: the CPU step's scratch buffer stays mapped (no page faults per call) when retained."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxcl import cli, hostmem

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options")

# A jitted call whose intermediate ([4096, 8192] float32 = 128 MiB) is XLA's per-call temporary buffer.
PROBE = textwrap.dedent("""
    import ctypes, resource
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)   # PR_SET_THP_DISABLE: 4 KiB pages even where THP is "always"
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x, w: (jnp.tanh(x @ w) @ w.T).sum())
    x, w = jnp.ones((4096, 256)), jnp.full((256, 8192), 1e-3)
    for _ in range(2):
        f(x, w).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x, w).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
""")


def faults_per_call(prelude: str, **env) -> int:
    environ = {k: v for k, v in os.environ.items()        # nothing else may pick the allocator's behaviour
               if not k.startswith("MALLOC_") and k not in (hostmem.SETTING_ENV, "LD_PRELOAD", "GLIBC_TUNABLES")}
    environ.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", **env)
    out = subprocess.run([sys.executable, "-c", prelude + PROBE], env=environ, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_the_command_line_retains_host_memory_unless_told_not_to():
    # main() applies it before anything starts JAX (a failing export returns 2 after that); the probe's
    # 128 MiB scratch buffer is then reused call after call instead of mapped and faulted in again.
    prelude = "from jaxcl import cli\nassert cli.main(['export', '/nonexistent/run', '/tmp/x']) == 2\n"
    system = faults_per_call(prelude, JAXCL_HOST_MALLOC="system")
    retained = faults_per_call(prelude)                               # unset on a CPU-only host: retain
    assert system > 30000 and retained < 0.02 * system, (system, retained)   # 32,768 pages = 128 MiB
    documented = faults_per_call("", **hostmem.ENVIRONMENT)            # the documented environment does the same
    assert documented < 0.02 * system, (system, documented)


def test_retaining_late_changes_nothing_and_the_setting_is_checked(capsys):
    import jax.numpy as jnp

    jnp.ones(2).block_until_ready()                                     # this process's backend is running
    assert hostmem.retain_host_memory() is False
    assert hostmem.should_retain({"JAXCL_HOST_MALLOC": "system", "JAX_PLATFORMS": "cpu"}) is False
    assert hostmem.should_retain({"JAXCL_HOST_MALLOC": "Retain", "JAX_PLATFORMS": "tpu"}) is True
    assert hostmem.should_retain({"JAX_PLATFORMS": "cpu"}) is True
    assert hostmem.should_retain({"JAX_PLATFORMS": "cuda,cpu"}) is False
    with pytest.raises(ValueError, match="JAXCL_HOST_MALLOC='always'"):
        hostmem.should_retain({"JAXCL_HOST_MALLOC": "always"})
    os.environ[hostmem.SETTING_ENV] = "always"
    try:
        assert cli.main(["export", "/nonexistent/run", "/tmp/x"]) == 2
    finally:
        del os.environ[hostmem.SETTING_ENV]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "JAXCL_HOST_MALLOC='always'" in err[0]
