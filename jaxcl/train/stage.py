"""One stage: train each task, score every task after it, consolidate, checkpoint.

The stage's chain, objective and train step are compiled once. Its loop can start anywhere: a
:class:`Cursor` restored from a checkpoint says which task and step come next and carries the
state, the frozen trees, the replay buffer and the partial results, so a killed run continues
exactly where its last checkpoint stands (the state of the task's data stream is saved with
every checkpoint; :mod:`jaxcl.train.data`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.markup import escape

from jaxcl import checkpoint, parallel
from jaxcl.data import batched_stream, encode_all
from jaxcl.data.budget import Budget
from jaxcl.data.replay import ReplayBuffer
from jaxcl.data.tokenize import special_ids, token_ids
from jaxcl.eval import HIGHER_IS_BETTER, cl_metrics, metric_scale
from jaxcl.eval.tasks import continuations
from jaxcl.methods import consolidate
from jaxcl.methods.protocol import (
    END_PHASES,
    Carry,
    Context,
    EvalView,
    Hook,
    TaskInfo,
    compose_eval_apply,
    compose_views,
    run_hooks,
    run_step_hooks,
)
from jaxcl.methods.storage import keep_dtypes
from jaxcl.objectives.reference import (
    annotate_reference_logps,
    make_pair_logps_fn,
    resolve_checkpoint,
)
from jaxcl.objectives.spec import stage_objective
from jaxcl.recipe import STAGE_DATA_KIND, StageSpec
from jaxcl.train.data import TaskData, stream_for, task_data, task_rows, task_seed
from jaxcl.train.features import adapter_hooks, initial_frozen, objective_hooks, optimizer_hooks
from jaxcl.train.guards import (  # noqa: F401  (TrainingDiverged, TrainingStalled: re-exported)
    StepWatch,
    TrainingDiverged,
    TrainingStalled,
    data_record,
    read_batch,
    unmasked,
)
from jaxcl.train.monitor import Throughput, event_writer, progress_bar, throughput
from jaxcl.train.optim import build_chain, task_schedule
from jaxcl.train.step import TrainState, make_train_step, per_task_sharding, state_shardings_for


@dataclass
class Cursor:
    """Where a stage (re)starts: the next task and step, and everything accumulated so far."""

    task: int = 0
    task_step: int = 0
    state: TrainState | None = None
    frozen: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    buffer: ReplayBuffer | None = None
    data_state: dict[str, Any] | None = None  # the task's stream, where a mid-task save left it


@dataclass
class StageProgram:
    """Everything built once per stage: chain, objective, the jitted step, the state's shardings,
    and the plan its methods and features declared (:mod:`jaxcl.methods.protocol`): hooks in
    recipe order, the eval view, the memory's owner and its replay share."""

    tx: Any
    objective: Any
    step_fn: Any
    memory_grads: bool
    memory_per_task: bool  # one memory batch (and gradient) per earlier task: GEM
    shardings: Any
    model: Any  # jaxcl.train.adapters.StageModel: which parameters the step trains
    hooks: list[Hook]
    view: EvalView | None
    methods: list[Any]  # the stage's method specs (their estimates run at every task end)
    memory_owner: Any  # the method whose memory of finished tasks the stage keeps, or None
    schedule: Any = None  # step -> learning rate (logged as ``lr``)
    scorer: Any = None  # a ModelScorer of the methods' eval_apply (None: the model's own)

    def new_memory(self, seed: int, n_tasks: int) -> ReplayBuffer | None:
        """The memory of finished tasks its owner (the first method keeping one) declares."""
        owner = self.memory_owner
        return owner.new_memory(seed=seed, n_tasks=n_tasks) if owner is not None else None

    def replay_ratio(self) -> Any:
        """The share of each batch drawn from the memory (its owner's)."""
        return self.memory_owner.replay_ratio() if self.memory_owner is not None else 0.0


def compile_stage(
    ctx, stage: StageSpec, params, total_steps: int, task_steps: list[int] | None = None
) -> StageProgram:
    """The stage's program; ``task_steps`` (each task's budget) lays out the learning rate per
    task (:func:`~jaxcl.train.optim.task_schedule`), default ``steps_per_task`` each."""
    recipe = ctx.recipe
    optimizer = recipe.stage_optimizer(stage)
    steps = task_steps or [stage.steps_per_task] * len(stage.tasks)
    schedule = task_schedule(
        [(recipe.task_optimizer(stage, task), n) for task, n in zip(stage.tasks, steps)]
    )
    tx, compiled = build_chain(optimizer, total_steps, stage.methods, schedule=schedule)
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
        memory_per_task=compiled.memory_grads_per_task,
        accum_steps=stage.grad_accum,
        partition=(model.split, model.join) if model.lora is not None else None,
        compute_dtype=recipe.model.compute_cast,
    )
    hooks = [
        *objective_hooks(objective),
        *adapter_hooks(model),
        *optimizer_hooks(optimizer.moments),
        *compiled.hooks,
    ]
    views = [v for v in (m.eval_view() for m in stage.methods) if v is not None]
    scoring = compose_eval_apply(stage.methods, ctx.apply)  # a mixture over experts (DEMix)
    scorer = None
    if scoring is not None:
        from jaxcl.eval import make_batch_scorer
        from jaxcl.eval.tasks import ModelScorer

        scorer = ModelScorer(make_batch_scorer(scoring), ctx.graphdef, ctx.tokenizer)
    return StageProgram(
        tx,
        objective,
        step_fn,
        compiled.needs_memory_grads,
        compiled.memory_grads_per_task,
        shardings,
        model,
        hooks,
        compose_views(views),
        list(stage.methods),
        next((m for m in stage.methods if m.new_memory(seed=0, n_tasks=1) is not None), None),
        schedule,
        scorer,
    )


def init_state(program: StageProgram, params) -> TrainState:
    init = jax.jit(
        lambda p: TrainState(np.zeros((), np.int32), p, program.tx.init(program.model.split(p)[0])),
        out_shardings=program.shardings,
    )
    return init(params)


def new_buffer(ctx, stage: StageSpec, program: StageProgram) -> ReplayBuffer | None:
    """The stage's memory of finished tasks, as its methods declare it (or None)."""
    return program.new_memory(ctx.recipe.seed, len(stage.tasks))


def _generate_tool(ctx, stage: StageSpec) -> Any:
    """``generate(params, prompts, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
    seed=0, max_prompt_tokens=None)``: continuations of text prompts by the stage's model (for
    pseudo-replay, SSR and other hooks); prompts are cut from the left to ``max_prompt_tokens``
    (default: the stage's ``seq_len``)."""
    bos, _, _ = special_ids(ctx.tokenizer)
    head = [bos] if bos is not None else []

    def generate(
        params,
        prompts,
        *,
        max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        max_prompt_tokens=None,
    ):
        ids = [head + row for row in token_ids(ctx.tokenizer, list(prompts))]
        return continuations(
            ctx.graphdef,
            params,
            ctx.tokenizer,
            ids,
            max_new_tokens=max_new_tokens,
            batch_size=stage.eval_batch_size,
            seq_len=stage.seq_len if max_prompt_tokens is None else max_prompt_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )

    return generate


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
    stream: Any = None  # the current task's jaxcl.data.stream.TaskStream

    @property
    def step_frozen(self) -> dict[str, Any]:
        """The frozen trees the objective reads each step (precompute-only ones stay out)."""
        return {name: self.cursor.frozen[name] for name in self.program.objective.frozen}

    def annotate(self, examples: list) -> list:
        """Examples with the reference's log-probs attached (``reference.logps: precomputed``):
        one pass of the frozen tree over the rows as they are drawn (the memory's at each task
        start)."""
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

    @property
    def carry(self) -> Carry:
        return Carry(self.cursor.state, self.cursor.frozen, self.cursor.buffer)

    @carry.setter
    def carry(self, carry: Carry) -> None:
        state, self.cursor.frozen, self.cursor.buffer = carry
        self.cursor.state = self.placed(state)

    def placed(self, state: TrainState) -> TrainState:
        """``state`` on the shardings and in the dtypes the step was compiled for: what a hook
        or a consolidate computed outside the step (an estimate, a prune) may come back laid
        out otherwise, or in float32 where a ``buffer_dtype`` stores it narrower."""
        state = keep_dtypes(state, self.cursor.state)
        return jax.device_put(state, self.program.shardings)

    def seed(self, t: int) -> int:
        return task_seed(self.ctx.recipe, t)

    def context(self, t: int) -> Context:
        """What task ``t``'s hooks and estimators see (:class:`jaxcl.methods.protocol.Context`):
        the objective and model on the trainable part, the task's own batches, the tools."""
        ctx, stage, task, model = self.ctx, self.stage, self.tasks[t], self.program.model
        objective = self.program.objective
        fixed = lambda: model.split(self.cursor.state.params)[1]  # noqa: E731

        def loss(p, batch):  # the frozen trees as they are when called (task_start hooks ran)
            return objective.scalar(self.step_frozen)(model.join(p, fixed()), batch)

        def own_batches(n: int):
            stream = stream_for(
                ctx, stage, task, seed_offset=700_001, annotate=self.annotate, budget=Budget(n, 0)
            )
            return (ctx.put_rows(stream.next_batch()) for _ in range(n))

        info = TaskInfo(
            t,
            task.name,
            task.budget.steps,
            task_rows(ctx, stage, task),
            task.instructions,
            tuple(x.name for x in self.tasks),
        )
        kind = STAGE_DATA_KIND[stage.kind]
        tools = {
            "generate": _generate_tool(ctx, stage),
            "tokenizer": ctx.tokenizer,
            "encode": lambda rows: encode_all(rows, kind, ctx.tokenizer, stage.seq_len),
            "kind": stage.kind,
            "model_config": ctx.model_config,
            "seq_len": stage.seq_len,
            "seed": ctx.recipe.seed,
        }
        return Context(
            info,
            loss,
            lambda p, inputs: ctx.apply(model.join(p, fixed()), inputs),
            model.split,
            model.join,
            own_batches,
            tools,
        )

    def streams(self, t: int, first: int):
        """Task ``t``'s batches from step ``first`` (the memory mixed in) and, for A-GEM, its
        memory batches (for GEM, a stream per earlier task). A resumed task's stream continues
        from the state its checkpoint saved."""
        stage, buffer, program = self.stage, self.cursor.buffer, self.program
        task = self.tasks[t]
        pool = self.annotate(buffer.examples() if buffer is not None else [])
        stream = stream_for(
            self.ctx,
            stage,
            task,
            pool=pool,
            ratio=program.replay_ratio(),
            annotate=self.annotate if program.objective.precompute else None,
        )
        saved = self.cursor.data_state
        if first and saved is not None and saved.get("step") == first:
            stream.restore(saved)
        else:  # a checkpoint without the stream's state: draw the batches it had consumed
            for _ in range(first):
                stream.next_batch()
        memory = None
        if program.memory_grads and pool:
            pools = [pool]
            if program.memory_per_task:
                pools = [self.annotate(buffer.examples(name)) for name in buffer.tasks]
            memory = [
                batched_stream(
                    examples,
                    batch_size=stage.batch_size,
                    num_batches=task.budget.steps,
                    seed=self.seed(t) + 500_009 + i,
                )
                for i, examples in enumerate(pools)
            ]
        return stream, memory

    def memory_batch(self, memory, k: int, rows: dict[str, np.ndarray]) -> Any:
        """Step ``k``'s memory batch on the mesh: the whole memory's, or (GEM) one per earlier
        task stacked ``[tasks, batch, ...]``. Before any memory exists, the batch with every
        token masked out stands in: its gradient is zero, so a projection against it changes
        nothing."""
        parts = [m[k] for m in memory] if memory is not None else [unmasked(rows)]
        if not self.program.memory_per_task:
            return self.ctx.put_batch(parts[0])
        stacked = {key: np.stack([p[key] for p in parts]) for key in parts[0]}
        return parallel.put_global(stacked, per_task_sharding(self.ctx.batch_sharding))

    def train_task(self, t: int, first: int, progress, bar) -> None:
        """Steps ``first..S_t-1`` of task ``t`` (``S_t`` its budget), its task-start hooks first
        (on a fresh start of the task) and its step hooks after each step."""
        stage, recipe, cursor, program = self.stage, self.ctx.recipe, self.cursor, self.program
        task = self.tasks[t]
        steps = task.budget.steps
        ctx = self.context(t)
        if first == 0:
            self.carry = run_hooks(program.hooks, "task_start", ctx, self.carry)
        stepped = any(h.phase == "step" for h in program.hooks)
        self.stream, memory = self.streams(t, first)
        pending = None  # the previous step's metrics, checked one step behind (no stall)
        token_loss = STAGE_DATA_KIND[stage.kind] != "preference"  # a loss on the ln V scale
        uniform = math.log(self.ctx.model_config.vocab_size) if token_loss else None
        watch = StepWatch(stage, task, lambda: self.parent, recipe.stall_steps, uniform)
        for k in range(first, steps):
            rows = read_batch(self.stream, stage, task, self.parent)
            batch = self.ctx.put_rows(rows)
            mem = self.memory_batch(memory, k, rows) if program.memory_grads else None
            cursor.state, metrics = program.step_fn(cursor.state, batch, self.step_frozen, mem)
            if stepped:
                self.carry = run_step_hooks(program.hooks, k, ctx, self.carry)
            self.speed.steps += 1
            watch(pending)
            pending = (k, metrics)
            last = k + 1 == steps
            if (k + 1) % recipe.log_every == 0 or last:
                watch(pending)
                self.log_metrics(task, metrics, progress, bar)
            progress.advance(bar)
            every = recipe.checkpoint_every
            if every and int(cursor.state.step) % every == 0 and not last:
                watch(pending)
                self.save(t, k + 1, done=False)
        watch(pending)

    def log_metrics(self, task: TaskData, metrics, progress, bar) -> None:
        entry = {key: float(parallel.to_host(v)) for key, v in metrics.items()}
        entry.update(self.speed.read(), stage=self.stage.name, task=task.name)
        entry["step"] = int(self.cursor.state.step)
        entry["lr"] = float(self.program.schedule(entry["step"] - 1))  # the rate of that step
        self.cursor.record["losses"].append(entry)
        if parallel.is_primary():
            self.log.write(json.dumps(entry) + "\n")
            for key, value in entry.items():
                if isinstance(value, float):
                    self.events.add_scalar(f"{self.stage.name}/{key}", value, entry["step"])
        progress.update(bar, loss=f"{entry['loss']:.3f}")

    def log_probes(self, probes: dict[str, Any] | None) -> None:
        """Probe scores after the stage to TensorBoard: ``probes/<suite>`` and
        ``probes/<task>`` at the stage's position in the recipe (1 = after the first)."""
        if probes is None or not parallel.is_primary():
            return
        position = [s.name for s in self.ctx.recipe.stages].index(self.stage.name) + 1
        scores = {k: v for k, v in probes.items() if isinstance(v, float)}
        scores.update(probes.get("tasks", {}))
        for key, value in scores.items():
            self.events.add_scalar(f"probes/{key}", float(value), position)

    def end_task(self, t: int, score) -> None:
        """Score every task (each on its eval view), then the boundary in its fixed order:
        estimates of every method → one consolidate → fold → renew → memory → merge →
        checkpoint (:mod:`jaxcl.methods.protocol`)."""
        cursor, program = self.cursor, self.program
        cursor.record["R"].append(score(self.carry, program.view))
        ctx = self.context(t)
        estimates: dict[str, Any] = {}
        for method in program.methods:
            estimates.update(method.estimates(ctx, self.carry))
        trainable = ctx.trainable(self.carry)
        opt_state = consolidate(cursor.state.opt_state, params=trainable, **estimates)
        cursor.state = self.placed(cursor.state._replace(opt_state=opt_state))
        for phase in END_PHASES:
            self.carry = run_hooks(program.hooks, phase, ctx, self.carry)
        stage_dir = self.ctx.out / "checkpoints" / self.stage.name
        step = int(cursor.state.step)
        steps = self.tasks[t].budget.steps
        superseded = [s for s in checkpoint.all_steps(stage_dir) if step - steps < s < step]
        if self.stream is not None:  # what the task read: rows, tokens, skipped bad rows
            cursor.record.setdefault("data", {})[self.tasks[t].name] = data_record(self.stream)
        if t == len(self.tasks) - 1:  # the stage's end: probes and digest in its final manifest
            cursor.record["probes_after"] = self.ctx.probe(cursor.state.params)
            self.log_probes(cursor.record["probes_after"])
            cursor.record["final_params_sha256"] = checkpoint.params_digest(cursor.state.params)
        doomed = {str(stage_dir / str(s)) for s in superseded}
        self.parent = _surviving_parent(self.ctx, self.parent, doomed)  # lineage: what stays
        self.save(t, steps, done=True)
        checkpoint.delete_steps(stage_dir, superseded)  # mid-task saves, now redundant
        self.ctx.drop_checkpoints(sorted(doomed))

    def save(self, t: int, k: int, done: bool) -> None:
        recipe, stage, cursor = self.ctx.recipe, self.stage, self.cursor
        cursor.record["seconds"] = round(time.perf_counter() - self.started, 2)
        # a memory of notes alone (pseudo-replay: prefixes, no rows) is kept too
        memory = cursor.buffer
        buffer = memory.state() if memory is not None and memory.tasks else None
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
            "data_state": None if done or self.stream is None else self.stream.state(),
        }
        path = checkpoint.save_checkpoint(
            self.ctx.out / "checkpoints" / stage.name,
            int(cursor.state.step),
            cursor.state.params,
            cursor.state.opt_state,
            manifest,
            cursor.frozen,
            replay=buffer["arrays"] if buffer and buffer["meta"]["stored"] else None,
        )
        self.ctx.add_checkpoint(
            dict(manifest, path=str(path), record=None, replay=None, data_state=None)
        )
        self.parent = str(path)


def stage_result(stage: StageSpec, record: dict, checkpoint_path: str) -> dict[str, Any]:
    """A finished stage's entry of ``results.json``."""
    return {
        "name": stage.name,
        "kind": stage.kind,
        "metric": stage.metric,
        "task_metrics": stage.task_metrics,
        "tasks": [t.name for t in stage.tasks],
        "R": record["R"],
        "baseline": record["baseline"],
        # perplexity columns on their log scale: BWT and forgetting in nats per token
        "metrics": cl_metrics(
            metric_scale(record["R"], stage.task_metrics),
            metric_scale([record["baseline"]], stage.task_metrics)[0],
            higher_is_better=HIGHER_IS_BETTER[stage.metric],
        ),
        "metrics_scale": "log" if "perplexity" in stage.task_metrics else "linear",
        "losses": record["losses"],
        "checkpoint": checkpoint_path,
        "start_params_sha256": record["start_params_sha256"],
        "final_params_sha256": record["final_params_sha256"],
        "probes_before": record.get("probes_before"),
        "probes_after": record.get("probes_after"),
        "data": record.get("data"),
        "seconds": record["seconds"],
    }


def warn_unreadable(
    console: Console, path, err: Exception, fallback: str = "the previous one"
) -> None:
    """Say that checkpoint ``path`` cannot be restored, why (a CheckpointError names the bad
    file), and what the run falls back to."""
    reason = str(err) if isinstance(err, checkpoint.CheckpointError) else str(err)[:200]
    if not isinstance(err, checkpoint.CheckpointError):
        reason = f"{type(err).__name__}: {reason}"
    console.print(
        "[yellow]warning[/]: "
        + escape(f"checkpoint {path} cannot be restored ({reason}); falling back to {fallback}")
    )


def _surviving_parent(ctx, parent: str | None, doomed: set[str]) -> str | None:
    """``parent``, or, while it is one of the checkpoints about to be deleted (``doomed``),
    its own parent: what a checkpoint's lineage names must exist."""
    parents = {c["path"]: c.get("parent") for c in ctx.run.checkpoints}
    seen: set[str] = set()
    while parent in doomed and parent not in seen:
        seen.add(parent)
        try:
            parent = checkpoint.read_manifest(Path(parent)).get("parent")
        except checkpoint.CheckpointError:
            parent = parents.get(parent)
    return parent


def restore_cursor(ctx, stage: StageSpec, program: StageProgram, step_dir) -> Cursor:
    """Where a stage's checkpoint ``step_dir`` stands: the next task and step, the state, the
    frozen trees, the memory and the partial record, shaped and sharded as ``program`` trains."""
    like = program.model.like(ctx.run.plain_like)
    abstract = jax.eval_shape(program.tx.init, program.model.split(like)[0])
    opt_like = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        program.shardings.opt_state,
    )
    stage_dir, step = step_dir.parent, int(step_dir.name)
    params, opt_state, frozen, replay, manifest = checkpoint.restore_checkpoint(
        stage_dir, step, like, opt_like
    )
    done = manifest["task_done"]
    if manifest.get("replay"):
        buffer = ReplayBuffer.from_state({"meta": manifest["replay"], "arrays": replay})
    else:  # nothing was stored yet
        buffer = new_buffer(ctx, stage, program)
    step_array = jax.device_put(np.int32(manifest["step"]), parallel.replicated(ctx.mesh))
    return Cursor(
        task=manifest["task_index"] + (1 if done else 0),
        task_step=0 if done else manifest["task_step"],
        state=TrainState(step_array, params, opt_state),
        frozen=frozen,
        record=manifest["record"],
        buffer=buffer,
        data_state=manifest.get("data_state"),
    )


def _resume(ctx, stage: StageSpec, program: StageProgram, candidates) -> tuple[Cursor, str] | None:
    """The newest of ``candidates`` (step folders) that restores, with its path."""
    for path in candidates:
        try:
            return restore_cursor(ctx, stage, program, path), str(path)
        except Exception as err:  # a corrupted or half-readable checkpoint: use an older one
            warn_unreadable(ctx.console, path, err)
    return None


def run_stage(ctx, stage: StageSpec, params, parent: str | None, candidates=()) -> dict[str, Any]:
    """Train ``stage`` from ``params`` (plain parameters), or resume it from the newest of its
    ``candidates`` checkpoints that restores; returns its entry of ``results.json``."""
    tasks = task_data(ctx, stage)
    task_steps = [t.budget.steps for t in tasks]
    total_steps = sum(task_steps)
    like = ctx.model.like(ctx.run.plain_like)
    program = compile_stage(ctx, stage, like, total_steps, task_steps)
    resumed = _resume(ctx, stage, program, candidates)
    if resumed is not None:
        cursor, parent = resumed
    else:
        cursor = Cursor()
        if params is None:
            params = ctx.restore_model(parent)
        start_digest = checkpoint.params_digest(params)  # the plain model the stage starts from
        params = ctx.model.attach(params)
    eval_sets = [t.eval.on_devices(ctx.put_batch) for t in tasks]  # each task by its metric

    def score(carry: Carry | None, view: EvalView | None = None) -> list[float]:
        """Every task's score; task ``i`` on ``view(params, carry, i)`` when a method declares
        a view (PackNet's masks, an EMA), else on the parameters as they are."""
        params = carry.state.params if carry is not None else None
        return [
            evaluation.score(
                program.scorer or ctx.model_scorer, view(params, carry, i) if view else params
            )
            for i, evaluation in enumerate(eval_sets)
        ]

    if cursor.state is None:
        cursor.state = init_state(program, params)
        # Frozen trees are separate, never-donated copies.
        cursor.frozen = initial_frozen(
            program.objective,
            params,
            lambda ref: ctx.model.attach(ctx.restore_model(_step_dir(ref))),
        )
        cursor.buffer = new_buffer(ctx, stage, program)
        cursor.record = {
            # scored before the run's first stage only: a later stage starts from the
            # parameters the stage before it scored as its probes_after
            "probes_before": ctx.probe(params) if stage is ctx.recipe.stages[0] else None,
            "start_params_sha256": start_digest,
            "baseline": score(Carry(cursor.state, cursor.frozen, cursor.buffer)),
            "R": [],
            "losses": [],
            "seconds": 0.0,
        }
    run = StageRun(ctx, stage, program, tasks, cursor, parent)
    run.started = time.perf_counter() - cursor.record["seconds"]
    run.speed = throughput(ctx, stage, like)
    start_task, start_step = cursor.task, cursor.task_step
    with (
        progress_bar(ctx.console) as progress,
        (ctx.out / "metrics.jsonl").open("a", buffering=1) as run.log,
        event_writer(ctx.out / "tensorboard", stage.name) as run.events,
    ):
        if resumed is not None and parallel.is_primary():
            # The stage's lines up to the checkpoint it resumed from are that checkpoint's
            # record (the runner keeps only the stages before it in the log).
            run.log.write("".join(json.dumps(e) + "\n" for e in cursor.record["losses"]))
        bar = progress.add_task(stage.name, total=total_steps, loss="-")
        progress.advance(bar, sum(task_steps[:start_task]) + start_step)
        for t in range(start_task, len(tasks)):
            run.train_task(t, start_step if t == start_task else 0, progress, bar)
            run.end_task(t, score)
    cursor.record["seconds"] = round(time.perf_counter() - run.started, 2)
    return stage_result(stage, cursor.record, run.parent)


def _step_dir(reference: str):
    stage_dir, step = resolve_checkpoint(reference)
    return stage_dir / str(step)
