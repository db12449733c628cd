"""Recipe entry for the model, and building it as a pure function plus parameters."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import pydantic
from flax import nnx
from pydantic import Field

from jaxcl.models.config import PRESETS, preset
from jaxcl.models.demix import DemixGrowth
from jaxcl.models.experts import MoELoraGrowth
from jaxcl.models.llama import Decoder
from jaxcl.models.prompts import PromptsSpec
from jaxcl.models.sapt import SaptModelSpec
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.models.vocab import AddTokensSpec
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
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: bfloat16 parameters and compute from float32 master weights (each "
        "step casts the float32 parameters to bfloat16 for the forward and backward passes; "
        "gradients, optimizer state and CL buffers stay float32; losses accumulate in float32)",
    )
    scan_layers: bool = False
    remat: bool = False
    attention: Literal["auto", "xla", "cudnn", "splash"] = Field(
        "auto",
        description="attention kernel (jaxcl.models.attention): auto picks cuDNN on a CUDA GPU, "
        "Pallas splash on TPU, XLA elsewhere or where they cannot serve",
    )
    expand: ExpandSpec | None = Field(
        None, description="block expansion (LLaMA Pro): {every: k} inserts L/k identity blocks"
    )
    prompts: PromptsSpec | None = Field(
        None,
        description="soft prompts (jaxcl.models.prompts): {kind: per_task|progressive|pool, "
        "count, length, top_k} prepends trainable virtual tokens to every input",
    )
    add_tokens: AddTokensSpec | None = Field(
        None,
        description="vocabulary expansion (jaxcl.models.vocab): {file: tokens.txt} or {tokens: "
        "[...]} adds tokens to the tokenizer and rows (mean of sub-token rows) to the model",
    )
    moe_lora: MoELoraGrowth | None = Field(
        None,
        description="routed LoRA experts (jaxcl.models.experts): {experts: E, rank, targets, "
        "top_k, balance} on the chosen projections; train them with the method moe_lora",
    )
    demix: DemixGrowth | None = Field(
        None,
        description="DEMix domain experts (jaxcl.models.demix): {experts: E} feed-forward "
        "experts per layer, one per domain; train them with the method demix",
    )
    sapt: SaptModelSpec | None = Field(
        None,
        description="SAPT (jaxcl.models.sapt): {tasks: N, rank, alpha, targets, hidden, samples} "
        "grows N task LoRA blocks mixed by input attention; train them with the method sapt",
    )

    @pydantic.model_validator(mode="after")
    def _sapt_alone(self) -> ModelSpec:
        if self.sapt is not None and self.prompts is not None:
            raise ValueError(
                "sapt: cannot be combined with prompts (the prompts' forward pass does not route "
                "SAPT's blocks); drop one"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _tokens_new(self) -> ModelSpec:
        if self.add_tokens is not None:  # tokens the tokenizer has already: refused, named
            from jaxcl.models.vocab import check_spec

            check_spec(self)
        return self

    @pydantic.model_validator(mode="after")
    def _precision_consistent(self) -> ModelSpec:
        if self.precision == "bf16":
            if self.param_dtype == "bfloat16":
                raise ValueError(
                    "model.precision: bf16 keeps float32 master weights; drop "
                    "model.param_dtype: bfloat16 (or set precision: fp32 for pure bfloat16)"
                )
            if self.dtype not in (None, "bfloat16"):
                raise ValueError(
                    f"model.precision: bf16 computes in bfloat16; model.dtype: {self.dtype} "
                    "contradicts it (drop model.dtype)"
                )
        return self

    @property
    def compute_cast(self) -> str | None:
        """The dtype each step casts the float32 master weights to (``None``: no cast)."""
        return "bfloat16" if self.precision == "bf16" else None

    @pydantic.model_validator(mode="after")
    def _expand_fits(self) -> ModelSpec:
        if self.expand is not None:
            from jaxcl.models.expand import check_every

            check_every(_base_config(self).num_layers, self.expand.every, "expand.every")
        return self

    @pydantic.model_validator(mode="after")
    def _attention_fits(self) -> ModelSpec:
        if self.attention in ("cudnn", "splash"):  # what the shapes alone rule out, named
            from jaxcl.models.attention import config_problems

            bare = self.model_copy(update={"attention": "auto", "expand": None, "prompts": None})
            cfg = nnx.merge(*abstract_parts(bare.model_dump_json())).config
            problems = config_problems(self.attention, cfg)
            if problems:
                raise ValueError(f"attention: {self.attention} cannot serve: {'; '.join(problems)}")
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
        if self.precision == "bf16":  # float32 master weights, bfloat16 compute
            out.update(dtype="bfloat16", param_dtype="float32")
        if self.attention != "auto":
            out["attention"] = self.attention
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
        if self.add_tokens is not None:  # new vocabulary rows, the tokenizer extended
            from jaxcl.models.vocab import build_expanded

            model, tokenizer = build_expanded(self, model, tokenizer)
        if self.prompts is not None:  # virtual tokens, drawn from the model's own embeddings
            from jaxcl.models.prompts import add_prompts

            model = add_prompts(model, self.prompts, seed=seed)
        if self.moe_lora is not None:  # routed LoRA experts on the chosen projections
            model = self.moe_lora.grow(model)
        if self.sapt is not None:  # SAPT's task blocks and their selection module
            from jaxcl.models.sapt import add_sapt

            add_sapt(model, self.sapt.config(), rngs=nnx.Rngs(seed + 104_729))
        if self.demix is not None:  # DEMix: feed-forward experts, copies of each layer's FFN
            model = self.demix.grow(model)
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
        from jaxcl.models.llama import check_targets

        return check_targets(value)

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
    if spec.demix is not None:  # the model without DEMix experts, shape-only experts added
        base = spec.model_copy(update={"demix": None}).model_dump_json()
        return nnx.split(spec.demix.grow(nnx.merge(*abstract_parts(base))))
    if spec.sapt is not None:  # the model without SAPT, shape-only blocks and router added
        from jaxcl.models.sapt import add_sapt

        model = nnx.merge(*abstract_parts(spec.model_copy(update={"sapt": None}).model_dump_json()))
        add_sapt(model, spec.sapt.config(), rngs=nnx.Rngs(0), abstract=True)
        return nnx.split(model)
    if spec.moe_lora is not None:  # the model without experts, shape-only experts added
        base = spec.model_copy(update={"moe_lora": None}).model_dump_json()
        return nnx.split(spec.moe_lora.grow(nnx.merge(*abstract_parts(base))))
    if spec.prompts is not None:  # the model without prompts, a shape-only bank added
        from jaxcl.models.prompts import abstract_with_prompts

        base = spec.model_copy(update={"prompts": None}).model_dump_json()
        return abstract_with_prompts(nnx.merge(*abstract_parts(base)), spec.prompts)
    if spec.add_tokens is not None:  # the same decoder with more vocabulary rows
        from jaxcl.models.vocab import spec_tokenizer

        base = spec.model_copy(update={"add_tokens": None}).model_dump_json()
        cfg = nnx.merge(*abstract_parts(base)).config
        cfg = cfg.replace(vocab_size=spec_tokenizer(spec_json)[2])
        return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
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
