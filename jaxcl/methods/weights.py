"""Weight-space methods: pure functions on parameter trees.

Model averaging (the survey's HMA, "model averaging" of task-end checkpoints), an exponential
moving average with elastic reset (Noukhovitch et al., 2023) and task-arithmetic merging
(Ilharco et al., 2023). Every function works leaf by leaf and keeps each leaf's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax


def interpolate(a: optax.Params, b: optax.Params, alpha: float | jax.Array) -> optax.Params:
    """``(1 − α) a + α b`` (α = 0 gives ``a``, α = 1 gives ``b``)."""
    return jax.tree.map(lambda x, y: ((1 - alpha) * x + alpha * y).astype(x.dtype), a, b)


def average(trees: Sequence[optax.Params], weights: Sequence[float] | None = None) -> optax.Params:
    """Weighted model average ``Σ_i w_i θ_i / Σ_i w_i`` (uniform when ``weights`` is None)."""
    if not trees:
        raise ValueError("average: no parameter trees given")
    w = jnp.ones(len(trees)) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != (len(trees),):
        raise ValueError(f"average: {len(trees)} trees but {w.shape[0]} weights")
    w = w / jnp.sum(w)
    return jax.tree.map(
        lambda *xs: sum(wi * x.astype(jnp.float32) for wi, x in zip(w, xs)).astype(xs[0].dtype),
        *trees,
    )


def ema(ema_params: optax.Params, params: optax.Params, decay: float) -> optax.Params:
    """One EMA step: ``θ̄ ← decay · θ̄ + (1 − decay) · θ``."""
    return interpolate(ema_params, params, 1.0 - decay)


def elastic_reset(
    params: optax.Params, ema_params: optax.Params, init_params: optax.Params
) -> tuple[optax.Params, optax.Params]:
    """Elastic reset: the online model restarts from its EMA and the EMA from the initial model,
    ``(θ, θ̄) ← (θ̄, θ_0)``. Returns ``(params, ema_params)``."""
    del params
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
    return copy(ema_params), copy(init_params)


def task_vector(finetuned: optax.Params, base: optax.Params) -> optax.Params:
    """``τ = θ_ft − θ_base``."""
    return jax.tree.map(lambda f, b: f - b, finetuned, base)


def task_arithmetic(
    base: optax.Params,
    finetuned: Sequence[optax.Params],
    scales: float | Sequence[float] = 1.0,
) -> optax.Params:
    """Task-arithmetic merge ``θ = θ_base + Σ_i λ_i (θ_i − θ_base)`` (one λ, or one per model)."""
    lams = [scales] * len(finetuned) if isinstance(scales, int | float) else list(scales)
    if len(lams) != len(finetuned):
        raise ValueError(f"task_arithmetic: {len(finetuned)} models but {len(lams)} scales")

    def merge(b, *fs):
        out = b.astype(jnp.float32)
        for lam, f in zip(lams, fs):
            out = out + lam * (f.astype(jnp.float32) - b.astype(jnp.float32))
        return out.astype(b.dtype)

    return jax.tree.map(merge, base, *finetuned)
