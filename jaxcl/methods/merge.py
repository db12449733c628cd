"""Model merging: linear soups, task arithmetic, TIES, DARE and SLERP, leaf by leaf.

Every merge is a pure function of one leaf (a tensor) per input, computed in float32 and
returned in the dtype of the base (or first) input's leaf; the tree-level functions map it over
parameter trees, and :mod:`jaxcl.merging` streams it over checkpoints one tensor at a time. With
``θ_b`` the base, ``θ_i`` the models, ``τ_i = θ_i − θ_b`` their task vectors (Ilharco et al.,
2023: :func:`~jaxcl.methods.weights.task_vector`), ``w_i`` their weights and λ a scale:

* **linear** (model soup, Wortsman et al., 2022, "Model soups"): ``Σ w_i θ_i / Σ w_i``
  (``normalize``; else ``Σ w_i θ_i``).
* **task arithmetic** (Ilharco et al., 2023): ``θ_b + λ Σ w_i τ_i``
  (:func:`~jaxcl.methods.weights.task_arithmetic`).
* **TIES** (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models"):
  *trim* each τ_i to its ``density`` fraction of largest magnitudes (``τ̂_i``), *elect* the sign
  ``γ = sgn(Σ_i w_i τ̂_i)`` per parameter (``consensus: sum``, the paper's; ``count``:
  ``sgn(Σ_i sgn(w_i τ̂_i))``), *disjoint merge*: with ``A = {i : sgn(w_i τ̂_i) = γ}``,
  ``τ_m = Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i`` (the mean over agreeing vectors when all w_i = 1),
  then ``θ_b + λ τ_m``.
* **DARE** (Yu et al., 2024, "Language Models are Super Mario"): drop each entry of τ_i with
  probability p and rescale the survivors, ``τ̃_i = (1 − m_i) ⊙ τ_i / (1 − p)``,
  ``m_i ~ Bernoulli(p)``, so ``E[τ̃_i] = τ_i``; then task arithmetic (``dare_linear``) or TIES'
  sign election and disjoint merge (``dare_ties``) over the τ̃_i. The mask of model i at a leaf
  comes from ``fold_in(fold_in(key(seed), crc32(path)), i)``: reproducible, independent of the
  order leaves are visited in, and different for every model.
* **SLERP** (Shoemake, 1985, "Animating rotation with quaternion curves"), between two models on
  each flattened leaf: with ``Ω = arccos(⟨a/‖a‖, b/‖b‖⟩)``,
  ``slerp(a, b; t) = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b``, and ``(1 − t) a + t b``
  when ``|cos Ω| > 0.9995`` (nearly colinear), as mergekit does.

The conventions (weights, ``normalize``, the sign rule ``Σ ≥ 0 → +``) follow mergekit's
``generalized_task_arithmetic``; the defaults follow the papers (docs/methods.md, "Weight space").

TIES trims each task vector over all its entries by default (``scope: model``, the paper's): a
:class:`Cut` (the k-th largest magnitude and how ties at it are shared out) is found once per task
vector, then every leaf is trimmed against it (a scalar: sharded leaves stay sharded);
``scope: leaf`` trims each tensor on its own (mergekit's). Under ``scan_layers`` a stacked
``layers`` leaf ``[L, ...]`` is merged as its L per-layer leaves (``layers/<l>/...``): the same
masks, trims and cuts as the per-layer tree and ``jaxcl merge``.

The recipe methods ``ties`` and ``dare`` live in :mod:`jaxcl.methods.merge_specs`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from jaxcl.methods.ties_trim import (
    Cut,
    CutMode,
    cut_leaf,
    kept,
    layer_path,
    path_str,
    stacked,
    tree_cut,
    trim,
    trim_model,
)
from jaxcl.methods.weights import task_arithmetic, task_vector

F32 = jnp.float32
Consensus = Literal["sum", "count"]
#: mergekit's threshold above which two leaves count as colinear and SLERP falls back to lerp
DOT_THRESHOLD = 0.9995

# ----------------------------------------------------------------------------- leaf functions


def leaf_key(seed: int, path: str, index: int) -> jax.Array:
    """The DARE key of model ``index`` at leaf ``path``: ``fold_in(fold_in(key(seed),
    crc32(path)), index)``."""
    salt = zlib.crc32(path.encode()) & 0x7FFFFFFF
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), salt), index)


def dare_drop(delta: jax.Array, drop: float, key: jax.Array) -> jax.Array:
    """DARE: each entry dropped with probability ``drop``, the survivors scaled by
    ``1 / (1 − drop)`` (float32)."""
    delta = jnp.asarray(delta, F32)
    if drop == 0:
        return delta
    keep = jax.random.bernoulli(key, 1.0 - drop, delta.shape)
    return jnp.where(keep, delta / (1.0 - drop), 0.0)


def elect_sign(weighted: jax.Array, consensus: Consensus = "sum") -> jax.Array:
    """TIES' sign election over the first axis of ``weighted`` (``[models, ...]``, the
    w_i τ̂_i): +1 where ``Σ_i w_i τ̂_i ≥ 0`` (``sum``) or ``Σ_i sgn(w_i τ̂_i) ≥ 0`` (``count``),
    else −1."""
    if consensus == "sum":
        total = jnp.sum(weighted, axis=0)
    elif consensus == "count":
        total = jnp.sum(jnp.sign(weighted), axis=0)
    else:
        raise ValueError(f"consensus {consensus!r}: one of 'sum', 'count'")
    return jnp.where(total >= 0, 1.0, -1.0).astype(F32)


def combine(
    deltas: jax.Array,
    weights: jax.Array,
    *,
    consensus: Consensus | None,
    normalize: bool,
) -> jax.Array:
    """The merged delta of ``deltas`` (``[models, ...]``, float32): with a ``consensus``, TIES'
    disjoint merge ``Σ_{i∈A} w_i δ_i (/ Σ_{i∈A} w_i)`` over the models agreeing with the elected
    sign; without, ``Σ_i w_i δ_i (/ Σ_i w_i)``. A zero divisor counts as 1 (mergekit's)."""
    w = jnp.asarray(weights, F32).reshape((-1,) + (1,) * (deltas.ndim - 1))
    weighted = deltas * w
    if consensus is None:
        merged = jnp.sum(weighted, axis=0)
        divisor = jnp.sum(w, axis=0)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    else:
        sign = elect_sign(weighted, consensus)
        agree = (jnp.sign(weighted) == sign).astype(F32)  # a trimmed (zero) entry never agrees
        merged = jnp.sum(weighted * agree, axis=0)
        divisor = jnp.sum(w * agree, axis=0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    return merged / divisor if normalize else merged


# ----------------------------------------------------------------------------- global trim


@functools.partial(jax.jit, static_argnames=("modes", "lam", "normalize", "consensus"))
def ties_cut_leaf(
    base: jax.Array,
    leaves: Sequence[jax.Array],
    weights: jax.Array,
    thrs: jax.Array,
    quotas: jax.Array,
    modes: tuple[CutMode, ...],
    lam: float = 1.0,
    normalize: bool = True,
    consensus: Consensus = "sum",
) -> jax.Array:
    """TIES on one leaf, each ``τ_i`` trimmed by its task vector's :class:`Cut` (``thrs[i]``,
    ``modes[i]``, ``quotas[i]``); the threshold is a scalar, so a sharded leaf stays sharded."""
    b = base.astype(F32)
    deltas = jnp.stack(
        [
            cut_leaf(task_vector(jnp.asarray(x, F32), b), thrs[i], modes[i], quotas[i])
            for i, x in enumerate(leaves)
        ]
    )
    merged = combine(deltas, weights, consensus=consensus, normalize=normalize)
    return (b + lam * merged).astype(base.dtype)


@functools.partial(jax.jit, static_argnames=("normalize",))
def linear_leaf(
    leaves: Sequence[jax.Array], weights: jax.Array, normalize: bool = True
) -> jax.Array:
    """``Σ w_i x_i / Σ w_i`` (``normalize``) or ``Σ w_i x_i``, in the first leaf's dtype."""
    w = jnp.asarray(weights, F32)
    out = sum(wi * jnp.asarray(x, F32) for wi, x in zip(w, leaves))
    if normalize:
        out = out / jnp.sum(w)
    return out.astype(leaves[0].dtype)


def task_arithmetic_leaf(
    base: jax.Array,
    leaves: Sequence[jax.Array],
    weights: Sequence[float],
    lam: float = 1.0,
    normalize: bool = False,
) -> jax.Array:
    """``θ_b + λ Σ w_i τ_i`` (``/ Σ w_i`` when ``normalize``): :func:`task_arithmetic` on one
    leaf with scales ``λ w_i``."""
    w = [float(x) for x in weights]
    total = sum(w) if normalize and abs(sum(w)) >= 1e-8 else 1.0
    return task_arithmetic(base, list(leaves), [lam * x / total for x in w])


@functools.partial(jax.jit, static_argnames=("density", "lam", "normalize", "consensus"))
def ties_leaf(
    base: jax.Array,
    leaves: Sequence[jax.Array],
    weights: jax.Array,
    density: float = 0.2,
    lam: float = 1.0,
    normalize: bool = True,
    consensus: Consensus = "sum",
) -> jax.Array:
    """TIES on one leaf: trim every ``τ_i`` to ``density``, elect signs, disjoint merge, scale
    by λ and add to the base (in the base's dtype)."""
    deltas = jnp.stack(
        [trim(task_vector(jnp.asarray(x, F32), base.astype(F32)), density) for x in leaves]
    )
    merged = combine(deltas, weights, consensus=consensus, normalize=normalize)
    return (base.astype(F32) + lam * merged).astype(base.dtype)


@functools.partial(jax.jit, static_argnames=("drop", "lam", "normalize", "consensus"))
def dare_leaf(
    base: jax.Array,
    leaves: Sequence[jax.Array],
    weights: jax.Array,
    keys: jax.Array,
    drop: float = 0.9,
    lam: float = 1.0,
    normalize: bool = False,
    consensus: Consensus | None = None,
) -> jax.Array:
    """DARE on one leaf: every ``τ_i`` dropped and rescaled with its own key (``keys[i]``),
    then combined as task arithmetic (``consensus`` None: ``dare_linear``) or with TIES' sign
    election (``dare_ties``), scaled by λ and added to the base."""
    deltas = jnp.stack(
        [
            dare_drop(task_vector(jnp.asarray(x, F32), base.astype(F32)), drop, keys[i])
            for i, x in enumerate(leaves)
        ]
    )
    merged = combine(deltas, weights, consensus=consensus, normalize=normalize)
    return (base.astype(F32) + lam * merged).astype(base.dtype)


@functools.partial(jax.jit, static_argnames=("dot_threshold", "eps"))
def slerp_leaf(
    a: jax.Array,
    b: jax.Array,
    t: float | jax.Array,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = 1e-8,
) -> jax.Array:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1) on the flattened leaf, the
    angle taken between the normalised vectors (a vector of norm ≤ eps is left unnormalised);
    linear interpolation when ``|cos Ω| > dot_threshold``. In ``a``'s dtype."""
    x, y = jnp.asarray(a, F32), jnp.asarray(b, F32)
    nx, ny = jnp.linalg.norm(x), jnp.linalg.norm(y)
    ux = jnp.where(nx > eps, x / jnp.where(nx > eps, nx, 1.0), x)
    uy = jnp.where(ny > eps, y / jnp.where(ny > eps, ny, 1.0), y)
    dot = jnp.sum(ux * uy)
    omega = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    sin_omega = jnp.where(jnp.abs(dot) > dot_threshold, 1.0, jnp.sin(omega))
    s0 = jnp.sin((1.0 - t) * omega) / sin_omega
    s1 = jnp.sin(t * omega) / sin_omega
    spherical = s0 * x + s1 * y
    linear = (1.0 - t) * x + t * y
    return jnp.where(jnp.abs(dot) > dot_threshold, linear, spherical).astype(a.dtype)


# ----------------------------------------------------------------------------- one dispatcher

MergeMethod = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"]
#: the methods that merge task vectors of a base
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")


def merge_leaf(
    method: MergeMethod,
    base: jax.Array | None,
    leaves: Sequence[jax.Array],
    *,
    weights: Sequence[float] | None = None,
    path: str = "",
    seed: int = 0,
    cuts: Sequence[Cut] | None = None,
    **params: Any,
) -> jax.Array:
    """One leaf of ``method``'s merge (the single place both the tree functions and the
    streaming merge of :mod:`jaxcl.merging` go through). ``params``: ``normalize``, ``lam``,
    ``density``, ``drop``, ``consensus``, ``scope``, ``t`` as the method takes them; ``path``
    (per-layer: ``layers/0/attn/q``) and ``seed`` key DARE's masks; ``cuts`` (TIES, one
    :class:`Cut` per model) trim each task vector as a whole instead of per tensor."""
    w = [1.0] * len(leaves) if weights is None else [float(x) for x in weights]
    if len(w) != len(leaves):
        raise ValueError(f"{method}: {len(leaves)} models but {len(w)} weights")
    if method == "linear":
        return linear_leaf(list(leaves), jnp.asarray(w, F32), params.get("normalize", True))
    if base is None:
        raise ValueError(f"{method} merges task vectors: it needs a base")
    if method == "task_arithmetic":
        return task_arithmetic_leaf(
            base, leaves, w, params.get("lam", 1.0), params.get("normalize", False)
        )
    if method == "ties" and cuts is not None:
        modes, quotas = zip(*(c.at(path) for c in cuts))
        return ties_cut_leaf(
            base,
            list(leaves),
            jnp.asarray(w, F32),
            jnp.asarray([c.thr for c in cuts], F32),
            jnp.asarray(quotas, jnp.int32),
            modes,
            lam=params.get("lam", 1.0),
            normalize=params.get("normalize", True),
            consensus=params.get("consensus", "sum"),
        )
    if method == "ties":
        if params.get("scope", "leaf") != "leaf":
            raise ValueError(
                "ties: scope model trims each whole task vector: give the leaf its `cuts` "
                "(ties_trim.tree_cut), or merge trees with merge.ties"
            )
        return ties_leaf(
            base,
            list(leaves),
            jnp.asarray(w, F32),
            density=params.get("density", 0.2),
            lam=params.get("lam", 1.0),
            normalize=params.get("normalize", True),
            consensus=params.get("consensus", "sum"),
        )
    if method in ("dare_linear", "dare_ties"):
        keys = jnp.stack([leaf_key(seed, path, i) for i in range(len(leaves))])
        return dare_leaf(
            base,
            list(leaves),
            jnp.asarray(w, F32),
            keys,
            drop=params.get("drop", 0.9),
            lam=params.get("lam", 1.0),
            normalize=params.get("normalize", False),
            consensus=params.get("consensus", "sum") if method == "dare_ties" else None,
        )
    if method == "slerp":
        if len(leaves) != 1:
            raise ValueError(
                f"slerp interpolates between the base and one model, got {len(leaves)}"
            )
        return slerp_leaf(base, leaves[0], params["t"])
    raise ValueError(f"unknown merge method {method!r}")


# ----------------------------------------------------------------------------- trees


def merge_trees(
    method: MergeMethod,
    base: optax.Params | None,
    finetuned: Sequence[optax.Params],
    **kw: Any,
) -> optax.Params:
    """:func:`merge_leaf` over every leaf of the trees (all of one structure); a stacked
    ``layers`` leaf (``scan_layers``) is merged layer by layer with its per-layer paths, so a
    scanned tree merges as its per-layer equivalent does."""
    trees = list(finetuned)
    if not trees:
        raise ValueError(f"{method}: no models to merge")
    first = base if base is not None else trees[0]

    def one(path, ref, *xs):
        b = ref if base is not None else None
        ms = xs if base is not None else (ref, *xs)
        if not stacked(path):
            return merge_leaf(method, b, ms, path=path_str(path), **kw)
        return jnp.stack(
            [
                merge_leaf(
                    method,
                    None if b is None else b[layer],
                    [m[layer] for m in ms],
                    path=layer_path(path, layer),
                    **kw,
                )
                for layer in range(ref.shape[0])
            ]
        )

    rest = trees if base is not None else trees[1:]
    return jax.tree_util.tree_map_with_path(one, first, *rest)


def linear(
    trees: Sequence[optax.Params], weights: Sequence[float] | None = None, *, normalize: bool = True
) -> optax.Params:
    """Model soup ``Σ w_i θ_i / Σ w_i`` (``normalize``) or ``Σ w_i θ_i`` (Wortsman et al.,
    2022; uniform weights: the uniform soup)."""
    return merge_trees("linear", None, trees, weights=weights, normalize=normalize)


def ties(
    base: optax.Params,
    finetuned: Sequence[optax.Params],
    *,
    density: float = 0.2,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    consensus: Consensus = "sum",
    scope: Literal["model", "leaf"] = "model",
) -> optax.Params:
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge, ``θ_b + λ τ_m``.
    ``scope: model`` (the paper's) trims each task vector over all its leaves at once
    (:func:`tree_cut`: one float32 copy of one task's magnitudes at a time, then a scalar
    threshold per task); ``leaf`` trims each tensor to ``density`` (mergekit's)."""
    kw = dict(weights=weights, density=density, lam=lam, normalize=normalize, consensus=consensus)
    if scope == "leaf":
        return merge_trees("ties", base, finetuned, **kw)
    if scope != "model":
        raise ValueError(f"ties: scope {scope!r}: one of 'model', 'leaf'")
    cuts = [tree_cut(f, density, base) for f in finetuned]
    return merge_trees("ties", base, finetuned, cuts=cuts, **kw)


def dare(
    base: optax.Params,
    finetuned: Sequence[optax.Params],
    *,
    drop: float = 0.9,
    seed: int = 0,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    combine: Literal["linear", "ties"] = "linear",
    normalize: bool = False,
    consensus: Consensus = "sum",
) -> optax.Params:
    """DARE (Yu et al., 2024): drop and rescale every task vector, then task arithmetic
    (``combine: linear``, mergekit's ``dare_linear``) or TIES' sign election and disjoint merge
    (``combine: ties``, ``dare_ties``)."""
    method = "dare_ties" if combine == "ties" else "dare_linear"
    return merge_trees(
        method,
        base,
        finetuned,
        weights=weights,
        drop=drop,
        seed=seed,
        lam=lam,
        normalize=normalize,
        consensus=consensus,
    )


def slerp(a: optax.Params, b: optax.Params, t: float) -> optax.Params:
    """SLERP from ``a`` (t = 0) to ``b`` (t = 1) on every flattened leaf (Shoemake, 1985), with
    mergekit's fallback to linear interpolation for nearly colinear leaves."""
    return merge_trees("slerp", a, [b], t=t)


__all__ = [
    "NEEDS_BASE",
    "Cut",
    "combine",
    "cut_leaf",
    "dare",
    "dare_drop",
    "dare_leaf",
    "elect_sign",
    "kept",
    "leaf_key",
    "linear",
    "linear_leaf",
    "merge_leaf",
    "merge_trees",
    "path_str",
    "slerp",
    "slerp_leaf",
    "task_arithmetic",
    "task_arithmetic_leaf",
    "task_vector",
    "ties",
    "ties_leaf",
    "tree_cut",
    "trim",
    "trim_model",
]
