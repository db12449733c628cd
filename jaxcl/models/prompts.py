"""Soft prompts on the decoder: trainable virtual tokens prepended to the input embeddings.

A model built with ``model: {prompts: {...}}`` holds a :class:`PromptBank` at ``prompts``: ``N``
prompts of ``L`` virtual tokens each, ``P ∈ R^{N×L×d}`` (``prompts/embed``, logical axes
``(prompts, prompt_length, embed)``), and, for a pool, one key per prompt ``K ∈ R^{N×d}``
(``prompts/keys``). Every forward pass prepends ``K_s`` selected prompts to the token
embeddings::

    h⁰ = [P_{s_1}; …; P_{s_K}; E[x_1]; …; E[x_T]]

and returns the logits of the ``T`` real tokens only (``[batch, T, vocab]``, aligned with the
inputs as for a plain model, so losses and scorers see no virtual token). Which prompts are
prepended depends on the bank's ``kind``:

* ``per_task`` (soft prompt tuning, Lester et al. 2021): the prompt of the declared task
  ``t`` (the scalar ``prompts/task``, set by the method at each task start and by the eval view
  of task ``i``): ``[P_t; x]``;
* ``progressive`` (Progressive Prompts, Razdaibiedina et al. 2023): ``[P_t; P_{t−1}; …; P_0;
  x]``, the reference code's order (the newest prompt first). All ``N`` prompts always occupy
  slots ``[P_{N−1}; …; P_0]``; those of later tasks (``j > t``) are masked out as keys and take
  no position, so the input sees exactly ``[P_t; …; P_0; x]``;
* ``pool`` (L2P, Wang et al. 2022): the ``top_k`` prompts whose keys are the most similar to the
  input's query, ``s = top-k_j cos(q(x), K_j)`` (most similar first), with ``q(x)`` the
  frozen model's feature of the input (:func:`query`).

Positions: the active virtual tokens take positions ``0..A−1`` (``A`` of them) and the real
tokens ``A..A+T−1``, so RoPE sees one contiguous sequence. Packed rows (``segment_ids``) and
KV-cache decoding are refused.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx
from pydantic import Field

from jaxcl.spec import Strict

Kind = Literal["per_task", "progressive", "pool"]
#: the logical axis names of the prompt bank's leaves
EMBED_AXES = ("prompts", "prompt_length", "embed")
KEY_AXES = ("prompts", "embed")


class PromptsSpec(Strict):
    """``model.prompts``: a bank of soft prompts added to the model when it is built."""

    kind: Kind = Field(
        description="per_task (one prompt per task, soft prompt tuning), progressive (Progressive "
        "Prompts: earlier prompts frozen and concatenated) or pool (L2P: keys, top-k selection)"
    )
    count: int = Field(
        ge=1, description="prompts in the bank: one per task (per_task, progressive) or pool size M"
    )
    length: int = Field(ge=1, description="virtual tokens per prompt (L_p)")
    top_k: int = Field(5, ge=1, description="pool only: prompts selected per input (L2P's N)")

    @pydantic.model_validator(mode="after")
    def _top_k_fits(self) -> PromptsSpec:
        if self.kind == "pool" and self.top_k > self.count:
            raise ValueError(
                f"top_k: {self.top_k} prompts selected from a pool of count={self.count}; "
                "top_k must be at most count"
            )
        return self

    @property
    def virtual_tokens(self) -> int:
        """Virtual tokens the longest input carries: ``L`` (per_task), ``N·L`` (progressive, at
        the last task) or ``top_k·L`` (pool)."""
        per = {"per_task": 1, "progressive": self.count, "pool": self.top_k}[self.kind]
        return per * self.length


class PromptBank(nnx.Module):
    """``N`` prompts ``[N, L, d]`` (and keys ``[N, d]`` for a pool, or the declared task).

    Prompts start as embeddings of ``N·L`` token ids drawn uniformly from the vocabulary
    (Lester et al.'s sampled-vocabulary initialisation, as the Progressive Prompts code draws
    each new prompt); keys ``~ U(−1, 1)`` (L2P's ``uniform`` initialiser)."""

    def __init__(self, spec: PromptsSpec, embed: jax.Array, *, rngs: nnx.Rngs) -> None:
        self.kind, self.count, self.length = spec.kind, spec.count, spec.length
        self.top_k = spec.top_k if spec.kind == "pool" else 1
        vocab, d = embed.shape
        ids = jax.random.randint(rngs.params(), (spec.count * spec.length,), 0, vocab)
        init = jnp.take(embed, ids, axis=0).reshape(spec.count, spec.length, d)
        self.embed = nnx.Param(init, out_sharding=EMBED_AXES, eager_sharding=False)
        if spec.kind == "pool":
            keys = jax.random.uniform(rngs.params(), (spec.count, d), embed.dtype, -1.0, 1.0)
            self.keys = nnx.Param(keys, out_sharding=KEY_AXES, eager_sharding=False)
        else:
            self.task = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=(), eager_sharding=False)

    def __call__(
        self, model: Any, input_ids, positions=None, segment_ids=None, *, dropout_rng=None
    ):
        return prompted_hidden(model, input_ids, positions, segment_ids, dropout_rng=dropout_rng)


def add_prompts(model: Any, spec: PromptsSpec, *, seed: int = 0) -> Any:
    """``model`` with a :class:`PromptBank` at ``model.prompts`` (initialised from its own
    embedding table; ``seed`` draws the token ids and keys). Returns the model."""
    if getattr(model, "prompts", None) is not None:
        raise ValueError("model.prompts: the model has prompts already")
    model.prompts = PromptBank(spec, model.embed[...], rngs=nnx.Rngs(seed + 1_000_003))
    return model


def abstract_with_prompts(model: Any, spec: PromptsSpec) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split`` of the shape-only ``model`` (``jax.ShapeDtypeStruct`` leaves) with a
    shape-only prompt bank added."""
    emb = model.embed.get_raw_value()
    shape, dtype = emb.shape, emb.dtype
    model.prompts = nnx.eval_shape(
        lambda: PromptBank(spec, jnp.zeros(shape, dtype), rngs=nnx.Rngs(0))
    )
    return nnx.split(model)


def task_index(bank: PromptBank) -> jax.Array:
    """The declared task ``t`` (``prompts/task``, a float holding an integer) as int32."""
    return jnp.round(bank.task[...]).astype(jnp.int32)


def query(model: Any, input_ids: jax.Array) -> jax.Array:
    """L2P's query for a decoder: ``q(x) = (1/T) Σ_t h_t(x)``, the mean over the ``T`` input
    positions of the frozen model's final (normed) hidden states, computed **without** prompts
    and with no gradient (``[batch, d]``, float32). L2P uses the frozen ViT's ``[CLS]``; a
    decoder has none (see docs/methods.md, Deviations)."""
    b, t = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = model._rope(positions)
    h, _ = model._layers(model._embed(input_ids), cos, sin, None)
    h = model.final_norm(h).astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.mean(h, axis=1))


def cosine(q: jax.Array, keys: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``cos(q_b, K_j) = q_b·K_j / (‖q_b‖ ‖K_j‖)``, ``[batch, N]`` (norms floored at ``eps``)."""
    qn = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), eps)
    k = keys.astype(jnp.float32)
    kn = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), eps)
    return qn @ kn.T


def select(model: Any, input_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(ids [batch, K], active [batch, K], similarity [batch, N] or None)``: the prompts
    prepended to each row, in slot order, and which of them are active (see the module
    docstring); the similarities for a pool."""
    bank = model.prompts
    b = input_ids.shape[0]
    if bank.kind == "pool":
        sim = cosine(query(model, input_ids), bank.keys[...])
        _, ids = jax.lax.top_k(sim, bank.top_k)
        return ids, jnp.ones(ids.shape, bool), sim
    t = task_index(bank)
    if bank.kind == "per_task":
        return jnp.full((b, 1), t, jnp.int32), jnp.ones((b, 1), bool), None
    ids = jnp.broadcast_to(jnp.arange(bank.count - 1, -1, -1, dtype=jnp.int32), (b, bank.count))
    return ids, ids <= t, None


def key_loss(model: Any, input_ids: jax.Array) -> jax.Array:
    """L2P's surrogate loss ``(1/B) Σ_b Σ_{j ∈ s(x_b)} (1 − cos(q(x_b), K_j))`` over the
    ``top_k`` selected keys (the query carries no gradient: only the keys move)."""
    ids, _, sim = select(model, input_ids)
    if sim is None:
        raise ValueError("key_loss: the model's prompts are not a pool (model.prompts.kind)")
    chosen = jnp.take_along_axis(sim, ids, axis=1)
    return jnp.mean(jnp.sum(1.0 - chosen, axis=1))


def prompted_hidden(
    model: Any,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states ``[batch, T, d]`` of the real tokens of ``input_ids [batch,
    T]`` with the selected prompts prepended (positions: active virtual tokens ``0..A−1``, real
    tokens from ``A`` on, offset by the given ``positions``): what
    :meth:`~jaxcl.models.llama.Decoder.hidden_states` returns for a model with prompts, so
    ``model(x)`` gives the real tokens' logits ``[batch, T, vocab]``."""
    if segment_ids is not None:
        raise ValueError(
            "model.prompts: packed rows (segment_ids) cannot share one prompt; use packing: none"
        )
    bank = model.prompts
    b, t = input_ids.shape
    ids, active, _ = select(model, input_ids)
    dtype = jnp.dtype(model.config.dtype)
    virtual = jnp.take(bank.embed[...], ids, axis=0).reshape(b, -1, bank.embed.shape[-1])
    slots = jnp.repeat(active, bank.length, axis=1)  # [b, K·L]
    n_virtual = slots.shape[1]
    x = jnp.concatenate([virtual.astype(dtype), model._embed(input_ids)], axis=1)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    n_active = jnp.sum(slots, axis=1, dtype=jnp.int32)
    v_pos = jnp.maximum(jnp.cumsum(slots, axis=1, dtype=jnp.int32) - 1, 0)
    all_pos = jnp.concatenate([v_pos, positions + n_active[:, None]], axis=1)
    mask = None
    if bank.kind == "progressive":  # later tasks' prompts: no one attends to them
        keys_ok = jnp.concatenate([slots, jnp.ones((b, t), bool)], axis=1)
        s = n_virtual + t
        mask = keys_ok[:, None, None, :] | jnp.eye(s, dtype=bool)[None, None]
    cos, sin = model._rope(all_pos)
    h, _ = model._layers(x, cos, sin, mask, rng=dropout_rng)
    return model.final_norm(h[:, n_virtual:])


def has_prompts(model: Any) -> bool:
    return getattr(model, "prompts", None) is not None


def refuse_prompts(model: Any, what: str) -> None:
    """Raise ``ValueError`` when ``model`` carries prompts: ``what`` cannot serve it."""
    if has_prompts(model):
        raise ValueError(
            f"{what}: this model carries soft prompts (model.prompts, kind "
            f"{model.prompts.kind!r}), which {what} does not support; score it with "
            "teacher-forced metrics (exact_match, perplexity, choice accuracy) instead"
        )


__all__ = [
    "PromptBank",
    "PromptsSpec",
    "abstract_with_prompts",
    "add_prompts",
    "cosine",
    "has_prompts",
    "key_loss",
    "prompted_hidden",
    "query",
    "refuse_prompts",
    "select",
    "task_index",
]
