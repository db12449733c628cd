"""Run a recipe: chain the stages, resume a killed run, write results.

Each stage starts from the parameters of the previous stage's final checkpoint, restored from
disk, so a fresh run and a resumed one take the same path. When ``out_dir`` already holds
checkpoints of the same recipe, the run resumes from the latest readable one (a corrupted latest
checkpoint is skipped with a warning); ``overwrite=True`` starts afresh.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.table import Table

from jaxcl import checkpoint, parallel
from jaxcl.eval.probes import probe_deltas
from jaxcl.recipe import Recipe, StageSpec
from jaxcl.train.context import (
    CheckpointMismatch,
    RunContext,
    StageContext,
    make_context,
    write_json,
)
from jaxcl.train.data import check_stage_data
from jaxcl.train.stage import TrainingDiverged, run_stage, stage_result, warn_unreadable

__all__ = [
    "CheckpointMismatch",
    "RunContext",
    "RunDirError",
    "StageContext",
    "TrainingDiverged",
    "make_context",
    "run_recipe",
]


class RunDirError(RuntimeError):
    """The run folder holds another recipe's run."""


def _prepare_out_dir(out: Path, recipe: Recipe, overwrite: bool, console: Console) -> bool:
    """Claim ``out`` for this recipe; returns whether an earlier run of it can be resumed.

    Another recipe's run (different sha256) is never touched unless ``overwrite``.
    """
    stamp = out / "run.json"
    resumable = False
    if (out / "checkpoints").exists():
        previous = json.loads(stamp.read_text()).get("recipe_sha256") if stamp.exists() else None
        if overwrite:
            console.print(f"--overwrite: removing the previous run in {out}")
            if parallel.is_primary():
                shutil.rmtree(out / "checkpoints")
                (out / "manifest.json").unlink(missing_ok=True)
        elif previous != recipe.fingerprint():
            raise RunDirError(
                f"{out} holds the run of a different recipe (or unknown files); choose another "
                "out_dir (out_dir=...) or pass --overwrite to replace it"
            )
        else:
            resumable = True
    if parallel.is_primary():
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"recipe": recipe.name, "recipe_sha256": recipe.fingerprint()}))
    return resumable


@dataclass
class ResumePoint:
    stage: int  # index of the stage to run next
    candidates: list[Path]  # that stage's checkpoints to resume from, newest first ([]: its start)
    params: Any  # the parameters it starts from when none of them restores (None: read parent)
    parent: str | None  # the previous stage's final checkpoint
    finished: list[dict[str, Any]]  # results of the stages before ``stage``


def _is_final(manifest: dict[str, Any], stage: StageSpec) -> bool:
    return bool(manifest["task_done"]) and manifest["task_index"] == len(stage.tasks) - 1


def _find_resume_point(ctx: RunContext) -> ResumePoint | None:
    """The latest stage with checkpoints: done (its final checkpoint restores: the next stage
    starts from it) or in progress (its checkpoints, newest first, for the stage to restore)."""
    for index in reversed(range(len(ctx.recipe.stages))):
        stage = ctx.recipe.stages[index]
        stage_dir = ctx.out / "checkpoints" / stage.name
        paths = [stage_dir / str(s) for s in reversed(checkpoint.all_steps(stage_dir))]
        if not paths:
            continue
        try:
            if _is_final(checkpoint.read_manifest(paths[0]), stage):
                params = ctx.restore_model(paths[0])
                finished = _finished_stages(ctx, index + 1)
                return ResumePoint(index + 1, [], params, str(paths[0]), finished)
        except Exception as err:  # a corrupted or half-readable checkpoint: use an older one
            warn_unreadable(ctx.console, paths[0], err)
            paths = paths[1:]
        parent = _final_checkpoint(ctx, index - 1) if index else None
        return ResumePoint(index, paths, None, parent, _finished_stages(ctx, index))
    return None


def _final_checkpoint(ctx: RunContext, index: int) -> str:
    stage_dir = ctx.out / "checkpoints" / ctx.recipe.stages[index].name
    return str(stage_dir / str(checkpoint.latest_step(stage_dir)))


def _finished_stages(ctx: RunContext, upto: int) -> list[dict[str, Any]]:
    """Results of stages ``0..upto-1``, from their final checkpoints' manifests alone."""
    out = []
    for index, stage in enumerate(ctx.recipe.stages[:upto]):
        path = _final_checkpoint(ctx, index)
        manifest = checkpoint.read_manifest(Path(path))
        out.append(stage_result(stage, manifest["record"], path))
    return out


def _trim_metrics_log(path: Path, keep_stages: set[str], stage: str | None, upto: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["stage"] in keep_stages or (entry["stage"] == stage and entry["step"] <= upto):
            kept.append(line)
    path.write_text("".join(f"{line}\n" for line in kept))


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
    unit = " (perplexity: on ln ppl, nats)" if result.get("metrics_scale") == "log" else ""
    console.print(
        "  " + "  ".join(f"{k}={v}" for k, v in shown.items()) + f"{unit}  ({result['seconds']}s)"
    )


def _print_probes(console: Console, probes: dict[str, Any]) -> None:
    table = Table(title="cross-stage probes (R^G general, R^I instruction, R^S safety)")
    for column in ("after", "R^G", "R^I", "R^S"):
        table.add_column(column, justify="right" if column != "after" else "left")
    labels = ["start"] + [f"stage {i}" for i in range(1, len(probes["scores"]))]
    for label, row in zip(labels, probes["scores"]):
        table.add_row(label, *(f"{row[k]:.3f}" for k in ("general", "instruction", "safety")))
    console.print(table)
    console.print(
        "  "
        + "  ".join(
            f"{k}={probes[k]:+.3f}" for k in ("delta_general", "delta_instruction", "delta_safety")
        )
    )


def run_recipe(
    recipe: Recipe, console: Console | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Run (or resume) every stage of ``recipe``; writes checkpoints, ``metrics.jsonl``,
    ``manifest.json`` and ``results.json`` under ``recipe.out_dir`` and returns the results."""
    console = console or Console(quiet=not parallel.is_primary())
    out = Path(recipe.out_dir)
    resumable = _prepare_out_dir(out, recipe, overwrite, console)
    parallel.barrier("jaxcl: run folder ready")
    started = time.perf_counter()
    ctx, params = make_context(recipe, console)
    mesh = ctx.mesh
    console.print(
        f"[bold]{recipe.name}[/]: {recipe.model.name} model, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, mesh {dict(mesh.shape)}"
    )
    point = _find_resume_point(ctx) if resumable else None
    if point is None:
        if parallel.is_primary():
            (out / "metrics.jsonl").write_text("")
        point = ResumePoint(0, [], params, None, [])
    else:
        if (out / "manifest.json").exists():
            ctx.checkpoints = json.loads((out / "manifest.json").read_text())["checkpoints"]
        names_done = {s["name"] for s in point.finished}
        resumed_stage = recipe.stages[point.stage].name if point.candidates else None
        upto = checkpoint.read_manifest(point.candidates[0])["step"] if point.candidates else 0
        if parallel.is_primary():
            _trim_metrics_log(out / "metrics.jsonl", names_done, resumed_stage, upto)
        console.print(f"resuming from {point.candidates[0] if point.candidates else point.parent}")
    stages, parent = list(point.finished), point.parent
    params = params if parent is None else point.params  # the first stage: the initial model
    for result in stages:
        _print_stage(console, result)
    for stage in recipe.stages[point.stage :]:  # every stage's data, before any of them trains
        check_stage_data(stage, ctx.tokenizer, warn=console.print)
    for index in range(point.stage, len(recipe.stages)):
        stage = recipe.stages[index]
        candidates = point.candidates if index == point.stage else []
        if params is None and not candidates:
            # Start from the previous stage's final checkpoint, as a resumed run would.
            params = ctx.restore_model(Path(parent))
        result = run_stage(ctx.for_stage(stage), stage, params, parent, candidates)
        parent, params = result["checkpoint"], None
        stages.append(result)
        _print_stage(console, result)
    results = {
        "recipe": recipe.name,
        "recipe_sha256": recipe.fingerprint(),
        "stages": stages,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if recipe.probes:
        # Cross-stage forgetting: probe suites before the first stage and after every stage.
        history = [stages[0]["probes_before"]] + [s["probes_after"] for s in stages]
        results["probes"] = {"scores": history, **probe_deltas(history)}
        _print_probes(console, results["probes"])
    if parallel.is_primary():
        write_json(out / "results.json", results)
    console.print(f"results: {out / 'results.json'}  ({results['seconds']}s)")
    return results
