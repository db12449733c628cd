"""Run a recipe: chain the stages, resume a killed run, write results.

Each stage starts from the parameters of the previous stage's final checkpoint, restored from
disk, so a fresh run and a resumed one take the same path. When ``out_dir`` already holds
checkpoints of the same recipe, the run resumes from the latest readable one (a corrupted latest
checkpoint is skipped with a warning); ``overwrite=True`` starts afresh.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from jaxcl import checkpoint, parallel
from jaxcl.data.replay import ReplayBuffer
from jaxcl.eval import make_batch_scorer
from jaxcl.eval.probes import probe_deltas, score_probes
from jaxcl.recipe import Recipe, StageSpec
from jaxcl.train.adapters import StageModel
from jaxcl.train.stage import (
    Cursor,
    TrainingDiverged,
    compile_stage,
    new_buffer,
    run_stage,
    stage_result,
)
from jaxcl.train.step import TrainState, make_apply

__all__ = ["RunDirError", "TrainingDiverged", "run_recipe"]


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
    batch_sharding: Any = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    model: StageModel | None = None  # what the step trains (set by make_context / for_stage)
    plain_like: Any = None  # shapes and shardings of the plain model parameters
    adapted: dict[tuple, RunContext] = field(default_factory=dict)  # LoRA contexts, built once

    def __post_init__(self) -> None:
        self.apply = make_apply(self.graphdef)
        self.scorer = make_batch_scorer(self.apply)
        self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules)

    def for_stage(self, stage: StageSpec) -> RunContext:
        """The context a stage runs in: the plain model, or the model with LoRA adapters (its
        graph, shardings and :class:`~jaxcl.train.adapters.StageModel`)."""
        if stage.lora is None:
            return self
        return self._with_adapters(stage.lora, zlib.crc32(stage.name.encode()))

    def _with_adapters(self, lora: Any, salt: int) -> RunContext:
        key = (lora.model_dump_json(), salt)
        if key not in self.adapted:
            model = StageModel.build(self.recipe.model, lora, seed=self.recipe.seed * 7919 + salt)
            shardings = model.place(self.mesh, self.rules, self.plain_like)
            self.adapted[key] = dataclasses.replace(
                self, graphdef=model.graphdef, param_shardings=shardings, model=model
            )
        return self.adapted[key]

    def restore_model(self, step_dir: Path) -> Any:
        """The plain model parameters of any checkpoint (a LoRA stage's adapters folded in, as
        its manifest's ``lora`` entry describes)."""
        step_dir = Path(step_dir)
        lora = checkpoint.read_manifest(step_dir).get("lora")
        model = None
        if lora:
            from jaxcl.models.spec import LoraSpec

            model = self._with_adapters(LoraSpec(**lora), 0).model
        like = model.like(self.plain_like) if model else self.plain_like
        try:
            params = checkpoint.restore_params(step_dir.parent, like, int(step_dir.name))
        except (ValueError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err)
            raise CheckpointMismatch(
                f"checkpoint {step_dir} does not hold parameters of the recipe's model "
                f"({self.recipe.model.name}): {first}"
            ) from None
        return model.export(params) if model else params

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return parallel.put_global(batch, self.batch_sharding)

    def probe(self, params) -> dict[str, Any] | None:
        """General, instruction-following and safety probe scores (``recipe.probes``)."""
        if not self.recipe.probes:
            return None
        return score_probes(self.scorer, params, self.tokenizer, put_batch=self.put_batch)

    def add_checkpoint(self, entry: dict[str, Any]) -> None:
        """Record a checkpoint in ``manifest.json`` (rewritten atomically after each save)."""
        # In place: the contexts of LoRA stages share this list.
        self.checkpoints[:] = [c for c in self.checkpoints if c["path"] != entry["path"]]
        self.checkpoints.append({k: v for k, v in entry.items() if v is not None or k == "parent"})
        if parallel.is_primary():
            _write_json(self.out / "manifest.json", {"checkpoints": self.checkpoints})


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


class CheckpointMismatch(ValueError):
    """A checkpoint whose parameter tree is not the recipe model's."""


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
    cursor: Cursor | None  # where inside it (None: from its start)
    params: Any
    parent: str
    finished: list[dict[str, Any]]  # results of the stages before ``stage``


def _candidates(ctx: RunContext):
    """Checkpoints newest first: stages in reverse recipe order, steps descending."""
    for index in reversed(range(len(ctx.recipe.stages))):
        stage = ctx.recipe.stages[index]
        stage_dir = ctx.out / "checkpoints" / stage.name
        for step in reversed(checkpoint.all_steps(stage_dir)):
            yield index, stage, stage_dir, step


def _find_resume_point(ctx: RunContext, params_like) -> ResumePoint | None:
    for index, stage, stage_dir, step in _candidates(ctx):
        path = stage_dir / str(step)
        sctx = ctx.for_stage(stage)
        like = sctx.model.like(params_like)
        try:
            program = compile_stage(sctx, stage, like, stage.steps_per_task * len(stage.tasks))
            abstract = jax.eval_shape(program.tx.init, sctx.model.split(like)[0])
            params, opt_state, frozen, replay, manifest = checkpoint.restore_checkpoint(
                stage_dir, step, like, _with_shardings(abstract, program.shardings.opt_state)
            )
        except Exception as err:  # a corrupted or half-readable checkpoint: use an older one
            ctx.console.print(
                f"[yellow]warning[/]: checkpoint {path} cannot be restored "
                f"({type(err).__name__}: {str(err)[:200]}); falling back to the previous one"
            )
            continue
        finished = _finished_stages(ctx, index, params_like)
        last_task = manifest["task_index"] == len(stage.tasks) - 1
        if manifest["task_done"] and last_task:
            finished.append(stage_result(stage, manifest["record"], str(path), params))
            return ResumePoint(index + 1, None, sctx.model.export(params), str(path), finished)
        done = manifest["task_done"]
        cursor = Cursor(
            task=manifest["task_index"] + (1 if done else 0),
            task_step=0 if done else manifest["task_step"],
            state=TrainState(
                jax.device_put(np.int32(manifest["step"]), parallel.replicated(ctx.mesh)),
                params,
                opt_state,
            ),
            frozen=frozen,
            record=manifest["record"],
            buffer=_restore_buffer(sctx, stage, program, manifest, replay),
        )
        return ResumePoint(index, cursor, None, str(path), finished)
    return None


def _restore_buffer(ctx, stage, program, manifest, arrays) -> ReplayBuffer | None:
    if manifest.get("replay"):
        return ReplayBuffer.from_state({"meta": manifest["replay"], "arrays": arrays})
    return new_buffer(ctx, stage, program)  # nothing was stored yet


def _with_shardings(abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def _finished_stages(ctx: RunContext, upto: int, params_like) -> list[dict[str, Any]]:
    """Results of stages ``0..upto-1`` from their final checkpoints' manifests."""
    out = []
    for stage in ctx.recipe.stages[:upto]:
        stage_dir = ctx.out / "checkpoints" / stage.name
        step = checkpoint.latest_step(stage_dir)
        manifest = checkpoint.read_manifest(stage_dir / str(step))
        like = ctx.for_stage(stage).model.like(params_like)
        params = checkpoint.restore_params(stage_dir, like, step)
        out.append(stage_result(stage, manifest["record"], str(stage_dir / str(step)), params))
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
    console.print(
        "  " + "  ".join(f"{k}={v}" for k, v in shown.items()) + f"  ({result['seconds']}s)"
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


def make_context(recipe: Recipe, console: Console) -> tuple[RunContext, Any]:
    """The mesh, the model as a pure function and its initial parameters, placed by the rules."""
    mesh = parallel.make_mesh(recipe.mesh.model_dump())
    rules = [tuple(r) for r in recipe.rules] if recipe.rules else parallel.DEFAULT_RULES
    graphdef, params, names, tokenizer = recipe.model.build(recipe.seed)
    param_shardings = parallel.tree_shardings(names, params, mesh, rules)
    params = jax.device_put(params, param_shardings)
    out = Path(recipe.out_dir)
    ctx = RunContext(recipe, out, mesh, rules, graphdef, param_shardings, tokenizer, console)
    ctx.model = StageModel(graphdef, names)
    ctx.plain_like = checkpoint.abstract(params)
    return ctx, params


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
    point = _find_resume_point(ctx, params) if resumable else None
    if point is None:
        if parallel.is_primary():
            (out / "metrics.jsonl").write_text("")
        point = ResumePoint(0, None, params, None, [])
    else:
        if (out / "manifest.json").exists():
            ctx.checkpoints = json.loads((out / "manifest.json").read_text())["checkpoints"]
        names_done = {s["name"] for s in point.finished}
        resumed_stage = recipe.stages[point.stage].name if point.cursor else None
        upto = int(point.cursor.state.step) if point.cursor else 0
        if parallel.is_primary():
            _trim_metrics_log(out / "metrics.jsonl", names_done, resumed_stage, upto)
        console.print(f"resuming from {point.parent}")
    stages, parent, params = list(point.finished), point.parent, point.params
    for result in stages:
        _print_stage(console, result)
    for index in range(point.stage, len(recipe.stages)):
        stage = recipe.stages[index]
        cursor = point.cursor if index == point.stage else None
        if cursor is None and parent is not None:
            # Start from the previous stage's final checkpoint, as a resumed run would.
            params = ctx.restore_model(Path(parent))
        params, result = run_stage(ctx.for_stage(stage), stage, params, parent, cursor)
        parent = result["checkpoint"]
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
        _write_json(out / "results.json", results)
    console.print(f"results: {out / 'results.json'}  ({results['seconds']}s)")
    return results
