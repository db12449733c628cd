"""The method catalog: every method a recipe can name, with its family and one line of help."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    kind: str  # "transform" (optax), "data" (Grain op) or "objective"
    summary: str
    needs: tuple[str, ...] = ()  # estimates consolidate() needs at task boundaries


CATALOG: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo(
            "ewc",
            "regularization",
            "transform",
            "Elastic weight consolidation: (lam/2) Σ F (θ − θ*)², diagonal Fisher per task.",
            needs=("fisher",),
        ),
        MethodInfo(
            "l2_anchor",
            "regularization",
            "transform",
            "L2 pull toward the previous task's parameters: (lam/2) ‖θ − θ*‖².",
        ),
        MethodInfo(
            "replay",
            "replay",
            "data",
            "Mix a ratio of earlier tasks' examples into the current stream (Grain op).",
        ),
    ]
}
