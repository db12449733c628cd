"""Parameter isolation: masks that decide which weights a task may move.

Masks stand **behind** the base optimizer (``chain(clip, adamw, packnet(...))``): they act on the
final update, so AdamW's momentum and decoupled weight decay cannot move a protected weight.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods._tree import SKIP, Select, is_skip, kernels, selection, skipped
from jaxcl.methods.compose import Behind, Position, behind
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.protocol import MethodSpecBase, kernel_select


class FreezeState(NamedTuple):
    """``freeze`` keeps no state: its mask is fixed when the transform is built."""


class PackNetState(NamedTuple):
    """``owner`` (int8, shaped like each selected leaf) is 0 for a free weight and t ≥ 1 for a
    weight fixed by task t; ``tasks`` counts finished tasks; ``prune`` the pruned fraction."""

    owner: optax.Params
    tasks: jax.Array
    prune: jax.Array


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


register_consolidator(PackNetState, "packnet", _refresh_packnet)


# ----------------------------------------------------------------------------- recipe entries


class FreezeSpec(MethodSpecBase):
    name: Literal["freeze"]
    position: ClassVar[Position] = "behind"
    include: str = Field(description="regex of the leaves to freeze, e.g. 'embed|lm_head'")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return freeze(self.include)


class PackNetSpec(MethodSpecBase):
    name: Literal["packnet"]
    position: ClassVar[Position] = "behind"
    describes_weights: ClassVar[bool] = True
    prune: float = Field(0.5, ge=0, lt=1, description="fraction of free weights pruned per task")
    include: str | None = Field(None, description="regex of the kernels to pack (all kernels)")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return packnet(self.prune, select=kernel_select(self.include, None))
