"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Every parameter carries logical axis names (``embed``, ``vocab``, ``heads``, ``kv_heads``,
``mlp``, ``norm``, and ``layers`` when the layers are scanned) in its ``out_sharding`` metadata;
:mod:`jaxcl.parallel` maps them onto mesh axes. Kernels are stored ``[in, out]`` (the transpose of
a torch ``Linear.weight``), so a projection is ``y = x·W + b``.

Attention goes through :func:`jaxcl.models.attention.causal_attention`: XLA, cuDNN's fused kernel
on GPU or Pallas splash on TPU, per the config's ``attention`` field (decode: always XLA).
:meth:`Decoder.decode` runs the same layers against a key/value cache for generation.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.models.attention import SegmentMask, causal_attention
from jaxcl.models.config import ModelConfig
from jaxcl.models.matmul import linear, rms_norm, swiglu

Cache = dict[str, jax.Array]
# A stable index per projection, to fold into the LoRA dropout key.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def check_targets(value: list[str] | str) -> list[str] | str:
    """A ``targets`` field of an adapter spec (LoRA, MoE-LoRA, SAPT): projection names from
    :data:`PROJECTIONS`, or a regular expression over parameter paths (``ValueError`` naming
    the unknown projections or the bad expression)."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression: {value!r} ({err})") from None
        return value
    unknown = [t for t in value if t not in PROJECTIONS]
    if unknown or not value:
        raise ValueError(f"unknown projections {unknown}; valid choices: {', '.join(PROJECTIONS)}")
    return value


#: attributes of a projection module that hold additive branches, one module per projection
#: name, each with ``branch(x, rng) -> Δy``: LoRA banks (jaxcl.models.lora), routed LoRA experts
#: (jaxcl.models.experts), SAPT's task blocks (jaxcl.models.sapt)
BRANCHES = ("lora", "moe_lora", "sapt")


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype, std: float):
    init = jax.nn.initializers.normal(stddev=std)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def _zeros(shape: tuple[int, ...], names: tuple[str, ...], dtype):
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x²) + eps) * scale``, computed in float32
    (:func:`~jaxcl.models.matmul.rms_norm`)."""

    def __init__(self, dim: int, eps: float, param_dtype) -> None:
        self.eps = eps
        self.scale = nnx.Param(
            jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, inv_freq: Any = None
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[batch, seq, head_dim]`` for rotary embeddings (half-split layout).

    Angle of position ``p`` and pair ``i``: ``p · inv_freq[i]``, with ``inv_freq[i] =
    θ^(−2i/head_dim)`` unless given (rope scaling, see :meth:`ModelConfig.rope_inv_freq`).
    """
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
    """``R·x = [−x₂, x₁]`` for ``x = [x₁, x₂]`` split at the middle of the last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rotate_half_transposed(x: jax.Array) -> jax.Array:
    """``Rᵀ·x = [x₂, −x₁]``."""
    half = x.shape[-1] // 2
    return jnp.concatenate([x[..., half:], -x[..., :half]], axis=-1)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]``: ``x·cos + rotate_half(x)·sin``, in float32.

    The backward pass is written out, ``∂x = g·cos + Rᵀ(g·sin)`` (``R`` = rotate_half, a signed
    permutation): autodiff's version of the slices and the concatenation, fused with the
    attention's layout changes, cost XLA:CPU a few ms per layer in bf16 (docs/performance.md).
    """
    return _rope(x, cos, sin)


def _rope_fwd(x, cos, sin):
    return _rope(x, cos, sin), (x, cos, sin)


def _rope_bwd(residuals, g):
    x, cos, sin = residuals
    g32, x32 = g.astype(jnp.float32), x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    dx = (g32 * c + _rotate_half_transposed(g32 * s)).astype(x.dtype)
    dcos = jnp.sum(g32 * x32, axis=2).astype(cos.dtype)  # dropped by XLA unless used
    dsin = jnp.sum(g32 * _rotate_half(x32), axis=2).astype(sin.dtype)
    return dx, dcos, dsin


apply_rope.defvjp(_rope_fwd, _rope_bwd)


class _Projections(nnx.Module):
    """Shared ``y = x·W (+ b) + Σ_branches Δy(x)`` for the attention and MLP blocks: every
    module under an attribute of :data:`BRANCHES` adds its ``branch(x, rng)``."""

    def project(self, x: jax.Array, name: str, rng: jax.Array | None) -> jax.Array:
        dt = x.dtype
        y = linear(x, getattr(self, name)[...])
        bias = getattr(self, name + "_bias", None)
        if bias is not None:
            y = y + bias[...].astype(dt)
        if rng is not None:
            rng = jax.random.fold_in(rng, PROJECTIONS.index(name))
        for attr in BRANCHES:
            banks = getattr(self, attr, None)
            if banks is not None and name in banks:
                y = y + banks[name].branch(x, rng).astype(dt)
        return y


class Attention(_Projections):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype) -> None:
        d, hd = cfg.hidden_size, cfg.resolved_head_dim
        nq, nkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
        std = d**-0.5
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.sliding_window = cfg.sliding_window
        self.attention = cfg.attention  # kernel choice (jaxcl.models.attention)
        self.q = _param(rngs, (d, nq), ("embed", "heads"), param_dtype, std)
        self.k = _param(rngs, (d, nkv), ("embed", "kv_heads"), param_dtype, std)
        self.v = _param(rngs, (d, nkv), ("embed", "kv_heads"), param_dtype, std)
        out_std = nq**-0.5 / (2 * cfg.num_layers) ** 0.5
        self.o = _param(rngs, (nq, d), ("heads", "embed"), param_dtype, out_std)
        if cfg.qkv_bias:
            self.q_bias = _zeros((nq,), ("heads",), param_dtype)
            self.k_bias = _zeros((nkv,), ("kv_heads",), param_dtype)
            self.v_bias = _zeros((nkv,), ("kv_heads",), param_dtype)
        if cfg.o_bias:
            self.o_bias = _zeros((d,), ("norm",), param_dtype)

    def __call__(self, x, cos, sin, mask, kv=None, rng=None):
        """Self-attention; with ``kv = (k_cache, v_cache, index, cache_mask)`` the new keys and
        values are written at slot ``index`` of the caches ``[batch, slots, kv_heads, head_dim]``
        and the queries attend to the caches under ``cache_mask [batch, 1, seq, slots]``."""
        b, t, _ = x.shape
        q = self.project(x, "q", rng).reshape(b, t, self.num_heads, self.head_dim)
        k = self.project(x, "k", rng).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.project(x, "v", rng).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if kv is None:
            out = causal_attention(
                q, k, v, mask, window=self.sliding_window, impl=getattr(self, "attention", "auto")
            )
        else:
            k_cache, v_cache, index, cache_mask = kv
            k_cache = jax.lax.dynamic_update_slice(
                k_cache, k.astype(k_cache.dtype), (0, index, 0, 0)
            )
            v_cache = jax.lax.dynamic_update_slice(
                v_cache, v.astype(v_cache.dtype), (0, index, 0, 0)
            )
            out = jax.nn.dot_product_attention(
                q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=cache_mask
            )
            new_kv = (k_cache, v_cache)
        return self.project(out.reshape(b, t, -1), "o", rng), new_kv


class SwiGLU(_Projections):
    """``down(silu(x·W_gate) ⊙ (x·W_up))``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype) -> None:
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), param_dtype, d**-0.5)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), param_dtype, d**-0.5)
        down_std = f**-0.5 / (2 * cfg.num_layers) ** 0.5
        self.down = _param(rngs, (f, d), ("mlp", "embed"), param_dtype, down_std)
        if cfg.mlp_bias:
            self.gate_bias = _zeros((f,), ("mlp",), param_dtype)
            self.up_bias = _zeros((f,), ("mlp",), param_dtype)
            self.down_bias = _zeros((d,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        demix = getattr(self, "demix", None)  # DEMix domain experts (jaxcl.models.demix)
        if demix is not None:
            return demix(x)
        hidden = swiglu(self.project(x, "gate", rng), self.project(x, "up", rng))
        return self.project(hidden, "down", rng)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype) -> None:
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.attn = Attention(cfg, rngs, param_dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.mlp = SwiGLU(cfg, rngs, param_dtype)

    def __call__(self, x, cos, sin, mask, kv=None, rng=None):
        attn_rng = mlp_rng = None
        if rng is not None:
            attn_rng, mlp_rng = jax.random.split(rng)
        h, new_kv = self.attn(self.attn_norm(x), cos, sin, mask, kv, attn_rng)
        x = x + h
        return x + self.mlp(self.mlp_norm(x), mlp_rng), new_kv


class Decoder(nnx.Module):
    """Causal decoder: ``model(input_ids) -> logits [batch, seq, vocab]`` (float32).

    ``positions`` default to ``0..seq-1``; ``segment_ids`` (packed sequences) restrict attention
    to tokens of the same segment, on top of the causal mask; ``dropout_rng`` turns on the
    dropout of attached LoRA adapters (see :mod:`jaxcl.models.lora`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.config = cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        # Tied embeddings double as the output head: keep logits O(1) at initialisation.
        embed_std = cfg.hidden_size**-0.5 if cfg.tie_embeddings else 1.0
        self.embed = _param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype, embed_std
        )
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(cfg, rngs, param_dtype)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List(
                [DecoderLayer(cfg, rngs, param_dtype) for _ in range(cfg.num_layers)]
            )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                rngs,
                (cfg.hidden_size, cfg.vocab_size),
                ("embed", "vocab"),
                param_dtype,
                cfg.hidden_size**-0.5,
            )

    def _rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        return rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_inv_freq())

    def _layers(self, x, cos, sin, mask, kv=None, rng=None):
        """Run every layer; ``kv``: ``(k [L,B,S,K,H], v [L,B,S,K,H], index, cache_mask)``."""
        cfg = self.config
        caches = None if kv is None else (kv[0], kv[1])
        shared = None if kv is None else (kv[2], kv[3])

        def run(graphdef, state, x, cache_i, rng_i):
            layer_kv = None if cache_i is None else (*cache_i, *shared)
            return nnx.merge(graphdef, state)(x, cos, sin, mask, layer_kv, rng_i)

        if cfg.remat:
            run = jax.checkpoint(run, static_argnums=(0,))
        rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(x, xs):
                state_i, cache_i, rng_i = xs
                return run(graphdef, state_i, x, cache_i, rng_i)

            return jax.lax.scan(body, x, (state, caches, rngs))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            graphdef, state = nnx.split(layer)
            cache_i = None if caches is None else (caches[0][i], caches[1][i])
            x, new_kv = run(graphdef, state, x, cache_i, None if rngs is None else rngs[i])
            if new_kv is not None:
                new_k.append(new_kv[0])
                new_v.append(new_kv[1])
        return x, (jnp.stack(new_k), jnp.stack(new_v)) if new_k else None

    def _logits(self, x: jax.Array) -> jax.Array:
        return self.head(self.final_norm(x))

    def head(self, hidden: jax.Array) -> jax.Array:
        """Logits ``[..., vocab]`` (float32, accumulated in float32) of final-normed hidden
        states ``[..., hidden]`` (:meth:`hidden_states`): the output projection alone, so a loss
        can apply it to one chunk of the sequence at a time (:mod:`jaxcl.objectives.chunked`)."""
        if self.config.tie_embeddings:
            return linear(hidden, self.embed[...], transposed=True, out_dtype=jnp.float32)
        return linear(hidden, self.lm_head[...], out_dtype=jnp.float32)

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], input_ids, axis=0).astype(jnp.dtype(self.config.dtype))

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        return self.head(
            self.hidden_states(input_ids, positions, segment_ids, dropout_rng=dropout_rng)
        )

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states ``[batch, seq, hidden]`` (compute dtype), so that
        ``model(x) == model.head(model.hidden_states(x))``. Changes to the forward pass belong
        here: chunked losses call this and :meth:`head`, not ``__call__``."""
        if getattr(self, "prompts", None) is not None:  # soft prompts (jaxcl.models.prompts)
            return self.prompts(self, input_ids, positions, segment_ids, dropout_rng=dropout_rng)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        mask = None
        if segment_ids is not None:
            mask = SegmentMask(segment_ids)  # dense for XLA, ids for the fused kernels
        cos, sin = self._rope(positions)
        if getattr(self, "sapt", None) is not None:  # block weights from the input (SAPT)
            from jaxcl.models.sapt import routing

            with routing(self, input_ids, segment_ids):
                x, _ = self._layers(self._embed(input_ids), cos, sin, mask, rng=dropout_rng)
            return self.final_norm(x)
        x, _ = self._layers(self._embed(input_ids), cos, sin, mask, rng=dropout_rng)
        return self.final_norm(x)

    def init_cache(self, batch: int, slots: int, dtype: Any = None) -> Cache:
        """Zeroed key/value caches ``{'k', 'v'}: [layers, batch, slots, kv_heads, head_dim]``."""
        cfg = self.config
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.resolved_head_dim)
        dtype = jnp.dtype(dtype or cfg.dtype)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def decode(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        cache: Cache,
        slot_valid: jax.Array,
        index: jax.Array | int,
    ) -> tuple[jax.Array, Cache]:
        """Logits of ``input_ids [batch, t]`` written at cache slots ``index..index+t-1``.

        ``slot_valid [batch, slots]`` marks the slots holding real tokens (these ``t`` included;
        padding excluded). Query slot ``i`` attends to slot ``j`` iff ``slot_valid[j]`` and
        ``j ≤ i`` (and ``i − j < sliding_window``). Returns ``(logits [batch, t, vocab],
        updated cache)``.
        """
        if getattr(self, "prompts", None) is not None:  # no cache slots for virtual tokens
            from jaxcl.models.prompts import refuse_prompts

            refuse_prompts(self, "KV-cache generation (jaxcl.generate, generated metrics)")
        t, slots = input_ids.shape[1], slot_valid.shape[1]
        q_slot = index + jnp.arange(t)
        k_slot = jnp.arange(slots)
        allowed = k_slot[None, :] <= q_slot[:, None]
        if self.config.sliding_window is not None:
            allowed &= q_slot[:, None] - k_slot[None, :] < self.config.sliding_window
        cache_mask = slot_valid[:, None, None, :] & allowed[None, None]
        cos, sin = self._rope(positions)
        kv = (cache["k"], cache["v"], index, cache_mask)
        if getattr(self, "sapt", None) is not None:  # the running max travels in the cache
            from jaxcl.models.sapt import decode_routing

            with decode_routing(self, input_ids, cache, slot_valid, index) as extra:
                x, (k, v) = self._layers(self._embed(input_ids), cos, sin, None, kv)
            return self._logits(x), {"k": k, "v": v, **extra}
        x, (k, v) = self._layers(self._embed(input_ids), cos, sin, None, kv)
        return self._logits(x), {"k": k, "v": v}


def stack_layers(params: dict) -> dict:
    """Pure-dict params with ``layers: {0: tree, 1: tree, ...}`` → ``layers: tree`` of arrays
    stacked on a leading axis (the ``scan_layers`` layout)."""
    layers = params["layers"]
    if not (isinstance(layers, dict) and all(isinstance(k, int) for k in layers)):
        return params
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])
    return {**params, "layers": stacked}


def unstack_layers(params: dict) -> dict:
    """Inverse of :func:`stack_layers` (a no-op on the per-layer layout)."""
    layers = params["layers"]
    if isinstance(layers, dict) and all(isinstance(k, int) for k in layers):
        return params
    n = int(np.shape(jax.tree.leaves(layers)[0])[0])
    return {**params, "layers": {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}}
