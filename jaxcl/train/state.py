"""TrainState and its creation directly on the mesh (never materialised on one device)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh

from jaxcl.models import ModelConfig, build
from jaxcl.models import example_input_ids
from jaxcl.parallel import logical_to_sharding


@struct.dataclass
class TrainState:
    """step (int32 scalar), params (plain dict), opt_state (optax state mirroring params), strategy
    (`{strategy name: {mirror: params-shaped tree}}`: the device state of the run's strategies,
    `jaxcl.train.strategy`; empty without strategies)."""

    step: jax.Array
    params: Any
    opt_state: Any
    strategy: Any = struct.field(default_factory=dict)


def _boxed_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    boxed = build(cfg).init(rng, example_input_ids(cfg))["params"]
    # optax maps over the logical boxes, so moments inherit their parameter's axis names.
    return TrainState(step=jnp.zeros((), jnp.int32), params=boxed, opt_state=tx.init(boxed))


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules=None) -> TrainState:
    """NamedShardings for every leaf of the TrainState (params and optimizer moments alike)."""
    abstract = jax.eval_shape(lambda r: _boxed_state(cfg, tx, r), jax.random.key(0))
    logical = nn.get_partition_spec(abstract)
    shapes = nn.meta.unbox(abstract)
    return logical_to_sharding(logical, mesh, rules, shapes=shapes)


def create_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                       rules=None, params: Any = None) -> tuple[TrainState, TrainState]:
    """(state, its shardings): fresh params (or the given ones, resharded) and a fresh optimizer."""
    shardings = state_shardings(cfg, tx, mesh, rules)
    if params is None:
        state = jax.jit(lambda r: nn.meta.unbox(_boxed_state(cfg, tx, r)), out_shardings=shardings)(rng)
    else:
        params = jax.device_put(params, shardings.params)
        state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                        out_shardings=shardings)(params)
    return state, shardings
