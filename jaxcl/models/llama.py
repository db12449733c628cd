"""A Llama-style decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Every parameter carries logical axis names (``embed``, ``vocab``, ``heads``, ``kv_heads``,
``mlp``, ``norm``) in its ``out_sharding`` metadata; :mod:`jaxcl.parallel` maps them onto mesh
axes. Kernels are stored ``[in, out]`` (the transpose of a torch ``Linear.weight``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcl.models.config import ModelConfig


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype, std: float):
    init = jax.nn.initializers.normal(stddev=std)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x²) + eps) * scale``, computed in float32."""

    def __init__(self, dim: int, eps: float, param_dtype) -> None:
        self.eps = eps
        self.scale = nnx.Param(
            jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[batch, seq, head_dim]`` for rotary embeddings (half-split layout)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]``: ``x·cos + rotate_half(x)·sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype) -> None:
        d, hd = cfg.hidden_size, cfg.resolved_head_dim
        std = d**-0.5
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q = _param(rngs, (d, cfg.num_heads * hd), ("embed", "heads"), param_dtype, std)
        self.k = _param(rngs, (d, cfg.num_kv_heads * hd), ("embed", "kv_heads"), param_dtype, std)
        self.v = _param(rngs, (d, cfg.num_kv_heads * hd), ("embed", "kv_heads"), param_dtype, std)
        out_std = (cfg.num_heads * hd) ** -0.5 / (2 * cfg.num_layers) ** 0.5
        self.o = _param(rngs, (cfg.num_heads * hd, d), ("heads", "embed"), param_dtype, out_std)

    def __call__(self, x, cos, sin, mask) -> jax.Array:
        b, t, _ = x.shape
        dt = x.dtype
        q = (x @ self.q[...].astype(dt)).reshape(b, t, self.num_heads, self.head_dim)
        k = (x @ self.k[...].astype(dt)).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = (x @ self.v[...].astype(dt)).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
        return out.reshape(b, t, -1) @ self.o[...].astype(dt)


class SwiGLU(nnx.Module):
    """``down(silu(x·W_gate) ⊙ (x·W_up))``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype) -> None:
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), param_dtype, d**-0.5)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), param_dtype, d**-0.5)
        down_std = f**-0.5 / (2 * cfg.num_layers) ** 0.5
        self.down = _param(rngs, (f, d), ("mlp", "embed"), param_dtype, down_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        hidden = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return hidden @ self.down[...].astype(dt)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype) -> None:
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.attn = Attention(cfg, rngs, param_dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.mlp = SwiGLU(cfg, rngs, param_dtype)

    def __call__(self, x, cos, sin, mask) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
    """Causal decoder: ``model(input_ids) -> logits [batch, seq, vocab]`` (float32).

    ``positions`` default to ``0..seq-1``; ``segment_ids`` (packed sequences) restrict attention
    to tokens of the same segment, on top of the causal mask.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
        self.config = cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        # Tied embeddings double as the output head: keep logits O(1) at initialisation.
        embed_std = cfg.hidden_size**-0.5 if cfg.tie_embeddings else 1.0
        self.embed = _param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype, embed_std
        )
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

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        mask = None
        if segment_ids is not None:
            mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        cos, sin = rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta)
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        x = self.final_norm(x)
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        return (x @ head.astype(dtype)).astype(jnp.float32)
