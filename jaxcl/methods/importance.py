"""Parameter-importance estimators used at task boundaries."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def fisher_diagonal(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    batches: Iterable[Any],
    *,
    per_example: bool = False,
) -> optax.Params:
    """Empirical diagonal Fisher ``F_i = E[(∂L/∂θ_i)²]``.

    With ``per_example=False`` the expectation runs over batches (squared batch-mean gradients,
    cheap and what most LLM EWC code uses); with ``per_example=True`` each example's gradient is
    squared before averaging (the textbook estimator, memory ∝ batch size × parameters).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over the batch.
      params: the point at which the Fisher is taken.
      batches: an iterable of batches (pytrees of arrays with a leading batch axis).
    """
    if per_example:

        def squared(p, batch):
            def one(example):
                single = jax.tree.map(lambda x: x[None], example)
                return jax.tree.map(jnp.square, jax.grad(loss_fn)(p, single))

            per = jax.vmap(one)(batch)
            return jax.tree.map(lambda x: jnp.mean(x, axis=0), per)

    else:

        def squared(p, batch):
            return jax.tree.map(jnp.square, jax.grad(loss_fn)(p, batch))

    return _batch_mean(squared, params, batches, "fisher_diagonal")


def mas_importance(
    output_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    batches: Iterable[Any],
    *,
    per_example: bool = False,
) -> optax.Params:
    """MAS importance ``Ω_i = E |∂ ‖f(x)‖²₂ / ∂θ_i|`` (Aljundi et al., 2018), label-free.

    ``output_fn(params, batch)`` returns the model output ``[batch, ..., features]``;
    ``‖f(x)‖²`` sums squares over the last axis and averages over the batch and any middle axes
    (an LLM's positions). ``per_example=False`` takes |gradient| of the batch mean (cheap);
    ``per_example=True`` averages each example's |gradient| (the paper's estimator).
    """

    def sq_norm(p, batch):
        out = output_fn(p, batch).astype(jnp.float32)
        return jnp.mean(jnp.sum(out * out, axis=-1))

    if per_example:

        def absolute(p, batch):
            def one(example):
                single = jax.tree.map(lambda x: x[None], example)
                return jax.tree.map(jnp.abs, jax.grad(sq_norm)(p, single))

            return jax.tree.map(lambda x: jnp.mean(x, axis=0), jax.vmap(one)(batch))

    else:

        def absolute(p, batch):
            return jax.tree.map(jnp.abs, jax.grad(sq_norm)(p, batch))

    return _batch_mean(absolute, params, batches, "mas_importance")


def _batch_mean(per_batch, params, batches, name: str):
    accumulate = jax.jit(
        lambda total, p, batch: jax.tree.map(jnp.add, total, per_batch(p, batch)),
        donate_argnums=0,
    )
    total = jax.tree.map(lambda x: jnp.zeros_like(x, dtype=jnp.float32), params)
    count = 0
    for batch in batches:
        total = accumulate(total, params, batch)
        count += 1
    if count == 0:
        raise ValueError(f"{name}: no batches given")
    return jax.tree.map(lambda x: x / count, total)
