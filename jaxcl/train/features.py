"""Hooks that a stage's own features declare, beside its methods' (:mod:`jaxcl.methods.protocol`).

A stage contributes three kinds of boundary work that belong to no method: its objective's
frozen trees (the parameters at each task start, for distillation-style terms; the reference a
preference objective compares against), its LoRA adapters (folded into the base and drawn anew
at every task boundary with ``lora.per_task``) and its optimizer's moments (restarted at every
task boundary with ``optimizer.moments: task``). They are declared here as ordinary hooks, so the
stage loop runs them as it runs a method's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxcl.methods.protocol import Carry, Context, Hook, copy_tree, with_state
from jaxcl.objectives.bound import Objective
from jaxcl.train.optim import restart_moments


def objective_hooks(objective: Objective) -> list[Hook]:
    """A frozen copy of the parameters at every task start, when a term reads one."""
    if "task_start" not in objective.frozen + objective.precompute:
        return []

    def keep_task_start(ctx: Context, carry: Carry) -> Carry:
        return carry._replace(frozen={**carry.frozen, "task_start": copy_tree(carry.state.params)})

    return [Hook("task_start", keep_task_start, "objective: task-start copy")]


def initial_frozen(
    objective: Objective, params: Any, restore: Callable[[str], Any]
) -> dict[str, Any]:
    """The frozen trees a stage starts with: its reference (the parameters the stage starts
    from, or the checkpoint the recipe names, read by ``restore``) when a term reads one."""
    if "reference" not in objective.frozen + objective.precompute:
        return {}
    source = objective.reference_checkpoint
    return {"reference": restore(source) if source else copy_tree(params)}


def adapter_hooks(model: Any) -> list[Hook]:
    """``lora.per_task``: the finished adapter folded into W and the next one drawn."""
    if model.lora is None or not model.lora.per_task:
        return []

    def renew_adapter(ctx: Context, carry: Carry) -> Carry:
        return with_state(carry, params=model.renew(carry.state.params, ctx.task.index + 1))

    return [Hook("fold", renew_adapter, "lora: per-task adapter")]


def optimizer_hooks(moments: str) -> list[Hook]:
    """``optimizer.moments: task``: AdamW's moments and bias correction restart per task."""
    if moments != "task":
        return []

    def restart(ctx: Context, carry: Carry) -> Carry:
        return with_state(carry, opt_state=restart_moments(carry.state.opt_state))

    return [Hook("renew", restart, "optimizer: moments per task")]
