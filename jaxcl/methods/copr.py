"""COPR as a recipe method: its objective term, its memory of historical optimal policies, and
the Lagrange multipliers of its constraints (Zhang et al., arXiv 2310.15694 / 2402.14228, ACL
Findings 2025; the formulas are in :mod:`jaxcl.objectives.copr`).

``{name: copr, ...}`` in an align stage's ``methods`` declares, through the task-boundary
protocol (:mod:`jaxcl.methods.protocol`):

* **its objective term** (``objective_terms``): ``copr``, COPR's sample-wise optimal-policy fit
  plus SFT on the current task, against ``π_{t−1}`` (the policy at the task's start, the
  ``task_start`` frozen tree); a stage with the method and no ``terms:`` trains COPR alone;
* **its memory** (``new_memory``, hook ``memory``): at the end of task ``i`` a reservoir sample
  ``R_i`` of the task's pairs is kept, each with its **historical target**
  ``log P*_i(y|Y_x) = log softmax_j(log π_{i−1}(y_j|x) + Adv_j/β)`` computed from the
  ``task_start`` tree (``π_{i−1}``) and stored in the row (:data:`~jaxcl.objectives.copr.
  TARGET_KEY`), so that no earlier policy is kept;
* **its constraint gradients** (``needs_memory_grads`` per task): each step the trainer computes
  the objective's gradient on one memory batch of every earlier task, ``∇_θ J_{C_i}`` (the
  ``copr`` term returns the fit to the stored targets on a memory batch), and the transform
  :func:`copr_constraints` adds ``Σ_i λ_i ∇J_{C_i}`` to the gradient of ``J_t`` in front of
  AdamW: the θ-gradient of COPR's Lagrangian ``J_t + Σ_i λ_i J_{C_i}``;
* **its dual ascent** (hook ``step``): after every ``dual_every`` steps the constraint values
  ``c_i`` on a memory batch of each earlier task (``dual_batch`` rows, cycling through the
  memory) give ``λ_i ← max(0, λ_i + η (c_i − d_i))``, written into the transform's state (so the
  multipliers are checkpointed with the optimizer state).

**The thresholds** ``d_i``: by default each task's own constraint value when its targets are
stored, ``c_i`` on all of ``R_i`` under the policy that finished task ``i`` ("do not fit the
stored targets worse than at the end of task ``i``"), kept in the transform's state beside the
multipliers (checkpointed) and in the memory's notes (``notes[task]["threshold"]``); so a
constraint satisfied better than at its task's end lowers ``λ_i`` toward 0 and a worse one
raises it. ``threshold: <float>`` sets one ``d`` for every task instead.

**Gradient memory**: the trainer's per-task memory gradients (as GEM's) are stacked
``[T, *param]``, ``T`` parameter-sized trees per step (``T`` earlier tasks, up to
:data:`MAX_TASKS`), although :func:`copr_constraints` only needs ``Σ_i λ_i ∇J_{C_i}``.

The multipliers after each task are recorded in the memory's notes (``notes[task]["lambda"]``,
saved in the checkpoint manifest).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field

from jaxcl.data.replay import ReplayBuffer
from jaxcl.methods.compose import Front, front
from jaxcl.methods.isolate import find_state, replace_state
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase, with_state
from jaxcl.objectives.copr import (
    TARGET_KEY,
    copr_term,
    dual_ascent,
    fit_loss,
    optimal_logps,
    rank_advantages,
)
from jaxcl.objectives.reference import annotate_reference_logps, make_pair_logps_fn
from jaxcl.objectives.terms import REF_KEYS, Term

#: the most earlier tasks whose multipliers the state holds
MAX_TASKS = 64
PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")


class CoprState(NamedTuple):
    """The multipliers ``λ_i`` of the earlier tasks' constraints and their default thresholds
    ``d_i`` (each task's constraint value when its targets were stored), in memory order,
    ``[MAX]`` each."""

    multipliers: jax.Array
    thresholds: jax.Array


def copr_constraints(lam_init: float = 1.0, max_tasks: int = MAX_TASKS) -> Front:
    """``g ← g + Σ_i λ_i g_i`` with ``g_i`` the memory gradient of earlier task ``i`` (the extra
    argument ``memory_grads``, leaves stacked ``[T, *leaf.shape]``: ``T`` parameter-sized trees
    per step) and ``λ`` this transform's state (``lam_init`` for every task until
    :func:`dual_ascent` moves it). In front of the base optimizer: the gradient of
    ``J_t + Σ_i λ_i J_{C_i}``."""

    def init(params: optax.Params) -> CoprState:
        del params
        return CoprState(
            jnp.full((max_tasks,), lam_init, jnp.float32), jnp.zeros((max_tasks,), jnp.float32)
        )

    def update(updates, state, params=None, *, memory_grads=None, **extra_args):
        del params, extra_args
        if memory_grads is None:
            raise ValueError(
                "copr needs one memory gradient per earlier task: call update(g, s, params, "
                "memory_grads=...) with leaves stacked [tasks, *leaf.shape]"
            )
        t = jax.tree.leaves(memory_grads)[0].shape[0]
        if t > max_tasks:
            raise ValueError(f"copr: {t} earlier tasks; the state holds {max_tasks} multipliers")
        lam = state.multipliers[:t]

        def one(g, m):
            shift = jnp.einsum("t,t...->...", lam, m.astype(jnp.float32))
            return (g.astype(jnp.float32) + shift).astype(g.dtype)

        return jax.tree.map(one, updates, memory_grads), state

    return front(init, update)


def _stack(rows: list[dict[str, np.ndarray]], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in keys}


def _scored_pairs(ctx: Context, params: Any, rows: list) -> np.ndarray:
    """Summed response log-probabilities ``[n, 2]`` (chosen, rejected) of ``rows`` under the
    full parameter tree ``params``."""
    pair_logps = make_pair_logps_fn(lambda p, x: ctx.apply(ctx.split(p)[0], x))
    scored = annotate_reference_logps(pair_logps, params, rows, batch_size=min(64, len(rows)))
    return np.asarray([[r[REF_KEYS[0]], r[REF_KEYS[1]]] for r in scored], np.float32)


def memory_targets(
    ctx: Context, ref_params: Any, rows: list, *, beta: float, reward_range: float
) -> list[dict[str, np.ndarray]]:
    """``rows`` with :data:`TARGET_KEY` = ``log P*(y|Y_x)`` ``[2]`` (chosen, rejected) under the
    full parameter tree ``ref_params`` (COPR's ``π_{i−1}``)."""
    if not rows:
        return []
    ref = jnp.asarray(_scored_pairs(ctx, ref_params, rows))
    targets = np.asarray(optimal_logps(ref, rank_advantages(2, reward_range), beta=beta))
    return [
        {**{k: v for k, v in row.items() if k not in REF_KEYS}, TARGET_KEY: t.astype(np.float32)}
        for row, t in zip(rows, targets)
    ]


def memory_threshold(ctx: Context, params: Any, rows: list) -> float:
    """The constraint value ``c_i = mean_x fit_loss(π_θ, stored target)`` on all of ``rows``
    (holding :data:`TARGET_KEY`) under the full parameter tree ``params``: the default ``d_i``,
    measured with the policy that finished task ``i``."""
    if not rows:
        return 0.0
    pol = jnp.asarray(_scored_pairs(ctx, params, rows))
    target = jnp.asarray(np.stack([np.asarray(r[TARGET_KEY], np.float32) for r in rows]))
    return float(jnp.mean(fit_loss(pol, target)))


def constraint_fn(apply):
    """Jitted ``(trainable, batch) -> mean_x fit_loss(π_θ, stored target)`` on memory rows."""
    pair_logps = make_pair_logps_fn(apply)

    @jax.jit
    def fn(trainable, batch):
        pol = jnp.stack(pair_logps(trainable, batch), axis=-1)  # [B, 2]: chosen, rejected
        return jnp.mean(fit_loss(pol, batch[TARGET_KEY]))

    return fn


class CoprSpec(MethodSpecBase):
    """COPR (Zhang et al.): fit each preference task's sample-wise optimal policy and keep the
    stored optimal policies of earlier tasks as constraints, with Lagrange multipliers."""

    name: Literal["copr"]
    beta: float = Field(0.1, gt=0, description="β of the KL-regularised objective")
    reward_range: float = Field(
        1.0, gt=0, description="r_x: the linear advantage runs from +r (chosen) to −r (rejected)"
    )
    sft: float = Field(1.0, ge=0, description="weight of the SFT term (NLL of the chosen)")
    capacity: int = Field(256, ge=1, description="memory: pairs kept over all finished tasks")
    quota: Literal["equal", "proportional"] = Field(
        "equal", description="how the capacity is shared between finished tasks"
    )
    lam_init: float = Field(1.0, ge=0, description="λ_i of a task when it enters the memory")
    dual_lr: float = Field(0.1, ge=0, description="η: the multipliers' ascent step")
    threshold: float | None = Field(
        None,
        ge=0,
        description="d_i: the constraint is fit_i ≤ d_i; default (null): each task's own fit "
        "when its targets are stored (at its end), one d for every task when set",
    )
    dual_every: int = Field(1, ge=1, description="steps between ascent steps on the multipliers")
    dual_batch: int = Field(16, ge=1, description="memory pairs per task in each ascent step")

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if lora is not None and lora.per_task:
            raise ValueError(
                "stores each task's targets from the policy at its start, but lora.per_task "
                "folds that policy's adapter away at the task's end: drop lora.per_task or copr"
            )
        if n_tasks - 1 > MAX_TASKS:
            raise ValueError(f"keeps at most {MAX_TASKS} earlier tasks' multipliers")

    def objective_terms(self, reference: Any) -> list[Term]:
        del reference  # COPR's reference is π_{t−1}, the policy at the task's start
        return [copr_term(beta=self.beta, reward_range=self.reward_range, sft=self.sft)]

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return copr_constraints(self.lam_init)

    def new_memory(self, *, seed: int, n_tasks: int) -> Any:
        return ReplayBuffer(self.capacity, quota=self.quota, seed=seed)

    @property
    def needs_memory_grads(self) -> bool:
        return True

    @property
    def memory_grads_per_task(self) -> bool:
        return True

    def hooks(self) -> list[Hook]:
        return [
            Hook("step", self._dual_hook(), self.name, lambda k, n: (k + 1) % self.dual_every == 0),
            Hook("memory", self._remember, self.name),
        ]

    def _remember(self, ctx: Context, carry: Carry) -> Carry:
        """Phase ``memory``: a reservoir sample of the finished task's pairs, each with its
        target ``log P*_i`` under the policy the task started from; the task's threshold
        ``d_i`` (its fit to those targets under the policy that finished it); the multipliers
        so far."""
        if "task_start" not in carry.frozen:
            raise ValueError(
                "copr: the stage keeps no task-start policy (π_{t−1}); its objective must include "
                "the copr term (do not replace it through the stage's terms)"
            )
        buf, task = carry.buffer, ctx.task
        buf.add_task(task.name, task.examples, instructions=list(task.instructions))
        t = buf.tasks.index(task.name)
        buf.items[t] = memory_targets(
            ctx,
            carry.frozen["task_start"],
            buf.stored(task.name),
            beta=self.beta,
            reward_range=self.reward_range,
        )
        d = memory_threshold(ctx, carry.state.params, buf.items[t])
        buf.notes.setdefault(task.name, {})["threshold"] = d
        state = find_state(carry.state.opt_state, CoprState)
        if state is None:
            return carry
        lam = np.asarray(jax.device_get(state.multipliers), np.float64)
        for i, name in enumerate(buf.tasks[:t]):
            note = buf.notes.setdefault(name, {}).setdefault("lambda", {})
            note[task.name] = float(lam[i])
        if t < state.thresholds.shape[0]:
            state = state._replace(thresholds=state.thresholds.at[t].set(d))
        return with_state(carry, opt_state=replace_state(carry.state.opt_state, CoprState, state))

    def _dual_hook(self):
        cache: dict[str, Any] = {}

        def hook(ctx: Context, carry: Carry) -> Carry:
            buf = carry.buffer
            stored = [n for n in buf.tasks if n != ctx.task.name]
            state = find_state(carry.state.opt_state, CoprState)
            if not stored or state is None:
                return carry
            if cache.get("ctx") is not ctx:
                cache.update(ctx=ctx, fn=constraint_fn(ctx.apply))
            trainable = ctx.trainable(carry)
            step = int(jax.device_get(carry.state.step))
            values = []
            for name in stored:
                rows = buf.examples(name)
                n = min(self.dual_batch, len(rows))
                start = (step // self.dual_every) * n
                chosen = [rows[(start + j) % len(rows)] for j in range(n)]
                values.append(
                    float(cache["fn"](trainable, _stack(chosen, (*PAIR_KEYS, TARGET_KEY))))
                )
            lam = state.multipliers
            t = len(values)
            d = state.thresholds[:t] if self.threshold is None else self.threshold
            new = dual_ascent(
                lam[:t], jnp.asarray(values, jnp.float32), lr=self.dual_lr, thresholds=d
            )
            state = state._replace(multipliers=lam.at[:t].set(new))
            return with_state(
                carry, opt_state=replace_state(carry.state.opt_state, CoprState, state)
            )

        return hook
