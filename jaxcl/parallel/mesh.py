"""Device mesh from config: named axes (data, fsdp, tensor), -1 fills, ICI x DCN for multi-slice."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxcl.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(sizes: Sequence[int], n_devices: int, what: str) -> tuple[int, ...]:
    """Replace a single -1 by whatever makes the product equal `n_devices`; errors name the sizes."""
    sizes = tuple(int(s) for s in sizes)
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{what}: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    if sizes.count(-1) > 1:
        raise ConfigError(f"{what}: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"{what}: {dict(zip(MESH_AXES, sizes))} cannot fill {n_devices} devices "
                              f"({n_devices} is not divisible by {known})")
        sizes = tuple(n_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"{what}: {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                          f"but {n_devices} are available")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over `devices` (default: all) with axes `data, fsdp, tensor` (Auto axis types).

    With DCN sizes > 1 (multi-slice TPU) the mesh is built slice-aware with
    `mesh_utils.create_hybrid_device_mesh`, so that only the DCN axes cross slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn_sizes = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
    n_slices = _num_slices(devices) if -1 in dcn_sizes else math.prod(dcn_sizes)
    dcn = resolve_axis_sizes(dcn_sizes, n_slices, "mesh.dcn_*")
    if len(devices) % n_slices:
        raise ConfigError(f"mesh.dcn_*: {n_slices} slices do not divide {len(devices)} devices")
    ici = resolve_axis_sizes((cfg.data, cfg.fsdp, cfg.tensor), len(devices) // n_slices, "mesh")
    if n_slices > 1:
        from jax.experimental import mesh_utils
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    else:
        try:
            from jax.experimental import mesh_utils
            array = mesh_utils.create_device_mesh(ici, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            array = np.array(devices).reshape(ici)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _num_slices(devices: Sequence[jax.Device]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def describe_mesh(mesh: Mesh) -> str:
    """One line for logs: axis sizes, device kind and process count."""
    sizes = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    kind = mesh.devices.flat[0].device_kind
    return f"mesh({sizes}) over {mesh.devices.size} {kind} device(s), {jax.process_count()} process(es)"
