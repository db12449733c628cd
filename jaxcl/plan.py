"""``jaxcl run RECIPE --dry-run``: the plan of a run, without training or allocating it.

Shapes come from ``jax.eval_shape`` (a Llama-3-8B plan costs no memory); per-device bytes are
each array's shard size under the recipe's mesh and logical-axis rules.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from jaxcl import parallel
from jaxcl.data.prepare import model_tokenizer
from jaxcl.memplan import format_memory, stage_memory
from jaxcl.methods import state_shardings
from jaxcl.objectives.spec import stage_objective
from jaxcl.recipe import Recipe
from jaxcl.train.adapters import StageModel
from jaxcl.train.data import documents_and_budget
from jaxcl.train.optim import build_chain

#: More steps than this in one stage is most likely a slip (``1e12`` for ``1e3``): the plan (and
#: the run, at its start) warns, naming the stage.
ABSURD_STEPS = 10**7


def step_warnings(steps: dict[str, int]) -> list[str]:
    """A warning for every stage (name -> its total steps) over :data:`ABSURD_STEPS`."""
    out = []
    for name, n in steps.items():
        if n <= ABSURD_STEPS:
            continue
        days = n / 100 / 86400  # at a (fast) 100 steps a second
        took = f"{days / 365:,.0f} years" if days >= 365 else f"{days:,.1f} days"
        out.append(
            f"stage {name} trains {n:,} steps (more than {ABSURD_STEPS:,}; {took} even at 100 "
            "steps a second): check its steps_per_task and its tasks' steps, tokens and epochs"
        )
    return out


def given_steps(recipe: Recipe) -> dict[str, int]:
    """Each stage's steps as far as the recipe alone says (a task's ``steps``, ``tokens`` over
    its batch, else ``steps_per_task``; ``epochs`` budgets, which need the data, count 0)."""
    out = {}
    for stage in recipe.stages:
        total = 0
        for task in stage.tasks:
            if task.steps is not None:
                total += task.steps
            elif task.tokens is not None:
                total += task.tokens // (stage.batch_size * stage.seq_len)
            elif task.epochs is None:
                total += stage.steps_per_task
        out[stage.name] = total
    return out


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """The largest per-device footprint of ``tree`` under ``shardings`` (bytes)."""

    def shard_bytes(leaf, sharding) -> int:
        shape = sharding.shard_shape(leaf.shape) if hasattr(sharding, "shard_shape") else leaf.shape
        return math.prod(shape) * np.dtype(leaf.dtype).itemsize

    leaves = jax.tree.leaves(tree)
    return sum(shard_bytes(x, s) for x, s in zip(leaves, jax.tree.leaves(shardings)))


def _mesh(recipe: Recipe, devices: int | None) -> Any:
    """The recipe's mesh over this host's devices, or an abstract one over ``devices``."""
    if devices is None:
        return parallel.make_mesh(recipe.mesh.model_dump())
    sizes = parallel.resolve_mesh_shape(recipe.mesh.model_dump(), devices)
    axis_types = (AxisType.Auto,) * len(parallel.MESH_AXES)
    return AbstractMesh(sizes, parallel.MESH_AXES, axis_types=axis_types)


def plan(recipe: Recipe, devices: int | None = None) -> dict[str, Any]:
    """Stages, steps, tokens, mesh, and parameter / optimizer + CL state / frozen-tree memory per
    device for every stage. ``devices``: plan for that many devices (all processes of a
    multi-host run) instead of this host's."""
    mesh = _mesh(recipe, devices)
    rules = [tuple(r) for r in recipe.rules] if recipe.rules else parallel.DEFAULT_RULES
    _, params, names = recipe.model.build_abstract()
    shardings = parallel.tree_shardings(names, params, mesh, rules)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    n_new = 0
    if recipe.model.expand is not None:  # block expansion: the inserted blocks are new
        from jaxcl.methods.block_expansion import new_blocks, trained_count

        layers = len(params["layers"]) if 0 in params["layers"] else None
        layers = layers or jax.tree.leaves(params["layers"])[0].shape[0]
        n_new = trained_count(params, new_blocks(layers, recipe.model.expand.every))
    if recipe.model.moe_lora is not None:  # routed LoRA experts: routers, A and B are new
        from jaxcl.methods.experts import new_param_count

        n_new += new_param_count(params)
    if recipe.model.demix is not None:  # DEMix: the stacked FFN experts are new
        from jaxcl.methods.demix import new_param_count as demix_new

        n_new += demix_new(params)
    if recipe.model.prompts is not None:  # soft prompts: the bank (prompts, keys, task) is new
        n_new += sum(math.prod(x.shape) for x in jax.tree.leaves(params["prompts"]))
    if recipe.model.sapt is not None:  # SAPT: task blocks, router and reflection memory
        from jaxcl.models.sapt import new_parameters

        n_new += new_parameters(params)
    if recipe.model.add_tokens is not None:  # vocabulary expansion: the added rows are new
        from jaxcl.models.vocab import new_rows_count

        n_new += new_rows_count(recipe.model, params)
    stages = []
    try:
        tokenizer = model_tokenizer(recipe.model)
    except FileNotFoundError:  # a weights preset not installed: budgets that read no data
        tokenizer = None
    for stage in recipe.stages:
        tasks = task_budgets(recipe, stage, tokenizer)
        total = sum(t["steps"] for t in tasks)
        tx, _ = build_chain(recipe.stage_optimizer(stage), total, stage.methods)
        tree, tree_sh = params, shardings
        if stage.lora is not None:  # the stage trains adapters: they join the tree
            model = StageModel.build(recipe.model, stage.lora)
            tree = model.like(params)
            tree_sh = parallel.tree_shardings(model.logical_names, tree, mesh, rules)
            trainable, trainable_sh = model.split(tree)[0], model.split(tree_sh)[0]
        else:
            trainable, trainable_sh = tree, tree_sh
        trained = sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))
        for m in stage.methods:  # masks that declare what they let train (block_expansion)
            if hasattr(m, "trained"):
                trained = min(trained, m.trained(trainable))
        opt = jax.eval_shape(tx.init, trainable)
        opt_sh = state_shardings(tx, trainable, trainable_sh, parallel.replicated(mesh))
        objective = stage_objective(stage, None)
        frozen = len(set(objective.frozen) | set(objective.precompute))
        tree_bytes = per_device_bytes(tree, tree_sh)
        stages.append(
            {
                "name": stage.name,
                "kind": stage.kind,
                "tasks": [t.name for t in stage.tasks],
                "methods": [m.name for m in stage.methods],
                "trainable": trained,
                "objective": list(objective.terms),
                "steps": total,
                "tokens": total * stage.batch_size * stage.seq_len,
                "packing": stage.row_packing,
                "task_budgets": tasks,
                "params_bytes_per_device": tree_bytes,
                "opt_state_bytes_per_device": per_device_bytes(opt, opt_sh),
                "frozen_bytes_per_device": frozen * tree_bytes,
                "memory": stage_memory(
                    recipe,
                    stage,
                    tree,
                    tree_sh,
                    trainable,
                    trainable_sh,
                    opt,
                    opt_sh,
                    frozen,
                    dict(mesh.shape),
                    step_trees=len(objective.frozen),
                ),
            }
        )
    return {
        "recipe": recipe.name,
        "model": recipe.model.name,
        "parameters": n_params,
        "new_parameters": n_new,
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "stages": stages,
        "warnings": step_warnings({s["name"]: s["steps"] for s in stages}),
    }


def task_budgets(recipe: Recipe, stage: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Each task's steps, tokens, where its budget came from, and its peak learning rate (an
    ``epochs`` budget over packed rows counts the documents' tokens: one pass of the data)."""
    out = []
    for t, task in enumerate(stage.tasks):
        if tokenizer is None and task.epochs is not None and stage.row_packing != "none":
            raise FileNotFoundError(
                f"stage {stage.name}, task {task.name}: an epochs budget over packed rows counts "
                "the documents' tokens, which needs the model's tokenizer (install its package)"
            )
        docs, budget = documents_and_budget(recipe, stage, t, tokenizer)
        out.append(
            {
                "task": task.name,
                "steps": budget.steps,
                "tokens": budget.tokens,
                "budget": budget.given,
                "epochs": task.epochs,
                "documents": len(docs),
                "lr": recipe.task_optimizer(stage, task).lr,
            }
        )
    return out


def format_plan(p: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:.3f}"  # noqa: E731
    lines = [
        f"{p['recipe']}: {p['model']} ({p['parameters']:,} parameters"
        + (f", {p['new_parameters']:,} new" if p.get("new_parameters") else "")
        + f") on mesh {p['mesh']}",
        "",
        "| stage | kind | tasks | methods | objective | trained | steps | tokens | params GiB/dev "
        "| opt+CL state GiB/dev | frozen GiB/dev |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in p["stages"]:
        lines.append(
            f"| {s['name']} | {s['kind']} | {', '.join(s['tasks'])} | "
            f"{', '.join(s['methods']) or '-'} | {' + '.join(s['objective'])} | "
            f"{s['trainable']:,} | {s['steps']} | "
            f"{s['tokens']:,} | {gib(s['params_bytes_per_device'])} | "
            f"{gib(s['opt_state_bytes_per_device'])} | {gib(s['frozen_bytes_per_device'])} |"
        )
    lines += [
        "",
        "| stage | task | budget | steps | tokens | documents | lr |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in p["stages"]:
        for t in s["task_budgets"]:
            given = t["budget"]
            if given == "epochs" and t.get("epochs") is not None:
                given = f"{t['epochs']:g} epoch" + ("" if t["epochs"] == 1 else "s")
            lines.append(
                f"| {s['name']} | {t['task']} | {given} | {t['steps']} | "
                f"{t['tokens']:,} | {t['documents']:,} | {t['lr']:g} |"
            )
    if all("memory" in s for s in p["stages"]):  # per device, by part and dtype
        lines += format_memory(p["stages"])
    if p.get("warnings"):
        lines += ["", *(f"warning: {w}" for w in p["warnings"])]
    return "\n".join(lines)
