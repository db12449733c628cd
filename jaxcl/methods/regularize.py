"""Regularization methods: pull parameters toward the anchor of earlier tasks.

Penalties (``l2_anchor``, ``ewc``, ``mas``, ``si``) stand in front of the base optimizer: they add
the gradient of their penalty to the incoming gradient, so AdamW sees ``∇L + ∇R``. ``recadam``
stands behind it: as in the RecAdam paper its quadratic term is decoupled from Adam's moments.

Each penalty is written with its paper's constant, so a strength copied from a paper means what
it meant there: EWC ``(λ/2) Σ F (θ − θ*)²`` (Kirkpatrick et al., eq. 3), MAS
``λ Σ Ω (θ − θ*)²`` (Aljundi et al., eq. 6; the reference code adds ``2λΩ(θ − θ*)``), SI
``c Σ Ω (θ − θ*)²`` (Zenke et al., eq. 4; pathint adds ``lam · Σ Ω (w − w*)²`` to the loss).
Importances are float32 buffers shaped like the parameters; anchors keep the parameters' dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field, model_validator

from jaxcl.methods._tree import require_params
from jaxcl.methods.compose import Behind, Front, Position, behind, front
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.importance import DEFAULT_CHUNK, examples_in, fisher_diagonal, mas_importance
from jaxcl.methods.protocol import Carry, Context, MethodSpecBase, output_fn

F32 = jnp.float32


class EwcState(NamedTuple):
    """EWC's two parameter-shaped buffers and its decay γ.

    ``fisher`` is ``F = Σ_t γ^(T−t) F_t`` (float32). ``anchor`` is θ̄*: with γ = 1 the
    Fisher-weighted mean of the task anchors, ``θ̄* = Σ_t F_t ⊙ θ*_t / Σ_t F_t`` (θ where
    ``F = 0``), so that ``F ⊙ (θ − θ̄*) = Σ_t F_t ⊙ θ − Σ_t F_t ⊙ θ*_t``: the gradient of the sum of
    the per-task penalties, held in two buffers instead of one anchor per task. With γ < 1
    (online EWC) it is the latest anchor.
    """

    anchor: optax.Params
    fisher: optax.Params
    decay: jax.Array


class MasState(NamedTuple):
    """``anchor`` θ* (the latest task's end) and MAS importance Ω (float32); Ω ← γ·Ω + Ω_new."""

    anchor: optax.Params
    importance: optax.Params
    decay: jax.Array


class L2AnchorState(NamedTuple):
    anchor: optax.Params


SiClamp = Literal["total", "task", "none"]
_SI_CLAMPS: dict[str, int] = {"none": 0, "task": 1, "total": 2}


class SiState(NamedTuple):
    """Synaptic intelligence: ``anchor`` θ*, consolidated importance ``omega`` Ω (float32), the
    running path integral ``path`` w of the current task (float32), the previous step's
    parameters and gradient, ξ (``damping``) and the clamp rule (``clamp``: 0 none, 1 per task,
    2 on the total, see :func:`si`)."""

    anchor: optax.Params
    omega: optax.Params
    path: optax.Params
    prev_params: optax.Params
    prev_grads: optax.Params
    damping: jax.Array
    clamp: jax.Array


class RecAdamState(NamedTuple):
    """``anchor`` θ* (the pretrained / previous-task parameters), ``count`` the updates made in
    the current task (λ is taken at ``t = count + 1``) and ``step`` the base schedule's step."""

    anchor: optax.Params
    count: jax.Array
    step: jax.Array


def _check_lam(lam: float, method: str) -> None:
    if lam < 0:
        raise ValueError(f"{method}: lam must be >= 0, got {lam}")


def _check_decay(decay: float, method: str) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"{method}: decay must lie in [0, 1], got {decay}")


def _copy(params: optax.Params) -> optax.Params:
    return jax.tree.map(jnp.array, params)


def _zeros32(params: optax.Params) -> optax.Params:
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), F32), params)


def _weighted_pull(scale: float, weights_of, method: str):
    """``update`` adding ``scale · W ⊙ (θ − θ*)`` where ``W = weights_of(state)``."""

    def update(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, method)
        updates = jax.tree.map(
            lambda g, w, p, a: (g + scale * w * (p - a)).astype(g.dtype),
            updates,
            weights_of(state),
            params,
            state.anchor,
        )
        return updates, state

    return update


def _anchored(kind: type, params: optax.Params, decay: float):
    """``kind(θ* = params, weights = 0, γ = decay)``: the initial state of EWC and MAS."""
    return kind(_copy(params), _zeros32(params), jnp.asarray(decay, F32))


def ewc(lam: float, decay: float = 1.0) -> Front:
    """Elastic weight consolidation (Kirkpatrick et al., 2017).

    After tasks 1..T with Fishers F_t and end points θ*_t, ``decay=1`` (the paper) penalises
    ``R(θ) = Σ_t (lam/2) Σ_i F_t,i (θ_i − θ*_t,i)²``, one penalty per task, and the update adds
    ``∇R = lam (Σ_t F_t ⊙ θ − Σ_t F_t ⊙ θ*_t)``. ``decay=γ<1`` is online EWC (Schwarz et al.,
    2018): ``F ← γ·F + F_new``, one anchor at the latest θ*, ``∇R = lam · F ⊙ (θ − θ*)``.
    F starts at zero (no penalty on the first task); :func:`jaxcl.methods.consolidate` with
    ``fisher=`` (:func:`jaxcl.methods.fisher_diagonal`) adds a task. Memory: 2 parameter-sized
    buffers (see :class:`EwcState`) whatever the number of tasks.
    """
    _check_lam(lam, "ewc")
    _check_decay(decay, "ewc")

    init = functools.partial(_anchored, EwcState, decay=decay)
    return front(init, _weighted_pull(lam, lambda s: s.fisher, "ewc"))


def _refresh_ewc(state: EwcState, *, params, fisher, **_) -> EwcState:
    """Add a task: ``F ← γF + F_new``; θ̄* ← the F-weighted mean of θ̄* (weight γF) and θ (weight
    F_new) when γ = 1, written ``θ̄* + F_new/(F + F_new) · (θ − θ̄*)``; θ̄* ← θ when γ < 1."""
    separate = state.decay >= 1.0

    def fisher_of(old, new):
        return state.decay * old + jnp.asarray(new, F32)

    total = jax.tree.map(fisher_of, state.fisher, fisher)

    def anchor_of(a, p, new, tot):
        positive = tot > 0
        share = jnp.where(positive, jnp.asarray(new, F32) / jnp.where(positive, tot, 1.0), 1.0)
        share = jnp.where(separate, share, 1.0)
        a32, p32 = a.astype(F32), p.astype(F32)
        return jnp.where(share == 1.0, p32, a32 + share * (p32 - a32)).astype(a.dtype)

    anchor = jax.tree.map(anchor_of, state.anchor, params, fisher, total)
    return EwcState(anchor, total, state.decay)


def mas(lam: float, decay: float = 1.0) -> Front:
    """Memory-aware synapses (Aljundi et al., 2018).

    Importance ``Ω_i = (1/N) Σ_n |∂‖f(x_n; θ)‖²₂ / ∂θ_i|`` (see
    :func:`jaxcl.methods.mas_importance`) of the model output f, estimated without labels at the
    end of each task. Penalty ``R(θ) = lam Σ_i Ω_i (θ_i − θ*_i)²`` (the paper's λ, no ½), gradient
    term ``2 · lam · Ω ⊙ (θ − θ*)``. :func:`jaxcl.methods.consolidate` with ``mas_importance=``
    sets θ* ← θ and Ω ← decay·Ω + Ω_new: ``decay=1`` sums the tasks' importances as the paper
    and its reference code do (one anchor, the latest). Memory: 2 parameter-sized buffers.
    """
    _check_lam(lam, "mas")
    _check_decay(decay, "mas")

    init = functools.partial(_anchored, MasState, decay=decay)
    return front(init, _weighted_pull(2.0 * lam, lambda s: s.importance, "mas"))


def _refresh_mas(state: MasState, *, params, mas_importance, **_) -> MasState:
    importance = jax.tree.map(
        lambda old, new: state.decay * old + jnp.asarray(new, F32),
        state.importance,
        mas_importance,
    )
    anchor = jax.tree.map(lambda a, p: jnp.array(p, dtype=a.dtype), state.anchor, params)
    return MasState(anchor, importance, state.decay)


def l2_anchor(lam: float) -> Front:
    """L2 toward the last task's parameters: ``R(θ) = (lam/2) ‖θ − θ*‖²``, ``∇R = lam (θ − θ*)``.

    The anchor starts at the initial parameters and moves to the current ones at each
    :func:`jaxcl.methods.consolidate`. Memory: 1 parameter-sized buffer.
    """
    _check_lam(lam, "l2_anchor")

    def init(params: optax.Params) -> L2AnchorState:
        return L2AnchorState(anchor=_copy(params))

    def update(updates, state: L2AnchorState, params=None, **extra_args):
        del extra_args
        require_params(params, "l2_anchor")
        updates = jax.tree.map(lambda g, p, a: g + lam * (p - a), updates, params, state.anchor)
        return updates, state

    return front(init, update)


def _refresh_l2(state: L2AnchorState, *, params, **_) -> L2AnchorState:
    return L2AnchorState(anchor=_copy(params))


def si(lam: float, damping: float = 1e-3, clamp: SiClamp = "total") -> Front:
    """Synaptic intelligence (Zenke et al., 2017).

    During a task the path integral of each parameter's contribution to the loss decrease is
    accumulated online: at step k (gradient g_k at θ_k) ``w ← w − g_{k−1} ⊙ (θ_k − θ_{k−1})``.
    At the task boundary (θ_end; the last step's move is flushed the same way), with
    ``Δ = θ_end − θ*`` and ``c = w / (Δ² + ξ)`` (ξ = ``damping``):

    - ``clamp="total"`` (default, the authors' code ganguli-lab/pathint:
      ``omega ← relu(omega + grads2 / (Δ² + ξ))``): ``Ω ← max(Ω + c, 0)``;
    - ``clamp="none"`` (the paper's eq. 5 as printed; mammoth's si.py): ``Ω ← Ω + c``;
    - ``clamp="task"``: ``Ω ← Ω + max(c, 0)`` (a task whose moves raised the loss earns none).

    Then ``w ← 0`` and ``θ* ← θ_end``. Penalty ``lam Σ Ω (θ − θ*)²`` (the paper's c, no ½),
    gradient term ``2 · lam · Ω ⊙ (θ − θ*)``. w uses the gradient this transform receives (the
    task loss, as pathint's ``unreg_grads``: put ``si`` first in the chain) and the update the
    whole chain applied. Memory: 5 parameter-sized buffers.
    """
    _check_lam(lam, "si")
    if damping <= 0:
        raise ValueError(f"si: damping must be > 0, got {damping}")
    if clamp not in _SI_CLAMPS:
        raise ValueError(f"si: clamp must be one of {sorted(_SI_CLAMPS)}, got {clamp!r}")

    def init(params: optax.Params) -> SiState:
        return SiState(
            anchor=_copy(params),
            omega=_zeros32(params),
            path=_zeros32(params),
            prev_params=_copy(params),
            prev_grads=jax.tree.map(jnp.zeros_like, params),
            damping=jnp.asarray(damping, F32),
            clamp=jnp.asarray(_SI_CLAMPS[clamp], jnp.int32),
        )

    def update(updates, state: SiState, params=None, **extra_args):
        del extra_args
        require_params(params, "si")
        out = jax.tree.map(
            lambda g, o, p, a: (g + 2.0 * lam * o * (p - a)).astype(g.dtype),
            updates,
            state.omega,
            params,
            state.anchor,
        )
        new_state = state._replace(
            path=_si_path(state, params),
            prev_params=_copy(params),
            prev_grads=jax.tree.map(
                lambda g, q: jnp.array(g, dtype=q.dtype), updates, state.prev_grads
            ),
        )
        return out, new_state

    return front(init, update)


def _si_path(state: SiState, params: optax.Params) -> optax.Params:
    """``w − g_prev ⊙ (θ − θ_prev)``: the path integral including the move to ``params``."""
    return jax.tree.map(
        lambda w, g, p, q: w - g.astype(F32) * (p.astype(F32) - q.astype(F32)),
        state.path,
        state.prev_grads,
        params,
        state.prev_params,
    )


def _refresh_si(state: SiState, *, params, **_) -> SiState:
    def omega_of(o, w, p, a):
        c = w / ((p.astype(F32) - a.astype(F32)) ** 2 + state.damping)
        return jnp.select(
            [state.clamp == 0, state.clamp == 1],
            [o + c, o + jnp.maximum(c, 0.0)],
            jnp.maximum(o + c, 0.0),
        )

    omega = jax.tree.map(omega_of, state.omega, _si_path(state, params), params, state.anchor)
    return SiState(
        anchor=_copy(params),
        omega=omega,
        path=jax.tree.map(jnp.zeros_like, state.path),
        prev_params=_copy(params),
        prev_grads=jax.tree.map(jnp.zeros_like, state.prev_grads),
        damping=state.damping,
        clamp=state.clamp,
    )


AnnealKind = Literal["sigmoid", "linear", "constant"]


def recadam_lambda(
    t: jax.Array,
    schedule: AnnealKind = "sigmoid",
    k: float = 0.5,
    t0: float = 250.0,
    value: float = 0.5,
) -> jax.Array:
    """RecAdam's annealing coefficient λ(t) ∈ [0, 1] (Chen et al., 2020), t the task's update
    number counted from 1: sigmoid ``1 / (1 + exp(−k (t − t0)))``, linear ``min(1, t / t0)``,
    constant ``value``."""
    t = jnp.asarray(t, F32)
    if schedule == "sigmoid":
        return jax.nn.sigmoid(k * (t - t0))
    if schedule == "linear":
        return jnp.minimum(1.0, t / max(t0, 1e-12))
    if schedule == "constant":
        return jnp.full((), value, F32)
    raise ValueError(f"recadam: schedule must be sigmoid, linear or constant, got {schedule!r}")


def recadam(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    coef: float = 100.0,
    *,
    weight_decay: float = 0.0,
    schedule: AnnealKind = "sigmoid",
    k: float = 0.5,
    t0: float = 250.0,
    value: float = 0.5,
) -> Behind:
    """RecAdam (Chen et al., 2020): annealed recall of the anchor, decoupled from Adam.

    The objective is ``λ(t) L(θ) + (1 − λ(t)) (γ/2) ‖θ − θ*‖²`` (γ = ``coef``, λ(t) from
    :func:`recadam_lambda`, t = 1, 2, ... the task's updates). Adam's moments see only ``∇L``.
    Standing directly behind AdamW, which produced ``u = −η(s)(a + wd·θ)`` (η = ``learning_rate``
    at the global step s, ``wd = weight_decay``: pass AdamW's), it applies the steps of the
    reference optimizer (Sanyuan-Chen/RecAdam, ``RecAdam.step``) in its order::

        θ₁ = θ − η λ(t) a                       # Adam's step, scaled by λ(t)
        θ₂ = θ₁ − η (1 − λ(t)) γ (θ₁ − θ*)      # the recall term, at θ₁
        θ₃ = θ₂ − η wd θ₂                        # decoupled weight decay, not scaled by λ(t)

    and returns ``u' = θ₃ − θ``. The recall contracts θ − θ* by ``1 − η(1 − λ)γ`` per step: keep
    ``η γ < 1`` (RecAdam used γ = 5000 with η ≈ 1e-5). θ* starts at the initial (pretrained)
    parameters; :func:`jaxcl.methods.consolidate` moves it to the current ones and restarts t.
    Memory: 1 parameter-sized buffer.
    """
    _check_lam(coef, "recadam")
    if weight_decay < 0:
        raise ValueError(f"recadam: weight_decay must be >= 0, got {weight_decay}")
    recadam_lambda(0, schedule, k, t0, value)  # validates the schedule name
    lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params: optax.Params) -> RecAdamState:
        return RecAdamState(
            anchor=_copy(params),
            count=jnp.zeros((), jnp.int32),
            step=jnp.zeros((), jnp.int32),
        )

    def update(updates, state: RecAdamState, params=None, **extra_args):
        del extra_args
        require_params(params, "recadam")
        lam_t = recadam_lambda(state.count + 1, schedule, k, t0, value)
        eta = jnp.asarray(lr(state.step), F32)
        recall = eta * (1 - lam_t) * coef
        decay = eta * weight_decay

        def one(u, p, a):
            p32 = p.astype(F32)
            adam = u.astype(F32) + decay * p32  # AdamW's update without its weight decay
            moved = lam_t * (1 - recall) * adam - recall * (p32 - a.astype(F32))  # θ₂ − θ
            return ((1 - decay) * moved - decay * p32).astype(u.dtype)  # θ₃ − θ

        updates = jax.tree.map(one, updates, params, state.anchor)
        return updates, state._replace(count=state.count + 1, step=state.step + 1)

    return behind(init, update)


def _refresh_recadam(state: RecAdamState, *, params, **_) -> RecAdamState:
    return RecAdamState(
        anchor=_copy(params),
        count=jnp.zeros_like(state.count),
        step=state.step,
    )


register_consolidator(EwcState, "ewc", _refresh_ewc, requires=("fisher",))
register_consolidator(MasState, "mas", _refresh_mas, requires=("mas_importance",))
register_consolidator(L2AnchorState, "l2_anchor", _refresh_l2)
register_consolidator(SiState, "si", _refresh_si)
register_consolidator(RecAdamState, "recadam", _refresh_recadam)


# ----------------------------------------------------------------------------- recipe entries


#: examples of the finished task an estimate averages over when the recipe names no number
DEFAULT_EXAMPLES = 128


def task_batches(
    ctx: Context, examples: int | None = None, batches: int | None = None
) -> Iterator[Any]:
    """Whole batches of the finished task's own examples (``ctx.batches``) holding at least
    ``examples`` (default :data:`DEFAULT_EXAMPLES`) of them, capped at the task's size:
    ``⌈min(examples, |task|) / B⌉`` batches of the stage's batch size B; exactly ``batches``
    batches when that is given instead."""
    if batches is not None:
        return ctx.batches(batches)
    examples = DEFAULT_EXAMPLES if examples is None else examples
    wanted = min(examples, len(ctx.task.examples)) if len(ctx.task.examples) else examples
    size = examples_in(next(iter(ctx.batches(1))), "estimate")
    return ctx.batches(-(-wanted // size))


def _one_of(spec: MethodSpecBase, examples: str, batches: str) -> None:
    if getattr(spec, batches) is not None and getattr(spec, examples) is not None:
        raise ValueError(
            f"give {examples} (the task's examples the estimate averages over) or {batches} "
            f"(whole batches, the former field), not both"
        )


_CHUNK = Field(
    DEFAULT_CHUNK,
    ge=1,
    description="examples whose gradients are computed at once (memory ∝ chunk × parameters)",
)


class EwcSpec(MethodSpecBase):
    name: Literal["ewc"]
    describes_weights: ClassVar[bool] = True
    lam: float = Field(100.0, ge=0)
    decay: float = Field(1.0, ge=0, le=1, description="1: one penalty per task; < 1: online EWC")
    fisher_examples: int | None = Field(
        None,
        ge=1,
        description=f"the task's examples the Fisher averages (default {DEFAULT_EXAMPLES})",
    )
    per_example: bool = Field(True, description="per-example Fisher (False: squared batch means)")
    chunk: int = _CHUNK

    fisher_batches: int | None = Field(None, ge=1, description="instead: whole batches")

    @model_validator(mode="after")
    def _examples_or_batches(self) -> EwcSpec:
        _one_of(self, "fisher_examples", "fisher_batches")
        return self

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return ewc(self.lam, decay=self.decay)

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        fisher = fisher_diagonal(
            ctx.loss_fn,
            ctx.trainable(carry),
            task_batches(ctx, self.fisher_examples, self.fisher_batches),
            per_example=self.per_example,
            chunk=self.chunk,
        )
        return {"fisher": fisher}


class L2AnchorSpec(MethodSpecBase):
    name: Literal["l2_anchor"]
    describes_weights: ClassVar[bool] = True
    lam: float = Field(1.0, ge=0)

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return l2_anchor(self.lam)


class MasSpec(MethodSpecBase):
    name: Literal["mas"]
    describes_weights: ClassVar[bool] = True
    lam: float = Field(1.0, ge=0, description="λ of λ Σ Ω (θ − θ*)²")
    decay: float = Field(1.0, ge=0, le=1, description="Ω ← decay·Ω + Ω_new")
    importance_examples: int | None = Field(
        None, ge=1, description=f"the task's examples Ω averages (default {DEFAULT_EXAMPLES})"
    )
    per_example: bool = Field(True, description="per-example |grad| (False: of batch means)")
    chunk: int = _CHUNK

    importance_batches: int | None = Field(None, ge=1, description="instead: whole batches")

    @model_validator(mode="after")
    def _examples_or_batches(self) -> MasSpec:
        _one_of(self, "importance_examples", "importance_batches")
        return self

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return mas(self.lam, decay=self.decay)

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        importance = mas_importance(
            output_fn(ctx),
            ctx.trainable(carry),
            task_batches(ctx, self.importance_examples, self.importance_batches),
            per_example=self.per_example,
            chunk=self.chunk,
        )
        return {"mas_importance": importance}


class SiSpec(MethodSpecBase):
    name: Literal["si"]
    describes_weights: ClassVar[bool] = True
    lam: float = Field(1.0, ge=0, description="c of c Σ Ω (θ − θ*)²")
    damping: float = Field(1e-3, gt=0, description="ξ in Ω += w / (Δ² + ξ)")
    clamp: SiClamp = Field("total", description="total: Ω ← max(Ω + c, 0) (pathint); task; none")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return si(self.lam, damping=self.damping, clamp=self.clamp)


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
        self,
        *,
        learning_rate: optax.ScalarOrSchedule | None = None,
        weight_decay: float = 0.0,
        **_: Any,
    ) -> optax.GradientTransformationExtraArgs:
        if learning_rate is None:
            raise ValueError(
                "recadam applies its recall term outside Adam and needs the base learning rate: "
                "the trainer must call transform(learning_rate=schedule, weight_decay=...)"
            )
        return recadam(
            learning_rate,
            self.coef,
            weight_decay=weight_decay,
            schedule=self.schedule,
            k=self.k,
            t0=self.t0,
            value=self.value,
        )
