"""Block expansion (LLaMA Pro, Wu et al. 2024) as a recipe method: train the inserted blocks only.

The model is expanded when it is built (``model: {expand: {every: k}}``, see
:mod:`jaxcl.models.expand`); this method restricts a stage's training to the inserted blocks.
It is a mask standing behind the base optimizer, as :func:`jaxcl.methods.isolate.freeze` is: the
final update of every leaf outside the new blocks is zeroed (embeddings, output head, final norm,
every original block), so AdamW's momentum and decoupled weight decay cannot move them and they
stay bit-identical. With ``scan_layers`` the mask acts per row of the stacked ``[layers, ...]``
leaves.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods.compose import Behind, Position, behind, keep_masked
from jaxcl.methods.protocol import MethodSpecBase
from jaxcl.models.expand import layer_mask


class TrainBlocksState(NamedTuple):
    """No state: the mask is fixed by the layer indices when the transform is built."""


def train_blocks(layer_ids: list[int]) -> Behind:
    """Keep the update of the decoder layers ``layer_ids`` only: ``u ← u · [leaf ∈ layers]``
    (row-wise on ``scan_layers`` stacks), ``u ← 0`` everywhere else. Memory: none."""
    ids = sorted(set(layer_ids))

    def init(params: optax.Params) -> TrainBlocksState:
        del params
        return TrainBlocksState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return keep_masked(updates, layer_mask(updates, ids)), state

    return behind(init, update)


def new_blocks(num_layers: int, every: int) -> list[int]:
    """Indices of the inserted blocks in a model of ``num_layers`` layers *after* expansion by
    ``every`` (groups of ``every`` original blocks, each followed by its copy)."""
    if num_layers % (every + 1):
        raise ValueError(
            f"every: {every} does not fit the expanded model's {num_layers} layers (num_layers "
            f"must be a multiple of every + 1 = {every + 1})"
        )
    return [g * (every + 1) + every for g in range(num_layers // (every + 1))]


def trained_count(params: Any, layer_ids: list[int]) -> int:
    """How many parameters of ``params`` (arrays or shapes) lie in the layers ``layer_ids``."""
    mask = layer_mask(params, layer_ids)
    total = 0
    for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
        if isinstance(m, bool):
            total += math.prod(x.shape) if m else 0
        else:
            total += int(jnp.sum(m)) * math.prod(x.shape[1:])
    return total


class BlockExpansionSpec(MethodSpecBase):
    """``{name: block_expansion}``: train only the blocks that ``model.expand`` inserted.

    ``every`` defaults to the model's ``expand.every``; give it explicitly for a model that was
    expanded before (an HF directory written by an earlier run): its blocks ``every``,
    ``2·every + 1``, ... are then the ones trained."""

    name: Literal["block_expansion"]
    position: ClassVar[Position] = "behind"
    every: int | None = Field(
        None,
        ge=1,
        description="original blocks per inserted block (default: the model's expand.every)",
    )
    num_layers: int | None = Field(
        None, ge=1, description="layers of the expanded model (filled in from the model section)"
    )

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if lora is not None:
            raise ValueError(
                "trains the inserted blocks' weights, but this stage trains LoRA adapters: drop "
                "lora or block_expansion"
            )

    def bind_model(self, model: Any) -> BlockExpansionSpec:
        """This spec with ``every`` and ``num_layers`` taken from the recipe's model section
        (``ValueError`` naming the field when they disagree or do not fit)."""
        expand = getattr(model, "expand", None)
        every = self.every
        if every is None:
            if expand is None:
                raise ValueError(
                    "every: not given and the model section has no expand: set model.expand.every "
                    "(expand the model when it is built) or every (a model expanded before)"
                )
            every = expand.every
        elif expand is not None and expand.every != every:
            raise ValueError(
                f"every: {every} differs from model.expand.every ({expand.every}); drop one"
            )
        layers = model.abstract_model().config.num_layers
        new_blocks(layers, every)  # raises, naming every, when it does not fit
        return self.model_copy(update={"every": every, "num_layers": layers})

    @property
    def layer_ids(self) -> list[int]:
        if self.every is None or self.num_layers is None:
            raise ValueError("block_expansion: not bound to a model (see bind_model)")
        return new_blocks(self.num_layers, self.every)

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return train_blocks(self.layer_ids)

    def trained(self, params: Any) -> int:
        """How many of ``params`` this method lets the stage train (the plan's ``trained``)."""
        return trained_count(params, self.layer_ids)
