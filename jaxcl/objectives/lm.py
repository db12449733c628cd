"""Causal language-model objectives over logits, with loss masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.models.matmul import in_backward


@jax.custom_vjp
def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log p(targets[b, t] | ·)`` from ``logits [B, T, V]``: shape ``[B, T]``, float32.

    ``log p(y) = z_y − logsumexp_v z_v``: the target logit is picked by a one-hot select and
    summed (elementwise, so it fuses into the reduction and its gradient is a select, where a
    gather's is a scatter; a vocabulary-sharded ``V`` stays sharded), and no ``[B, T, V]``
    log-softmax is materialised beside the logits. Equal to ``log_softmax(z)[y]`` up to float32
    rounding (tests/test_loss_speed.py). The backward pass keeps the logits and the
    log-sum-exp ``[B, T]`` alone and recomputes the softmax:

        ∂z_v = g · (1[v = y] − exp(z_v − lse))

    (autodiff keeps the shifted logits, their exponentials and the one-hot mask besides: at the
    SmolLM2 bench shape 432 MiB of float32 ``[B, T, V]`` arrays)."""
    return _token_logps_fwd(logits, targets)[0]


def _one_hot(targets: jax.Array, vocab: int) -> jax.Array:
    return targets[..., None] == jnp.arange(vocab, dtype=targets.dtype)


def _token_logps_fwd(logits, targets):
    z = logits.astype(jnp.float32)
    picked = jnp.sum(jnp.where(_one_hot(targets, z.shape[-1]), z, 0.0), axis=-1)
    lse = jax.nn.logsumexp(z, axis=-1)
    return picked - lse, (logits, targets, lse)


def _token_logps_bwd(residuals, g):
    (logits, targets, lse), g = in_backward(residuals, g)
    z = logits.astype(jnp.float32)
    probs = jnp.exp(z - lse[..., None])
    dz = g[..., None] * (_one_hot(targets, z.shape[-1]).astype(jnp.float32) - probs)
    return dz.astype(logits.dtype), None


token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def sequence_logps(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Summed log-probability of the masked tokens of each sequence: ``[B]``."""
    return jnp.sum(token_logps(logits, targets) * loss_mask, axis=-1)


def causal_lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood over the tokens where ``loss_mask`` is 1.

    ``L = −Σ_{b,t} m_{bt} log p(y_{bt}) / max(1, Σ m_{bt})``. Prompt tokens of instruction data
    and padding carry ``m = 0``.
    """
    mask = loss_mask.astype(jnp.float32)
    nll = -token_logps(logits, targets) * mask
    return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1.0)
