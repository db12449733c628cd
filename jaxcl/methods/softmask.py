"""Soft-masking of updates by unit importance: DAS (Ke et al., 2023, "Continual Pre-training of
Language Models", ICLR; reference code UIC-Liu-Lab/ContinualLM, ``networks/baselines/softmask.py``).

**Units and their importance.** DAS scores *units*, not weights: every attention head, every FFN
intermediate neuron and every FFN output neuron of every layer. Each unit ``u`` has a virtual gate
``g_u = 1`` on its output and its importance for a loss ``L`` is (DAS eq. 1)

    I_u = (1/N) Σ_n |∂L(x_n)/∂g_u|        (N examples, the gradient taken at g = 1)

No gate is needed in the model. A gate on the input rows of a linear map, ``y = (g⊙a)·W``, or on
its output columns, ``y = g⊙(a·W + b)``, has at ``g = 1``

    ∂L/∂g_i = <W[i, :], ∂L/∂W[i, :]>                    (rows)
    ∂L/∂g_j = <W[:, j], ∂L/∂W[:, j]> + b_j ∂L/∂b_j      (columns)

so, from one gradient of the loss: head ``h`` = the rows of ``W_o`` fed by head ``h`` (its
attention output ``a_h``, which RoBERTa's ``head_mask`` gates); intermediate neuron ``n`` = row
``n`` of ``W_down`` (the gate on the SwiGLU hidden unit ``silu(x·W_gate)_n (x·W_up)_n``, the same
gate as on the output of ``up``, the linear branch: DAS gates the output of RoBERTa's
``intermediate.dense``); output neuron ``j`` = column ``j`` of ``W_down`` and ``b_down[j]`` (DAS's
``output_mask`` on ``output.dense``).

**Normalisation and accumulation.** Per layer and unit type, ``Î = |tanh((I − mean I) / std I)|``
(``std`` with Bessel's correction, as torch's ``Tensor.std`` in the reference); over tasks
``Î ← max(Î, Î_t)``. Before the stage's first task, ``Î_0`` scores the *starting* model's units for
its general knowledge with DAS's proxy loss (below); after each task ``t``, ``Î_t`` scores them with
the task's own objective on its own data (DAS's ``after_mlm``).

**Masking.** Every update of a unit's parameters is scaled by ``1 − Î_u``: head ``h``: its output
columns of ``W_q`` and of ``W_k``, ``W_v`` (grouped-query attention: a key/value head shared by
``G`` query heads takes the largest ``Î`` of the ``G``: it is protected as much as its most
important user), their biases, and its rows of ``W_o``; intermediate neuron ``n``: column ``n`` of
``W_gate`` and ``W_up`` and their biases; output neuron ``j``: column ``j`` of ``W_down`` and
``b_down[j]``. Embeddings, norms, the LM head and ``b_o`` are not masked (no unit owns them).

**Proxy loss (general knowledge).** ``L_impt(x) = KL(p(x; θ⊙D₁) ‖ p(x; θ⊙D₂))``: the same input
through the model twice with independent dropout masks ``D₁, D₂`` (DAS: the pretrained model's
robustness stands for its general knowledge; the first task's data stands for the unavailable
pretraining data, as in the reference). The gate gradient flows through both passes.

**Placement.** By default the mask scales the *final update*, behind AdamW: scaling a gradient
coordinate by a constant ``c`` scales Adam's ``m`` by ``c`` and ``√v`` by ``c``, so a mask in
front of Adam is undone (up to ``ε``). The reference scales ``.grad`` before ``AdamW.step`` (the
paper writes ``∇' = (1 − Î) ⊗ ∇``, which is the same thing under SGD); ``placement="gradient"``
does that. Memory: 1 parameter-sized buffer (of the masked leaves).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods._tree import SKIP, Select, is_skip, path_str, selection, skipped
from jaxcl.methods.compose import Position, behind, front
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase, model_inputs, with_state

Unit = Literal["heads", "intermediate", "output"]
UNITS: tuple[Unit, ...] = ("heads", "intermediate", "output")
Placement = Literal["update", "gradient"]
#: per-unit arrays ``[..., units]`` keyed ``"<block path>:<unit>"`` (leading axes: stacked layers)
Scores = dict[str, jax.Array]
ScoreFn = Callable[[Any, Any, jax.Array], Scores]

_ATTN = frozenset({"q", "k", "v", "o"})
_MLP = frozenset({"gate", "up", "down"})
#: the leaves each unit type owns (the parameters whose updates its mask scales)
UNIT_LEAVES: dict[Unit, tuple[str, ...]] = {
    "heads": ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias"),
    "intermediate": ("gate", "up", "gate_bias", "up_bias"),
    "output": ("down", "down_bias"),
}


# ----------------------------------------------------------------------------- the transform


class SoftMaskState(NamedTuple):
    """Accumulated normalised unit importance Î ∈ [0, 1], broadcast to the parameters' shapes."""

    importance: optax.Params


def soft_mask(select: Select | None = None, *, placement: Placement = "update"):
    """Soft-masking by unit importance (DAS): ``u ← u ⊙ (1 − Î)``.

    ``Î`` starts at 0 and is refreshed by :func:`jaxcl.methods.consolidate` with
    ``soft_mask_importance=`` (a task's normalised importance, a parameter-shaped tree in [0, 1],
    e.g. from :func:`unit_mask_tree`): ``Î ← max(Î, Î_t)``. ``placement="update"`` (a
    :class:`~jaxcl.methods.compose.Behind`, after AdamW) scales the applied update;
    ``"gradient"`` (a ``Front``) scales the gradient, as the reference code does. ``select``
    picks the leaves that carry a buffer (all if None; the rest pass unchanged).
    """
    if placement not in ("update", "gradient"):
        raise ValueError(f"soft_mask: placement is 'update' or 'gradient', not {placement!r}")

    def init(params: optax.Params) -> SoftMaskState:
        flags = (
            jax.tree.map(lambda _: True, params) if select is None else selection(select, params)
        )
        return SoftMaskState(
            jax.tree.map(lambda p, f: jnp.zeros_like(p) if f else SKIP(), params, flags)
        )

    def update(updates, state: SoftMaskState, params=None, **extra_args):
        del params, extra_args

        def scale(u, m):
            return u if skipped(m) else (u * (1 - m)).astype(u.dtype)

        return jax.tree.map(scale, updates, state.importance), state

    return (behind if placement == "update" else front)(init, update)


def accumulate(state: SoftMaskState, mask: optax.Params) -> SoftMaskState:
    """``Î ← max(Î, clip(mask, 0, 1))`` leaf by leaf (a skipped leaf of either side is kept)."""

    def acc(m, new):
        if skipped(m) or skipped(new):
            return m
        return jnp.maximum(m, jnp.clip(new, 0.0, 1.0).astype(m.dtype))

    return SoftMaskState(jax.tree.map(acc, state.importance, mask, is_leaf=is_skip))


def _refresh_soft_mask(state: SoftMaskState, *, params, soft_mask_importance, **_) -> SoftMaskState:
    del params
    return accumulate(state, soft_mask_importance)


register_consolidator(
    SoftMaskState, "soft_mask", _refresh_soft_mask, requires=("soft_mask_importance",)
)


def refresh_soft_masks(opt_state: optax.OptState, mask: optax.Params) -> optax.OptState:
    """Accumulate ``mask`` into every :class:`SoftMaskState` of ``opt_state``, the rest
    untouched (no other method's estimate needed, unlike :func:`jaxcl.methods.consolidate`)."""

    def refresh(node: Any) -> Any:
        return accumulate(node, mask) if isinstance(node, SoftMaskState) else node

    return jax.tree.map(refresh, opt_state, is_leaf=lambda x: isinstance(x, SoftMaskState))


# ----------------------------------------------------------------------------- units


def find_blocks(params: Any) -> list[tuple[tuple[Any, ...], str]]:
    """``[(keys, "attn" | "mlp")]``: every dict holding ``q, k, v, o`` (attention) or
    ``gate, up, down`` (SwiGLU FFN), in tree order. Stacked layers keep a leading axis."""
    found: list[tuple[tuple[Any, ...], str]] = []

    def walk(node: Any, keys: tuple[Any, ...]) -> None:
        if not isinstance(node, Mapping):
            return
        names = set(node)
        if _ATTN <= names:
            found.append((keys, "attn"))
        elif _MLP <= names:
            found.append((keys, "mlp"))
        else:
            for k in node:
                walk(node[k], (*keys, k))

    walk(params, ())
    return found


def _at(tree: Any, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _name(keys: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in keys)


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _head_dim(block: Mapping[str, Any], num_heads: int, where: str) -> int:
    width = block["q"].shape[-1]
    if width % num_heads or block["k"].shape[-1] % (width // num_heads):
        raise ValueError(
            f"soft_mask: {where}: q has {width} columns, k {block['k'].shape[-1]}: not whole "
            f"heads of {num_heads} query heads (is num_heads right?)"
        )
    return width // num_heads


def gate_scores(params: Any, grads: Any, *, num_heads: int) -> Scores:
    """``∂L/∂g_u`` at ``g = 1`` for every unit, from ``grads = ∂L/∂params`` (see module doc):
    heads ``Σ_{rows of head h} W_o ⊙ ∂W_o``; intermediate ``Σ_j W_down[n, j] ∂W_down[n, j]``;
    output ``Σ_n W_down[n, j] ∂W_down[n, j] + b_j ∂b_j``. Float32 ``[..., units]``."""
    out: Scores = {}
    for keys, kind in find_blocks(params):
        w, g, name = _at(params, keys), _at(grads, keys), _name(keys)
        if kind == "attn":
            hd = _head_dim(w, num_heads, name)
            prod = _f32(w["o"]) * _f32(g["o"])
            prod = prod.reshape(*prod.shape[:-2], num_heads, hd, prod.shape[-1])
            out[f"{name}:heads"] = prod.sum(axis=(-2, -1))
        else:
            prod = _f32(w["down"]) * _f32(g["down"])
            out[f"{name}:intermediate"] = prod.sum(axis=-1)
            col = prod.sum(axis=-2)
            if "down_bias" in w:
                col = col + _f32(w["down_bias"]) * _f32(g["down_bias"])
            out[f"{name}:output"] = col
    return out


def normalized_importance(importance: jax.Array, axis: int = -1) -> jax.Array:
    """DAS's ``|tanh((I − mean I) / std I)|`` over the units of one layer (``axis``), with
    torch's unbiased ``std``; a layer whose units are all equal (or single) maps to 0."""
    x = _f32(importance)
    if x.shape[axis] < 2:
        return jnp.zeros_like(x)
    mean = jnp.mean(x, axis=axis, keepdims=True)
    std = jnp.std(x, axis=axis, keepdims=True, ddof=1)
    z = (x - mean) / jnp.where(std > 0, std, 1.0)
    return jnp.where(std > 0, jnp.abs(jnp.tanh(z)), 0.0)


def unit_masks(importance: Scores, units: Iterable[Unit] = UNITS) -> Scores:
    """The normalised importance of the chosen unit types (the others dropped)."""
    keep = set(units)
    return {k: normalized_importance(v) for k, v in importance.items() if k.split(":")[1] in keep}


def unit_mask_tree(params: Any, masks: Scores, *, num_heads: int) -> Any:
    """Broadcast per-unit masks to a parameter-shaped tree (float32; :data:`SKIP` where no unit
    owns the leaf): q/k/v columns and o rows of a head (a kv head: the max over its query
    heads), gate/up columns of an intermediate neuron, down columns of an output neuron."""
    geometry: dict[str, tuple[int, int]] = {}
    for keys, kind in find_blocks(params):
        if kind == "attn":
            block = _at(params, keys)
            hd = _head_dim(block, num_heads, _name(keys))
            geometry[_name(keys)] = (hd, block["k"].shape[-1] // hd)

    def leaf_mask(path: tuple[Any, ...], x: Any) -> Any:
        parts = path_str(path).split("/")
        block, leaf = "/".join(parts[:-1]), parts[-1]
        col: jax.Array | None = None
        if leaf in UNIT_LEAVES["heads"] and f"{block}:heads" in masks:
            heads = masks[f"{block}:heads"]
            hd, kv = geometry[block]
            if leaf[0] in "kv":
                heads = heads.reshape(*heads.shape[:-1], kv, num_heads // kv).max(axis=-1)
            col = jnp.repeat(heads, hd, axis=-1)
            if leaf == "o":  # rows of o, not columns
                return jnp.broadcast_to(col[..., :, None], x.shape).astype(jnp.float32)
        elif leaf in UNIT_LEAVES["intermediate"] and f"{block}:intermediate" in masks:
            col = masks[f"{block}:intermediate"]
        elif leaf in UNIT_LEAVES["output"] and f"{block}:output" in masks:
            col = masks[f"{block}:output"]
        if col is None:
            return SKIP()
        col = col if leaf.endswith("_bias") else col[..., None, :]
        return jnp.broadcast_to(col, x.shape).astype(jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf_mask, params)


# ----------------------------------------------------------------------------- estimators


def loss_scores(loss_fn: Callable[[Any, Any], jax.Array], *, num_heads: int) -> ScoreFn:
    """``score(params, batch, key)``: the gate gradients of ``loss_fn`` (the key unused)."""

    def score(params: Any, batch: Any, key: jax.Array) -> Scores:
        del key
        return gate_scores(params, jax.grad(loss_fn)(params, batch), num_heads=num_heads)

    return score


def hidden_dropout_masks(key: jax.Array, params: Any, rate: float) -> dict[str, jax.Array]:
    """Inverted-dropout masks (values 0 or ``1/(1 − rate)``) for the output features of every
    attention and FFN block (``[..., hidden]``, the sites of RoBERTa's hidden dropout: after the
    attention output and the FFN output projections), one mask per block and sequence."""
    masks = {}
    for i, (keys, kind) in enumerate(find_blocks(params)):
        w = _at(params, keys)["o" if kind == "attn" else "down"]
        keep = jax.random.bernoulli(
            jax.random.fold_in(key, i), 1.0 - rate, (*w.shape[:-2], w.shape[-1])
        )
        masks[_name(keys)] = keep.astype(jnp.float32) / (1.0 - rate)
    return masks


def with_hidden_dropout(params: Any, masks: Mapping[str, jax.Array]) -> Any:
    """The parameters whose blocks' outputs are dropped by ``masks``: the output columns (and
    bias) of ``o`` and ``down`` scaled, ``(x·W + b) ⊙ D = x·(W ⊙ D) + b ⊙ D``."""

    def drop(path: tuple[Any, ...], x: Any) -> Any:
        parts = path_str(path).split("/")
        m = masks.get("/".join(parts[:-1]))
        if m is None or parts[-1] not in ("o", "o_bias", "down", "down_bias"):
            return x
        return (x * (m if parts[-1].endswith("_bias") else m[..., None, :])).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(drop, params)


def kl_proxy_loss(
    apply: Callable[[Any, Any], jax.Array], first: Any, second: Any, batch
) -> jax.Array:
    """``KL(p(·; first) ‖ p(·; second))`` of the next-token distributions, averaged over the
    positions (weighted by ``loss_mask`` when the batch has one of the logits' shape)."""
    inputs = model_inputs(batch)
    lp1 = jax.nn.log_softmax(_f32(apply(first, inputs)), axis=-1)
    lp2 = jax.nn.log_softmax(_f32(apply(second, inputs)), axis=-1)
    kl = jnp.sum(jnp.exp(lp1) * (lp1 - lp2), axis=-1)
    mask = batch.get("loss_mask") if isinstance(batch, Mapping) else None
    w = _f32(mask) if mask is not None and mask.shape == kl.shape else jnp.ones_like(kl)
    return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0)


def kl_proxy_scores(
    apply: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    masks: tuple[Mapping[str, jax.Array], Mapping[str, jax.Array]],
    *,
    num_heads: int,
) -> Scores:
    """Gate gradients of DAS's proxy: the gates sit in both dropped passes, so
    ``∂L/∂g_u = s_u(θ⊙D₁, ∂L/∂(θ⊙D₁)) + s_u(θ⊙D₂, ∂L/∂(θ⊙D₂))`` (:func:`gate_scores`)."""
    first, second = (with_hidden_dropout(params, m) for m in masks)
    g1, g2 = jax.grad(lambda a, b: kl_proxy_loss(apply, a, b, batch), argnums=(0, 1))(first, second)
    s1 = gate_scores(first, g1, num_heads=num_heads)
    s2 = gate_scores(second, g2, num_heads=num_heads)
    return {k: s1[k] + s2[k] for k in s1}


def proxy_scores(apply: Callable[[Any, Any], jax.Array], *, num_heads: int, rate: float) -> ScoreFn:
    """``score(params, batch, key)``: :func:`kl_proxy_scores` with two dropout draws of ``key``."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"soft_mask: the proxy's dropout rate must lie in (0, 1), not {rate}")

    def score(params: Any, batch: Any, key: jax.Array) -> Scores:
        k1, k2 = jax.random.split(key)
        masks = (hidden_dropout_masks(k1, params, rate), hidden_dropout_masks(k2, params, rate))
        return kl_proxy_scores(apply, params, batch, masks, num_heads=num_heads)

    return score


@partial(jax.jit, static_argnames=("score", "absolute", "micro_batch"))
def _batch_sum(
    params: Any, batch: Any, key: jax.Array, *, score: ScoreFn, absolute: bool, micro_batch: int
) -> Scores:
    """``Σ_n |s(x_n)|`` (or ``Σ_n s(x_n)``) over the rows of one batch, each row its own batch."""
    n = jax.tree.leaves(batch)[0].shape[0]

    def one(args: tuple[Any, jax.Array]) -> Scores:
        example, k = args
        s = score(params, jax.tree.map(lambda x: x[None], example), k)
        return jax.tree.map(jnp.abs, s) if absolute else s

    per = jax.lax.map(
        one, (batch, jax.random.split(key, n)), batch_size=micro_batch if micro_batch > 1 else None
    )
    return jax.tree.map(lambda x: x.sum(axis=0), per)


def unit_importance(
    score: ScoreFn,
    params: Any,
    batches: Iterable[Any],
    *,
    key: jax.Array | None = None,
    absolute: bool = True,
    micro_batch: int = 1,
) -> Scores:
    """``I_u = (1/N) Σ_n |s_u(x_n)|`` over the examples of ``batches`` (DAS eq. 1; with
    ``absolute=False`` the signed mean, as the reference code sums the signed gradients).

    Each example is its own batch of one (its own dropout key: ``fold_in(key, batch index)``
    split per example); ``micro_batch`` examples are vmapped at a time (memory ∝ micro_batch ×
    parameters), so memory stays O(parameters) by default.
    """
    key = jax.random.key(0) if key is None else key
    total: Scores | None = None
    count = 0
    for i, batch in enumerate(batches):
        sums = _batch_sum(
            params,
            batch,
            jax.random.fold_in(key, i),
            score=score,
            absolute=absolute,
            micro_batch=micro_batch,
        )
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        count += jax.tree.leaves(batch)[0].shape[0]
    if total is None:
        raise ValueError("soft_mask: no batches to estimate the unit importance on")
    if not total:
        raise ValueError(
            "soft_mask: no attention (q, k, v, o) or FFN (gate, up, down) block among the trained "
            "parameters: DAS masks the model's heads and neurons (not LoRA adapters)"
        )
    return jax.tree.map(lambda x: x / count, total)


# ----------------------------------------------------------------------------- recipe spec


def unit_leaf_select(
    units: Iterable[Unit], include: str | None = None
) -> Callable[[str, Any], bool]:
    """The leaves owned by ``units`` (by name, as :data:`UNIT_LEAVES`), and matching ``include``."""
    names = {leaf for u in units for leaf in UNIT_LEAVES[u]}
    inc = re.compile(include) if include else None
    return lambda path, _x: path.split("/")[-1] in names and (inc is None or bool(inc.search(path)))


class SoftMaskSpec(MethodSpecBase):
    """DAS soft-masking: the general-knowledge importance before the stage's first task (a
    ``task_start`` hook), the task's importance after each task (an estimate), ``u ⊙ (1 − Î)``."""

    name: Literal["soft_mask"]
    position: ClassVar[Position] = "behind"
    describes_weights: ClassVar[bool] = True
    importance_batches: int = Field(8, ge=1, description="batches of the task for its importance")
    general: bool = Field(
        True, description="score the starting model's units before the first task (DAS's proxy)"
    )
    general_batches: int | None = Field(
        None, ge=1, description="batches of the first task for the proxy (importance_batches)"
    )
    proxy_dropout: float = Field(
        0.1, gt=0, lt=1, description="dropout rate of the proxy's two passes (RoBERTa's 0.1)"
    )
    units: tuple[Unit, ...] = Field(UNITS, min_length=1, description="unit types masked")
    num_heads: int | None = Field(
        None, ge=1, description="query heads per layer (default: ctx.tools['model_config'])"
    )
    gate_grad: Literal["abs_per_example", "signed_sum"] = Field(
        "abs_per_example",
        description="mean |∂L/∂g| per example (paper eq. 1) or the signed sum (reference code)",
    )
    placement: Placement = Field(
        "update", description="mask the update behind AdamW, or the gradient in front of it"
    )
    micro_batch: int = Field(1, ge=1, description="examples per vmapped per-example gradient")
    include: str | None = Field(None, description="regex: mask only the unit leaves it matches")

    def place(self) -> Position:
        return "behind" if self.placement == "update" else "front"

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return soft_mask(unit_leaf_select(self.units, self.include), placement=self.placement)

    def heads(self, ctx: Context) -> int:
        """Query heads per layer: the field, else ``ctx.tools['model_config'].num_heads``."""
        if self.num_heads is not None:
            return self.num_heads
        n = getattr(ctx.tools.get("model_config"), "num_heads", None) or ctx.tools.get("num_heads")
        if not n:
            raise ValueError(
                "soft_mask needs the number of attention heads: set methods[].num_heads (the "
                "stage provides none in ctx.tools['model_config'])"
            )
        return int(n)

    def mask(self, ctx: Context, carry: Carry, score: ScoreFn, n_batches: int, key: jax.Array):
        """The normalised importance of the trainable units under ``score``, as a tree."""
        trainable = ctx.trainable(carry)
        imp = unit_importance(
            score,
            trainable,
            ctx.batches(n_batches),
            key=key,
            absolute=self.gate_grad == "abs_per_example",
            micro_batch=self.micro_batch,
        )
        return unit_mask_tree(trainable, unit_masks(imp, self.units), num_heads=self.heads(ctx))

    def _key(self, ctx: Context, salt: int) -> jax.Array:
        seed = int(ctx.tools.get("seed", 0) or 0)
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0xDA5), salt)

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        score = loss_scores(ctx.loss_fn, num_heads=self.heads(ctx))
        key = self._key(ctx, 1 + ctx.task.index)
        return {"soft_mask_importance": self.mask(ctx, carry, score, self.importance_batches, key)}

    def general_importance(self, ctx: Context, carry: Carry) -> Carry:
        """Task 0 only: ``Î ← max(Î, Î_0)`` with the proxy's importance of the starting model."""
        if ctx.task.index != 0:
            return carry
        score = proxy_scores(ctx.apply, num_heads=self.heads(ctx), rate=self.proxy_dropout)
        n = self.general_batches or self.importance_batches
        mask = self.mask(ctx, carry, score, n, self._key(ctx, 0))
        return with_state(carry, opt_state=refresh_soft_masks(carry.state.opt_state, mask))

    def hooks(self) -> list[Hook]:
        if not self.general:
            return []
        return [Hook("task_start", self.general_importance, name="soft_mask: general knowledge")]
