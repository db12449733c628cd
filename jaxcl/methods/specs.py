"""Recipe entries for methods: ``{name: ewc, lam: 100}`` → a spec that declares its optax
transform, its estimates at task boundaries and its hooks (:mod:`jaxcl.methods.protocol`).

Each spec lives beside its transforms (``regularize``, ``project``, ``isolate``, ``softmask``,
``memory``, ``weights``). To add a method to recipes: subclass
:class:`~jaxcl.methods.protocol.MethodSpecBase` there, and list it in ``METHOD_SPECS`` and
``MethodSpec`` here.

:func:`compile_methods` turns a stage's method list into the transforms that stand in front of
and behind the base optimizer, after :func:`validate_methods` refused misplaced, duplicate or
conflicting methods with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import optax
from pydantic import Field

from jaxcl.methods.block_expansion import BlockExpansionSpec
from jaxcl.methods.copr import CoprSpec
from jaxcl.methods.demix import DemixSpec
from jaxcl.methods.experts import MoELoraSpec
from jaxcl.methods.gem import GemSpec
from jaxcl.methods.gpm import GpmSpec
from jaxcl.methods.hma import HmaSpec
from jaxcl.methods.inflora import InfLoraSpec
from jaxcl.methods.isolate import FreezeSpec, PackNetSpec
from jaxcl.methods.memory import ReplaySpec
from jaxcl.methods.merge_specs import DareSpec, TiesSpec
from jaxcl.methods.new_tokens import NewTokensSpec
from jaxcl.methods.project import AgemSpec, OgdSpec, OLoraSpec
from jaxcl.methods.prompts import L2PSpec, ProgressivePromptsSpec, SoftPromptSpec
from jaxcl.methods.protocol import Hook, MethodSpecBase
from jaxcl.methods.regularize import EwcSpec, L2AnchorSpec, MasSpec, RecAdamSpec, SiSpec
from jaxcl.methods.sapt import SaptSpec
from jaxcl.methods.softmask import SoftMaskSpec
from jaxcl.methods.ssr import SsrSpec
from jaxcl.methods.storage import stored_as
from jaxcl.methods.weights import AverageSpec, ElasticResetSpec, EmaSpec, TaskArithmeticSpec

METHOD_SPECS: tuple[type[MethodSpecBase], ...] = (
    EwcSpec,
    L2AnchorSpec,
    MasSpec,
    SiSpec,
    RecAdamSpec,
    AgemSpec,
    GemSpec,
    OgdSpec,
    GpmSpec,
    OLoraSpec,
    FreezeSpec,
    PackNetSpec,
    SoftMaskSpec,
    ReplaySpec,
    SsrSpec,
    EmaSpec,
    ElasticResetSpec,
    AverageSpec,
    TaskArithmeticSpec,
    HmaSpec,
    TiesSpec,
    DareSpec,
    CoprSpec,
    BlockExpansionSpec,
    NewTokensSpec,
    InfLoraSpec,
    MoELoraSpec,
    DemixSpec,
    SoftPromptSpec,
    ProgressivePromptsSpec,
    L2PSpec,
    SaptSpec,
)

MethodSpec = Annotated[
    EwcSpec
    | L2AnchorSpec
    | MasSpec
    | SiSpec
    | RecAdamSpec
    | AgemSpec
    | GemSpec
    | OgdSpec
    | GpmSpec
    | OLoraSpec
    | FreezeSpec
    | PackNetSpec
    | SoftMaskSpec
    | ReplaySpec
    | SsrSpec
    | EmaSpec
    | ElasticResetSpec
    | AverageSpec
    | TaskArithmeticSpec
    | HmaSpec
    | TiesSpec
    | DareSpec
    | CoprSpec
    | BlockExpansionSpec
    | NewTokensSpec
    | InfLoraSpec
    | MoELoraSpec
    | DemixSpec
    | SoftPromptSpec
    | ProgressivePromptsSpec
    | L2PSpec
    | SaptSpec,
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

#: weight-space methods: each replaces the stage's weights at boundaries (and its eval view
#: assumes the weights it left), so at most one per stage
WEIGHT_SPACE = ("ema", "elastic_reset", "average", "task_arithmetic", "hma", "ties", "dare")
CONFLICTS.update(
    {
        frozenset({a, b}): "each replaces the stage's weights at boundaries; keep one"
        for i, a in enumerate(WEIGHT_SPACE)
        for b in WEIGHT_SPACE[i + 1 :]
    }
)

#: first on their side of the optimizer: SI must see the raw task gradient, RecAdam AdamW's own
#: update (its recall term is decoupled from Adam, its λ(t) scales Adam's step alone)
FIRST: tuple[str, ...] = ("si", "recadam")
#: masks stand last behind the optimizer, after any projection of the update, so the weights
#: they fix stay bit-identical
LAST: tuple[str, ...] = (
    "freeze",
    "packnet",
    "soft_mask",
    "block_expansion",
    "moe_lora",
    "demix",
    "soft_prompt",
    "progressive_prompts",
    "l2p",
    "sapt",
)


def validate_methods(methods: list[MethodSpecBase]) -> None:
    """Refuse duplicate or conflicting methods, and more than one memory, with a ``ValueError``
    that says why."""
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
    memories = [m.name for m in methods if m.new_memory(seed=0, n_tasks=1) is not None]
    if len(memories) > 1:
        raise ValueError(
            f"methods {memories[0]!r} and {memories[1]!r} each keep a memory of finished tasks; "
            "keep one (replay's buffer also feeds A-GEM when both are wanted: use agem alone)"
        )


@dataclass(frozen=True)
class CompiledMethods:
    """What a stage's method list compiles to: ``chain(*front, clip, base, *behind)``, the
    methods' hooks in recipe order, and whether the step needs ``memory_grads`` (one per
    earlier task when ``memory_grads_per_task``)."""

    front: list[optax.GradientTransformationExtraArgs]
    behind: list[optax.GradientTransformationExtraArgs]
    hooks: list[Hook]
    needs_memory_grads: bool
    memory_grads_per_task: bool = False


def compile_methods(
    methods: list[MethodSpecBase],
    learning_rate: optax.ScalarOrSchedule | None = None,
    weight_decay: float = 0.0,
) -> CompiledMethods:
    """Validate ``methods`` and place each transform on its side of the base optimizer, in
    recipe order except that those in ``FIRST`` move first and masks (``LAST``) last; a method
    with a ``buffer_dtype`` keeps its buffers in it (:func:`~jaxcl.methods.storage.stored_as`)."""
    validate_methods(methods)
    ordered = sorted(methods, key=lambda m: 0 if m.name in FIRST else 2 if m.name in LAST else 1)
    front, behind = [], []
    for m in ordered:
        tx = m.transform(learning_rate=learning_rate, weight_decay=weight_decay)
        if m.buffer_dtype is not None:
            if tx is None:
                raise ValueError(
                    f"method {m.name!r}: buffer_dtype is set, but {m.name} keeps no buffers in "
                    "the optimizer state; drop buffer_dtype"
                )
            tx = stored_as(tx, m.buffer_dtype, m.name)
        if tx is not None:
            (front if m.place() == "front" else behind).append(tx)
    return CompiledMethods(
        front,
        behind,
        [hook for m in methods for hook in m.hooks()],
        any(m.needs_memory_grads for m in methods),
        any(m.needs_memory_grads and m.memory_grads_per_task for m in methods),
    )
