"""What stops or records a task's steps: a loss that is not finite, a gradient that stays zero,
a bad row of the stream (each naming the stage, task, step and the last good checkpoint), and
the counts of what a task's stream read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcl import parallel
from jaxcl.data.sources import BadRowError
from jaxcl.recipe import StageSpec
from jaxcl.train.data import DataError, TaskData


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class TrainingStalled(TrainingDiverged):
    """The gradient norm stayed zero for ``stall_steps`` steps; the message names the step."""


def read_batch(stream, stage: StageSpec, task: TaskData, parent: str | None):
    """The stream's next batch; a bad row (``on_bad_row: error``) stops the run naming the
    stage, task, file and line, and the last good checkpoint."""
    try:
        return stream.next_batch()
    except BadRowError as err:
        raise DataError(
            f"stage {stage.name!r}, task {task.name!r}: {err}. The run stopped there; last good "
            f"checkpoint: {parent or 'none'} (fix the row, or set the task's "
            "data.on_bad_row: skip)"
        ) from None


def data_record(stream) -> dict[str, Any]:
    """What a task's stream read, for results.json and the report."""
    state = stream.state()
    keys = ("rows", "tokens", "replayed", "skipped", "truncated", "bad_rows")
    return {k: state[k] for k in keys}


def unmasked(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` with every loss mask zeroed: every objective's gradient on it is zero."""
    return {k: np.zeros_like(v) if k.endswith("mask") else v for k, v in batch.items()}


#: a loss within this fraction of ln V counts as stuck at the uniform prediction
UNIFORM_RTOL = 1e-3


class StepWatch:
    """Checks each step's metrics one step behind (no stall of the device queue): a loss that
    is not finite stops the run at once; ``stall`` consecutive steps without signal stop it
    too: a gradient norm of exactly zero (every trained token masked away, or a model driven
    into saturation), or a loss stuck at the uniform prediction's ``ln V`` (within
    :data:`UNIFORM_RTOL`; ``uniform`` = ``ln V`` for token losses, ``None`` for objectives
    whose loss is on another scale, e.g. DPO's). Each step is judged once, however often it
    is asked."""

    def __init__(
        self,
        stage: StageSpec,
        task: TaskData,
        parent: Callable[[], str | None],
        stall: int,
        uniform: float | None = None,
    ):
        # parent: the last good checkpoint when asked (a mid-task save moves it on)
        self.stage, self.task, self.parent, self.stall = stage, task, parent, stall
        self.uniform = uniform
        self.stuck_steps, self.seen = 0, -1

    def _stuck(self, loss: float, grad_norm: float) -> str | None:
        if grad_norm == 0.0:
            return "the gradient norm has been 0"
        if self.uniform is not None and abs(loss - self.uniform) <= UNIFORM_RTOL * self.uniform:
            return f"the loss has stayed at ln V = {self.uniform:.4f} (a uniform prediction)"
        return None

    def __call__(self, pending) -> None:
        if pending is None or pending[0] == self.seen:
            return
        k, metrics = pending
        self.seen = k
        where = f"stage {self.stage.name!r}, task {self.task.name!r}, step {k + 1} of the task"
        loss = float(parallel.to_host(metrics["loss"]))
        if not np.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at {where}; the run stopped there. "
                f"Last good checkpoint: {self.parent() or 'none'}"
            )
        if not self.stall:
            return
        stuck = self._stuck(loss, float(parallel.to_host(metrics["grad_norm"])))
        self.stuck_steps = self.stuck_steps + 1 if stuck else 0
        if self.stuck_steps >= self.stall:
            raise TrainingStalled(
                f"{stuck} for {self.stuck_steps} consecutive steps at {where} (loss "
                f"{loss:.4f}): training has no signal (rows with no trained token, or a "
                "learning rate that saturated the model). The run stopped there. Last good "
                f"checkpoint: {self.parent() or 'none'} (stall_steps: 0 turns the check off)"
            )
