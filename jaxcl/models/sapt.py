"""SAPT (Zhao et al., ACL 2024): task LoRA blocks mixed by a shared attentive selection module.

Every targeted projection holds ``N`` task blocks (LoRA pairs ``A_n [in, r]``, ``B_n [r, out]``),
one per task, and computes

    y = x·W + (α/r) · Σ_n w_n(x) · x·A_n·B_n

with attention weights ``w(x) ∈ Δ^N`` from the **Shared Attentive Learning & Selection** module
(:class:`SaptRouter`, at the decoder's top level)::

    q    = max-pool of the frozen input token embeddings E[x]     (the query feature)
    h    = LayerNorm(SiLU(q · W₁ · W₂))                            (the trainable query projection)
    w(x) = softmax_n(k_n · h / τ) over the active blocks n         (keys k_n, τ = √d)

as in the reference code (``circle-hit/SAPT``, ``LlamaModel.cal_attention``: ``trans_input`` is
``Linear(d, h) → Linear(h, d) → SiLU → LayerNorm``, keys ``U(−1, 1)``, ``attn_temperature 1`` →
``√d``). Blocks are activated one per task (``active``); a block not yet active gets no weight.

**The query in a decoder.** ``model(input_ids)`` sees one token sequence (prompt and answer
together), so position ``t`` pools the tokens ``0..t`` (a causal running max; per segment when
``segment_ids`` pack several): no position's mixture reads a later token, and a key/value-cache
decode (:meth:`Decoder.decode`) carries the running max in its cache (``sapt_max``) and computes
the same weights as the full forward. The paper pools the instruction without its answer.

**Attentive reflection** keeps the selection of finished tasks: the router also holds, per task
``i``, the pooled features of its pseudo-samples (``memory_x [N, M, d]``) and the attention
distribution recorded when it finished (``memory_y [N, N]``); :func:`reflection_loss` is the
reference's ``KLDivLoss(batchmean)(log_softmax(scores), target)`` summed over finished tasks.
The features are a fixed function of the samples' tokens because the embedding table is frozen
(the method's mask), so storing them is the same as replaying the samples through the query.

All weights are ``nnx.Param`` with logical axis names (``sapt_tasks``, ``sapt_samples``,
``sapt_hidden``, ``lora_rank`` unmapped by the default rules: replicated; ``embed``, ``heads``,
``mlp`` sharded as the kernels they adapt), so checkpoints, sharding and plans need nothing new.
The recipe entry is ``model: {sapt: {tasks: N}}`` (:class:`SaptModelSpec`); the method that trains
one block per task is :class:`jaxcl.methods.sapt.SaptSpec`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx
from pydantic import Field

from jaxcl.spec import Strict

#: router parameters trained in every task (the shared query projection)
QUERY = ("w1", "w2", "ln_scale", "ln_bias")
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, as the reference's trans_input
NEG = -1e30  # score of an inactive block (finite: 0 · NEG stays 0 in the KL)


@dataclass(frozen=True)
class SaptConfig:
    """``tasks`` blocks per targeted projection (``targets``: projection names or a regex over
    parameter paths), each of rank ``rank`` scaled by ``alpha / rank``; the query projection's
    width ``hidden``; the softmax temperature ``temperature`` (None: ``√d``); ``samples``
    pseudo-samples kept per task for attentive reflection."""

    tasks: int
    rank: int = 4
    alpha: float = 32.0
    targets: str | Sequence[str] = ("q", "v")
    hidden: int = 100
    temperature: float | None = None
    samples: int = 16

    @property
    def pattern(self) -> str:
        if isinstance(self.targets, str):
            return self.targets
        return rf"(attn|mlp)/({'|'.join(self.targets)})$"


class SaptModelSpec(Strict):
    """``model.sapt``: grow SAPT's task blocks and its selection module when the model is built."""

    tasks: int = Field(ge=1, description="task blocks per targeted projection (one per task)")
    rank: int = Field(4, ge=1, description="rank r of each task block")
    alpha: float = Field(32.0, gt=0, description="a block's output is (alpha/r)·x·A·B")
    targets: list[str] | str = Field(
        default_factory=lambda: ["q", "v"],
        description="projections (q k v o gate up down) or a regex over parameter paths",
    )
    hidden: int = Field(100, ge=1, description="width of the query projection (trans_input)")
    temperature: float | None = Field(
        None, gt=0, description="softmax temperature of the block attention; null: sqrt(d)"
    )
    samples: int = Field(16, ge=1, description="pseudo-samples kept per task for reflection")

    @pydantic.field_validator("targets")
    @classmethod
    def _projections(cls, value: list[str] | str) -> list[str] | str:
        from jaxcl.models.llama import check_targets

        return check_targets(value)

    def config(self) -> SaptConfig:
        targets = self.targets if isinstance(self.targets, str) else tuple(self.targets)
        return SaptConfig(
            self.tasks,
            self.rank,
            self.alpha,
            targets,
            self.hidden,
            self.temperature,
            self.samples,
        )


# ----------------------------------------------------------------------------- modules


def _param(value: Any, names: tuple) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float, dtype: Any) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class SaptBank(nnx.Module):
    """One projection's ``N`` task blocks, ``a [*lead, N, in, r]``, ``b [*lead, N, r, out]``
    (``lead``: the ``layers`` axis of a scanned model). ``A_n ~ U(±1/√in)`` (the reference's
    ``kaiming_uniform(a=√5)``), ``B_n = 0``: a fresh block adds nothing."""

    def __init__(self, a: Any, b: Any, names: tuple, scale: float) -> None:
        lead = names[:-2]
        self.a = _param(a, (*lead, "sapt_tasks", names[-2], "lora_rank"))
        self.b = _param(b, (*lead, "sapt_tasks", "lora_rank", names[-1]))
        self.scale = scale

    def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        """``(α/r) Σ_n w_n · x·A_n·B_n`` for ``x [..., in]`` and ``weights [..., N]``."""
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        n, _, r = a.shape
        h = jnp.einsum("...i,nir->...nr", x, a) * weights.astype(x.dtype)[..., None]
        return (h.reshape(*h.shape[:-2], n * r) @ b.reshape(n * r, -1)) * self.scale

    def branch(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        """What the blocks add to their projection (:data:`jaxcl.models.llama.BRANCHES`), under
        the block weights of the forward pass in progress (:func:`block_weights`)."""
        del rng
        return self(x, block_weights())


class SaptRouter(nnx.Module):
    """The shared attentive selection module and the reflection memory."""

    def __init__(self, cfg: SaptConfig, d: int, rngs: nnx.Rngs, *, abstract: bool = False) -> None:
        n, h, m = cfg.tasks, cfg.hidden, cfg.samples
        f32 = jnp.float32

        def make(shape, init):
            return jax.ShapeDtypeStruct(shape, f32) if abstract else init(shape)

        self.keys = _param(
            make((n, d), lambda s: _uniform(rngs.params(), s, 1.0, f32)), ("sapt_tasks", "embed")
        )
        self.w1 = _param(
            make((d, h), lambda s: _uniform(rngs.params(), s, d**-0.5, f32)),
            ("embed", "sapt_hidden"),
        )
        self.w2 = _param(
            make((h, d), lambda s: _uniform(rngs.params(), s, h**-0.5, f32)),
            ("sapt_hidden", "embed"),
        )
        self.ln_scale = _param(make((d,), lambda s: jnp.ones(s, f32)), ("norm",))
        self.ln_bias = _param(make((d,), lambda s: jnp.zeros(s, f32)), ("norm",))
        # block 0 is active from the start, so a fresh model is the base model (B = 0)
        self.active = _param(
            make((n,), lambda s: jnp.zeros(s, f32).at[0].set(1.0)), ("sapt_tasks",)
        )
        self.memory_x = _param(
            make((n, m, d), lambda s: jnp.zeros(s, f32)), ("sapt_tasks", "sapt_samples", "embed")
        )
        self.memory_y = _param(make((n, n), lambda s: jnp.zeros(s, f32)), ("sapt_tasks", None))
        self.temperature = cfg.temperature if cfg.temperature is not None else math.sqrt(d)


def add_sapt(
    model: nnx.Module, cfg: SaptConfig, *, rngs: nnx.Rngs, abstract: bool = False
) -> list[str]:
    """Grow ``model`` (a :class:`~jaxcl.models.Decoder`) in place: ``cfg.tasks`` blocks on every
    projection matching ``cfg.pattern`` and the router at ``model.sapt``; returns the adapted
    paths. ``abstract``: shapes only (for plans). Raises when nothing matches or the model has
    SAPT blocks already."""
    from jaxcl.models.lora import _targets

    if getattr(model, "sapt", None) is not None:
        raise ValueError("the model has SAPT blocks already (model.sapt)")
    matched = list(_targets(model, cfg.pattern))
    if not matched:
        raise ValueError(f"sapt.targets: {cfg.pattern!r} matches no projection of the model")
    for _, module, proj in matched:
        kernel = getattr(module, proj)
        *lead, d_in, d_out = kernel.shape
        names = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
        dtype = kernel.get_value().dtype
        a_shape = (*lead, cfg.tasks, d_in, cfg.rank)
        b_shape = (*lead, cfg.tasks, cfg.rank, d_out)
        if abstract:
            a, b = jax.ShapeDtypeStruct(a_shape, dtype), jax.ShapeDtypeStruct(b_shape, dtype)
        else:
            a = _uniform(rngs.params(), a_shape, d_in**-0.5, dtype)
            b = jnp.zeros(b_shape, dtype)
        if not hasattr(module, "sapt"):
            module.sapt = nnx.Dict()
        module.sapt[proj] = SaptBank(a, b, names, cfg.alpha / cfg.rank)
    model.sapt = SaptRouter(cfg, model.config.hidden_size, rngs, abstract=abstract)
    return [path for path, _, _ in matched]


def has_sapt(model: Any) -> bool:
    return getattr(model, "sapt", None) is not None


# ----------------------------------------------------------------------------- the selection


def _cummax(features: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    if segment_ids is None:
        return jax.lax.cummax(features, axis=1)

    def combine(left, right):
        (m1, s1), (m2, s2) = left, right
        return jnp.where((s1 == s2)[..., None], jnp.maximum(m1, m2), m2), s2

    return jax.lax.associative_scan(combine, (features, segment_ids), axis=1)[0]


def running_max(
    features: jax.Array, segment_ids: jax.Array | None = None, valid: jax.Array | None = None
) -> jax.Array:
    """``m_t = max_{s ≤ t} f_s`` over axis 1 of ``features [B, T, d]``, restarted where
    ``segment_ids [B, T]`` changes; positions where ``valid`` is False are skipped (a prefix
    of them pools to 0)."""
    if valid is not None:
        features = jnp.where(valid[..., None], features, -jnp.inf)
    out = _cummax(features, segment_ids)
    return jnp.where(jnp.isneginf(out), 0.0, out)


def token_features(embed: jax.Array, input_ids: jax.Array) -> jax.Array:
    """The frozen token embeddings ``E[x]`` in float32 (no gradient reaches the table)."""
    return jax.lax.stop_gradient(jnp.take(embed, input_ids, axis=0).astype(jnp.float32))


def scores(router: dict, pooled: jax.Array, temperature: float) -> jax.Array:
    """``k_n · LayerNorm(SiLU(q·W₁·W₂)) / τ`` for ``pooled [..., d]`` → ``[..., N]``, inactive
    blocks at :data:`NEG`. ``router``: the router's parameters as a dict."""
    h = jax.nn.silu(pooled @ router["w1"] @ router["w2"])
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
    h = (h - mu) * jax.lax.rsqrt(var + LN_EPS) * router["ln_scale"] + router["ln_bias"]
    s = h @ router["keys"].T / temperature
    return jnp.where(router["active"] > 0.5, s, NEG)


def attention(router: dict, pooled: jax.Array, temperature: float) -> jax.Array:
    """The block weights ``w = softmax(scores)`` ``[..., N]``."""
    return jax.nn.softmax(scores(router, pooled, temperature), axis=-1)


def router_params(router: SaptRouter) -> dict:
    return {
        name: getattr(router, name)[...]
        for name in ("keys", *QUERY, "active", "memory_x", "memory_y")
    }


def current_slot(router: dict) -> jax.Array:
    """The block the current task trains: the last active one."""
    return jnp.sum(router["active"] > 0.5).astype(jnp.int32) - 1


def reflection_loss(router: dict, temperature: float) -> jax.Array:
    """Attentive reflection: ``Σ_{i<k} (1/M) Σ_m KL(y_i ‖ w(x_{i,m}))`` with ``k`` the current
    block, ``x_{i,m}`` task ``i``'s stored pseudo-sample features and ``y_i`` its recorded
    attention (zero on blocks after ``i``), ``0·log 0 = 0``: the reference's
    ``kl_ratio · KLDivLoss(reduction="batchmean")(log_softmax(scores), target)`` per earlier
    task, summed over them (one replay batch per earlier task each step)."""
    logp = jax.nn.log_softmax(scores(router, router["memory_x"], temperature), axis=-1)
    y = router["memory_y"][:, None, :]  # [N, 1, N]
    safe = jnp.where(y > 0, y, 1.0)
    kl = jnp.sum(jnp.where(y > 0, y * (jnp.log(safe) - logp), 0.0), axis=-1)  # [N, M]
    earlier = jnp.arange(kl.shape[0]) < current_slot(router)
    return jnp.sum(jnp.where(earlier, jnp.mean(kl, axis=-1), 0.0))


# ----------------------------------------------------------------------------- the forward pass

_WEIGHTS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "jaxcl_sapt_weights", default=None
)


def block_weights() -> jax.Array:
    """The block weights ``[batch, seq, N]`` of the forward pass in progress (read by the
    projections' :class:`SaptBank`, see :meth:`jaxcl.models.llama._Projections.project`)."""
    w = _WEIGHTS.get()
    if w is None:
        raise ValueError(
            "SAPT blocks need the attention weights of the whole input: call the Decoder "
            "(model(input_ids) or model.decode), not one of its layers alone"
        )
    return w


@contextlib.contextmanager
def _scoped(weights: jax.Array) -> Iterator[None]:
    token = _WEIGHTS.set(weights)
    try:
        yield
    finally:
        _WEIGHTS.reset(token)


def routing(model: Any, input_ids: jax.Array, segment_ids: jax.Array | None = None):
    """Context in which ``model``'s layers run with the block weights of ``input_ids``: each
    position's weights from the running max of the tokens up to it (within its segment). The
    weights are scoped to this one forward pass (traced with it, never stored)."""
    router = model.sapt
    pooled = running_max(token_features(model.embed[...], input_ids), segment_ids)
    return _scoped(attention(router_params(router), pooled, router.temperature))


@contextlib.contextmanager
def decode_routing(
    model: Any, input_ids: jax.Array, cache: dict, slot_valid: jax.Array, index: Any
) -> Iterator[dict]:
    """:func:`routing` for :meth:`Decoder.decode`: the running max continues from
    ``cache["sapt_max"]`` (absent on the prefill) over the new tokens' valid slots; yields the
    cache entries to return (the updated running max)."""
    router = model.sapt
    feats = token_features(model.embed[...], input_ids)
    b, t, d = feats.shape
    valid = jax.lax.dynamic_slice(slot_valid, (0, index), (b, t))
    before = cache.get("sapt_max")  # the raw running max (−inf before any valid token)
    if before is None:
        before = jnp.full((b, d), -jnp.inf, jnp.float32)
    feats = jnp.where(valid[..., None], feats, -jnp.inf)
    raw = _cummax(jnp.concatenate([before[:, None, :], feats], axis=1))[:, 1:]
    pooled = jnp.where(jnp.isneginf(raw), 0.0, raw)
    with _scoped(attention(router_params(router), pooled, router.temperature)):
        yield {"sapt_max": raw[:, -1]}


# ----------------------------------------------------------------------------- counting


def _keys(path: tuple) -> list[Any]:
    return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]


def is_sapt(path: tuple) -> bool:
    """Whether a parameter path (jax key path or tuple of names) is one of SAPT's."""
    return "sapt" in _keys(path)


def new_parameters(params: Any) -> int:
    """How many of ``params`` (arrays or shapes) SAPT added: blocks, router and memory."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(math.prod(x.shape) for path, x in flat if is_sapt(path))


def refuse_export(model: Any) -> None:
    """``save_pretrained`` of a model with SAPT blocks: a ``ValueError`` saying why."""
    if has_sapt(model):
        raise ValueError(
            "this model has SAPT task blocks and an input-dependent block selection "
            "(model.sapt): transformers' Llama has no place for them, so it cannot be exported "
            "as an HF directory or GGUF file; keep the run's checkpoint (jaxcl eval reads it)"
        )


__all__ = [
    "QUERY",
    "SaptBank",
    "SaptConfig",
    "SaptModelSpec",
    "SaptRouter",
    "add_sapt",
    "attention",
    "block_weights",
    "current_slot",
    "decode_routing",
    "has_sapt",
    "is_sapt",
    "new_parameters",
    "reflection_loss",
    "refuse_export",
    "router_params",
    "routing",
    "running_max",
    "scores",
    "token_features",
]
