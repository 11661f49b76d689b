"""Logical axis names -> mesh axes, and the shardings they imply for params, state and batches."""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# FSDP over `embed`, tensor parallelism over heads / MLP / vocabulary, batch over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("slots", ("tensor",)),
)


def resolve_rules(rules: Sequence[tuple[str, Sequence[str]]] | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Config rules (or the defaults) in the form flax's logical partitioning expects."""
    rules = DEFAULT_RULES if rules is None else rules
    return tuple((name, tuple(axes)) for name, axes in rules)


def _mesh_axes(spec: PartitionSpec, mesh: Mesh, rules, shape: Sequence[int] | None = None) -> PartitionSpec:
    """Logical spec -> mesh spec.

    A mesh axis is used at most once per array (first claim wins), and an axis is dropped (that
    dim replicated) when it does not divide the dim's size, e.g. an odd vocabulary on `tensor`.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(spec):
        axes, size = [], 1
        for a in table.get(name, ()):
            if a in used or mesh.shape.get(a, 1) == 1:
                continue
            if shape is not None and shape[dim] % (size * mesh.shape[a]):
                continue
            axes.append(a)
            size *= mesh.shape[a]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_to_sharding(axes_tree: Any, mesh: Mesh, rules=None, shapes: Any = None) -> Any:
    """Tree of logical `PartitionSpec`s (e.g. `jaxcl.models.param_axes`) -> tree of `NamedSharding`s.

    `shapes`: optional matching tree of arrays / ShapeDtypeStructs; dims a mesh axis does not divide
    are then replicated instead of failing at placement time.
    """
    rules = resolve_rules(rules)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    if shapes is None:
        return jax.tree.map(lambda spec: NamedSharding(mesh, _mesh_axes(spec, mesh, rules)), axes_tree,
                            is_leaf=is_spec)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, _mesh_axes(spec, mesh, rules, x.shape)), axes_tree,
                        shapes, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, rules=None, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, ...]` input: the batch axis over the rule for `batch`."""
    spec = _mesh_axes(PartitionSpec("batch", *([None] * (ndim - 1))), mesh, resolve_rules(rules))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def sharding_table(params: Any, shardings: Any) -> str:
    """A printable table of every parameter's shape and mesh PartitionSpec (logged at startup)."""
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    rows = [(jax.tree_util.keystr(path, simple=True, separator="/"), str(tuple(x.shape)), str(s.spec))
            for (path, x), s in zip(flat_p, flat_s)]
    widths = [max(len(r[i]) for r in rows + [("parameter", "shape", "spec")]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("parameter", "shape", "spec"), widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def with_logical_constraint(x: jax.Array, names: Sequence[str | None], mesh: Mesh, rules=None) -> jax.Array:
    """Pin an activation's sharding by logical names inside a jitted function (a mesh axis that does not
    divide its dim is dropped: that dim is replicated)."""
    spec = _mesh_axes(PartitionSpec(*names), mesh, resolve_rules(rules), x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

