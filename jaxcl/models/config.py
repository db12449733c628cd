"""Decoder configuration, built-in presets, and the mapping to and from Hugging Face configs.

One :class:`ModelConfig` covers the Llama family: Llama 2 and 3 (with Llama 3 / linear rope
scaling), Mistral (uniform sliding window), Qwen2 (q/k/v biases) and SmolLM2 (tied embeddings).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxcl.models.hf_config import (  # noqa: F401  (re-exported)
    SUPPORTED_MODEL_TYPES,
    ConfigError,
    HFConfig,
    parse_hf_config,
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (``rope_type`` of transformers): ``linear`` or ``llama3``.

    ``linear``: ``inv_freq / factor``. ``llama3``: wavelengths ``λ = 2π / inv_freq`` above
    ``L / low_freq_factor`` are divided by ``factor``, those below ``L / high_freq_factor`` kept,
    and in between interpolated with ``s = (L/λ − low) / (high − low)``:
    ``(1 − s)·inv_freq/factor + s·inv_freq``, where ``L = original_max_position_embeddings``.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(
                f"rope scaling {self.kind!r} is not supported (supported: linear, llama3)"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One config for the Llama-style decoder family.

    ``num_kv_heads < num_heads`` gives grouped-query attention; ``tie_embeddings`` reuses the input
    embedding as the output projection (SmolLM2 style); ``qkv_bias`` adds biases to the q/k/v
    projections (Qwen2), ``o_bias`` and ``mlp_bias`` to the output and MLP projections (Llama's
    ``attention_bias`` sets both ``qkv_bias`` and ``o_bias``). ``sliding_window = W`` lets a token
    attend to the ``W`` most recent positions, itself included (Mistral).

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype (``bfloat16`` compute with
    ``float32`` parameters is the usual mixed precision). ``scan_layers`` stacks the layers'
    parameters on a leading ``layers`` axis and runs them with ``jax.lax.scan`` (compile time
    independent of depth; parameters then sit at ``params['layers']['attn']['q']`` with shape
    ``[num_layers, ...]`` instead of ``params['layers'][i]...``); ``remat`` recomputes each
    layer's activations in the backward pass. ``attention`` picks the attention kernel
    (``auto``, ``xla``, ``cudnn``, ``splash``; see :mod:`jaxcl.models.attention`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    tokenizer: str = "bytes"
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: bool = False
    # Attention kernel: auto | xla | cudnn | splash (jaxcl.models.attention). A runtime choice,
    # not part of the architecture: never written to or read from HF / GGUF configs.
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ("auto", "xla", "cudnn", "splash"):
            raise ValueError(
                f"attention must be one of auto, xla, cudnn, splash; got {self.attention!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) "
                "when head_dim is not given"
            )
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in ("dtype", "param_dtype"):
            np.dtype(_jnp_dtype_name(getattr(self, name)))  # raises on unknown names
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count, computed from the shapes (no model needed)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        attn += hd * (self.num_heads + 2 * self.num_kv_heads) * self.qkv_bias + d * self.o_bias
        layer = attn + 3 * d * f + 2 * d + (2 * f + d) * self.mlp_bias
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse rotary frequencies ``θ^(−2i/d)``, scaled per :class:`RopeScaling` (float32)."""
        hd = self.resolved_head_dim
        inv = (1.0 / self.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64) / hd)).astype(
            np.float32
        )
        rs = self.rope_scaling
        if rs is None:
            return inv
        if rs.kind == "linear":
            return (inv / rs.factor).astype(np.float32)
        old = rs.original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / rs.low_freq_factor, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < old / rs.high_freq_factor) & ~(wavelen > old / rs.low_freq_factor)
        return np.where(medium, smoothed, scaled).astype(np.float32)


def _jnp_dtype_name(name: str) -> str:
    if name == "bfloat16":
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        return "bfloat16"
    return name


def _shape(**kw: Any) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {
    # ~2.6M parameters: trains on two CPU cores in seconds per task.
    "tiny": ModelConfig(
        vocab_size=384,
        hidden_size=256,
        intermediate_size=640,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        rope_theta=10_000.0,
        tie_embeddings=True,
        max_position_embeddings=1024,
    ),
    # A few hundred thousand parameters, for unit tests.
    "test-micro": ModelConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=False,
        max_position_embeddings=256,
    ),
    # Unit-test variants of the family: Qwen2 biases, Llama 3 rope scaling, Mistral window.
    "test-qwen2": ModelConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        qkv_bias=True,
        tie_embeddings=True,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        model_type="qwen2",
    ),
    "test-llama3": ModelConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        rope_theta=500_000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
        max_position_embeddings=256,
    ),
    "test-mistral": ModelConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        sliding_window=8,
        max_position_embeddings=256,
        model_type="mistral",
    ),
    # Shape-only presets (random weights): benchmarks and dry-run planning.
    "smollm2-135m": _shape(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        rope_theta=100_000.0,
        tie_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-2-7b": _shape(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3-8b": _shape(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=500_000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.1-8b": _shape(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=500_000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
    ),
    "llama-3.2-1b": _shape(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500_000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        tie_embeddings=True,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
    ),
    "mistral-7b": _shape(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=10_000.0,
        sliding_window=4096,
        max_position_embeddings=32768,
        model_type="mistral",
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2-0.5b": _shape(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=True,
        max_position_embeddings=32768,
        model_type="qwen2",
        eos_token_id=151643,
    ),
    "qwen2-7b": _shape(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        max_position_embeddings=32768,
        model_type="qwen2",
        eos_token_id=151643,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        ) from None


def from_hf_config(hf: Any, where: str = "config.json") -> ModelConfig:
    """A :class:`ModelConfig` from a transformers ``config.json`` dict (v4 or v5 layout), parsed
    strictly by :func:`parse_hf_config`."""
    p = parse_hf_config(hf, where)
    # v5's rope_parameters wins over the legacy rope_scaling, key by key.
    rope: dict[str, Any] = {}
    for part in (p.rope_scaling, p.rope_parameters):
        if part is not None:
            rope.update(part.model_dump(exclude_none=True))
    theta = rope.get("rope_theta", p.rope_theta if p.rope_theta is not None else 10_000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind != "default":
        scaling = RopeScaling(
            kind,
            rope["factor"],
            rope.get("low_freq_factor", 1.0),
            rope.get("high_freq_factor", 4.0),
            rope.get("original_max_position_embeddings", 8192),
        )
    window = p.sliding_window if p.model_type == "mistral" else None
    eos = p.eos_token_id
    try:
        return ModelConfig(
            vocab_size=p.vocab_size,
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size,
            num_layers=p.num_hidden_layers,
            num_heads=p.num_attention_heads,
            num_kv_heads=p.num_key_value_heads or p.num_attention_heads,
            head_dim=p.head_dim,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=p.rms_norm_eps,
            tie_embeddings=p.tie_word_embeddings,
            qkv_bias=p.attention_bias or p.model_type == "qwen2",
            o_bias=p.attention_bias,
            mlp_bias=p.mlp_bias,
            sliding_window=window or None,
            max_position_embeddings=p.max_position_embeddings,
            model_type=p.model_type,
            bos_token_id=p.bos_token_id,
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
    except ValueError as err:  # cross-field checks of ModelConfig, should parse_hf_config miss one
        raise ConfigError(f"{where}: {err}") from None


def to_hf_config(cfg: ModelConfig) -> Any:
    """The transformers config object (``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``)."""
    import transformers

    if cfg.model_type == "qwen2" and (cfg.o_bias or cfg.mlp_bias or not cfg.qkv_bias):
        raise ConfigError("qwen2 export needs qkv_bias=True, o_bias=False, mlp_bias=False")
    if cfg.model_type == "mistral" and (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        raise ConfigError("mistral export does not support biases; use model_type='llama'")
    if cfg.model_type == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise ConfigError("llama export needs qkv_bias == o_bias (transformers' attention_bias)")
    if cfg.model_type != "mistral" and cfg.sliding_window:
        raise ConfigError(f"{cfg.model_type} export does not support a sliding window")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": rs.kind, "rope_theta": cfg.rope_theta, "factor": rs.factor}
        if rs.kind == "llama3":
            rope.update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
    eos = cfg.eos_token_id
    kw: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
        torch_dtype=cfg.param_dtype,
    )
    if cfg.model_type == "llama":
        kw.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        return transformers.LlamaConfig(**kw)
    if cfg.model_type == "mistral":
        return transformers.MistralConfig(sliding_window=cfg.sliding_window, **kw)
    kw.pop("head_dim")
    return transformers.Qwen2Config(use_sliding_window=False, **kw)
