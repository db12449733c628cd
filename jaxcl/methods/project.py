"""Gradient projection: keep updates out of the directions earlier tasks depend on.

* ``agem``: one global projection against the gradient on a replay batch (``memory_grads``);
* ``ogd``: projection, over the whole parameter vector, out of an orthonormal basis of earlier
  tasks' per-example output gradients;
* ``o_lora``: a penalty making LoRA A matrices orthogonal to those of earlier tasks.

**What is projected.** A-GEM promises that a step does not increase the memory loss to first
order (``g_ref·Δθ ≤ 0``), OGD that it leaves earlier tasks' outputs unchanged to first order
(``<∇f_old, Δθ> = 0``). Both papers train with plain SGD, where ``Δθ = −η g`` and projecting the
gradient is projecting the step. Behind AdamW the step is ``u = adamw(g̃)``, whose per-coordinate
scaling, momentum and weight decay take ``u`` out of the allowed half-space or subspace again.
So by default (``project="update"``) both stand *behind* the base optimizer and project the
final update ``u`` (what is added to the parameters), as Adam-NSCL does for its null space; with
``project="gradient"`` they stand in front of it and project the raw gradient, as the papers
write it. Under SGD without momentum or weight decay the two give the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field, model_validator

from jaxcl.data.replay import ReplayBuffer
from jaxcl.methods._tree import SKIP, Select, selection, skipped, vdot
from jaxcl.methods.compose import Behind, Front, Position, behind, front
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.memory import remember_task
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase
from jaxcl.methods.storage import ORTHONORMAL_BASIS

#: ``"update"``: project AdamW's final update (behind it); ``"gradient"``: the raw gradient
#: (in front of it, the papers' form)
Projected = Literal["update", "gradient"]


def _placed(project: Projected, init: Any, update: Any) -> Front | Behind:
    if project == "update":
        return behind(init, update)
    if project == "gradient":
        return front(init, update)
    raise ValueError(f"project must be 'update' or 'gradient', got {project!r}")


def _position(project: Projected) -> Position:
    return "behind" if project == "update" else "front"


# ----------------------------------------------------------------------------- A-GEM


class AgemState(NamedTuple):
    """A-GEM keeps no state: its reference gradient arrives each step as ``memory_grads``."""


def agem(eps: float = 1e-12, *, project: Projected = "update") -> Front | Behind:
    """A-GEM (Chaudhry et al., 2019), with ``g_ref`` = ``memory_grads``, the gradient of the loss
    on a batch of earlier tasks' examples (whole trees, one global dot product).

    ``project="gradient"`` (the paper's form, in front of the base optimizer), on the gradient::

        g ← g − (g·g_ref / g_ref·g_ref) g_ref     if g·g_ref < 0

    ``project="update"`` (default, behind the base optimizer), on the final update ``u`` that is
    *added* to the parameters (``u = −η g`` under SGD)::

        u ← u − (u·g_ref / g_ref·g_ref) g_ref     if u·g_ref > 0

    so ``g_ref·u ≤ 0``: the memory loss does not rise to first order for the update actually
    applied, whatever AdamW's scaling, momentum and weight decay did. Both forms give the same
    step under SGD. Memory: none in the state (the trainer keeps examples and computes g_ref:
    one extra backward pass per step).
    """
    sign = 1.0 if project == "update" else -1.0  # project when sign · (x·g_ref) > 0

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
        coef = jnp.where(sign * dot > 0, dot / jnp.maximum(ref, eps), 0.0)
        out = jax.tree.map(
            lambda g, r: (g.astype(jnp.float32) - coef * r.astype(jnp.float32)).astype(g.dtype),
            updates,
            memory_grads,
        )
        return out, state

    return _placed(project, init, update)


# ----------------------------------------------------------------------------- OGD


class OgdState(NamedTuple):
    """``basis`` is shaped like the parameters: each selected leaf is a float32 stack
    ``[max_directions, *leaf.shape]`` (skipped leaves hold ``SKIP``), and slot ``j`` across all
    leaves is one direction ``b_j`` of the whole parameter vector. Slots ``0..size-1`` are
    orthonormal under the global inner product ``<a, b> = Σ_leaves Σ a ⊙ b``; the others are 0."""

    basis: optax.Params
    size: jax.Array


def _flags(select: Select | None, tree: Any) -> Any:
    return jax.tree.map(lambda _: True, tree) if select is None else selection(select, tree)


def _dots(basis: Any, tree: Any, k: int) -> jax.Array:
    """``[<b_j, tree>]_j`` over the selected leaves: shape ``[k]``."""

    def one(b, x):
        return None if skipped(b) else jnp.tensordot(b, x.astype(jnp.float32), axes=x.ndim)

    parts = jax.tree.leaves(jax.tree.map(one, basis, tree, is_leaf=skipped))
    return sum(parts, jnp.zeros((k,), jnp.float32))


def _subtract(basis: Any, tree: Any, coef: jax.Array) -> Any:
    """``tree − Σ_j coef_j b_j`` on the selected leaves (float32); others returned as they are."""

    def one(b, x):
        return x if skipped(b) else x.astype(jnp.float32) - jnp.tensordot(coef, b, axes=1)

    return jax.tree.map(one, basis, tree, is_leaf=skipped)


def _sq_norm(tree: Any) -> jax.Array:
    leaves = [jnp.vdot(x, x) for x in jax.tree.leaves(jax.tree.map(jnp.float32, tree))]
    return sum(leaves, jnp.zeros((), jnp.float32))


def ogd(
    max_directions: int = 32,
    select: Select | None = None,
    *,
    project: Projected = "update",
) -> Front | Behind:
    """Orthogonal gradient descent (Farajtabar et al., 2020) over the whole parameter vector.

    The state keeps up to ``max_directions`` orthonormal directions ``b_1..b_k`` of the vector
    of all selected leaves (all leaves when ``select`` is None), spanning the output gradients
    ``∇_θ f(x; θ*_t)`` of earlier tasks' examples; the update removes them with one global inner
    product::

        x ← x − Σ_j <x, b_j> b_j,     <a, b> = Σ_selected leaves Σ a ⊙ b

    where ``x`` is the final update (``project="update"``, default: behind the base optimizer,
    so the update applied is orthogonal to every stored direction and earlier outputs do not
    move to first order) or the raw gradient (``"gradient"``, the paper's form, in front).

    :func:`jaxcl.methods.consolidate` with ``ogd_grads`` (a list of parameter trees, or one tree
    whose leaves are stacked ``[n, *leaf.shape]``) adds each direction in order by Gram-Schmidt
    over the whole vector (two passes, for round-off), skipping one already spanned (residual
    below :data:`SPANNED` times its norm). A direction that finds the basis full raises a
    ``ValueError`` when consolidate runs eagerly (the trainer's case); under ``jit`` it is
    dropped.
    Memory: ``max_directions`` float32 copies of the selected leaves.
    """
    if max_directions < 1:
        raise ValueError(f"ogd: max_directions must be >= 1, got {max_directions}")
    k = max_directions

    def init(params: optax.Params) -> OgdState:
        flags = _flags(select, params)
        if jax.tree.leaves(params) and not any(jax.tree.leaves(flags)):
            raise ValueError(f"ogd: no parameter matches {select!r}")

        def one(p, f):
            if not f:
                return SKIP()
            return jnp.zeros((k, *p.shape), jnp.promote_types(p.dtype, jnp.float32))

        return OgdState(jax.tree.map(one, params, flags), jnp.zeros((), jnp.int32))

    def update(updates, state: OgdState, params=None, **extra_args):
        del params, extra_args
        coef = _dots(state.basis, updates, k)
        projected = _subtract(state.basis, updates, coef)
        out = jax.tree.map(lambda x, g: x.astype(g.dtype), projected, updates)
        return out, state

    return _placed(project, init, update)


def _stacked(directions: Any, params: Any) -> Any:
    """``ogd_grads`` as one tree of ``[n, *leaf.shape]`` stacks (None when there are none)."""
    if jax.tree.structure(directions) == jax.tree.structure(params):
        return directions
    directions = list(directions)
    if not directions:
        return None
    return jax.tree.map(lambda *xs: jnp.stack(xs), *directions)


#: a direction whose residual after Gram-Schmidt is below this share of its norm is spanned
SPANNED = 1e-5


def gram_schmidt_insert(
    state: OgdState, directions: Any, tol: float = SPANNED
) -> tuple[OgdState, jax.Array]:
    """Add the ``[n, ...]``-stacked ``directions`` one by one to the basis: each one's residual
    ``v = d − Σ_j <d, b_j> b_j`` (computed twice) goes to slot ``size`` as ``v / ‖v‖`` when
    ``‖v‖ > tol ‖d‖`` and a slot is free. Returns the new state and how many directions that
    were not spanned found the basis full."""
    basis = state.basis
    k = next(b.shape[0] for b in jax.tree.leaves(basis))
    only = jax.tree.map(lambda b, d: None if skipped(b) else d, basis, directions, is_leaf=skipped)

    def body(carry, d):
        basis, size, dropped = carry
        v = _subtract(basis, d, _dots(basis, d, k))
        v = _subtract(basis, v, _dots(basis, v, k))
        norm, scale = jnp.sqrt(_sq_norm(v)), jnp.sqrt(_sq_norm(d))
        novel = (scale > 0) & (norm > tol * scale)
        accept = novel & (size < k)
        slot = jnp.minimum(size, k - 1)

        def put(b, x):
            if skipped(b):
                return b
            row = jnp.where(accept, x / jnp.maximum(norm, 1e-30), b[slot])
            return b.at[slot].set(row.astype(b.dtype))

        basis = jax.tree.map(put, basis, v, is_leaf=skipped)
        return (basis, size + accept, dropped + (novel & ~accept)), None

    zero = jnp.zeros((), jnp.int32)
    (basis, size, dropped), _ = jax.lax.scan(body, (basis, state.size, zero), only)
    return OgdState(basis, size), dropped


_insert = jax.jit(gram_schmidt_insert, static_argnames="tol")  # compiled once per shape


def _refresh_ogd(state: OgdState, *, params, ogd_grads, **_) -> OgdState:
    directions = _stacked(ogd_grads, params)
    if directions is None:
        return state
    new, dropped = _insert(state, directions)
    if not isinstance(dropped, jax.core.Tracer) and int(dropped) > 0:
        k = next(b.shape[0] for b in jax.tree.leaves(state.basis))
        raise ValueError(
            f"ogd: the basis is full (max_directions={k}); {int(dropped)} direction(s) of the "
            "finished task would be left unprotected: raise max_directions or lower per_task"
        )
    return new


def output_gradients(
    apply: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    tokens: jax.Array,
    mask: jax.Array,
    output: Literal["logprob", "logit"] = "logprob",
) -> Any:
    """Per-example gradients of the model's output on its target, stacked ``[B, *leaf.shape]``.

    For row ``b`` with ``tokens [B, T+1]`` and ``mask [B, T+1]`` (the loss mask, aligned with
    the tokens), ``output="logprob"`` differentiates the target sequence's log-probability::

        f_b(θ) = Σ_t mask[b, t+1] · log p_θ(tokens[b, t+1] | tokens[b, ≤t])

    and ``"logit"`` the sum of the target tokens' logits ``Σ_t mask[b, t+1] · z_θ(...)[target]``
    (OGD-GTL's ground-truth logit, literally). One example at a time (``lax.map``): memory is the
    stacked result plus one example's activations.
    """

    def f(p, row, row_mask):
        logits = apply(p, row[None, :-1])[0].astype(jnp.float32)
        if output == "logprob":
            logits = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logits, row[1:, None], axis=-1)[:, 0]
        return jnp.sum(picked * row_mask[1:].astype(jnp.float32))

    grad = jax.grad(f)
    return jax.lax.map(lambda xs: grad(params, *xs), (tokens, mask))


def _target_rows(batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    if "tokens" in batch:
        return batch["tokens"], batch["loss_mask"]
    if "chosen_tokens" in batch:  # preference data: the preferred response is the target
        return batch["chosen_tokens"], batch["chosen_mask"]
    raise ValueError(f"ogd: cannot find target tokens in a batch with keys {sorted(batch)}")


# ----------------------------------------------------------------------------- O-LoRA


LoraLayout = Literal["in_r", "r_in"]

#: the current adapter's A and B leaves (what O-LoRA's ``loranew_`` L2 term covers)
LORA_AB = r"(?i)lora.*/[ab]$|lora_?[ab]$"


class OLoraState(NamedTuple):
    """Per selected LoRA A leaf ``[..., in, r]`` the A matrices of finished tasks side by side
    ``[..., in, r · max_tasks]`` (zero columns for tasks not yet seen); ``tasks`` done so far."""

    history: optax.Params
    tasks: jax.Array


def _l2_grad(p: jax.Array) -> jax.Array:
    """``∂‖P‖_F/∂P = P/‖P‖_F`` per matrix (the last two axes; 0 where ``P = 0``)."""
    x = p.astype(jnp.float32)
    axes = tuple(range(max(x.ndim - 2, 0), x.ndim))
    norm = jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))
    return jnp.where(norm > 0, x / jnp.maximum(norm, 1e-30), 0.0)


def o_lora(
    lam: float = 0.5,
    select: Select = r"(?i)lora.*/a$|lora_?a$",
    *,
    max_tasks: int = 8,
    layout: LoraLayout = "in_r",
    l2: float = 0.0,
    l2_select: Select = LORA_AB,
) -> Front:
    """O-LoRA (Wang et al., 2023): keep each task's LoRA subspace orthogonal to earlier ones.

    For every selected LoRA A matrix (``layout="in_r"``: ``[..., in, r]``, jaxcl's ``x A``
    convention; ``"r_in"``: PEFT's ``[r, in]``) with the earlier tasks' A matrices H stacked
    column-wise, the penalty (summing absolute values, as the O-LoRA code does) is::

        R = lam Σ_layers Σ |Hᵀ A| + l2 Σ_matrices ‖P‖_F,
        ∂R/∂A = lam · H sign(Hᵀ A) (+ l2 · A/‖A‖_F),   ∂R/∂B = l2 · B/‖B‖_F

    the second term over the current adapter's A and B leaves (``l2_select``), each matrix of a
    scanned ``[layers, ...]`` leaf on its own (the code's ``λ2 Σ torch.norm(loranew_*)``, the
    Frobenius norm, not squared; ``λ2 = 0`` in all its scripts, the default here). Its gradient
    is added to the incoming one. :func:`jaxcl.methods.consolidate` appends the current A to H
    (up to ``max_tasks``). The trainer must then start a fresh LoRA for the next task (merge or
    keep the old one), as O-LoRA does. ``select`` picks the A leaves by a path regular
    expression or predicate, so any parameter layout works.
    Memory: ``max_tasks`` copies of the LoRA A matrices.
    """
    if lam < 0:
        raise ValueError(f"o_lora: lam must be >= 0, got {lam}")
    if l2 < 0:
        raise ValueError(f"o_lora: l2 must be >= 0, got {l2}")

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
        decay = selection(l2_select, params) if l2 > 0 else jax.tree.map(lambda _: False, params)

        def add(g, p, h, d):
            out = g.astype(jnp.float32)
            if not skipped(h):
                a = to_in_r(p).astype(jnp.float32)
                grad = lam * h @ jnp.sign(jnp.swapaxes(h, -1, -2) @ a)
                out = out + (grad if layout == "in_r" else jnp.swapaxes(grad, -1, -2))
            if d:
                out = out + l2 * _l2_grad(p)
            return out.astype(g.dtype)

        return jax.tree.map(add, updates, params, state.history, decay, is_leaf=skipped), state

    return front(init, update)


def o_lora_penalty(
    params: optax.Params,
    state: OLoraState,
    lam: float,
    layout: LoraLayout = "in_r",
    *,
    l2: float = 0.0,
    l2_select: Select = LORA_AB,
):
    """``lam Σ |Hᵀ A| + l2 Σ_matrices ‖P‖_F`` over the selected leaves (tests and logging)."""

    def one(p, h):
        if skipped(h):
            return jnp.zeros((), jnp.float32)
        a = p if layout == "in_r" else jnp.swapaxes(p, -1, -2)
        return jnp.sum(jnp.abs(jnp.swapaxes(h, -1, -2) @ a.astype(jnp.float32)))

    def norms(p, d):
        if not d:
            return jnp.zeros((), jnp.float32)
        x = p.astype(jnp.float32)
        axes = tuple(range(max(x.ndim - 2, 0), x.ndim))
        return jnp.sum(jnp.sqrt(jnp.sum(x * x, axis=axes)))

    orth = sum(jax.tree.leaves(jax.tree.map(one, params, state.history, is_leaf=skipped)))
    total = lam * orth
    if l2 > 0:
        decay = selection(l2_select, params)
        total = total + l2 * sum(jax.tree.leaves(jax.tree.map(norms, params, decay)))
    return total


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

    history = jax.tree.map(append, params, state.history, is_leaf=skipped)
    return OLoraState(history, state.tasks + 1)


register_consolidator(OgdState, "ogd", _refresh_ogd, requires=("ogd_grads",))
register_consolidator(OLoraState, "o_lora", _refresh_o_lora)


# ----------------------------------------------------------------------------- recipe entries


def _project_field() -> Any:
    return Field(
        "update",
        description="'update': project AdamW's final update, so the promise holds for the step "
        "applied (behind the optimizer); 'gradient': the raw gradient, as the paper (in front)",
    )


class AgemSpec(MethodSpecBase):
    name: Literal["agem"]
    per_task: int = Field(256, ge=1, description="examples kept from each finished task")
    project: Projected = _project_field()

    def place(self) -> Position:
        return _position(self.project)

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return agem(project=self.project)

    def new_memory(self, *, seed: int, n_tasks: int) -> Any:
        return ReplayBuffer(self.per_task * n_tasks, quota="equal", seed=seed)

    def hooks(self) -> list[Hook]:
        return [Hook("memory", remember_task, "agem")]

    @property
    def needs_memory_grads(self) -> bool:
        return True


class OgdSpec(MethodSpecBase):
    name: Literal["ogd"]
    buffer_dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    buffer_dtype_reason: ClassVar[str] = ORTHONORMAL_BASIS
    describes_weights: ClassVar[bool] = True
    max_directions: int = Field(
        32, ge=1, description="basis size over all tasks (float32 copies of the trained leaves)"
    )
    per_task: int = Field(
        8, ge=1, description="examples of each finished task whose output gradients are stored"
    )
    output: Literal["logprob", "logit"] = Field(
        "logprob",
        description="f differentiated per example: the target's log-probability (summed over "
        "its loss-masked tokens) or the sum of its ground-truth logits",
    )
    project: Projected = _project_field()
    include: str | None = Field(None, description="regex of the leaves to protect (all if unset)")

    @model_validator(mode="after")
    def _fits(self) -> OgdSpec:
        if self.per_task > self.max_directions:
            raise ValueError(
                f"ogd: per_task ({self.per_task}) must not exceed max_directions "
                f"({self.max_directions}), or the first task alone fills the basis"
            )
        return self

    def place(self) -> Position:
        return _position(self.project)

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        # the last task's directions are never stored: nothing follows it
        need = self.per_task * max(n_tasks - 1, 0)
        if need > self.max_directions:
            raise ValueError(
                f"ogd.max_directions ({self.max_directions}) must hold per_task ({self.per_task}) "
                f"directions for each of the stage's {n_tasks - 1} tasks before its last "
                f"({need}): raise max_directions or lower per_task"
            )

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return ogd(self.max_directions, select=self.include, project=self.project)

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        """``ogd_grads``: output gradients of ``per_task`` of the finished task's own examples,
        at the parameters it ended with, stacked ``[per_task, *leaf.shape]``; none after the
        stage's last task (no later task needs them, and the basis is sized without them)."""
        if ctx.task.names and ctx.task.index == len(ctx.task.names) - 1:
            return {"ogd_grads": []}
        params = ctx.trainable(carry)
        grads = jax.jit(partial(output_gradients, ctx.apply, output=self.output))
        parts, n = [], 0
        for batch in ctx.batches(self.per_task):
            tokens, mask = _target_rows(batch)
            take = min(self.per_task - n, tokens.shape[0])
            parts.append(grads(params, tokens[:take], mask[:take]))
            n += take
            if n >= self.per_task:
                break
        if len(parts) == 1:
            return {"ogd_grads": parts[0]}
        return {"ogd_grads": jax.tree.map(lambda *x: jnp.concatenate(x), *parts)}


class OLoraSpec(MethodSpecBase):
    name: Literal["o_lora"]
    lam: float = Field(0.5, ge=0, description="λ1: weight of Σ |A_oldᵀ A| (O-LoRA: 0.5)")
    l2: float = Field(
        0.0, ge=0, description="λ2: weight of Σ ‖P‖_F over the current adapter (O-LoRA: 0)"
    )
    include: str = Field(r"(?i)lora.*/a$|lora_?a$", description="regex of the LoRA A leaves")
    l2_include: str = Field(LORA_AB, description="regex of the adapter leaves λ2 covers")
    max_tasks: int = Field(8, ge=1)
    layout: Literal["in_r", "r_in"] = "in_r"

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if lora is None:
            raise ValueError("needs LoRA adapters: add `lora: {rank: 8}` to the stage")
        if self.max_tasks < n_tasks:
            raise ValueError(
                f"o_lora.max_tasks ({self.max_tasks}) must be at least the stage's number of "
                f"tasks ({n_tasks})"
            )

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return o_lora(
            self.lam,
            self.include,
            max_tasks=self.max_tasks,
            layout=self.layout,
            l2=self.l2,
            l2_select=self.l2_include,
        )
