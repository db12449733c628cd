"""MoE-LoRA as a recipe method: train the routed LoRA experts, one added per task or a pool.

The experts are attached when the model is built (``model: {moe_lora: {experts: E, ...}}``, see
:mod:`jaxcl.models.experts`); this method restricts a stage's training to them, as a mask behind
the base optimizer (the base weights, embeddings and head stay bit-identical):

* ``mode: per_task`` (default; MoELoRA / EasyCL's continual MoE-LoRA): at the start of task
  ``t`` (0-based) experts ``0..t`` are active (the others' gates are exactly 0); only expert
  ``t``'s ``A``, ``B`` and the routers train, earlier experts are frozen. Needs ``E ≥`` the
  stage's task count.
* ``mode: pool`` (LoRAMoE): all ``E`` experts active from the start; every expert and router
  trains on every task.

Task identity at inference is inferred: the router weighs the experts per token (no eval view).
The load-balancing term's weight is the model's ``moe_lora.balance`` (its gradient is added in
the backward pass of every routed projection; :mod:`jaxcl.models.experts`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field, PrivateAttr

from jaxcl.methods.compose import Behind, Position, behind
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase, with_state
from jaxcl.models.experts import ATTR, set_active

Mode = Literal["per_task", "pool"]


class ExpertMaskState(NamedTuple):
    """No state: the expert being trained is read from the ``active`` leaves of the params."""


def _keys(path: tuple) -> list[Any]:
    return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]


def _expert_rows(leaf_name: str, x: Any, current: Any) -> Any:
    """A boolean mask broadcastable to ``x`` that keeps expert ``current`` of an ``a``/``b``
    leaf (``[..., E, in, r]`` / ``[..., E, r, out]``: the expert axis is the third from last)."""
    e = x.shape[-3]
    rows = jnp.arange(e) == current
    return rows.reshape((e, 1, 1))


def train_experts(mode: Mode) -> Behind:
    """Keep the update of the routed experts only: ``pool``: every expert's ``A``, ``B`` and the
    routers; ``per_task``: the routers and the newest active expert ``t = Σ_e m_e − 1`` (its
    ``A_t``, ``B_t``). Every other leaf (base weights, the masks ``m``) gets ``u ← 0``."""

    def init(params: optax.Params) -> ExpertMaskState:
        del params
        return ExpertMaskState()

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if mode == "per_task" and params is None:
            raise ValueError("moe_lora (per_task): the mask needs the params (the active experts)")
        current = None
        if mode == "per_task":
            actives = [
                x
                for p, x in jax.tree_util.tree_leaves_with_path(params)
                if ATTR in _keys(p) and _keys(p)[-1] == "active"
            ]
            flat = actives[0].reshape(-1, actives[0].shape[-1])[0]
            current = jnp.sum(flat > 0) - 1

        def keep(path, u):
            keys = _keys(path)
            if ATTR not in keys:
                return jnp.zeros_like(u)
            name = keys[-1]
            if name == "router":
                return u
            if name in ("a", "b"):
                if mode == "pool":
                    return u
                return jnp.where(_expert_rows(name, u, current), u, jnp.zeros_like(u))
            return jnp.zeros_like(u)  # the active-expert masks: set by hooks, never trained

        return jax.tree_util.tree_map_with_path(keep, updates), state

    return behind(init, update)


def trained_count(params: Any, mode: Mode) -> int:
    """How many parameters of ``params`` (arrays or shapes) the mask lets one task train."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        keys = _keys(path)
        if ATTR not in keys:
            continue
        size = math.prod(x.shape)
        if keys[-1] == "router":
            total += size
        elif keys[-1] in ("a", "b"):
            total += size if mode == "pool" else size // x.shape[-3]
    return total


def new_param_count(params: Any) -> int:
    """How many parameters the routed experts add to ``params`` (0 without them)."""
    return sum(
        math.prod(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(params)
        if ATTR in _keys(p)
    )


class MoELoraSpec(MethodSpecBase):
    """``{name: moe_lora, mode: per_task|pool}``: train the routed LoRA experts that
    ``model.moe_lora`` attached, one expert added per task (earlier ones frozen) or a pool."""

    name: Literal["moe_lora"]
    position: ClassVar[Position] = "behind"
    mode: Mode = Field(
        "per_task",
        description="per_task: expert t added (and trained, with the routers) at task t, "
        "earlier experts frozen; pool: all experts active and trained on every task",
    )
    experts: int | None = Field(
        None, ge=1, description="experts per projection (filled in from model.moe_lora)"
    )
    _n_tasks: int | None = PrivateAttr(None)

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if lora is not None:
            raise ValueError(
                "trains the routed experts of model.moe_lora, but this stage trains LoRA "
                "adapters: drop lora or moe_lora"
            )
        self._n_tasks = n_tasks

    def bind_model(self, model: Any) -> MoELoraSpec:
        """This spec with ``experts`` read from ``model.moe_lora`` (``ValueError`` naming the
        field when the model has no experts or, per task, fewer experts than tasks)."""
        growth = getattr(model, "moe_lora", None)
        if growth is None:
            raise ValueError(
                "the model has no routed experts: set model.moe_lora: {experts: E} (E >= the "
                "stage's tasks for mode per_task)"
            )
        if self.experts is not None and self.experts != growth.experts:
            raise ValueError(
                f"experts: {self.experts} differs from model.moe_lora.experts ({growth.experts})"
            )
        n = self._n_tasks
        if self.mode == "per_task" and n is not None and growth.experts < n:
            raise ValueError(
                f"model.moe_lora.experts: {growth.experts} experts cannot give each of the "
                f"stage's {n} tasks its own (mode per_task): set it to at least {n}"
            )
        out = self.model_copy(update={"experts": growth.experts})
        out._n_tasks = n
        return out

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return train_experts(self.mode)

    def trained(self, params: Any) -> int:
        """How many of ``params`` this method lets a task train (the plan's ``trained``)."""
        return trained_count(params, self.mode)

    def active(self, task: int) -> list[float]:
        """The active-expert mask while task ``task`` trains."""
        if self.experts is None:
            raise ValueError("moe_lora: not bound to a model (see bind_model)")
        if self.mode == "pool":
            return [1.0] * self.experts
        if task >= self.experts:
            raise ValueError(
                f"model.moe_lora.experts: task {task} needs expert {task}, the model has "
                f"{self.experts}"
            )
        return [1.0 if e <= task else 0.0 for e in range(self.experts)]

    def hooks(self) -> list[Hook]:
        def start(ctx: Context, carry: Carry) -> Carry:
            params = set_active(carry.state.params, self.active(ctx.task.index))
            return with_state(carry, params=params)

        return [Hook("task_start", start, "moe_lora")]
