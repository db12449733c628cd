"""Orbax checkpoints that chain tasks and stages, with a JSON manifest per checkpoint.

Layout of a run folder::

    OUT/checkpoints/<stage>/<step>/params      parameters (pure dict of arrays)
    OUT/checkpoints/<stage>/<step>/opt_state   the whole optimizer state, CL state included
    OUT/checkpoints/<stage>/<step>/manifest    recipe fingerprint, stage, task, step, metrics,
                                               parent checkpoint (lineage)
    OUT/manifest.json                          every checkpoint of the run, in order

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a killed
run never leaves a half-written checkpoint behind under a final name. Reading one that is damaged
(a file missing, truncated or corrupted) raises a :class:`CheckpointError` naming the file, and
leaves none of Orbax's asynchronous reads behind to print tracebacks later
(:func:`_settled_loops`); docs/failure-modes.md says what a resume does about it.

A run deletes nothing outside its folder: every deletion of run data passes
:func:`guard_deletion`, which allows only paths under ``OUT/checkpoints/`` (and the run's own
``manifest.json``, ``metrics.jsonl``, ``run.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcl.parallel import to_host

ITEMS = ("params", "opt_state", "frozen", "replay", "manifest")


def _manager(stage_dir: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        stage_dir.absolute(),
        item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    )


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: a file of it missing, truncated or corrupted, or its
    step folder not a folder. The message names the file; ``path`` is the step folder."""

    def __init__(self, message: str, path: Path | str | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


def _reason(err: BaseException) -> str:
    """The first line of the innermost cause of ``err`` (TensorStore's own message names the
    array and the file), at most 300 characters."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


class _SettlingLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first cancels and awaits the tasks still pending on it.

    Orbax runs each restore on a fresh loop and closes it as soon as one read fails, while the
    other reads of the same restore are still in flight; their TensorStore callbacks then call
    into the closed loop and their coroutines are finalized half-way, and each prints a
    traceback ("Event loop is closed", "Exception ignored in: <coroutine ...>") long after the
    error was raised and handled. Settling them before the close leaves nothing behind."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.run_until_complete(asyncio.wait(pending, timeout=60))
            for task in pending:  # their errors are the one raised already: retrieved here
                if task.done() and not task.cancelled():
                    task.exception()
        super().close()

    def call_soon_threadsafe(self, callback, *args, context=None):  # type: ignore[no-untyped-def]
        """A read of an abandoned restore that finishes on TensorStore's thread after the close
        has nobody left to tell: its callback is dropped instead of raising "Event loop is
        closed" on that thread."""
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise


def _quiet_abandoned(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loops' exception handler: a read that failed after the restore had already failed
    (its error is the one raised) is not reported again; anything else is, as by default."""
    if context.get("message") != "Task exception was never retrieved":
        loop.default_exception_handler(context)


@contextlib.contextmanager
def _settled_loops() -> Iterator[None]:
    """Within the block, the event loops Orbax creates settle their pending reads before they
    close (:class:`_SettlingLoop`), so a failed restore raises its error and prints nothing."""
    previous = asyncio.get_event_loop_policy()

    class Policy(type(previous)):  # type: ignore[misc]
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            loop = _SettlingLoop()
            loop.set_exception_handler(_quiet_abandoned)
            return loop

    asyncio.set_event_loop_policy(Policy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


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
    final = Path(stage_dir) / str(step)
    if os.path.lexists(final) and (final.is_symlink() or not final.is_dir()):
        # a link (broken, looping, or to a folder elsewhere) or a file where the step goes:
        # Orbax would fail to rename onto it, or delete through it; the link itself goes,
        # never what it points to
        remove_run_data(final, _run_dir_of(stage_dir))
    with _manager(stage_dir) as mgr:
        if step in mgr.all_steps():
            guard_deletion(Path(stage_dir) / str(step), _run_dir_of(stage_dir))
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


def stray_steps(stage_dir: Path) -> list[Path]:
    """Entries of a stage folder named like a step that are no folder: a broken or looping
    link, or a file (:func:`all_steps` leaves them out; :func:`save_checkpoint` replaces one
    when it saves that step)."""
    if not stage_dir.is_dir():
        return []
    return sorted(
        (p for p in stage_dir.iterdir() if p.name.isdigit() and not p.is_dir()),
        key=lambda p: int(p.name),
    )


#: The run folder's own files that starting afresh (``--overwrite``) may delete; everything
#: else a run deletes lies under ``OUT/checkpoints/``.
RUN_FILES = ("manifest.json", "metrics.jsonl", "run.json")


class UnsafeDeletion(ValueError):
    """A deletion outside a run folder's ``checkpoints/`` (refused: nothing was removed)."""


def guard_deletion(path: Path, run_dir: Path) -> Path:
    """``path`` (its folder resolved, a link itself not followed) if a run may delete it: under
    ``run_dir/checkpoints/`` or that folder itself, or one of :data:`RUN_FILES` directly in
    ``run_dir``; else :class:`UnsafeDeletion`. Every deletion of run data passes here
    (:func:`remove_run_data`, :func:`delete_steps`, a replaced step in :func:`save_checkpoint`)."""
    path = Path(path)
    run = Path(run_dir).resolve()
    target = path.parent.resolve() / path.name
    roots = {run / "checkpoints", (run / "checkpoints").resolve()}  # a linked checkpoints/ too
    inside = any(target == r or r in target.parents for r in roots)
    own_file = target.parent == run and target.name in RUN_FILES
    if path.name in ("", ".", "..") or not (inside or own_file):
        raise UnsafeDeletion(
            f"refusing to delete {path}: a run deletes only under its folder's checkpoints/ "
            f"({run / 'checkpoints'}) and its own {', '.join(RUN_FILES)}"
        )
    return target


def remove_run_data(path: Path, run_dir: Path) -> None:
    """Delete ``path`` of run folder ``run_dir`` (a folder with its files, a file, or a link
    itself; nothing when absent) once :func:`guard_deletion` allows it."""
    target = guard_deletion(path, run_dir)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.is_symlink() or target.exists():
        target.unlink()


def _run_dir_of(stage_dir: Path) -> Path:
    """The run folder ``OUT`` of a stage folder ``OUT/checkpoints/<stage>``."""
    stage_dir = Path(stage_dir)
    if stage_dir.parent.name != "checkpoints" or stage_dir.name in ("", ".", ".."):
        raise UnsafeDeletion(
            f"refusing to delete checkpoints in {stage_dir}: not a stage folder "
            "OUT/checkpoints/<stage> of a run"
        )
    return stage_dir.parent.parent


def delete_steps(stage_dir: Path, steps: list[int], run_dir: Path | None = None) -> None:
    """Delete checkpoints ``steps`` of stage folder ``stage_dir`` (``OUT/checkpoints/<stage>``
    of run folder ``run_dir``, by default its grandparent); every one is checked by
    :func:`guard_deletion` before any is deleted."""
    if not steps:
        return
    run_dir = _run_dir_of(stage_dir) if run_dir is None else Path(run_dir)
    for step in steps:
        guard_deletion(Path(stage_dir) / str(step), run_dir)
    linked = [s for s in steps if (Path(stage_dir) / str(s)).is_symlink()]
    for step in linked:  # a link goes as a link (Orbax would rmtree through it, or fail)
        remove_run_data(Path(stage_dir) / str(step), run_dir)
    with _manager(stage_dir) as mgr:
        for step in steps:
            if step not in linked:
                mgr.delete(step)


def restore_params(stage_dir: Path, like: Any, step: int | None = None) -> Any:
    """Parameters of checkpoint ``step`` (default: the latest), shaped and sharded like ``like``;
    a :class:`CheckpointError` naming the checkpoint when its arrays cannot be read."""
    step = latest_step(Path(stage_dir)) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {stage_dir}")
    args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract(like)))
    return _restore(Path(stage_dir), step, args, "params").params


def _resource_failure(err: BaseException) -> bool:
    """An out-of-memory error (host or device) on the way to a restore: not the checkpoint's
    fault, so it must not be taken for damage (a fallback would retrain and overwrite it)."""
    chain = [err, err.__cause__, err.__context__]
    return any(
        isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e)
        for e in chain
        if e is not None
    )


def _restore(stage_dir: Path, step: int, args: Any, what: str) -> Any:
    """Orbax's restore of ``args`` from checkpoint ``step``, its failures as CheckpointError."""
    step_dir = stage_dir / str(step)
    if not step_dir.is_dir():
        raise CheckpointError(f"{step_dir}: no checkpoint folder there", step_dir)
    try:
        with _settled_loops(), _manager(stage_dir) as mgr:
            return mgr.restore(step, args=args)
    except Exception as err:  # Orbax and TensorStore raise many kinds: "unreadable" ...
        if _resource_failure(err):  # ... but running out of memory says nothing of the files
            raise
        raise CheckpointError(
            f"{step_dir}: its {what} cannot be read ({_reason(err)})", step_dir
        ) from err


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
    restored = _restore(Path(stage_dir), step, ocp.args.Composite(**items), "arrays")
    frozen = dict(restored.frozen) if manifest.get("frozen") else {}
    replay = None
    if stored:
        replay = {k: np.asarray(v) for k, v in restored.replay.items()}
    return restored.params, restored.opt_state, frozen, replay, manifest


def read_manifest(checkpoint_dir: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``checkpoint_dir``; a :class:`CheckpointError` naming its file
    when that is missing, truncated, or not a JSON object."""
    path = Path(checkpoint_dir) / "manifest" / "metadata"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing", checkpoint_dir) from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: truncated or corrupted ({type(err).__name__}: {_reason(err)})",
            checkpoint_dir,
        ) from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: not a JSON object", checkpoint_dir)
    return manifest


def _leaf_key(path: tuple) -> tuple[str, ...]:
    """A tree path as strings (Orbax's metadata spells integer keys as strings)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_mismatch(checkpoint_dir: Path, like: Any, item: str = "params") -> str | None:
    """How the tree of ``item`` in checkpoint ``checkpoint_dir`` differs from ``like`` (a leaf
    missing or extra, another shape), read from Orbax's metadata alone, before any array is;
    None when they agree. A :class:`CheckpointError` when the metadata cannot be read."""
    folder = Path(checkpoint_dir) / item
    try:
        with _settled_loops():
            handler = ocp.StandardCheckpointHandler()
            try:
                saved_tree = handler.metadata(epath.Path(folder.absolute()))
            finally:
                handler.close()
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        saved = {
            _leaf_key(p): tuple(getattr(leaf, "shape", ()) or ())
            for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
        }
    except Exception as err:  # a missing or truncated _METADATA, a folder that is a file...
        raise CheckpointError(
            f"{folder}: its metadata cannot be read ({_reason(err)})", checkpoint_dir
        ) from err
    wanted = {
        _leaf_key(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(like)[0]
    }
    missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    if missing:
        return f"no array {'/'.join(missing[0])} in the checkpoint ({len(missing)} missing)"
    if extra:
        return f"the checkpoint holds {'/'.join(extra[0])}, which the model has no place for"
    for key in sorted(wanted):
        if wanted[key] != saved[key]:
            return (
                f"{'/'.join(key)} has shape {saved[key]} in the checkpoint, {wanted[key]} in "
                "the model"
            )
    return None


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
