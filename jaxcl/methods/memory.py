"""Replay as a recipe method: a memory of finished tasks' examples mixed into later batches.

The data side lives in :mod:`jaxcl.data.replay` (the reservoir buffer, InsCL quotas, the mixing
op); this module declares what the stage loop does with it: a buffer per stage, the finished
task's examples remembered at its end (phase ``memory``) and, for InsCL, the quotas re-split for
each new task (phase ``task_start``). A-GEM's episodic memory uses the same ``memory`` hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from jaxcl.data.replay import RatioScheduleSpec, ReplayBuffer
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase


def remember_task(ctx: Context, carry: Carry) -> Carry:
    """Phase ``memory``: the finished task's own examples go into the memory."""
    task = ctx.task
    carry.buffer.add_task(task.name, list(task.examples), instructions=list(task.instructions))
    return carry


def _inscl_upcoming(ctx: Context, carry: Carry) -> Carry:
    """Phase ``task_start``: InsCL re-splits the capacity by dissimilarity to the new task."""
    if len(carry.buffer):
        carry.buffer.set_upcoming(list(ctx.task.instructions))
    return carry


class ReplaySpec(MethodSpecBase):
    """Experience replay as a data op: a reservoir buffer of finished tasks' examples
    (:class:`jaxcl.data.replay.ReplayBuffer`) mixed into each later task's batches."""

    name: Literal["replay"]
    ratio: float = Field(0.2, ge=0, le=1, description="fraction of each batch replayed")
    capacity: int = Field(512, ge=1, description="examples kept across all finished tasks")
    quota: Literal["equal", "proportional", "inscl"] = Field(
        "equal", description="how the capacity is shared between tasks"
    )
    schedule: RatioScheduleSpec | None = Field(
        None, description="the ratio over each task's steps (replaces ratio)"
    )

    def replay_ratio(self) -> float | Callable[[int], float]:
        return self.schedule.build() if self.schedule else self.ratio

    def new_memory(self, *, seed: int, n_tasks: int) -> Any:
        return ReplayBuffer(self.capacity, quota=self.quota, seed=seed)

    def hooks(self) -> list[Hook]:
        hooks = [Hook("memory", remember_task, "replay")]
        if self.quota == "inscl":
            hooks.insert(0, Hook("task_start", _inscl_upcoming, "replay (inscl)"))
        return hooks
