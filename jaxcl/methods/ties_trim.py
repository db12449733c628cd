"""TIES' trim of whole task vectors, and the per-layer view of parameter paths merges share.

TIES (Yadav et al., 2023) keeps each task vector's ``k = kept(P, density)`` largest magnitudes
over all its ``P`` entries. A :class:`Cut` records that trim as one threshold (the k-th largest
magnitude) plus, when several entries tie at it, how many of the tied entries each leaf keeps,
so every leaf can then be trimmed on its own (streamed from disk, or sharded on a mesh) with the
same result as a sort of the concatenated vector. :func:`tree_cut` finds it on device,
:func:`host_cut` from one float32 buffer of magnitudes (``jaxcl merge``).

Scanned layers: a stacked ``layers`` leaf ``[L, ...]`` is seen as its L per-layer leaves
(``layers/<l>/...``, :func:`virtual_leaves`), so masks, trims and cuts agree between the scanned
and the unrolled layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.methods.weights import task_vector

F32 = jnp.float32


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


CutMode = Literal["gt", "ge", "some"]


@dataclass(frozen=True)
class Cut:
    """TIES' trim of one whole task vector to its ``k = kept(n, density)`` largest magnitudes
    (the paper's): keep ``|τ| > thr``, ``thr`` the k-th largest magnitude, and of the entries
    equal to ``thr`` the first ``k − #{|τ| > thr}`` in the per-layer tree's flattened order
    (earlier leaf, then earlier entry: a stable sort of the concatenated vector). ``quotas``
    (only when some ties are dropped): per leaf path, ``(ties kept, ties)``."""

    thr: float  # a traced scalar when found under a trace
    quotas: dict[str, tuple[Any, Any]] | None = None

    def at(self, path: str) -> tuple[CutMode, int]:
        """How leaf ``path`` is cut: ``gt`` (no tie kept), ``ge`` (every tie), or ``some``
        with the number of its ties kept."""
        if self.quotas is None:
            return "ge", 0
        q, n = self.quotas.get(path, (0, 0))
        if isinstance(q, jax.core.Tracer):
            return "some", q
        return ("gt", 0) if q == 0 else ("ge", 0) if q >= n else ("some", q)


def make_cut(
    thr: float,
    k: int,
    greater: int,
    ties: int,
    leaf_ties: Callable[[], Iterable[tuple[str, int]]],
) -> Cut:
    """The :class:`Cut` of a vector whose k-th largest magnitude is ``thr``, ``greater``
    entries above it and ``ties`` equal to it; ``leaf_ties`` (called only when some ties are
    dropped) gives ``(path, ties)`` per leaf in the per-layer tree's order."""
    need = k - greater
    if need >= ties:
        return Cut(float(thr))
    quotas = {}
    for path, n in leaf_ties():
        quotas[path] = (min(n, need), n)
        need -= quotas[path][0]
    return Cut(float(thr), quotas)


def host_cut(
    magnitudes: np.ndarray,
    density: float,
    leaf_ties: Callable[[float], Iterable[tuple[str, int]]],
) -> Cut:
    """The :class:`Cut` of a vector from its magnitudes (one float32 buffer, partitioned in
    place: its order is lost; ``leaf_ties(thr)`` recounts the ties per leaf when needed)."""
    n = magnitudes.size
    k = kept(n, density)
    magnitudes.partition(n - k)
    thr = magnitudes[n - k]
    greater = int(np.count_nonzero(magnitudes[n - k + 1 :] > thr))
    ties = int(np.count_nonzero(magnitudes == thr))
    return make_cut(float(thr), k, greater, ties, lambda: leaf_ties(float(thr)))


def cut_leaf(delta: jax.Array, thr: jax.Array, mode: CutMode, quota: jax.Array) -> jax.Array:
    """``delta`` (float32) trimmed against a :class:`Cut`'s threshold: ``|δ| > thr`` kept, and
    the entries equal to ``thr`` all (``ge``), none (``gt``) or the first ``quota`` (``some``)."""
    a = jnp.abs(delta)
    if mode == "gt":
        keep = a > thr
    elif mode == "ge":
        keep = a >= thr
    else:
        eq = (a == thr).reshape(-1)
        first = (jnp.cumsum(eq.astype(jnp.int32)) <= quota) & eq
        keep = (a > thr) | first.reshape(a.shape)
    return jnp.where(keep, delta, 0.0)


def path_str(path: tuple) -> str:
    """A tree path as ``a/b/0/c`` (the key of DARE's masks; jaxcl's per-layer parameter paths
    read the same from a checkpoint, an HF directory or a stage's tree)."""
    return "/".join(str(_key(k)) for k in path)


def _key(k: Any) -> Any:
    return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


def stacked(path: tuple) -> bool:
    """Whether a leaf at ``path`` is a ``scan_layers`` leaf (``layers/attn/q``, its leading
    axis the layers) rather than a per-layer one (``layers/0/attn/q``)."""
    if len(path) < 2 or _key(path[0]) != "layers":
        return False
    sub = _key(path[1])
    return not isinstance(sub, int) and not str(sub).isdigit()


def layer_path(path: tuple, layer: int) -> str:
    """The per-layer path of layer ``layer`` of the stacked leaf at ``path``."""
    return path_str((path[0], layer, *path[1:]))


def virtual_leaves(tree: Any) -> list[tuple[str, int, int | None]]:
    """The leaves of ``tree`` as its per-layer tree has them, in that tree's flattened order:
    ``(path, leaf index, layer)``, ``layer`` None for a leaf that is not stacked."""
    flat = jax.tree_util.tree_leaves_with_path(tree)
    out: list[tuple[str, int, int | None]] = []
    i = 0
    while i < len(flat):
        if not stacked(flat[i][0]):
            out.append((path_str(flat[i][0]), i, None))
            i += 1
            continue
        j = i
        while j < len(flat) and stacked(flat[j][0]):
            j += 1
        for layer in range(int(np.shape(flat[i][1])[0])):  # layer-major, as `layers/<l>/...`
            out.extend((layer_path(flat[m][0], layer), m, layer) for m in range(i, j))
        i = j
    return out


@functools.partial(jax.jit, static_argnames=("where", "k"))
def _cut_stats(
    leaves: list[jax.Array], bases: list[jax.Array] | None, where: tuple, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    mags = [jnp.abs(_tau_at(leaves, bases, i, layer)).reshape(-1) for i, layer in where]
    flat = jnp.concatenate(mags)
    thr = jnp.sort(flat)[flat.size - k]
    ties = jnp.stack([jnp.sum(m == thr, dtype=jnp.int32) for m in mags])
    return thr, jnp.sum(flat > thr, dtype=jnp.int32), ties


def tree_cut(tree: optax.Params, density: float, base: optax.Params | None = None) -> Cut:
    """The :class:`Cut` trimming the task vector ``tree − base`` (``tree`` itself when no base)
    to its ``kept(P, density)`` largest magnitudes over all its leaves, ties going to the
    earlier leaf of the per-layer tree, then the earlier entry."""
    leaves = jax.tree.leaves(tree)
    bases = None if base is None else jax.tree.leaves(base)
    virtual = virtual_leaves(tree)
    where = tuple((i, layer) for _, i, layer in virtual)
    paths = [p for p, _, _ in virtual]
    n = sum(
        int(np.prod(np.shape(leaves[i])[1 if layer is not None else 0 :])) for i, layer in where
    )
    k = kept(n, density)
    thr, greater, ties = _cut_stats(leaves, bases, where, k)
    if isinstance(thr, jax.core.Tracer):  # traced (jit, eval_shape): every leaf cut "some"
        quota = jnp.clip(k - greater - (jnp.cumsum(ties) - ties), 0, ties)
        return Cut(thr, {p: (quota[j], ties[j]) for j, p in enumerate(paths)})
    counts = [int(t) for t in np.asarray(ties)]
    return make_cut(float(thr), k, int(greater), sum(counts), lambda: zip(paths, counts))


def _tau_at(leaves: list, bases: list | None, i: int, layer: int | None) -> jax.Array:
    x = jnp.asarray(leaves[i] if layer is None else leaves[i][layer], F32)
    if bases is None:
        return x
    return task_vector(x, jnp.asarray(bases[i] if layer is None else bases[i][layer], F32))


def trim_model(vector: optax.Params, density: float) -> optax.Params:
    """TIES' trim of a whole task vector: its ``kept(P, density)`` largest magnitudes over all
    leaves kept (ties: the earlier leaf of the per-layer tree, then the earlier entry), through
    its :func:`tree_cut`."""
    cut = tree_cut(vector, density)

    def one(path, x):
        x = jnp.asarray(x, F32)
        if not stacked(path):
            mode, q = cut.at(path_str(path))
            return cut_leaf(x, jnp.float32(cut.thr), mode, jnp.int32(q))
        rows = []
        for layer in range(x.shape[0]):
            mode, q = cut.at(layer_path(path, layer))
            rows.append(cut_leaf(x[layer], jnp.float32(cut.thr), mode, jnp.int32(q)))
        return jnp.stack(rows)

    return jax.tree_util.tree_map_with_path(one, vector)
