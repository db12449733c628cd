"""Causal language-model objectives over logits, with loss masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log p(targets[b, t] | ·)`` from ``logits [B, T, V]``: shape ``[B, T]``, float32.

    ``log p(y) = z_y − logsumexp_v z_v``: the target logit is picked by a one-hot select and
    summed (elementwise, so it fuses into the reduction and its gradient is a select, where a
    gather's is a scatter; a vocabulary-sharded ``V`` stays sharded), and no ``[B, T, V]``
    log-softmax is materialised beside the logits. Equal to ``log_softmax(z)[y]`` up to float32
    rounding (tests/test_loss_speed.py)."""
    logits = logits.astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    picked = jnp.sum(jnp.where(targets[..., None] == vocab, logits, 0.0), axis=-1)
    return picked - jax.nn.logsumexp(logits, axis=-1)


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
