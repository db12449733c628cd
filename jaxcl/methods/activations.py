"""What each kernel sees: layer inputs found by walking the traced computation, and their
covariances (GPM's representation matrices)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import optax

_PASS_THROUGH = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "device_put"}
_SUBJAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _eval(jaxpr, consts, args, tags, found):
    """Evaluate ``jaxpr``, recording the left operand of every ``dot_general`` whose right operand
    is a tagged kernel ``[in, out]`` contracted over ``in``: ``found[path].append(x [n, in])``."""
    env: dict[Any, Any] = {}
    tag_of: dict[Any, str] = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
        if tags.get(id(v)) is not None:
            tag_of[v] = tags[id(v)]
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        in_tags = [
            None if isinstance(v, jax.extend.core.Literal) else tag_of.get(v) for v in eqn.invars
        ]
        name = eqn.primitive.name
        sub = next((eqn.params[k] for k in _SUBJAXPR_KEYS if k in eqn.params), None)
        if name == "dot_general" and in_tags[1] is not None:
            (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
            rhs = eqn.invars[1].aval
            if tuple(rhs_c) == (rhs.ndim - 2,) and not rhs_b and rhs.ndim == 2:
                x = jnp.moveaxis(invals[0], lhs_c[0], -1)
                found.setdefault(in_tags[1], []).append(x.reshape(-1, x.shape[-1]))
        if sub is not None and any(in_tags) and hasattr(sub, "jaxpr"):
            sub_tags = {id(v): t for v, t in zip(sub.jaxpr.invars, in_tags) if t is not None}
            outvals = _eval(sub.jaxpr, sub.consts, invals, sub_tags, found)
        else:
            with eqn.ctx.manager:
                outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        if name in _PASS_THROUGH and in_tags and in_tags[0] is not None:
            tag_of[eqn.outvars[0]] = in_tags[0]
        for v, x in zip(eqn.outvars, outvals):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def layer_inputs(
    fn: Callable[..., Any], params: optax.Params, *args: Any, select: Any = None
) -> dict[str, jax.Array]:
    """Inputs ``[n, in]`` fed to each selected kernel ``[in, out]`` while ``fn(params, *args)``
    runs, keyed by the kernel's ``/``-joined path, found by walking the traced computation (no
    model hooks needed). A kernel used several times has its inputs stacked; kernels used
    otherwise than ``x @ W`` (embedding lookups, inside ``scan``) are absent from the result."""
    from jaxcl.methods._tree import kernels, path_str, selection

    flags = jax.tree.leaves(selection(kernels if select is None else select, params))
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [x for _, x in with_paths]
    names = [path_str(p) for p, _ in with_paths]
    closed = jax.make_jaxpr(lambda ps, *a: fn(treedef.unflatten(ps), *a))(leaves, *args)
    flat_args = jax.tree.leaves(args)
    tags = {
        id(v): (name if flag else None) for v, name, flag in zip(closed.jaxpr.invars, names, flags)
    }
    found: dict[str, list[jax.Array]] = {}
    _eval(closed.jaxpr, closed.consts, [*leaves, *flat_args], tags, found)
    return {k: jnp.concatenate(v, axis=0) for k, v in found.items()}


def activation_covariance(
    fn: Callable[..., Any],
    params: optax.Params,
    batches: Iterable[Any],
    *,
    select: Any = None,
) -> dict[str, jax.Array]:
    """Mean input covariance ``C = (1/n) Σ_t x_t x_tᵀ`` of each selected kernel, over the inputs
    it sees while ``fn(params, batch)`` runs on ``batches`` (see :func:`layer_inputs`), jitted.
    GPM's bases are eigenvectors of C (:func:`jaxcl.methods.gpm`)."""

    @jax.jit
    def moments(p, batch):
        inputs = layer_inputs(fn, p, batch, select=select)
        return {
            k: (x.astype(jnp.float32).T @ x.astype(jnp.float32), x.shape[0])
            for k, x in inputs.items()
        }

    sums: dict[str, jax.Array] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        for k, (c, n) in moments(params, batch).items():
            sums[k] = sums[k] + c if k in sums else c
            counts[k] = counts.get(k, 0) + int(n)
    if not counts:
        raise ValueError("activation_covariance: no batches, or no selected kernel was used")
    return {k: sums[k] / counts[k] for k in sums}
