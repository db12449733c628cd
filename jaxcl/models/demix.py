"""DEMix layers (Gururangan et al., NAACL 2022): one feed-forward expert per domain.

Every decoder layer's feed-forward network (SwiGLU) gets ``E`` expert copies, stacked
``[E, ...]`` beside the base weights. A forward pass runs **one expert in every layer**, the one
that the ``select`` leaf (one-hot ``[E]``) names::

    FFN_j(x) = (silu(x·G_j) ⊙ (x·U_j))·D_j            j = argmax(select)

so "the model with expert ``j``" is the same graph with another ``select``: :func:`set_leaf`
on a pure parameter dict. At build time every expert is a copy of the base FFN, so a fresh
grown model computes exactly (bit for bit) what the base did. The base FFN stays in the tree
(frozen; new experts can be initialised from it).

**Inference mixes the experts at the output-probability level** by the domain posterior over
the prefix (the paper's Bayes' rule over the experts' likelihoods)::

    p(x_t | x_<t) = Σ_j p(D=j | x_<t) · p_j(x_t | x_<t)
    p(D=j | x_<t) = softmax_j( log p(D=j) + Σ_{s<t} log p_j(x_s | x_<s) )

with the **cached prior** ``p(D=j)`` estimated on ``N`` (100) dev sequences of the domain as the
paper's code does (kernelmachine/demix: ``exp_avg_posterior``, an exponential moving average of
the posteriors with α = 0.3): ``π_n = softmax_j log p_j(seq_n)`` (uniform prior), ``p ← π_0``,
then ``p ← (1 − α)·p + α·π_n`` for ``n = 1..N−1``
(:func:`cached_prior`). Only the **active** experts (leaf ``active``, 0/1 ``[E]``) take part:
an inactive one has prior 0. :func:`mixture_logprobs` computes the mixture's log-probabilities
``[B, T, V]`` from ``E`` per-expert forwards (memory: ``E`` copies of the ``[B, T, V]``
log-probabilities during scoring).

New weights are ``nnx.Param`` with logical axis names (``experts``, and the FFN's own
``embed``/``mlp``), so they shard, checkpoint and chain between stages like the base weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import Field

from jaxcl.models.llama import SwiGLU
from jaxcl.spec import Strict

#: the attribute of a SwiGLU module that holds its domain experts
ATTR = "demix"
#: the FFN weights each expert has (biases where the model has them)
WEIGHTS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
#: the leaves that say which experts run, ``[E]`` each (set by the method, never trained)
CONTROL = ("select", "active", "prior")


class DemixFFN(nnx.Module):
    """The ``E`` domain experts of one SwiGLU; leading axes follow scanned layers."""

    def __init__(self, mlp: SwiGLU, experts: int) -> None:
        lead: tuple[int, ...] = ()
        lead_names: tuple[Any, ...] = ()
        for name in WEIGHTS:
            base = getattr(mlp, name, None)
            if not isinstance(base, nnx.Param):
                continue
            value = base.get_value()
            names = tuple(base.get_metadata().get("out_sharding") or (None,) * value.ndim)
            core = 1 if name.endswith("_bias") else 2
            lead, lead_names = value.shape[:-core], names[:-core]
            shape = (*lead, experts, *value.shape[len(lead) :])
            if isinstance(value, jax.ShapeDtypeStruct):  # a shape-only model (dry-run plans)
                stacked: Any = jax.ShapeDtypeStruct(shape, value.dtype)
            else:
                stacked = jnp.array(jnp.broadcast_to(jnp.expand_dims(value, len(lead)), shape))
            axes = (*lead_names, "experts", *names[len(lead) :])
            setattr(self, name, nnx.Param(stacked, out_sharding=axes, eager_sharding=False))
        one_hot = np.zeros((*lead, experts), np.float32)
        one_hot[..., 0] = 1.0
        for name, value in (("select", one_hot), ("active", one_hot), ("prior", one_hot)):
            setattr(
                self,
                name,
                nnx.Param(
                    jnp.asarray(value), out_sharding=(*lead_names, "experts"), eager_sharding=False
                ),
            )

    def _w(self, name: str, idx: jax.Array, dt: Any) -> jax.Array | None:
        leaf = getattr(self, name, None)
        if leaf is None:
            return None
        return jnp.take(leaf[...], idx, axis=0).astype(dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        idx = jnp.argmax(self.select[...])  # the one expert this forward runs
        g, u = x @ self._w("gate", idx, dt), x @ self._w("up", idx, dt)
        if (gb := self._w("gate_bias", idx, dt)) is not None:
            g, u = g + gb, u + self._w("up_bias", idx, dt)
        y = (jax.nn.silu(g) * u) @ self._w("down", idx, dt)
        if (db := self._w("down_bias", idx, dt)) is not None:
            y = y + db
        return y


def add_demix(model: nnx.Module, *, experts: int) -> nnx.Module:
    """Give every SwiGLU of ``model`` ``experts`` domain experts, each a copy of its FFN (in
    place; returns it). Expert 0 is selected and active. ``ValueError`` naming ``experts``."""
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        raise ValueError(f"demix.experts: must be an integer >= 1, got {experts!r}")
    found = False
    for _, module in nnx.iter_modules(model):
        if isinstance(module, SwiGLU) and not hasattr(module, ATTR):
            setattr(module, ATTR, DemixFFN(module, experts))
            found = True
    if not found:
        raise ValueError("demix: the model has no feed-forward (SwiGLU) layer to give experts")
    return model


def _keys(path: tuple) -> list[Any]:
    return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]


def is_demix_path(keys: Iterable[Any]) -> bool:
    return ATTR in list(keys)


def set_leaf(params: Any, name: str, value: Any) -> Any:
    """``params`` with every DEMix ``name`` leaf (``select``, ``active``, ``prior``) set to
    ``value [E]`` (broadcast over a scanned layer axis). Works under ``jit`` (``value`` may be
    traced)."""

    def leaf(path, x):
        keys = _keys(path)
        if ATTR in keys and keys[-1] == name:
            return jnp.broadcast_to(jnp.asarray(value, x.dtype), x.shape) + jnp.zeros_like(x)
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


def read_leaf(params: Any, name: str) -> jax.Array:
    """The ``[E]`` value of the first DEMix ``name`` leaf (they all hold the same)."""
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        keys = _keys(path)
        if ATTR in keys and keys[-1] == name:
            return jnp.reshape(x, (-1, x.shape[-1]))[0]
    raise ValueError("demix: the parameters have no domain experts (model.demix)")


def expert_count(params: Any) -> int:
    """The number of domain experts of a grown parameter tree (0 without them)."""
    try:
        return int(read_leaf(params, "select").shape[-1])
    except ValueError:
        return 0


def select(params: Any, j: int | jax.Array) -> Any:
    """``params`` running expert ``j`` in every layer."""
    return set_leaf(params, "select", jax.nn.one_hot(j, expert_count(params)))


def copy_expert(params: Any, source: int | None, target: int) -> Any:
    """``params`` with expert ``target``'s FFN weights replaced by expert ``source``'s (``None``:
    by the base FFN's) in every layer."""

    def walk(tree: Any) -> Any:
        if not isinstance(tree, dict):
            return tree
        out = {k: walk(v) for k, v in tree.items()}
        if ATTR in tree and isinstance(tree[ATTR], dict):
            experts = dict(out[ATTR])
            for name in WEIGHTS:
                if name not in experts:
                    continue
                stack = experts[name]
                axis = stack.ndim - (2 if name.endswith("_bias") else 3)
                src = tree[name] if source is None else jnp.take(stack, source, axis=axis)
                experts[name] = _put(stack, src, target, axis)
            out[ATTR] = experts
        return out

    return walk(params)


def _put(stack: jax.Array, value: jax.Array, index: int, axis: int) -> jax.Array:
    moved = jnp.moveaxis(stack, axis, 0)
    return jnp.moveaxis(moved.at[index].set(value.astype(stack.dtype)), 0, axis)


# ----------------------------------------------------------------------------- the mixture


def _prefix_sums(lp: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """``c[..., t] = Σ_{s<t} lp[..., s]`` (within ``t``'s segment when ``segment_ids`` given)."""
    c = jnp.concatenate([jnp.zeros_like(lp[..., :1]), jnp.cumsum(lp[..., :-1], axis=-1)], -1)
    if segment_ids is None:
        return c
    t = jnp.arange(lp.shape[-1])
    start = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], -1
    )
    first = jax.lax.cummax(jnp.where(start, t, 0), axis=1)  # each position's segment start
    return c - jnp.take_along_axis(c, jnp.broadcast_to(first, c.shape), axis=-1)


def posterior(
    log_prior: jax.Array, target_logps: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Log domain posterior ``[E, B, T]`` at every position ``t``: ``softmax_j(log p(D=j) +
    Σ_{s<t} target_logps[j, :, s])``, where ``target_logps[j, :, s] = log p_j(x_{s+1} | x_≤s)``
    is expert ``j``'s log-probability of the token observed after position ``s``: the
    posterior that weighs the prediction at ``t`` has seen the prefix up to ``t`` only."""
    z = log_prior[:, None, None] + _prefix_sums(target_logps, segment_ids)
    return jax.nn.log_softmax(z, axis=0)


def mixture_logprobs(apply: Callable[..., jax.Array], params: Any, inputs: Any) -> jax.Array:
    """Log-probabilities ``[B, T, V]`` of the posterior mixture of the active experts (see the
    module docstring): ``E`` forwards of ``apply(params, inputs) -> logits``, each with one
    expert selected in every layer. ``inputs`` the token ids ``[B, T]`` (or a packed dict)."""
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    segments = inputs.get("segment_ids") if isinstance(inputs, dict) else None
    e = expert_count(params)
    active = read_leaf(params, "active") > 0
    prior = jnp.where(active, read_leaf(params, "prior"), 0.0)
    log_prior = jnp.where(active, jnp.log(prior / jnp.sum(prior)), -jnp.inf)
    logps = jnp.stack([jax.nn.log_softmax(apply(select(params, j), inputs), -1) for j in range(e)])
    # log p_j of the observed next token x_{t+1} at position t (the last position's is unused)
    nxt = jnp.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)
    index = jnp.broadcast_to(nxt[None, ..., None], (e, *nxt.shape, 1))
    seen = jnp.where(active[:, None, None], jnp.take_along_axis(logps, index, -1)[..., 0], 0.0)
    log_post = posterior(log_prior, seen, segments)
    terms = jnp.where(active[:, None, None, None], log_post[..., None] + logps, -jnp.inf)
    return jax.nn.logsumexp(terms, axis=0)


def sequence_logliks(apply: Callable[..., jax.Array], params: Any, batch: dict) -> jax.Array:
    """``[E, B]``: each expert's summed log-likelihood of each row's target tokens (loss mask)."""
    from jaxcl.objectives import token_logps
    from jaxcl.objectives.bound import row_inputs

    inputs, targets = row_inputs(batch), batch["tokens"][:, 1:]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    rows = [
        jnp.sum(token_logps(apply(select(params, j), inputs), targets) * mask, -1)
        for j in range(expert_count(params))
    ]
    return jnp.stack(rows)


def cached_prior(
    logliks: np.ndarray, alpha: float = 0.3, active: np.ndarray | None = None
) -> np.ndarray:
    """The cached domain prior ``[E]`` from per-sequence log-likelihoods ``logliks [N, E]`` (in
    order), as the paper's code estimates it: each sequence's posterior under a uniform prior,
    ``π_n = softmax_j ℓ_{n,j}``, averaged by an exponential moving average (pandas' ``ewm(alpha,
    adjust=False)``): ``p ← π_0``, ``p ← (1 − α)·p + α·π_n``. Inactive experts get 0."""
    ll = np.asarray(logliks, np.float64)
    on = np.ones(ll.shape[1], bool) if active is None else np.asarray(active) > 0
    z = ll[:, on] - ll[:, on].max(axis=1, keepdims=True)
    post = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    p = post[0]
    for row in post[1:]:
        p = (1.0 - alpha) * p + alpha * row
    out = np.zeros(ll.shape[1])
    out[on] = p / p.sum()
    return out


# ----------------------------------------------------------------------------- recipe entry


class DemixGrowth(Strict):
    """``model: {demix: {experts: E}}``: ``E`` feed-forward experts per layer, each a copy of the
    base FFN, built with the model (train them with the method ``demix``: one per domain)."""

    experts: int = Field(ge=1, description="feed-forward experts per layer (one per domain)")

    def grow(self, model: nnx.Module) -> nnx.Module:
        return add_demix(model, experts=self.experts)


def refuse_export(model: nnx.Module) -> None:
    """Raise ``ValueError`` when ``model`` has DEMix experts: an HF Llama has one FFN per layer,
    and dropping the experts would silently change the function."""
    for path, module in nnx.iter_modules(model):
        if hasattr(module, ATTR) and isinstance(getattr(module, ATTR), DemixFFN):
            where = "/".join(map(str, path))
            raise ValueError(
                f"{where}: this model has DEMix domain experts (model.demix), so it is not a "
                "plain Llama and cannot be exported to HF or GGUF without losing them; keep its "
                "jaxcl checkpoint (jaxcl eval reads it)"
            )
