"""SAPT (Zhao et al., ACL 2024) as a recipe method: one task block trained per task, the shared
attentive selection trained throughout, attentive reflection on pseudo-samples of finished tasks.

The model is grown when it is built (``model: {sapt: {tasks: N}}``, :mod:`jaxcl.models.sapt`);
``{name: sapt}`` in a stage's ``methods`` declares, through the task-boundary protocol
(:mod:`jaxcl.methods.protocol`):

* **its mask** (``transform``, behind the base optimizer): task ``t`` trains its own block ``t``
  (row ``t`` of every bank's ``A`` and ``B``), its key ``k_t`` and the shared query projection
  (``W₁``, ``W₂``, the LayerNorm); every other weight (the base model, the earlier blocks and
  keys, the reflection memory) keeps an update of exactly 0, so the earlier blocks stay
  bit-identical, as the reference freezes ``previous_lora_weights`` and ``previous_prompts_keys``;
* **task start** (hook ``task_start``): block ``t`` (the first whose task has not finished)
  becomes active, so the selection now spans blocks ``0..t``;
* **its objective terms**: ``lm`` (the task's loss) and ``sapt_reflection``, ``λ ·`` the KL of
  :func:`jaxcl.models.sapt.reflection_loss` (the reference's ``kl_ratio`` · ``KLDivLoss
  (batchmean)`` per earlier task, every step: ``data_replay_freq 1``);
* **task end** (hook ``memory``): the task's target, the mean attention distribution over
  ``record`` of its examples under the finished model (the reference saves the mean weights on
  the task's evaluation inputs, ``attention_weights.pkl``), and the pooled features of ``M``
  pseudo-samples of the task, written by the finished model from the task's prompt prefix
  (``pseudo: generated``, LAMOL-style generation as :mod:`jaxcl.data.pseudo`) or taken from its
  real examples (``pseudo: real``), are written into the router's memory.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field

from jaxcl.methods.compose import Behind, behind
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase, with_state
from jaxcl.models.sapt import (
    QUERY,
    _keys,
    attention,
    current_slot,
    reflection_loss,
    running_max,
    token_features,
)
from jaxcl.objectives.terms import Term, lm_term


class SaptMaskState(NamedTuple):
    """No state: the trained block is the last active one, read from the parameters."""


def _is_router(keys: list) -> bool:
    return bool(keys) and keys[0] == "sapt"


def sapt_mask(query_lr: float = 1.0) -> Behind:
    """Keep the update of the current block only: ``u ← query_lr · u`` on the query projection
    (``W₁, W₂``, LayerNorm: the reference's ``attn_lr`` as a share of the rate), ``u ← u ·
    [n = k]`` on the keys' and every bank's task axis (``k``:
    :func:`~jaxcl.models.sapt.current_slot` of the parameters), ``u ← 0`` elsewhere (weight
    decay included: it stands behind AdamW). Memory: none."""

    def init(params: optax.Params) -> SaptMaskState:
        del params
        return SaptMaskState()

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None or "sapt" not in params:
            raise ValueError(
                "sapt: the mask needs the parameters (with the model's sapt router) in update"
            )
        k = current_slot(params["sapt"])

        def keep(path, u):
            keys = _keys(path)
            if "sapt" not in keys:
                return jnp.zeros_like(u)
            if _is_router(keys):
                if keys[-1] in QUERY:
                    return u if query_lr == 1.0 else u * query_lr
                if keys[-1] == "keys":
                    rows = (jnp.arange(u.shape[0]) == k)[:, None]
                    return jnp.where(rows, u, jnp.zeros_like(u))
                return jnp.zeros_like(u)  # active, memory_x, memory_y: set by hooks only
            n = u.shape[-3]  # a bank's a [.., N, in, r] or b [.., N, r, out]
            rows = (jnp.arange(n) == k).reshape(n, 1, 1)
            return jnp.where(rows, u, jnp.zeros_like(u))

        return jax.tree_util.tree_map_with_path(keep, updates), state

    return behind(init, update)


def trained_count(params: Any) -> int:
    """Parameters one task trains: the query projection, one key, one block of every bank."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = _keys(path)
        if "sapt" not in keys:
            continue
        size = math.prod(x.shape)
        if _is_router(keys):
            total += size if keys[-1] in QUERY else x.shape[1] if keys[-1] == "keys" else 0
        else:
            total += size // x.shape[-3]
    return total


def reflection_term(weight: float, temperature: float | None) -> Term:
    """``weight · reflection_loss`` of the router in the policy's parameters."""

    def fn(p) -> tuple[jax.Array, dict]:
        router = p.params["sapt"]
        tau = temperature if temperature is not None else math.sqrt(router["keys"].shape[-1])
        return reflection_loss(router, tau), {}

    return Term("sapt_reflection", weight, fn)


@jax.jit
def _pooled(embed: jax.Array, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Each row's query feature: the max of its valid tokens' frozen embeddings ``[n, d]``
    (the running max at its last valid token, as the forward pass pools it)."""
    return running_max(token_features(embed, tokens), valid=valid)[:, -1]


def _rows_pooled(embed: jax.Array, rows: list[dict[str, np.ndarray]]) -> jax.Array:
    """Pooled features of encoded rows: tokens up to the last trained one (the example without
    its padding), as the model reads them."""
    tokens = np.stack([np.asarray(r["tokens"]) for r in rows])
    mask = np.stack([np.asarray(r["loss_mask"]) for r in rows]) > 0
    valid = np.flip(np.maximum.accumulate(np.flip(mask, 1), axis=1), 1)  # up to the last one
    return _pooled(embed, jnp.asarray(tokens), jnp.asarray(valid))


def _texts_pooled(embed: jax.Array, ids: list[list[int]]) -> jax.Array:
    width = max(1, max(len(r) for r in ids))
    tokens = np.zeros((len(ids), width), np.int32)
    valid = np.zeros((len(ids), width), bool)
    for i, row in enumerate(ids):
        tokens[i, : len(row)], valid[i, : len(row)] = row, True
    return _pooled(embed, jnp.asarray(tokens), jnp.asarray(valid))


class SaptSpec(MethodSpecBase):
    """``{name: sapt}``: SAPT over the task blocks that ``model.sapt`` grew."""

    name: Literal["sapt"]
    reflection: float = Field(
        1.0, ge=0, description="λ: weight of attentive reflection's KL (the reference's kl_ratio)"
    )
    pseudo: Literal["generated", "real"] = Field(
        "generated",
        description="pseudo-samples of a finished task: written by the finished model from the "
        "task's prompt prefix (generated) or taken from its real examples (real)",
    )
    query_lr: float = Field(
        1.0,
        ge=0,
        description="the query projection's rate as a share of the stage's (the reference's "
        "attn_lr / learning_rate; 1: the same rate, the reference's attn_lr 0)",
    )
    record: int = Field(
        64, ge=1, description="examples of a finished task whose mean attention is its target"
    )
    max_new_tokens: int = Field(32, ge=1, description="length of a generated pseudo-sample")
    gen_temperature: float = Field(1.0, ge=0, description="sampling temperature (generated)")
    top_k: int = Field(20, ge=0, description="top-k sampling of the pseudo-samples (0: off)")
    tasks: int | None = Field(None, description="task blocks: read from model.sapt.tasks")
    temperature: float | None = Field(
        None, description="attention temperature: read from model.sapt.temperature"
    )

    position: ClassVar[str] = "behind"
    stage_kinds: ClassVar[tuple[str, ...]] = ("instruct", "pretrain")

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if lora is not None:
            raise ValueError(
                "trains SAPT's task blocks, which are the model's own weights, but this stage "
                "trains LoRA adapters: drop lora or sapt"
            )
        if self.tasks is not None and n_tasks > self.tasks:
            raise ValueError(
                f"model.sapt.tasks: {self.tasks} task blocks for the {n_tasks} tasks of this "
                "stage; grow one block per task"
            )

    def bind_model(self, model: Any) -> SaptSpec:
        """This spec with the block count and temperature of the recipe's ``model.sapt``."""
        sapt = getattr(model, "sapt", None)
        if sapt is None:
            raise ValueError(
                "model.sapt: not set; SAPT's task blocks are grown when the model is built: add "
                "model.sapt.tasks (one block per task)"
            )
        for field, value in (("tasks", sapt.tasks), ("temperature", sapt.temperature)):
            given = getattr(self, field)
            if given is not None and value is not None and given != value:
                raise ValueError(f"{field}: {given} differs from model.sapt.{field} ({value})")
        return self.model_copy(update={"tasks": sapt.tasks, "temperature": sapt.temperature})

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return sapt_mask(self.query_lr)

    def trained(self, params: Any) -> int:
        """How many of ``params`` one task trains (the plan's ``trained``)."""
        return trained_count(params)

    def objective_terms(self, reference: Any) -> list[Term]:
        del reference
        return [lm_term(), reflection_term(self.reflection, self.temperature)]

    def hooks(self) -> list[Hook]:
        return [Hook("task_start", activate, self.name), Hook("memory", self._remember, self.name)]

    def _tau(self, router: dict) -> float:
        return self.temperature or math.sqrt(router["keys"].shape[-1])

    def _remember(self, ctx: Context, carry: Carry) -> Carry:
        """Phase ``memory``: the finished task's target attention and pseudo-samples."""
        params = carry.state.params
        router, embed = params["sapt"], params["embed"]
        k = int(current_slot(router))
        n, m = router["memory_x"].shape[:2]
        rows = list(itertools.islice(iter(ctx.task.examples), max(self.record, m)))
        if not rows:
            raise ValueError(f"sapt: task {ctx.task.name!r} has no examples to record")
        target = jnp.mean(
            attention(router, _rows_pooled(embed, rows[: self.record]), self._tau(router)), 0
        )
        feats = self._pseudo_features(ctx, params, rows, m)
        new = dict(router)
        new["memory_x"] = router["memory_x"].at[k].set(feats.astype(router["memory_x"].dtype))
        y = jnp.where(jnp.arange(n) <= k, target, 0.0)
        new["memory_y"] = router["memory_y"].at[k].set(y.astype(router["memory_y"].dtype))
        return with_state(carry, params={**params, "sapt": new})

    def _pseudo_features(self, ctx: Context, params: Any, rows: list, m: int) -> jax.Array:
        embed = params["embed"]
        if self.pseudo == "real":
            pick = np.random.default_rng(ctx.tools.get("seed", 0) * 7919 + ctx.task.index)
            chosen = [rows[i] for i in pick.choice(len(rows), m, replace=len(rows) < m)]
            return _rows_pooled(embed, chosen)
        from jaxcl.data.pseudo import common_prefix
        from jaxcl.data.tokenize import special_ids, token_ids

        tokenizer = ctx.tools["tokenizer"]
        prompts = [str(x) for x in ctx.task.instructions]
        prefix = common_prefix(prompts) if prompts else ""
        texts = ctx.tools["generate"](
            params,
            [prefix] * m,
            max_new_tokens=self.max_new_tokens,
            temperature=self.gen_temperature,
            top_k=self.top_k,
            seed=ctx.tools.get("seed", 0) * 7919 + ctx.task.index,
        )
        bos = special_ids(tokenizer)[0]
        head = [bos] if bos is not None else []
        ids = [head + row for row in token_ids(tokenizer, [prefix + t for t in texts])]
        return _texts_pooled(embed, ids)


def activate(ctx: Context, carry: Carry) -> Carry:
    """Phase ``task_start``: block ``k`` = the number of finished tasks (those with a recorded
    target) becomes active, with every block before it."""
    params = carry.state.params
    router = params["sapt"]
    y = np.asarray(jax.device_get(router["memory_y"]))
    n = y.shape[0]
    k = int(np.sum(y.sum(axis=1) > 0.5))
    if k >= n:
        raise ValueError(
            f"model.sapt.tasks: all {n} task blocks are taken by finished tasks; task "
            f"{ctx.task.name!r} has none left (grow more blocks)"
        )
    active = (jnp.arange(n) <= k).astype(router["active"].dtype)
    return with_state(carry, params={**params, "sapt": {**router, "active": active}})


__all__ = ["SaptSpec", "activate", "reflection_term", "sapt_mask", "trained_count"]
