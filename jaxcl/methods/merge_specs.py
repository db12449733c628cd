"""The recipe methods ``ties`` and ``dare``: merges of one stage's per-task fine-tunes.

Every task trains from the stage's start θ_b; each task's end weights are kept until the stage
ends on their merge (:func:`jaxcl.methods.merge.ties`, :func:`jaxcl.methods.merge.dare`), as
``task_arithmetic`` does. Row t of R scores the merge of the tasks seen so far.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import jax.numpy as jnp
from pydantic import Field

from jaxcl.methods.merge import Consensus, dare, ties
from jaxcl.methods.protocol import Carry, Context, EvalView, Hook, MethodSpecBase, copy_tree
from jaxcl.methods.weights import (
    checked,
    full_weights_only,
    is_last_task,
    replace_carry,
    store_stage_start,
)


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

    @functools.cached_property
    def _last(self) -> list[Any]:
        """The view's last answer ``[params, frozen, merged]`` (empty when none): the one
        merged tree scored for every task of a row of R, dropped at the next ``task_start`` or
        ``merge`` (so no merged tree lives through a task's training)."""
        return []

    def hooks(self) -> list[Hook]:
        def start(ctx: Context, carry: Carry) -> Carry:
            self._last.clear()
            carry = store_stage_start(ctx, carry)
            if ctx.task.index == 0 and self._open() not in carry.frozen:
                carry = replace_carry(carry, **{self._open(): jnp.zeros((), jnp.int32)})
            return carry

        return [
            Hook("task_start", checked(full_weights_only(self.name), start), self.name),
            Hook("merge", self._merge, self.name),
        ]

    def _merge(self, ctx: Context, carry: Carry) -> Carry:
        self._last.clear()
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
        last = self._last

        def view(params: Any, carry: Carry, i: int) -> Any:
            f = carry.frozen
            if self._open() not in f:  # before the stage, or merged already
                last.clear()
                return params
            if last and last[0] is params and last[1] is f:  # the same row of R
                return last[2]
            last.clear()  # the old merge freed before the new one is made
            out = self.merged(f["stage_start"], [*self._kept(f), params])
            last[:] = [params, f, out]
            return out

        return view


class TiesSpec(_TaskModelsSpec):
    """TIES-Merging (Yadav et al., 2023) of the stage's per-task fine-tunes at its end:
    ``θ_b + λ τ_m``, τ_m the disjoint mean of the trimmed, sign-elected task vectors
    ``τ_t = θ_t − θ_b``. Memory: θ_b plus one P (parameters' dtype) per finished task; while a
    row of R is scored, one merged P; while merging (``scope: model``), one float32 P of one
    task's magnitudes."""

    name: Literal["ties"]
    density: float = Field(0.2, gt=0, le=1, description="share of each τ_t kept (paper: 0.2)")
    lam: float = Field(1.0, ge=0, description="λ in θ_b + λ τ_m (paper: 1, or tuned)")
    consensus: Consensus = Field("sum", description="sign election: sum (the paper's) or count")
    normalize: bool = Field(True, description="disjoint mean (true) or sum (false)")
    scope: Literal["model", "leaf"] = Field(
        "model", description="trim each whole task vector (the paper's) or each tensor (mergekit)"
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
    task's index), combined by task arithmetic (``linear``) or TIES' sign election (``ties``;
    mergekit's ``dare_ties``: no magnitude trim). Memory: θ_b plus one P per finished task;
    while a row of R is scored, one merged P."""

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

__all__ = ["MERGE_SPECS", "DareSpec", "TiesSpec"]
