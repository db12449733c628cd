"""The Llama-family decoder, its presets, checkpoint import/export, LoRA and generation.

``from_pretrained(source)``, ``save_pretrained(model, out_dir)``, ``load_tokenizer(source)``
and ``generate(model, input_ids, ...)`` are the public entry points.
"""

from jaxcl.models.config import PRESETS, ModelConfig, RopeScaling, preset
from jaxcl.models.generate import generate
from jaxcl.models.hf import CheckpointError
from jaxcl.models.llama import Decoder
from jaxcl.models.pretrained import (
    from_pretrained,
    load_params,
    load_tokenizer,
    model_from_params,
    save_pretrained,
    sources,
)

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Decoder",
    "ModelConfig",
    "RopeScaling",
    "from_pretrained",
    "generate",
    "load_params",
    "load_tokenizer",
    "model_from_params",
    "preset",
    "save_pretrained",
    "sources",
]
