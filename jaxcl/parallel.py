"""Device meshes and logical-axis shardings.

Parameters name their axes logically (``embed``, ``vocab``, ``heads``, ``kv_heads``, ``mlp``,
``norm``); batches use ``batch`` and ``length``. A list of rules maps each logical name to a mesh
axis (or a tuple of them, or ``None`` for replicated), so the same code runs on one CPU and on a
pod: only the mesh sizes and the rules change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
)


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for ``data, fsdp, tensor``; one of them may be ``-1`` to take the remaining devices."""
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh: {num_devices} devices do not divide by the fixed axes' product {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: axes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, "
            f"but {num_devices} are present"
        )
    return tuple(sizes)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all (or the given) devices.

    Axis types are passed explicitly (``Auto``: the compiler propagates shardings from the
    annotated inputs and outputs of each jitted step).
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(shape or {"data": -1}, len(devices))
    return jax.make_mesh(
        sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec``; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _fits(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (small vocabularies, odd head counts)."""
    fixed = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = math.prod(mesh.shape[a] for a in axes)
        fixed.append(entry if axes and dim % size == 0 else None)
    return PartitionSpec(*fixed)


def param_logical_names(model: nnx.Module) -> dict:
    """Pure-dict tree of each parameter's logical axis names."""
    state = nnx.state(model, nnx.Param)
    names = jax.tree.map(
        lambda v: tuple(v.get_metadata().get("out_sharding") or (None,) * v.value.ndim),
        state,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    return nnx.to_pure_dict(names)


def tree_shardings(logical_names: Any, shapes: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding for every leaf, from its logical names, dropping non-dividing axes."""
    return jax.tree.map(
        lambda names, leaf: NamedSharding(
            mesh, _fits(logical_to_spec(names, rules), np.shape(leaf), mesh)
        ),
        logical_names,
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Batches shard their leading axis by the ``batch`` rule, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
