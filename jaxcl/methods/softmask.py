"""Soft masking of updates by importance (DAS, Ke et al., 2023).

The mask stands **behind** the base optimizer, so Adam's normalisation does not undo it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods._tree import SKIP, Select, is_skip, selection, skipped
from jaxcl.methods.compose import Behind, Position, behind
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.importance import mas_importance
from jaxcl.methods.protocol import Carry, Context, MethodSpecBase, output_fn


class SoftMaskState(NamedTuple):
    """Accumulated normalised importance Î ∈ [0, 1] shaped like the parameters."""

    importance: optax.Params


def soft_mask(select: Select | None = None) -> Behind:
    """Soft masking of updates by importance, DAS-style (Ke et al., 2023).

    ``u ← u ⊙ (1 − Î)``. At each task boundary the raw importance I of the finished task
    (``soft_mask_importance=``, e.g. :func:`jaxcl.methods.mas_importance`) is normalised per leaf,
    ``Î_new = |tanh((I − mean I) / std I)|``, and accumulated: ``Î ← max(Î, Î_new)``. Î starts
    at 0 (the first task trains freely). Standing behind the optimizer, the scaling is not undone
    by Adam's normalisation. Memory: 1 parameter-sized buffer (of the selected leaves).
    """

    def init(params: optax.Params) -> SoftMaskState:
        flags = (
            jax.tree.map(lambda _: True, params) if select is None else selection(select, params)
        )
        return SoftMaskState(
            jax.tree.map(lambda p, f: jnp.zeros_like(p) if f else SKIP(), params, flags)
        )

    def update(updates, state: SoftMaskState, params=None, **extra_args):
        del params, extra_args

        def scale(u, m):
            return u if skipped(m) else (u * (1 - m)).astype(u.dtype)

        return jax.tree.map(scale, updates, state.importance), state

    return behind(init, update)


def normalized_importance(importance: jax.Array) -> jax.Array:
    """DAS's normalisation ``|tanh((I − mean I) / std I)|`` of one leaf (std 0 → all zero)."""
    x = importance.astype(jnp.float32)
    std = jnp.std(x)
    return jnp.abs(jnp.tanh((x - jnp.mean(x)) / jnp.where(std > 0, std, 1.0)))


def _refresh_soft_mask(state: SoftMaskState, *, params, soft_mask_importance, **_) -> SoftMaskState:
    del params

    def acc(m, i):
        return m if skipped(m) else jnp.maximum(m, normalized_importance(i).astype(m.dtype))

    return SoftMaskState(jax.tree.map(acc, state.importance, soft_mask_importance, is_leaf=is_skip))


register_consolidator(
    SoftMaskState, "soft_mask", _refresh_soft_mask, requires=("soft_mask_importance",)
)


class SoftMaskSpec(MethodSpecBase):
    name: Literal["soft_mask"]
    position: ClassVar[Position] = "behind"
    describes_weights: ClassVar[bool] = True
    importance_batches: int = Field(8, ge=1, description="batches of the task for importance")
    include: str | None = Field(None, description="regex of the leaves to mask (all)")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return soft_mask(self.include)

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        batches = ctx.batches(self.importance_batches)
        imp = mas_importance(output_fn(ctx), ctx.trainable(carry), batches)
        return {"soft_mask_importance": imp}
