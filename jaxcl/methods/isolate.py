"""Parameter isolation: masks that decide which weights a task may move.

Masks stand **behind** the base optimizer (``chain(clip, adamw, packnet(...))``): they act on the
final update, so AdamW's momentum and decoupled weight decay cannot move a protected weight.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl.methods._tree import SKIP, Select, is_skip, kernels, selection, skipped
from jaxcl.methods.compose import Behind, behind
from jaxcl.methods.consolidate import register_consolidator


class FreezeState(NamedTuple):
    """``freeze`` keeps no state: its mask is fixed when the transform is built."""


class PackNetState(NamedTuple):
    """``owner`` (int8, shaped like each selected leaf) is 0 for a free weight and t ≥ 1 for a
    weight fixed by task t; ``tasks`` counts finished tasks; ``prune`` the pruned fraction."""

    owner: optax.Params
    tasks: jax.Array
    prune: jax.Array


class SoftMaskState(NamedTuple):
    """Accumulated normalised importance Î ∈ [0, 1] shaped like the parameters."""

    importance: optax.Params


def freeze(select: Select) -> Behind:
    """Freeze the selected leaves: ``u ← 0`` where ``select`` is true, ``u`` elsewhere.

    ``select`` is a predicate ``(path, leaf) -> bool``, a regular expression searched in the
    ``/``-joined path (``"embed|lm_head"``) or a pytree of booleans. Memory: none.
    """

    def init(params: optax.Params) -> FreezeState:
        del params
        return FreezeState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        flags = selection(select, updates)
        return jax.tree.map(lambda u, f: jnp.zeros_like(u) if f else u, updates, flags), state

    return behind(init, update)


def packnet(prune: float = 0.5, select: Select = kernels) -> Behind:
    """PackNet (Mallya & Lazebnik, 2018): one task, one fixed subset of the weights.

    Update: ``u ← 0`` where ``owner > 0`` (weights fixed by finished tasks stay bit-identical,
    AdamW's weight decay included, since the mask stands behind it). At the end of task t
    :func:`jaxcl.methods.consolidate` prunes, per selected leaf, the fraction ``prune`` of the
    still-free weights with the smallest ``|θ|`` and gives the rest to task t:
    ``owner ← t`` where ``owner = 0`` and ``|θ| ≥ q`` (q the ``prune``-quantile of the free
    ``|θ|``). Pruned weights stay free for later tasks; :func:`packnet_task_params` gives the
    parameters PackNet evaluates task t with (later tasks' and free weights zeroed).
    Unselected leaves train freely. Memory: one int8 buffer (¼ of a float32 parameter buffer).
    """
    if not 0.0 <= prune < 1.0:
        raise ValueError(f"packnet: prune must lie in [0, 1), got {prune}")

    def init(params: optax.Params) -> PackNetState:
        flags = selection(select, params)
        owner = jax.tree.map(
            lambda p, f: jnp.zeros(p.shape, jnp.int8) if f else SKIP(),
            params,
            flags,
        )
        return PackNetState(owner, jnp.zeros((), jnp.int32), jnp.asarray(prune, jnp.float32))

    def update(updates, state: PackNetState, params=None, **extra_args):
        del params, extra_args

        def mask(u, o):
            return u if skipped(o) else jnp.where(o > 0, jnp.zeros_like(u), u)

        return jax.tree.map(mask, updates, state.owner), state

    return behind(init, update)


def _refresh_packnet(state: PackNetState, *, params, **_) -> PackNetState:
    if not isinstance(state.tasks, jax.core.Tracer) and int(state.tasks) >= 127:
        raise ValueError("packnet: at most 127 tasks (int8 owners)")
    task = (state.tasks + 1).astype(jnp.int8)

    def assign(o, p):
        if skipped(o):
            return o
        free = o == 0
        mag = jnp.abs(p.astype(jnp.float32)).ravel()
        ranked = jnp.sort(jnp.where(free.ravel(), mag, jnp.inf))
        n_prune = jnp.floor(state.prune * jnp.sum(free)).astype(jnp.int32)
        q = ranked[jnp.minimum(n_prune, ranked.size - 1)]
        keep = free & (jnp.abs(p.astype(jnp.float32)) >= q)
        return jnp.where(keep, task, o)

    owner = jax.tree.map(assign, state.owner, params, is_leaf=is_skip)
    return PackNetState(owner, state.tasks + 1, state.prune)


def packnet_task_params(params: optax.Params, state: PackNetState, task: int) -> optax.Params:
    """The parameters of task ``task`` (1-based) under PackNet: selected weights owned by tasks
    ``1..task`` kept, all other selected weights (later tasks', free) zeroed."""

    def view(p, o):
        if skipped(o):
            return p
        return jnp.where((o > 0) & (o <= task), p, jnp.zeros_like(p))

    return jax.tree.map(view, params, state.owner)


def soft_mask(select: Select | None = None) -> Behind:
    """Soft masking of updates by importance, DAS-style (Ke et al., 2023).

    ``u ← u ⊙ (1 − Î)``. At each task boundary the raw importance I of the finished task
    (``soft_mask_importance=``, e.g. :func:`jaxcl.methods.mas_importance`) is normalised per leaf,
    ``Î_new = |tanh((I − mean I) / std I)|``, and accumulated: ``Î ← max(Î, Î_new)``. Î starts
    at 0 (the first task trains freely). Standing behind the optimizer, the scaling is not undone
    by Adam's normalisation. Memory: 1 parameter-sized buffer (of the selected leaves).
    """

    def init(params: optax.Params) -> SoftMaskState:
        flags = (
            jax.tree.map(lambda _: True, params) if select is None else selection(select, params)
        )
        return SoftMaskState(
            jax.tree.map(lambda p, f: jnp.zeros_like(p) if f else SKIP(), params, flags)
        )

    def update(updates, state: SoftMaskState, params=None, **extra_args):
        del params, extra_args

        def scale(u, m):
            return u if skipped(m) else (u * (1 - m)).astype(u.dtype)

        return jax.tree.map(scale, updates, state.importance), state

    return behind(init, update)


def normalized_importance(importance: jax.Array) -> jax.Array:
    """DAS's normalisation ``|tanh((I − mean I) / std I)|`` of one leaf (std 0 → all zero)."""
    x = importance.astype(jnp.float32)
    std = jnp.std(x)
    return jnp.abs(jnp.tanh((x - jnp.mean(x)) / jnp.where(std > 0, std, 1.0)))


def _refresh_soft_mask(state: SoftMaskState, *, params, soft_mask_importance, **_) -> SoftMaskState:
    del params

    def acc(m, i):
        return m if skipped(m) else jnp.maximum(m, normalized_importance(i).astype(m.dtype))

    return SoftMaskState(jax.tree.map(acc, state.importance, soft_mask_importance, is_leaf=is_skip))


register_consolidator(PackNetState, "packnet", _refresh_packnet)
register_consolidator(
    SoftMaskState, "soft_mask", _refresh_soft_mask, requires=("soft_mask_importance",)
)
