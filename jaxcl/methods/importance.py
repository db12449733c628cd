"""Parameter-importance estimators used at task boundaries: EWC's Fisher and MAS's Ω.

Both are means over **examples** of a per-example statistic of the gradient. A per-example
gradient of a whole model costs a parameter-sized buffer, so the examples of each batch are taken
``chunk`` at a time (``jax.vmap`` inside a chunk, ``jax.lax.scan`` over the chunks, the sum
carried): memory stays ``O(parameters × chunk)``, never ``O(batch × parameters)``. The per-batch
accumulation is jitted once per call (and compiled once per batch shape); the result is float32
and shaped like ``params``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

#: examples whose gradients are computed together (memory ∝ chunk × parameters)
DEFAULT_CHUNK = 1

Stat = Callable[[optax.Params, Any], optax.Params]


def fisher_diagonal(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    batches: Iterable[Any],
    *,
    per_example: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> optax.Params:
    """Diagonal empirical Fisher at ``params``.

    ``per_example=True`` (default, the estimator of Kirkpatrick et al. 2017):
    ``F_i = (1/N) Σ_n (∂L(θ; x_n)/∂θ_i)²`` over the N examples of all ``batches``, where
    ``L(θ; x_n)`` is ``loss_fn`` on a batch holding example n alone (for jaxcl's LM objectives,
    the mean token negative log-likelihood of that sequence).

    ``per_example=False``: the batch-level estimate ``F_i = Σ_b n_b (∂L(θ; B_b)/∂θ_i)² / N``,
    the squared batch-mean gradient (what much LLM EWC code computes; smaller than the
    per-example Fisher by roughly the batch size, by a different factor per parameter).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over the batch.
      params: the point at which the Fisher is taken.
      batches: an iterable of batches (pytrees of arrays sharing a leading example axis); batches
        of different sizes are weighted by their number of examples.
      per_example: the per-example estimator (True) or the batch-level one (False).
      chunk: examples whose gradients are held at once (per-example only).
    """

    return example_mean(
        fisher_stat(loss_fn), params, batches, per_example, chunk, "fisher_diagonal"
    )


def mas_importance(
    output_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    batches: Iterable[Any],
    *,
    per_example: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> optax.Params:
    """MAS importance ``Ω_i = (1/N) Σ_n |∂ ‖f(x_n; θ)‖²₂ / ∂θ_i|`` (Aljundi et al., 2018, eq. 4),
    label-free.

    ``output_fn(params, batch)`` returns the model output ``[batch, ..., features]``; ``‖f(x)‖²``
    sums squares over the last axis and averages over any middle axes (an LM's positions).
    ``per_example=True`` (default, the paper's estimator) averages each example's |gradient|;
    ``per_example=False`` takes |gradient| of the batch-mean ``‖f‖²`` per batch, weighted by
    the batch's examples (what the MAS reference code does with its default batch size).
    """

    return example_mean(mas_stat(output_fn), params, batches, per_example, chunk, "mas_importance")


def fisher_stat(loss_fn: Callable[[optax.Params, Any], jax.Array]) -> Stat:
    """``stat(θ, batch) = (∂L(θ; batch)/∂θ)²`` in float32: the Fisher's summand."""

    def squared(p, batch):
        grads = jax.grad(loss_fn)(p, batch)
        return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)

    return squared


def mas_stat(output_fn: Callable[[optax.Params, Any], jax.Array]) -> Stat:
    """``stat(θ, batch) = |∂ mean ‖f(batch; θ)‖²₂ / ∂θ|`` in float32: MAS's summand."""

    def sq_norm(p, batch):
        out = output_fn(p, batch).astype(jnp.float32)
        return jnp.mean(jnp.sum(out * out, axis=-1))

    def absolute(p, batch):
        return jax.tree.map(lambda g: jnp.abs(g.astype(jnp.float32)), jax.grad(sq_norm)(p, batch))

    return absolute


def example_mean(
    stat: Stat,
    params: optax.Params,
    batches: Iterable[Any],
    per_example: bool,
    chunk: int,
    name: str,
) -> optax.Params:
    """``(1/N) Σ_n stat(params, x_n)`` over the N examples of ``batches`` (``per_example``), or
    ``Σ_b n_b stat(params, B_b) / N`` over whole batches; float32, shaped like ``params``."""
    accumulate = accumulator(stat, per_example, chunk, name)
    total = zeros_f32(params)
    count = 0
    for batch in batches:
        total = accumulate(total, params, batch)
        count += examples_in(batch, name)
    if count == 0:
        raise ValueError(f"{name}: no batches given")
    return jax.tree.map(lambda x: x / count, total)


def accumulator(
    stat: Stat, per_example: bool, chunk: int, name: str = "importance"
) -> Callable[[optax.Params, optax.Params, Any], optax.Params]:
    """The jitted ``accumulate(total, params, batch) -> total + Σ_{n in batch} stat`` (the
    per-example sum, or ``n_b · stat(params, batch)``); ``total`` is donated."""
    if chunk < 1:
        raise ValueError(f"{name}: chunk must be >= 1, got {chunk}")

    def batch_sum(total, p, batch):
        n = examples_in(batch, name)
        if per_example:
            add = chunked_sum(stat, p, batch, chunk)
        else:
            add = jax.tree.map(lambda s: n * s, stat(p, batch))
        return jax.tree.map(jnp.add, total, add)

    return jax.jit(batch_sum, donate_argnums=0)


def zeros_f32(params: optax.Params) -> optax.Params:
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)


def chunked_sum(stat: Stat, params: optax.Params, batch: Any, chunk: int) -> optax.Params:
    """``Σ_n stat(params, batch[n:n+1])`` over the examples of ``batch``: ``chunk`` examples at a
    time under ``vmap``, a ``lax.scan`` over the whole chunks carrying the float32 sum, then one
    ``vmap`` over the remainder."""
    n = examples_in(batch, "chunked_sum")
    if n == 0:
        return zeros_f32(params)
    size = min(chunk, n)
    whole, rest = divmod(n, size)

    def summed(examples):
        one = lambda ex: stat(params, jax.tree.map(lambda x: x[None], ex))  # noqa: E731
        return jax.tree.map(lambda s: jnp.sum(s.astype(jnp.float32), 0), jax.vmap(one)(examples))

    def body(total, examples):
        return jax.tree.map(jnp.add, total, summed(examples)), None

    head = jax.tree.map(lambda x: x[: whole * size].reshape(whole, size, *x.shape[1:]), batch)
    total, _ = jax.lax.scan(body, zeros_f32(params), head)
    if rest:
        tail = jax.tree.map(lambda x: x[whole * size :], batch)
        total = jax.tree.map(jnp.add, total, summed(tail))
    return total


def examples_in(batch: Any, name: str) -> int:
    """The size of the leading axis every leaf of ``batch`` shares."""
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{name}: every array of a batch needs the same leading (example) axis; "
            f"got leading sizes {sorted(s for s in sizes if s is not None)}"
            + (" and a scalar" if None in sizes else "")
        )
    return int(sizes.pop())
