"""DEMix (Gururangan et al., NAACL 2022) as a recipe method: one feed-forward expert per domain.

The experts are built with the model (``model: {demix: {experts: E}}``, see
:mod:`jaxcl.models.demix`). This method runs the paper's continual "adding a domain" setting on a
``pretrain`` stage, one domain per task:

* **task start** (domain ``t``): expert ``t`` is initialised from the existing expert with the
  highest cached posterior on ``prior_sequences`` sequences of the new domain (``init:
  nearest``, the paper's choice; for the first domain, or ``init: base``, from the base FFN;
  ``init: previous``: from expert ``t − 1``); it is selected in every layer and experts
  ``0..t`` become active. Up to ``prior_sequences`` of the domain's sequences are kept (a
  frozen tree, its "dev" sequences).
* **training**: only expert ``t``'s FFN weights move (a mask behind the base optimizer); every
  other expert, attention, norms, embeddings and head stay bit-identical.
* **after the last step** (before scoring): the cached prior of every domain seen so far is
  re-estimated over the active experts on its kept sequences (the paper's code's moving
  average of the sequences' posteriors, weight ``prior_alpha``).
* **evaluation**: every task is scored with the posterior mixture of the active experts
  (:func:`jaxcl.models.demix.mixture_logprobs`, the stage's scorer through
  :meth:`MethodSpecBase.eval_apply`); task ``i`` with its cached prior (uniform over the active
  experts for a domain not yet trained: its sequences are not kept yet). Task identity is
  inferred, never given.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field, PrivateAttr

from jaxcl.methods.compose import Behind, Position, behind
from jaxcl.methods.protocol import (
    Carry,
    Context,
    EvalView,
    Hook,
    MethodSpecBase,
    with_frozen,
    with_state,
)
from jaxcl.models import demix as dm

Init = Literal["nearest", "base", "previous"]
PRIORS = "demix_priors"  # frozen: [E, E], row i the cached prior of domain i
DEV = "demix_dev{}"  # frozen: domain t's kept sequences (tokens, loss_mask[, packing])


class ExpertMaskState(NamedTuple):
    """No state: the expert being trained is read from the ``select`` leaves of the params."""


def _keys(path: tuple) -> list[Any]:
    return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]


def _expert_axis(name: str, x: Any) -> int:
    return x.ndim - (2 if name.endswith("_bias") else 3)


def train_expert() -> Behind:
    """Keep the update of the selected expert's FFN weights only: ``u ← u·[e = t]`` on the
    ``[.., E, ..]`` expert stacks, ``t = argmax(select)``; ``u ← 0`` on every other leaf (base
    weights, the other experts, the control leaves). Memory: none."""

    def init(params: optax.Params) -> ExpertMaskState:
        del params
        return ExpertMaskState()

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("demix: the mask needs the params (the selected expert)")
        current = jnp.argmax(dm.read_leaf(params, "select"))

        def keep(path, u):
            keys = _keys(path)
            if dm.ATTR not in keys or keys[-1] not in dm.WEIGHTS:
                return jnp.zeros_like(u)
            axis = _expert_axis(keys[-1], u)
            rows = (jnp.arange(u.shape[axis]) == current).reshape(
                (-1,) + (1,) * (u.ndim - axis - 1)
            )
            return jnp.where(rows, u, jnp.zeros_like(u))

        return jax.tree_util.tree_map_with_path(keep, updates), state

    return behind(init, update)


def trained_count(params: Any) -> int:
    """How many parameters of ``params`` (arrays or shapes) one domain trains: one expert."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        keys = _keys(path)
        if dm.ATTR in keys and keys[-1] in dm.WEIGHTS:
            total += math.prod(x.shape) // x.shape[_expert_axis(keys[-1], x)]
    return total


def new_param_count(params: Any) -> int:
    """How many parameters the DEMix experts (and their control leaves) add to ``params``."""
    return sum(
        math.prod(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(params)
        if dm.ATTR in _keys(p)
    )


def _rows(batches, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` valid rows of ``batches`` (host arrays)."""
    kept: dict[str, list] = {}
    count = 0
    for batch in batches:
        valid = np.asarray(batch["valid"]) > 0 if "valid" in batch else None
        for key in ("tokens", "loss_mask", "positions", "segment_ids"):
            if key in batch:
                rows = np.asarray(batch[key])
                kept.setdefault(key, []).append(rows if valid is None else rows[valid])
        count += int(valid.sum()) if valid is not None else len(np.asarray(batch["tokens"]))
        if count >= n:
            break
    return {k: np.concatenate(v)[:n] for k, v in kept.items()}


class DemixSpec(MethodSpecBase):
    """``{name: demix}``: one DEMix feed-forward expert per domain (task) of a pretrain stage;
    inference mixes the experts by the domain posterior (task identity inferred)."""

    name: Literal["demix"]
    position: ClassVar[Position] = "behind"
    stage_kinds: ClassVar[tuple[str, ...]] = ("pretrain",)
    init: Init = Field(
        "nearest",
        description="a new expert's initial weights: nearest (the expert with the highest cached "
        "posterior on the new domain, the paper's), base (the base FFN), previous (expert t-1)",
    )
    prior_sequences: int = Field(
        100, ge=1, description="sequences of each domain the cached prior is estimated on"
    )
    prior_alpha: float = Field(
        0.3,
        gt=0,
        le=1,
        description="weight of each new sequence's posterior in the moving average that "
        "estimates the cached prior (the reference's ewm alpha)",
    )
    batch_size: int = Field(8, ge=1, description="rows per forward when estimating priors")
    experts: int | None = Field(None, ge=1, description="experts per layer (from model.demix)")
    _n_tasks: int | None = PrivateAttr(None)
    _apply: Any = PrivateAttr(None)

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if lora is not None:
            raise ValueError(
                "trains the DEMix experts of model.demix, but this stage trains LoRA adapters: "
                "drop lora or demix"
            )
        self._n_tasks = n_tasks

    def bind_model(self, model: Any) -> DemixSpec:
        """This spec with ``experts`` read from ``model.demix`` (``ValueError`` naming the field
        when the model has none or fewer experts than the stage has domains)."""
        growth = getattr(model, "demix", None)
        if growth is None:
            raise ValueError(
                "the model has no DEMix experts: set model.demix: {experts: E} (E >= the stage's "
                "domains)"
            )
        if self.experts is not None and self.experts != growth.experts:
            raise ValueError(
                f"experts: {self.experts} differs from model.demix.experts ({growth.experts})"
            )
        n = self._n_tasks
        if n is not None and growth.experts < n:
            raise ValueError(
                f"model.demix.experts: {growth.experts} experts cannot give each of the stage's "
                f"{n} domains its own: set it to at least {n}"
            )
        out = self.model_copy(update={"experts": growth.experts})
        out._n_tasks = n
        return out

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return train_expert()

    def trained(self, params: Any) -> int:
        """How many of ``params`` one domain trains (the plan's ``trained``)."""
        return trained_count(params)

    # -- priors ---------------------------------------------------------------------------

    def _logliks(self, ctx: Context, params: Any, rows: dict[str, np.ndarray]) -> np.ndarray:
        """``[N, E]``: each expert's log-likelihood of each kept sequence."""
        if self._apply is None:
            self._apply = jax.jit(lambda p, b: dm.sequence_logliks(ctx.apply, p, b))
        out = []
        n = len(rows["tokens"])
        for i in range(0, n, self.batch_size):
            chunk = {k: jnp.asarray(v[i : i + self.batch_size]) for k, v in rows.items()}
            out.append(np.asarray(self._apply(params, chunk)).T)
        return np.concatenate(out)

    def prior(self, ctx: Context, params: Any, rows: dict[str, np.ndarray]) -> np.ndarray:
        """The cached prior ``[E]`` over the active experts on ``rows``."""
        active = np.asarray(dm.read_leaf(params, "active"))
        return dm.cached_prior(self._logliks(ctx, params, rows), self.prior_alpha, active)

    # -- hooks ----------------------------------------------------------------------------

    def hooks(self) -> list[Hook]:
        def start(ctx: Context, carry: Carry) -> Carry:
            t, e = ctx.task.index, self.experts
            if e is None:
                raise ValueError("demix: not bound to a model (see bind_model)")
            if t >= e:
                raise ValueError(f"model.demix.experts: domain {t} needs expert {t}, it has {e}")
            rows = _rows(ctx.batches(self.prior_sequences), self.prior_sequences)  # lazy
            params = carry.state.params
            source = self._source(ctx, params, rows, t)
            params = dm.copy_expert(params, source, t)
            params = dm.set_leaf(params, "active", [1.0 if j <= t else 0.0 for j in range(e)])
            params = dm.set_leaf(params, "select", jax.nn.one_hot(t, e))
            carry = with_frozen(carry, **{DEV.format(t): jax.tree.map(jnp.asarray, rows)})
            return with_state(carry, params=params)

        def priors(ctx: Context, carry: Carry) -> Carry:
            params, e = carry.state.params, self.experts or 0
            table = np.zeros((e, e), np.float32)
            for i in range(e):
                rows = carry.frozen.get(DEV.format(i))
                if rows is not None:
                    rows = {k: np.asarray(v) for k, v in rows.items()}
                    table[i] = self.prior(ctx, params, rows)
            return with_frozen(carry, **{PRIORS: jnp.asarray(table)})

        last = lambda k, steps: k == steps - 1  # noqa: E731
        return [Hook("task_start", start, "demix"), Hook("step", priors, "demix", last)]

    def _source(self, ctx: Context, params: Any, rows: dict, t: int) -> int | None:
        """The expert the new expert ``t`` starts from (None: the base FFN)."""
        if t == 0 or self.init == "base":
            return None
        if self.init == "previous":
            return t - 1
        earlier = dm.set_leaf(
            params, "active", [1.0 if j < t else 0.0 for j in range(self.experts)]
        )
        return int(np.argmax(self.prior(ctx, earlier, rows)))

    # -- evaluation -----------------------------------------------------------------------

    def eval_view(self) -> EvalView | None:
        """Task ``i`` scored with its cached prior (uniform over the active experts when the
        domain has none yet)."""

        def view(params: Any, carry: Any, i: int) -> Any:
            table = carry.frozen.get(PRIORS) if carry is not None else None
            active = dm.read_leaf(params, "active")
            prior = active if table is None or float(jnp.sum(table[i])) == 0 else table[i]
            return dm.set_leaf(params, "prior", prior)

        return view

    def eval_apply(self, apply: Any) -> Any:
        """Scores are the posterior mixture's log-probabilities."""
        return lambda params, inputs: dm.mixture_logprobs(apply, params, inputs)
