"""Decoder configuration and built-in presets."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One config for the Llama-style decoder family.

    ``num_kv_heads < num_heads`` gives grouped-query attention; ``tie_embeddings`` reuses the input
    embedding as the output projection (SmolLM2 style).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    tokenizer: str = "bytes"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
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

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count, computed from the shapes (no model needed)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d


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
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        ) from None
