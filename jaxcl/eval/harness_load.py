"""Model arguments and loading for the lm-eval backend :class:`jaxcl.eval.harness.JaxclLM`:
the ``--model_args`` it takes, their parsing (errors name the argument), the model sources
(preset, HF folder or GGUF, a jaxcl checkpoint with its recipe, Python objects) and lm-eval's
view of a tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax import nnx
from lm_eval.models.utils import has_bos_prefix

from jaxcl.models.config import ModelConfig
from jaxcl.models.tokenizer import ByteTokenizer

SOURCES = ("preset", "hf", "checkpoint", "model", "params")
MODEL_ARGS = (
    "preset",
    "hf",
    "checkpoint",
    "recipe",
    "tokenizer",
    "batch_size",
    "max_length",
    "max_gen_toks",
    "dtype",
    "seed",
    "add_bos_token",
    "prefix_token_id",
)
# Passed by lm-eval itself (from --batch_size, --max_batch_size, --device, --trust_remote_code):
# accepted; JAX chooses the devices (the mesh), so ``device`` and the rest are not used.
IGNORED_ARGS = ("max_batch_size", "device", "trust_remote_code")
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
DTYPES = ("float32", "bfloat16", "float16")


class ModelArgsError(ValueError):
    """Bad ``--model_args`` for the jaxcl backend; the message names the argument."""


def int_arg(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` (an int, or a string of digits from the command line) as an int."""
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())
    ):
        hint = " (the jaxcl backend needs a fixed batch size)" if name == "batch_size" else ""
        raise ModelArgsError(f"{name}={value!r} is not an integer{hint}")
    number = int(value)
    if number < minimum:
        raise ModelArgsError(f"{name}={number} must be at least {minimum}")
    return number


def optional_bool(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ModelArgsError(f"{name}={value!r} is not true or false")


class HarnessTokenizer:
    """lm-eval's view of a tokenizer: a transformers tokenizer exactly as lm-eval's ``hf``
    backend drives it, or jaxcl's :class:`~jaxcl.models.tokenizer.ByteTokenizer`, which then
    behaves like a tokenizer whose special tokens are a leading bos (jaxcl trains on
    ``bos + text`` rows)."""

    def __init__(self, tokenizer: Any, add_bos_token: bool | None) -> None:
        self.tokenizer = tokenizer
        self.is_bytes = isinstance(tokenizer, ByteTokenizer)
        if not self.is_bytes and not all(
            hasattr(tokenizer, a) for a in ("encode", "decode", "eos_token_id")
        ):
            raise ModelArgsError(
                f"tokenizer: {type(tokenizer).__name__} is neither a transformers tokenizer nor "
                "jaxcl's ByteTokenizer"
            )
        if tokenizer.eos_token_id is None:
            raise ModelArgsError("tokenizer: it has no eos token (lm-eval's end-of-text token)")
        self.add_bos_token = add_bos_token

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else self.eos_token_id

    def encode(self, string: str, add_special_tokens: bool | None, prefix_text: str) -> list[int]:
        """As ``HFLM.tok_encode``: ``add_special_tokens`` (else ``add_bos_token``, else the
        tokenizer's default), no special tokens when ``string`` already starts with the prefix
        token's text."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, prefix_text):
            special = False
        if self.is_bytes:
            bos = special is None or special
            return self.tokenizer.encode(string, add_bos=bos)
        kwargs = {} if special is None else {"add_special_tokens": special}
        return list(self.tokenizer.encode(string, **kwargs))

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        if self.is_bytes:  # the model's vocabulary may be padded past the 259 byte tokens
            ids = [i for i in ids if i < self.tokenizer.vocab_size]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def single_token(self, text: str) -> int | None:
        """The id of the one token that is exactly ``text``, if there is one."""
        if not text:
            return None
        if self.is_bytes:
            ids = self.tokenizer.encode(text)
        else:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if len(ids) == 1 and self.decode(ids, skip_special_tokens=False) == text:
            return ids[0]
        return None


def load_model(
    source: str,
    value: Any,
    config: ModelConfig | None,
    tokenizer: Any,
    recipe: str | None,
    dtype: str | None,
    seed: int,
    mesh: Any,
    rules: Any,
) -> tuple[Any, Any, Any, Any]:
    """``(model, tokenizer, mesh, rules)`` from the one model source the arguments name
    (``source``: one of :data:`SOURCES`, ``value`` its argument); a checkpoint brings its
    recipe's tokenizer, mesh and rules."""
    from jaxcl.models import from_pretrained, load_tokenizer, model_from_params
    from jaxcl.models.hf import CheckpointError

    if source == "model":
        model = value
        if dtype:
            model = model_from_params(
                model.config.replace(dtype=dtype),
                nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            )
    elif source == "params":
        if config is None:
            raise ModelArgsError("params= needs config= (the ModelConfig they belong to)")
        cfg = config.replace(dtype=dtype) if dtype else config
        model = model_from_params(cfg, value)
    elif source == "checkpoint":
        model, tokenizer, mesh, rules = load_checkpoint(value, recipe, dtype, tokenizer)
        return model, tokenizer, mesh, rules
    else:  # preset or hf
        extra = {"dtype": dtype} if dtype else {}
        if source == "hf" and not Path(str(value)).expanduser().exists():
            raise ModelArgsError(f"hf={value}: no such directory or .gguf file")
        try:
            model = from_pretrained(str(value), seed=seed, **extra)
        except (FileNotFoundError, CheckpointError, ValueError) as err:
            raise ModelArgsError(f"{source}={value}: {err}") from None
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(value if source in ("preset", "hf") else model)
        except (FileNotFoundError, CheckpointError) as err:
            where = f"{source}={value}" if source in ("preset", "hf") else source
            raise ModelArgsError(
                f"{where}: {err}; pass tokenizer=bytes (jaxcl's byte tokenizer, as the "
                "tiny presets use) or tokenizer=DIR"
            ) from None
    elif isinstance(tokenizer, str | Path):
        try:
            tokenizer = load_tokenizer(str(tokenizer))
        except (FileNotFoundError, CheckpointError, ValueError) as err:
            raise ModelArgsError(f"tokenizer={tokenizer}: {err}") from None
    return model, tokenizer, mesh, rules


def load_checkpoint(
    path: str, recipe_path: str | None, dtype: str | None, tokenizer: Any
) -> tuple[Any, Any, Any, Any]:
    """A jaxcl run's checkpoint read as ``jaxcl eval`` reads it: ``(model, tokenizer, mesh,
    rules)`` of the recipe that wrote it."""
    from rich.console import Console

    from jaxcl.models import model_from_params
    from jaxcl.recipe import RecipeError, load_recipe
    from jaxcl.train.runner import make_context

    step = Path(str(path)).expanduser()
    if recipe_path is None:
        raise ModelArgsError(
            f"checkpoint={path} needs recipe=RECIPE.yaml: the recipe that wrote it names the "
            "model and the mesh (as for `jaxcl eval CHECKPOINT RECIPE`)"
        )
    if not (step / "params").exists() or not step.name.isdigit():
        raise ModelArgsError(
            f"checkpoint={path} is not a jaxcl checkpoint (expected "
            "OUT/checkpoints/<stage>/<step> holding params/)"
        )
    try:
        recipe = load_recipe(str(recipe_path))
    except RecipeError as err:
        raise ModelArgsError(f"recipe={recipe_path}: {err}") from None
    run, _ = make_context(recipe, Console(quiet=True))
    params = run.restore_model(step)
    cfg = recipe.model.abstract_model().config
    if dtype:
        cfg = cfg.replace(dtype=dtype)
    tok = run.tokenizer if tokenizer is None else tokenizer
    return model_from_params(cfg, params), tok, run.mesh, run.rules
