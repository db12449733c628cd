"""Preference objectives for continual alignment (DPO and kin).

All take summed sequence log-probabilities of the chosen (w) and rejected (l) responses under the
policy π_θ and the reference π_ref, and return per-example losses (reduce them yourself, as with
``optax.losses``). With ``h = (log π_θ(w) − log π_ref(w)) − (log π_θ(l) − log π_ref(l))``:

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``−(1−ε) log σ(βh) − ε log σ(−βh)``; ``ε`` is
  ``label_smoothing`` (conservative DPO), 0 by default.
* ``ipo`` (Azar et al. 2023): ``(h − 1/(2β))²``.
* ``hinge`` (SLiC-style): ``max(0, 1 − βh)``.
* ``simpo`` (Meng et al. 2024), reference-free: pass length-normalised log-probs as the policy
  terms; ``−log σ(β (log π_θ(w) − log π_θ(l)) − γ)`` with ``γ = simpo_gamma``; the reference
  arguments are ignored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_KINDS = ("sigmoid", "ipo", "hinge", "simpo")


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> jax.Array:
    """Per-example preference loss ``[B]``; see the module docstring for each ``kind``."""
    if kind not in DPO_KINDS:
        raise ValueError(f"dpo_loss: unknown kind {kind!r}; valid kinds: {', '.join(DPO_KINDS)}")
    if kind == "simpo":
        return -jax.nn.log_sigmoid(
            beta * (policy_chosen_logps - policy_rejected_logps) - simpo_gamma
        )
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if kind == "sigmoid":
        return -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * (
            jax.nn.log_sigmoid(-beta * h)
        )
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return jnp.maximum(0.0, 1 - beta * h)


def dpo_rewards(policy_logps: jax.Array, ref_logps: jax.Array, *, beta: float) -> jax.Array:
    """Implicit reward ``β (log π_θ(y|x) − log π_ref(y|x))`` as TRL reports it."""
    return beta * (policy_logps - ref_logps)
