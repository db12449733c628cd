"""Regularization methods: pull parameters toward the anchor of earlier tasks.

Penalties (``l2_anchor``, ``ewc``, ``mas``, ``si``) stand in front of the base optimizer: they add
the gradient of their penalty to the incoming gradient, so AdamW sees ``∇L + ∇R``. ``recadam``
stands behind it: as in the RecAdam paper its quadratic term is decoupled from Adam's moments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods._tree import require_params
from jaxcl.methods.compose import Behind, Front, Position, behind, front
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.importance import fisher_diagonal, mas_importance
from jaxcl.methods.protocol import Carry, Context, MethodSpecBase, output_fn


class EwcState(NamedTuple):
    """``anchor`` θ* and diagonal Fisher ``fisher`` F, both shaped like the parameters;
    ``decay`` γ used when the Fisher is refreshed (F ← γ·F + F_new)."""

    anchor: optax.Params
    fisher: optax.Params
    decay: jax.Array


class MasState(NamedTuple):
    """``anchor`` θ* and MAS importance Ω shaped like the parameters; Ω ← γ·Ω + Ω_new."""

    anchor: optax.Params
    importance: optax.Params
    decay: jax.Array


class L2AnchorState(NamedTuple):
    anchor: optax.Params


class SiState(NamedTuple):
    """Synaptic intelligence: ``anchor`` θ*, consolidated importance ``omega`` Ω, the running path
    integral ``path`` w of the current task, and the previous step's parameters and gradient."""

    anchor: optax.Params
    omega: optax.Params
    path: optax.Params
    prev_params: optax.Params
    prev_grads: optax.Params
    damping: jax.Array


class RecAdamState(NamedTuple):
    """``anchor`` θ* (the pretrained / previous-task parameters) and ``count`` t, the step within
    the current task that drives the annealing coefficient λ(t)."""

    anchor: optax.Params
    count: jax.Array
    step: jax.Array


def _check_lam(lam: float, method: str) -> None:
    if lam < 0:
        raise ValueError(f"{method}: lam must be >= 0, got {lam}")


def _check_decay(decay: float, method: str) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"{method}: decay must lie in [0, 1], got {decay}")


def _weighted_pull(lam: float, weights_of, method: str):
    """``update`` adding ``lam · W ⊙ (θ − θ*)`` where ``W = weights_of(state)``."""

    def update(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, method)
        updates = jax.tree.map(
            lambda g, w, p, a: g + lam * w * (p - a),
            updates,
            weights_of(state),
            params,
            state.anchor,
        )
        return updates, state

    return update


def ewc(lam: float, decay: float = 1.0) -> Front:
    """Elastic weight consolidation (Kirkpatrick et al., 2017).

    Penalty ``R(θ) = (lam/2) Σ_i F_i (θ_i − θ*_i)²``, so the update adds
    ``∇R = lam · F ⊙ (θ − θ*)`` to the gradient. F starts at zero (no penalty on the first task);
    :func:`jaxcl.methods.consolidate` with ``fisher=`` sets θ* ← θ and F ← decay·F + F_new
    (``decay=1`` accumulates the tasks' Fishers; ``decay<1`` is online EWC, Schwarz et al. 2018).
    Memory: 2 parameter-sized buffers.
    """
    _check_lam(lam, "ewc")
    _check_decay(decay, "ewc")

    init = functools.partial(_anchored, EwcState, decay=decay)
    return front(init, _weighted_pull(lam, lambda s: s.fisher, "ewc"))


def _anchored(kind: type, params: optax.Params, decay: float):
    """``kind(θ* = params, weights = 0, γ = decay)``: the initial state of EWC and MAS."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    return kind(jax.tree.map(jnp.array, params), zeros, jnp.asarray(decay, jnp.float32))


def _reanchored(state, params: optax.Params, new: optax.Params):
    """θ* ← θ and weights ← γ·weights + new (EWC's Fisher, MAS's Ω) at a task boundary."""
    _, weights, decay = state
    accumulated = jax.tree.map(lambda old, fresh: decay * old + fresh, weights, new)
    return type(state)(jax.tree.map(jnp.array, params), accumulated, decay)


def _refresh_ewc(state: EwcState, *, params, fisher, **_) -> EwcState:
    return _reanchored(state, params, fisher)


def mas(lam: float, decay: float = 1.0) -> Front:
    """Memory-aware synapses (Aljundi et al., 2018).

    Importance ``Ω_i = E_x |∂‖f(x; θ)‖²₂ / ∂θ_i|`` (see :func:`jaxcl.methods.mas_importance`) of
    the model output f, estimated without labels at the end of each task. Penalty
    ``R(θ) = (lam/2) Σ_i Ω_i (θ_i − θ*_i)²``, gradient term ``lam · Ω ⊙ (θ − θ*)``.
    :func:`jaxcl.methods.consolidate` with ``mas_importance=`` sets θ* ← θ, Ω ← decay·Ω + Ω_new.
    Memory: 2 parameter-sized buffers.
    """
    _check_lam(lam, "mas")
    _check_decay(decay, "mas")

    init = functools.partial(_anchored, MasState, decay=decay)
    return front(init, _weighted_pull(lam, lambda s: s.importance, "mas"))


def _refresh_mas(state: MasState, *, params, mas_importance, **_) -> MasState:
    return _reanchored(state, params, mas_importance)


def l2_anchor(lam: float) -> Front:
    """L2 toward the last task's parameters: ``R(θ) = (lam/2) ‖θ − θ*‖²``, ``∇R = lam (θ − θ*)``.

    The anchor starts at the initial parameters and moves to the current ones at each
    :func:`jaxcl.methods.consolidate`. Memory: 1 parameter-sized buffer.
    """
    _check_lam(lam, "l2_anchor")

    def init(params: optax.Params) -> L2AnchorState:
        return L2AnchorState(anchor=jax.tree.map(jnp.array, params))

    def update(updates, state: L2AnchorState, params=None, **extra_args):
        del extra_args
        require_params(params, "l2_anchor")
        updates = jax.tree.map(lambda g, p, a: g + lam * (p - a), updates, params, state.anchor)
        return updates, state

    return front(init, update)


def _refresh_l2(state: L2AnchorState, *, params, **_) -> L2AnchorState:
    return L2AnchorState(anchor=jax.tree.map(jnp.array, params))


def si(lam: float, damping: float = 1e-3) -> Front:
    """Synaptic intelligence (Zenke et al., 2017).

    During a task the path integral of each parameter's contribution to the loss decrease is
    accumulated online: at step k (gradient g_k at θ_k) ``w ← w − g_{k−1} ⊙ (θ_k − θ_{k−1})``.
    At the task boundary (θ_end; the last step's move is flushed the same way), with
    ``Δ = θ_end − θ*``: ``Ω ← Ω + max(w, 0) / (Δ² + ξ)`` (ξ = ``damping``; a negative path
    integral, a parameter whose moves raised the loss, earns no importance), then ``w ← 0`` and
    ``θ* ← θ_end``. Penalty ``(lam/2) Σ Ω (θ − θ*)²``, gradient term ``lam · Ω ⊙ (θ − θ*)``.
    w uses the gradient this transform receives (the task loss: put ``si`` first in the chain).
    Memory: 5 parameter-sized buffers.
    """
    _check_lam(lam, "si")
    if damping <= 0:
        raise ValueError(f"si: damping must be > 0, got {damping}")

    def init(params: optax.Params) -> SiState:
        return SiState(
            anchor=jax.tree.map(jnp.array, params),
            omega=jax.tree.map(jnp.zeros_like, params),
            path=jax.tree.map(jnp.zeros_like, params),
            prev_params=jax.tree.map(jnp.array, params),
            prev_grads=jax.tree.map(jnp.zeros_like, params),
            damping=jnp.asarray(damping, jnp.float32),
        )

    def update(updates, state: SiState, params=None, **extra_args):
        del extra_args
        require_params(params, "si")
        out = jax.tree.map(
            lambda g, o, p, a: g + lam * o * (p - a), updates, state.omega, params, state.anchor
        )
        new_state = state._replace(
            path=_si_path(state, params),
            prev_params=jax.tree.map(jnp.array, params),
            prev_grads=jax.tree.map(jnp.array, updates),
        )
        return out, new_state

    return front(init, update)


def _si_path(state: SiState, params: optax.Params) -> optax.Params:
    """``w − g_prev ⊙ (θ − θ_prev)``: the path integral including the move to ``params``."""
    return jax.tree.map(
        lambda w, g, p, q: w - g * (p - q), state.path, state.prev_grads, params, state.prev_params
    )


def _refresh_si(state: SiState, *, params, **_) -> SiState:
    omega = jax.tree.map(
        lambda o, w, p, a: o + jnp.maximum(w, 0) / ((p - a) ** 2 + state.damping),
        state.omega,
        _si_path(state, params),
        params,
        state.anchor,
    )
    return SiState(
        anchor=jax.tree.map(jnp.array, params),
        omega=omega,
        path=jax.tree.map(jnp.zeros_like, params),
        prev_params=jax.tree.map(jnp.array, params),
        prev_grads=jax.tree.map(jnp.zeros_like, params),
        damping=state.damping,
    )


AnnealKind = Literal["sigmoid", "linear", "constant"]


def recadam_lambda(
    t: jax.Array,
    schedule: AnnealKind = "sigmoid",
    k: float = 0.5,
    t0: float = 250.0,
    value: float = 0.5,
) -> jax.Array:
    """RecAdam's annealing coefficient λ(t) ∈ [0, 1] (Chen et al., 2020):
    sigmoid ``1 / (1 + exp(−k (t − t0)))``, linear ``min(1, t / t0)``, constant ``value``."""
    t = jnp.asarray(t, jnp.float32)
    if schedule == "sigmoid":
        return jax.nn.sigmoid(k * (t - t0))
    if schedule == "linear":
        return jnp.minimum(1.0, t / max(t0, 1e-12))
    if schedule == "constant":
        return jnp.full((), value, jnp.float32)
    raise ValueError(f"recadam: schedule must be sigmoid, linear or constant, got {schedule!r}")


def recadam(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    coef: float = 100.0,
    *,
    schedule: AnnealKind = "sigmoid",
    k: float = 0.5,
    t0: float = 250.0,
    value: float = 0.5,
) -> Behind:
    """RecAdam (Chen et al., 2020): annealed recall of the anchor, decoupled from Adam.

    The objective is ``λ(t) L(θ) + (1 − λ(t)) (γ/2) ‖θ − θ*‖²`` (γ = ``coef``, λ(t) from
    :func:`recadam_lambda`, t counted from the start of the task). As in the paper's optimizer,
    Adam's moments see only ``∇L``; the quadratic term is applied outside them. Standing behind
    the base optimizer, which produced ``u = −η(s)·adam_dir`` (η = ``learning_rate``, s the
    global step), the final update is::

        u' = λ(t) · u − η(s) · (1 − λ(t)) · γ · (θ − θ*)

    The recall term contracts θ − θ* by ``1 − η(1 − λ)γ`` per step: keep ``η γ < 1`` (RecAdam
    used γ = 5000 with η ≈ 1e-5). θ* starts at the initial (pretrained) parameters;
    :func:`jaxcl.methods.consolidate` moves it to the current ones and restarts t.
    Memory: 1 parameter-sized buffer.
    """
    _check_lam(coef, "recadam")
    recadam_lambda(0, schedule, k, t0, value)  # validates the schedule name
    lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params: optax.Params) -> RecAdamState:
        return RecAdamState(
            anchor=jax.tree.map(jnp.array, params),
            count=jnp.zeros((), jnp.int32),
            step=jnp.zeros((), jnp.int32),
        )

    def update(updates, state: RecAdamState, params=None, **extra_args):
        del extra_args
        require_params(params, "recadam")
        lam_t = recadam_lambda(state.count, schedule, k, t0, value)
        eta = jnp.asarray(lr(state.step), jnp.float32)
        updates = jax.tree.map(
            lambda u, p, a: (lam_t * u - eta * (1 - lam_t) * coef * (p - a)).astype(u.dtype),
            updates,
            params,
            state.anchor,
        )
        return updates, state._replace(count=state.count + 1, step=state.step + 1)

    return behind(init, update)


def _refresh_recadam(state: RecAdamState, *, params, **_) -> RecAdamState:
    return RecAdamState(
        anchor=jax.tree.map(jnp.array, params),
        count=jnp.zeros_like(state.count),
        step=state.step,
    )


register_consolidator(EwcState, "ewc", _refresh_ewc, requires=("fisher",))
register_consolidator(MasState, "mas", _refresh_mas, requires=("mas_importance",))
register_consolidator(L2AnchorState, "l2_anchor", _refresh_l2)
register_consolidator(SiState, "si", _refresh_si)
register_consolidator(RecAdamState, "recadam", _refresh_recadam)


# ----------------------------------------------------------------------------- recipe entries


class EwcSpec(MethodSpecBase):
    name: Literal["ewc"]
    describes_weights: ClassVar[bool] = True
    lam: float = Field(100.0, ge=0)
    decay: float = Field(1.0, ge=0, le=1)
    fisher_batches: int = Field(8, ge=1, description="batches of the task for the Fisher")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return ewc(self.lam, decay=self.decay)

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        batches = ctx.batches(self.fisher_batches)
        return {"fisher": fisher_diagonal(ctx.loss_fn, ctx.trainable(carry), batches)}


class L2AnchorSpec(MethodSpecBase):
    name: Literal["l2_anchor"]
    describes_weights: ClassVar[bool] = True
    lam: float = Field(1.0, ge=0)

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return l2_anchor(self.lam)


class MasSpec(MethodSpecBase):
    name: Literal["mas"]
    describes_weights: ClassVar[bool] = True
    lam: float = Field(1.0, ge=0)
    decay: float = Field(1.0, ge=0, le=1)
    importance_batches: int = Field(8, ge=1, description="batches of the task for Ω")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return mas(self.lam, decay=self.decay)

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        batches = ctx.batches(self.importance_batches)
        return {"mas_importance": mas_importance(output_fn(ctx), ctx.trainable(carry), batches)}


class SiSpec(MethodSpecBase):
    name: Literal["si"]
    describes_weights: ClassVar[bool] = True
    lam: float = Field(1.0, ge=0)
    damping: float = Field(1e-3, gt=0, description="ξ in Ω += w / (Δ² + ξ)")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return si(self.lam, damping=self.damping)


class RecAdamSpec(MethodSpecBase):
    name: Literal["recadam"]
    position: ClassVar[Position] = "behind"
    describes_weights: ClassVar[bool] = True
    coef: float = Field(100.0, ge=0, description="γ of the quadratic recall term")
    schedule: Literal["sigmoid", "linear", "constant"] = "sigmoid"
    k: float = Field(0.5, gt=0, description="sigmoid steepness")
    t0: float = Field(250.0, ge=0, description="sigmoid midpoint / linear ramp length, in steps")
    value: float = Field(0.5, ge=0, le=1, description="λ of the constant schedule")

    def transform(
        self, *, learning_rate: optax.ScalarOrSchedule | None = None, **_: Any
    ) -> optax.GradientTransformationExtraArgs:
        if learning_rate is None:
            raise ValueError(
                "recadam applies its recall term outside Adam and needs the base learning rate: "
                "the trainer must call transform(learning_rate=schedule)"
            )
        return recadam(
            learning_rate, self.coef, schedule=self.schedule, k=self.k, t0=self.t0, value=self.value
        )
