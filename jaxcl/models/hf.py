"""Hugging Face checkpoints: a ``config.json`` plus single or sharded safetensors, in and out.

Names map one to one between transformers' ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
``Qwen2ForCausalLM`` state dicts and jaxcl's parameter tree; kernels are transposed
(torch ``Linear.weight`` is ``[out, in]``, jaxcl stores ``[in, out]``). Pickle checkpoints
(``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxcl.models.config import ConfigError, ModelConfig, from_hf_config, to_hf_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX = "model.safetensors.index.json"
# safetensors dtypes a weight may have; anything else (I8, I32, BOOL, F8_*...) is refused.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class CheckpointError(ValueError):
    """A checkpoint file jaxcl cannot load; the message names the file and the tensor."""


def refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: pickle checkpoints are never loaded (unpickling runs arbitrary code); convert "
        "it to safetensors first, e.g. in a trusted environment: "
        "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, safe_serialization=True)"
    )


def param_map(cfg: ModelConfig) -> Iterator[tuple[str, tuple[Any, ...], bool, tuple[int, ...]]]:
    """``(hf_name, jaxcl_path, transposed, hf_shape)`` for every tensor of the HF state dict."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nq, nkv = cfg.num_heads * cfg.resolved_head_dim, cfg.num_kv_heads * cfg.resolved_head_dim
    yield "model.embed_tokens.weight", ("embed",), False, (v, d)
    yield "model.norm.weight", ("final_norm", "scale"), False, (d,)
    if not cfg.tie_embeddings:
        yield "lm_head.weight", ("lm_head",), True, (v, d)
    attn = {"q": (nq, d), "k": (nkv, d), "v": (nkv, d), "o": (d, nq)}
    mlp = {"gate": (f, d), "up": (f, d), "down": (d, f)}
    for i in range(cfg.num_layers):
        p, layer = f"model.layers.{i}.", ("layers", i)
        for ours, shape in attn.items():
            yield f"{p}self_attn.{ours}_proj.weight", (*layer, "attn", ours), True, shape
            if (cfg.qkv_bias and ours != "o") or (cfg.o_bias and ours == "o"):
                yield (
                    f"{p}self_attn.{ours}_proj.bias",
                    (*layer, "attn", ours + "_bias"),
                    False,
                    shape[:1],
                )
        for ours, shape in mlp.items():
            yield f"{p}mlp.{ours}_proj.weight", (*layer, "mlp", ours), True, shape
            if cfg.mlp_bias:
                yield f"{p}mlp.{ours}_proj.bias", (*layer, "mlp", ours + "_bias"), False, shape[:1]
        yield f"{p}input_layernorm.weight", (*layer, "attn_norm", "scale"), False, (d,)
        yield f"{p}post_attention_layernorm.weight", (*layer, "mlp_norm", "scale"), False, (d,)


def _get(tree: dict, path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def read_config(directory: Path) -> ModelConfig:
    """The :class:`ModelConfig` of an HF directory; errors name ``config.json`` and the field."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (an HF model directory needs one)")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    cfg = from_hf_config(raw, where=str(path))
    return cfg.replace(tokenizer=str(directory))


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: unreadable index ({err!r})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{index}: field 'weight_map' must be a JSON object of tensor name -> file name"
            )
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists {f.name}, which is missing")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = [p for p in sorted(directory.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(pickles[0])
    raise CheckpointError(f"{directory}: no *.safetensors weights found")


def read_tensors(directory: Path) -> dict[str, tuple[np.ndarray, Path]]:
    """Every tensor of the directory's safetensors files, with the file it came from."""
    from safetensors import safe_open

    out: dict[str, tuple[np.ndarray, Path]] = {}
    for path in _weight_files(directory):
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    dtype = f.get_slice(name).get_dtype()
                    if dtype not in FLOAT_DTYPES:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} is stored as {dtype}; jaxcl loads only "
                            f"floating-point weights ({', '.join(FLOAT_DTYPES)}). Integer, boolean "
                            "or FP8 weights mean a quantized (or corrupt) checkpoint, whose "
                            "scales jaxcl does not apply: dequantize it to float first"
                        )
                    try:
                        out[name] = (f.get_tensor(name), path)
                    except Exception as err:  # noqa: BLE001 - rethrown with the file and tensor
                        raise CheckpointError(
                            f"{path}: tensor {name!r} cannot be read ({err}); the file is "
                            "truncated or corrupt"
                        ) from None
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({err}); truncated or corrupt?"
            ) from None
    return out


def load_hf(directory: str | Path, param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """``(config, params)`` from an HF directory; params in the per-layer pure-dict layout."""
    directory = Path(directory)
    cfg = read_config(directory)
    if param_dtype:
        cfg = cfg.replace(param_dtype=param_dtype)
    tensors = read_tensors(directory)
    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else None
    params: dict = {}
    for name, path, transposed, shape in param_map(cfg):
        if name not in tensors:
            raise CheckpointError(f"{directory}: tensor {name!r} is missing from the weights")
        array, file = tensors.pop(name)
        if array.shape != shape:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {list(array.shape)}, but config.json implies "
                f"{list(shape)}"
            )
        array = array.T if transposed else array
        _set(params, path, _cast(array, dtype, cfg.param_dtype))
    tensors.pop("lm_head.weight", None)  # tied checkpoints sometimes store the copy
    extra = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise CheckpointError(
            f"{tensors[extra[0]][1]}: unexpected tensors for a {cfg.model_type} model: "
            f"{', '.join(sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''}"
        )
    params["layers"] = {i: params["layers"][i] for i in range(cfg.num_layers)}
    return cfg, params


def _cast(array: np.ndarray, dtype: np.dtype | None, name: str = "") -> np.ndarray:
    if dtype is not None:
        return np.ascontiguousarray(array, dtype=dtype)
    import ml_dtypes

    return np.ascontiguousarray(array.astype(ml_dtypes.bfloat16))


def save_hf(
    cfg: ModelConfig, params: dict, out_dir: str | Path, tokenizer: Any = None, dtype: str = ""
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and the tokenizer's files when given).

    ``params`` in the per-layer layout, LoRA already merged. ``dtype`` (``float32``,
    ``bfloat16``, ``float16``) defaults to ``cfg.param_dtype``.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or cfg.param_dtype
    hf_cfg = to_hf_config(cfg.replace(param_dtype=dtype))
    tensors = {}
    for name, path, transposed, _ in param_map(cfg):
        array = np.asarray(_get(params, path))
        array = array.T if transposed else array
        target = None if dtype == "bfloat16" else np.dtype(dtype)
        tensors[name] = _cast(array, target, dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg.save_pretrained(str(out))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    return out
