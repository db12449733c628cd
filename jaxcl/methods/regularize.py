"""Regularization methods: pull parameters toward the anchor of earlier tasks.

Each is an optax transform placed in front of the base optimizer; it adds the gradient of its
penalty to the incoming gradient, so the base optimizer (AdamW, ...) sees ``∇L + ∇R``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl.methods.consolidate import register_consolidator


class EwcState(NamedTuple):
    """``anchor`` θ* and diagonal Fisher ``fisher`` F, both shaped like the parameters;
    ``decay`` γ used when the Fisher is refreshed (F ← γ·F + F_new)."""

    anchor: optax.Params
    fisher: optax.Params
    decay: jax.Array


class L2AnchorState(NamedTuple):
    anchor: optax.Params


def _require_params(params: Any, method: str) -> None:
    if params is None:
        raise ValueError(f"{method} needs the current parameters: call update(g, s, params)")


def ewc(lam: float, decay: float = 1.0) -> optax.GradientTransformationExtraArgs:
    """Elastic weight consolidation (Kirkpatrick et al., 2017).

    Penalty ``R(θ) = (lam/2) Σ_i F_i (θ_i − θ*_i)²``, so the update adds
    ``∇R = lam · F ⊙ (θ − θ*)`` to the gradient. F starts at zero (no penalty on the first task);
    :func:`jaxcl.methods.consolidate` with ``fisher=`` sets θ* ← θ and F ← decay·F + F_new
    (``decay=1`` accumulates the tasks' Fishers; ``decay<1`` is online EWC).
    """
    if lam < 0:
        raise ValueError(f"ewc: lam must be >= 0, got {lam}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ewc: decay must lie in [0, 1], got {decay}")

    def init(params: optax.Params) -> EwcState:
        return EwcState(
            anchor=jax.tree.map(jnp.array, params),
            fisher=jax.tree.map(jnp.zeros_like, params),
            decay=jnp.asarray(decay, jnp.float32),
        )

    def update(updates, state: EwcState, params=None, **extra_args):
        del extra_args
        _require_params(params, "ewc")
        updates = jax.tree.map(
            lambda g, f, p, a: g + lam * f * (p - a), updates, state.fisher, params, state.anchor
        )
        return updates, state

    return optax.GradientTransformationExtraArgs(init, update)


def _refresh_ewc(state: EwcState, *, params, fisher, **_) -> EwcState:
    return EwcState(
        anchor=jax.tree.map(jnp.array, params),
        fisher=jax.tree.map(lambda old, new: state.decay * old + new, state.fisher, fisher),
        decay=state.decay,
    )


def l2_anchor(lam: float) -> optax.GradientTransformationExtraArgs:
    """L2 toward the last task's parameters: ``R(θ) = (lam/2) ‖θ − θ*‖²``, ``∇R = lam (θ − θ*)``.

    The anchor starts at the initial parameters and moves to the current ones at each
    :func:`jaxcl.methods.consolidate`.
    """
    if lam < 0:
        raise ValueError(f"l2_anchor: lam must be >= 0, got {lam}")

    def init(params: optax.Params) -> L2AnchorState:
        return L2AnchorState(anchor=jax.tree.map(jnp.array, params))

    def update(updates, state: L2AnchorState, params=None, **extra_args):
        del extra_args
        _require_params(params, "l2_anchor")
        updates = jax.tree.map(lambda g, p, a: g + lam * (p - a), updates, params, state.anchor)
        return updates, state

    return optax.GradientTransformationExtraArgs(init, update)


def _refresh_l2(state: L2AnchorState, *, params, **_) -> L2AnchorState:
    return L2AnchorState(anchor=jax.tree.map(jnp.array, params))


register_consolidator(EwcState, "ewc", _refresh_ewc, requires=("fisher",))
register_consolidator(L2AnchorState, "l2_anchor", _refresh_l2)
