"""Heterogeneous Model Averaging (Lin et al., 2024, "Mitigating the Alignment Tax of RLHF").

The weights before alignment θ_0 and after it θ, averaged with one ratio per group of consecutive
layers: ``θ^(k) = α_k θ_0^(k) + (1 − α_k) θ^(k)`` for groups k = 1..K (α_k is the weight of the
*earlier* model, as in the paper and its code, github.com/avalonstrel/Mitigating-the-Alignment-
Tax-of-RLHF). The ratios are fixed (the paper's partwise averaging, ``weight_interpolation.py``
there) or searched by gradient under the constraint mean α_k = α (HMA, ``mask_trainer.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field, model_validator

from jaxcl.methods.protocol import Carry, Context, EvalView, Hook, MethodSpecBase, copy_tree
from jaxcl.methods.weights import (
    F32,
    checked,
    full_weights_only,
    is_last_task,
    replace_carry,
    store_stage_start,
)


def layer_groups(n_layers: int, groups: int, boundaries: Sequence[int] | None = None) -> np.ndarray:
    """The group (0-based) of each layer: ``boundaries`` are the first layers of groups 2..K;
    without them each group has ``⌊L/K⌋`` consecutive layers and the last takes the remainder
    (the reference code's ``blockK``)."""
    if boundaries is not None:
        if len(boundaries) != groups - 1 or (boundaries and boundaries[-1] >= n_layers):
            raise ValueError(
                f"hma: boundaries {list(boundaries)} for {groups} groups of {n_layers}"
            )
        return np.searchsorted(np.asarray(boundaries), np.arange(n_layers), side="right")
    if groups > n_layers:
        raise ValueError(f"hma: {groups} groups but the model has {n_layers} layers")
    return np.minimum(np.arange(n_layers) // (n_layers // groups), groups - 1)


def _layer_keys(layers: Mapping) -> list | None:
    """The per-layer keys (sorted) of an unrolled ``layers`` mapping; None when it is scanned."""
    keys = list(layers)
    if all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in keys):
        return sorted(keys, key=int)
    return None


def _n_layers(layers: Mapping) -> int:
    keys = _layer_keys(layers)
    if keys is not None:
        return len(keys)
    sizes = {x.shape[0] for x in jax.tree.leaves(layers)}
    if len(sizes) != 1:
        raise ValueError(f"hma: scanned layers with different leading sizes {sorted(sizes)}")
    return sizes.pop()


def _ratio_tree(params: Mapping, ratios: jax.Array, alpha: float, ids: np.ndarray, cfg) -> dict:
    """Each leaf's weight ρ of θ_0 (broadcastable to the leaf): a layer's leaves take their
    group's ratio, the embedding the first group's, every other leaf (final norm, LM head) α."""
    layers_key, embed_key = cfg
    fill = lambda tree, value: jax.tree.map(lambda x: value, tree)  # noqa: E731
    out = {}
    for key, sub in params.items():
        if key == embed_key:
            out[key] = fill(sub, ratios[0])
        elif key != layers_key:
            out[key] = fill(sub, jnp.asarray(alpha, F32))
        elif (keys := _layer_keys(sub)) is not None:
            group = {k: int(ids[j]) for j, k in enumerate(keys)}
            out[key] = {k: fill(v, ratios[group[k]]) for k, v in sub.items()}
        else:  # scanned: leaves [L, ...], one ratio per slice
            per_layer = ratios[jnp.asarray(ids)]
            out[key] = {k: _per_layer(v, per_layer) for k, v in sub.items()}
    return out


def _per_layer(tree: Any, per_layer: jax.Array) -> Any:
    return jax.tree.map(lambda x: per_layer.reshape((-1,) + (1,) * (x.ndim - 1)), tree)


def hma_merge(
    pre: optax.Params,
    post: optax.Params,
    ratios: jax.Array | Sequence[float],
    *,
    alpha: float,
    boundaries: Sequence[int] | None = None,
    layers_key: str = "layers",
    embed_key: str = "embed",
) -> optax.Params:
    """Heterogeneous model averaging (Lin et al., 2024): ``θ^(k) = α_k θ_0^(k) + (1 − α_k) θ^(k)``
    for the K groups of consecutive layers (``ratios`` = α_1..α_K, weights of the *pre* model
    θ_0 = ``pre``); embedding: α_1; final norm and LM head: ``alpha``. Layers are
    ``params[layers_key]``: a mapping per layer (``{0: ..., 1: ...}``) or scanned leaves
    ``[L, ...]``. Each leaf keeps the dtype of ``post``."""
    if layers_key not in post:
        raise ValueError(f"hma: no {layers_key!r} in the parameters (keys {sorted(post)})")
    ratios = jnp.asarray(ratios, F32)
    ids = layer_groups(_n_layers(post[layers_key]), ratios.shape[0], boundaries)
    rho = _ratio_tree(post, ratios, alpha, ids, (layers_key, embed_key))
    return jax.tree.map(
        lambda r, a, b: (r * a.astype(F32) + (1 - r) * b.astype(F32)).astype(b.dtype),
        rho,
        pre,
        post,
    )


def hma_ratios(logits: jax.Array, alpha: float, epsilon: float) -> jax.Array:
    """The reference code's parameterisation of the K ratios with mean α:
    ``α_k = α K (σ(m_k) + ε) / Σ_j (σ(m_j) + ε)``."""
    s = jax.nn.sigmoid(logits) + epsilon
    return alpha * logits.shape[0] * s / jnp.sum(s)


def _kernels_per_group(
    params: Mapping, ids: np.ndarray, layers_key: str, groups: int
) -> np.ndarray:
    """Linear layers (kernels) per group: the weights of the reference's L1 term, which sums
    ``|α_k − α|`` over every linear module."""
    layers = params[layers_key]
    keys = _layer_keys(layers)
    count = np.zeros(groups)
    for j in range(len(ids)):
        if keys is not None:
            n = sum(x.ndim >= 2 for x in jax.tree.leaves(layers[keys[j]]))
        else:
            n = sum(x.ndim >= 3 for x in jax.tree.leaves(layers))
        count[ids[j]] += n
    return count


class HmaSpec(MethodSpecBase):
    """Heterogeneous Model Averaging (Lin et al., 2024, "Mitigating the Alignment Tax of RLHF"):
    the weights after alignment θ and before it θ_0 averaged with one ratio per group of
    consecutive layers, ``θ^(k) ← α_k θ_0^(k) + (1 − α_k) θ^(k)`` (α_k: the weight of θ_0).

    ``ratios`` given: those α_1..α_K (the paper's partwise averaging). Otherwise (HMA) they are
    learned after the task's last step, before it is scored, as the reference code does:
    ``α_k = α K (σ(m_k)+ε)/Σ_j(σ(m_j)+ε)`` (so mean α_k = α), m_k from logit(α), Adam with a
    linearly decaying rate on the stage's objective at the merged weights plus
    ``reg Σ_k n_k |α_k − α|`` (n_k: linear layers of group k), one pass over the task's own
    examples. The merge runs at the stage's end (θ_0 the stage's start: one alignment run) or at
    each task's end (``at``), with θ_0 the stage's or the task's start (``anchor``)."""

    needs_full_weights: ClassVar[bool] = True

    name: Literal["hma"]
    describes_weights: ClassVar[bool] = True
    alpha: float = Field(
        0.2, ge=0, le=1, description="α: mean weight of θ_0, and that of the final norm and head"
    )
    groups: int = Field(3, ge=1, description="K: groups of consecutive layers")
    boundaries: list[int] | None = Field(
        None, description="first layer of groups 2..K (default: ⌊L/K⌋ layers each)"
    )
    ratios: list[float] | None = Field(None, description="fixed α_1..α_K (None: learned)")
    learn_batches: int | None = Field(
        None, ge=1, description="batches of the ratio search (None: one pass over the task)"
    )
    lr: float = Field(2e-5, gt=0, description="Adam rate of the ratio search (reference: 2e-5)")
    reg: float = Field(1e-4, ge=0, description="weight of the L1 pull of α_k toward α")
    epsilon: float = Field(0.2, ge=0, description="ε of the ratio parameterisation")
    at: Literal["stage_end", "task_end"] = "stage_end"
    anchor: Literal["stage_start", "task_start"] = "stage_start"
    layers_key: str = Field("layers", description="the parameters' key of the layer stack")
    embed_key: str = Field("embed", description="the parameters' key of the token embedding")

    @model_validator(mode="after")
    def _check(self) -> HmaSpec:
        if self.ratios is not None:
            if len(self.ratios) != self.groups:
                raise ValueError(f"hma: {len(self.ratios)} ratios for {self.groups} groups")
            if any(not 0 <= r <= 1 for r in self.ratios):
                raise ValueError(f"hma: ratios {self.ratios} must lie in [0, 1]")
        b = self.boundaries
        if b is not None and (
            len(b) != self.groups - 1 or any(x <= y for x, y in zip(b[1:], b)) or (b and b[0] < 1)
        ):
            raise ValueError(f"hma: boundaries {b}: {self.groups - 1} increasing layers ≥ 1")
        return self

    def _merging(self, ctx: Context) -> bool:
        return self.at == "task_end" or is_last_task(ctx)

    def _anchor_key(self) -> str:
        return "stage_start" if self.anchor == "stage_start" else "hma_anchor"

    def merge_fn(self, pre: Any, post: Any, ratios: Any) -> Any:
        return hma_merge(
            pre,
            post,
            ratios,
            alpha=self.alpha,
            boundaries=self.boundaries,
            layers_key=self.layers_key,
            embed_key=self.embed_key,
        )

    def learn(self, ctx: Context, pre: Any, post: Any) -> jax.Array:
        """The ratio search: returns α_1..α_K."""
        ids = layer_groups(_n_layers(post[self.layers_key]), self.groups, self.boundaries)
        weights = jnp.asarray(_kernels_per_group(post, ids, self.layers_key, self.groups), F32)
        n = self.learn_batches or _one_pass(ctx)
        tx = optax.adam(optax.linear_schedule(self.lr, 0.0, n))

        def objective(m, pre, post, batch):
            r = hma_ratios(m, self.alpha, self.epsilon)
            d = r - self.alpha  # |d| with torch's subgradient sign(0) = 0 (jnp.abs has 1)
            reg = self.reg * jnp.sum(weights * d * jax.lax.stop_gradient(jnp.sign(d)))
            return ctx.loss_fn(self.merge_fn(pre, post, r), batch) + reg

        @jax.jit
        def step(m, state, pre, post, batch):
            g = jax.grad(objective)(m, pre, post, batch)
            updates, state = tx.update(g, state, m)
            return optax.apply_updates(m, updates), state

        a = min(max(self.alpha, 1e-6), 1 - 1e-6)
        m = jnp.full((self.groups,), math.log(a / (1 - a)), F32)
        state = tx.init(m)
        for batch in ctx.batches(n):
            m, state = step(m, state, pre, post, batch)
        return hma_ratios(m, self.alpha, self.epsilon)

    def hooks(self) -> list[Hook]:
        def start(ctx: Context, carry: Carry) -> Carry:
            if self.anchor == "stage_start":
                return store_stage_start(ctx, carry)
            if self._merging(ctx) and "hma_anchor" not in carry.frozen:
                return replace_carry(carry, hma_anchor=copy_tree(carry.state.params))
            return carry

        def ratios(ctx: Context, carry: Carry) -> Carry:
            if not self._merging(ctx):
                return carry
            if self.ratios is not None:
                r = jnp.asarray(self.ratios, F32)
            else:
                r = self.learn(ctx, carry.frozen[self._anchor_key()], carry.state.params)
            return replace_carry(carry, hma_ratios=r)

        def merge(ctx: Context, carry: Carry) -> Carry:
            if "hma_ratios" not in carry.frozen:
                return carry
            f = carry.frozen
            merged = self.merge_fn(f[self._anchor_key()], carry.state.params, f["hma_ratios"])
            return replace_carry(
                carry,
                params=merged,
                drop=("hma_ratios", "hma_anchor"),
                hma_ratios_applied=f["hma_ratios"],
            )

        last = lambda k, steps: k == steps - 1  # noqa: E731
        return [
            Hook("task_start", checked(full_weights_only(self.name), start), "hma (anchor)"),
            Hook("step", ratios, "hma (ratios)", when=last),
            Hook("merge", merge, "hma"),
        ]

    def eval_view(self) -> EvalView | None:
        def view(params: Any, carry: Carry, i: int) -> Any:
            f = carry.frozen
            if "hma_ratios" not in f:
                return params
            return self.merge_fn(f[self._anchor_key()], params, f["hma_ratios"])

        return view


def _one_pass(ctx: Context) -> int:
    """Batches in one pass over the task's examples (the stage's batch size read off a batch)."""
    first = next(iter(ctx.batches(1)))
    size = jax.tree.leaves(first)[0].shape[0]
    return max(1, math.ceil(len(ctx.task.examples) / size))
