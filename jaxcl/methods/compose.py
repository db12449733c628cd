"""Where each method stands in a chain, and a checked ``optax.chain``.

Penalties act on the raw gradient, so they stand **in front** of the base optimizer
(``chain(ewc, clip, adamw)``). Projections whose promise is about the step actually taken
(A-GEM, OGD, GPM: no first-order change of earlier tasks' loss or outputs), masks and decoupled
terms act on the final update, so they stand **behind** it (``chain(clip, adamw, gpm,
packnet)``): AdamW's per-coordinate scaling would put a projected gradient's update back into
the protected directions, and a mask in front would still let momentum and weight decay move the
weights it protects. A projection's ``project="gradient"`` gives the papers' literal form (exact
under SGD), in front.

Every jaxcl factory returns a :class:`Front` or :class:`Behind` (both are
``optax.GradientTransformationExtraArgs``), and :func:`chain` refuses a misplaced one.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import optax

Position = Literal["front", "behind"]


class Front(optax.GradientTransformationExtraArgs):
    """A transform that must stand in front of the base optimizer (acts on gradients)."""

    __slots__ = ()


class Behind(optax.GradientTransformationExtraArgs):
    """A transform that must stand behind the base optimizer (acts on final updates)."""

    __slots__ = ()


def front(init: Any, update: Any) -> Front:
    return Front(init, update)


def behind(init: Any, update: Any) -> Behind:
    return Behind(init, update)


def keep_masked(updates: Any, mask: Any) -> Any:
    """``u ← u·m`` leaf by leaf: ``mask`` matches ``updates``, each leaf a Python bool (the whole
    leaf kept or zeroed) or a boolean array broadcastable to the leaf (rows kept)."""

    def keep(u: Any, m: Any) -> Any:
        if isinstance(m, bool):
            return u if m else jax.numpy.zeros_like(u)
        return jax.numpy.where(m, u, jax.numpy.zeros_like(u))

    return jax.tree.map(keep, updates, mask)


def position(tx: Any) -> Position | None:
    """``"front"``, ``"behind"`` or ``None`` for a transform jaxcl does not know (the base)."""
    if isinstance(tx, Front):
        return "front"
    if isinstance(tx, Behind):
        return "behind"
    return None


def check_order(*parts: Any, names: list[str] | None = None) -> None:
    """Raise ``ValueError`` unless every front method precedes every other transform and every
    behind method follows them (``names`` labels the parts in the message)."""
    names = names or [f"part {i}" for i in range(len(parts))]
    places = [position(t) for t in parts]
    base = [i for i, p in enumerate(places) if p is None]
    if not base:
        return
    first, last = base[0], base[-1]
    for i, place in enumerate(places):
        if place == "front" and i > first:
            raise ValueError(
                f"{names[i]} acts on gradients and must stand in front of the base optimizer "
                f"({names[first]}): move it before it"
            )
        if place == "behind" and i < last:
            raise ValueError(
                f"{names[i]} masks or edits the final update and must stand behind the base "
                f"optimizer ({names[last]}), or momentum and weight decay would still move the "
                "weights it protects: move it after it"
            )


def chain(*parts: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.chain`` that first checks each jaxcl method stands on the right side of the base
    optimizer (see :func:`check_order`)."""
    check_order(*parts)
    return optax.chain(*parts)


def state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any, replicated: Any
) -> Any:
    """Shardings of ``tx``'s optimizer state: each parameter-tree copy in it follows the
    parameters. A leaf shaped like its parameter takes its sharding; a leaf of another shape
    (GPM's ``[in, rank]`` basis, a ``[k, *shape]`` stack) keeps the parameter's mesh axis on every
    trailing dimension whose size matches, and is replicated on the others; skipped leaves
    (``optax.MaskedNode``) stay as they are; scalars and other non-parameter fields get
    ``replicated``. Use it for ``jax.jit(..., out_shardings=...)`` of ``tx.init``."""
    from jax.sharding import NamedSharding, PartitionSpec

    abstract = jax.eval_shape(tx.init, params)
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)

    def follow(leaf: Any, param: Any, sharding: Any) -> Any:
        if isinstance(leaf, optax.MaskedNode):
            return leaf
        if leaf.shape == param.shape or not isinstance(sharding, NamedSharding):
            return sharding if leaf.shape == param.shape else replicated
        spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
        out = [None] * leaf.ndim
        for i in range(1, min(leaf.ndim, param.ndim) + 1):
            if leaf.shape[-i] == param.shape[-i]:
                out[-i] = spec[-i]
        return NamedSharding(sharding.mesh, PartitionSpec(*out))

    return optax.tree_map_params(
        tx,
        follow,
        abstract,
        shapes,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
