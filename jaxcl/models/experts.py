"""MoE-LoRA: a mixture of LoRA experts with a learned per-token router on chosen projections.

A routed projection computes (MoELoRA, Luo et al. 2024; LoRAMoE, Dou et al. 2024)::

    y = x·W + b + Σ_e g_e(x) · (α/r) · x·A_e·B_e
    g(x) = softmax(x·W_r + log m)          (m_e ∈ {0, 1}: expert e is active)
    top-k: g ← topk(g) / Σ topk(g)          (the other experts' gates are 0)

with ``A_e [in, r]`` (normal, std ``1/√in``), ``B_e [r, out]`` (zeros: a fresh model computes
what the base did), ``W_r [in, E]`` (normal, std ``1/√in``) and ``m [E]`` the active-expert mask
(a leaf of the parameter tree the method sets at each task start: one expert added per task, or
the whole pool). An inactive expert has gate exactly 0, so with one active expert the layer is
plain LoRA with that expert's ``A``, ``B``.

**Load balancing** (Switch Transformer, Fedus et al. 2022; Shazeer et al. 2017): per router,
``aux = N · Σ_e f_e · P_e`` with ``N`` the active experts, ``f_e`` the share of the (token, slot)
assignments that top-k (top-1 when dense) routing gives expert ``e`` and ``P_e`` the mean gate
probability of ``e`` over the tokens. Its gradient ``balance/R · ∇aux`` (``R`` routers, so the
weight applies to their mean) is added to the backward pass of each routed projection
(:func:`add_aux_gradient`, the pattern of DeepSeek-MoE's ``AddAuxiliaryLoss``): it works inside
scanned and rematerialised layers, where a side output could not leave the layer, and costs no
second forward pass. The logged ``loss`` does not include it.

All new weights are ``nnx.Param`` with logical axis names (``experts``, ``lora_rank`` and the
projection's own), so they shard, checkpoint and chain between stages like the base weights.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import Field, field_validator, model_validator

from jaxcl.models.llama import PROJECTIONS, Attention, SwiGLU, check_targets
from jaxcl.spec import Strict

#: the attribute of an Attention / SwiGLU module that holds its routed experts
ATTR = "moe_lora"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def add_aux_gradient(y: jax.Array, aux: jax.Array, weight: float) -> jax.Array:
    """``y`` unchanged; in the backward pass ``aux`` receives the cotangent ``weight``, so the
    gradient is that of ``loss + weight · aux`` (whatever ``loss`` is)."""
    del aux, weight
    return y


def _aux_fwd(y, aux, weight):
    return y, aux


def _aux_bwd(weight, aux, g):
    return g, jnp.full_like(aux, weight)


add_aux_gradient.defvjp(_aux_fwd, _aux_bwd)


def route(logits: jax.Array, active: jax.Array, top_k: int | None) -> tuple[jax.Array, jax.Array]:
    """``(gates, probs)`` ``[..., E]`` from router logits: ``probs = softmax(logits + log m)``
    (inactive experts exactly 0), ``gates`` = ``probs`` or its renormalised top-k."""
    on = active > 0
    logits = jnp.where(on, logits.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(on, probs, 0.0)
    if top_k is None:
        return probs, probs
    k = min(top_k, probs.shape[-1])
    kth = jax.lax.top_k(probs, k)[0][..., -1:]
    keep = (probs >= kth) & on
    kept = jnp.where(keep, probs, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True), probs


def balance_loss(probs: jax.Array, active: jax.Array, top_k: int | None) -> jax.Array:
    """Switch's ``N · Σ_e f_e · P_e`` over the tokens of ``probs [..., E]`` (``N`` active
    experts; ``f_e`` the share of top-k assignments to ``e``, ``P_e`` its mean probability)."""
    e = probs.shape[-1]
    flat = probs.reshape(-1, e)
    k = 1 if top_k is None else min(top_k, e)
    idx = jax.lax.top_k(flat, k)[1]
    counts = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=(0, 1))
    f = jax.lax.stop_gradient(counts / (flat.shape[0] * k))
    p = jnp.mean(flat, axis=0)
    n = jnp.sum((active > 0).astype(jnp.float32))
    return n * jnp.sum(f * p)


class MoELoRA(nnx.Module):
    """The routed experts of one projection; leading axes of the weights follow scanned layers."""

    def __init__(
        self,
        kernel: nnx.Param,
        *,
        experts: int,
        rank: int,
        alpha: float,
        top_k: int | None,
        aux_weight: float,
        rngs: nnx.Rngs,
    ) -> None:
        *lead, d_in, d_out = kernel.shape
        names = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
        lead_names, in_name, out_name = names[:-2], names[-2], names[-1]
        dtype = kernel.get_value().dtype
        std = d_in**-0.5
        a = jax.random.normal(rngs.params(), (*lead, experts, d_in, rank), dtype) * std
        router = jax.random.normal(rngs.params(), (*lead, d_in, experts), jnp.float32) * std

        def param(value, axes):
            return nnx.Param(value, out_sharding=(*lead_names, *axes), eager_sharding=False)

        self.router = param(router, (in_name, "experts"))
        self.a = param(a, ("experts", in_name, "lora_rank"))
        self.b = param(
            jnp.zeros((*lead, experts, rank, d_out), dtype), ("experts", "lora_rank", out_name)
        )
        self.active = param(jnp.ones((*lead, experts), jnp.float32), ("experts",))
        self.scale = alpha / rank
        self.top_k = top_k
        self.aux_weight = aux_weight

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        logits = x.astype(jnp.float32) @ self.router[...]
        active = self.active[...]
        gates, probs = route(logits, active, self.top_k)
        h = jnp.einsum("...i,eir->...er", x, self.a[...].astype(dt))
        h = h * gates.astype(dt)[..., None]
        y = jnp.einsum("...er,ero->...o", h, self.b[...].astype(dt)) * self.scale
        if self.aux_weight:
            y = add_aux_gradient(y, balance_loss(probs, active, self.top_k), self.aux_weight)
        return y

    def branch(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        """What the experts add to their projection (:data:`jaxcl.models.llama.BRANCHES`); no
        dropout, so ``rng`` is unused."""
        del rng
        return self(x)


def _targets(model: nnx.Module, pattern: str):
    regex = re.compile(pattern)
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, Attention | SwiGLU):
            continue
        for proj in PROJECTIONS:
            if isinstance(getattr(module, proj, None), nnx.Param):
                if regex.search("/".join(map(str, (*path, proj)))):
                    yield module, proj


def target_pattern(targets: str | Sequence[str]) -> str:
    """Projection names (``q``, ``v`` ...) or a regular expression over parameter paths."""
    if isinstance(targets, str):
        return targets
    return rf"(attn|mlp)/({'|'.join(targets)})$"


def add_moe_lora(
    model: nnx.Module,
    *,
    experts: int,
    rank: int = 8,
    alpha: float = 16.0,
    targets: str | Sequence[str] = ("q", "v"),
    top_k: int | None = None,
    balance: float = 0.01,
    seed: int = 0,
) -> nnx.Module:
    """Attach ``experts`` routed LoRA experts to every targeted projection of ``model`` (in
    place; returns it). ``balance`` weighs the load-balancing term (mean over the routers).
    Raises ``ValueError`` naming the argument when ``experts``, ``rank`` or ``top_k`` is out of
    range or the targets match no projection."""
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"experts: must be an integer >= 1, got {experts!r}")
    if rank < 1:
        raise ValueError(f"rank: must be >= 1, got {rank!r}")
    if top_k is not None and not 1 <= top_k <= experts:
        raise ValueError(f"top_k: must be in 1..experts ({experts}), got {top_k!r}")
    if balance < 0:
        raise ValueError(f"balance: must be >= 0, got {balance!r}")
    matched = list(_targets(model, target_pattern(targets)))
    if not matched:
        raise ValueError(f"targets: {targets!r} match no projection of the model")
    routers = sum(math.prod(getattr(m, p).shape[:-2]) for m, p in matched)
    rngs = nnx.Rngs(seed)
    for module, proj in matched:
        if not hasattr(module, ATTR):
            setattr(module, ATTR, nnx.Dict())
        getattr(module, ATTR)[proj] = MoELoRA(
            getattr(module, proj),
            experts=experts,
            rank=rank,
            alpha=alpha,
            top_k=top_k,
            aux_weight=balance / routers,
            rngs=rngs,
        )
    return model


def set_active(params: Any, active: Sequence[float]) -> Any:
    """``params`` (a pure dict) with every router's active-expert mask set to ``active``
    (broadcast over the leading layer axis of scanned layers)."""
    mask = np.asarray(active, np.float32)

    def leaf(path, x):
        keys = [getattr(k, "key", k) for k in path]
        if ATTR in keys and keys[-1] == "active":  # a buffer of its own per leaf (donated)
            return jnp.array(np.broadcast_to(mask, x.shape), dtype=x.dtype, copy=True)
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


def is_moe_path(keys: Sequence[Any]) -> bool:
    return ATTR in keys


def expert_count(params: Any) -> int:
    """The number of experts of a grown parameter tree (0 when it has none)."""
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", k) for k in path]
        if ATTR in keys and keys[-1] == "active":
            return int(x.shape[-1])
    return 0


# ----------------------------------------------------------------------------- recipe entry


class MoELoraGrowth(Strict):
    """``model: {moe_lora: {experts: E, ...}}``: routed LoRA experts attached when the model is
    built (train them with the method ``moe_lora``)."""

    experts: int = Field(ge=1, description="experts per routed projection (E)")
    rank: int = Field(8, ge=1, description="each expert's rank r")
    alpha: float = Field(16.0, gt=0, description="scale numerator: an expert adds (alpha/r)·x·A·B")
    targets: list[str] | str = Field(
        default_factory=lambda: ["q", "v"],
        description="projections (q k v o gate up down) or a regex over parameter paths",
    )
    top_k: int | None = Field(None, ge=1, description="route each token to its top-k experts")
    balance: float = Field(
        0.01, ge=0, description="weight of the load-balancing term E·Σ f_e·P_e (Switch's α)"
    )
    seed: int = Field(0, description="seed of the experts' A and the routers")

    @field_validator("targets")
    @classmethod
    def _projections(cls, value: list[str] | str) -> list[str] | str:
        return check_targets(value)

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoELoraGrowth:
        if self.top_k is not None and self.top_k > self.experts:
            raise ValueError(f"top_k: {self.top_k} exceeds experts ({self.experts})")
        return self

    def grow(self, model: nnx.Module) -> nnx.Module:
        """Attach the experts to ``model`` (in place); ``ValueError`` naming the field."""
        if self.top_k is not None and self.top_k > self.experts:
            raise ValueError(f"top_k: {self.top_k} exceeds experts ({self.experts})")
        return add_moe_lora(model, **self.model_dump())


def refuse_export(model: nnx.Module) -> None:
    """Raise ``ValueError`` when ``model`` has routed experts: an HF Llama has no router, and
    dropping the experts would silently change the function."""
    for path, module in nnx.iter_modules(model):
        if hasattr(module, ATTR):
            where = "/".join(map(str, path))
            raise ValueError(
                f"{where}: this model has routed LoRA experts (model.moe_lora), so it is not a "
                "plain Llama and cannot be exported to HF or GGUF without losing them; keep its "
                "jaxcl checkpoint (jaxcl eval reads it)"
            )
