"""A train step gives the same loss and params on any mesh as on one device."""

import jax
import numpy as np
import pytest

from jaxcl.config import ConfigError, MeshConfig, OptimConfig
from jaxcl.models import ModelConfig
from jaxcl.parallel import batch_sharding, make_mesh
from jaxcl.train import create_train_state, make_optimizer, make_train_step

CFG = ModelConfig(family="llama", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
# Adam normalises every update to ~lr, so round-off in near-zero gradients moves params by up to ~lr;
# a realistic lr keeps that far below the 1e-5 tolerance.
OPTIM = OptimConfig(lr=1e-3, warmup_steps=1)


def run_steps(mesh_cfg: MeshConfig, devices, steps: int = 3):
    mesh = make_mesh(mesh_cfg, devices)
    tx = make_optimizer(OPTIM, total_steps=10)
    state, shardings = create_train_state(CFG, tx, jax.random.key(0), mesh)
    step = make_train_step(CFG, tx, mesh, shardings)
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, 10:] = 0
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in {"input_ids": ids, "attention_mask": mask}.items()}
    losses = []
    for _ in range(steps):      # the same batch every step: the loss must go down
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params), state


@pytest.fixture(scope="module")
def single_device():
    return run_steps(MeshConfig(data=1), jax.devices()[:1])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 2, 4)])
def test_train_step_matches_single_device(single_device, shape):
    ref_losses, ref_params, _ = single_device
    losses, params, state = run_steps(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]), jax.devices())
    assert ref_losses[-1] < ref_losses[0]          # it trains
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert int(state.step) == 3
    if shape[1] > 1:     # FSDP really shards the params and the Adam moments
        kernel = state.params["layers"]["mlp"]["wi"]["kernel"]
        assert kernel.sharding.shard_shape(kernel.shape)[1] == CFG.d_model // shape[1]


def test_mesh_errors_name_the_problem():
    with pytest.raises(ConfigError, match="uses 3 devices, but 8 are available"):
        make_mesh(MeshConfig(data=3))
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        make_mesh(MeshConfig(data=-1, fsdp=-1))
    with pytest.raises(ConfigError, match="8 is not divisible by 3"):
        make_mesh(MeshConfig(data=-1, fsdp=3))
