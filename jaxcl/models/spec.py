"""Recipe entry for the model, and building it as a pure function plus parameters."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import pydantic
from flax import nnx
from pydantic import Field

from jaxcl.models.config import PRESETS, preset
from jaxcl.models.llama import Decoder
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.spec import Strict


class ExpandSpec(Strict):
    """Block expansion (LLaMA Pro): an identity copy of a block inserted after every ``every``-th
    block when the model is built (:mod:`jaxcl.models.expand`)."""

    every: int = Field(ge=1, description="original blocks per inserted block; divides num_layers")


class ModelSpec(Strict):
    """``preset`` (random weights from the recipe seed) or ``source`` (pretrained weights: an HF
    directory, a ``.gguf`` file or a weights preset such as ``smollm2-135m-instruct``; when given
    it wins over ``preset``)."""

    preset: str = "tiny"
    source: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    param_dtype: Literal["float32", "bfloat16"] | None = None
    scan_layers: bool = False
    remat: bool = False
    expand: ExpandSpec | None = Field(
        None, description="block expansion (LLaMA Pro): {every: k} inserts L/k identity blocks"
    )

    @pydantic.model_validator(mode="after")
    def _expand_fits(self) -> ModelSpec:
        if self.expand is not None:
            from jaxcl.models.expand import check_every

            check_every(_base_config(self).num_layers, self.expand.every, "expand.every")
        return self

    @pydantic.field_validator("preset")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; valid choices: {', '.join(PRESETS)}")
        return value

    @pydantic.field_validator("source")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        from jaxcl.models.pretrained import WEIGHT_PRESETS, sources

        if value is None or value in PRESETS or value in WEIGHT_PRESETS:
            return value
        if not Path(value).expanduser().exists():
            raise ValueError(
                f"{value!r} is neither a preset ({', '.join(sources())}) nor an existing path"
            )
        return value

    @property
    def name(self) -> str:
        """What the model is, for logs: the source if given, else the preset."""
        return self.source or self.preset

    @property
    def overrides(self) -> dict[str, Any]:
        """The config fields this entry sets on top of the preset or the pretrained config."""
        out: dict[str, Any] = {"scan_layers": self.scan_layers, "remat": self.remat}
        out.update({k: v for k in ("dtype", "param_dtype") if (v := getattr(self, k))})
        return out

    def abstract_model(self) -> nnx.Module:
        """The model with shapes only (``jax.ShapeDtypeStruct`` leaves): no weights touched.
        A fresh module each call (callers may add adapters to it); the shapes are read once per
        process (a GGUF file's header takes seconds to parse)."""
        return nnx.merge(*abstract_parts(self.model_dump_json()))

    def build_abstract(self) -> tuple[nnx.GraphDef, dict, dict]:
        """``(graphdef, params as jax.ShapeDtypeStruct, logical axis names)``: shapes only, no
        memory or weights touched (for ``--dry-run`` planning of any size)."""
        from jaxcl.parallel import param_logical_names

        model = self.abstract_model()
        graphdef, state = nnx.split(model, nnx.Param)
        return graphdef, nnx.to_pure_dict(state), param_logical_names(model)

    def build(self, seed: int) -> tuple[nnx.GraphDef, dict, dict, Any]:
        """``(graphdef, params, logical axis names, tokenizer)``; params a pure dict."""
        from jaxcl.parallel import param_logical_names

        overrides = self.overrides
        if self.source is not None:
            from jaxcl.models.pretrained import from_pretrained, load_tokenizer

            model = from_pretrained(self.source, seed=seed, **overrides)
            tokenizer = load_tokenizer(model)
        else:
            model = Decoder(preset(self.preset).replace(**overrides), rngs=nnx.Rngs(seed))
            tokenizer = ByteTokenizer()
        if self.expand is not None:
            from jaxcl.models.expand import expand_model

            model, _ = expand_model(model, every=self.expand.every)
        graphdef, state = nnx.split(model, nnx.Param)
        return graphdef, nnx.to_pure_dict(state), param_logical_names(model), tokenizer


class LoraSpec(Strict):
    """A stage trained through low-rank adapters: the base weights stay fixed (no gradient is
    formed for them), the optimizer and the methods see only the adapters."""

    rank: int = Field(8, ge=1, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is (alpha/r)·x·A·B")
    targets: list[str] | str = Field(
        default_factory=lambda: ["q", "v"],
        description="projections (q k v o gate up down) or a regex over parameter paths",
    )
    per_task: bool = Field(
        True,
        description="a fresh adapter for every task (the finished one is merged into the base "
        "weights, as O-LoRA); false: one adapter for the whole stage, merged at its end",
    )

    @pydantic.field_validator("targets")
    @classmethod
    def _projections(cls, value: list[str] | str) -> list[str] | str:
        from jaxcl.models.llama import PROJECTIONS

        if isinstance(value, list):
            unknown = [t for t in value if t not in PROJECTIONS]
            if unknown or not value:
                raise ValueError(
                    f"unknown projections {unknown}; valid choices: {', '.join(PROJECTIONS)}"
                )
        return value

    def config(self) -> Any:
        from jaxcl.models.lora import LoRAConfig

        targets = self.targets if isinstance(self.targets, str) else tuple(self.targets)
        return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=targets)


def _base_config(spec: ModelSpec) -> Any:
    """The config of ``spec``'s model before block expansion."""
    base = spec.model_copy(update={"expand": None}).model_dump_json()
    return nnx.merge(*abstract_parts(base)).config


@functools.lru_cache(maxsize=16)
def abstract_parts(spec_json: str) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split`` of the shape-only model of a :class:`ModelSpec` (given as JSON)."""
    spec = ModelSpec.model_validate_json(spec_json)
    if spec.expand is not None:  # the expanded model's shapes: the same decoder, deeper
        from jaxcl.models.expand import expanded_config

        cfg = expanded_config(_base_config(spec), spec.expand.every)
        return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    overrides = spec.overrides
    name = spec.preset
    if spec.source is not None:
        from jaxcl.models.pretrained import WEIGHT_SHAPES, from_pretrained

        try:
            return nnx.split(from_pretrained(spec.source, abstract=True, **overrides))
        except FileNotFoundError:
            if spec.source not in WEIGHT_SHAPES:  # a weights package not installed:
                raise
            name = WEIGHT_SHAPES[spec.source]  # its shapes are known without it
    cfg = preset(name).replace(**overrides)
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
