"""Gradient projection: keep updates out of the directions earlier tasks depend on.

All stand in front of the base optimizer and edit the raw gradient:

* ``agem``: one global projection against the gradient on a replay batch (``memory_grads``);
* ``ogd``: per-leaf projection out of an orthonormal basis of stored gradient directions;
* ``gpm``: per-layer projection out of the input-representation subspace of earlier tasks;
* ``o_lora``: a penalty making LoRA A matrices orthogonal to those of earlier tasks.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl.methods._tree import SKIP, Select, is_skip, kernels, path_str, selection, skipped, vdot
from jaxcl.methods.compose import Front, front
from jaxcl.methods.consolidate import register_consolidator


class AgemState(NamedTuple):
    """A-GEM keeps no state: its reference gradient arrives each step as ``memory_grads``."""


class OgdState(NamedTuple):
    """``basis[j]`` is the j-th stored direction, a tree shaped like the parameters; per leaf the
    non-zero ``basis[j]`` leaves are orthonormal. Skipped leaves hold zero-size arrays."""

    basis: tuple[optax.Params, ...]


class GpmState(NamedTuple):
    """Per selected kernel ``[..., in, out]`` an orthonormal basis ``[..., in, rank]`` of the
    input-representation space of earlier tasks (unused columns are zero); ``threshold`` ε."""

    basis: optax.Params
    threshold: jax.Array


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


def gpm(threshold: float = 0.97, select: Select = kernels, max_rank: int | None = None) -> Front:
    """Gradient projection memory (Saha et al., 2021), per layer.

    For a selected kernel W ``[..., in, out]`` used as ``y = x W``, the gradient
    ``∂L/∂W = Σ_t x_t δ_tᵀ`` lies in the span of the inputs x. GPM keeps an orthonormal basis U
    of the inputs of earlier tasks and removes it from the gradient::

        g ← (I − U Uᵀ) g

    so outputs on those inputs do not change. At a task boundary, with the task's activation
    covariance ``C = Σ_t x_t x_tᵀ`` (``gpm_covariance=``, see
    :func:`jaxcl.methods.activation_covariance`), ``P = U Uᵀ``, total energy ``E = tr C`` and
    captured energy ``E_U = tr(P C)``: the eigenvectors v_1, v_2, ... (eigenvalues
    σ²_1 ≥ σ²_2 ≥ ...) of the residual ``(I − P) C (I − P)`` are appended in order while
    ``E_U + Σ_{j<i} σ²_j < ε E`` (ε = ``threshold``), i.e. until the basis captures a fraction ε
    of the task's representation energy. ``max_rank`` caps the columns (default ``in``).
    Memory: ``in × max_rank`` per selected kernel (float32).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"gpm: threshold must lie in (0, 1], got {threshold}")

    def init(params: optax.Params) -> GpmState:
        flags = selection(select, params)

        def one(p, f):
            if not f:
                return SKIP()
            if p.ndim < 2:
                raise ValueError("gpm: selected leaves must be kernels [..., in, out]")
            rank = p.shape[-2] if max_rank is None else min(max_rank, p.shape[-2])
            return jnp.zeros((*p.shape[:-1], rank), jnp.float32)

        return GpmState(
            basis=jax.tree.map(one, params, flags), threshold=jnp.asarray(threshold, jnp.float32)
        )

    def update(updates, state: GpmState, params=None, **extra_args):
        del params, extra_args

        def project(g, u):
            if skipped(u):
                return g
            g32 = g.astype(jnp.float32)
            return (g32 - u @ (jnp.swapaxes(u, -1, -2) @ g32)).astype(g.dtype)

        return jax.tree.map(project, updates, state.basis), state

    return front(init, update)


def gpm_expand(basis: jax.Array, cov: jax.Array, threshold: jax.Array) -> jax.Array:
    """One GPM basis update (see :func:`gpm`): ``basis [..., in, rank]``, ``cov [..., in, in]``."""
    if basis.ndim > 2:
        return jax.vmap(gpm_expand, in_axes=(0, 0, None))(basis, cov, threshold)
    cov = cov.astype(jnp.float32)
    eye = jnp.eye(cov.shape[0], dtype=jnp.float32)
    residual_map = eye - basis @ basis.T
    total = jnp.trace(cov)
    captured = jnp.trace(basis.T @ cov @ basis)
    eigval, eigvec = jnp.linalg.eigh(residual_map @ cov @ residual_map)
    eigval, eigvec = jnp.maximum(eigval[::-1], 0.0), eigvec[:, ::-1]
    before = captured + jnp.cumsum(eigval) - eigval
    include = (before < threshold * total) & (eigval > 1e-7 * jnp.maximum(total, 1e-30))
    free = jnp.sum(basis * basis, axis=0) < 0.5
    # the m-th included eigenvector goes to the m-th free column (beyond capacity: dropped)
    rank_in = jnp.cumsum(include) - 1
    rank_free = jnp.cumsum(free) - 1
    place = include[:, None] & free[None, :] & (rank_in[:, None] == rank_free[None, :])
    return basis + eigvec @ place.astype(jnp.float32)


def _refresh_gpm(state: GpmState, *, params, gpm_covariance, **_) -> GpmState:
    del params
    missing = []

    def refresh(path, u):
        if skipped(u):
            return u
        name = path_str(path)
        if name not in gpm_covariance:
            missing.append(name)
            return u
        return gpm_expand(u, gpm_covariance[name], state.threshold)

    basis = jax.tree_util.tree_map_with_path(refresh, state.basis, is_leaf=is_skip)
    if missing:
        raise ValueError(f"gpm: no activation covariance for {', '.join(missing)}")
    return GpmState(basis=basis, threshold=state.threshold)


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
register_consolidator(GpmState, "gpm", _refresh_gpm, requires=("gpm_covariance",))
register_consolidator(OLoraState, "o_lora", _refresh_o_lora)
