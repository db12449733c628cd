"""Recipe entry for the model, and building it as a pure function plus parameters."""

from __future__ import annotations

from typing import Any

import pydantic
from flax import nnx

from jaxcl.models.config import PRESETS, preset
from jaxcl.models.llama import Decoder
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.spec import Strict


class ModelSpec(Strict):
    preset: str = "tiny"

    @pydantic.field_validator("preset")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; valid choices: {', '.join(PRESETS)}")
        return value

    def build(self, seed: int) -> tuple[nnx.GraphDef, dict, dict, Any]:
        """``(graphdef, params, logical axis names, tokenizer)``; params a pure dict."""
        from jaxcl.parallel import param_logical_names

        model = Decoder(preset(self.preset), rngs=nnx.Rngs(seed))
        graphdef, state = nnx.split(model, nnx.Param)
        return graphdef, nnx.to_pure_dict(state), param_logical_names(model), ByteTokenizer()
