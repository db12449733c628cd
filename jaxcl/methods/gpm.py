"""Gradient projection memory (Saha et al., 2021): keep updates out of the input-representation
subspace each layer saw on earlier tasks, so the layer's outputs on those inputs do not change.

Reference code (sahagobinda/GPM): ``update_GPM`` in ``main_pmnist.py`` / ``main_cifar100.py``
takes the SVD of each layer's representation matrix R (inputs as columns) and keeps the leading
left singular vectors until they hold a fraction ε of ‖R‖²_F (the residual ``R − MMᵀR`` from the
second task on, against the energy of R; on the first task it keeps one column fewer than the
paper's Eq. 5, its ``+1`` being commented out: jaxcl follows the paper). ε is set per layer and
raised per task there (``0.97 + 0.003·task`` on CIFAR-100); one constant here.
``train_projected`` removes ``M Mᵀ`` from each kernel's gradient before a plain ``optim.SGD``
step, and zeroes the gradient of every 1-D parameter (batch-norm scales and shifts) from the
second task on (``main_cifar100.py``). With SGD the applied update is the projected gradient;
jaxcl's base optimizer is AdamW, whose per-coordinate scaling and weight decay put the update
back into the protected span. So, as Adam-NSCL (ShipengWang/Adam-NSCL, ``optim/adam_svd.py``:
``update_ = update @ transform`` after Adam's own update) does, the projection stands **behind**
the optimizer by default and acts on the final update.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods._tree import SKIP, Select, is_skip, path_str, selection, skipped
from jaxcl.methods.activations import OTHER, ROWS, TRANSPOSED, activation_covariance
from jaxcl.methods.compose import Behind, Front, Position, behind, front
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.protocol import Carry, Context, MethodSpecBase, output_fn
from jaxcl.methods.storage import ORTHONORMAL_BASIS

log = logging.getLogger(__name__)

#: eigenvalues below this fraction of tr C count as zero (float32 noise of ``eigh``)
_EIG_FLOOR = 1e-7


class GpmState(NamedTuple):
    """GPM's memory, one entry per parameter (``SKIP`` where it does not apply):

    * ``basis``: per kernel ``[..., in, out]`` an orthonormal basis ``[..., in, rank]`` of the
      inputs ``x`` it met as ``x @ W`` on earlier tasks (unused columns zero);
    * ``right``: per lookup table ``[..., rows, d]`` an orthonormal basis ``[..., d, rank]`` of
      the inputs ``h`` it met as ``h @ Eᵀ`` (a tied output head);
    * ``rows``: per lookup table, ``[..., rows]`` 1 where the row is protected;
    * ``fixed``: per covered parameter a scalar, 1 once it is fixed (1-D parameters after the
      first task; a parameter used in a way GPM cannot project);
    * ``threshold``: ε.
    """

    basis: optax.Params
    right: optax.Params
    rows: optax.Params
    fixed: optax.Params
    threshold: jax.Array


def _everything(path: str, leaf: Any) -> bool:
    return True


def _project(u, basis, right, rows, fixed):
    """``D (I − U Uᵀ) u (I − V Vᵀ)`` then zero if fixed (``D`` zeroes protected rows)."""
    if skipped(fixed):
        return u
    u32 = u.astype(jnp.float32)
    if not skipped(basis):
        u32 = u32 - basis @ (jnp.swapaxes(basis, -1, -2) @ u32)
    if not skipped(right):
        u32 = u32 - (u32 @ right) @ jnp.swapaxes(right, -1, -2)
    if not skipped(rows):
        u32 = u32 * (1.0 - rows)[..., None]
    return (u32 * (1.0 - fixed)).astype(u.dtype)


def gpm(
    threshold: float = 0.97,
    select: Select = _everything,
    max_rank: int | None = None,
    *,
    tables: str | None = "embed",
    vectors: Literal["fix", "train"] = "fix",
    project: Literal["update", "gradient"] = "update",
) -> Front | Behind:
    """Gradient projection memory (Saha et al., 2021), per parameter.

    A kernel W ``[..., in, out]`` used as ``y = x W`` changes its outputs on an earlier input x
    by ``x ΔW``. GPM keeps an orthonormal basis U of those inputs and applies::

        ΔW ← (I − U Uᵀ) ΔW                 (so x ΔW = 0 for x in span U)

    A lookup table E ``[..., rows, d]`` (paths matching ``tables``) is protected on both of its
    uses: a lookup ``E[id]`` reads a one-hot input, whose covariance is the diagonal of row
    counts, so GPM's eigen-basis is a set of rows (chosen by count, with the same energy rule)
    and those rows are kept: ``ΔE ← D ΔE`` with ``D`` zeroing them (O(rows) memory, not rows²);
    a tied output head ``logits = h Eᵀ`` changes by ``ΔE h``, so ``ΔE ← ΔE (I − V Vᵀ)`` with V
    a basis of the heads' inputs h. 1-D parameters (norm scales, biases) are fixed after the
    first task (``vectors="fix"``, as the reference code does for batch norm); so is any
    parameter whose use :func:`jaxcl.methods.layer_inputs` cannot see as one of the three above.

    At a task boundary, with the task's input covariance ``C = (1/n) Σ_t x_t x_tᵀ``
    (``gpm_covariance=``, see :func:`jaxcl.methods.activation_covariance`), ``P = U Uᵀ``,
    total energy ``E = tr C`` and captured energy ``E_U = tr(P C)``: the eigenvectors v_1, v_2,
    ... (eigenvalues σ²_1 ≥ σ²_2 ≥ ...) of C restricted to the complement of U (the left
    singular vectors of the residual representation ``(I − P) R``) are appended in order while
    ``E_U + Σ_{j<i} σ²_j < ε E`` (ε = ``threshold``): the smallest set that brings the captured
    energy to ε E, the paper's criterion (Eq. 5 and 9). ε = 1 keeps every direction of nonzero
    energy (eigenvalues under 1e-7·E are float32 noise and count as zero). ``max_rank`` caps the
    columns (default ``in``). Memory: ``in × max_rank`` per kernel, ``d × max_rank + rows`` per
    table (float32).

    ``project="update"`` (default) stands **behind** the base optimizer and projects the final
    update (AdamW's moments, scaling and weight decay included), so the promise holds for the
    step actually applied; ``project="gradient"`` stands in front and projects the raw gradient,
    the paper's form, exact only under plain SGD. ``select`` picks the parameters covered (all);
    ``vectors="train"`` leaves 1-D parameters free.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"gpm: threshold must lie in (0, 1], got {threshold}")
    table = re.compile(tables) if tables else None

    def is_table(name: str, p: Any) -> bool:
        return table is not None and p.ndim >= 2 and table.search(name) is not None

    def init(params: optax.Params) -> GpmState:
        flags = selection(select, params)
        parts: dict[str, list[Any]] = {"basis": [], "right": [], "rows": [], "fixed": []}
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        for (path, p), f in zip(with_paths, jax.tree.leaves(flags)):
            b = r = m = fx = SKIP()
            name = path_str(path)
            if f and (p.ndim >= 2 or vectors == "fix"):
                fx = jnp.zeros((), jnp.float32)
            if f and is_table(name, p):
                rank = p.shape[-1] if max_rank is None else min(max_rank, p.shape[-1])
                r = jnp.zeros((*p.shape[:-2], p.shape[-1], rank), jnp.float32)
                m = jnp.zeros(p.shape[:-1], jnp.float32)
            elif f and p.ndim >= 2:
                rank = p.shape[-2] if max_rank is None else min(max_rank, p.shape[-2])
                b = jnp.zeros((*p.shape[:-1], rank), jnp.float32)
            for key, x in zip(parts, (b, r, m, fx)):
                parts[key].append(x)
        trees = {k: treedef.unflatten(v) for k, v in parts.items()}
        return GpmState(**trees, threshold=jnp.asarray(threshold, jnp.float32))

    def update(updates, state: GpmState, params=None, **extra_args):
        del params, extra_args
        out = jax.tree.map(_project, updates, state.basis, state.right, state.rows, state.fixed)
        return out, state

    return (behind if project == "update" else front)(init, update)


def _place(basis: jax.Array, new: jax.Array, include: jax.Array) -> jax.Array:
    """Write the included columns of ``new`` (in order) into the free columns of ``basis``;
    those beyond its capacity are dropped (as the reference truncates at ``in`` columns)."""
    free = jnp.sum(basis * basis, axis=0) < 0.5
    rank_in = jnp.cumsum(include) - 1
    rank_free = jnp.cumsum(free) - 1
    place = include[:, None] & free[None, :] & (rank_in[:, None] == rank_free[None, :])
    return basis + new @ place.astype(jnp.float32)


def gpm_expand(basis: jax.Array, cov: jax.Array, threshold: jax.Array) -> jax.Array:
    """One GPM basis update (see :func:`gpm`): ``basis [..., in, rank]``, ``cov [..., in, in]``.

    The new directions are eigenvectors of ``Qᵀ C Q`` mapped back by Q, an orthonormal basis of
    the complement of U (from ``eigh(I − U Uᵀ)``, eigenvalues 0 or 1): they are the
    eigenvectors of ``(I − P) C (I − P)`` of nonzero eigenvalue, orthogonal to U to float
    precision even for small eigenvalues (which ``eigh`` of the residual itself does not give).
    """
    if basis.ndim > 2:
        return jax.vmap(gpm_expand, in_axes=(0, 0, None))(basis, cov, threshold)
    cov = cov.astype(jnp.float32)
    size = cov.shape[0]
    w, q = jnp.linalg.eigh(jnp.eye(size, dtype=jnp.float32) - basis @ basis.T)
    q = q * (w > 0.5)[None, :]
    total = jnp.trace(cov)
    captured = jnp.trace(basis.T @ cov @ basis)
    eigval, eigvec = jnp.linalg.eigh(q.T @ cov @ q)
    eigval, eigvec = jnp.maximum(eigval[::-1], 0.0), (q @ eigvec)[:, ::-1]
    before = captured + jnp.cumsum(eigval) - eigval
    include = ((before < threshold * total) | (threshold >= 1.0)) & (
        eigval > _EIG_FLOOR * jnp.maximum(total, 1e-30)
    )
    return _place(basis, eigvec, include)


def gpm_expand_rows(rows: jax.Array, counts: jax.Array, threshold: jax.Array) -> jax.Array:
    """GPM's basis update for a lookup table: ``rows [..., n_rows]`` (1: protected),
    ``counts [..., n_rows]`` each row's share of the lookups (the diagonal of the one-hot
    inputs' covariance, whose eigenvectors are the unit rows). Unprotected rows are added by
    decreasing count while ``captured + Σ_{j<i} c_j < ε Σ c`` (ties: lower row first)."""
    if rows.ndim > 1:
        return jax.vmap(gpm_expand_rows, in_axes=(0, 0, None))(rows, counts, threshold)
    counts = counts.astype(jnp.float32)
    total = jnp.sum(counts)
    captured = jnp.sum(rows * counts)
    residual = counts * (1.0 - rows)
    order = jnp.argsort(-residual, stable=True)
    c = residual[order]
    before = captured + jnp.cumsum(c) - c
    include = ((before < threshold * total) | (threshold >= 1.0)) & (c > 0)
    return jnp.maximum(rows, jnp.zeros_like(rows).at[order].set(include.astype(rows.dtype)))


def _refresh_gpm(state: GpmState, *, params, gpm_covariance, **_) -> GpmState:
    del params
    cov, eps = gpm_covariance, state.threshold
    newly_fixed: list[str] = []

    def refresh(path, basis, right, rows, fixed):
        if skipped(fixed):
            return basis, right, rows, fixed
        name = path_str(path)
        uses = {k: cov.get(name + k) for k in ("", TRANSPOSED, ROWS, OTHER)}
        if skipped(basis) and skipped(rows):  # a 1-D parameter
            return basis, right, rows, jnp.ones_like(fixed)
        if not skipped(basis) and (uses[TRANSPOSED] is not None or uses[ROWS] is not None):
            raise ValueError(
                f"gpm: {name} is used as a lookup table or a tied head (E[ids], h @ Eᵀ): "
                "add it to the method's `tables` pattern"
            )
        if not skipped(rows) and uses[""] is not None:
            raise ValueError(
                f"gpm: {name} matches `tables` but is used as a kernel (x @ W): "
                "leave it out of the `tables` pattern"
            )
        seen = [k for k in ("", TRANSPOSED, ROWS) if uses[k] is not None]
        if uses[OTHER] is not None or not seen:
            newly_fixed.append(name)
            return basis, right, rows, jnp.ones_like(fixed)
        if not skipped(basis):
            basis = gpm_expand(basis, uses[""], eps)
        if uses[TRANSPOSED] is not None:
            right = gpm_expand(right, uses[TRANSPOSED], eps)
        if uses[ROWS] is not None:
            rows = gpm_expand_rows(rows, uses[ROWS], eps)
        return basis, right, rows, fixed

    parts = (state.basis, state.right, state.rows, state.fixed)
    flat = [jax.tree_util.tree_flatten_with_path(t, is_leaf=is_skip)[0] for t in parts]
    treedef = jax.tree.structure(state.fixed, is_leaf=is_skip)
    out = [refresh(fl[0][0], *(x for _, x in fl)) for fl in zip(*flat)]
    if newly_fixed:
        message = (
            "gpm: fixed (no input seen as x @ W, E[ids] or h @ Eᵀ, or also used otherwise): "
            + ", ".join(newly_fixed)
        )
        warnings.warn(message, stacklevel=2)
    trees = [treedef.unflatten(list(col)) for col in zip(*out)]
    return GpmState(*trees, threshold=state.threshold)


register_consolidator(GpmState, "gpm", _refresh_gpm, requires=("gpm_covariance",))


# ----------------------------------------------------------------------------- recipe entries


def _path_select(include: str | None, exclude: str | None) -> Callable[[str, Any], bool]:
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None

    def select(path: str, leaf: Any) -> bool:
        del leaf
        return (inc is None or bool(inc.search(path))) and not (exc and exc.search(path))

    return select


class GpmSpec(MethodSpecBase):
    name: Literal["gpm"]
    buffer_dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    buffer_dtype_reason: ClassVar[str] = ORTHONORMAL_BASIS
    position: ClassVar[Position] = "behind"
    describes_weights: ClassVar[bool] = True
    threshold: float = Field(0.97, gt=0, le=1, description="energy fraction ε kept per task")
    batches: int = Field(4, ge=1, description="batches of the task for the activations")
    include: str | None = Field(None, description="regex of the parameters covered (all)")
    exclude: str | None = Field(None, description="regex of parameters left free")
    tables: str | None = Field(
        "embed", description="regex of lookup tables (rows protected; tied head projected)"
    )
    max_rank: int | None = Field(None, ge=1, description="basis columns per kernel (≤ in)")
    vectors: Literal["fix", "train"] = Field(
        "fix", description="1-D parameters (norms, biases): fixed after the first task, or free"
    )
    project: Literal["update", "gradient"] = Field(
        "update",
        description="project AdamW's final update (behind it; exact) or the raw gradient "
        "(in front; the paper's SGD form)",
    )

    def place(self) -> Position:
        return "behind" if self.project == "update" else "front"

    def _select(self) -> Callable[[str, Any], bool]:
        return _path_select(self.include, self.exclude)

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return gpm(
            self.threshold,
            select=self._select(),
            max_rank=self.max_rank,
            tables=self.tables,
            vectors=self.vectors,
            project=self.project,
        )

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        covered = self._select()

        def select(path: str, leaf: Any) -> bool:
            return getattr(leaf, "ndim", 0) >= 2 and covered(path, leaf)

        cov = activation_covariance(
            output_fn(ctx), ctx.trainable(carry), ctx.batches(self.batches), select=select
        )
        log.info("gpm: inputs seen for %d parameters", len(cov))
        return {"gpm_covariance": cov}
