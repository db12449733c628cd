"""GGUF files (llama.cpp): read a Llama / Qwen2 model, dequantized to float, and write one.

llama.cpp stores the Q and K projections of ``llama``-architecture models with the rows of each
head interleaved for its rotary layout; reading undoes that as transformers' GGUF loader does
(``w.reshape(heads, hd/2, 2, d).swapaxes(1, 2)``), writing redoes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxcl.models.config import ConfigError, ModelConfig, RopeScaling
from jaxcl.models.hf import CheckpointError, _cast

ARCHITECTURES = ("llama", "qwen2")
# GGML tensor types holding plain integers (no block scales): never valid weights.
INTEGER_TENSOR_TYPES = ("I8", "I16", "I32", "I64")


def _reader(path: Path) -> Any:
    import gguf

    class CheckedReader(gguf.GGUFReader):
        """Names the tensor whose data runs past the end of a truncated file."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = len(self.data)
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_dtype[0])]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise CheckpointError(
                        f"{path}: tensor {bytes(name).decode()!r} needs bytes up to {end}, but the "
                        f"file has {size}: truncated or corrupt"
                    )
            super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(str(path))
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - gguf raises ValueError/IndexError on bad headers
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({err}); truncated or corrupt?"
        ) from None


_INT_TYPES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
_KINDS = {
    "int": (_INT_TYPES, "an integer"),
    "float": ((*_INT_TYPES, "FLOAT32", "FLOAT64"), "a number"),
    "str": (("STRING",), "a string"),
    "array": (("ARRAY",), "an array"),
}


def _field(
    reader: Any, key: str, path: Path, default: Any = ConfigError, kind: str | None = None
) -> Any:
    """A metadata value; with ``kind`` (int, float, str, array) its stored GGUF type is checked,
    so a string where an integer belongs is named rather than coerced."""
    field = reader.fields.get(key)
    if field is None:
        if default is ConfigError:
            raise ConfigError(f"{path}: GGUF metadata field {key!r} is missing")
        return default
    if kind is not None:
        allowed, what = _KINDS[kind]
        stored = field.types[0].name if field.types else "?"
        if stored not in allowed:
            raise ConfigError(
                f"{path}: GGUF metadata field {key!r} must be {what}, but is stored as {stored}"
            )
    value = field.contents()
    if kind in ("int", "float") and value <= 0 and not key.endswith(("token_id", "sliding_window")):
        raise ConfigError(f"{path}: GGUF metadata field {key!r} must be > 0, got {value}")
    return value


def gguf_config(reader: Any, path: Path) -> ModelConfig:
    """The :class:`ModelConfig` from GGUF metadata; errors name the file and the field."""
    arch = _field(reader, "general.architecture", path, kind="str")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{path}: field 'general.architecture' is {arch!r}; jaxcl reads "
            f"{', '.join(ARCHITECTURES)}"
        )

    def f(key: str, default: Any = ConfigError, kind: str = "int") -> Any:
        return _field(reader, f"{arch}.{key}", path, default, kind)

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ConfigError(
            f"{path}: tensor 'rope_freqs.weight' (llama.cpp's precomputed rope scaling) is not "
            "supported; load the Hugging Face checkpoint instead"
        )
    heads = f("attention.head_count")
    hidden = f("embedding_length")
    head_dim = f("attention.key_length", hidden // heads)
    vocab = f("vocab_size", None)
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens", path, kind="array"))
    scaling = None
    kind = f("rope.scaling.type", "none", "str")
    if kind == "linear":
        scaling = RopeScaling("linear", float(f("rope.scaling.factor", kind="float")))
    elif kind not in ("none", None):
        raise ConfigError(f"{path}: field '{arch}.rope.scaling.type' = {kind!r} is not supported")
    window = f("attention.sliding_window", None)
    kv_heads = f("attention.head_count_kv", heads)
    if heads % kv_heads:
        raise ConfigError(
            f"{path}: GGUF metadata field '{arch}.attention.head_count' ({heads}) must be a "
            f"multiple of '{arch}.attention.head_count_kv' ({kv_heads})"
        )
    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=f("feed_forward_length"),
            num_layers=f("block_count"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=float(f("rope.freq_base", 10_000.0, "float")),
            rope_scaling=scaling,
            rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-5, "float")),
            tie_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_gate.bias" in names,
            sliding_window=window or None,
            max_position_embeddings=f("context_length", 2048),
            model_type="qwen2" if arch == "qwen2" else "mistral" if window else "llama",
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", path, None, "int"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", path, None, "int"),
            tokenizer=str(path),
        )
    except ValueError as err:  # ModelConfig's cross-field checks (heads vs kv heads...)
        raise ConfigError(f"{path}: GGUF metadata: {err}") from None


def _rope_permute(w: np.ndarray, heads: int, inverse: bool) -> np.ndarray:
    """llama.cpp's rotary row order ↔ transformers' (``[heads·hd, in]`` torch layout)."""
    if inverse:  # gguf -> hf
        return (
            w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _names(cfg: ModelConfig) -> list[tuple[str, tuple[Any, ...], bool]]:
    """``(gguf_name, jaxcl_path, is_kernel)``."""
    out: list[tuple[str, tuple[Any, ...], bool]] = [
        ("token_embd.weight", ("embed",), False),
        ("output_norm.weight", ("final_norm", "scale"), False),
    ]
    if not cfg.tie_embeddings:
        out.append(("output.weight", ("lm_head",), True))
    attn = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
    mlp = {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
    for i in range(cfg.num_layers):
        layer = ("layers", i)
        for ours, theirs in attn.items():
            out.append((f"blk.{i}.{theirs}.weight", (*layer, "attn", ours), True))
            if (cfg.qkv_bias and ours != "o") or (cfg.o_bias and ours == "o"):
                out.append((f"blk.{i}.{theirs}.bias", (*layer, "attn", ours + "_bias"), False))
        for ours, theirs in mlp.items():
            out.append((f"blk.{i}.{theirs}.weight", (*layer, "mlp", ours), True))
            if cfg.mlp_bias:
                out.append((f"blk.{i}.{theirs}.bias", (*layer, "mlp", ours + "_bias"), False))
        out.append((f"blk.{i}.attn_norm.weight", (*layer, "attn_norm", "scale"), False))
        out.append((f"blk.{i}.ffn_norm.weight", (*layer, "mlp_norm", "scale"), False))
    return out


def _expected(cfg: ModelConfig, path: tuple[Any, ...]) -> tuple[int, ...]:
    """jaxcl shape of a parameter path (kernels ``[in, out]``)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nq, nkv = cfg.num_heads * cfg.resolved_head_dim, cfg.num_kv_heads * cfg.resolved_head_dim
    leaf = path[-1]
    table = {
        "embed": (v, d),
        "lm_head": (d, v),
        "scale": (d,),
        "q": (d, nq),
        "k": (d, nkv),
        "v": (d, nkv),
        "o": (nq, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }
    if leaf.endswith("_bias"):
        return table[leaf[: -len("_bias")]][1:]
    return table[leaf]


def load_gguf(path: str | Path, param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """``(config, params)`` from a GGUF file, every tensor dequantized to ``param_dtype``."""
    from gguf.quants import dequantize

    from jaxcl.models.hf import _set

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    reader = _reader(path)
    cfg = gguf_config(reader, path)
    if param_dtype:
        cfg = cfg.replace(param_dtype=param_dtype)
    tensors = {t.name: t for t in reader.tensors}
    dtype = None if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
    permute = cfg.model_type != "qwen2"
    params: dict = {}
    for name, ours, kernel in _names(cfg):
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        t = tensors.pop(name)
        if t.tensor_type.name in INTEGER_TENSOR_TYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} is stored as {t.tensor_type.name}; jaxcl loads float "
                "(F32, F16, BF16, F64) and llama.cpp's block-quantized types (dequantized by the "
                "gguf package), never plain integer weights"
            )
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(
                f"{path}: tensor {name!r} cannot be dequantized ({err})"
            ) from None
        w = np.asarray(w, np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if permute and ours[-1] in ("q", "k", "q_bias", "k_bias"):
            heads = cfg.num_heads if ours[-1].startswith("q") else cfg.num_kv_heads
            w = _rope_permute(w, heads, inverse=True)
        w = w.T if kernel else w
        if w.shape != _expected(cfg, ours):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(w.shape)} (as jaxcl stores it), but "
                f"the metadata implies {list(_expected(cfg, ours))}"
            )
        _set(params, ours, _cast(w, dtype))
    tensors.pop("rope_freqs.weight", None)
    if tensors:
        raise CheckpointError(
            f"{path}: unexpected tensors for a {cfg.model_type} model: "
            f"{', '.join(sorted(tensors)[:5])}"
        )
    return cfg, params


def save_gguf(cfg: ModelConfig, params: dict, path: str | Path, dtype: str = "float32") -> Path:
    """Write a GGUF file (``float32`` or ``float16`` tensors) that llama.cpp and transformers
    read. Tokenizer metadata is copied when the model was itself read from a GGUF file."""
    import gguf

    from jaxcl.models.hf import _get

    if cfg.rope_scaling is not None and cfg.rope_scaling.kind != "linear":
        raise ConfigError(f"GGUF export of {cfg.rope_scaling.kind!r} rope scaling is unsupported")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.resolved_head_dim)
    w.add_value_length(cfg.resolved_head_dim)
    w.add_rope_dimension_count(cfg.resolved_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    _copy_tokenizer(cfg, w)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    for name, ours, kernel in _names(cfg):
        x = np.asarray(_get(params, ours), np.float32)
        x = x.T if kernel else x
        if arch == "llama" and ours[-1] in ("q", "k", "q_bias", "k_bias"):
            heads = cfg.num_heads if ours[-1].startswith("q") else cfg.num_kv_heads
            x = _rope_permute(x, heads, inverse=False)
        # Norms and biases stay float32, as llama.cpp's converter keeps them.
        w.add_tensor(name, np.ascontiguousarray(x.astype(np_dtype if x.ndim == 2 else np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# transformers' names for the tokenizer's special tokens -> their GGUF id fields.
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def gguf_tokenizer(path: str | Path) -> Any:
    """The transformers tokenizer of a GGUF file's ``tokenizer.ggml.*`` metadata, without torch.

    It is built as ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds it (transformers'
    own vocabulary, merges, special-token and pre-tokenizer rules,
    ``transformers.integrations.gguf.convert_gguf_tokenizer``), but the metadata is read with the
    gguf package: transformers' GGUF reader imports torch, which jaxcl does not need."""
    path = Path(path)
    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # a transformers without its GGUF tokenizer module: its own loader
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    from transformers import PreTrainedTokenizerFast

    reader = _reader(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise CheckpointError(f"{path}: no tokenizer in the metadata ('tokenizer.ggml.tokens')")
    arch = _field(reader, "general.architecture", path, kind="str")
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    grouped = {
        group: {
            name: meta["tokenizer." + key]
            for key, name in keys.items()
            if "tokenizer." + key in meta
        }
        for group, keys in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = grouped["tokenizer"], grouped.get("tokenizer_config", {})
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabs
    elif tokenizer.get("tokenizer_type") == "gemma4":
        config["add_bos_token"] = False  # as transformers: its chat template writes <bos>
    tokens = tokenizer["tokens"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise CheckpointError(
                f"{path}: GGUF metadata field 'tokenizer.ggml.{key}' is {token_id}, outside the "
                f"vocabulary of {len(tokens)} tokens"
            )
        config[name] = tokens[token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(arch, tokenizer)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: the GGUF tokenizer cannot be built ({err})") from None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=str(path), **config, **extra
    )


def _copy_tokenizer(cfg: ModelConfig, writer: Any) -> None:
    import gguf

    if cfg.tokenizer.endswith(".gguf") and Path(cfg.tokenizer).is_file():
        src = gguf.GGUFReader(cfg.tokenizer)
        for key, field in src.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        return
    if cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if cfg.stop_token_ids:
        writer.add_eos_token_id(cfg.stop_token_ids[0])
