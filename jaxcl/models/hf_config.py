"""Hugging Face ``config.json`` parsed strictly: the fields jaxcl reads, their JSON types, and
what they cannot be together; every bad field named with its file (:class:`ConfigError`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import pydantic
from pydantic import Field

#: the ``model_type`` values the decoder covers
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ConfigError(ValueError):
    """A model config (``config.json`` or GGUF metadata) that jaxcl cannot use; names the field."""


# --- Hugging Face config.json, parsed strictly -------------------------------------------------
#
# Only the fields jaxcl reads are checked (HF configs carry many more; those are ignored). Types
# are JSON types, never coerced: a boolean must be ``true``/``false`` (not ``"false"``), an integer
# a JSON integer (``2.5`` and ``2.0`` are both refused), a number a JSON number (an integer is a
# number: ``"rope_theta": 100000`` is fine). Every bad field is named, with the file.

_PositiveInt = Annotated[int, Field(gt=0)]
_PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_TokenId = Annotated[int, Field(ge=0)]


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="ignore", frozen=True)


class HFRopeParameters(_Strict):
    """``rope_parameters`` (transformers v5) or the legacy ``rope_scaling``: keys jaxcl reads."""

    rope_type: str | None = None
    type: str | None = None  # the legacy spelling of rope_type
    rope_theta: _PositiveFloat | None = None
    factor: _PositiveFloat | None = None
    low_freq_factor: _PositiveFloat | None = None
    high_freq_factor: _PositiveFloat | None = None
    original_max_position_embeddings: _PositiveInt | None = None
    partial_rotary_factor: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None


class HFConfig(_Strict):
    """The fields of a transformers ``config.json`` that jaxcl reads, with their JSON types."""

    model_type: str
    vocab_size: _PositiveInt
    hidden_size: _PositiveInt
    intermediate_size: _PositiveInt
    num_hidden_layers: _PositiveInt
    num_attention_heads: _PositiveInt
    num_key_value_heads: _PositiveInt | None = None
    head_dim: _PositiveInt | None = None
    hidden_act: str = "silu"
    rope_theta: _PositiveFloat | None = None
    rope_parameters: HFRopeParameters | None = None
    rope_scaling: HFRopeParameters | None = None
    rms_norm_eps: _PositiveFloat = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Annotated[int, Field(ge=0)] | None = None
    use_sliding_window: bool = False
    max_position_embeddings: _PositiveInt = 2048
    bos_token_id: _TokenId | None = None
    eos_token_id: Any = None
    quantization_config: Any = None

    @pydantic.field_validator("eos_token_id")
    @classmethod
    def _eos(cls, value: Any) -> Any:
        ok = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0
        if value is None or ok(value) or (isinstance(value, list) and all(map(ok, value))):
            return value
        raise ValueError("must be a token id (a JSON integer >= 0), a list of them, or null")


_EXPECTED = {
    "bool_type": "must be a JSON boolean (true or false)",
    "int_type": "must be a JSON integer",
    "int_from_float": "must be a JSON integer",
    "int_parsing": "must be a JSON integer",
    "float_type": "must be a JSON number",
    "float_parsing": "must be a JSON number",
    "finite_number": "must be a finite number",
    "string_type": "must be a JSON string",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "list_type": "must be a JSON list",
}


def _json_kind(value: Any) -> str:
    """``value`` as a message shows it: ``the string 'false'``, ``2.5``, ``null``, ``a list``."""
    if isinstance(value, str):
        return f"the string {value[:40]!r}{'...' if len(value) > 40 else ''}"
    if isinstance(value, list):
        return f"a list ({json.dumps(value, default=repr)[:60]})"
    if isinstance(value, dict):
        return "an object"
    return json.dumps(value, default=repr)


def _field_problem(err: Any) -> str:
    """One pydantic error as ``field 'a.b' must be ..., got ...``."""
    loc = ".".join(str(x) for x in err["loc"])
    kind = err["type"]
    if kind == "missing":
        return f"missing field {loc!r}"
    got = _json_kind(err.get("input"))
    if kind in _EXPECTED:
        return f"field {loc!r} {_EXPECTED[kind]}, got {got}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        bound = next(iter(err.get("ctx", {}).values()), "?")
        return f"field {loc!r} must be {op} {bound}, got {got}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"field {loc!r} {msg}, got {got}"


def _raise_problems(where: str, problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(f"{where}: {problems[0]}")
    if problems:
        listed = "".join(f"\n  - {p}" for p in problems)
        raise ConfigError(f"{where}: {len(problems)} problems:{listed}")


def parse_hf_config(hf: Any, where: str = "config.json") -> HFConfig:
    """The fields jaxcl reads from a transformers ``config.json``, validated strictly (JSON types,
    no coercion); a :class:`ConfigError` names ``where`` and every bad field."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: must be a JSON object of config fields, got {_json_kind(hf)}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:  # another family: its other fields would be noise
        raise ConfigError(
            f"{where}: field 'model_type' is {model_type!r}; jaxcl supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # An explicit null for a required field reads as missing, as transformers treats it.
    required = HFConfig.model_fields.keys() - {"model_type"}
    required = {k for k in required if HFConfig.model_fields[k].is_required()}
    hf = {k: v for k, v in hf.items() if not (v is None and k in required)}
    try:
        parsed = HFConfig.model_validate(hf)
    except pydantic.ValidationError as err:
        parsed, errors = None, err.errors()
    else:
        errors = []
    # The checks across fields read the raw values: strict parsing coerces nothing, so a field
    # that parsed is its raw value. Those that did not are left out, so every problem is named.
    bad = {e["loc"][0] for e in errors}
    problems = [_field_problem(e) for e in errors] + _cross_field_problems(hf, bad)
    _raise_problems(where, problems)
    assert parsed is not None
    return parsed


def _cross_field_problems(hf: dict[str, Any], bad: set[Any]) -> list[str]:
    """What a config's well-typed fields cannot be together (or at all, for jaxcl)."""

    def get(key: str, default: Any = None) -> Any:
        return default if key in bad or hf.get(key) is None else hf[key]

    problems = []
    quant = get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        problems.append(
            f"field 'quantization_config' ({method or 'a quantized checkpoint'}) is not "
            "supported: jaxcl loads floating-point weights only; dequantize the checkpoint first"
        )
    if get("hidden_act", "silu") != "silu":
        problems.append(f"field 'hidden_act' is {hf['hidden_act']!r}; only silu")
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    kv = None if "num_key_value_heads" in bad else get("num_key_value_heads", heads)
    if heads and kv and heads % kv:
        problems.append(
            f"field 'num_attention_heads' ({heads}) must be a multiple of "
            f"'num_key_value_heads' ({kv})"
        )
    if heads and hidden and "head_dim" not in bad and get("head_dim") is None and hidden % heads:
        problems.append(
            f"field 'hidden_size' ({hidden}) must divide by 'num_attention_heads' "
            f"({heads}) when 'head_dim' is not given"
        )
    for name in ("rope_parameters", "rope_scaling"):
        rope = get(name)
        if rope is None:
            continue
        key = "rope_type" if rope.get("rope_type") is not None else "type"
        kind = rope.get(key) or "default"
        if kind not in ("default", "linear", "llama3"):
            problems.append(
                f"field '{name}.{key}' is {kind!r}; jaxcl supports default, linear and llama3"
            )
        elif kind != "default" and rope.get("factor") is None:
            problems.append(f"missing field '{name}.factor' (rope type {kind!r} needs it)")
        if rope.get("partial_rotary_factor", 1.0) not in (1.0, None):
            problems.append(f"field '{name}.partial_rotary_factor' != 1 is not supported")
    if hf.get("model_type") == "qwen2" and get("use_sliding_window"):
        problems.append(
            "field 'use_sliding_window' is true; Qwen2's per-layer sliding window is not supported"
        )
    return problems
