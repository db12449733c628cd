"""Gradient projection: keep updates out of the directions earlier tasks depend on.

All stand in front of the base optimizer and edit the raw gradient:

* ``agem``: one global projection against the gradient on a replay batch (``memory_grads``);
* ``ogd``: per-leaf projection out of an orthonormal basis of stored gradient directions;
* ``o_lora``: a penalty making LoRA A matrices orthogonal to those of earlier tasks.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.data.replay import ReplayBuffer
from jaxcl.methods._tree import SKIP, Select, selection, skipped, vdot
from jaxcl.methods.compose import Front, front
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.memory import remember_task
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase


class AgemState(NamedTuple):
    """A-GEM keeps no state: its reference gradient arrives each step as ``memory_grads``."""


class OgdState(NamedTuple):
    """``basis[j]`` is the j-th stored direction, a tree shaped like the parameters; per leaf the
    non-zero ``basis[j]`` leaves are orthonormal. Skipped leaves hold zero-size arrays."""

    basis: tuple[optax.Params, ...]


class OLoraState(NamedTuple):
    """Per selected LoRA A leaf ``[..., in, r]`` the A matrices of finished tasks side by side
    ``[..., in, r · max_tasks]`` (zero columns for tasks not yet seen); ``tasks`` done so far."""

    history: optax.Params
    tasks: jax.Array


def agem(eps: float = 1e-12) -> Front:
    """A-GEM (Chaudhry et al., 2019): with g the gradient and g_ref = ``memory_grads`` the
    gradient on a batch of earlier tasks' examples (both whole trees)::

        g ← g − (g·g_ref / g_ref·g_ref) g_ref   if g·g_ref < 0,   g unchanged otherwise

    so the step never increases the replay loss to first order. Memory: none in the state (the
    trainer keeps examples and computes g_ref: one extra backward pass per step).
    """

    def init(params: optax.Params) -> AgemState:
        del params
        return AgemState()

    def update(updates, state, params=None, *, memory_grads=None, **extra_args):
        del params, extra_args
        if memory_grads is None:
            raise ValueError(
                "agem needs the replay-batch gradient: call update(g, s, params, memory_grads=...)"
            )
        dot = vdot(updates, memory_grads)
        ref = vdot(memory_grads, memory_grads)
        coef = jnp.where(dot < 0, dot / jnp.maximum(ref, eps), 0.0)
        updates = jax.tree.map(lambda g, r: (g - coef * r).astype(g.dtype), updates, memory_grads)
        return updates, state

    return front(init, update)


def _flags(select: Select | None, tree: Any) -> Any:
    return jax.tree.map(lambda _: True, tree) if select is None else selection(select, tree)


def ogd(max_directions: int = 16, select: Select | None = None) -> Front:
    """Orthogonal gradient descent (Farajtabar et al., 2020), per leaf.

    Each selected leaf ℓ keeps up to ``max_directions`` orthonormal vectors ``b_1..b_k`` spanning
    gradient directions of earlier tasks; the update projects them out::

        g_ℓ ← g_ℓ − Σ_j <g_ℓ, b_jℓ> b_jℓ

    :func:`jaxcl.methods.consolidate` with ``ogd_grads=[tree, ...]`` (gradients of the finished
    task) adds each one by Gram-Schmidt (twice, for round-off), skipping directions already
    spanned (relative residual < 1e-6) and, once the basis is full, further directions.
    Memory: ``max_directions`` parameter-sized buffers (of the selected leaves).
    """
    if max_directions < 1:
        raise ValueError(f"ogd: max_directions must be >= 1, got {max_directions}")

    def init(params: optax.Params) -> OgdState:
        flags = _flags(select, params)

        def one(_):
            return jax.tree.map(lambda p, f: jnp.zeros_like(p) if f else SKIP(), params, flags)

        return OgdState(basis=tuple(one(j) for j in range(max_directions)))

    def update(updates, state: OgdState, params=None, **extra_args):
        del params, extra_args

        def project(g, *basis):
            if skipped(basis[0]):
                return g
            out = g.astype(jnp.float32)
            for b in basis:
                out = out - jnp.vdot(b, out) * b
            return out.astype(g.dtype)

        return jax.tree.map(project, updates, *state.basis), state

    return front(init, update)


def _refresh_ogd(state: OgdState, *, params, ogd_grads, **_) -> OgdState:
    del params
    basis = list(state.basis)
    for direction in ogd_grads:
        leaves_d, treedef = jax.tree.flatten(direction)
        per_slot = [treedef.flatten_up_to(b) for b in basis]
        new_slots = [list(s) for s in per_slot]
        for i, d in enumerate(leaves_d):
            column = [s[i] for s in per_slot]
            if skipped(column[0]):
                continue
            for j, b in enumerate(_gram_schmidt_insert(d, column)):
                new_slots[j][i] = b
        basis = [treedef.unflatten(s) for s in new_slots]
    return OgdState(basis=tuple(basis))


def _gram_schmidt_insert(d: jax.Array, column: list[jax.Array]) -> list[jax.Array]:
    """Orthonormalize ``d`` against the non-zero vectors of ``column`` and store it in the first
    zero slot (if any, and if it is not already spanned)."""
    v = d.astype(jnp.float32)
    for _ in range(2):
        for b in column:
            v = v - jnp.vdot(b, v) * b
    norm = jnp.linalg.norm(v)
    occupied = jnp.stack([jnp.vdot(b, b) > 0.5 for b in column])
    slot = jnp.argmin(occupied)  # first free slot
    accept = (~occupied[slot]) & (norm > 1e-6 * jnp.linalg.norm(d.astype(jnp.float32)))
    unit = v / jnp.maximum(norm, 1e-30)
    return [jnp.where(accept & (slot == j), unit.astype(b.dtype), b) for j, b in enumerate(column)]


LoraLayout = Literal["in_r", "r_in"]


def o_lora(
    lam: float = 0.5,
    select: Select = r"(?i)lora.*/a$|lora_?a$",
    *,
    max_tasks: int = 8,
    layout: LoraLayout = "in_r",
) -> Front:
    """O-LoRA (Wang et al., 2023): keep each task's LoRA subspace orthogonal to earlier ones.

    For every selected LoRA A matrix (``layout="in_r"``: ``[..., in, r]``, jaxcl's ``x A``
    convention; ``"r_in"``: PEFT's ``[r, in]``) with the earlier tasks' A matrices H stacked
    column-wise, the penalty (summing absolute values as the O-LoRA code does) is::

        R = lam Σ_layers Σ |Hᵀ A|,     ∂R/∂A = lam · H sign(Hᵀ A)

    and its gradient is added to the incoming one. :func:`jaxcl.methods.consolidate` appends the
    current A to H (up to ``max_tasks``). The trainer must then start a fresh LoRA for the next
    task (merge or keep the old one), as O-LoRA does. ``select`` picks the A leaves by a path
    regular expression or predicate, so any parameter layout works.
    Memory: ``max_tasks`` copies of the LoRA A matrices.
    """
    if lam < 0:
        raise ValueError(f"o_lora: lam must be >= 0, got {lam}")

    def to_in_r(a):
        return a if layout == "in_r" else jnp.swapaxes(a, -1, -2)

    def init(params: optax.Params) -> OLoraState:
        flags = selection(select, params)
        if jax.tree.leaves(params) and not any(jax.tree.leaves(flags)):
            raise ValueError(
                f"o_lora: no parameter matches {select!r}; add LoRA to the model or pass select="
            )

        def one(p, f):
            if not f:
                return SKIP()
            a = to_in_r(p)
            if layout == "r_in" and a.shape[-1] == a.shape[-2]:
                raise ValueError("o_lora: layout 'r_in' needs rank != in (square A is ambiguous)")
            return jnp.zeros((*a.shape[:-1], a.shape[-1] * max_tasks), jnp.float32)

        return OLoraState(jax.tree.map(one, params, flags), jnp.zeros((), jnp.int32))

    def update(updates, state: OLoraState, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("o_lora needs the current parameters: call update(g, s, params)")

        def add(g, p, h):
            if skipped(h):
                return g
            a = to_in_r(p).astype(jnp.float32)
            grad = lam * h @ jnp.sign(jnp.swapaxes(h, -1, -2) @ a)
            return (g + (grad if layout == "in_r" else jnp.swapaxes(grad, -1, -2))).astype(g.dtype)

        return jax.tree.map(add, updates, params, state.history), state

    return front(init, update)


def o_lora_penalty(
    params: optax.Params, state: OLoraState, lam: float, layout: LoraLayout = "in_r"
):
    """``lam Σ |Hᵀ A|`` over the selected leaves (for tests and logging)."""

    def one(p, h):
        if skipped(h):
            return jnp.zeros((), jnp.float32)
        a = p if layout == "in_r" else jnp.swapaxes(p, -1, -2)
        return jnp.sum(jnp.abs(jnp.swapaxes(h, -1, -2) @ a.astype(jnp.float32)))

    return lam * sum(jax.tree.leaves(jax.tree.map(one, params, state.history)))


def _refresh_o_lora(state: OLoraState, *, params, **_) -> OLoraState:
    tasks = state.tasks

    def append(p, h):
        if skipped(h):
            return h
        a = p if p.shape[:-1] == h.shape[:-1] else jnp.swapaxes(p, -1, -2)
        r = a.shape[-1]
        if not isinstance(tasks, jax.core.Tracer) and (int(tasks) + 1) * r > h.shape[-1]:
            raise ValueError(f"o_lora: history holds {h.shape[-1] // r} tasks; raise max_tasks")
        start = (0,) * (h.ndim - 1) + (jnp.minimum(tasks * r, h.shape[-1] - r),)
        return jax.lax.dynamic_update_slice(h, a.astype(h.dtype), start)

    return OLoraState(jax.tree.map(append, params, state.history), state.tasks + 1)


register_consolidator(OgdState, "ogd", _refresh_ogd, requires=("ogd_grads",))
register_consolidator(OLoraState, "o_lora", _refresh_o_lora)


# ----------------------------------------------------------------------------- recipe entries


class AgemSpec(MethodSpecBase):
    name: Literal["agem"]
    per_task: int = Field(256, ge=1, description="examples kept from each finished task")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return agem()

    def new_memory(self, *, seed: int, n_tasks: int) -> Any:
        return ReplayBuffer(self.per_task * n_tasks, quota="equal", seed=seed)

    def hooks(self) -> list[Hook]:
        return [Hook("memory", remember_task, "agem")]

    @property
    def needs_memory_grads(self) -> bool:
        return True


class OgdSpec(MethodSpecBase):
    name: Literal["ogd"]
    describes_weights: ClassVar[bool] = True
    max_directions: int = Field(16, ge=1, description="basis size per leaf (parameter buffers)")
    grads_per_task: int = Field(4, ge=1, description="batch gradients stored per finished task")
    include: str | None = Field(None, description="regex of the leaves to protect (all if unset)")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return ogd(self.max_directions, select=self.include)

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        grad = jax.jit(jax.grad(ctx.loss_fn))
        params = ctx.trainable(carry)
        return {"ogd_grads": [grad(params, b) for b in ctx.batches(self.grads_per_task)]}


class OLoraSpec(MethodSpecBase):
    name: Literal["o_lora"]
    lam: float = Field(0.5, ge=0)
    include: str = Field(r"(?i)lora.*/a$|lora_?a$", description="regex of the LoRA A leaves")
    max_tasks: int = Field(8, ge=1)
    layout: Literal["in_r", "r_in"] = "in_r"

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return o_lora(self.lam, self.include, max_tasks=self.max_tasks, layout=self.layout)
