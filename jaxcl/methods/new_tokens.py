"""Vocabulary expansion as a recipe method: train the new tokens' rows only.

The model is grown when it is built (``model: {add_tokens: {file: tokens.txt}}``, see
:mod:`jaxcl.models.vocab`); this method restricts a stage's training to the rows of the new
tokens: the input embedding rows ``E[τ]`` and, with an untied head, the output columns
``H[:, τ]``. It is a mask standing behind the base optimizer, as
:func:`jaxcl.methods.block_expansion.train_blocks` is: the final update of every other entry is
zeroed (every decoder block, the norms, every old row and column, padding rows), so AdamW's
momentum and decoupled weight decay cannot move them and they stay bit-identical. Leave the
method out to train the new rows together with the whole model.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, NamedTuple

import optax
from pydantic import Field

from jaxcl.methods.compose import Behind, Position, behind, keep_masked
from jaxcl.methods.protocol import MethodSpecBase
from jaxcl.models.vocab import VOCAB_AXES, row_mask


class TrainRowsState(NamedTuple):
    """No state: the mask is fixed by the token ids when the transform is built."""


def train_rows(ids: list[int]) -> Behind:
    """Keep the update of the vocabulary rows ``ids`` only: ``u_E[i] ← u_E[i]·[i ∈ ids]``,
    ``u_H[:, i] ← u_H[:, i]·[i ∈ ids]`` (``embed``, ``lm_head``), ``u ← 0`` on every other
    leaf. Memory: none."""
    ids = sorted(set(ids))

    def init(params: optax.Params) -> TrainRowsState:
        del params
        return TrainRowsState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return keep_masked(updates, row_mask(updates, ids)), state

    return behind(init, update)


def rows_count(params: Any, ids: list[int]) -> int:
    """How many parameters of ``params`` (arrays or shapes) lie in the vocabulary rows ``ids``."""
    total = 0
    for name, axis in VOCAB_AXES.items():
        if name in params:
            shape = params[name].shape
            total += len(set(ids)) * math.prod(shape) // shape[axis]
    return total


class NewTokensSpec(MethodSpecBase):
    """``{name: new_tokens}``: train only the rows of the tokens ``model.add_tokens`` added.

    ``tokens`` defaults to the model's ``add_tokens``; give it (a list, or ``file``) for a model
    whose vocabulary was expanded before (an HF directory written by ``jaxcl convert
    --add-tokens``): their ids are looked up in the model's tokenizer."""

    name: Literal["new_tokens"]
    position: ClassVar[Position] = "behind"
    tokens: list[str] | None = Field(
        None, description="the tokens whose rows train (default: model.add_tokens)"
    )
    file: str | None = Field(None, description="or a file of them, one a line")
    ids: list[int] | None = Field(
        None, description="their ids (filled in from the model's tokenizer)"
    )

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if lora is not None:
            raise ValueError(
                "trains embedding rows, but this stage trains LoRA adapters: drop lora or "
                "new_tokens"
            )

    def bind_model(self, model: Any) -> NewTokensSpec:
        """This spec with ``ids`` looked up in the model's (extended) tokenizer; ``ValueError``
        naming the field when a token is not one token of it."""
        from jaxcl.models.vocab import AddTokensSpec, base_tokenizer, spec_tokenizer

        if self.tokens is not None or self.file is not None:
            given = AddTokensSpec(tokens=self.tokens, file=self.file)
            tokens, where = given.read(), "tokens" if self.file is None else f"file ({self.file})"
        elif model.add_tokens is not None:
            tokens, where = model.add_tokens.read(), "tokens (model.add_tokens)"
        else:
            raise ValueError(
                "tokens: not given and the model section has no add_tokens: set "
                "model.add_tokens (grow the vocabulary when the model is built) or tokens "
                "(a model expanded before)"
            )
        if model.add_tokens is not None:
            tokenizer = spec_tokenizer(model.model_dump_json())[0]
        else:
            tokenizer = base_tokenizer(model)
        vocab = getattr(tokenizer, "get_vocab", dict)()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise ValueError(
                f"{where}: not tokens of the model's tokenizer: {missing[:20]} (add them with "
                "model.add_tokens)"
            )
        ids = [int(vocab[t]) for t in tokens]
        rows = model.abstract_model().config.vocab_size
        if max(ids) >= rows:
            raise ValueError(f"{where}: ids {ids} reach past the model's {rows} rows")
        return self.model_copy(update={"ids": ids})

    def _ids(self) -> list[int]:
        if self.ids is None:
            raise ValueError("new_tokens: not bound to a model (see bind_model)")
        return self.ids

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return train_rows(self._ids())

    def trained(self, params: Any) -> int:
        """How many of ``params`` this method lets the stage train (the plan's ``trained``)."""
        return rows_count(params, self._ids())
