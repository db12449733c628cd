"""Parameter isolation: masks that decide which weights a task may move.

Masks stand **behind** the base optimizer (``chain(clip, adamw, packnet(...))``): they act on the
final update, so AdamW's momentum and decoupled weight decay cannot move a protected weight.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods._tree import SKIP, Select, is_skip, kernels, path_str, selection, skipped
from jaxcl.methods.compose import Behind, Position, behind
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.protocol import (
    Carry,
    Context,
    EvalView,
    Hook,
    MethodSpecBase,
    kernel_select,
    with_state,
)

S = TypeVar("S")

#: PackNet's phases within a task: before the prune the task trains every free weight; after it,
#: only the weights it kept (the pruned ones are held at zero).
TRAIN, RETRAIN = 0, 1
#: owners are int8: task t (1-based) owns its weights, 0 marks a free one
MAX_TASKS = 127


class FreezeState(NamedTuple):
    """``freeze`` keeps no state: its mask is fixed when the transform is built."""


class PackNetState(NamedTuple):
    """PackNet's record of which task owns which weight.

    ``owner`` (int8, shaped like each selected leaf; :data:`SKIP` elsewhere) is 0 for a free
    weight and t ≥ 1 for a weight task t (1-based) kept; ``tasks`` counts finished tasks;
    ``phase`` is :data:`TRAIN` before the current task's prune and :data:`RETRAIN` after it;
    ``prune`` the fraction of each task's free weights it prunes, per leaf."""

    owner: optax.Params
    tasks: jax.Array
    phase: jax.Array
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


# ----------------------------------------------------------------------------- PackNet


def packnet(prune: float = 0.5, select: Select = kernels) -> Behind:
    """PackNet (Mallya & Lazebnik, 2018): each task trains, prunes and then owns a fixed subset
    of the selected weights; every other leaf trains on the first task only.

    Let ``c = tasks + 1`` be the current task (1-based) and ``o`` a selected leaf's owners. The
    update is masked, AdamW's weight decay included (the mask stands behind it)::

        phase TRAIN:    u ← u · [o = 0]        (the weights free at the task's start)
        phase RETRAIN:  u ← u · [o = c]        (the weights the task kept; pruned ones stay 0)
        unselected:     u ← u · [tasks = 0]    (biases, norms: fixed after the first task)

    The prune (:func:`packnet_prune`, run by :class:`PackNetSpec`'s step hook after a declared
    share of the task's steps) zeroes, per leaf, the ``round(prune · n)`` smallest ``|θ|`` of
    the ``n`` free weights, leaves them free for later tasks and gives the rest to task ``c``;
    the remaining steps retrain those. :func:`jaxcl.methods.consolidate` then closes the task
    (``tasks ← c``, phase back to TRAIN). A task whose prune did not run (the transform used
    without the hooks) is pruned by consolidate itself, without retraining, and its pruned
    weights keep their values (free: zeroed in the finished task's view, trained by the next
    task from where they are). :func:`packnet_task_params` gives the parameters task ``t`` is
    scored with. Memory: one int8 buffer per selected leaf (¼ of a float32 parameter buffer).
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
        tasks, phase = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # separate buffers
        return PackNetState(owner, tasks, phase, jnp.asarray(prune, jnp.float32))

    def update(updates, state: PackNetState, params=None, **extra_args):
        del params, extra_args
        current = (state.tasks + 1).astype(jnp.int8)
        first = state.tasks == 0

        def mask(u, o):
            if skipped(o):
                keep = first
            else:
                keep = jnp.where(state.phase == TRAIN, o == 0, o == current)
            return jnp.where(keep, u, jnp.zeros_like(u))

        return jax.tree.map(mask, updates, state.owner), state

    return behind(init, update)


def prune_by_magnitude(p: jax.Array, eligible: jax.Array, fraction: jax.Array) -> jax.Array:
    """Which ``eligible`` weights of one leaf PackNet prunes, as the reference code does:
    ``k = round(fraction · n)`` of the ``n`` eligible weights (half to even, as Python's
    ``round``), ``c`` the ``k``-th smallest eligible ``|θ|``, and every eligible weight with
    ``|θ| ≤ c`` removed (none when ``k = 0``; weights tied with ``c`` all go)."""
    mag = jnp.abs(p.astype(jnp.float32))
    n = jnp.sum(eligible)
    k = jnp.round(fraction * n).astype(jnp.int32)
    ranked = jnp.sort(jnp.where(eligible, mag, jnp.inf).ravel())
    cutoff = ranked[jnp.clip(k - 1, 0, ranked.size - 1)]
    return eligible & (mag <= cutoff) & (k > 0)


def _prune(state: PackNetState, params: optax.Params, fraction: jax.Array, zero: bool):
    """``(owner', params')``: the prune of the current task on every selected leaf;
    a no-op once the task is in its RETRAIN phase (the prune already ran)."""
    current = (state.tasks + 1).astype(jnp.int8)
    before = state.phase == TRAIN

    def leaf(o, p):
        if skipped(o):
            return o, p
        eligible = (o == 0) & before
        removed = prune_by_magnitude(p, eligible, fraction)
        owner = jnp.where(eligible & ~removed, current, o)
        return owner, (jnp.where(removed, jnp.zeros_like(p), p) if zero else p)

    outer = jax.tree.structure(state.owner, is_leaf=is_skip)
    owners = outer.flatten_up_to(state.owner)
    pairs = [leaf(o, p) for o, p in zip(owners, outer.flatten_up_to(params), strict=True)]
    owner = outer.unflatten([o for o, _ in pairs])
    new_params = outer.unflatten([p for _, p in pairs])
    return owner, new_params


@jax.jit
def packnet_prune(
    state: PackNetState, params: optax.Params, fraction: jax.Array
) -> tuple[PackNetState, optax.Params]:
    """PackNet's prune of the current task (``params`` mirrors ``state.owner``): per selected
    leaf, of the weights free at the task's start, those :func:`prune_by_magnitude` picks for
    ``fraction`` are set to zero and stay free; the others become the current task's. The phase
    becomes RETRAIN. ``fraction = 0`` gives the task every free weight (no prune)."""
    owner, new_params = _prune(state, params, fraction, zero=True)
    retrain = jnp.asarray(RETRAIN, state.phase.dtype)
    return state._replace(owner=owner, phase=retrain), new_params


@jax.jit
def _close_task(state: PackNetState, params: optax.Params) -> PackNetState:
    owner, _ = _prune(state, params, state.prune, zero=False)
    return PackNetState(owner, state.tasks + 1, jnp.zeros_like(state.phase), state.prune)


def _refresh_packnet(state: PackNetState, *, params, **_) -> PackNetState:
    """The task's end: its weights are fixed (``tasks ← tasks + 1``, phase TRAIN). If its prune
    never ran (phase still TRAIN), the prune happens here, without retraining or zeroing."""
    if not isinstance(state.tasks, jax.core.Tracer) and int(state.tasks) >= MAX_TASKS:
        raise ValueError(f"packnet: at most {MAX_TASKS} tasks (int8 owners)")
    return _close_task(state, params)


def packnet_task_params(params: optax.Params, state: PackNetState, task: int) -> optax.Params:
    """The parameters task ``task`` (1-based) is scored with under PackNet: selected weights
    owned by tasks ``1..task`` kept, later tasks' weights zeroed, and free weights zeroed too
    once ``task`` is finished (``task ≤ state.tasks``: they are the ones it pruned); a task not
    finished yet sees the free weights as they are (the pretrained model before any task, the
    weights it is training). Unselected leaves are kept. ``params`` may hold more leaves than
    the state covers (LoRA's base weights): leaves are matched by path."""
    view = _task_view(params, state.owner, state.tasks, jnp.asarray(task, jnp.int32))
    return _placed_like(view, params)


@jax.jit
def _task_view(params: optax.Params, owner: optax.Params, tasks: jax.Array, task: jax.Array):
    owners = {
        path_str(path): o
        for path, o in jax.tree_util.tree_flatten_with_path(owner, is_leaf=is_skip)[0]
    }
    finished = task <= tasks

    def view(path, p):
        o = owners.get(path_str(path))
        if o is None or skipped(o):
            return p
        if o.shape != p.shape:
            raise ValueError(
                f"packnet: owners of {path_str(path)} have shape {o.shape}, the leaf {p.shape}"
            )
        keep = ((o > 0) & (o <= task)) | ((o == 0) & ~finished)
        return jnp.where(keep, p, jnp.zeros_like(p))

    return jax.tree_util.tree_map_with_path(view, params)


register_consolidator(PackNetState, "packnet", _refresh_packnet)


# ----------------------------------------------------------------------------- state helpers


def find_state(opt_state: optax.OptState, kind: type[S]) -> S | None:
    """The first state of type ``kind`` anywhere in ``opt_state`` (any nesting of chains), or
    None."""
    is_kind = lambda x: isinstance(x, kind)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_kind) if is_kind(x)]
    return found[0] if found else None


def replace_state(opt_state: optax.OptState, kind: type[S], new: S) -> optax.OptState:
    """``opt_state`` with every state of type ``kind`` replaced by ``new``."""
    is_kind = lambda x: isinstance(x, kind)  # noqa: E731
    return jax.tree.map(lambda x: new if is_kind(x) else x, opt_state, is_leaf=is_kind)


def _placed_like(new: Any, old: Any) -> Any:
    """``new`` with each array on ``old``'s sharding (the train step's ``in_shardings``)."""

    def put(n, o):
        return jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n

    return jax.tree.map(put, new, old, is_leaf=is_skip)


# ----------------------------------------------------------------------------- recipe entries


class FreezeSpec(MethodSpecBase):
    name: Literal["freeze"]
    position: ClassVar[Position] = "behind"
    include: str = Field(description="regex of the leaves to freeze, e.g. 'embed|lm_head'")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return freeze(self.include)


def train_steps(steps: int, retrain: float) -> int:
    """Steps of a ``steps``-step task before PackNet's prune: ``steps − r`` with
    ``r = min(round(retrain · steps), steps − 1)`` retraining steps, so at least one step trains
    before the prune (a 1-step task prunes after it and does not retrain)."""
    return steps - min(round(retrain * steps), max(steps - 1, 0))


def packnet_prune_hook(prune_last: bool) -> Any:
    """The step hook: :func:`packnet_prune` on the trainable tree, at the task's declared prune
    step. The stage's last task is not pruned unless ``prune_last`` (the reference's last
    prune fraction is -1): it keeps every free weight and trains them all to its end."""

    def hook(ctx: Context, carry: Carry) -> Carry:
        opt_state = carry.state.opt_state
        state = find_state(opt_state, PackNetState)
        if state is None:
            raise ValueError("packnet's prune hook found no PackNetState in the optimizer state")
        names = ctx.task.names
        last = bool(names) and ctx.task.index == len(names) - 1
        fraction = jnp.zeros_like(state.prune) if last and not prune_last else state.prune
        trainable, fixed = ctx.split(carry.state.params)
        new_state, pruned = packnet_prune(state, trainable, fraction)
        new_state, pruned = _placed_like((new_state, pruned), (state, trainable))
        return with_state(
            carry,
            params=ctx.join(pruned, fixed),
            opt_state=replace_state(opt_state, PackNetState, new_state),
        )

    return hook


def packnet_view(params: Any, carry: Carry, i: int) -> Any:
    """The eval view: task ``i`` (0-based) scored with :func:`packnet_task_params` of task
    ``i + 1`` (the parameters as they are when the optimizer state holds no PackNet)."""
    state = find_state(carry.state.opt_state, PackNetState)
    return params if state is None else packnet_task_params(params, state, i + 1)


class PackNetSpec(MethodSpecBase):
    """PackNet as its paper runs it: each task trains on the free weights, is pruned by
    magnitude per layer, retrains the kept weights for ``retrain`` of its steps, and keeps
    them fixed; biases and norms (every leaf not packed) are fixed after the first task; each
    task is scored with its own mask."""

    name: Literal["packnet"]
    position: ClassVar[Position] = "behind"
    describes_weights: ClassVar[bool] = True
    prune: float = Field(
        0.5, ge=0, lt=1, description="fraction of each task's free weights pruned, per layer"
    )
    retrain: float = Field(
        1 / 3,
        ge=0,
        lt=1,
        description="share of each task's steps spent retraining the kept weights after the "
        "prune (the reference: 10 retraining epochs after 20 training ones)",
    )
    prune_last: bool = Field(
        False,
        description="also prune the stage's last task (the reference does not: it keeps every "
        "free weight)",
    )
    include: str | None = Field(None, description="regex of the kernels to pack (all kernels)")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return packnet(self.prune, select=kernel_select(self.include, None))

    def prune_step(self, steps: int) -> int:
        """The 0-based step of a ``steps``-step task after which the prune runs."""
        return train_steps(steps, self.retrain) - 1

    def hooks(self) -> list[Hook]:
        return [
            Hook(
                "step",
                packnet_prune_hook(self.prune_last),
                "packnet (prune)",
                when=lambda k, steps: k == self.prune_step(steps),
            )
        ]

    def eval_view(self) -> EvalView | None:
        return packnet_view
