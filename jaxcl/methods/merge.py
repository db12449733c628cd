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

Recipe methods :class:`TiesSpec` and :class:`DareSpec` merge the per-task fine-tunes of one stage
at its end (``merge`` phase), as ``task_arithmetic`` does, keeping each task's end weights.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods.protocol import Carry, Context, EvalView, Hook, MethodSpecBase, copy_tree
from jaxcl.methods.weights import (
    checked,
    full_weights_only,
    is_last_task,
    replace_carry,
    store_stage_start,
    task_arithmetic,
    task_vector,
)

F32 = jnp.float32
Consensus = Literal["sum", "count"]
#: mergekit's threshold above which two leaves count as colinear and SLERP falls back to lerp
DOT_THRESHOLD = 0.9995

# ----------------------------------------------------------------------------- leaf functions


def kept(n: int, density: float) -> int:
    """Entries a trim to ``density`` keeps of ``n``: ``⌊density · n⌋`` (mergekit's), at least 1."""
    return n if density >= 1 else max(1, int(density * n))


def trim(delta: jax.Array, density: float) -> jax.Array:
    """TIES' trim: ``delta`` (float32) with all but its ``kept(n, density)`` largest magnitudes
    zeroed; ties in magnitude keep the earlier entries (flattened order)."""
    delta = jnp.asarray(delta, F32)
    k = kept(delta.size, density)
    if k >= delta.size:
        return delta
    flat = delta.reshape(-1)
    order = jnp.argsort(-jnp.abs(flat), stable=True)
    keep = jnp.zeros(flat.shape, bool).at[order[:k]].set(True)
    return jnp.where(keep, flat, 0.0).reshape(delta.shape)


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


def _stack(leaves: Sequence[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.asarray(x, F32) for x in leaves])


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
    **params: Any,
) -> jax.Array:
    """One leaf of ``method``'s merge (the single place both the tree functions and the
    streaming merge of :mod:`jaxcl.merging` go through). ``params``: ``normalize``, ``lam``,
    ``density``, ``drop``, ``consensus``, ``t`` as the method takes them; ``path`` and
    ``seed`` key DARE's masks."""
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
    if method == "ties":
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


def path_str(path: tuple) -> str:
    """A tree path as ``a/b/0/c`` (the key of DARE's masks; jaxcl's per-layer parameter paths
    read the same from a checkpoint, an HF directory or a stage's tree)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def merge_trees(
    method: MergeMethod,
    base: optax.Params | None,
    finetuned: Sequence[optax.Params],
    **kw: Any,
) -> optax.Params:
    """:func:`merge_leaf` over every leaf of the trees (all of one structure)."""
    trees = list(finetuned)
    if not trees:
        raise ValueError(f"{method}: no models to merge")
    first = base if base is not None else trees[0]

    def one(path, ref, *xs):
        b = ref if base is not None else None
        ms = xs if base is not None else (ref, *xs)
        return merge_leaf(method, b, ms, path=path_str(path), **kw)

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
    scope: Literal["leaf", "model"] = "leaf",
) -> optax.Params:
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge, ``θ_b + λ τ_m``.
    ``scope: leaf`` trims each tensor to ``density`` (mergekit's); ``model`` trims each task
    vector over all its leaves at once (the paper's reference code), which holds one flattened
    copy of a task vector in memory."""
    if scope == "leaf":
        return merge_trees(
            "ties",
            base,
            finetuned,
            weights=weights,
            density=density,
            lam=lam,
            normalize=normalize,
            consensus=consensus,
        )
    trimmed = [trim_model(task_vector(_f32(f), _f32(base)), density) for f in finetuned]
    w = jnp.asarray([1.0] * len(trimmed) if weights is None else weights, F32)

    def one(b, *ds):
        merged = combine(jnp.stack(ds), w, consensus=consensus, normalize=normalize)
        return (b.astype(F32) + lam * merged).astype(b.dtype)

    return jax.tree.map(one, base, *trimmed)


def trim_model(vector: optax.Params, density: float) -> optax.Params:
    """TIES' trim of a whole task vector: its ``kept(P, density)`` largest magnitudes over all
    leaves kept (ties: the earlier leaf, then the earlier entry)."""
    leaves, treedef = jax.tree.flatten(vector)
    flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
    trimmed = trim(flat, density)
    out, start = [], 0
    for x in leaves:
        out.append(trimmed[start : start + x.size].reshape(x.shape))
        start += x.size
    return jax.tree.unflatten(treedef, out)


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


def _f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, F32), tree)


# ----------------------------------------------------------------------------- recipe methods


class _TaskModelsSpec(MethodSpecBase):
    """A merge of per-task fine-tunes from one base at the stage's end: every task trains from
    θ_b (the stage's start, ``frozen["stage_start"]``); at each task's end but the last its
    weights θ_t are kept (``frozen["<name>_task<t>"]``, in the parameters' dtype, sharded like
    them) and the weights go back to θ_b; after the last task the stage ends on the merge of
    θ_b and θ_0..θ_{T−1}, and drops the kept weights. Row t of R scores the merge of the tasks
    seen so far; a scalar ``frozen["<name>_open"]`` marks a merge still pending, so the view is
    the identity once the stage has merged (scoring its checkpoint does not merge twice)."""

    needs_full_weights: ClassVar[bool] = True
    describes_weights: ClassVar[bool] = True

    def merged(self, base: Any, models: Sequence[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _key(self, t: int) -> str:
        return f"{self.name}_task{t}"

    def _kept(self, frozen: dict[str, Any]) -> list[Any]:
        out, t = [], 0
        while self._key(t) in frozen:
            out.append(frozen[self._key(t)])
            t += 1
        return out

    def _open(self) -> str:
        return f"{self.name}_open"

    def hooks(self) -> list[Hook]:
        def start(ctx: Context, carry: Carry) -> Carry:
            carry = store_stage_start(ctx, carry)
            if ctx.task.index == 0 and self._open() not in carry.frozen:
                carry = replace_carry(carry, **{self._open(): jnp.zeros((), jnp.int32)})
            return carry

        return [
            Hook("task_start", checked(full_weights_only(self.name), start), self.name),
            Hook("merge", self._merge, self.name),
        ]

    def _merge(self, ctx: Context, carry: Carry) -> Carry:
        params, frozen = carry.state.params, carry.frozen
        base = frozen["stage_start"]
        kept = self._kept(frozen)
        if is_last_task(ctx):
            merged = self.merged(base, [*kept, params])
            drop = (self._open(), *(self._key(t) for t in range(len(kept))))
            return replace_carry(carry, params=merged, drop=drop)
        return replace_carry(
            carry, params=copy_tree(base), **{self._key(len(kept)): copy_tree(params)}
        )

    def eval_view(self) -> EvalView | None:
        def view(params: Any, carry: Carry, i: int) -> Any:
            f = carry.frozen
            if self._open() not in f:  # before the stage, or merged already
                return params
            return self.merged(f["stage_start"], [*self._kept(f), params])

        return _cached(view)


def _cached(view: EvalView) -> EvalView:
    """``view`` remembering its last answer: the rows of R call it once per task with the same
    parameters and carry, and a merge (TIES' sort of every leaf) is worth computing once. Holds
    one merged tree until the next call with other arguments."""
    last: list[Any] = []

    def cached(params: Any, carry: Carry, i: int) -> Any:
        if last and last[0] is params and last[1] is carry.frozen:
            return last[2]
        out = view(params, carry, i)
        last[:] = [params, carry.frozen, out]
        return out

    return cached


class TiesSpec(_TaskModelsSpec):
    """TIES-Merging (Yadav et al., 2023) of the stage's per-task fine-tunes at its end:
    ``θ_b + λ τ_m``, τ_m the disjoint mean of the trimmed, sign-elected task vectors
    ``τ_t = θ_t − θ_b``. Memory: θ_b plus one P (parameters' dtype) per finished task."""

    name: Literal["ties"]
    density: float = Field(0.2, gt=0, le=1, description="share of each τ_t kept (paper: 0.2)")
    lam: float = Field(1.0, ge=0, description="λ in θ_b + λ τ_m (paper: 1, or tuned)")
    consensus: Consensus = Field("sum", description="sign election: sum (the paper's) or count")
    normalize: bool = Field(True, description="disjoint mean (true) or sum (false)")
    scope: Literal["leaf", "model"] = Field(
        "leaf", description="trim each tensor (mergekit) or each whole task vector (paper's code)"
    )

    def merged(self, base: Any, models: Sequence[Any]) -> Any:
        return ties(
            base,
            models,
            density=self.density,
            lam=self.lam,
            consensus=self.consensus,
            normalize=self.normalize,
            scope=self.scope,
        )


class DareSpec(_TaskModelsSpec):
    """DARE (Yu et al., 2024) of the stage's per-task fine-tunes at its end: each task vector
    dropped with rate p and rescaled by 1/(1 − p) (masks from ``seed``, the leaf's path and the
    task's index), combined by task arithmetic (``linear``) or TIES' sign election (``ties``).
    Memory: θ_b plus one P per finished task."""

    name: Literal["dare"]
    drop: float = Field(0.9, ge=0, lt=1, description="p, the drop rate (paper: up to 0.9)")
    seed: int = Field(0, description="seed of the drop masks")
    combine: Literal["linear", "ties"] = Field("linear", description="task arithmetic or TIES")
    lam: float = Field(1.0, ge=0, description="λ scaling the combined vectors")
    consensus: Consensus = Field("sum", description="combine: ties: the sign election")
    normalize: bool = Field(False, description="divide by the (agreeing) weights' sum")

    def merged(self, base: Any, models: Sequence[Any]) -> Any:
        return dare(
            base,
            models,
            drop=self.drop,
            seed=self.seed,
            lam=self.lam,
            combine=self.combine,
            normalize=self.normalize,
            consensus=self.consensus,
        )


MERGE_SPECS: tuple[type[MethodSpecBase], ...] = (TiesSpec, DareSpec)

__all__ = [
    "MERGE_SPECS",
    "NEEDS_BASE",
    "DareSpec",
    "TiesSpec",
    "combine",
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
    "trim",
    "trim_model",
]
