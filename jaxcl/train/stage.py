"""One stage: train each task, score every task after it, consolidate, checkpoint.

The stage's chain, objective and train step are compiled once. Its loop can start anywhere: a
:class:`Cursor` restored from a checkpoint says which task and step come next and carries the
state, the frozen trees and the partial results, so a killed run continues exactly where its
last checkpoint stands (batch ``k`` of a task is a pure function of the seed and ``k``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jaxcl import checkpoint, parallel
from jaxcl.data import batched_stream, encode_all, eval_batches
from jaxcl.eval import HIGHER_IS_BETTER, cl_metrics, score_task
from jaxcl.methods import consolidate
from jaxcl.methods.specs import Boundary
from jaxcl.objectives.spec import stage_objective
from jaxcl.recipe import StageSpec
from jaxcl.train.optim import build_chain
from jaxcl.train.step import TrainState, make_train_step, state_shardings_for


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TaskData:
    name: str
    train: list[dict[str, np.ndarray]]
    eval: list[dict[str, np.ndarray]]


@dataclass
class Cursor:
    """Where a stage (re)starts: the next task and step, and everything accumulated so far."""

    task: int = 0
    task_step: int = 0
    state: TrainState | None = None
    frozen: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageProgram:
    """Everything compiled once per stage: chain, objective, the jitted step, the state's
    shardings."""

    tx: Any
    objective: Any
    step_fn: Any
    memory_grads: bool
    shardings: Any


def compile_stage(ctx, stage: StageSpec, params, total_steps: int) -> StageProgram:
    transforms = [t for t in (m.transform() for m in stage.methods) if t is not None]
    tx = build_chain(ctx.recipe.stage_optimizer(stage), total_steps, transforms)
    shardings = state_shardings_for(tx, params, ctx.param_shardings, parallel.replicated(ctx.mesh))
    objective = stage_objective(stage.kind, stage.dpo, ctx.apply)
    memory_grads = any(m.needs_memory_grads for m in stage.methods)
    step_fn = make_train_step(
        objective.loss_fn,
        tx,
        state_shardings=shardings,
        batch_sharding=parallel.batch_sharding(ctx.mesh, ctx.rules),
        frozen_shardings={name: ctx.param_shardings for name in objective.frozen},
        memory_grads=memory_grads,
    )
    return StageProgram(tx, objective, step_fn, memory_grads, shardings)


def init_state(program: StageProgram, params) -> TrainState:
    init = jax.jit(
        lambda p: TrainState(np.zeros((), np.int32), p, program.tx.init(p)),
        out_shardings=program.shardings,
    )
    return init(params)


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def task_data(ctx, stage: StageSpec) -> list[TaskData]:
    def encoded(data, split):
        return encode_all(data.load(split), data.kind, ctx.tokenizer, stage.seq_len)

    return [
        TaskData(task.name, encoded(task.data, "train"), encoded(task.data, "eval"))
        for task in stage.tasks
    ]


def _memory_sample(ctx, stage: StageSpec, task: TaskData, keep: int) -> list:
    """The examples of a finished task kept for replay / A-GEM: a seeded, reproducible sample."""
    rng = random.Random(f"{ctx.recipe.seed}/{stage.name}/{task.name}")
    return rng.sample(task.train, min(keep, len(task.train)))


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def run_stage(
    ctx, stage: StageSpec, params, parent: str | None, cursor: Cursor | None = None
) -> tuple[Any, dict]:
    """Train ``stage`` from ``params`` (or from ``cursor``); returns final params and results."""
    recipe = ctx.recipe
    cursor = cursor or Cursor()
    if cursor.state is not None:
        params = cursor.state.params
    tasks = task_data(ctx, stage)
    eval_sets = [
        [ctx.put_batch(b) for b in eval_batches(t.eval, stage.eval_batch_size)] for t in tasks
    ]
    total_steps = stage.steps_per_task * len(tasks)
    program = compile_stage(ctx, stage, params, total_steps)
    score = lambda p: [score_task(ctx.scorer, p, b, stage.metric) for b in eval_sets]  # noqa: E731
    if cursor.state is None:
        cursor.state = init_state(program, params)
        # Frozen trees are separate, never-donated copies: the stage's start is DPO's reference.
        if "reference" in program.objective.frozen:
            cursor.frozen["reference"] = _copy(params)
        cursor.record = {
            "start_params_sha256": checkpoint.params_digest(params),
            "baseline": score(params),
            "R": [],
            "losses": [],
            "seconds": 0.0,
        }
    state, frozen, record = cursor.state, cursor.frozen, cursor.record
    replay = stage.method("replay")
    keep = max((m.memory_per_task for m in stage.methods), default=0)
    memory = (
        [x for task in tasks[: cursor.task] for x in _memory_sample(ctx, stage, task, keep)]
        if keep
        else []
    )
    started = time.perf_counter() - record["seconds"]
    every = recipe.checkpoint_every

    def save(t: int, k: int, done: bool) -> str:
        record["seconds"] = round(time.perf_counter() - started, 2)
        manifest = {
            "recipe": recipe.name,
            "recipe_sha256": recipe.fingerprint(),
            "stage": stage.name,
            "task": tasks[t].name,
            "task_index": t,
            "task_step": k,
            "task_done": done,
            "step": int(state.step),
            "metric": stage.metric,
            "scores": dict(zip([x.name for x in tasks], record["R"][-1])) if done else None,
            "parent": parent,
            "record": record,
        }
        path = checkpoint.save_checkpoint(
            ctx.out / "checkpoints" / stage.name,
            int(state.step),
            state.params,
            state.opt_state,
            manifest,
            frozen,
        )
        ctx.add_checkpoint(dict(manifest, path=str(path), record=None))
        return str(path)

    with (
        _progress(ctx.console) as progress,
        (ctx.out / "metrics.jsonl").open("a", buffering=1) as log,
    ):
        bar = progress.add_task(stage.name, total=total_steps, loss="-")
        progress.advance(bar, cursor.task * stage.steps_per_task + cursor.task_step)
        for t in range(cursor.task, len(tasks)):
            task = tasks[t]
            first = cursor.task_step if t == cursor.task else 0
            if "task_start" in program.objective.frozen and first == 0:
                frozen["task_start"] = _copy(state.params)
            stream = batched_stream(
                task.train,
                batch_size=stage.batch_size,
                num_batches=stage.steps_per_task,
                seed=recipe.seed * 1_000_003 + t,
                replay=memory,
                replay_ratio=replay.ratio if replay else 0.0,
            )
            memory_stream = None
            if program.memory_grads and memory:
                memory_stream = batched_stream(
                    memory,
                    batch_size=stage.batch_size,
                    num_batches=stage.steps_per_task,
                    seed=recipe.seed * 1_000_003 + t + 500_009,
                )
            pending = None  # the previous step's metrics, checked one step behind (no stall)
            for k in range(first, stage.steps_per_task):
                batch = ctx.put_batch(stream[k])
                mem = None
                if program.memory_grads:
                    # Before any memory exists, the current batch stands in (g·g_ref ≥ 0).
                    mem = ctx.put_batch(memory_stream[k]) if memory_stream else batch
                state, metrics = program.step_fn(state, batch, frozen, mem)
                _check_finite(pending, stage, task, parent)
                pending = (int(k), metrics)
                if (k + 1) % recipe.log_every == 0 or k + 1 == stage.steps_per_task:
                    _check_finite(pending, stage, task, parent)
                    entry = {key: float(v) for key, v in jax.device_get(metrics).items()}
                    entry.update(stage=stage.name, task=task.name, step=int(state.step))
                    record["losses"].append(entry)
                    log.write(json.dumps(entry) + "\n")
                    progress.update(bar, loss=f"{entry['loss']:.3f}")
                progress.advance(bar)
                if every and int(state.step) % every == 0 and k + 1 < stage.steps_per_task:
                    _check_finite(pending, stage, task, parent)
                    parent = save(t, k + 1, done=False)
            _check_finite(pending, stage, task, parent)
            record["R"].append(score(state.params))
            state = _task_boundary(ctx, stage, state, stream, program.objective.scalar(frozen))
            if keep:
                memory.extend(_memory_sample(ctx, stage, task, keep))
            interval = [
                s
                for s in checkpoint.all_steps(ctx.out / "checkpoints" / stage.name)
                if s > int(state.step) - stage.steps_per_task and s < int(state.step)
            ]
            parent = save(t, stage.steps_per_task, done=True)
            # Mid-task checkpoints are superseded by the task's end checkpoint.
            checkpoint.delete_steps(ctx.out / "checkpoints" / stage.name, interval)
    record["seconds"] = round(time.perf_counter() - started, 2)
    result = {
        "name": stage.name,
        "kind": stage.kind,
        "metric": stage.metric,
        "tasks": [t.name for t in tasks],
        "R": record["R"],
        "baseline": record["baseline"],
        "metrics": cl_metrics(
            record["R"], record["baseline"], higher_is_better=HIGHER_IS_BETTER[stage.metric]
        ),
        "losses": record["losses"],
        "checkpoint": parent,
        "start_params_sha256": record["start_params_sha256"],
        "final_params_sha256": checkpoint.params_digest(state.params),
        "seconds": record["seconds"],
    }
    return state.params, result


def _check_finite(pending, stage: StageSpec, task: TaskData, parent: str | None) -> None:
    if pending is None:
        return
    k, metrics = pending
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise TrainingDiverged(
            f"loss is {loss} at stage {stage.name!r}, task {task.name!r}, step {k + 1} of the "
            f"task; the run stopped there. Last good checkpoint: {parent or 'none'}"
        )


def _task_boundary(ctx, stage: StageSpec, state: TrainState, stream, loss) -> TrainState:
    """Refresh every CL state in the chain (anchors, importances...) at the end of a task."""

    def last_batches(n: int):
        return (ctx.put_batch(stream[len(stream) - 1 - i]) for i in range(min(n, len(stream))))

    boundary = Boundary(loss, state.params, last_batches, ctx.apply)
    estimates: dict[str, Any] = {}
    for method in stage.methods:
        estimates.update(method.estimates(boundary))
    opt_state = consolidate(state.opt_state, params=state.params, **estimates)
    return state._replace(opt_state=opt_state)
