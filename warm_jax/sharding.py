"""Device meshes and the logical-axis rules that place parameters and batches on them.

Every parameter dimension carries a logical name (see `warm_jax.models.transformer`); a rule
table maps logical names to mesh axes. Three standard layouts fall out of one table by choosing
axis sizes: pure data parallel (`data=-1`), FSDP (`fsdp=-1`: parameters and optimizer state
sharded along `embed`) and tensor parallel (`model=N`: heads, MLP and vocabulary split).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from warm_jax.errors import UserError

PyTree = Any

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("member", "member"),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("unsharded", None),
)

DEFAULT_AXES = (("member", 1), ("data", -1), ("fsdp", 1), ("model", 1))


@gin.configurable
def make_mesh(
    axes: Sequence[tuple[str, int]] = DEFAULT_AXES, devices: Sequence[Any] | None = None
) -> Mesh:
    """A mesh with named axes; one size may be -1 to take all remaining devices.

    In gin: `make_mesh.axes = (("data", 2), ("fsdp", -1), ("model", 1))`.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(a for a, _ in axes)
    sizes = [int(s) for _, s in axes]
    if len(set(names)) != len(names):
        raise UserError(f"make_mesh.axes: repeated axis name in {names}")
    if sizes.count(-1) > 1:
        raise UserError(f"make_mesh.axes: at most one axis may be -1, got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"make_mesh.axes: sizes must be positive or -1, got {dict(axes)}")
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(
                f"make_mesh.axes={dict(axes)}: {len(devices)} devices cannot be split into "
                f"axes whose fixed sizes multiply to {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(
            f"make_mesh.axes={dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available ({devices[0].platform})"
        )
    device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


@gin.configurable
def logical_rules(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def _present(mesh: Mesh, axes: Any) -> Any:
    """Drops mesh axes the mesh does not have (a rule may name `member` on a mesh without it)."""
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else kept


def logical_to_mesh_spec(
    logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules: Sequence
) -> PartitionSpec:
    """Maps one array's logical spec to a mesh spec. A dimension that the mapped mesh axes do not
    divide is replicated instead (e.g. 3 KV heads on a 2-way `model` axis), with a warning."""
    table = dict(rules)
    out, used = [], set()
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = _present(mesh, table.get(name)) if name is not None else None
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
        if any(a in used for a in flat):
            axes, flat = None, ()
        if axes is not None and dim % _axis_size(mesh, axes):
            warnings.warn(
                f"dimension '{name}' of size {dim} is not divisible by mesh axes {axes} "
                f"(size {_axis_size(mesh, axes)}); replicating it",
                stacklevel=2,
            )
            axes, flat = None, ()
        used.update(flat)
        out.append(axes)
    return PartitionSpec(*out)


def tree_shardings(logical_tree: PyTree, shapes: PyTree, mesh: Mesh, rules: Sequence) -> PyTree:
    """NamedShardings for a tree, given its logical specs and its shapes (arrays or structs)."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules)),
        logical_tree,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh: Mesh, rules: Sequence) -> Any:
    return _present(mesh, dict(rules).get("batch"))


def batch_shardings(batch: PyTree, mesh: Mesh, rules: Sequence) -> PyTree:
    """Leading (batch) dimension of every leaf split over the rules' `batch` mesh axes."""
    axes = batch_axes(mesh, rules)
    return jax.tree.map(
        lambda x: NamedSharding(mesh, PartitionSpec(axes, *([None] * (np.ndim(x) - 1)))), batch
    )


def check_batch_divisible(batch_size: int, mesh: Mesh, rules: Sequence, what: str) -> None:
    n = _axis_size(mesh, batch_axes(mesh, rules))
    if batch_size % n:
        raise UserError(
            f"{what}={batch_size} is not divisible by the {n} devices of the batch mesh axes "
            f"{batch_axes(mesh, rules)} (mesh {dict(mesh.shape)})"
        )
