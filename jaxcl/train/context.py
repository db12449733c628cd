"""What a run holds fixed, and what each stage changes.

:class:`RunContext` is fixed for a whole run: the recipe, the run folder, the mesh and its rules,
the tokenizer, the console, the checkpoints written so far, the plain model's shapes.
:class:`StageContext` is what a stage trains: the plain model, or the model with LoRA adapters
(its graph, parameter shardings, apply function and scorer). Contexts of LoRA stages are built
once per adapter layout and reused.
"""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console

from jaxcl import checkpoint, parallel
from jaxcl.data.distributed import global_batch
from jaxcl.eval import make_batch_scorer
from jaxcl.eval.probes import SUITES, lm_eval_probes, score_probes
from jaxcl.eval.tasks import ModelScorer
from jaxcl.recipe import ProbeSpec, Recipe, StageSpec
from jaxcl.train.adapters import StageModel
from jaxcl.train.step import make_apply


class CheckpointMismatch(checkpoint.CheckpointError):
    """A checkpoint whose parameter tree is not the recipe model's (a ValueError, as before)."""


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


@dataclass
class RunContext:
    """Fixed for a run: recipe, folder, mesh, rules, tokenizer, console, checkpoints so far."""

    recipe: Recipe
    out: Path
    mesh: Any
    rules: Any
    tokenizer: Any
    console: Console
    plain_like: Any  # shapes and shardings of the plain model parameters
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    plain: StageContext | None = None  # the plain model's stage context
    adapted: dict[tuple, StageContext] = field(default_factory=dict)  # LoRA contexts, built once

    @functools.cached_property
    def batch_sharding(self) -> Any:
        return parallel.batch_sharding(self.mesh, self.rules)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A whole global batch (every process holds all of it) on the mesh."""
        return parallel.put_global(batch, self.batch_sharding)

    def put_rows(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's block of a global batch (a task stream's rows) on the mesh."""
        if jax.process_count() == 1:
            return self.put_batch(rows)
        return global_batch(rows, self.batch_sharding)

    def for_stage(self, stage: StageSpec) -> StageContext:
        """The context a stage runs in: the plain model, or the model with LoRA adapters."""
        if stage.lora is None:
            return self.plain
        return self._with_adapters(stage.lora, zlib.crc32(stage.name.encode()))

    def _with_adapters(self, lora: Any, salt: int) -> StageContext:
        key = (lora.model_dump_json(), salt)
        if key not in self.adapted:
            model = StageModel.build(self.recipe.model, lora, seed=self.recipe.seed * 7919 + salt)
            shardings = model.place(self.mesh, self.rules, self.plain_like)
            self.adapted[key] = StageContext(self, model.graphdef, shardings, model)
        return self.adapted[key]

    def restore_model(self, step_dir: Path) -> Any:
        """The plain model parameters of any checkpoint (a LoRA stage's adapters folded in, as
        its manifest's ``lora`` entry describes).

        A checkpoint of another model is a :class:`CheckpointMismatch`, found from Orbax's
        metadata before any array is read; a damaged one (a file missing, truncated) a
        :class:`~jaxcl.checkpoint.CheckpointError` naming it."""
        step_dir = Path(step_dir)
        lora = checkpoint.read_manifest(step_dir).get("lora")
        model = None
        if lora:
            from jaxcl.models.spec import LoraSpec

            try:
                spec = LoraSpec(**lora)
            except (TypeError, ValueError) as err:
                raise checkpoint.CheckpointError(
                    f"{step_dir / 'manifest' / 'metadata'}: its lora entry is malformed ({err})",
                    step_dir,
                ) from None
            model = self._with_adapters(spec, 0).model
        like = model.like(self.plain_like) if model else self.plain_like
        problem = checkpoint.tree_mismatch(step_dir, like)
        if problem:
            raise CheckpointMismatch(
                f"checkpoint {step_dir} does not hold parameters of the recipe's model "
                f"({self.recipe.model.name}): {problem}",
                step_dir,
            )
        params = checkpoint.restore_params(step_dir.parent, like, int(step_dir.name))
        return model.export(params) if model else params

    def add_checkpoint(self, entry: dict[str, Any]) -> None:
        """Record a checkpoint in ``manifest.json`` (rewritten atomically after each save)."""
        self.checkpoints[:] = [c for c in self.checkpoints if c["path"] != entry["path"]]
        self.checkpoints.append({k: v for k, v in entry.items() if v is not None or k == "parent"})
        order = {s.name: i for i, s in enumerate(self.recipe.stages)}  # stages, then steps
        self.checkpoints.sort(key=lambda c: (order.get(c["stage"], len(order)), c["step"]))
        self.write_manifest()

    def drop_checkpoints(self, paths: list[str]) -> None:
        """Forget deleted checkpoints in ``manifest.json``; an entry whose ``parent`` was one of
        them names that one's parent instead (lineage names only what exists)."""
        gone = {c["path"]: c.get("parent") for c in self.checkpoints if c["path"] in set(paths)}
        if not gone:
            return
        self.checkpoints[:] = [c for c in self.checkpoints if c["path"] not in gone]
        for entry in self.checkpoints:
            seen = set()
            while entry.get("parent") in gone and entry["parent"] not in seen:
                seen.add(entry["parent"])
                entry["parent"] = gone[entry["parent"]]
        self.write_manifest()

    def write_manifest(self) -> None:
        """Rewrite ``manifest.json`` (atomically) from the checkpoints recorded so far."""
        if parallel.is_primary():
            write_json(self.out / "manifest.json", {"checkpoints": self.checkpoints})


@dataclass
class StageContext:
    """What a stage trains (the plain model or one with adapters), on its run's context."""

    run: RunContext
    graphdef: Any
    param_shardings: Any
    model: StageModel

    @functools.cached_property
    def apply(self) -> Any:
        return make_apply(self.graphdef)

    @functools.cached_property
    def model_scorer(self) -> ModelScorer:
        return ModelScorer(make_batch_scorer(self.apply), self.graphdef, self.run.tokenizer)

    @functools.cached_property
    def model_config(self) -> Any:
        """The model's configuration (layers, heads, dimensions), for hooks that need it."""
        return self.recipe.model.abstract_model().config

    # what every stage reads of its run
    recipe = property(lambda self: self.run.recipe)
    out = property(lambda self: self.run.out)
    mesh = property(lambda self: self.run.mesh)
    tokenizer = property(lambda self: self.run.tokenizer)
    console = property(lambda self: self.run.console)
    batch_sharding = property(lambda self: self.run.batch_sharding)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return self.run.put_batch(batch)

    def put_rows(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return self.run.put_rows(rows)

    def restore_model(self, step_dir: Path) -> Any:
        return self.run.restore_model(step_dir)

    def add_checkpoint(self, entry: dict[str, Any]) -> None:
        self.run.add_checkpoint(entry)

    def drop_checkpoints(self, paths: list[str]) -> None:
        self.run.drop_checkpoints(paths)

    def probe(self, params) -> dict[str, Any] | None:
        """General, instruction-following and safety probe scores (``recipe.probes``): the
        built-in suites, with the suites ``probes.lm_eval`` names scored by lm-eval instead."""
        spec = self.recipe.probes
        if spec is False:
            return None
        spec = ProbeSpec() if spec is True else spec
        out: dict[str, Any] = {"tasks": {}}
        replaced = spec.lm_eval.suites() if spec.lm_eval is not None else {}
        builtin = [suite for suite in SUITES if suite not in replaced]
        if spec.builtin and builtin:  # the suites lm-eval does not score
            out = score_probes(
                self.model_scorer.batch,
                params,
                self.tokenizer,
                put_batch=self.put_batch,
                suites=builtin,
            )
        if spec.lm_eval is not None:
            plain = self.model.export(params)  # a LoRA stage's adapters folded in
            harness = lm_eval_probes(
                spec.lm_eval,
                plain,
                self.model_config,
                self.tokenizer,
                mesh=self.mesh,
                rules=self.run.rules,
            )
            out = {**out, **harness, "tasks": {**out["tasks"], **harness["tasks"]}}
        return out


def make_context(recipe: Recipe, console: Console) -> tuple[RunContext, Any]:
    """The run's context and the model's initial parameters, placed by the rules."""
    mesh = parallel.make_mesh(recipe.mesh.model_dump())
    rules = [tuple(r) for r in recipe.rules] if recipe.rules else parallel.DEFAULT_RULES
    graphdef, params, names, tokenizer = recipe.model.build(recipe.seed)
    param_shardings = parallel.tree_shardings(names, params, mesh, rules)
    params = jax.device_put(params, param_shardings)
    run = RunContext(
        recipe, Path(recipe.out_dir), mesh, rules, tokenizer, console, checkpoint.abstract(params)
    )
    run.plain = StageContext(run, graphdef, param_shardings, StageModel(graphdef, names))
    return run, params
