"""The base optimizer and the chain a stage trains with."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.methods.compose import chain as jaxcl_chain
from jaxcl.methods.specs import CompiledMethods, compile_methods
from jaxcl.recipe import OptimizerSpec


def lr_schedule(
    spec: OptimizerSpec, total_steps: int, task_steps: int | None = None
) -> optax.Schedule:
    """Linear warm-up to ``lr``, then constant, cosine or linear decay to ``lr·end_lr_factor``,
    over the stage's ``total_steps``; with ``rewarm: task`` the same shape restarts at every
    task start (each ``task_steps`` steps), re-warming the rate for each new task."""
    period = task_steps if spec.rewarm == "task" and task_steps else total_steps
    warmup = min(spec.warmup_steps, max(period - 1, 0))
    end = spec.lr * spec.end_lr_factor
    decay_steps = max(period - warmup, 1)
    if spec.schedule == "constant":
        after = optax.constant_schedule(spec.lr)
    elif spec.schedule == "cosine":
        after = optax.cosine_decay_schedule(spec.lr, decay_steps, alpha=spec.end_lr_factor)
    else:
        after = optax.linear_schedule(spec.lr, end, decay_steps)
    shape = after
    if warmup:
        ramp = optax.linear_schedule(spec.lr / max(warmup, 1), spec.lr, warmup)
        shape = optax.join_schedules([ramp, after], [warmup])
    if period == total_steps:
        return shape
    return lambda count: shape(count % period)


def task_schedule(tasks: Sequence[tuple[OptimizerSpec, int]]) -> optax.Schedule:
    """The stage's rate over tasks of their own length and optimizer: task ``t`` (``spec_t``,
    ``S_t`` steps) owns steps ``[Σ_{s<t} S_s, Σ_{s≤t} S_s)``. When every task shares one
    optimizer with ``rewarm: stage``, one shape spans the stage (:func:`lr_schedule`); otherwise
    each task runs its own warm-up and decay over its ``S_t`` steps, from its own ``lr``."""
    specs = [spec for spec, _ in tasks]
    steps = [n for _, n in tasks]
    total = sum(steps)
    if all(s == specs[0] for s in specs) and specs[0].rewarm == "stage":
        return lr_schedule(specs[0], total)
    if all(s == specs[0] for s in specs) and len(set(steps)) == 1:
        return lr_schedule(specs[0], total, steps[0])
    shapes = [lr_schedule(spec.model_copy(update={"rewarm": "stage"}), n) for spec, n in tasks]
    return optax.join_schedules(shapes, list(np.cumsum(steps)[:-1]))


def build_chain(
    spec: OptimizerSpec,
    total_steps: int,
    methods: list,
    task_steps: int | None = None,
    *,
    schedule: optax.Schedule | None = None,
) -> tuple[optax.GradientTransformationExtraArgs, CompiledMethods]:
    """``chain(*front methods, clip_by_global_norm, adamw, *behind methods)``.

    Front methods (regularizers, projections) see the raw gradient and add or project their terms;
    clipping and AdamW act on the result (at ``schedule``, default :func:`lr_schedule`); behind
    methods (masks: freeze, PackNet, soft masks)
    zero or scale the final update, weight decay included. Returns the chain and what the method
    list compiled to (memory needs).
    """
    if schedule is None:
        schedule = lr_schedule(spec, total_steps, task_steps)
    compiled = compile_methods(methods, learning_rate=schedule, weight_decay=spec.weight_decay)
    parts = list(compiled.front)
    if spec.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(spec.clip_norm))
    parts.append(optax.adamw(schedule, b1=spec.b1, b2=spec.b2, weight_decay=spec.weight_decay))
    parts.extend(compiled.behind)
    return jaxcl_chain(*parts), compiled


def restart_moments(opt_state: optax.OptState) -> optax.OptState:
    """AdamW's first and second moments and its bias-correction count back to zero, as in a
    freshly built optimizer; everything else (the learning-rate schedule's position, every CL
    method's state) is kept. The next update is then ``-lr_t · g / (|g| + eps)`` per coordinate
    (plus weight decay), Adam's first step."""

    def fresh(state):
        if not isinstance(state, optax.ScaleByAdamState):
            return state
        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
        return optax.ScaleByAdamState(jnp.zeros_like(state.count), zeros(state.mu), zeros(state.nu))

    return jax.tree.map(fresh, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
