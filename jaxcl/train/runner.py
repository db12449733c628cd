"""Run a recipe: chain the stages, resume a killed run, write results.

Each stage starts from the parameters of the previous stage's final checkpoint, restored from
disk, so a fresh run and a resumed one take the same path. When ``out_dir`` already holds
checkpoints of the same recipe, the run resumes from the latest readable one; every file the
resume reads is checked first, and a damaged one is named in a warning and fallen back from
(:mod:`jaxcl.train.resume`: the fallback order); ``overwrite=True`` starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.table import Table

from jaxcl import checkpoint, compile_cache, parallel
from jaxcl.eval.probes import probe_deltas
from jaxcl.plan import given_steps, step_warnings
from jaxcl.recipe import Recipe
from jaxcl.train import resume
from jaxcl.train.context import (
    CheckpointMismatch,
    RunContext,
    StageContext,
    make_context,
    write_json,
)
from jaxcl.train.data import check_stage_data
from jaxcl.train.lock import FolderLocked, hold
from jaxcl.train.resume import ResumePoint
from jaxcl.train.resume import find_resume_point as _find_resume_point
from jaxcl.train.stage import TrainingDiverged, run_stage, warn_unreadable

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
    """The run folder cannot be used: another recipe's run, another run holding it, or not a
    writable folder."""


def _prepare_out_dir(out: Path, recipe: Recipe, overwrite: bool, console: Console) -> bool:
    """Claim ``out`` for this recipe; returns whether an earlier run of it can be resumed.

    Another recipe's run (different sha256) is never touched unless ``overwrite``.
    """
    stamp = out / "run.json"
    resumable = False
    if (out / "checkpoints").exists():
        previous = resume.recorded_fingerprint(out, recipe.fingerprint(), console)
        if overwrite:
            console.print(f"--overwrite: removing the previous run in {out}")
            if parallel.is_primary():
                checkpoint.remove_run_data(out / "checkpoints", out)
                checkpoint.remove_run_data(out / "manifest.json", out)
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


def _make_out_dir(out: Path) -> None:
    """Create ``out`` if need be; a RunDirError when it is a file or cannot be written."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out_dir {out} is a file, not a folder: choose another out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"cannot create out_dir {out}: {err.strerror} ({err.filename}); choose another out_dir"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunDirError(f"out_dir {out} is not writable: choose another out_dir")


@contextlib.contextmanager
def claim_run_dir(out: Path) -> Iterator[None]:
    """Hold run folder ``out`` (created if need be) for the block: the primary process takes
    its exclusive lock (:mod:`jaxcl.train.lock`; re-entrant), the other processes of a
    multi-process run follow its outcome. A RunDirError names the run holding it, or says why
    ``out`` cannot be used; then nothing in ``out`` has been touched."""
    error, held = None, contextlib.ExitStack()
    if parallel.is_primary():
        try:
            _make_out_dir(out)
            held.enter_context(hold(out))
        except (RunDirError, FolderLocked) as err:
            error = str(err)
        except OSError as err:
            error = f"cannot lock out_dir {out}: {err.strerror}; choose another out_dir"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(int(error is not None))
        if failed and error is None:
            error = f"the primary process could not claim out_dir {out} (its message says why)"
    if error is not None:
        held.close()
        raise RunDirError(error)
    with held:
        yield


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
        table.add_row(label, *(_score(row.get(k)) for k in ("general", "instruction", "safety")))
    console.print(table)
    keys = ("delta_general", "delta_instruction", "delta_safety")
    console.print("  " + "  ".join(f"{k}={probes[k]:+.3f}" for k in keys if k in probes))


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _resume_label(point: ResumePoint, recipe: Recipe) -> str:
    if point.candidates:
        return str(point.candidates[0])
    if point.parent is not None:
        return point.parent
    return f"the start of stage {recipe.stages[point.stage].name}"


def _initial_params(ctx: RunContext) -> Any:
    """The recipe model's initial parameters, placed as :func:`make_context` places them."""
    _, params, _, _ = ctx.recipe.model.build(ctx.recipe.seed)
    return jax.device_put(params, ctx.plain.param_shardings)


def _run_stages(ctx: RunContext, point: ResumePoint) -> list[dict[str, Any]]:
    """Every stage's result: those ``point`` found done, then each stage from ``point.stage``
    on, run (or resumed) from the previous one's final checkpoint (``point.params``: what the
    first of them starts from, if known). When that final checkpoint does not restore, the run
    goes back to its stage, which resumes from an older checkpoint of its own or retrains; a
    later stage keeps its checkpoints only when trained from what the stage before ends with
    now (:mod:`jaxcl.train.resume`)."""
    recipe, console = ctx.recipe, ctx.console
    stages, parent = list(point.finished), point.parent
    params, point.params = point.params, None  # held here alone, freed once a stage starts
    for result in stages:
        _print_stage(console, result)
    for stage in recipe.stages[point.stage :]:  # every stage's data, before any of them trains
        check_stage_data(stage, ctx.tokenizer, warn=console.print)
    index, trusted = point.stage, point.stage  # the trusted stage's checkpoints need no check
    pending, later = {index: list(point.candidates)}, dict(point.later)
    digests: dict[int, str] = {}  # what each checked stage's checkpoints must start from
    failed: set[str] = set()  # final checkpoints that did not restore: going back happens once
    while index < len(recipe.stages):
        stage = recipe.stages[index]
        candidates = pending.pop(index, [])
        try:
            if index > trusted and index in later:  # left from before an earlier stage retrained
                if params is None:
                    params = ctx.restore_model(Path(parent))
                digests[index] = checkpoint.params_digest(params)
                candidates = resume.descendants(ctx, stage, later.pop(index), digests[index])
            if params is None and not candidates:
                # Start from the previous stage's final checkpoint, as a resumed run would.
                params = ctx.restore_model(Path(parent))
            result = run_stage(ctx.for_stage(stage), stage, params, parent, candidates)
        except checkpoint.CheckpointError as err:
            if parent is None or err.path is None or Path(err.path) != Path(parent):
                raise
            if isinstance(err, CheckpointMismatch) or str(parent) in failed:
                raise  # another model's checkpoint, or one this run rewrote and still fails
            failed.add(str(parent))
            # The previous stage's final checkpoint does not restore: back to that stage.
            index -= 1
            stage, bad, start = recipe.stages[index], int(Path(parent).name), digests.get(index)
            older = [
                f
                for f in resume.scan_stage(ctx, stage, quiet=True)
                if int(f.path.name) < bad
                and start in (None, f.manifest["record"].get("start_params_sha256"))
            ]
            pending[index] = [f.path for f in older]
            warn_unreadable(console, parent, err, resume.fallback_text(stage, pending[index]))
            stages = stages[:index]
            parent = stages[-1]["checkpoint"] if stages else None
            params = _initial_params(ctx) if parent is None else None
            trusted = index
            resume.trim_metrics_log(ctx, stages)
            check_stage_data(stage, ctx.tokenizer, warn=console.print)
            continue
        parent, params = result["checkpoint"], None
        stages.append(result)
        _print_stage(console, result)
        index += 1
    return stages


def run_recipe(
    recipe: Recipe, console: Console | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Run (or resume) every stage of ``recipe``; writes checkpoints, ``metrics.jsonl``,
    ``manifest.json`` and ``results.json`` under ``recipe.out_dir`` and returns the results.
    The run holds its folder throughout (:func:`claim_run_dir`): a second run into it is
    refused with a RunDirError naming the holder."""
    console = console or Console(quiet=not parallel.is_primary())
    with claim_run_dir(Path(recipe.out_dir)), compile_cache.CompileClock() as clock:
        cache = compile_cache.resolve(recipe.compile_cache, recipe.out_dir)
        return _run_claimed(recipe, console, overwrite, clock, compile_cache.enable(cache))


def _run_claimed(
    recipe: Recipe,
    console: Console,
    overwrite: bool,
    clock: compile_cache.CompileClock,
    cache: Path | None,
) -> dict[str, Any]:
    out = Path(recipe.out_dir)
    for warning in step_warnings(given_steps(recipe)):
        console.print(f"[yellow]warning:[/] {warning}")
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
        resume.rebuild_manifest(ctx, point.found)
        resume.rewrite_metrics_log(ctx, point.finished)
        console.print(f"resuming from {_resume_label(point, recipe)}")
    if point.parent is None:  # the first stage starts from the initial model
        point.params = params
    del params  # the stages hold what they start from, no more
    stages = _run_stages(ctx, point)
    results = {
        "recipe": recipe.name,
        "recipe_sha256": recipe.fingerprint(),
        "stages": stages,
        "seconds": round(time.perf_counter() - started, 2),
        # compilation inside that time; the persistent cache serves repeated shapes
        "compile": dict(clock.summary(), cache_dir=None if cache is None else str(cache)),
    }
    if recipe.probes:
        # Cross-stage forgetting: probe suites before the first stage and after every stage.
        history = [stages[0]["probes_before"]] + [s["probes_after"] for s in stages]
        results["probes"] = {"scores": history, **probe_deltas(history)}
        _print_probes(console, results["probes"])
    if parallel.is_primary():
        write_json(out / "results.json", results)
    console.print(f"{clock.line()}; cache {cache or 'off'}")
    console.print(f"results: {out / 'results.json'}  ({results['seconds']}s)")
    return results
