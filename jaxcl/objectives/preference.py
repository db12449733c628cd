"""Preference objectives for continual alignment (DPO and kin).

All take sequence log-probabilities of the chosen (w) and rejected (l) responses under the
policy π_θ and the reference π_ref, and return per-example losses (reduce them yourself, as with
``optax.losses``). The log-probabilities are summed over the response tokens, except for the
kinds in :data:`LENGTH_AVERAGED_KINDS`, which take the per-token mean ``(1/|y|) Σ_t log π(y_t|·)``
for the policy and the reference alike (the objective's ``dpo`` term passes them so). With
``h = (log π_θ(w) − log π_ref(w)) − (log π_θ(l) − log π_ref(l))``:

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``−(1−ε) log σ(βh) − ε log σ(−βh)``; ``ε`` is
  ``label_smoothing`` (conservative DPO), 0 by default.
* ``ipo`` (Azar et al. 2023, Eq. 17 with τ = β): ``(h − 1/(2β))²`` on length-averaged
  log-probs, as TRL's ``DPOTrainer`` computes it (``loss_type="ipo"`` divides each sequence's
  summed log-prob by its number of response tokens, following the IPO authors' advice).
* ``hinge`` (SLiC-style): ``max(0, 1 − βh)``.
* ``simpo`` (Meng et al. 2024), reference-free: pass length-normalised log-probs as the policy
  terms; ``−log σ(β (log π_θ(w) − log π_θ(l)) − γ)`` with ``γ = simpo_gamma``; the reference
  arguments are ignored.

:func:`orpo_loss` is ORPO's odds-ratio term (Hong et al. 2024), reference-free, on
length-normalised log-probs; :func:`preference_metrics` computes the rewards, margins and
accuracies TRL reports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_KINDS = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FREE_KINDS = ("simpo",)
#: kinds fed per-token averaged (length-normalised) sequence log-probs instead of sums
LENGTH_AVERAGED_KINDS = ("ipo", "simpo")


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
    """Per-example preference loss ``[B]``; see the module docstring for each ``kind`` (and
    :data:`LENGTH_AVERAGED_KINDS` for which log-probs each expects: the function itself only
    applies the formula to what it is given)."""
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


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 − exp(x))`` for ``x < 0``, stable at both ends (Mächler 2012).

    ``log(−expm1(x))`` for ``x > −log 2``, ``log1p(−exp(x))`` otherwise; ``x`` is clipped to
    ``≤ −1e-7`` so a probability of exactly 1 gives a large finite value, not ``−inf``.
    """
    x = jnp.minimum(x, -1e-7)
    return jnp.where(
        x > -jnp.log(2.0),
        jnp.log(-jnp.expm1(jnp.maximum(x, -jnp.log(2.0)))),
        jnp.log1p(-jnp.exp(jnp.minimum(x, -jnp.log(2.0)))),
    )


def orpo_log_odds(chosen_mean_logps: jax.Array, rejected_mean_logps: jax.Array) -> jax.Array:
    """ORPO's log odds ratio ``z = log odds(w) − log odds(l)`` per example ``[B]``.

    With ``p = exp(mean-token log π_θ(y|x))`` (the length-normalised likelihood) and
    ``odds(y) = p / (1 − p)``: ``log odds(y) = ℓ − log(1 − e^ℓ)`` for ``ℓ = log p``.
    """
    return (chosen_mean_logps - rejected_mean_logps) - (
        log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps)
    )


def orpo_loss(chosen_mean_logps: jax.Array, rejected_mean_logps: jax.Array) -> jax.Array:
    """ORPO's odds-ratio term ``L_OR = −log σ(z)`` per example ``[B]`` (see :func:`orpo_log_odds`).

    ORPO's full objective is ``L_SFT(chosen) + λ · L_OR``: in a recipe, an ``lm`` term (the
    NLL of the chosen response) plus an ``orpo`` term of weight ``λ``. Its gradient with respect
    to the chosen mean log-prob is ``−σ(−z) / (1 − p_w)`` (``∂ log odds / ∂ℓ = 1 / (1 − p)``).
    """
    return -jax.nn.log_sigmoid(orpo_log_odds(chosen_mean_logps, rejected_mean_logps))


def preference_metrics(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
) -> dict[str, jax.Array]:
    """The reward metrics TRL's ``DPOTrainer`` logs, averaged over the batch.

    With ``r_w = β (log π_θ(w) − log π_ref(w))`` and ``r_l`` likewise: ``rewards/chosen`` =
    mean ``r_w``, ``rewards/rejected`` = mean ``r_l``, ``rewards/margins`` = mean ``r_w − r_l``,
    ``rewards/accuracies`` = fraction with ``r_w > r_l``; ``logps/chosen`` and
    ``logps/rejected`` are the policy's mean sequence log-probs. For a reference-free loss pass
    zeros as the reference log-probs (rewards are then ``β log π_θ``, as TRL's CPO/SimPO log).
    """
    r_chosen = dpo_rewards(policy_chosen_logps, ref_chosen_logps, beta=beta)
    r_rejected = dpo_rewards(policy_rejected_logps, ref_rejected_logps, beta=beta)
    return {
        "rewards/chosen": jnp.mean(r_chosen),
        "rewards/rejected": jnp.mean(r_rejected),
        "rewards/margins": jnp.mean(r_chosen - r_rejected),
        "rewards/accuracies": jnp.mean((r_chosen > r_rejected).astype(jnp.float32)),
        "logps/chosen": jnp.mean(policy_chosen_logps),
        "logps/rejected": jnp.mean(policy_rejected_logps),
    }
