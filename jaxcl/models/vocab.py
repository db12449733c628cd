"""Vocabulary expansion: new tokens (a new language's words, ToolkenGPT-style tool tokens) added
to the tokenizer and as new rows of the embedding and the output head.

Each new token ``τ`` gets the id its tokenizer assigns (``len(tokenizer)``, ``+1``, ...) and is
initialised as the mean of its sub-tokens under the **original** tokenizer,
``s(τ) = encode_old(τ) = (s_1, ..., s_m)``::

    E[τ] = (1/m) Σ_j E[s_j]              (input embedding row; the output row too when tied)
    H[:, τ] = (1/m) Σ_j H[:, s_j]        (untied output head column)

Rows the model did not have are appended (``vocab_size`` grows to ``max(vocab_size, max id + 1)``,
rounded up to ``pad_to_multiple_of``); padding rows past the last new id hold the mean of all
old rows (columns). Old rows are left bit-identical, so the hidden states of any text written in
old tokens are unchanged, and so is every old token's logit: ``logits[:, :, :V_old]`` equals the
original model's (the new rows only add logits for the new ids).

The byte tokenizer of the tiny presets (ids ``0`` pad, ``1`` bos, ``2`` eos, byte ``b`` → ``b+3``;
:class:`jaxcl.models.tokenizer.ByteTokenizer`) has no room for added tokens, so it is first
rebuilt as an equivalent transformers tokenizer (:func:`byte_tokenizer_hf`: a byte-level BPE
without merges, ids identical to the byte tokenizer's on every text), its unused ids
``259 .. vocab_size-1`` held by reserved special tokens, so new tokens start at the model's
``vocab_size``; it is saved with the model like any transformers tokenizer.

Export: :func:`jaxcl.models.save_pretrained` ``(model, out_dir, tokenizer=extended)`` writes the
grown model and the extended tokenizer together (``jaxcl convert SRC DST --add-tokens FILE``
does both from the command line); recipes grow the model when it is built
(``model: {add_tokens: {file: tokens.txt}}``) and train the new rows alone with the method
``new_tokens`` (:mod:`jaxcl.methods.new_tokens`).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx
from pydantic import Field

from jaxcl.models.config import ModelConfig
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.spec import Strict

#: leaves holding vocabulary rows: ``embed [vocab, d]`` (rows) and ``lm_head [d, vocab]`` (columns)
VOCAB_AXES = {"embed": 0, "lm_head": 1}


class AddTokensSpec(Strict):
    """``model.add_tokens``: tokens added to the tokenizer and as new embedding / head rows when
    the model is built. Exactly one of ``file`` (UTF-8, one token a line, blank lines skipped)
    and ``tokens``."""

    file: str | None = Field(None, description="UTF-8 text file, one new token a line")
    tokens: list[str] | None = Field(None, description="the new tokens, in order")
    pad_to_multiple_of: int | None = Field(
        None,
        ge=1,
        description="round the grown vocab_size up to a multiple (e.g. 64, or the "
        "mesh's tensor size so the vocab axis shards evenly)",
    )

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> AddTokensSpec:
        if (self.file is None) == (self.tokens is None):
            raise ValueError("add_tokens: give exactly one of file and tokens")
        if self.file is not None and not Path(self.file).expanduser().is_file():
            raise ValueError(f"add_tokens.file: {self.file} is not a file")
        tokens = self.read()
        if not tokens:
            raise ValueError(f"{self.where}: no tokens")
        dup = sorted({t for t in tokens if tokens.count(t) > 1})
        if dup:
            raise ValueError(f"{self.where}: tokens listed twice: {dup}")
        return self

    @property
    def where(self) -> str:
        """The recipe field (and file) the tokens come from, for messages."""
        return f"add_tokens.file ({self.file})" if self.file is not None else "add_tokens.tokens"

    def read(self) -> list[str]:
        """The new tokens, in order."""
        if self.tokens is not None:
            return list(self.tokens)
        text = Path(self.file).expanduser().read_text(encoding="utf-8")  # type: ignore[arg-type]
        return [line for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- tokenizers


def byte_tokenizer_hf(rows: int = 384) -> Any:
    """A transformers tokenizer giving exactly :class:`ByteTokenizer`'s ids (``<pad>`` 0,
    ``<bos>`` 1, ``<eos>`` 2, byte b → b + 3) on every text, with ids ``259 .. rows-1`` held by
    reserved special tokens ``<reserved_i>`` so that ``len(tokenizer) == rows`` (the model's
    vocab_size) and added tokens take ids from ``rows`` on. A BPE with no merges and no
    characters, whose byte fallback (``<0xNN>`` tokens, as SentencePiece's) spells every text in
    bytes; its ``ByteFallback`` decoder leaves added tokens (any script) as they are."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    base = ByteTokenizer.vocab_size
    if rows < base:
        raise ValueError(f"the byte tokenizer needs {base} ids; the model has {rows} rows")
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({f"<0x{b:02X}>": b + ByteTokenizer.offset for b in range(256)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        split_special_tokens=True,  # as the byte tokenizer: "<bos>" in a text is spelled in bytes
    )
    reserved = [f"<reserved_{i}>" for i in range(base, rows)]
    if reserved:
        tok.add_special_tokens({"additional_special_tokens": reserved})
    return tok


def _sub_tokens(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids under ``tokenizer``, without special tokens."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def present_tokens(tokenizer: Any, tokens: list[str]) -> list[str]:
    """The tokens ``tokenizer`` already has: in its vocabulary, or encoded as one id (a single
    byte for the byte tokenizer; ``"the"`` for a BPE that has ``the``)."""
    vocab = {} if isinstance(tokenizer, ByteTokenizer) else tokenizer.get_vocab()
    return [t for t in tokens if t in vocab or len(_sub_tokens(tokenizer, t)) == 1]


def check_new_tokens(tokenizer: Any, tokens: list[str], where: str = "add_tokens") -> None:
    """Refuse tokens the tokenizer already has (``ValueError`` naming ``where`` and them)."""
    present = present_tokens(tokenizer, tokens)
    if present:
        shown = ", ".join(repr(t) for t in present[:20]) + (" ..." if len(present) > 20 else "")
        raise ValueError(
            f"{where}: {len(present)} token(s) already in the model's tokenizer (as one token): "
            f"{shown}; remove them"
        )


def extend_tokenizer(tokenizer: Any, tokens: list[str], rows: int) -> tuple[Any, list[int]]:
    """``(extended copy, new ids)``: ``tokens`` added (as ordinary tokens, matched in text before
    the tokenizer's own splitting) to a copy of ``tokenizer``; the byte tokenizer is first
    rebuilt as :func:`byte_tokenizer_hf` ``(rows)``. The given tokenizer is left as is."""
    check_new_tokens(tokenizer, tokens)
    if isinstance(tokenizer, ByteTokenizer):
        out = byte_tokenizer_hf(rows)
    else:
        out = copy.deepcopy(tokenizer)
    out.add_tokens(list(tokens))
    ids = [int(i) for i in out.convert_tokens_to_ids(list(tokens))]
    return out, ids


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class VocabExpansion:
    """What :func:`expand_vocab` made: the grown parameters and config, the extended tokenizer,
    the new tokens' ids and every row that was added or re-initialised (``rows``: new ids and
    padding)."""

    params: dict
    config: ModelConfig
    tokenizer: Any
    new_ids: list[int]
    rows: list[int]


def grown_size(vocab_size: int, new_ids: list[int], pad_to_multiple_of: int | None) -> int:
    """``max(vocab_size, max(new_ids) + 1)`` rounded up to ``pad_to_multiple_of``."""
    size = max(vocab_size, max(new_ids, default=-1) + 1)
    if pad_to_multiple_of:
        size = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
    return size


def _grow(table: np.ndarray, axis: int, size: int, init: dict[int, list[int]]) -> np.ndarray:
    """``table`` with its vocab ``axis`` grown to ``size``: row ``i`` of ``init`` becomes the mean
    of rows ``init[i]`` of the original; appended rows not in ``init`` the mean of all rows."""
    t = np.moveaxis(np.asarray(table), axis, 0)
    old = t.shape[0]
    t32 = t.astype(np.float32)
    out = np.concatenate([t32, np.broadcast_to(t32.mean(0), (size - old, *t.shape[1:]))])
    for i, subs in init.items():
        out[i] = t32[subs].mean(0)
    return np.moveaxis(out.astype(t.dtype), 0, axis)


def expand_vocab(
    params: dict,
    cfg: ModelConfig,
    tokenizer: Any,
    tokens: list[str],
    *,
    pad_to_multiple_of: int | None = None,
) -> VocabExpansion:
    """Add ``tokens`` to ``tokenizer`` and rows for them to ``params`` (a pure dict, any layer
    layout): each new row (``embed``; ``lm_head``'s column when untied) is the mean of the
    token's sub-tokens' under the original tokenizer; see the module doc. ``ValueError`` when a
    token is already in the tokenizer."""
    ext, ids = extend_tokenizer(tokenizer, tokens, cfg.vocab_size)
    size = grown_size(cfg.vocab_size, ids, pad_to_multiple_of)
    init = {i: _sub_tokens(tokenizer, t) for i, t in zip(ids, tokens, strict=True)}
    out = dict(params)
    for name, axis in VOCAB_AXES.items():
        if name in params:
            out[name] = jnp.asarray(_grow(jax.device_get(params[name]), axis, size, init))
    rows = sorted(set(ids) | set(range(cfg.vocab_size, size)))
    return VocabExpansion(out, cfg.replace(vocab_size=size), ext, ids, rows)


def expand_vocab_model(
    model: nnx.Module, tokenizer: Any, tokens: list[str], *, pad_to_multiple_of: int | None = None
) -> tuple[nnx.Module, Any, list[int]]:
    """The NNX form of :func:`expand_vocab`: ``(grown model, extended tokenizer, new ids)``; the
    given model is left as is. LoRA adapters are not carried over: merge them first."""
    from jaxcl.models.pretrained import model_from_params

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grown = expand_vocab(
        params, model.config, tokenizer, tokens, pad_to_multiple_of=pad_to_multiple_of
    )
    return model_from_params(grown.config, grown.params), grown.tokenizer, grown.new_ids


def row_mask(params: Any, ids: list[int]) -> Any:
    """A pytree shaped like ``params``: for ``embed`` a ``[vocab, 1]`` boolean array (row ``i``
    true iff ``i ∈ ids``), for ``lm_head`` a ``[1, vocab]`` one, ``False`` for every other leaf."""
    wanted = set(ids)

    def leaf(path: tuple, x: Any) -> Any:
        keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
        if len(keys) != 1 or keys[0] not in VOCAB_AXES or len(x.shape) != 2:
            return False
        axis = VOCAB_AXES[keys[0]]
        rows = np.asarray([i in wanted for i in range(x.shape[axis])])
        return jnp.asarray(rows.reshape((-1, 1) if axis == 0 else (1, -1)))

    return jax.tree_util.tree_map_with_path(leaf, params)


# ----------------------------------------------------------------------------- recipes


def _spec_parts(spec_json: str) -> tuple[Any, Any, list[str]]:
    """``(base ModelSpec without add_tokens, its AddTokensSpec, the tokens)``."""
    import json

    from jaxcl.models.spec import ModelSpec

    raw = json.loads(spec_json)
    add = raw.pop("add_tokens", None)
    if add is None:
        raise ValueError("the model section has no add_tokens")
    add = AddTokensSpec.model_validate(add)  # the base validated alone: no recursion
    return ModelSpec.model_validate({**raw, "add_tokens": None}), add, add.read()


def base_tokenizer(spec: Any) -> Any:
    """The tokenizer of a ModelSpec's source before any token is added."""
    if spec.source is None:
        return ByteTokenizer()
    from jaxcl.models.pretrained import load_tokenizer

    return load_tokenizer(spec.source)


@functools.lru_cache(maxsize=8)
def spec_tokenizer(spec_json: str) -> tuple[Any, tuple[int, ...], int]:
    """``(extended tokenizer, new ids, grown vocab_size)`` of a ModelSpec (JSON) with
    ``add_tokens``, without building any weights. The tokenizer is shared: do not modify it."""
    base, add, tokens = _spec_parts(spec_json)
    cfg = base.abstract_model().config
    tokenizer = base_tokenizer(base)
    check_new_tokens(tokenizer, tokens, add.where)
    ext, ids = extend_tokenizer(tokenizer, tokens, cfg.vocab_size)
    return ext, tuple(ids), grown_size(cfg.vocab_size, ids, add.pad_to_multiple_of)


def check_spec(spec: Any) -> None:
    """Refuse a ModelSpec whose ``add_tokens`` lists tokens its tokenizer already has (the
    message names the field, the file and the tokens)."""
    if spec.add_tokens is not None:
        spec_tokenizer(spec.model_dump_json())


def build_expanded(spec: Any, model: nnx.Module, tokenizer: Any) -> tuple[nnx.Module, Any]:
    """``ModelSpec.build``'s step: ``model`` grown by ``spec.add_tokens`` and the extended
    tokenizer."""
    add = spec.add_tokens
    grown, ext, _ = expand_vocab_model(
        model, tokenizer, add.read(), pad_to_multiple_of=add.pad_to_multiple_of
    )
    return grown, ext


def new_rows_count(spec: Any, params: Any) -> int:
    """Parameters in the rows ``spec.add_tokens`` adds (new ids and padding; the plan's "new")."""
    _, ids, size = spec_tokenizer(spec.model_dump_json())
    old = base_vocab_size(spec)
    rows = set(ids) | set(range(old, size))
    return sum(
        len(rows) * math.prod(params[n].shape) // params[n].shape[a]
        for n, a in VOCAB_AXES.items()
        if n in params
    )


def base_vocab_size(spec: Any) -> int:
    """vocab_size of a ModelSpec's model before ``add_tokens``."""
    return spec.model_copy(update={"add_tokens": None}).abstract_model().config.vocab_size
