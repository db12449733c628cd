"""GEM, Gradient Episodic Memory (Lopez-Paz & Ranzato, 2017): the step may not increase the loss
of any earlier task, to first order, on that task's episodic memory.

With ``g`` the proposed gradient and ``G = [g_1; ...; g_T]`` the gradients on the memories of the
``T`` earlier tasks, GEM asks for the ``g̃`` closest to ``g`` with ``<g̃, g_k> ≥ 0`` for every
``k``. Its dual is a quadratic program over ``T`` variables (the paper's eq. 11-13)::

    v* = argmin_{v ≥ 0}  ½ vᵀ G Gᵀ v + gᵀ Gᵀ v          g̃ = Gᵀ v* + g

which is non-negative least squares, ``v* = argmin_{v ≥ 0} ‖Gᵀ v + g‖²``: ``g̃`` is the residual.
:func:`solve_gem_dual` solves it exactly: for every active set ``S ⊆ {1..T}`` the stationary
point of the objective on ``S`` (``v_S = −(M_SS)⁺ b_S``, zero elsewhere, clipped to ``v ≥ 0``)
is a feasible point, and the optimum's own active set yields the optimum, so the feasible
candidate of least objective is ``v*``. ``2^T`` small solves, vectorised and jit-able; ``T`` is
the number of earlier tasks (at most :data:`MAX_MEMORIES`). With one task this is A-GEM's
projection ``g − (g·g_1 / g_1·g_1) g_1`` when ``g·g_1 < 0``.

``margin`` is the paper's γ ("adding a small constant γ ≥ 0 to v* biased the gradient projection
to updates that favoured beneficial backwards transfer"): ``v ≥ γ`` (the reference code's
``memory_strength``, 0.5 in its scripts; 0 here, the paper's equations), with
``project="gradient"`` only: γ·g_k is a multiple of raw gradients. As in the reference
code, ``g`` is projected only when some ``<g, g_k> < 0``.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field, model_validator

from jaxcl.data.replay import ReplayBuffer
from jaxcl.methods.compose import Behind, Front, Position
from jaxcl.methods.memory import remember_task
from jaxcl.methods.project import Projected, _placed, _position, _project_field
from jaxcl.methods.protocol import Hook, MethodSpecBase

#: most earlier tasks the exact dual solve covers (2^T active sets)
MAX_MEMORIES = 12


def _active_sets(t: int) -> np.ndarray:
    """Every subset of ``t`` tasks as a ``[2^t, t]`` float mask."""
    return np.array(list(itertools.product((0.0, 1.0), repeat=t)), np.float32).reshape(-1, t)


def solve_gem_dual(gram: jax.Array, dots: jax.Array, margin: float = 0.0) -> jax.Array:
    """``v* = argmin_{v ≥ margin} ½ vᵀ M v + bᵀ v`` for ``M = gram`` (``G Gᵀ``, ``[T, T]``,
    positive semi-definite) and ``b = dots`` (``G g``, ``[T]``), exactly (see the module
    docstring); ``T`` static, at most :data:`MAX_MEMORIES`.

    ``v = u + γ`` turns the margin into ``u ≥ 0`` with ``b ← b + γ M 1``."""
    t = dots.shape[0]
    if t > MAX_MEMORIES:
        raise ValueError(f"gem: {t} memories; the exact dual solve covers at most {MAX_MEMORIES}")
    gram = gram.astype(jnp.float32)
    b = dots.astype(jnp.float32) + margin * gram.sum(axis=1)
    masks = jnp.asarray(_active_sets(t))

    def candidate(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        keep = jnp.outer(mask, mask)
        system = gram * keep + jnp.diag(1.0 - mask)  # identity on the inactive coordinates
        u = jnp.maximum(-(jnp.linalg.pinv(system, hermitian=True) @ (b * mask)) * mask, 0.0)
        return u, 0.5 * u @ gram @ u + b @ u

    us, objectives = jax.vmap(candidate)(masks)
    return us[jnp.argmin(objectives)] + margin


def _task_dots(stacked: Any, tree: Any) -> jax.Array:
    """``[T]``: ``<G_k, x>`` summed over leaves, ``stacked`` leaves ``[T, *leaf.shape]``."""
    parts = jax.tree.leaves(
        jax.tree.map(
            lambda g, x: jnp.einsum("t...,...->t", g.astype(jnp.float32), x.astype(jnp.float32)),
            stacked,
            tree,
        )
    )
    return sum(parts[1:], parts[0])


def _gram(stacked: Any) -> jax.Array:
    """``[T, T]``: ``G Gᵀ`` summed over leaves."""
    parts = jax.tree.leaves(
        jax.tree.map(
            lambda g: jnp.einsum("t...,s...->ts", g.astype(jnp.float32), g.astype(jnp.float32)),
            stacked,
        )
    )
    return sum(parts[1:], parts[0])


def gem_project(grad: Any, memory_grads: Any, margin: float = 0.0) -> Any:
    """``g̃ = g + Σ_k v*_k g_k`` when some ``<g, g_k> < 0``, else ``g`` (trees; ``memory_grads``
    leaves stacked ``[T, *leaf.shape]``, one slice per earlier task)."""
    dots = _task_dots(memory_grads, grad)
    v = solve_gem_dual(_gram(memory_grads), dots, margin)
    violated = jnp.any(dots < 0)

    def one(g, m):
        shift = jnp.einsum("t,t...->...", v, m.astype(jnp.float32))
        return jnp.where(violated, g.astype(jnp.float32) + shift, g).astype(g.dtype)

    return jax.tree.map(one, grad, memory_grads)


class GemState(NamedTuple):
    """GEM keeps no state: the memory gradients arrive each step as ``memory_grads``."""


def gem(margin: float = 0.0, *, project: Projected = "update") -> Front | Behind:
    """GEM's projection as an optax transform; ``memory_grads`` (an extra argument) holds one
    gradient per earlier task, leaves stacked ``[T, *leaf.shape]``.

    ``project="gradient"`` (the paper's form, in front of the base optimizer) projects the
    gradient ``g``. ``project="update"`` (default, behind it) projects the final update ``u``
    (``u = −η g`` under SGD) so that ``<u, g_k> ≤ 0`` for every earlier task: ``−u`` is
    projected as the gradient would be. Memory: none in the state (the trainer computes the
    ``T`` memory gradients, one backward pass each per step)."""
    if margin > 0 and project == "update":
        raise ValueError(
            f"gem: margin {margin} needs project='gradient': γ adds γ·g_k, a multiple of raw "
            "memory gradients, which behind AdamW would skip the learning rate (an update of "
            "size γ‖g_k‖ where AdamW's is about lr)"
        )
    sign = 1.0 if project == "gradient" else -1.0

    def init(params: optax.Params) -> GemState:
        del params
        return GemState()

    def update(updates, state, params=None, *, memory_grads=None, **extra_args):
        del params, extra_args
        if memory_grads is None:
            raise ValueError(
                "gem needs one memory gradient per earlier task: call update(g, s, params, "
                "memory_grads=...) with leaves stacked [tasks, *leaf.shape]"
            )
        x = jax.tree.map(lambda u: sign * u, updates)
        projected = gem_project(x, memory_grads, margin)
        return jax.tree.map(lambda p, u: (sign * p).astype(u.dtype), projected, updates), state

    return _placed(project, init, update)


class GemSpec(MethodSpecBase):
    name: Literal["gem"]
    per_task: int = Field(256, ge=1, description="examples kept from each finished task")
    margin: float = Field(
        0.0, ge=0, description="γ: v ≥ γ in the dual (the reference code's memory_strength)"
    )
    project: Projected = _project_field()

    def place(self) -> Position:
        return _position(self.project)

    @model_validator(mode="after")
    def _margin_needs_the_gradient_form(self) -> GemSpec:
        if self.margin > 0 and self.project == "update":
            raise ValueError(
                "margin > 0 needs project: gradient (γ·g_k is a raw gradient; behind AdamW it "
                "would skip the learning rate)"
            )
        return self

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if n_tasks - 1 > MAX_MEMORIES:
            raise ValueError(
                f"gem solves its dual exactly over the 2^T active sets of the T earlier tasks: at "
                f"most {MAX_MEMORIES + 1} tasks per stage, this stage has {n_tasks}"
            )

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return gem(self.margin, project=self.project)

    def new_memory(self, *, seed: int, n_tasks: int) -> Any:
        return ReplayBuffer(self.per_task * n_tasks, quota="equal", seed=seed)

    def hooks(self) -> list[Hook]:
        return [Hook("memory", remember_task, "gem")]

    @property
    def needs_memory_grads(self) -> bool:
        return True

    @property
    def memory_grads_per_task(self) -> bool:
        return True
