"""One stage: train each task, score every task after it, consolidate, checkpoint.

The stage's chain, objective and train step are compiled once. Its loop can start anywhere: a
:class:`Cursor` restored from a checkpoint says which task and step come next and carries the
state, the frozen trees, the replay buffer and the partial results, so a killed run continues
exactly where its last checkpoint stands (batch ``k`` of a task is a pure function of the seed
and ``k``).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jaxcl import checkpoint, parallel
from jaxcl.data import batched_stream, encode_all
from jaxcl.data.replay import ReplayBuffer
from jaxcl.eval import HIGHER_IS_BETTER, cl_metrics
from jaxcl.eval.tasks import task_eval
from jaxcl.methods import consolidate
from jaxcl.methods.specs import Boundary
from jaxcl.objectives.reference import (
    annotate_reference_logps,
    make_pair_logps_fn,
    resolve_checkpoint,
)
from jaxcl.objectives.spec import stage_objective
from jaxcl.recipe import StageSpec
from jaxcl.train.optim import build_chain, restart_moments
from jaxcl.train.step import TrainState, make_train_step, state_shardings_for


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TaskData:
    name: str
    train: list[dict[str, np.ndarray]]
    eval: Any  # jaxcl.eval.tasks.TaskEval: the task's eval set, scored by its metric
    instructions: list[str]  # the train examples' prompts (or texts), for InsCL replay quotas


@dataclass
class Cursor:
    """Where a stage (re)starts: the next task and step, and everything accumulated so far."""

    task: int = 0
    task_step: int = 0
    state: TrainState | None = None
    frozen: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    buffer: ReplayBuffer | None = None


@dataclass
class StageProgram:
    """Everything compiled once per stage: chain, objective, the jitted step, the state's
    shardings, and what the methods need kept (examples per finished task)."""

    tx: Any
    objective: Any
    step_fn: Any
    memory_grads: bool
    shardings: Any
    memory_per_task: int
    model: Any  # jaxcl.train.adapters.StageModel: which parameters the step trains


def compile_stage(ctx, stage: StageSpec, params, total_steps: int) -> StageProgram:
    tx, compiled = build_chain(
        ctx.recipe.stage_optimizer(stage), total_steps, stage.methods, stage.steps_per_task
    )
    model = ctx.model
    shardings = state_shardings_for(
        tx, params, ctx.param_shardings, parallel.replicated(ctx.mesh), split=model.split
    )
    objective = stage_objective(stage, ctx.apply)
    step_fn = make_train_step(
        objective.loss_fn,
        tx,
        state_shardings=shardings,
        batch_sharding=ctx.batch_sharding,
        frozen_shardings={name: ctx.param_shardings for name in objective.frozen},
        memory_grads=compiled.needs_memory_grads,
        accum_steps=stage.grad_accum,
        partition=(model.split, model.join) if model.lora is not None else None,
    )
    return StageProgram(
        tx,
        objective,
        step_fn,
        compiled.needs_memory_grads,
        shardings,
        compiled.memory_per_task,
        model,
    )


def init_state(program: StageProgram, params) -> TrainState:
    init = jax.jit(
        lambda p: TrainState(np.zeros((), np.int32), p, program.tx.init(program.model.split(p)[0])),
        out_shardings=program.shardings,
    )
    return init(params)


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def task_data(ctx, stage: StageSpec) -> list[TaskData]:
    def encoded(examples, kind):
        return encode_all(examples, kind, ctx.tokenizer, stage.seq_len)

    def scorable(task, metric):  # the eval set prepared for the task's metric (a TaskEval)
        return task_eval(
            metric,
            task.data.load("eval"),
            task.data.kind,
            ctx.tokenizer,
            stage.seq_len,
            stage.eval_batch_size,
            max_new_tokens=stage.eval_max_new_tokens,
            where=f"stage {stage.name}, task {task.name}",
        )

    out = []
    for task, metric in zip(stage.tasks, stage.task_metrics):
        train = task.data.load("train")
        texts = [str(e.get("prompt", e.get("text", ""))) for e in train]
        out.append(
            TaskData(task.name, encoded(train, task.data.kind), scorable(task, metric), texts)
        )
    return out


def new_buffer(ctx, stage: StageSpec, program: StageProgram) -> ReplayBuffer | None:
    """The stage's memory of finished tasks: replay's buffer, or A-GEM's episodic memory."""
    replay = stage.method("replay")
    if replay is not None:
        return ReplayBuffer(replay.capacity, quota=replay.quota, seed=ctx.recipe.seed)
    if program.memory_per_task:
        capacity = program.memory_per_task * len(stage.tasks)
        return ReplayBuffer(capacity, quota="equal", seed=ctx.recipe.seed)
    return None


@dataclass
class Throughput:
    """Tokens/s, step time and model FLOPs utilisation between two log points.

    Training FLOPs are ``6·N`` per token (forward ``2N``, backward ``4N``; attention's share is
    left out, as in the MFU convention of PaLM/MaxText for short sequences). The first interval
    includes compilation.
    """

    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None  # of all devices together
    last: float = field(default_factory=time.perf_counter)
    steps: int = 0

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        steps, self.steps = max(self.steps, 1), 0
        tokens_per_s = steps * self.tokens_per_step / seconds
        out = {"tokens_per_s": tokens_per_s, "step_seconds": seconds / steps}
        if self.peak_flops:
            out["mfu"] = self.flops_per_token * tokens_per_s / self.peak_flops
        return out


def _throughput(ctx, stage: StageSpec, params) -> Throughput:
    pairs = 2 if stage.kind == "align" else 1  # chosen and rejected sequences
    n_params = sum(x.size for x in jax.tree.leaves(params))
    peak = ctx.recipe.peak_flops_per_device
    return Throughput(
        tokens_per_step=stage.batch_size * stage.seq_len * pairs,
        flops_per_token=6.0 * n_params,
        peak_flops=peak * ctx.mesh.size if peak else None,
    )


def _event_writer(folder, stage_name: str):
    """TensorBoard event files under ``OUT/tensorboard/<stage>`` (primary process only)."""
    from tensorboardX import SummaryWriter

    if not parallel.is_primary():
        return contextlib.nullcontext()
    return SummaryWriter(str(folder / stage_name), flush_secs=10)


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


@dataclass
class StageRun:
    """A stage in progress: its compiled program, data, state, frozen trees, replay buffer and
    partial record; ``train_task`` and ``save`` advance and persist it."""

    ctx: Any
    stage: StageSpec
    program: StageProgram
    tasks: list[TaskData]
    cursor: Cursor
    parent: str | None
    log: Any = None
    events: Any = None  # TensorBoard event writer (beside metrics.jsonl)
    speed: Throughput | None = None
    started: float = 0.0

    @property
    def step_frozen(self) -> dict[str, Any]:
        """The frozen trees the objective reads each step (precompute-only ones stay out)."""
        return {name: self.cursor.frozen[name] for name in self.program.objective.frozen}

    def annotate(self, examples: list) -> list:
        """Examples with the reference's log-probs attached (``reference.logps: precomputed``):
        one pass of the frozen tree over the data at each task start."""
        if not self.program.objective.precompute or not examples:
            return examples
        (name,) = self.program.objective.precompute
        return annotate_reference_logps(
            make_pair_logps_fn(self.ctx.apply),
            self.cursor.frozen[name],
            examples,
            batch_size=self.stage.eval_batch_size,
            put_batch=self.ctx.put_batch,
        )

    def streams(self, t: int):
        """Task ``t``'s batches (replay mixed in) and, for A-GEM, its memory batches."""
        recipe, stage, buffer = self.ctx.recipe, self.stage, self.cursor.buffer
        task = self.tasks[t]
        if buffer is not None and buffer.quota == "inscl" and len(buffer):
            buffer.set_upcoming(task.instructions)
        pool = self.annotate(buffer.examples() if buffer is not None else [])
        replay = stage.method("replay")
        seed = recipe.seed * 1_000_003 + t
        stream = batched_stream(
            self.annotate(task.train),
            batch_size=stage.batch_size,
            num_batches=stage.steps_per_task,
            seed=seed,
            replay=pool,
            replay_ratio=replay.replay_ratio() if replay else 0.0,
        )
        memory = None
        if self.program.memory_grads and pool:
            memory = batched_stream(
                pool,
                batch_size=stage.batch_size,
                num_batches=stage.steps_per_task,
                seed=seed + 500_009,
            )
        return stream, memory

    def train_task(self, t: int, first: int, progress, bar) -> Any:
        """Steps ``first..steps_per_task-1`` of task ``t``; returns the task's batch stream."""
        stage, recipe, cursor, program = self.stage, self.ctx.recipe, self.cursor, self.program
        task = self.tasks[t]
        needs = program.objective.frozen + program.objective.precompute
        if "task_start" in needs and first == 0:
            cursor.frozen["task_start"] = _copy(cursor.state.params)
        stream, memory = self.streams(t)
        pending = None  # the previous step's metrics, checked one step behind (no stall)
        for k in range(first, stage.steps_per_task):
            batch = self.ctx.put_batch(stream[k])
            mem = None
            if program.memory_grads:
                # Before any memory exists, the current batch stands in (g·g_ref ≥ 0).
                mem = self.ctx.put_batch(memory[k]) if memory is not None else batch
            cursor.state, metrics = program.step_fn(cursor.state, batch, self.step_frozen, mem)
            self.speed.steps += 1
            _check_finite(pending, stage, task, self.parent)
            pending = (k, metrics)
            last = k + 1 == stage.steps_per_task
            if (k + 1) % recipe.log_every == 0 or last:
                _check_finite(pending, stage, task, self.parent)
                self.log_metrics(task, metrics, progress, bar)
            progress.advance(bar)
            every = recipe.checkpoint_every
            if every and int(cursor.state.step) % every == 0 and not last:
                _check_finite(pending, stage, task, self.parent)
                self.save(t, k + 1, done=False)
        _check_finite(pending, stage, task, self.parent)
        return stream

    def log_metrics(self, task: TaskData, metrics, progress, bar) -> None:
        entry = {key: float(parallel.to_host(v)) for key, v in metrics.items()}
        entry.update(self.speed.read(), stage=self.stage.name, task=task.name)
        entry["step"] = int(self.cursor.state.step)
        self.cursor.record["losses"].append(entry)
        if parallel.is_primary():
            self.log.write(json.dumps(entry) + "\n")
            for key, value in entry.items():
                if isinstance(value, float):
                    self.events.add_scalar(f"{self.stage.name}/{key}", value, entry["step"])
        progress.update(bar, loss=f"{entry['loss']:.3f}")

    def end_task(self, t: int, stream, score) -> None:
        """Score every task, refresh the CL state, remember the task, checkpoint."""
        cursor, task = self.cursor, self.tasks[t]
        cursor.record["R"].append(score(cursor.state.params))
        loss = self.program.objective.scalar(self.step_frozen)
        cursor.state = _task_boundary(self.ctx, self.stage, cursor.state, stream, loss)
        lora = self.program.model.lora
        if lora is not None and lora.per_task:  # fold the finished adapter, draw the next one
            params = self.program.model.renew(cursor.state.params, t + 1)
            cursor.state = cursor.state._replace(params=params)
        if self.ctx.recipe.stage_optimizer(self.stage).moments == "task":
            cursor.state = cursor.state._replace(opt_state=restart_moments(cursor.state.opt_state))
        if cursor.buffer is not None:
            cursor.buffer.add_task(task.name, task.train, instructions=task.instructions)
        stage_dir = self.ctx.out / "checkpoints" / self.stage.name
        step = int(cursor.state.step)
        superseded = [
            s
            for s in checkpoint.all_steps(stage_dir)
            if step - self.stage.steps_per_task < s < step
        ]
        if t == len(self.tasks) - 1:  # the stage's end: probes go into its final checkpoint
            cursor.record["probes_after"] = self.ctx.probe(cursor.state.params)
        self.save(t, self.stage.steps_per_task, done=True)
        checkpoint.delete_steps(stage_dir, superseded)  # mid-task saves, now redundant

    def save(self, t: int, k: int, done: bool) -> None:
        recipe, stage, cursor = self.ctx.recipe, self.stage, self.cursor
        cursor.record["seconds"] = round(time.perf_counter() - self.started, 2)
        buffer = cursor.buffer.state() if cursor.buffer is not None and len(cursor.buffer) else None
        names = [x.name for x in self.tasks]
        manifest = {
            "recipe": recipe.name,
            "recipe_sha256": recipe.fingerprint(),
            "stage": stage.name,
            "task": names[t],
            "task_index": t,
            "task_step": k,
            "task_done": done,
            "step": int(cursor.state.step),
            "metric": stage.metric,
            "task_metrics": stage.task_metrics,
            "scores": dict(zip(names, cursor.record["R"][-1])) if done else None,
            "parent": self.parent,
            "record": cursor.record,
            "replay": buffer["meta"] if buffer else None,
            "lora": self.program.model.describe(),
        }
        path = checkpoint.save_checkpoint(
            self.ctx.out / "checkpoints" / stage.name,
            int(cursor.state.step),
            cursor.state.params,
            cursor.state.opt_state,
            manifest,
            cursor.frozen,
            replay=buffer["arrays"] if buffer else None,
        )
        self.ctx.add_checkpoint(dict(manifest, path=str(path), record=None, replay=None))
        self.parent = str(path)


def stage_result(stage: StageSpec, record: dict, checkpoint_path: str, params) -> dict[str, Any]:
    """A finished stage's entry of ``results.json``."""
    return {
        "name": stage.name,
        "kind": stage.kind,
        "metric": stage.metric,
        "task_metrics": stage.task_metrics,
        "tasks": [t.name for t in stage.tasks],
        "R": record["R"],
        "baseline": record["baseline"],
        "metrics": cl_metrics(
            record["R"], record["baseline"], higher_is_better=HIGHER_IS_BETTER[stage.metric]
        ),
        "losses": record["losses"],
        "checkpoint": checkpoint_path,
        "start_params_sha256": record["start_params_sha256"],
        "final_params_sha256": checkpoint.params_digest(params),
        "probes_before": record.get("probes_before"),
        "probes_after": record.get("probes_after"),
        "seconds": record["seconds"],
    }


def run_stage(
    ctx, stage: StageSpec, params, parent: str | None, cursor: Cursor | None = None
) -> tuple[Any, dict]:
    """Train ``stage`` from ``params`` (or from ``cursor``); returns final params and results."""
    cursor = cursor or Cursor()
    if cursor.state is not None:
        params = cursor.state.params
    else:
        start_digest = checkpoint.params_digest(params)  # the plain model the stage starts from
        params = ctx.model.attach(params)
    tasks = task_data(ctx, stage)
    eval_sets = [t.eval.on_devices(ctx.put_batch) for t in tasks]  # each task by its metric
    total_steps = stage.steps_per_task * len(tasks)
    program = compile_stage(ctx, stage, params, total_steps)

    def score(p) -> list[float]:
        return [evaluation.score(ctx, p) for evaluation in eval_sets]

    if cursor.state is None:
        cursor.state = init_state(program, params)
        # Frozen trees are separate, never-donated copies: DPO's reference is the stage's start
        # (or a named checkpoint).
        objective = program.objective
        if "reference" in objective.frozen + objective.precompute:
            ref = objective.reference_checkpoint
            if ref:
                stage_dir, step = resolve_checkpoint(ref)
                cursor.frozen["reference"] = ctx.model.attach(
                    ctx.restore_model(stage_dir / str(step))
                )
            else:
                cursor.frozen["reference"] = _copy(params)
        cursor.buffer = new_buffer(ctx, stage, program)
        cursor.record = {
            "probes_before": ctx.probe(params),
            "start_params_sha256": start_digest,
            "baseline": score(params),
            "R": [],
            "losses": [],
            "seconds": 0.0,
        }
    run = StageRun(ctx, stage, program, tasks, cursor, parent)
    run.started = time.perf_counter() - cursor.record["seconds"]
    run.speed = _throughput(ctx, stage, params)
    start_task, start_step = cursor.task, cursor.task_step
    with (
        _progress(ctx.console) as progress,
        (ctx.out / "metrics.jsonl").open("a", buffering=1) as run.log,
        _event_writer(ctx.out / "tensorboard", stage.name) as run.events,
    ):
        bar = progress.add_task(stage.name, total=total_steps, loss="-")
        progress.advance(bar, start_task * stage.steps_per_task + start_step)
        for t in range(start_task, len(tasks)):
            stream = run.train_task(t, start_step if t == start_task else 0, progress, bar)
            run.end_task(t, stream, score)
    cursor.record["seconds"] = round(time.perf_counter() - run.started, 2)
    result = stage_result(stage, cursor.record, run.parent, cursor.state.params)
    return cursor.state.params, result


def _check_finite(pending, stage: StageSpec, task: TaskData, parent: str | None) -> None:
    if pending is None:
        return
    k, metrics = pending
    loss = float(parallel.to_host(metrics["loss"]))
    if not np.isfinite(loss):
        raise TrainingDiverged(
            f"loss is {loss} at stage {stage.name!r}, task {task.name!r}, step {k + 1} of the "
            f"task; the run stopped there. Last good checkpoint: {parent or 'none'}"
        )


def _task_boundary(ctx, stage: StageSpec, state: TrainState, stream, loss) -> TrainState:
    """Refresh every CL state in the chain (anchors, importances...) at the end of a task."""

    def last_batches(n: int):
        return (ctx.put_batch(stream[len(stream) - 1 - i]) for i in range(min(n, len(stream))))

    # The methods see the trainable part only (LoRA: the adapters), the rest bound.
    trainable, fixed = ctx.model.split(state.params)
    boundary = Boundary(
        lambda p, batch: loss(ctx.model.join(p, fixed), batch),
        trainable,
        last_batches,
        lambda p, inputs: ctx.apply(ctx.model.join(p, fixed), inputs),
    )
    estimates: dict[str, Any] = {}
    for method in stage.methods:
        estimates.update(method.estimates(boundary))
    opt_state = consolidate(state.opt_state, params=trainable, **estimates)
    return state._replace(opt_state=opt_state)
