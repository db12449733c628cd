"""Prompt-based continual learning as recipe methods: soft prompt tuning per task, Progressive
Prompts and L2P, on a model built with soft prompts (``model.prompts``,
:mod:`jaxcl.models.prompts`).

Each method restricts a stage's training to the prompt bank with a mask standing **behind** the
base optimizer (as :mod:`jaxcl.methods.block_expansion`): the final update of every leaf outside
the trained prompts is zeroed, so AdamW's momentum and decoupled weight decay cannot move the
base model (or the frozen prompts), which stay bit-identical.

* ``soft_prompt`` (Lester et al. 2021, one prompt per task): task ``t`` trains ``P_t`` alone; its
  input is ``[P_t; x]``. Task identity is declared: a ``task_start`` hook writes ``t`` into
  ``prompts/task`` and task ``i`` is scored with ``prompts/task = i`` (its eval view).
* ``progressive_prompts`` (Razdaibiedina et al. 2023): task ``t`` trains ``P_t``, the input is
  ``[P_t; P_{t−1}; …; P_0; x]``, earlier prompts frozen (masked). Task ``i`` is scored with the
  prompts ``≤ i``, which never change after task ``i``: its outputs are bit-identical after any
  later task.
* ``l2p`` (Wang et al. 2022): a pool of ``M`` prompts with keys; each input prepends its
  ``top_k`` prompts by ``cos(q(x), K_j)``; the whole pool and its keys train, and the objective
  gains the surrogate key loss ``λ · (1/B) Σ_b Σ_{j∈s(x_b)} (1 − cos(q(x_b), K_j))``. Task
  identity is inferred by the query-key match (no eval view).

Memory: the prompt bank (``N·L·d`` (+ ``N·d`` keys)) is the only new state; the train step still
forms the gradient (and AdamW moments) of the whole tree, as every behind mask does.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field, PrivateAttr

from jaxcl.methods.compose import Behind, Position, behind
from jaxcl.methods.protocol import Carry, Context, EvalView, Hook, MethodSpecBase, with_state
from jaxcl.models.prompts import PromptsSpec

#: the recipe names of the prompt methods, by the bank kind each needs
KIND_OF = {"soft_prompt": "per_task", "progressive_prompts": "progressive", "l2p": "pool"}


class TrainPromptsState(NamedTuple):
    """No state: what trains is read from the parameters (the declared task) at each step."""


def train_prompts(kind: str) -> Behind:
    """Keep the update of the prompt bank only. ``per_task``/``progressive``: row ``t`` of
    ``prompts/embed`` (``t`` = ``prompts/task`` in the parameters), ``u ← 0`` for every other
    leaf and row; ``pool``: ``prompts/embed`` and ``prompts/keys`` whole. Memory: none."""

    def init(params: optax.Params) -> TrainPromptsState:
        del params
        return TrainPromptsState()

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if not isinstance(updates, dict) or "prompts" not in updates:
            raise ValueError("train_prompts: the trained tree has no prompts (model.prompts)")
        out = jax.tree.map(jnp.zeros_like, updates)
        bank = updates["prompts"]
        if kind == "pool":
            out["prompts"] = {**out["prompts"], "embed": bank["embed"], "keys": bank["keys"]}
        else:
            if params is None:
                raise ValueError("train_prompts needs the parameters (the declared task)")
            t = jnp.round(params["prompts"]["task"]).astype(jnp.int32)
            rows = (jnp.arange(bank["embed"].shape[0]) == t)[:, None, None]
            embed = jnp.where(rows, bank["embed"], jnp.zeros_like(bank["embed"]))
            out["prompts"] = {**out["prompts"], "embed": embed}
        return out, state

    return behind(init, update)


def set_task(params: Any, task: int) -> Any:
    """``params`` with the declared task ``prompts/task = task`` (a new tree; nothing copied)."""
    bank = {**params["prompts"], "task": jnp.asarray(task, jnp.float32)}
    return {**params, "prompts": bank}


def trained_count(params: Any, kind: str) -> int:
    """How many of ``params`` (arrays or shapes) one task trains: ``L·d`` (one prompt) or the
    whole pool ``M·L·d + M·d``."""
    bank = params["prompts"]
    n, length, d = bank["embed"].shape
    if kind == "pool":
        return n * length * d + math.prod(bank["keys"].shape)
    return length * d


class _PromptMethod(MethodSpecBase):
    """What the three prompt methods share: the mask, the binding to ``model.prompts``."""

    position: ClassVar[Position] = "behind"
    prompts: PromptsSpec | None = Field(
        None, description="the model's prompt bank (filled in from model.prompts)"
    )
    _model: Any = PrivateAttr(None)  # the recipe's ModelSpec (L2P's key loss builds the model)

    @property
    def kind(self) -> str:
        return KIND_OF[self.name]

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if lora is not None:
            raise ValueError(
                f"trains the model's soft prompts with the base frozen, but this stage trains "
                f"LoRA adapters: drop lora or {self.name}"
            )

    def bind_model(self, model: Any) -> _PromptMethod:
        """This spec bound to the recipe's model section (``ValueError`` naming
        ``model.prompts`` when it is missing or of another kind)."""
        spec = model.prompts
        if spec is None:
            raise ValueError(
                f"model.prompts: not set; {self.name} trains soft prompts the model is built "
                f"with: add model.prompts: {{kind: {self.kind}, count: ..., length: ...}}"
            )
        if spec.kind != self.kind:
            raise ValueError(
                f"model.prompts.kind: {spec.kind!r}, but {self.name} needs kind {self.kind!r}"
            )
        bound = self.model_copy(update={"prompts": spec})
        bound._model = model
        return bound

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return train_prompts(self.kind)

    def trained(self, params: Any) -> int:
        """How many of ``params`` this method lets a task train (the plan's ``trained``)."""
        return trained_count(params, self.kind)

    def hooks(self) -> list[Hook]:
        if self.kind == "pool":
            return []

        def declare(ctx: Context, carry: Carry) -> Carry:
            return with_state(carry, params=set_task(carry.state.params, ctx.task.index))

        return [Hook("task_start", declare, f"{self.name}: declare the task's prompt")]

    def eval_view(self) -> EvalView | None:
        if self.kind == "pool":
            return None  # L2P infers the task by the query-key match
        return lambda params, carry, i: set_task(params, i)


class SoftPromptSpec(_PromptMethod):
    """``{name: soft_prompt}``: prompt tuning (Lester et al. 2021), one prompt per task, the
    base frozen; the task is declared at inference (task ``i`` is scored with ``P_i``). Needs
    ``model.prompts: {kind: per_task, count: T, length: L}``."""

    name: Literal["soft_prompt"]


class ProgressivePromptsSpec(_PromptMethod):
    """``{name: progressive_prompts}``: Progressive Prompts (Razdaibiedina et al. 2023), a new
    prompt per task, earlier ones frozen and concatenated ``[P_t; …; P_0; x]``. Needs
    ``model.prompts: {kind: progressive, count: T, length: L}``."""

    name: Literal["progressive_prompts"]


class L2PSpec(_PromptMethod):
    """``{name: l2p, lam: 0.1}``: Learning to Prompt (Wang et al. 2022), a pool of prompts with
    learnable keys, top-k by query-key cosine, the surrogate key loss weighted ``lam``. Needs
    ``model.prompts: {kind: pool, count: M, length: L, top_k: N}``."""

    name: Literal["l2p"]
    #: its key loss adds to the stage's objective (the default lm term stays)
    auxiliary_terms: ClassVar[bool] = True
    lam: float = Field(
        0.1, ge=0, description="λ, the surrogate key loss's weight (L2P's pull_constraint_coeff)"
    )

    def objective_terms(self, reference: Any) -> list[Any]:
        from jaxcl.objectives.terms import Term

        model_spec = self._model

        def fn(p: Any) -> tuple[jax.Array, dict]:
            from flax import nnx

            from jaxcl.models.prompts import key_loss

            if model_spec is None:
                raise ValueError("l2p: not bound to a model (see bind_model)")
            if isinstance(p.inputs, dict):
                raise ValueError("l2p: packed rows cannot share one prompt; use packing: none")
            graphdef = nnx.split(model_spec.abstract_model(), nnx.Param)[0]
            return key_loss(nnx.merge(graphdef, p.params), p.inputs), {}

        return [Term("l2p_keys", self.lam, fn)]


PROMPT_SPECS = (SoftPromptSpec, ProgressivePromptsSpec, L2PSpec)


def check_recipe(recipe: Any) -> None:
    """Refuse, before any work, a recipe whose prompts cannot serve its stages (``ValueError``
    naming the field): a stage without exactly one prompt method on a model with prompts, more
    tasks than per-task prompts, a prompt longer than ``seq_len``, virtual plus real tokens past
    ``max_position_embeddings``, packed rows, or a metric scored by generation."""
    spec = recipe.model.prompts
    if spec is None:
        return
    from jaxcl.eval.scoring import is_custom
    from jaxcl.eval.tasks import GENERATED

    max_pos = recipe.model.abstract_model().config.max_position_embeddings
    for i, stage in enumerate(recipe.stages):
        names = [m.name for m in stage.methods if m.name in KIND_OF]
        if len(names) != 1:
            raise ValueError(
                f"stages[{i}].methods: the model has soft prompts (model.prompts, kind "
                f"{spec.kind}), so the stage needs exactly one of soft_prompt, "
                f"progressive_prompts, l2p (got {names or 'none'}); without one the whole model "
                "would train with the prompts in front"
            )
        if spec.kind != "pool" and len(stage.tasks) > spec.count:
            raise ValueError(
                f"model.prompts.count: {spec.count} prompts, but stages[{i}] has "
                f"{len(stage.tasks)} tasks ({names[0]} keeps one prompt per task)"
            )
        if spec.length > stage.seq_len:
            raise ValueError(
                f"model.prompts.length: {spec.length} virtual tokens is above stages[{i}].seq_len "
                f"({stage.seq_len})"
            )
        if spec.virtual_tokens + stage.seq_len > max_pos:
            raise ValueError(
                f"model.prompts.length: {spec.virtual_tokens} virtual tokens ({spec.kind}) + "
                f"stages[{i}].seq_len {stage.seq_len} exceed the model's "
                f"max_position_embeddings ({max_pos})"
            )
        if stage.row_packing != "none":
            raise ValueError(
                f"stages[{i}].packing: {stage.row_packing} packs several examples in a row, "
                "which cannot share one prompt; use packing: none"
            )
        for j, metric in enumerate(stage.task_metrics):
            if metric in GENERATED or is_custom(metric):
                raise ValueError(
                    f"stages[{i}].tasks[{j}]: metric {metric} scores generations, and KV-cache "
                    "generation does not serve a model with soft prompts; use a teacher-forced "
                    "metric (exact_match, perplexity, choice accuracy)"
                )


__all__ = [
    "KIND_OF",
    "PROMPT_SPECS",
    "L2PSpec",
    "ProgressivePromptsSpec",
    "SoftPromptSpec",
    "check_recipe",
    "set_task",
    "train_prompts",
    "trained_count",
]
