"""Recipe entries for methods: ``{name: ewc, lam: 100}`` → an optax transform, estimates at task
boundaries, and what the trainer must keep or feed (a memory of earlier examples).

To add a method to recipes: subclass :class:`MethodSpecBase` with a ``name: Literal[...]`` field,
implement what applies, and list it in ``METHOD_SPECS`` and ``MethodSpec``.

:func:`compile_methods` turns a stage's method list into the transforms that stand in front of
and behind the base optimizer, after :func:`validate_methods` refused misplaced, duplicate or
conflicting methods with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import jax
import optax
from pydantic import Field

from jaxcl.data.replay import RatioScheduleSpec
from jaxcl.methods.compose import Position
from jaxcl.methods.importance import activation_covariance, fisher_diagonal, mas_importance
from jaxcl.methods.isolate import freeze, packnet, soft_mask
from jaxcl.methods.project import agem, gpm, o_lora, ogd
from jaxcl.methods.regularize import ewc, l2_anchor, mas, recadam, si
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
    #: where the transform stands: in front of the base optimizer (gradients) or behind it
    position: ClassVar[Position] = "front"

    def transform(
        self, *, learning_rate: optax.ScalarOrSchedule | None = None
    ) -> optax.GradientTransformationExtraArgs | None:
        """The gradient-side transform; ``learning_rate`` is the base optimizer's (schedule)."""
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

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return ewc(self.lam, decay=self.decay)

    def estimates(self, boundary: Boundary) -> dict[str, Any]:
        batches = boundary.batches(self.fisher_batches)
        return {"fisher": fisher_diagonal(boundary.loss_fn, boundary.params, batches)}


class L2AnchorSpec(MethodSpecBase):
    name: Literal["l2_anchor"]
    lam: float = Field(1.0, ge=0)

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return l2_anchor(self.lam)


class ReplaySpec(MethodSpecBase):
    """Experience replay as a data op: a reservoir buffer of finished tasks' examples
    (:class:`jaxcl.data.replay.ReplayBuffer`) mixed into each later task's batches."""

    name: Literal["replay"]
    ratio: float = Field(0.2, ge=0, le=1, description="fraction of each batch replayed")
    capacity: int = Field(512, ge=1, description="examples kept across all finished tasks")
    quota: Literal["equal", "proportional", "inscl"] = Field(
        "equal", description="how the capacity is shared between tasks"
    )
    schedule: RatioScheduleSpec | None = Field(
        None, description="the ratio over each task's steps (replaces ratio)"
    )

    def replay_ratio(self) -> float | Callable[[int], float]:
        return self.schedule.build() if self.schedule else self.ratio


# ----------------------------------------------------------------------------- helpers


def model_inputs(batch: dict[str, Any]) -> Any:
    """The token ids a batch feeds the model (LM: ``tokens[:, :-1]``; preference: both
    responses)."""
    if "tokens" in batch:
        return batch["tokens"][:, :-1]
    if "chosen_tokens" in batch:
        tokens = jax.numpy.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
        return tokens[:, :-1]
    raise ValueError(f"cannot find model inputs in a batch with keys {sorted(batch)}")


def _output_fn(boundary: Boundary) -> Callable[[Any, Any], Any]:
    return lambda params, batch: boundary.apply(params, model_inputs(batch))


def _kernel_select(include: str | None, exclude: str | None) -> Callable[[str, Any], bool]:
    """Kernels (``ndim >= 2``) whose path matches ``include`` (all if None) and not ``exclude``."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None

    def select(path: str, leaf: Any) -> bool:
        if getattr(leaf, "ndim", 0) < 2:
            return False
        return (inc is None or bool(inc.search(path))) and not (exc and exc.search(path))

    return select


# ----------------------------------------------------------------------------- regularization


class MasSpec(MethodSpecBase):
    name: Literal["mas"]
    lam: float = Field(1.0, ge=0)
    decay: float = Field(1.0, ge=0, le=1)
    importance_batches: int = Field(8, ge=1, description="batches of the task for Ω")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return mas(self.lam, decay=self.decay)

    def estimates(self, boundary: Boundary) -> dict[str, Any]:
        batches = boundary.batches(self.importance_batches)
        return {"mas_importance": mas_importance(_output_fn(boundary), boundary.params, batches)}


class SiSpec(MethodSpecBase):
    name: Literal["si"]
    lam: float = Field(1.0, ge=0)
    damping: float = Field(1e-3, gt=0, description="ξ in Ω += w / (Δ² + ξ)")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return si(self.lam, damping=self.damping)


class RecAdamSpec(MethodSpecBase):
    name: Literal["recadam"]
    position: ClassVar[Position] = "behind"
    coef: float = Field(100.0, ge=0, description="γ of the quadratic recall term")
    schedule: Literal["sigmoid", "linear", "constant"] = "sigmoid"
    k: float = Field(0.5, gt=0, description="sigmoid steepness")
    t0: float = Field(250.0, ge=0, description="sigmoid midpoint / linear ramp length, in steps")
    value: float = Field(0.5, ge=0, le=1, description="λ of the constant schedule")

    def transform(
        self, *, learning_rate: optax.ScalarOrSchedule | None = None, **_: Any
    ) -> optax.GradientTransformationExtraArgs:
        if learning_rate is None:
            raise ValueError(
                "recadam applies its recall term outside Adam and needs the base learning rate: "
                "the trainer must call transform(learning_rate=schedule)"
            )
        return recadam(
            learning_rate, self.coef, schedule=self.schedule, k=self.k, t0=self.t0, value=self.value
        )


# ----------------------------------------------------------------------------- projection


class AgemSpec(MethodSpecBase):
    name: Literal["agem"]
    per_task: int = Field(256, ge=1, description="examples kept from each finished task")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return agem()

    @property
    def memory_per_task(self) -> int:
        return self.per_task

    @property
    def needs_memory_grads(self) -> bool:
        return True


class OgdSpec(MethodSpecBase):
    name: Literal["ogd"]
    max_directions: int = Field(16, ge=1, description="basis size per leaf (parameter buffers)")
    grads_per_task: int = Field(4, ge=1, description="batch gradients stored per finished task")
    include: str | None = Field(None, description="regex of the leaves to protect (all if unset)")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return ogd(self.max_directions, select=self.include)

    def estimates(self, boundary: Boundary) -> dict[str, Any]:
        grad = jax.jit(jax.grad(boundary.loss_fn))
        grads = [grad(boundary.params, b) for b in boundary.batches(self.grads_per_task)]
        return {"ogd_grads": grads}


class GpmSpec(MethodSpecBase):
    name: Literal["gpm"]
    threshold: float = Field(0.97, gt=0, le=1, description="energy fraction ε kept per task")
    batches: int = Field(4, ge=1, description="batches of the task for the activations")
    include: str | None = Field(None, description="regex of the kernels to protect (all)")
    exclude: str | None = Field("embed", description="regex of kernels left out (lookups)")
    max_rank: int | None = Field(None, ge=1, description="basis columns per kernel (≤ in)")

    def _select(self) -> Callable[[str, Any], bool]:
        return _kernel_select(self.include, self.exclude)

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return gpm(self.threshold, select=self._select(), max_rank=self.max_rank)

    def estimates(self, boundary: Boundary) -> dict[str, Any]:
        cov = activation_covariance(
            _output_fn(boundary),
            boundary.params,
            boundary.batches(self.batches),
            select=self._select(),
        )
        return {"gpm_covariance": cov}


class OLoraSpec(MethodSpecBase):
    name: Literal["o_lora"]
    lam: float = Field(0.5, ge=0)
    include: str = Field(r"(?i)lora.*/a$|lora_?a$", description="regex of the LoRA A leaves")
    max_tasks: int = Field(8, ge=1)
    layout: Literal["in_r", "r_in"] = "in_r"

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return o_lora(self.lam, self.include, max_tasks=self.max_tasks, layout=self.layout)


# ----------------------------------------------------------------------------- isolation


class FreezeSpec(MethodSpecBase):
    name: Literal["freeze"]
    position: ClassVar[Position] = "behind"
    include: str = Field(description="regex of the leaves to freeze, e.g. 'embed|lm_head'")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return freeze(self.include)


class PackNetSpec(MethodSpecBase):
    name: Literal["packnet"]
    position: ClassVar[Position] = "behind"
    prune: float = Field(0.5, ge=0, lt=1, description="fraction of free weights pruned per task")
    include: str | None = Field(None, description="regex of the kernels to pack (all kernels)")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return packnet(self.prune, select=_kernel_select(self.include, None))


class SoftMaskSpec(MethodSpecBase):
    name: Literal["soft_mask"]
    position: ClassVar[Position] = "behind"
    importance_batches: int = Field(8, ge=1, description="batches of the task for importance")
    include: str | None = Field(None, description="regex of the leaves to mask (all)")

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return soft_mask(self.include)

    def estimates(self, boundary: Boundary) -> dict[str, Any]:
        batches = boundary.batches(self.importance_batches)
        imp = mas_importance(_output_fn(boundary), boundary.params, batches)
        return {"soft_mask_importance": imp}


METHOD_SPECS: tuple[type[MethodSpecBase], ...] = (
    EwcSpec,
    L2AnchorSpec,
    MasSpec,
    SiSpec,
    RecAdamSpec,
    AgemSpec,
    OgdSpec,
    GpmSpec,
    OLoraSpec,
    FreezeSpec,
    PackNetSpec,
    SoftMaskSpec,
    ReplaySpec,
)

MethodSpec = Annotated[
    EwcSpec
    | L2AnchorSpec
    | MasSpec
    | SiSpec
    | RecAdamSpec
    | AgemSpec
    | OgdSpec
    | GpmSpec
    | OLoraSpec
    | FreezeSpec
    | PackNetSpec
    | SoftMaskSpec
    | ReplaySpec,
    Field(discriminator="name"),
]


def method_names() -> list[str]:
    return [spec.model_fields["name"].annotation.__args__[0] for spec in METHOD_SPECS]


# ----------------------------------------------------------------------------- combinations

#: pairs refused together, with the reason
CONFLICTS: dict[frozenset[str], str] = {
    frozenset({"recadam", "l2_anchor"}): (
        "both pull the weights toward the same anchor with an L2 term; keep one "
        "(recadam anneals it, l2_anchor keeps it constant)"
    ),
}

#: front methods that must see the raw task gradient, so stand first in the chain
FIRST: tuple[str, ...] = ("si",)


def validate_methods(methods: list[MethodSpecBase]) -> None:
    """Refuse duplicate or conflicting methods with a ``ValueError`` that says why."""
    names = [m.name for m in methods]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"method {name!r} appears twice; a method may appear once per stage")
        seen.add(name)
    for pair, reason in CONFLICTS.items():
        if pair <= seen:
            a, b = sorted(pair)
            raise ValueError(f"methods {a!r} and {b!r} conflict: {reason}")


@dataclass(frozen=True)
class CompiledMethods:
    """What a stage's method list compiles to: ``chain(*front, clip, base, *behind)``."""

    front: list[optax.GradientTransformationExtraArgs]
    behind: list[optax.GradientTransformationExtraArgs]
    memory_per_task: int
    needs_memory_grads: bool


def compile_methods(
    methods: list[MethodSpecBase], learning_rate: optax.ScalarOrSchedule | None = None
) -> CompiledMethods:
    """Validate ``methods`` and place each transform on its side of the base optimizer: front
    methods in recipe order (those in ``FIRST`` moved first), then behind methods in order."""
    validate_methods(methods)
    ordered = sorted(methods, key=lambda m: m.name not in FIRST)
    front, behind = [], []
    for m in ordered:
        tx = m.transform(learning_rate=learning_rate)
        if tx is not None:
            (front if m.position == "front" else behind).append(tx)
    return CompiledMethods(
        front,
        behind,
        max((m.memory_per_task for m in methods), default=0),
        any(m.needs_memory_grads for m in methods),
    )
