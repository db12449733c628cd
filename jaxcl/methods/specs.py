"""Recipe entries for methods: ``{name: ewc, lam: 100}`` → an optax transform, estimates at task
boundaries, and what the trainer must keep or feed (a memory of earlier examples).

To add a method to recipes: subclass :class:`MethodSpecBase` with a ``name: Literal[...]`` field,
implement what applies, and list it in ``METHOD_SPECS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import optax
from pydantic import Field

from jaxcl.methods.importance import fisher_diagonal
from jaxcl.methods.regularize import ewc, l2_anchor
from jaxcl.spec import Strict


@dataclass(frozen=True)
class Boundary:
    """What a method may use to estimate its state at the end of a task.

    ``loss_fn(params, batch) -> scalar`` is the stage's objective; ``batches(n)`` yields ``n`` of
    the task's training batches, placed on the mesh; ``apply(params, input_ids)`` is the model.
    """

    loss_fn: Callable[[Any, Any], Any]
    params: Any
    batches: Callable[[int], Iterator[Any]]
    apply: Callable[..., Any]


class MethodSpecBase(Strict):
    name: str

    def transform(self) -> optax.GradientTransformationExtraArgs | None:
        """The gradient-side transform (placed before clipping and the base optimizer)."""
        return None

    def estimates(self, boundary: Boundary) -> dict[str, Any]:
        """Keyword arguments for :func:`jaxcl.methods.consolidate` at a task boundary."""
        return {}

    @property
    def memory_per_task(self) -> int:
        """Examples of each finished task the trainer must keep (0: none)."""
        return 0

    @property
    def needs_memory_grads(self) -> bool:
        """Whether the chain needs ``memory_grads`` (the gradient on a memory batch) each step."""
        return False


class EwcSpec(MethodSpecBase):
    name: Literal["ewc"]
    lam: float = Field(100.0, ge=0)
    decay: float = Field(1.0, ge=0, le=1)
    fisher_batches: int = Field(8, ge=1, description="batches of the task for the Fisher")

    def transform(self) -> optax.GradientTransformationExtraArgs:
        return ewc(self.lam, decay=self.decay)

    def estimates(self, boundary: Boundary) -> dict[str, Any]:
        batches = boundary.batches(self.fisher_batches)
        return {"fisher": fisher_diagonal(boundary.loss_fn, boundary.params, batches)}


class L2AnchorSpec(MethodSpecBase):
    name: Literal["l2_anchor"]
    lam: float = Field(1.0, ge=0)

    def transform(self) -> optax.GradientTransformationExtraArgs:
        return l2_anchor(self.lam)


class ReplaySpec(MethodSpecBase):
    name: Literal["replay"]
    ratio: float = Field(0.2, ge=0, le=1, description="fraction of each batch replayed")
    per_task: int = Field(256, ge=1, description="examples kept from each finished task")

    @property
    def memory_per_task(self) -> int:
        return self.per_task


METHOD_SPECS: tuple[type[MethodSpecBase], ...] = (EwcSpec, L2AnchorSpec, ReplaySpec)

MethodSpec = Annotated[EwcSpec | L2AnchorSpec | ReplaySpec, Field(discriminator="name")]


def method_names() -> list[str]:
    return [spec.model_fields["name"].annotation.__args__[0] for spec in METHOD_SPECS]
