"""The base optimizer and the chain a stage trains with."""

from __future__ import annotations

import optax

from jaxcl.recipe import OptimizerSpec


def lr_schedule(spec: OptimizerSpec, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr``, then constant, cosine or linear decay to ``lr·end_lr_factor``."""
    warmup = min(spec.warmup_steps, max(total_steps - 1, 0))
    end = spec.lr * spec.end_lr_factor
    decay_steps = max(total_steps - warmup, 1)
    if spec.schedule == "constant":
        after = optax.constant_schedule(spec.lr)
    elif spec.schedule == "cosine":
        after = optax.cosine_decay_schedule(spec.lr, decay_steps, alpha=spec.end_lr_factor)
    else:
        after = optax.linear_schedule(spec.lr, end, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(spec.lr / max(warmup, 1), spec.lr, warmup), after], [warmup]
    )


def build_chain(
    spec: OptimizerSpec,
    total_steps: int,
    methods: list[optax.GradientTransformationExtraArgs],
) -> optax.GradientTransformationExtraArgs:
    """``chain(*methods, clip_by_global_norm, adamw)``: CL transforms see the raw gradient and add
    their terms; clipping and AdamW then act on the sum."""
    parts = list(methods)
    if spec.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(spec.clip_norm))
    parts.append(
        optax.adamw(
            lr_schedule(spec, total_steps),
            b1=spec.b1,
            b2=spec.b2,
            weight_decay=spec.weight_decay,
        )
    )
    return optax.chain(*parts)
