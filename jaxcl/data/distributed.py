"""Multi-host input: each process reads its shard, the global batch is assembled from them.

With ``P`` processes, process ``p`` builds its stream with ``batched_stream(...,
shard=(p, P))`` (or :func:`process_shard`), holding ``batch_size / P`` rows of every global
batch, and :func:`global_batch` turns those rows into one global ``jax.Array`` per field with
``jax.make_array_from_process_local_data``: no process ever materialises the global batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def process_shard() -> tuple[int, int]:
    """``(process_index, process_count)`` of this process, for ``batched_stream(shard=...)``."""
    return jax.process_index(), jax.process_count()


def batch_sharding(mesh: Mesh, axes: str | tuple[str, ...] = ("data", "fsdp")) -> NamedSharding:
    """Leading (batch) axis sharded over ``axes`` of ``mesh``, the rest replicated."""
    axes = (axes,) if isinstance(axes, str) else tuple(a for a in axes if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def global_batch(
    local: Mapping[str, np.ndarray],
    sharding: NamedSharding,
    *,
    global_batch_size: int | None = None,
) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of every field.

    ``global_batch_size`` defaults to ``local rows × process_count``. Every process must call it
    with the same fields and shapes (rows differ).
    """
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        rows = global_batch_size or value.shape[0] * jax.process_count()
        shape = (rows, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out
