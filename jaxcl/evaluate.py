"""``jaxcl eval CHECKPOINT RECIPE``: score any checkpoint on every task of a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jaxcl import checkpoint
from jaxcl.methods.protocol import Carry
from jaxcl.recipe import Recipe, StageSpec
from jaxcl.train.runner import make_context
from jaxcl.train.stage import compile_stage, restore_cursor, task_data


def _views(run, stage: StageSpec, path: Path):
    """``params_for(i, params)`` for the tasks of the stage ``path`` is a checkpoint of, when
    its methods declare eval views (PackNet's masks, an EMA): read from the checkpoint's
    optimizer state and frozen trees, as training scored them. None otherwise."""
    sctx = run.for_stage(stage)
    like = sctx.model.like(run.plain_like)
    program = compile_stage(sctx, stage, like, stage.steps_per_task * len(stage.tasks))
    if program.view is None:
        return None
    cursor = restore_cursor(sctx, stage, program, path)
    carry = Carry(cursor.state, cursor.frozen, cursor.buffer)
    scorer = program.scorer or sctx.model_scorer  # a method's scoring function (DEMix)
    return lambda i: program.view(cursor.state.params, carry, i), scorer


def evaluate(
    recipe: Recipe,
    checkpoint_dir: str | Path,
    console: Console | None = None,
    *,
    lm_eval: dict[str, Any] | None = None,
) -> dict:
    """``{"checkpoint", "stages": {stage: {"metric", "task_metrics", "scores"}}, "probes"}`` for
    the parameters of ``checkpoint_dir`` (a step folder ``OUT/checkpoints/<stage>/<step>``):
    every task scored by its own metric (``task_metrics: {task: metric}``), as in training, the
    checkpoint's own stage's tasks on their eval views where its methods declare them;
    ``metric`` is the stage-level name. ``lm_eval``: ``{"tasks": [...], "limit": N,
    "include_path": DIR}`` also scores lm-evaluation-harness tasks (``out["lm_eval"]``:
    ``{task: {metric: value}}``)."""
    console = console or Console()
    path = Path(checkpoint_dir)
    if not (path / "params").exists() or not path.name.isdigit():
        raise FileNotFoundError(
            f"{path} is not a jaxcl checkpoint (expected OUT/checkpoints/<stage>/<step> "
            "holding params/)"
        )
    run, _ = make_context(recipe, console)
    ctx = run.plain
    params = ctx.restore_model(path)
    own_stage = checkpoint.read_manifest(path).get("stage")
    out: dict[str, Any] = {"checkpoint": str(path), "stages": {}}
    for stage in recipe.stages:
        views = _views(run, stage, path) if stage.name == own_stage else None
        scores = {}
        for i, task in enumerate(task_data(ctx, stage)):
            scorer, p = ctx.model_scorer, params
            if views is not None:  # the checkpoint's own stage: each task on its view
                view, scorer = views
                p = view(i)
            scores[task.name] = task.eval.on_devices(ctx.put_batch).score(scorer, p)
        out["stages"][stage.name] = {
            "metric": stage.metric,
            "task_metrics": dict(zip([t.name for t in stage.tasks], stage.task_metrics)),
            "scores": scores,
        }
    out["probes"] = ctx.probe(params)
    if lm_eval is not None:
        out["lm_eval"] = _lm_eval(run, ctx, params, lm_eval)
    return out


def _lm_eval(run, ctx, params, request: dict[str, Any]) -> dict[str, dict[str, float]]:
    try:
        from jaxcl.eval.harness_run import run_lm_eval
    except ImportError as err:
        raise ValueError(
            f"--lm-eval needs lm-evaluation-harness ({err}); pip install -e '.[lm-eval]'"
        ) from None
    return run_lm_eval(
        params,
        ctx.model_config,
        run.tokenizer,
        request["tasks"],
        limit=request.get("limit"),
        include_path=request.get("include_path"),
        mesh=run.mesh,
        rules=run.rules,
    )


def print_evaluation(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"scores of {result['checkpoint']}")
    for column in ("stage", "metric", "task", "score"):
        table.add_column(column)
    for stage, entry in result["stages"].items():
        for task, score in entry["scores"].items():
            metric = entry.get("task_metrics", {}).get(task, entry["metric"])
            table.add_row(stage, metric, task, f"{score:.4f}")
    console.print(table)
    probes = result.get("probes")
    if probes:
        suites = [k for k in ("general", "instruction", "safety") if k in probes]
        console.print("probes: " + "  ".join(f"{k}={probes[k]:.3f}" for k in suites))
    for task, scores in (result.get("lm_eval") or {}).items():
        console.print(f"lm-eval {task}: " + "  ".join(f"{k}={v:.4f}" for k, v in scores.items()))
