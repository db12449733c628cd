"""Orbax checkpoints that chain tasks and stages, with a JSON manifest per checkpoint.

Layout of a run folder::

    OUT/checkpoints/<stage>/<step>/params      parameters (pure dict of arrays)
    OUT/checkpoints/<stage>/<step>/opt_state   the whole optimizer state, CL state included
    OUT/checkpoints/<stage>/<step>/manifest    recipe fingerprint, stage, task, step, metrics,
                                               parent checkpoint (lineage)
    OUT/manifest.json                          every checkpoint of the run, in order

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a killed
run never leaves a half-written checkpoint behind under a final name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcl.parallel import to_host

ITEMS = ("params", "opt_state", "frozen", "replay", "manifest")


def _manager(stage_dir: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        stage_dir.absolute(),
        item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    )


def save_checkpoint(
    stage_dir: Path,
    step: int,
    params: Any,
    opt_state: Any,
    manifest: dict[str, Any],
    frozen: dict[str, Any] | None = None,
    replay: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write params, optimizer state, frozen trees (DPO reference...), the replay buffer's
    arrays and the manifest as checkpoint ``step``; returns its folder. An existing checkpoint
    ``step`` is replaced."""
    layout = {name: frozen_layout(tree, name) for name, tree in (frozen or {}).items()}
    items = {
        "params": ocp.args.StandardSave(params),
        "opt_state": ocp.args.StandardSave(opt_state),
        "manifest": ocp.args.JsonSave(dict(manifest, frozen=sorted(layout), frozen_layout=layout)),
    }
    if frozen:
        items["frozen"] = ocp.args.StandardSave(frozen)
    if replay:
        items["replay"] = ocp.args.StandardSave(replay)
    with _manager(stage_dir) as mgr:
        if step in mgr.all_steps():
            mgr.delete(step)
        mgr.save(step, args=ocp.args.Composite(**items), force=True)
        mgr.wait_until_finished()
    return stage_dir / str(step)


def frozen_layout(tree: Any, name: str) -> list[list[Any]]:
    """``[[path keys], shape, dtype]`` of every leaf of a frozen tree (a nested dict of arrays,
    or one array), as the manifest records it so any shape restores."""
    if not isinstance(tree, dict):
        return [[[], list(np.shape(tree)), str(jnp.asarray(tree).dtype)]]
    out = []
    for path, leaf in flatten_dict(tree).items():
        if not all(isinstance(k, str | int) for k in path):  # JSON keeps both
            raise TypeError(f"frozen tree {name!r}: keys must be strings or ints, got {path}")
        out.append([list(path), list(leaf.shape), str(leaf.dtype)])
    return out


def _frozen_like(layout: list[list[Any]], params_like: Any) -> Any:
    """Restore targets of a frozen tree: a leaf at a parameter's path and shape takes that
    parameter's sharding; any other leaf is replicated on the parameters' mesh."""
    flat_params = flatten_dict(params_like) if isinstance(params_like, dict) else {}
    some = next((v.sharding for v in flat_params.values() if getattr(v, "sharding", None)), None)
    replicated = (
        jax.sharding.NamedSharding(some.mesh, jax.sharding.PartitionSpec())
        if isinstance(some, jax.sharding.NamedSharding)
        else some
    )

    def like(path, shape, dtype):
        param = flat_params.get(tuple(path))
        sharding = param.sharding if param is not None and list(param.shape) == shape else None
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding or replicated)

    if len(layout) == 1 and not layout[0][0]:
        return like(*layout[0])
    return unflatten_dict({tuple(path): like(path, shape, dtype) for path, shape, dtype in layout})


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of ``tree``'s arrays (restore targets)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def all_steps(stage_dir: Path) -> list[int]:
    """Committed checkpoint steps of a stage, ascending (half-written ones are not listed: Orbax
    writes a save into a temporary folder and renames it to the step when complete).

    Read from the folder, not through a ``CheckpointManager``: creating one is a collective
    across processes, and whether the folder exists yet may differ between them."""
    if not stage_dir.exists():
        return []
    return sorted(int(p.name) for p in stage_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_step(stage_dir: Path) -> int | None:
    steps = all_steps(stage_dir)
    return steps[-1] if steps else None


def delete_steps(stage_dir: Path, steps: list[int]) -> None:
    if not steps:
        return
    with _manager(stage_dir) as mgr:
        for step in steps:
            mgr.delete(step)


def restore_params(stage_dir: Path, like: Any, step: int | None = None) -> Any:
    """Parameters of checkpoint ``step`` (default: the latest), shaped and sharded like ``like``."""
    with _manager(stage_dir) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {stage_dir}")
        restored = mgr.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract(like)))
        )
    return restored.params


def restore_checkpoint(
    stage_dir: Path, step: int, params_like: Any, opt_state_like: Any
) -> tuple[Any, Any, dict[str, Any], dict[str, np.ndarray] | None, dict[str, Any]]:
    """``(params, opt_state, frozen, replay arrays, manifest)`` of checkpoint ``step``; frozen
    trees come back in their recorded shapes and dtypes (sharded like the parameters at the
    same paths, replicated otherwise), replay arrays as numpy."""
    manifest = read_manifest(stage_dir / str(step))
    items = {
        "params": ocp.args.StandardRestore(abstract(params_like)),
        "opt_state": ocp.args.StandardRestore(abstract(opt_state_like)),
    }
    if manifest.get("frozen"):
        layouts = manifest.get("frozen_layout") or {}
        items["frozen"] = ocp.args.StandardRestore(
            {
                name: _frozen_like(layouts[name], params_like)
                if name in layouts
                else abstract(params_like)  # checkpoints written before layouts were recorded
                for name in manifest["frozen"]
            }
        )
    stored = bool(manifest.get("replay")) and manifest["replay"].get("stored", 1)
    if stored:
        items["replay"] = ocp.args.StandardRestore()
    with _manager(stage_dir) as mgr:
        restored = mgr.restore(step, args=ocp.args.Composite(**items))
    frozen = dict(restored.frozen) if manifest.get("frozen") else {}
    replay = None
    if stored:
        replay = {k: np.asarray(v) for k, v in restored.replay.items()}
    return restored.params, restored.opt_state, frozen, replay, manifest


def read_manifest(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / "manifest" / "metadata").read_text())


def _bits(leaf: jax.Array) -> jax.Array:
    """The leaf's bit patterns as uint32 (16-bit types zero-extended)."""
    width = jnp.dtype(leaf.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    """Two position-weighted sums of each leaf's bits, modulo 2³². Integer sums are exact in any
    reduction order, so the result does not depend on sharding or device count."""
    out = []
    for leaf in leaves:
        bits = _bits(leaf)
        index = jnp.arange(bits.size, dtype=jnp.uint32)
        weights = index * jnp.uint32(2654435761) + jnp.uint32(1)
        out.append(
            jnp.stack([jnp.sum(bits * weights), jnp.sum(bits ^ (index * jnp.uint32(40503)))])
        )
    return out


def params_digest(params: Any) -> str:
    """A fingerprint of every parameter's bits, in tree order: different bits give (all but
    certainly) different digests, equal bits equal ones. Computed on the devices (two weighted
    uint32 sums per leaf), so only a few bytes per leaf reach the host even for large models."""
    leaves = jax.tree.leaves(params)
    digest = hashlib.sha256()
    for leaf, sums in zip(leaves, _leaf_sums(leaves)):
        digest.update(str((leaf.shape, jnp.dtype(leaf.dtype).name)).encode())
        digest.update(np.asarray(to_host(sums)).tobytes())
    return digest.hexdigest()
