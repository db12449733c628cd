"""Weight-space methods: pure functions on parameter trees, and the recipe methods built on them.

Functions: :func:`interpolate`, :func:`average` (model averaging), :func:`ema` and
:func:`elastic_reset` (Noukhovitch et al., 2023), :func:`task_vector` and :func:`task_arithmetic`
(Ilharco et al., 2023). Each works leaf by leaf in float32 and returns every leaf in its own dtype
(HMA, per-layer-group averaging, is in :mod:`jaxcl.methods.hma`).

Recipe methods (:mod:`jaxcl.methods.protocol` hooks): ``ema`` and ``elastic_reset`` update an EMA
after every step (kept in float32 in ``carry.frozen``); ``average``, ``task_arithmetic`` (and
:mod:`~jaxcl.methods.hma`) merge in the ``merge`` phase, and their eval view scores each task
with the weights that merge will produce (the R matrix is scored before ``merge`` runs). A view
is the identity once its merge has run (the method's pending state is dropped), so scoring a
saved checkpoint does not merge twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods.protocol import Carry, Context, EvalView, Hook, MethodSpecBase, copy_tree

F32 = jnp.float32


def interpolate(a: optax.Params, b: optax.Params, alpha: float | jax.Array) -> optax.Params:
    """``(1 − α) a + α b`` (α = 0 gives ``a``, α = 1 gives ``b``), in float32."""
    return jax.tree.map(
        lambda x, y: ((1 - alpha) * x.astype(F32) + alpha * y.astype(F32)).astype(x.dtype), a, b
    )


def average(trees: Sequence[optax.Params], weights: Sequence[float] | None = None) -> optax.Params:
    """Weighted model average ``Σ_i w_i θ_i / Σ_i w_i`` (uniform when ``weights`` is None)."""
    if not trees:
        raise ValueError("average: no parameter trees given")
    w = jnp.ones(len(trees)) if weights is None else jnp.asarray(weights, F32)
    if w.shape != (len(trees),):
        raise ValueError(f"average: {len(trees)} trees but {w.shape[0]} weights")
    w = w / jnp.sum(w)
    return jax.tree.map(
        lambda *xs: sum(wi * x.astype(F32) for wi, x in zip(w, xs)).astype(xs[0].dtype),
        *trees,
    )


def ema(ema_params: optax.Params, params: optax.Params, decay: float) -> optax.Params:
    """One EMA step: ``θ̄ ← decay · θ̄ + (1 − decay) · θ``."""
    return interpolate(ema_params, params, 1.0 - decay)


def elastic_reset(
    params: optax.Params, ema_params: optax.Params, init_params: optax.Params
) -> tuple[optax.Params, optax.Params]:
    """Elastic reset: the online model restarts from its EMA and the EMA from the initial model,
    ``(θ, θ̄) ← (θ̄, θ_0)``. Returns ``(params, ema_params)``."""
    del params
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
    return copy(ema_params), copy(init_params)


def task_vector(finetuned: optax.Params, base: optax.Params) -> optax.Params:
    """``τ = θ_ft − θ_base``."""
    return jax.tree.map(lambda f, b: f - b, finetuned, base)


def task_arithmetic(
    base: optax.Params,
    finetuned: Sequence[optax.Params],
    scales: float | Sequence[float] = 1.0,
) -> optax.Params:
    """Task-arithmetic merge ``θ = θ_base + Σ_i λ_i (θ_i − θ_base)`` (one λ, or one per model)."""
    lams = [scales] * len(finetuned) if isinstance(scales, int | float) else list(scales)
    if len(lams) != len(finetuned):
        raise ValueError(f"task_arithmetic: {len(finetuned)} models but {len(lams)} scales")

    def merge(b, *fs):
        out = b.astype(F32)
        for lam, f in zip(lams, fs):
            out = out + lam * (f.astype(F32) - b.astype(F32))
        return out.astype(b.dtype)

    return jax.tree.map(merge, base, *finetuned)


# ----------------------------------------------------------------------------- tree helpers


def overlay(full: Any, part: Any) -> Any:
    """``full`` with the leaves of ``part`` (a sub-tree of nested mappings, e.g. a LoRA stage's
    trainable adapters) put in place, each cast to the dtype of the leaf it replaces."""
    if isinstance(full, Mapping) and isinstance(part, Mapping):
        return {k: overlay(v, part[k]) if k in part else v for k, v in full.items()}
    return jnp.asarray(part).astype(full.dtype)


def _to_f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, F32), tree)


def is_last_task(ctx: Context) -> bool:
    if not ctx.task.names:
        raise ValueError("weight-space methods need ctx.task.names (every task of the stage)")
    return ctx.task.index == len(ctx.task.names) - 1


def full_weights_only(method: str) -> Callable[[Context, Carry], None]:
    """A check for merges: on a LoRA stage the trained tree is the adapters (A, B), whose linear
    merge is not the merge of the effective weights ``W + A B``: refused."""

    def check(ctx: Context, carry: Carry) -> None:
        if jax.tree.leaves(ctx.split(carry.state.params)[1]):
            raise ValueError(
                f"method {method!r} merges the full weights; this stage trains LoRA adapters "
                "(a linear merge of A and B is not one of W + A·B): drop `lora` or the method"
            )

    return check


def checked(check: Callable[[Context, Carry], None], fn=None) -> Callable[[Context, Carry], Carry]:
    """``fn`` (or nothing) after ``check`` (which raises to refuse)."""

    def run(ctx: Context, carry: Carry) -> Carry:
        check(ctx, carry)
        return fn(ctx, carry) if fn else carry

    return run


def store_stage_start(ctx: Context, carry: Carry) -> Carry:
    """``frozen["stage_start"]``: the stage's initial parameters (stored once, at task 0)."""
    if ctx.task.index == 0 and "stage_start" not in carry.frozen:
        return carry._replace(frozen={**carry.frozen, "stage_start": copy_tree(carry.state.params)})
    return carry


def replace_carry(
    carry: Carry, params: Any = None, drop: Sequence[str] = (), **frozen: Any
) -> Carry:
    """The carry with new params (if given), ``frozen`` entries set and ``drop`` removed."""
    new = {k: v for k, v in {**carry.frozen, **frozen}.items() if k not in drop}
    carry = carry._replace(frozen=new)
    if params is not None:
        carry = carry._replace(state=carry.state._replace(params=params))
    return carry


# ----------------------------------------------------------------------------- EMA, elastic reset


@jax.jit
def _ema_step(avg: Any, trainable: Any, decay: jax.Array) -> Any:
    """``θ̄ ← d θ̄ + (1 − d) θ`` with θ̄ in float32."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p.astype(F32), avg, trainable)


@jax.jit
def _elastic_step(
    trainable: Any, avg: Any, init: Any, step: jax.Array, decay: jax.Array, every: jax.Array
) -> tuple[Any, Any]:
    """The EMA step, then, after every ``every``-th step of the stage (``every`` 0: never), the
    reset ``(θ, θ̄) ← (θ̄, θ_0)``; on device, so the host never waits for the step counter."""
    avg = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p.astype(F32), avg, trainable)
    due = (every > 0) & (step % jnp.maximum(every, 1) == 0)

    def reset(_):
        return jax.tree.map(lambda e, p: e.astype(p.dtype), avg, trainable), _to_f32(init)

    return jax.lax.cond(due, reset, lambda _: (trainable, avg), None)


def _init_average(key: str, init_key: str | None = None) -> Callable[[Context, Carry], Carry]:
    """Phase ``task_start``: the EMA (and the initial tree) start at the stage's first trainable
    weights (under LoRA only the adapters)."""

    def fn(ctx: Context, carry: Carry) -> Carry:
        if key in carry.frozen:
            return carry
        trainable = ctx.trainable(carry)
        extra = {init_key: copy_tree(trainable)} if init_key else {}
        return replace_carry(carry, **{key: _to_f32(copy_tree(trainable))}, **extra)

    return fn


def _ema_hook(key: str, decay: float) -> Callable[[Context, Carry], Carry]:
    def fn(ctx: Context, carry: Carry) -> Carry:
        return replace_carry(
            carry, **{key: _ema_step(carry.frozen[key], ctx.trainable(carry), decay)}
        )

    return fn


def _export(key: str) -> Callable[[Context, Carry], Carry]:
    """Phase ``merge`` of the stage's last task: the exported (checkpointed, next stage's) model
    is the EMA."""

    def fn(ctx: Context, carry: Carry) -> Carry:
        if not is_last_task(ctx):
            return carry
        return replace_carry(
            carry, params=copy_tree(overlay(carry.state.params, carry.frozen[key]))
        )

    return fn


def _ema_view(key: str) -> EvalView:
    def view(params: Any, carry: Carry, i: int) -> Any:
        return overlay(params, carry.frozen[key]) if key in carry.frozen else params

    return view


class EmaSpec(MethodSpecBase):
    """An exponential moving average of the trained weights, updated after every step:
    ``θ̄ ← d θ̄ + (1 − d) θ`` from ``θ̄ = θ_0`` (the stage's start) over the whole stage, kept in
    float32 in ``frozen["ema"]`` (LoRA stage: the adapters' EMA). Training runs on θ; the R matrix
    scores θ̄ (``evaluate``) and the stage ends on θ̄ (``export``)."""

    name: Literal["ema"]
    describes_weights: ClassVar[bool] = True
    decay: float = Field(0.999, gt=0, lt=1, description="d in θ̄ ← d θ̄ + (1 − d) θ")
    evaluate: Literal["ema", "online"] = Field(
        "ema", description="the weights each task is scored with"
    )
    export: Literal["ema", "online"] = Field(
        "ema", description="the weights the stage ends with (checkpoint, next stage, export)"
    )

    def hooks(self) -> list[Hook]:
        hooks = [
            Hook("task_start", _init_average("ema"), "ema (init)"),
            Hook("step", _ema_hook("ema", self.decay), "ema"),
        ]
        if self.export == "ema":
            hooks.append(Hook("merge", _export("ema"), "ema (export)"))
        return hooks

    def eval_view(self) -> EvalView | None:
        return _ema_view("ema") if self.evaluate == "ema" else None


def _elastic_hook(decay: float, every: int) -> Callable[[Context, Carry], Carry]:
    def fn(ctx: Context, carry: Carry) -> Carry:
        trainable, fixed = ctx.split(carry.state.params)
        f = carry.frozen
        new, avg = _elastic_step(
            trainable, f["elastic_ema"], f["elastic_init"], carry.state.step, decay, every
        )
        return replace_carry(carry, params=ctx.join(new, fixed), elastic_ema=avg)

    return fn


class ElasticResetSpec(MethodSpecBase):
    """Elastic Reset (Noukhovitch et al., 2023): an EMA θ̄ ← d θ̄ + (1 − d) θ after every step and,
    after every ``every``-th step of the stage, ``θ ← θ̄`` then ``θ̄ ← θ_0`` (θ_0: the stage's
    initial trainable weights, ``frozen["elastic_init"]``; the EMA in ``frozen["elastic_ema"]``).
    The optimizer state is kept across resets, as in the reference code. Scored and exported:
    the online model θ (the paper's), or θ̄."""

    name: Literal["elastic_reset"]
    describes_weights: ClassVar[bool] = True
    decay: float = Field(0.995, gt=0, lt=1, description="EMA decay (reference StackLLaMA: 0.995)")
    every: int | None = Field(
        260,
        ge=1,
        description="reset after every n-th step of the stage (reference: 260); None: never",
    )
    at_task_end: bool = Field(False, description="also reset after each task's last step")
    evaluate: Literal["online", "ema"] = Field(
        "online", description="the weights tasks are scored with"
    )
    export: Literal["online", "ema"] = Field(
        "online", description="the weights the stage ends with"
    )

    def hooks(self) -> list[Hook]:
        hooks = [
            Hook(
                "task_start", _init_average("elastic_ema", "elastic_init"), "elastic_reset (init)"
            ),
            Hook("step", _elastic_hook(self.decay, self.every or 0), "elastic_reset"),
        ]
        if self.at_task_end:  # the last step: its EMA update, then a reset in any case
            hooks[1] = Hook("step", hooks[1].fn, "elastic_reset", when=lambda k, n: k < n - 1)
            last = lambda k, n: k == n - 1  # noqa: E731
            hooks.append(
                Hook("step", _elastic_hook(self.decay, 1), "elastic_reset (end)", when=last)
            )
        if self.export == "ema":
            hooks.append(Hook("merge", _export("elastic_ema"), "elastic_reset (export)"))
        return hooks

    def eval_view(self) -> EvalView | None:
        return _ema_view("elastic_ema") if self.evaluate == "ema" else None


# ----------------------------------------------------------------------------- model averaging


def _running(mean: Any, params: Any, count: jax.Array) -> Any:
    """``m_t = m_{t−1} + (θ_t − m_{t−1}) / t`` with ``t = count + 1`` (float32)."""
    t = jnp.asarray(count, F32) + 1
    return jax.tree.map(lambda m, p: m + (p.astype(F32) - m) / t, mean, params)


class AverageSpec(MethodSpecBase):
    """Model averaging at each task's end (``merge`` phase), on the full weights; training of the
    next task continues from the merged weights.

    * ``interpolate``: ``θ ← (1 − α) θ_start + α θ``, θ_start the task's initial weights (its
      copy ``frozen["average_anchor"]`` lives from the task's start to its merge): WiSE-FT's
      interpolation (Wortsman et al., 2022) at every task's end, which is also task arithmetic
      run "from the previous merge" with each task's own delta as τ (α = λ).
    * ``slerp``: ``θ ← slerp(θ_start, θ; α)`` per (per-layer) leaf, spherical interpolation
      (Shoemake, 1985) between the task's start and end weights on the angle of the flattened
      leaf, linear where the two are nearly colinear (:func:`jaxcl.methods.merge.slerp`, as
      mergekit's ``slerp``).
    * ``running``: ``θ ← (1/t) Σ_{j ≤ t} θ_j``, the uniform average of the task-end weights
      θ_j (each trained from the previous average): ``m_t = m_{t−1} + (θ_t − m_{t−1})/t`` in
      ``frozen["average_mean"]`` (float32), t in ``frozen["average_count"]``.
    """

    needs_full_weights: ClassVar[bool] = True

    name: Literal["average"]
    describes_weights: ClassVar[bool] = True
    mode: Literal["interpolate", "slerp", "running"] = "interpolate"
    alpha: float = Field(
        0.5, ge=0, le=1, description="interpolate, slerp: weight of the task's trained weights"
    )

    def hooks(self) -> list[Hook]:
        check = full_weights_only(self.name)
        if self.mode == "running":
            return [
                Hook("task_start", checked(check), "average"),
                Hook("merge", self._merge, "average"),
            ]

        def anchor(ctx: Context, carry: Carry) -> Carry:
            if "average_anchor" in carry.frozen:  # resumed mid-task: the task's own start
                return carry
            return replace_carry(carry, average_anchor=copy_tree(carry.state.params))

        return [
            Hook("task_start", checked(check, anchor), "average (anchor)"),
            Hook("merge", self._merge, "average"),
        ]

    def _merged(self, params: Any, frozen: dict[str, Any]) -> Any:
        if self.mode != "running":
            if "average_anchor" not in frozen:
                return params
            if self.mode == "slerp":
                from jaxcl.methods.merge import slerp  # merge imports this module

                return slerp(frozen["average_anchor"], params, self.alpha)
            return interpolate(frozen["average_anchor"], params, self.alpha)
        if "average_mean" not in frozen:
            return params  # t = 1: the average of one model
        mean = _running(frozen["average_mean"], params, frozen["average_count"])
        return jax.tree.map(lambda m, p: m.astype(p.dtype), mean, params)

    def _merge(self, ctx: Context, carry: Carry) -> Carry:
        params, f = carry.state.params, carry.frozen
        if self.mode != "running":
            return replace_carry(carry, params=self._merged(params, f), drop=("average_anchor",))
        count = f.get("average_count", jnp.zeros((), jnp.int32))
        mean = (
            _running(f["average_mean"], params, count)
            if "average_mean" in f
            else _to_f32(copy_tree(params))
        )
        merged = copy_tree(jax.tree.map(lambda m, p: m.astype(p.dtype), mean, params))
        return replace_carry(carry, params=merged, average_mean=mean, average_count=count + 1)

    def eval_view(self) -> EvalView | None:
        return lambda params, carry, i: self._merged(params, carry.frozen)


# ----------------------------------------------------------------------------- task arithmetic


class TaskArithmeticSpec(MethodSpecBase):
    """Task arithmetic (Ilharco et al., 2023) as a stage: every task is fine-tuned from the same
    base θ_b (the stage's start, ``frozen["stage_start"]``), as the paper's task vectors are;
    at each task's end its vector ``τ_t = θ_t − θ_b`` joins ``S = Σ τ`` (float32,
    ``frozen["task_arithmetic_sum"]``) and the weights go back to θ_b; after the last task the
    stage ends on ``θ_b + λ S``. Task ``i`` is scored at row t with ``θ_b + λ Σ_{j ≤ t} τ_j``, the
    merge of the tasks seen so far. (Training each task from the previous merge instead, with its
    own delta as τ, is ``average`` with ``mode: interpolate`` and α = λ.)"""

    needs_full_weights: ClassVar[bool] = True

    name: Literal["task_arithmetic"]
    describes_weights: ClassVar[bool] = True
    lam: float = Field(
        0.4, ge=0, description="λ in θ_b + λ Σ τ_t (the paper picks it on held-out data)"
    )

    def hooks(self) -> list[Hook]:
        def start(ctx: Context, carry: Carry) -> Carry:
            carry = store_stage_start(ctx, carry)
            if ctx.task.index == 0 and "task_arithmetic_sum" not in carry.frozen:
                zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, F32), carry.state.params)
                carry = replace_carry(carry, task_arithmetic_sum=zeros)
            return carry

        return [
            Hook("task_start", checked(full_weights_only(self.name), start), "task_arithmetic"),
            Hook("merge", self._merge, "task_arithmetic"),
        ]

    def _merged(self, params: Any, base: Any, total: Any) -> Any:
        return jax.tree.map(
            lambda b, s, p: (b.astype(F32) + self.lam * (s + p.astype(F32) - b)).astype(p.dtype),
            base,
            total,
            params,
        )

    def _merge(self, ctx: Context, carry: Carry) -> Carry:
        params, base = carry.state.params, carry.frozen["stage_start"]
        if is_last_task(ctx):
            merged = self._merged(params, base, carry.frozen["task_arithmetic_sum"])
            return replace_carry(carry, params=merged, drop=("task_arithmetic_sum",))
        total = jax.tree.map(
            lambda s, p, b: s + p.astype(F32) - b.astype(F32),
            carry.frozen["task_arithmetic_sum"],
            params,
            base,
        )
        return replace_carry(carry, params=copy_tree(base), task_arithmetic_sum=total)

    def eval_view(self) -> EvalView | None:
        def view(params: Any, carry: Carry, i: int) -> Any:
            f = carry.frozen
            if "task_arithmetic_sum" not in f:
                return params
            return self._merged(params, f["stage_start"], f["task_arithmetic_sum"])

        return view


WEIGHT_SPECS: tuple[type[MethodSpecBase], ...] = (
    EmaSpec,
    ElasticResetSpec,
    AverageSpec,
    TaskArithmeticSpec,
)
