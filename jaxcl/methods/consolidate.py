"""Task boundaries as a pure function over optimizer states.

A continual-learning transform keeps its memory of earlier tasks (anchors, importances, bases,
masks) in its optax state. At a task boundary :func:`consolidate` walks the whole optimizer state
(any nesting of ``optax.chain``, ``inject_hyperparams``, ``masked``...), finds every state type
registered here and returns a new optimizer state with those refreshed; everything else is
returned unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxcl.methods.storage import cast_buffers, keep_dtypes


@dataclass(frozen=True)
class _Consolidator:
    method: str
    refresh: Callable[..., Any]
    requires: tuple[str, ...]


_REGISTRY: dict[type, _Consolidator] = {}


def register_consolidator(
    state_type: type, method: str, refresh: Callable[..., Any], requires: tuple[str, ...] = ()
) -> None:
    """Declare how ``state_type`` is refreshed: ``refresh(state, params=..., **estimates)``.

    ``requires`` names the estimates (keyword arguments of :func:`consolidate`) it cannot do
    without, so a missing one fails with a message naming the method and the estimate.
    """
    _REGISTRY[state_type] = _Consolidator(method, refresh, tuple(requires))


def required_estimates(opt_state: optax.OptState) -> dict[str, tuple[str, ...]]:
    """``{method name: estimates it needs}`` for every consolidatable state in ``opt_state``."""
    found: dict[str, tuple[str, ...]] = {}
    for node in _registered_nodes(opt_state):
        entry = _REGISTRY[type(node)]
        found[entry.method] = entry.requires
    return found


def _registered_nodes(tree: Any) -> list[Any]:
    return [
        leaf
        for leaf in jax.tree.leaves(tree, is_leaf=lambda x: type(x) in _REGISTRY)
        if type(leaf) in _REGISTRY
    ]


def consolidate(opt_state: optax.OptState, *, params: optax.Params, **estimates: Any):
    """Refresh every continual-learning state inside ``opt_state`` at a task boundary.

    Args:
      opt_state: the state of a chain containing jaxcl transforms (anywhere in it).
      params: the parameters at the end of the task (new anchors are taken from them).
      **estimates: what the transforms need, e.g. ``fisher=`` from :func:`fisher_diagonal`.

    Returns:
      A new optimizer state of the same structure, each refreshed buffer in the dtype it had.
    """
    for node in _registered_nodes(opt_state):
        entry = _REGISTRY[type(node)]
        missing = [name for name in entry.requires if estimates.get(name) is None]
        if missing:
            raise ValueError(
                f"consolidate: method {entry.method!r} needs the estimate(s) "
                f"{', '.join(missing)}; pass them as keyword arguments"
            )

    def refresh(node: Any) -> Any:
        entry = _REGISTRY.get(type(node))
        if entry is None:
            return node
        # estimates are folded in float32 and stored as the state was (a declared buffer_dtype)
        refreshed = entry.refresh(cast_buffers(node, jnp.float32), params=params, **estimates)
        return keep_dtypes(refreshed, node)

    return jax.tree.map(refresh, opt_state, is_leaf=lambda x: type(x) in _REGISTRY)
