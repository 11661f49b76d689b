"""Sharding: device mesh from config, logical axis rules, multi-host initialisation."""

from jaxcl.parallel.distributed import initialize_distributed
from jaxcl.parallel.mesh import MESH_AXES, describe_mesh, make_mesh, resolve_axis_sizes
from jaxcl.parallel.rules import DEFAULT_RULES, batch_sharding, logical_to_sharding, replicated, resolve_rules, \
    sharding_table, with_logical_constraint

__all__ = ["MESH_AXES", "DEFAULT_RULES", "make_mesh", "describe_mesh", "resolve_axis_sizes", "logical_to_sharding",
           "batch_sharding", "replicated", "resolve_rules", "sharding_table", "with_logical_constraint",
           "initialize_distributed"]
