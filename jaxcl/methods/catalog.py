"""The method catalog: every method a recipe can name, with its family and one line of help.

One entry per recipe method (:func:`jaxcl.methods.specs.method_names`); ``jaxcl methods`` prints
it. The pure weight-space functions (``interpolate``, ``ema``, ``task_vector``...) are library
functions, documented in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    kind: str  # "transform" (optax), "data" (a memory mixed into batches) or "hooks" (weights)
    summary: str
    needs: tuple[str, ...] = ()  # estimates consolidate() needs at task boundaries


CATALOG: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo(
            "ewc",
            "regularization",
            "transform",
            "EWC: Σ_t (lam/2) Σ F_t (θ − θ*_t)², per-example Fisher of each task's own examples "
            "in 2 buffers; decay < 1: online EWC.",
            needs=("fisher",),
        ),
        MethodInfo(
            "l2_anchor",
            "regularization",
            "transform",
            "L2 pull toward the last task's end point: (lam/2) ‖θ − θ*‖².",
        ),
        MethodInfo(
            "mas",
            "regularization",
            "transform",
            "MAS: lam Σ Ω (θ − θ*)², Ω = per-example mean |∂‖f(x)‖²/∂θ| (label-free), summed "
            "over tasks.",
            needs=("mas_importance",),
        ),
        MethodInfo(
            "si",
            "regularization",
            "transform",
            "Synaptic intelligence: c Σ Ω (θ − θ*)², Ω from the online path integral −Σ g·Δθ "
            "(pathint's clamp).",
        ),
        MethodInfo(
            "recadam",
            "regularization",
            "transform",
            "RecAdam, right behind AdamW: Adam's step × λ(t), recall −η(1 − λ(t))γ(θ − θ*), "
            "weight decay unscaled.",
        ),
        MethodInfo(
            "agem",
            "projection",
            "transform",
            "A-GEM: AdamW's final update projected so it cannot raise the replay-batch loss to "
            "first order.",
        ),
        MethodInfo(
            "gem",
            "projection",
            "transform",
            "GEM: AdamW's final update projected, by GEM's dual QP solved exactly, so that it "
            "raises no earlier task's memory loss to first order.",
        ),
        MethodInfo(
            "ogd",
            "projection",
            "transform",
            "OGD: final update orthogonal, over the whole parameter vector, to per-example "
            "output gradients of finished tasks.",
            needs=("ogd_grads",),
        ),
        MethodInfo(
            "gpm",
            "projection",
            "transform",
            "GPM: final update ← (I − UUᵀ)·, U spans earlier tasks' layer inputs (energy ε); "
            "lookups and tied head too.",
            needs=("gpm_covariance",),
        ),
        MethodInfo(
            "o_lora",
            "projection",
            "transform",
            "O-LoRA: lam Σ |A_oldᵀ A| keeps each task's LoRA A orthogonal to earlier tasks' "
            "(a stage with lora:).",
        ),
        MethodInfo(
            "freeze",
            "isolation",
            "transform",
            "Freeze the leaves a path regex selects: their final update is zeroed (behind AdamW).",
        ),
        MethodInfo(
            "packnet",
            "isolation",
            "transform",
            "PackNet: train, prune by magnitude per layer, retrain, fix; each task scored with "
            "its own mask.",
        ),
        MethodInfo(
            "soft_mask",
            "isolation",
            "transform",
            "DAS soft mask: updates of heads and FFN neurons × (1 − Î), Î from unit importance "
            "incl. the starting model's.",
            needs=("soft_mask_importance",),
        ),
        MethodInfo(
            "replay",
            "replay",
            "data",
            "Replay: a reservoir of finished tasks' examples mixed into later batches; pseudo: "
            "LAMOL's generated examples.",
        ),
        MethodInfo(
            "ssr",
            "replay",
            "data",
            "SSR: after each task the base model writes inputs in context, K-means keeps a "
            "diverse subset, the latest model writes outputs; replayed later.",
        ),
        MethodInfo(
            "ema",
            "weight space",
            "hooks",
            "EMA of the weights after every step; tasks scored and the stage exported with it "
            "(options).",
        ),
        MethodInfo(
            "elastic_reset",
            "weight space",
            "hooks",
            "Elastic Reset: EMA each step; every n steps the weights ← EMA and the EMA ← the "
            "initial weights.",
        ),
        MethodInfo(
            "average",
            "weight space",
            "hooks",
            "Model averaging at each task end: (1 − α) θ_task_start + α θ, or the running mean "
            "of task-end weights.",
        ),
        MethodInfo(
            "task_arithmetic",
            "weight space",
            "hooks",
            "Task arithmetic: each task fine-tuned from the stage start; θ_b + λ Σ τ_t at the "
            "stage end.",
        ),
        MethodInfo(
            "hma",
            "weight space",
            "hooks",
            "HMA: per-layer-group merge α_k θ₀ + (1 − α_k) θ, ratios learned (or fixed), at the "
            "stage end (or each task's).",
        ),
        MethodInfo(
            "ties",
            "weight space",
            "hooks",
            "TIES-Merging of per-task fine-tunes from the stage start: trim each τ_t to its top "
            "density, elect signs, disjoint mean; θ_b + λ τ_m at the stage end.",
        ),
        MethodInfo(
            "dare",
            "weight space",
            "hooks",
            "DARE: each task vector dropped at rate p and rescaled by 1/(1 − p) (seeded), then "
            "task arithmetic or TIES at the stage end.",
        ),
        MethodInfo(
            "copr",
            "alignment",
            "transform",
            "COPR: fit each pair's optimal policy softmax(log π_{t-1} + Adv/β) (+ SFT); stored "
            "targets of earlier tasks kept as constraints, multipliers by dual ascent.",
        ),
        MethodInfo(
            "block_expansion",
            "isolation",
            "transform",
            "LLaMA Pro: train only the identity blocks model.expand inserted (zeroed o/down) "
            "after every k-th block; the rest bit-identical.",
        ),
        MethodInfo(
            "new_tokens",
            "isolation",
            "transform",
            "Vocabulary expansion: train only the rows of the tokens model.add_tokens added "
            "(mean of sub-token rows at start); old rows and every block bit-identical.",
        ),
        MethodInfo(
            "inflora",
            "isolation",
            "transform",
            "InfLoRA: per-task LoRA whose A is designed from the task's inputs outside the "
            "earlier tasks' subspace (DualGPM) and fixed; only B trains, folded after the task.",
        ),
        MethodInfo(
            "moe_lora",
            "isolation",
            "transform",
            "MoE-LoRA: LoRA experts (model.moe_lora) mixed per token by a learned router, one "
            "expert added per task (earlier frozen) or a pool; load-balancing term.",
        ),
        MethodInfo(
            "demix",
            "isolation",
            "transform",
            "DEMix: one FFN expert per domain (model.demix), only the new one trained; scored "
            "by the posterior mixture of experts (domain inferred, cached prior).",
        ),
        MethodInfo(
            "soft_prompt",
            "isolation",
            "transform",
            "Prompt tuning (Lester et al.): one soft prompt per task (model.prompts) prepended, "
            "base frozen; task i scored with its own prompt.",
        ),
        MethodInfo(
            "progressive_prompts",
            "isolation",
            "transform",
            "Progressive Prompts: a new prompt per task, [P_t; …; P_0; x], earlier prompts "
            "frozen; earlier tasks' outputs bit-identical.",
        ),
        MethodInfo(
            "l2p",
            "isolation",
            "transform",
            "L2P: a prompt pool with keys; top-k prompts by cos(query, key) prepended, keys "
            "pulled by λ Σ (1 − cos); task inferred.",
        ),
        MethodInfo(
            "sapt",
            "isolation",
            "transform",
            "SAPT: a LoRA block per task (model.sapt), mixed by input attention over the "
            "blocks; attentive reflection (KL) on finished tasks' pseudo-samples.",
        ),
    ]
}
