"""Gradient projection memory (Saha et al., 2021): keep updates out of the input-representation
subspace each layer saw on earlier tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods._tree import SKIP, Select, is_skip, kernels, path_str, selection, skipped
from jaxcl.methods.activations import activation_covariance
from jaxcl.methods.compose import Front, front
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.protocol import Carry, Context, MethodSpecBase, kernel_select, output_fn


class GpmState(NamedTuple):
    """Per selected kernel ``[..., in, out]`` an orthonormal basis ``[..., in, rank]`` of the
    input-representation space of earlier tasks (unused columns are zero); ``threshold`` ε."""

    basis: optax.Params
    threshold: jax.Array


def gpm(threshold: float = 0.97, select: Select = kernels, max_rank: int | None = None) -> Front:
    """Gradient projection memory (Saha et al., 2021), per layer.

    For a selected kernel W ``[..., in, out]`` used as ``y = x W``, the gradient
    ``∂L/∂W = Σ_t x_t δ_tᵀ`` lies in the span of the inputs x. GPM keeps an orthonormal basis U
    of the inputs of earlier tasks and removes it from the gradient::

        g ← (I − U Uᵀ) g

    so outputs on those inputs do not change. At a task boundary, with the task's activation
    covariance ``C = Σ_t x_t x_tᵀ`` (``gpm_covariance=``, see
    :func:`jaxcl.methods.activation_covariance`), ``P = U Uᵀ``, total energy ``E = tr C`` and
    captured energy ``E_U = tr(P C)``: the eigenvectors v_1, v_2, ... (eigenvalues
    σ²_1 ≥ σ²_2 ≥ ...) of the residual ``(I − P) C (I − P)`` are appended in order while
    ``E_U + Σ_{j<i} σ²_j < ε E`` (ε = ``threshold``), i.e. until the basis captures a fraction ε
    of the task's representation energy. ``max_rank`` caps the columns (default ``in``).
    Memory: ``in × max_rank`` per selected kernel (float32).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"gpm: threshold must lie in (0, 1], got {threshold}")

    def init(params: optax.Params) -> GpmState:
        flags = selection(select, params)

        def one(p, f):
            if not f:
                return SKIP()
            if p.ndim < 2:
                raise ValueError("gpm: selected leaves must be kernels [..., in, out]")
            rank = p.shape[-2] if max_rank is None else min(max_rank, p.shape[-2])
            return jnp.zeros((*p.shape[:-1], rank), jnp.float32)

        return GpmState(
            basis=jax.tree.map(one, params, flags), threshold=jnp.asarray(threshold, jnp.float32)
        )

    def update(updates, state: GpmState, params=None, **extra_args):
        del params, extra_args

        def project(g, u):
            if skipped(u):
                return g
            g32 = g.astype(jnp.float32)
            return (g32 - u @ (jnp.swapaxes(u, -1, -2) @ g32)).astype(g.dtype)

        return jax.tree.map(project, updates, state.basis), state

    return front(init, update)


def gpm_expand(basis: jax.Array, cov: jax.Array, threshold: jax.Array) -> jax.Array:
    """One GPM basis update (see :func:`gpm`): ``basis [..., in, rank]``, ``cov [..., in, in]``."""
    if basis.ndim > 2:
        return jax.vmap(gpm_expand, in_axes=(0, 0, None))(basis, cov, threshold)
    cov = cov.astype(jnp.float32)
    eye = jnp.eye(cov.shape[0], dtype=jnp.float32)
    residual_map = eye - basis @ basis.T
    total = jnp.trace(cov)
    captured = jnp.trace(basis.T @ cov @ basis)
    eigval, eigvec = jnp.linalg.eigh(residual_map @ cov @ residual_map)
    eigval, eigvec = jnp.maximum(eigval[::-1], 0.0), eigvec[:, ::-1]
    before = captured + jnp.cumsum(eigval) - eigval
    include = (before < threshold * total) & (eigval > 1e-7 * jnp.maximum(total, 1e-30))
    free = jnp.sum(basis * basis, axis=0) < 0.5
    # the m-th included eigenvector goes to the m-th free column (beyond capacity: dropped)
    rank_in = jnp.cumsum(include) - 1
    rank_free = jnp.cumsum(free) - 1
    place = include[:, None] & free[None, :] & (rank_in[:, None] == rank_free[None, :])
    return basis + eigvec @ place.astype(jnp.float32)


def _refresh_gpm(state: GpmState, *, params, gpm_covariance, **_) -> GpmState:
    del params
    missing = []

    def refresh(path, u):
        if skipped(u):
            return u
        name = path_str(path)
        if name not in gpm_covariance:
            missing.append(name)
            return u
        return gpm_expand(u, gpm_covariance[name], state.threshold)

    basis = jax.tree_util.tree_map_with_path(refresh, state.basis, is_leaf=is_skip)
    if missing:
        raise ValueError(f"gpm: no activation covariance for {', '.join(missing)}")
    return GpmState(basis=basis, threshold=state.threshold)


register_consolidator(GpmState, "gpm", _refresh_gpm, requires=("gpm_covariance",))


# ----------------------------------------------------------------------------- recipe entries


class GpmSpec(MethodSpecBase):
    name: Literal["gpm"]
    describes_weights: ClassVar[bool] = True
    threshold: float = Field(0.97, gt=0, le=1, description="energy fraction ε kept per task")
    batches: int = Field(4, ge=1, description="batches of the task for the activations")
    include: str | None = Field(None, description="regex of the kernels to protect (all)")
    exclude: str | None = Field("embed", description="regex of kernels left out (lookups)")
    max_rank: int | None = Field(None, ge=1, description="basis columns per kernel (≤ in)")

    def _select(self) -> Callable[[str, Any], bool]:
        return kernel_select(self.include, self.exclude)

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return gpm(self.threshold, select=self._select(), max_rank=self.max_rank)

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        cov = activation_covariance(
            output_fn(ctx), ctx.trainable(carry), ctx.batches(self.batches), select=self._select()
        )
        return {"gpm_covariance": cov}
