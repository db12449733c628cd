"""Causal language-model objectives over logits, with loss masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log p(targets[b, t] | ·)`` from ``logits [B, T, V]``: shape ``[B, T]``, float32."""
    logps = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logps, targets[..., None], axis=-1)[..., 0]


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
