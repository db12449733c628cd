"""The stage loop: train each task, score every task after it, consolidate, checkpoint.

``run_recipe`` chains the stages: each one starts from the parameters of the previous stage's
final checkpoint (restored from disk, so the chain is exactly what a later run would resume).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from jaxcl import checkpoint, parallel
from jaxcl.data import batched_stream, encode_all, eval_batches
from jaxcl.eval import HIGHER_IS_BETTER, cl_metrics, make_batch_scorer, score_task
from jaxcl.methods import consolidate
from jaxcl.methods.specs import Boundary
from jaxcl.objectives.spec import stage_objective
from jaxcl.recipe import Recipe, StageSpec
from jaxcl.train.optim import build_chain
from jaxcl.train.step import TrainState, make_apply, make_train_step, state_shardings_for


@dataclass
class RunContext:
    recipe: Recipe
    out: Path
    mesh: Any
    rules: Any
    graphdef: Any
    param_shardings: Any
    tokenizer: Any
    console: Console
    apply: Any = None
    scorer: Any = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.apply = make_apply(self.graphdef)
        self.scorer = make_batch_scorer(self.apply)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        sharding = parallel.batch_sharding(self.mesh, self.rules)
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}


@dataclass
class TaskData:
    name: str
    train: list[dict[str, np.ndarray]]
    eval: list[dict[str, np.ndarray]]


def _task_data(ctx: RunContext, stage: StageSpec) -> list[TaskData]:
    def encoded(data, split):
        return encode_all(data.load(split), data.kind, ctx.tokenizer, stage.seq_len)

    return [
        TaskData(task.name, encoded(task.data, "train"), encoded(task.data, "eval"))
        for task in stage.tasks
    ]


def _score_all(ctx: RunContext, params, stage: StageSpec, eval_sets) -> list[float]:
    return [score_task(ctx.scorer, params, batches, stage.metric) for batches in eval_sets]


@dataclass
class StageProgram:
    """Everything compiled once per stage: chain, state, objective and the jitted step."""

    tx: Any
    state: TrainState
    objective: Any
    step_fn: Any
    memory_grads: bool


def _compile_stage(ctx: RunContext, stage: StageSpec, params, total_steps: int) -> StageProgram:
    transforms = [t for t in (m.transform() for m in stage.methods) if t is not None]
    tx = build_chain(ctx.recipe.stage_optimizer(stage), total_steps, transforms)
    replicated = parallel.replicated(ctx.mesh)
    shardings = state_shardings_for(tx, params, ctx.param_shardings, replicated)
    init = jax.jit(
        lambda p: TrainState(np.zeros((), np.int32), p, tx.init(p)), out_shardings=shardings
    )
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
    return StageProgram(tx, init(params), objective, step_fn, memory_grads)


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def run_stage(ctx: RunContext, stage: StageSpec, params, parent: str | None) -> tuple[Any, dict]:
    """Train ``stage`` from ``params``; returns the final params and the stage's results."""
    recipe = ctx.recipe
    tasks = _task_data(ctx, stage)
    eval_sets = [
        [ctx.put_batch(b) for b in eval_batches(t.eval, stage.eval_batch_size)] for t in tasks
    ]
    total_steps = stage.steps_per_task * len(tasks)
    program = _compile_stage(ctx, stage, params, total_steps)
    state = program.state
    # Frozen trees are separate, never-donated copies: the stage's start is DPO's reference.
    frozen = {"reference": _copy(params)} if "reference" in program.objective.frozen else {}
    start_digest = checkpoint.params_digest(state.params)
    baseline = _score_all(ctx, state.params, stage, eval_sets)
    R: list[list[float]] = []
    losses: list[dict[str, float]] = []
    replay = stage.method("replay")
    keep = max((m.memory_per_task for m in stage.methods), default=0)
    memory: list[dict[str, np.ndarray]] = []
    started = time.perf_counter()
    with _progress(ctx.console) as progress, (ctx.out / "metrics.jsonl").open("a") as log:
        bar = progress.add_task(stage.name, total=total_steps, loss="-")
        for t, task in enumerate(tasks):
            if "task_start" in program.objective.frozen:
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
            for k in range(stage.steps_per_task):
                batch = ctx.put_batch(stream[k])
                mem = None
                if program.memory_grads:
                    # Before any memory exists, the current batch stands in (g·g_ref ≥ 0).
                    mem = ctx.put_batch(memory_stream[k]) if memory_stream else batch
                state, metrics = program.step_fn(state, batch, frozen, mem)
                if (k + 1) % recipe.log_every == 0 or k + 1 == stage.steps_per_task:
                    record = {key: float(v) for key, v in jax.device_get(metrics).items()}
                    record.update(stage=stage.name, task=task.name, step=int(state.step))
                    losses.append(record)
                    log.write(json.dumps(record) + "\n")
                    progress.update(bar, loss=f"{record['loss']:.3f}")
                progress.advance(bar)
            R.append(_score_all(ctx, state.params, stage, eval_sets))
            state = _task_boundary(ctx, stage, state, stream, program.objective.scalar(frozen))
            if keep:
                rng = random.Random(f"{recipe.seed}/{stage.name}/{task.name}")
                memory.extend(rng.sample(task.train, min(keep, len(task.train))))
            parent = _save_task(ctx, stage, t, [x.name for x in tasks], state, R[-1], parent)
    result = {
        "name": stage.name,
        "kind": stage.kind,
        "metric": stage.metric,
        "tasks": [t.name for t in tasks],
        "R": R,
        "baseline": baseline,
        "metrics": cl_metrics(R, baseline, higher_is_better=HIGHER_IS_BETTER[stage.metric]),
        "losses": losses,
        "checkpoint": parent,
        "start_params_sha256": start_digest,
        "final_params_sha256": checkpoint.params_digest(state.params),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return state.params, result


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


def _save_task(ctx, stage: StageSpec, t: int, names, state: TrainState, scores, parent) -> str:
    """Checkpoint the end of task ``t`` with its manifest; returns the checkpoint folder."""
    manifest = {
        "recipe": ctx.recipe.name,
        "recipe_sha256": ctx.recipe.fingerprint(),
        "stage": stage.name,
        "task": names[t],
        "task_index": t,
        "step": int(state.step),
        "metric": stage.metric,
        "scores": dict(zip(names, scores)),
        "parent": parent,
    }
    stage_dir = ctx.out / "checkpoints" / stage.name
    path = checkpoint.save_checkpoint(
        stage_dir, int(state.step), state.params, state.opt_state, manifest
    )
    ctx.checkpoints.append(dict(manifest, path=str(path)))
    return str(path)


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


def _print_stage(console: Console, result: dict) -> None:
    metric, tasks = result["metric"], result["tasks"]
    table = Table(title=f"stage {result['name']} ({result['kind']}): R[t][i] = {metric}")
    table.add_column("after")
    for name in tasks:
        table.add_column(name, justify="right")
    fmt = (lambda v: f"{v:.2f}") if metric == "perplexity" else (lambda v: f"{v:.3f}")
    table.add_row("baseline", *map(fmt, result["baseline"]))
    for name, row in zip(tasks, result["R"]):
        table.add_row(name, *map(fmt, row))
    console.print(table)
    shown = {k: ("-" if v is None else f"{v:.3f}") for k, v in result["metrics"].items()}
    console.print(
        "  " + "  ".join(f"{k}={v}" for k, v in shown.items()) + f"  ({result['seconds']}s)"
    )


def build_model(recipe: Recipe):
    """The model's graph, its parameters (pure dict), their logical axis names, the tokenizer."""
    return recipe.model.build(recipe.seed)


class RunDirError(RuntimeError):
    """The run folder holds another recipe's run."""


def _prepare_out_dir(out: Path, recipe: Recipe, overwrite: bool, console: Console) -> None:
    """Claim ``out`` for this recipe. A previous run of the same recipe (same fingerprint) is
    replaced, as rerunning reproduces it; another recipe's run is kept unless ``overwrite``."""
    stamp = out / "run.json"
    if (out / "checkpoints").exists():
        previous = json.loads(stamp.read_text()).get("recipe_sha256") if stamp.exists() else None
        if previous != recipe.fingerprint() and not overwrite:
            raise RunDirError(
                f"{out} holds the run of a different recipe (or unknown files); choose another "
                "out_dir (out_dir=...) or pass --overwrite to replace it"
            )
        console.print(f"replacing the previous run in {out}")
        shutil.rmtree(out / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"recipe": recipe.name, "recipe_sha256": recipe.fingerprint()}))


def run_recipe(
    recipe: Recipe, console: Console | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Run every stage of ``recipe``; writes checkpoints, ``metrics.jsonl``, ``manifest.json`` and
    ``results.json`` under ``recipe.out_dir`` and returns the results."""
    console = console or Console()
    out = Path(recipe.out_dir)
    _prepare_out_dir(out, recipe, overwrite, console)
    started = time.perf_counter()
    mesh = parallel.make_mesh(recipe.mesh.model_dump())
    rules = [tuple(r) for r in recipe.rules] if recipe.rules else parallel.DEFAULT_RULES
    graphdef, params, names, tokenizer = build_model(recipe)
    param_shardings = parallel.tree_shardings(names, params, mesh, rules)
    params = jax.device_put(params, param_shardings)
    ctx = RunContext(recipe, out, mesh, rules, graphdef, param_shardings, tokenizer, console)
    (out / "metrics.jsonl").write_text("")
    console.print(
        f"[bold]{recipe.name}[/]: {recipe.model.preset} model, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, mesh {dict(mesh.shape)}"
    )
    results: dict[str, Any] = {"recipe": recipe.name, "recipe_sha256": recipe.fingerprint()}
    stages, parent = [], None
    for stage in recipe.stages:
        if parent is not None:
            # Start from the previous stage's final checkpoint, as a resumed run would.
            params = checkpoint.restore_params(Path(parent).parent, params, int(Path(parent).name))
        params, result = run_stage(ctx, stage, params, parent)
        parent = result["checkpoint"]
        stages.append(result)
        _print_stage(console, result)
    results["stages"] = stages
    results["seconds"] = round(time.perf_counter() - started, 2)
    (out / "manifest.json").write_text(json.dumps({"checkpoints": ctx.checkpoints}, indent=2))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(f"results: {out / 'results.json'}  ({results['seconds']}s)")
    return results
