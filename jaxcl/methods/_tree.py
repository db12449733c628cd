"""Small pytree helpers shared by the method families: leaf selection by path, tree dot products."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

#: How a method picks the leaves it acts on: a predicate ``select(path, leaf) -> bool`` over the
#: ``/``-joined key path (``"layers/0/mlp/gate"``), a regular expression searched in that path,
#: or a pytree of booleans shaped like the parameters.
Select = Callable[[str, Any], bool] | str | Any


def path_str(path: tuple[Any, ...]) -> str:
    """``(DictKey('layers'), DictKey(0), GetAttrKey('q'))`` → ``"layers/0/q"``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def matches(pattern: str) -> Callable[[str, Any], bool]:
    """A predicate true where the regular expression ``pattern`` is found in the leaf's path."""
    compiled = re.compile(pattern)
    return lambda path, _leaf: compiled.search(path) is not None


def kernels(path: str, leaf: Any) -> bool:
    """Default selection: matrices (and stacks of matrices), i.e. leaves with ``ndim >= 2``."""
    del path
    return getattr(leaf, "ndim", 0) >= 2


def selection(select: Select, tree: Any) -> Any:
    """A pytree of Python booleans shaped like ``tree``: which leaves ``select`` picks."""
    if isinstance(select, str):
        select = matches(select)
    if callable(select):
        return jax.tree_util.tree_map_with_path(lambda p, x: bool(select(path_str(p), x)), tree)
    flags = jax.tree.map(bool, select)
    if jax.tree.structure(flags) != jax.tree.structure(tree):
        raise ValueError("a selection pytree must have the structure of the parameters")
    return flags


def require_params(params: Any, method: str) -> None:
    if params is None:
        raise ValueError(f"{method} needs the current parameters: call update(g, s, params)")


def vdot(a: optax.Params, b: optax.Params) -> jax.Array:
    """``Σ_leaves <a, b>`` in float32."""
    leaves = jax.tree.leaves(
        jax.tree.map(lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b)
    )
    return sum(leaves, jnp.zeros((), jnp.float32))


#: Stand-in for a leaf a method skips (optax's own ``MaskedNode``, an empty pytree node): the
#: state keeps the parameters' tree, costs nothing, and Orbax saves it.
SKIP = optax.MaskedNode


def is_skip(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def skipped(x: Any) -> bool:
    """Whether ``x`` is the :data:`SKIP` stand-in."""
    return isinstance(x, optax.MaskedNode)
