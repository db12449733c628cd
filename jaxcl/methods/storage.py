"""The dtype a method's buffers are stored in: one wrapper for every transform.

A continual-learning transform keeps parameter-shaped buffers in its optax state (EWC's Fisher
and anchor, MAS's importance, SI's path integral, PackNet's masks). :func:`stored_as` keeps the
floating buffers of any such transform in a declared dtype between steps, and hands the
transform its buffers in the dtypes its own ``init`` gives before each update, so the method's
arithmetic is unchanged and only the stored values are rounded:

    store(b) = round_dtype(b)        after init, after every update, after every boundary
    update(g, store(S)) = inner.update(g, upcast(store(S)))

"Buffers" are the floating arrays of rank ≥ 1; scalars (counters, damping, schedules) keep their
own dtype. :func:`keep_dtypes` is the boundary half: a consolidate or a hook that recomputed a
buffer in float32 gives it back in the dtype the step was compiled for.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

#: storage dtypes a recipe may declare (``buffer_dtype``)
BUFFER_DTYPES = ("float32", "bfloat16")
#: why a projection method keeps its basis in float32
ORTHONORMAL_BASIS = (
    "its projection needs an orthonormal basis; rounded to bfloat16 the basis is orthonormal to "
    "about 1e-2 only, and the projected update leaks into the protected subspace"
)


def is_buffer(leaf: Any) -> bool:
    """A floating array of rank ≥ 1 (what a declared buffer dtype applies to)."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.ndim(leaf) >= 1 and jnp.issubdtype(dtype, jnp.floating)


def cast_buffers(tree: Any, dtype: Any) -> Any:
    """``tree`` with each buffer (:func:`is_buffer`) cast to ``dtype``; other leaves as they are."""
    return jax.tree.map(lambda x: x.astype(dtype) if is_buffer(x) else x, tree)


def keep_dtypes(new: Any, old: Any) -> Any:
    """``new`` with each floating leaf cast to the dtype of ``old``'s leaf in its place, when the
    two trees have the same structure (shapes may differ: a basis grows); otherwise ``new``."""
    new_leaves, treedef = jax.tree.flatten(new)
    old_leaves, old_def = jax.tree.flatten(old)
    if treedef != old_def:
        return new

    def keep(n: Any, o: Any) -> Any:
        n_dtype, o_dtype = getattr(n, "dtype", None), getattr(o, "dtype", None)
        if n_dtype is None or o_dtype is None or n_dtype == o_dtype:
            return n
        if jnp.issubdtype(n_dtype, jnp.floating) and jnp.issubdtype(o_dtype, jnp.floating):
            return n.astype(o_dtype)
        return n

    return jax.tree.unflatten(treedef, [keep(n, o) for n, o in zip(new_leaves, old_leaves)])


def stored_as(
    inner: optax.GradientTransformation, dtype: Any, name: str = "method"
) -> optax.GradientTransformationExtraArgs:
    """``inner`` with its buffers stored in ``dtype``: cast down after ``init`` and after each
    ``update``, and back to ``inner``'s own dtypes (those of ``inner.init``) before each update.
    The state keeps ``inner``'s types, so :func:`~jaxcl.methods.consolidate` still finds it."""
    inner = optax.with_extra_args_support(inner)
    dtype = jnp.dtype(dtype)

    def init(params: optax.Params) -> optax.OptState:
        return cast_buffers(inner.init(params), dtype)

    def update(updates, state, params=None, **extra_args):
        native = jax.eval_shape(inner.init, updates if params is None else params)
        if jax.tree.structure(native) != jax.tree.structure(state):
            raise ValueError(
                f"{name}: its state no longer has the structure its init gives, so buffer_dtype "
                "cannot restore its dtypes"
            )
        state = jax.tree.map(lambda s, n: s.astype(n.dtype) if is_buffer(s) else s, state, native)
        updates, state = inner.update(updates, state, params, **extra_args)
        return updates, cast_buffers(state, dtype)

    return optax.GradientTransformationExtraArgs(init, update)


__all__ = [
    "BUFFER_DTYPES",
    "ORTHONORMAL_BASIS",
    "cast_buffers",
    "is_buffer",
    "keep_dtypes",
    "stored_as",
]
