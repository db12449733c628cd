"""Retention terms: keep the policy close to an earlier one while it learns something new.

Pure functions of log-probs and logits. "prev" is the previous policy (in a stage, the parameters
at the start of the current task, the ``task_start`` frozen tree) or any other frozen teacher.

* :func:`cppo_penalty` (CPPO, Zhang et al., ICLR 2024): per sequence
  ``w_i · (log π_θ(y_i|x_i) − log π_prev(y_i|x_i))²`` with per-sample weights ``w_i``
  (multiply by the term's weight β yourself); :func:`confidence_weights` gives CPPO-style
  weights that retain most where the previous policy was most confident. This is CPPO's
  knowledge-retention penalty alone, applied offline to the batch's responses: CPPO itself
  trains PPO on rollouts scored by a reward model, with the sample-wise weights on its policy
  and retention terms, which jaxcl does not implement (docs/methods.md, "CPPO").
* :func:`token_kl`: the exact per-token ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` between two
  token distributions given by logits; ``KL(π_θ ‖ π_prev)`` is the KL-to-previous-policy term
  (the RLHF direction), ``KL(π_prev ‖ π_θ)`` the forward one.
* :func:`distill_kl` (LwF, Li & Hoiem 2017; knowledge distillation, Hinton et al. 2015):
  ``T² · KL(p_T ‖ q_T)`` between the teacher's (previous model's) and the student's (current
  model's) temperature-softened distributions ``softmax(z / T)``, optionally with the teacher
  truncated to its ``top_k`` tokens and renormalised.

Token-level terms reduce with :func:`masked_mean`, ``Σ m_{bt} x_{bt} / max(1, Σ m_{bt})``, over
the target tokens (response tokens of instruction and preference data, all of a text).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ m x / max(1, Σ m)`` over all entries (``values`` and ``mask`` of one shape)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cppo_penalty(
    policy_logps: jax.Array, prev_logps: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Per-sequence ``w_i (log π_θ(y_i|x_i) − log π_prev(y_i|x_i))²``, shape ``[B]``.

    ``prev_logps`` should carry no gradient (the previous policy is frozen); the gradient with
    respect to ``policy_logps`` is ``2 w_i (log π_θ − log π_prev)``. ``weights`` default to 1.
    """
    delta = policy_logps - prev_logps
    out = delta**2
    return out if weights is None else weights * out


def confidence_weights(prev_mean_logps: jax.Array) -> jax.Array:
    """CPPO-style sample weights from the previous policy's confidence, mean 1 over the batch.

    ``c_i = exp(mean-token log π_prev(y_i|x_i))`` (its per-token geometric-mean probability) and
    ``w_i = B · c_i / Σ_j c_j``: examples the previous policy knew well are retained hardest.
    No gradient flows through the weights.
    """
    c = jnp.exp(jax.lax.stop_gradient(prev_mean_logps))
    return c.shape[0] * c / jnp.maximum(jnp.sum(c), 1e-30)


def token_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """Exact ``KL(p ‖ q)`` per position, ``[..., T]``, from logits ``[..., T, V]`` (float32)."""
    log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distill_kl(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> jax.Array:
    """Per-position distillation loss ``T² · KL(p̃_T ‖ q_T)``, shape ``[..., T]``.

    ``q_T = softmax(z_student / T)`` over the whole vocabulary. ``p_T = softmax(z_teacher / T)``;
    with ``top_k``, ``p̃_T`` keeps the teacher's ``k`` most likely tokens ``K`` and renormalises
    over them (zero elsewhere), so ``KL(p̃_T ‖ q_T) = Σ_{v∈K} p̃_v (log p̃_v − log q_v)``. The
    ``T²`` factor keeps gradient magnitudes comparable across temperatures: the gradient with
    respect to the student logits is ``T (q_T − p̃_T)``.
    """
    t = jnp.float32(temperature)
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / t
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    if top_k is None or top_k >= teacher.shape[-1]:
        log_p = jax.nn.log_softmax(teacher, axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    else:
        top, index = jax.lax.top_k(teacher, top_k)
        log_p = jax.nn.log_softmax(top, axis=-1)
        log_q_top = jnp.take_along_axis(log_q, index, axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q_top), axis=-1)
    return t * t * kl
