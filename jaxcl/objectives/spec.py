"""Recipe entries for a stage's objective: its weighted terms and its reference.

A stage's objective is a list of terms, ``L = Σ_k weight_k · L_k``, in any stage kind::

    terms:                                   # default: [lm] (pretrain, instruct), [dpo] (align)
      - {name: dpo, beta: 0.1, kind: sigmoid}
      - {name: cppo, weight: 0.5}            # β (log π_θ − log π_prev)² against the task start
      - {name: distill, weight: 0.5, temperature: 2, top_k: 20}
    reference: {source: stage_start, logps: on_the_fly}   # or checkpoint: runs/x/checkpoints/cit

Without ``terms`` an align stage trains DPO configured by its ``dpo:`` entry (kept for
compatibility), unless one of its methods adds terms of its own (``objective_terms``: COPR's
``copr`` term), which then make the objective alone. Retention terms (``cppo``, ``kl``,
``distill``) compare with ``against: previous`` (the parameters at the start of the current
task: the ``task_start`` frozen tree) or ``reference`` (the DPO reference). See
docs/alignment.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import BeforeValidator, Field

from jaxcl.objectives.bound import Objective
from jaxcl.objectives.chunked import DEFAULT_CHUNK
from jaxcl.objectives.preference import DPO_KINDS, REFERENCE_FREE_KINDS
from jaxcl.objectives.reference import checkpoint_problem
from jaxcl.objectives.terms import (
    Term,
    compose_objective,
    cppo_term,
    distill_term,
    dpo_term,
    kl_term,
    lm_term,
    orpo_term,
)
from jaxcl.spec import Strict


class DpoSpec(Strict):
    beta: float = Field(0.1, gt=0)
    kind: Literal[DPO_KINDS] = "sigmoid"  # type: ignore[valid-type]
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    simpo_gamma: float = Field(0.5, ge=0)


class ReferenceSpec(Strict):
    """Where DPO's reference comes from and how its log-probs are obtained."""

    source: Literal["stage_start", "task_start", "checkpoint"] | None = Field(
        None, description="default: checkpoint when `checkpoint` is given, else stage_start"
    )
    checkpoint: str | None = Field(
        None, description="a step folder OUT/checkpoints/STAGE/STEP or a stage folder (latest)"
    )
    logps: Literal["on_the_fly", "precomputed"] = "on_the_fly"

    @pydantic.field_validator("checkpoint")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is not None:
            problem = checkpoint_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> ReferenceSpec:
        if self.source == "checkpoint" and self.checkpoint is None:
            raise ValueError("source: checkpoint needs the checkpoint path (reference.checkpoint)")
        if self.checkpoint is not None and self.source not in (None, "checkpoint"):
            raise ValueError(
                f"reference.checkpoint is given but source is {self.source!r}; drop one of them"
            )
        return self

    @property
    def resolved_source(self) -> str:
        return self.source or ("checkpoint" if self.checkpoint else "stage_start")

    @property
    def tree(self) -> str:
        """The frozen tree that holds the reference."""
        return "task_start" if self.resolved_source == "task_start" else "reference"

    @property
    def checkpoint_path(self) -> str | None:
        return str(Path(self.checkpoint).expanduser()) if self.checkpoint else None


class TermSpecBase(Strict):
    name: str
    weight: float = Field(1.0, ge=0, description="the term's factor in the summed loss")
    #: needs preference pairs (only valid in align stages)
    pairs: ClassVar[bool] = False

    def build(self, reference: ReferenceSpec) -> Term:  # pragma: no cover - overridden
        raise NotImplementedError

    def uses_reference(self) -> bool:
        return getattr(self, "against", None) == "reference"


def _against(value: str, reference: ReferenceSpec) -> str:
    return "task_start" if value == "previous" else reference.tree


class LmTermSpec(TermSpecBase):
    """Masked causal-LM NLL (the chosen response's, on preference pairs)."""

    name: Literal["lm"]
    question_loss: float = Field(
        0.0,
        ge=0,
        description="LAMOL's λ: weight of the whole example's LM loss, prompt included",
    )

    def build(self, reference: ReferenceSpec) -> Term:
        return lm_term(self.weight, question_loss=self.question_loss)


class DpoTermSpec(TermSpecBase):
    """DPO and kin: ``kind`` sigmoid (with ``label_smoothing``: conservative DPO), ipo, hinge,
    simpo (reference-free, length-normalised, margin ``simpo_gamma``)."""

    name: Literal["dpo"]
    beta: float = Field(0.1, gt=0)
    kind: Literal[DPO_KINDS] = "sigmoid"  # type: ignore[valid-type]
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    simpo_gamma: float = Field(0.5, ge=0)
    pairs: ClassVar[bool] = True

    def uses_reference(self) -> bool:
        return self.kind not in REFERENCE_FREE_KINDS

    def build(self, reference: ReferenceSpec) -> Term:
        return dpo_term(
            self.weight,
            beta=self.beta,
            kind=self.kind,
            label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma,
            reference=reference.tree,
            precomputed=reference.logps == "precomputed",
        )


class OrpoTermSpec(TermSpecBase):
    """ORPO's odds-ratio term; weight is ORPO's λ (pair it with an ``lm`` term)."""

    name: Literal["orpo"]
    weight: float = Field(0.1, ge=0)
    pairs: ClassVar[bool] = True

    def build(self, reference: ReferenceSpec) -> Term:
        return orpo_term(self.weight)


class CppoTermSpec(TermSpecBase):
    """CPPO-style ``β (log π_θ(y|x) − log π_prev(y|x))²`` with per-sample weights; weight = β.
    CPPO's knowledge-retention penalty alone, offline (not CPPO's PPO on rollouts)."""

    name: Literal["cppo"]
    against: Literal["previous", "reference"] = "previous"
    weighting: Literal["uniform", "confidence"] = "uniform"
    length_normalized: bool = False

    def build(self, reference: ReferenceSpec) -> Term:
        return cppo_term(
            self.weight,
            against=_against(self.against, reference),
            weighting=self.weighting,
            length_normalized=self.length_normalized,
        )


class KlTermSpec(TermSpecBase):
    """Token-level KL to the previous policy (``reverse``: KL(π_θ‖π_prev))."""

    name: Literal["kl"]
    against: Literal["previous", "reference"] = "previous"
    direction: Literal["reverse", "forward"] = "reverse"

    def build(self, reference: ReferenceSpec) -> Term:
        return kl_term(
            self.weight, against=_against(self.against, reference), direction=self.direction
        )


class DistillTermSpec(TermSpecBase):
    """LwF / knowledge distillation from the previous model: ``T² KL(p_T ‖ q_T)``."""

    name: Literal["distill"]
    against: Literal["previous", "reference"] = "previous"
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)

    def build(self, reference: ReferenceSpec) -> Term:
        return distill_term(
            self.weight,
            against=_against(self.against, reference),
            temperature=self.temperature,
            top_k=self.top_k,
        )


TERM_SPECS: dict[str, type[TermSpecBase]] = {
    "lm": LmTermSpec,
    "dpo": DpoTermSpec,
    "orpo": OrpoTermSpec,
    "cppo": CppoTermSpec,
    "kl": KlTermSpec,
    "distill": DistillTermSpec,
}


def term_names() -> list[str]:
    return list(TERM_SPECS)


def _known_terms(value: Any) -> Any:
    """Refuse unknown term names with the valid choices before the union is tried."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict):
                name = item.get("name")
                if name is None:
                    raise ValueError(f"terms[{i}]: a term needs a 'name' ({', '.join(TERM_SPECS)})")
                if name not in TERM_SPECS:
                    raise ValueError(
                        f"terms[{i}]: unknown objective term {name!r}; valid choices: "
                        f"{', '.join(TERM_SPECS)}"
                    )
    return value


TermSpec = Annotated[
    LmTermSpec | DpoTermSpec | OrpoTermSpec | CppoTermSpec | KlTermSpec | DistillTermSpec,
    Field(discriminator="name"),
]
TermList = Annotated[list[TermSpec], BeforeValidator(_known_terms)]


def default_terms(stage_kind: str, dpo: DpoSpec) -> list[TermSpecBase]:
    """``[lm]`` for pretrain and instruct stages, ``[dpo]`` (from ``dpo:``) for align."""
    if stage_kind == "align":
        return [DpoTermSpec(name="dpo", **dpo.model_dump())]
    return [LmTermSpec(name="lm")]


def _auxiliary(method: Any) -> bool:
    """Whether ``method``'s terms add to the stage's objective (the default ``lm``/``dpo`` kept)
    rather than supply it (COPR): its ``auxiliary_terms`` class flag."""
    return bool(getattr(method, "auxiliary_terms", False))


def check_terms(
    stage_kind: str,
    terms: list[TermSpecBase],
    reference: ReferenceSpec,
    dpo_given: bool,
    methods: Sequence[Any] = (),
) -> None:
    """Refuse term lists that cannot train (raised as ``ValueError`` naming the field);
    ``methods`` are the stage's method specs, whose own terms (``objective_terms``) are checked
    too."""
    added = 0
    for i, method in enumerate(methods):
        for term in method.objective_terms(reference):
            added += 0 if _auxiliary(method) else 1
            if term.pairs and stage_kind != "align":
                raise ValueError(
                    f"methods[{i}] ({method.name}): its {term.name} term needs preference pairs; "
                    f"a {stage_kind} stage has none (use it in an align stage)"
                )
            if any(t.name == term.name for t in terms):
                raise ValueError(
                    f"methods[{i}] ({method.name}) adds the {term.name} term itself; drop it "
                    "from terms"
                )
    explicit = bool(terms)
    if added and not explicit and dpo_given:
        raise ValueError(
            "dpo: this stage's methods supply its objective, so dpo: would not be read; drop "
            "it (or give a dpo term in `terms`)"
        )
    terms = terms or default_terms(stage_kind, DpoSpec())
    if explicit and dpo_given:
        raise ValueError(
            "dpo: give DPO's settings in the dpo term of `terms` (dpo: is only read when "
            "`terms` is absent)"
        )
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"terms: a term may appear once per stage, got {names}")
    for i, term in enumerate(terms):
        if term.pairs and stage_kind != "align":
            raise ValueError(
                f"terms[{i}]: the {term.name} term needs preference pairs; a {stage_kind} stage "
                "has none (use it in an align stage)"
            )
    if not added and all(t.weight == 0 for t in terms):
        raise ValueError("terms: every weight is 0; nothing would be trained")
    if reference.logps == "precomputed" and not any(
        isinstance(t, DpoTermSpec) and t.uses_reference() for t in terms
    ):
        raise ValueError(
            "reference.logps: precomputed reference log-probs serve a dpo term with a "
            "reference; this stage has none"
        )


def compile_objective(
    stage_kind: str,
    terms: list[TermSpecBase] | tuple[TermSpecBase, ...] | None,
    reference: ReferenceSpec | None,
    dpo: DpoSpec,
    apply,
    methods: Sequence[Any] = (),
    chunk: int = DEFAULT_CHUNK,
) -> Objective:
    """The stage's :class:`Objective`: its terms (or the kind's default, unless its ``methods``
    add terms of their own) and its methods' terms, summed; ``chunk`` sequence positions per
    logits chunk (:mod:`jaxcl.objectives.chunked`; 0: whole logits)."""
    reference = reference or ReferenceSpec()
    added = [t for m in methods for t in m.objective_terms(reference)]
    # terms of methods that only add to the objective (L2P's key loss) keep the default
    replacing = [m for m in methods if m.objective_terms(reference) and not _auxiliary(m)]
    specs = list(terms) if terms or replacing else default_terms(stage_kind, dpo)
    built = [spec.build(reference) for spec in specs] + added
    uses_ref = any(t.uses_reference() for t in specs)
    precompute = ()
    if reference.logps == "precomputed" and uses_ref:
        precompute = (reference.tree,)
    checkpoint = (
        reference.checkpoint_path
        if uses_ref and reference.resolved_source == "checkpoint"
        else None
    )
    return compose_objective(
        apply, built, precompute=precompute, reference_checkpoint=checkpoint, chunk=chunk
    )


def stage_objective(stage: Any, apply) -> Objective:
    """The objective of a ``StageSpec``: its ``terms`` (or its kind's default), its methods'
    terms and its reference."""
    return compile_objective(
        stage.kind,
        stage.terms,
        stage.reference,
        stage.dpo,
        apply,
        stage.methods,
        getattr(stage, "loss_chunk", DEFAULT_CHUNK),
    )
