"""What each kernel sees: layer inputs found by walking the traced computation, and their
covariances (GPM's representation matrices).

A parameter ``W`` can meet its input in three ways that GPM knows how to protect:

* ``y = x W`` (a ``dot_general`` contracting W's first axis): the input x lives in W's row
  space; key ``path``, inputs ``[..., n, in]``.
* ``y = h Wᵀ`` (W contracted over its last axis, e.g. a tied output head ``logits = h Eᵀ``): the
  input h lives in W's column space; key ``path + TRANSPOSED``, inputs ``[..., n, out]``.
* ``y = W[ids]`` (a row ``gather``, an embedding lookup): the input is a one-hot row selector;
  key ``path + ROWS``, the row ids ``[..., n]``.

Any other use of the parameter (elementwise, reshaped, inside a ``cond`` or ``while``...) is
counted under ``path + OTHER``: its inputs there are unknown. The walk follows nested ``jit``,
``jax.checkpoint``/remat, ``custom_jvp``/``custom_vjp`` calls and ``scan``: a kernel stacked
``[layers, in, out]`` and scanned over gets per-layer inputs ``[layers, n, in]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import optax

#: key suffixes of :func:`layer_inputs` / :func:`activation_covariance` (see the module doc)
TRANSPOSED, ROWS, OTHER = ":T", ":rows", ":other"

_PASS_THROUGH = {
    "convert_element_type",
    "copy",
    "copy_p",
    "sharding_constraint",
    "device_put",
    "reshard",
    "mesh_cast",
    "optimization_barrier",
}
#: call-like primitives whose body runs once with the caller's operands (in order)
_CALLS = {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
}
_SUBJAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_KIND_SUFFIX = {"in": "", "out": TRANSPOSED, "rows": ROWS}


class _Tag(NamedTuple):
    """A traced value that is (a per-layer slice of) the tracked parameter ``name``, possibly
    transposed (2-D only)."""

    name: str
    transposed: bool = False


Found = dict[tuple[str, str], list[jax.Array]]  # (name, kind) -> inputs [..., n, width]


class _Walk(NamedTuple):
    found: Found
    other: dict[str, set[str]]  # name -> primitives that used it in a way not understood


def _open(sub: Any) -> tuple[Any, list[Any]]:
    """``(jaxpr, consts)`` of a ClosedJaxpr or an open Jaxpr (remat's)."""
    return (sub.jaxpr, list(sub.consts)) if hasattr(sub, "jaxpr") else (sub, [])


def _record_dot(eqn, invals, in_tags, walk: _Walk) -> bool:
    """Record the input of a tracked 2-D kernel contracted over one axis; False if not so."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    sides = [i for i in (0, 1) if in_tags[i] is not None]
    if len(sides) != 1 or lhs_b or rhs_b or len(lhs_c) != 1:
        return False
    side = sides[0]
    tag = in_tags[side]
    if eqn.invars[side].aval.ndim != 2:
        return False
    axis = (lhs_c, rhs_c)[side][0]
    axis = 1 - axis if tag.transposed else axis
    other_axis = (rhs_c, lhs_c)[side][0]
    x = jnp.moveaxis(invals[1 - side], other_axis, -1)
    kind = "in" if axis == 0 else "out"
    walk.found.setdefault((tag.name, kind), []).append(x.reshape(-1, x.shape[-1]))
    return True


def _record_gather(eqn, invals, in_tags, walk: _Walk) -> bool:
    """Record the row ids of a lookup ``W[ids]`` of a tracked 2-D table; False if not one."""
    tag = in_tags[0]
    if tag is None or tag.transposed or in_tags[1] is not None:
        return False
    operand = eqn.invars[0].aval
    dims = eqn.params["dimension_numbers"]
    whole_rows = tuple(eqn.params["slice_sizes"]) == (1, *operand.shape[1:])
    if not (
        operand.ndim == 2
        and whole_rows
        and tuple(dims.collapsed_slice_dims) == (0,)
        and tuple(dims.start_index_map) == (0,)
        and not tuple(getattr(dims, "operand_batching_dims", ()))
    ):
        return False
    ids = invals[1].reshape(-1, 1).astype(jnp.int32)
    walk.found.setdefault((tag.name, "rows"), []).append(ids)
    return True


def _scan(eqn, invals, in_tags, walk: _Walk) -> list[Any]:
    """Run a ``scan`` whose consts or xs hold tracked parameters, recording per iteration:
    inputs of a kernel scanned over (xs) come back stacked ``[length, ..., n, w]``; those of a
    kernel closed over (consts) are concatenated over iterations ``[..., length·n, w]``."""
    p = eqn.params
    body, body_consts = _open(p["jaxpr"])
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
    body_tags, scanned = {}, set()
    for i, (v, tag) in enumerate(zip(body.invars, in_tags)):
        if tag is None:
            continue
        if nc <= i < nc + nk:  # a parameter carried through the loop: not followed
            walk.other.setdefault(tag.name, set()).add("scan carry")
            continue
        body_tags[v] = tag
        if i >= nc + nk:
            scanned.add(tag.name)
    keys: list[tuple[str, str]] = []

    def step(carry, x):
        local = _Walk({}, walk.other)
        outs = _eval(body, body_consts, [*consts, *carry, *(x or [])], body_tags, local)
        keys[:] = sorted(local.found)
        recs = [jnp.concatenate(local.found[k], axis=-2) for k in keys]
        return outs[:nk], (outs[nk:], recs)

    carry, (ys, recs) = jax.lax.scan(
        step, list(init), list(xs) if xs else None, length=p["length"], reverse=p["reverse"]
    )
    for key, rec in zip(keys, recs):
        if key[0] not in scanned:  # [L, ..., n, w] -> [..., L·n, w]
            rec = jnp.moveaxis(rec, 0, -3)
            rec = rec.reshape(*rec.shape[:-3], -1, rec.shape[-1])
        walk.found.setdefault(key, []).append(rec)
    return [*carry, *ys]


def _eval(jaxpr, consts, args, tags: dict[Any, _Tag], walk: _Walk) -> list[Any]:
    """Evaluate ``jaxpr`` on ``args``, recording how each tagged parameter meets its inputs."""
    env: dict[Any, Any] = {}
    tag_of: dict[Any, _Tag] = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
        if v in tags:
            tag_of[v] = tags[v]
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        in_tags = [
            None if isinstance(v, jax.extend.core.Literal) else tag_of.get(v) for v in eqn.invars
        ]
        name = eqn.primitive.name
        outvals = None
        if any(t is not None for t in in_tags):
            sub = next((eqn.params[k] for k in _SUBJAXPR_KEYS if k in eqn.params), None)
            if name in _PASS_THROUGH and in_tags[0] is not None:
                tag_of[eqn.outvars[0]] = in_tags[0]
            elif name == "transpose" and eqn.invars[0].aval.ndim == 2 and in_tags[0] is not None:
                tag_of[eqn.outvars[0]] = in_tags[0]._replace(transposed=not in_tags[0].transposed)
            elif name == "scan":
                outvals = _scan(eqn, invals, in_tags, walk)
            elif name in _CALLS and sub is not None and len(_open(sub)[0].invars) == len(invals):
                inner, inner_consts = _open(sub)
                inner_tags = {v: t for v, t in zip(inner.invars, in_tags) if t is not None}
                outvals = _eval(inner, inner_consts, invals, inner_tags, walk)
            elif not (
                (name == "dot_general" and _record_dot(eqn, invals, in_tags, walk))
                or (name == "gather" and _record_gather(eqn, invals, in_tags, walk))
            ):
                for t in in_tags:
                    if t is not None:
                        walk.other.setdefault(t.name, set()).add(name)
        if outvals is None:
            with eqn.ctx.manager:
                outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for v, x in zip(eqn.outvars, outvals):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def layer_inputs(
    fn: Callable[..., Any], params: optax.Params, *args: Any, select: Any = None
) -> dict[str, jax.Array]:
    """How each selected parameter meets its inputs while ``fn(params, *args)`` runs, found by
    walking the traced computation (no model hooks needed), keyed by the ``/``-joined path:

    * ``path``: inputs ``x [..., n, in]`` of the uses ``x @ W`` (all uses stacked over n);
    * ``path + TRANSPOSED``: inputs ``h [..., n, out]`` of the uses ``h @ Wᵀ``;
    * ``path + ROWS``: row ids ``[..., n]`` of the lookups ``W[ids]``;
    * ``path + OTHER``: the number (int32 scalar) of uses of another kind, whose inputs are
      unknown (elementwise, reshaped, under ``cond``/``while``...).

    ``...`` are the leading axes of a kernel stacked per layer and scanned over (``jax.lax.scan``,
    ``nnx.scan``): ``[layers, n, in]``. ``select`` (default: leaves with ``ndim >= 2``) picks the
    parameters followed."""
    from jaxcl.methods._tree import kernels, path_str, selection

    flags = jax.tree.leaves(selection(kernels if select is None else select, params))
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [x for _, x in with_paths]
    names = [path_str(p) for p, _ in with_paths]
    closed = jax.make_jaxpr(lambda ps, *a: fn(treedef.unflatten(ps), *a))(leaves, *args)
    flat_args = jax.tree.leaves(args)
    tags = {v: _Tag(name) for v, name, flag in zip(closed.jaxpr.invars, names, flags) if flag}
    walk = _Walk({}, {})
    _eval(closed.jaxpr, closed.consts, [*leaves, *flat_args], tags, walk)
    out: dict[str, jax.Array] = {}
    for (name, kind), xs in walk.found.items():
        x = jnp.concatenate(xs, axis=-2)
        out[name + _KIND_SUFFIX[kind]] = x[..., 0] if kind == "rows" else x
    for name, prims in walk.other.items():
        out[name + OTHER] = jnp.asarray(len(prims), jnp.int32)
    return out


def _row_counts(ids: jax.Array, rows: int) -> jax.Array:
    """``[..., n]`` ids → ``[..., rows]`` counts (ids out of range dropped)."""
    if ids.ndim > 1:
        return jax.vmap(lambda i: _row_counts(i, rows))(ids)
    return jax.ops.segment_sum(jnp.ones(ids.shape, jnp.float32), ids, num_segments=rows)


def activation_covariance(
    fn: Callable[..., Any],
    params: optax.Params,
    batches: Iterable[Any],
    *,
    select: Any = None,
) -> dict[str, jax.Array]:
    """Mean input covariance of each selected parameter over the inputs it sees while
    ``fn(params, batch)`` runs on ``batches`` (see :func:`layer_inputs`), jitted:

    * ``path``: ``C = (1/n) Σ_t x_t x_tᵀ`` ``[..., in, in]`` of its ``x @ W`` uses;
    * ``path + TRANSPOSED``: the same ``[..., out, out]`` of its ``h @ Wᵀ`` uses;
    * ``path + ROWS``: the diagonal ``[..., rows]`` of the covariance of its lookups' one-hot
      inputs, i.e. each row's share of the lookups (the off-diagonal terms are zero);
    * ``path + OTHER``: uses of another kind (a count; see :func:`layer_inputs`).

    GPM's bases are eigenvectors of C (:func:`jaxcl.methods.gpm`)."""
    from jaxcl.methods._tree import path_str

    sizes = {
        path_str(p): x.shape[-2]
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if getattr(x, "ndim", 0) >= 2
    }

    @jax.jit
    def moments(p, batch):
        out = {}
        for k, x in layer_inputs(fn, p, batch, select=select).items():
            if k.endswith(OTHER):
                out[k] = (x, 0)
            elif k.endswith(ROWS):
                out[k] = (_row_counts(x, sizes[k[: -len(ROWS)]]), x.shape[-1])
            else:
                x = x.astype(jnp.float32)
                out[k] = (jnp.einsum("...ni,...nj->...ij", x, x), x.shape[-2])
        return out

    sums: dict[str, jax.Array] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        for k, (c, n) in moments(params, batch).items():
            if k.endswith(OTHER):
                sums[k] = c
            else:
                sums[k] = sums[k] + c if k in sums else c
            counts[k] = counts.get(k, 0) + int(n)
    if not counts:
        raise ValueError("activation_covariance: no batches, or no selected kernel was used")
    return {k: sums[k] if k.endswith(OTHER) else sums[k] / counts[k] for k in sums}
