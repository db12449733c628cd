"""The method catalog: every method a recipe can name, with its family and one line of help."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    kind: str  # "transform" (optax), "data" (Grain op), "objective" or "function"
    summary: str
    needs: tuple[str, ...] = ()  # estimates consolidate() needs at task boundaries


CATALOG: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo(
            "l2_anchor",
            "regularization",
            "transform",
            "L2 pull toward the previous task's parameters: (lam/2) ‖θ − θ*‖².",
        ),
        MethodInfo(
            "ewc",
            "regularization",
            "transform",
            "EWC: (lam/2) Σ F (θ − θ*)², diagonal Fisher; decay < 1 is online EWC.",
            needs=("fisher",),
        ),
        MethodInfo(
            "mas",
            "regularization",
            "transform",
            "Memory-aware synapses: (lam/2) Σ Ω (θ − θ*)², Ω = E|∂‖f(x)‖²/∂θ| (label-free).",
            needs=("mas_importance",),
        ),
        MethodInfo(
            "si",
            "regularization",
            "transform",
            "Synaptic intelligence: importance from the online path integral −Σ g·Δθ, damped.",
        ),
        MethodInfo(
            "recadam",
            "regularization",
            "transform",
            "RecAdam: λ(t) L + (1−λ(t)) (γ/2) ‖θ − θ*‖², recall term outside Adam.",
        ),
        MethodInfo(
            "agem",
            "projection",
            "transform",
            "A-GEM: project g off the replay gradient g_ref when g·g_ref < 0.",
        ),
        MethodInfo(
            "ogd",
            "projection",
            "transform",
            "Orthogonal gradient descent: remove an orthonormal basis of old gradients, per leaf.",
            needs=("ogd_grads",),
        ),
        MethodInfo(
            "gpm",
            "projection",
            "transform",
            "Gradient projection memory: g ← (I − UUᵀ) g, U spans old layer inputs (energy ε).",
            needs=("gpm_covariance",),
        ),
        MethodInfo(
            "o_lora",
            "projection",
            "transform",
            "O-LoRA: lam Σ |A_oldᵀ A| keeps each task's LoRA A orthogonal to earlier ones.",
        ),
        MethodInfo(
            "freeze",
            "isolation",
            "transform",
            "Freeze the leaves a path regex selects (mask behind the optimizer).",
        ),
        MethodInfo(
            "packnet",
            "isolation",
            "transform",
            "PackNet: prune free weights by magnitude per task, fix the rest (mask behind).",
        ),
        MethodInfo(
            "soft_mask",
            "isolation",
            "transform",
            "DAS-style soft mask: u ← u ⊙ (1 − |tanh(norm. importance)|), max over tasks.",
            needs=("soft_mask_importance",),
        ),
        MethodInfo(
            "replay",
            "replay",
            "data",
            "Mix a ratio of earlier tasks' examples into the current stream (Grain op).",
        ),
        MethodInfo(
            "interpolate",
            "weights",
            "function",
            "Model averaging / interpolation (1 − α) θ_a + α θ_b; average(trees, weights).",
        ),
        MethodInfo(
            "elastic_reset",
            "weights",
            "function",
            "EMA θ̄ ← dθ̄ + (1−d)θ, and elastic reset (θ, θ̄) ← (θ̄, θ₀).",
        ),
        MethodInfo(
            "task_arithmetic",
            "weights",
            "function",
            "Task-arithmetic merge θ_base + Σ λ_i (θ_i − θ_base).",
        ),
    ]
}
