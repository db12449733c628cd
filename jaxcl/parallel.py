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


def param_logical_names(model: nnx.Module, kinds: Any = nnx.Param) -> dict:
    """Pure-dict tree of each parameter's logical axis names (variables of ``kinds``)."""
    state = nnx.state(model, kinds)
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


# ----------------------------------------------------------------------------- multi-host


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join a multi-process run when the arguments or the environment say so.

    * explicit ``coordinator`` (``host:port``), ``num_processes`` and ``process_id``, or the
      environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
      ``JAX_PROCESS_ID``;
    * ``JAXCL_DISTRIBUTED=auto``: let JAX detect the cluster (Cloud TPU pods, SLURM, ...).

    On CPU the collectives go through gloo. Returns whether a multi-process run was joined.
    Must run before anything touches the devices.
    """
    import os

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    auto = os.environ.get("JAXCL_DISTRIBUTED") == "auto"
    if coordinator is None and not auto:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto and coordinator is None:
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError(
                "a multi-process run needs the coordinator address, the number of processes and "
                "this process's id (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
            )
        jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (results, manifests, logs)."""
    return jax.process_index() == 0


def to_host(x: jax.Array) -> np.ndarray:
    """A global array's value on this host, gathering shards held by other processes."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Place a host batch as global arrays: every process holds the whole batch and supplies
    the shards its devices own (on one process this is ``jax.device_put``)."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        for k, v in batch.items()
    }


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
