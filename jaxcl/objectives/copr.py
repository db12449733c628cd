"""COPR, Continual Optimal Policy Regularization (Zhang et al.: arXiv 2310.15694; revised as
"COPR: Continual Human Preference Learning via Optimal Policy Regularization", arXiv
2402.14228, ACL Findings 2025).

The KL-regularised RLHF objective of task ``t``, ``max_π E[r_t(x, y)] − β KL(π ‖ π_{t−1})``, has
the optimal policy ``π*_t(y|x) = π_{t−1}(y|x) exp(r_t(x, y)/β) / Z_t(x)``. COPR never computes
``Z_t``: on the set ``Y_x = {y_1..y_J}`` of ranked responses to a prompt it fits the **sampling
distribution** of the optimal policy restricted to ``Y_x``::

    P*_t(y|Y_x) = π_{t−1}(y|x) exp(r_t(x,y)/β) / Σ_{y'∈Y_x} π_{t−1}(y'|x) exp(r_t(x,y')/β)
    P_θ(y|Y_x)  = π_θ(y|x) / Σ_{y'∈Y_x} π_θ(y'|x)

(``π`` of a response: the product of its token probabilities, so the log-probabilities are
summed over the response tokens; in log space both are a softmax over ``Y_x``).

* **Moderate reward** (no reward model): the ranking gives a linear, zero-mean advantage in the
  rank, bounded by the reward range ``r_x``: with the responses ranked ``j = 1`` (worst) to
  ``J`` (best), ``Adv(x, y_j) = r_x (2j/(J−1) − (J+1)/(J−1))``, from ``−r_x`` to ``+r_x``. It
  replaces ``r_t`` in ``P*_t`` (a constant shift of the reward cancels in the softmax).
  :func:`rank_advantages` lists responses best first, as jaxcl's pairs (chosen, rejected) are:
  index ``k = J − j``, ``Adv_k = r_x (1 − 2k/(J−1))``.
* **Fitting loss**: ``J_fit = E_x Σ_{y∈Y_x} |Y_x|^{-1} [log P_θ(y|Y_x) − log P*_t(y|Y_x)]²``
  (:func:`fit_loss`; a squared error in log space rather than a KL, so responses of small
  target probability still count). COPR adds an SFT term, the NLL of the top-ranked response.
* **Historical constraints**: at the end of task ``i`` the targets ``log P*_i`` of a replay
  memory ``R_i`` of its prompts are stored; later tasks keep
  ``J_{C_i}(θ) = E_{x∼R_i} Σ_y |Y_x|^{-1} [log P_θ − log P*_i]² − d_i ≤ 0`` (the ``copr``
  method's default ``d_i``: that fit under the policy that finished task ``i``, measured when
  the targets are stored; with ``d_i = 0`` the squared error keeps every constraint violated).
* **Lagrangian duality**: ``min_θ max_{λ≥0} J_t(θ) + Σ_i λ_i J_{C_i}(θ)`` (:func:`lagrangian`),
  alternating a descent step on ``θ`` with an ascent step on the multipliers,
  ``λ_i ← max(0, λ_i + η J_{C_i}(θ))`` (:func:`dual_ascent`).

:func:`copr_term` is the objective term (the recipe method ``copr``,
:mod:`jaxcl.methods.copr`, contributes it and keeps the memory, the stored targets and the
multipliers). A batch holding :data:`TARGET_KEY` is a memory batch: the term returns its
constraint value ``J_{C_i} + d_i`` (the fit to the stored targets); any other preference batch
is the current task: ``J_fit + sft · NLL(chosen)`` against ``π_{t−1}``, the ``task_start`` tree.
jaxcl's preference data holds pairs: the term is COPR with ``J = 2``; the functions here take
any ``J`` (last axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.objectives.bound import Metrics
from jaxcl.objectives.preference import preference_metrics
from jaxcl.objectives.retention import masked_mean
from jaxcl.objectives.terms import Pass, Term

#: batch key of the stored targets ``log P*_i(y|Y_x)`` of memory rows, ``[B, J]`` (chosen first)
TARGET_KEY = "copr_target"


def rank_advantages(num: int, reward_range: float | jax.Array = 1.0) -> jax.Array:
    """COPR's linear advantage of ``num`` ranked responses listed **best first**, ``[J]``.

    ``Adv_k = r (1 − 2k/(J−1))`` for ``k = 0..J−1``: the paper's ``r (2j/(J−1) − (J+1)/(J−1))``
    with its rank ``j = J − k`` (``j = J`` the best). Zero mean; ``+r`` for the best, ``−r``
    for the worst. ``reward_range`` may be an array ``[..., 1]`` (a range per prompt).
    """
    if num < 2:
        raise ValueError(f"copr: a ranking needs at least 2 responses, got {num}")
    k = jnp.arange(num, dtype=jnp.float32)
    return jnp.asarray(reward_range, jnp.float32) * (1.0 - 2.0 * k / (num - 1))


def sampled_logps(logps: jax.Array) -> jax.Array:
    """``log P(y_j|Y_x) = log π(y_j|x) − log Σ_{y'∈Y_x} π(y'|x)``: the softmax over the last
    axis (``[..., J]`` summed response log-probabilities)."""
    return jax.nn.log_softmax(logps.astype(jnp.float32), axis=-1)


def optimal_logps(ref_logps: jax.Array, advantages: jax.Array, *, beta: float) -> jax.Array:
    """``log P*(y_j|Y_x)``, the optimal policy's sampling distribution on ``Y_x``, ``[..., J]``:
    ``log softmax_j(log π_ref(y_j|x) + Adv_j / β)`` (``π_ref`` is COPR's ``π_{t−1}``)."""
    return sampled_logps(ref_logps.astype(jnp.float32) + advantages / beta)


def fit_loss(policy_logps: jax.Array, target_logps: jax.Array) -> jax.Array:
    """COPR's fitting loss per prompt, ``[...]``: ``(1/J) Σ_j (log P_θ(y_j|Y_x) − t_j)²``.

    ``policy_logps`` are the policy's summed response log-probabilities ``[..., J]`` (normalised
    here over ``Y_x``); ``target_logps`` the target ``log P*`` (no gradient flows into it).
    The gradient with respect to ``log π_θ(y_j|x)`` is ``(2/J)(e_j − P_θ(y_j) Σ_k e_k)`` with
    ``e = log P_θ − t``.
    """
    diff = sampled_logps(policy_logps) - jax.lax.stop_gradient(target_logps)
    return jnp.mean(diff**2, axis=-1)


def lagrangian(
    fit: jax.Array, constraints: jax.Array, multipliers: jax.Array, thresholds: jax.Array = 0.0
) -> jax.Array:
    """``J_t + Σ_i λ_i (c_i − d_i)``: the objective COPR minimises over θ (and maximises over
    ``λ ≥ 0``); ``constraints`` are the fits ``c_i`` to the stored targets of earlier tasks."""
    return fit + jnp.sum(multipliers * (constraints - thresholds))


def dual_ascent(
    multipliers: jax.Array,
    constraints: jax.Array,
    *,
    lr: float,
    thresholds: jax.Array | float = 0.0,
) -> jax.Array:
    """One projected ascent step on the multipliers of :func:`lagrangian`:
    ``λ_i ← max(0, λ_i + η (c_i − d_i))``, the gradient of the Lagrangian in ``λ_i`` being the
    constraint ``J_{C_i} = c_i − d_i``. A satisfied constraint (``c_i < d_i``) lowers its
    multiplier toward 0, a violated one raises it."""
    return jnp.maximum(0.0, multipliers + lr * (constraints - thresholds))


def copr_term(
    *,
    beta: float,
    reward_range: float = 1.0,
    sft: float = 1.0,
    reference: str = "task_start",
    weight: float = 1.0,
) -> Term:
    """COPR's objective on preference pairs (``J = 2``, chosen ranked first).

    Current-task batch: ``mean_x J_fit(x) + sft · NLL`` where the target is
    :func:`optimal_logps` of the frozen tree ``reference`` (COPR's ``π_{t−1}``: the policy at
    the task's start) with :func:`rank_advantages` ``(+r, −r)`` and ``NLL`` the masked mean
    token NLL of the chosen responses (the ``lm`` term's). Memory batch (with
    :data:`TARGET_KEY`): ``mean_x`` of :func:`fit_loss` to the stored targets, the constraint's
    value (its gradient, weighted by ``λ_i``, is what the ``copr`` method adds).

    For a pair, ``log P_θ(chosen) = log σ(h)`` with ``h = log π_θ(w) − log π_θ(l)`` and
    ``log P*(chosen) = log σ(h_ref + 2r/β)``: the fit is minimal where the policy's margin
    exceeds the reference's by ``2r/β``, a bounded target (the "moderate" reward).
    """
    if beta <= 0:
        raise ValueError(f"copr: beta must be > 0, got {beta}")
    if sft < 0:
        raise ValueError(f"copr: sft must be >= 0, got {sft}")

    def fn(p: Pass) -> tuple[jax.Array, Metrics]:
        pol = jnp.stack(p.split(p.seq_logps()), axis=-1)  # [B, 2]: chosen, rejected
        if TARGET_KEY in p.batch:
            target = p.batch[TARGET_KEY].astype(jnp.float32)
            value = jnp.mean(fit_loss(pol, target))
            return value, {"copr/constraint": value}
        ref = jax.lax.stop_gradient(jnp.stack(p.split(p.seq_logps(reference)), axis=-1))
        target = optimal_logps(ref, rank_advantages(2, reward_range), beta=beta)
        fit = jnp.mean(fit_loss(pol, target))
        nll = masked_mean(-p.all_token_logps()[: p.half], p.mask[: p.half])
        metrics = preference_metrics(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=beta)
        metrics.update(
            {
                "copr/fit": fit,
                "copr/sft": nll,
                "copr/target_chosen": jnp.mean(jnp.exp(target[:, 0])),
                "copr/policy_chosen": jnp.mean(jnp.exp(sampled_logps(pol)[:, 0])),
            }
        )
        return fit + sft * nll, metrics

    return Term("copr", weight, fn, (reference,), pairs=True)


__all__ = [
    "TARGET_KEY",
    "copr_term",
    "dual_ascent",
    "fit_loss",
    "lagrangian",
    "optimal_logps",
    "rank_advantages",
    "sampled_logps",
]
