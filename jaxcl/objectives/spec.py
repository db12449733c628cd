"""Recipe entries for a stage's objective."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jaxcl.objectives.bound import Objective, dpo_objective, lm_objective
from jaxcl.objectives.preference import DPO_KINDS
from jaxcl.spec import Strict


class DpoSpec(Strict):
    beta: float = Field(0.1, gt=0)
    kind: Literal[DPO_KINDS] = "sigmoid"  # type: ignore[valid-type]
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


def stage_objective(stage_kind: str, dpo: DpoSpec, apply) -> Objective:
    """Causal LM for ``pretrain`` and ``instruct`` stages, DPO for ``align``."""
    if stage_kind == "align":
        return dpo_objective(
            apply, beta=dpo.beta, kind=dpo.kind, label_smoothing=dpo.label_smoothing
        )
    return lm_objective(apply)
