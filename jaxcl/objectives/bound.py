"""Objectives bound to a model: ``loss_fn(params, batch, frozen) -> (loss, metrics)``.

``frozen`` is a dict of non-trained parameter trees the objective declared in ``Objective.frozen``:
``"reference"`` (the parameters the stage started from, DPO's reference) or ``"task_start"`` (the
parameters at the start of the current task, for distillation-style terms). The trainer supplies
them, sharded like the policy and never donated.

Composite objectives (a weighted sum of terms: DPO, ORPO, LM, CPPO, KL, distillation) are built by
:func:`jaxcl.objectives.terms.compose_objective`; ``Objective`` also tells the trainer where the
reference comes from (``reference_checkpoint``) and which frozen tree's log-probs to precompute
into the examples instead of holding the tree during steps (``precompute``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxcl.objectives.chunked import DEFAULT_CHUNK, token_logps_of
from jaxcl.objectives.preference import LENGTH_AVERAGED_KINDS, dpo_loss, preference_metrics

Batch = dict[str, jax.Array]
PAIR = ("chosen", "rejected")
Metrics = dict[str, jax.Array]
FROZEN_KINDS = ("reference", "task_start")


@dataclass(frozen=True)
class Objective:
    loss_fn: Callable[[Any, Batch, dict[str, Any]], tuple[jax.Array, Metrics]]
    frozen: tuple[str, ...] = ()
    #: frozen trees whose sequence log-probs the trainer adds to each example once per dataset
    #: pass (:func:`jaxcl.objectives.reference.annotate_reference_logps`) instead of passing them
    precompute: tuple[str, ...] = ()
    #: a checkpoint (step folder) whose parameters fill ``frozen["reference"]`` instead of the
    #: parameters the stage starts from
    reference_checkpoint: str | None = None
    #: the names of the weighted terms, for logs
    terms: tuple[str, ...] = ()
    #: sequence positions per logits chunk (:mod:`jaxcl.objectives.chunked`; 0: whole logits)
    chunk: int = DEFAULT_CHUNK

    def scalar(self, frozen: dict[str, Any]) -> Callable[[Any, Batch], jax.Array]:
        """``loss(params, batch) -> scalar`` with ``frozen`` bound (for importance estimators)."""
        return lambda params, batch: self.loss_fn(params, batch, frozen)[0]


def lm_objective(apply: Callable[..., jax.Array], chunk: int = DEFAULT_CHUNK) -> Objective:
    """Masked causal-LM loss on ``batch = {tokens [B, L+1], loss_mask [B, L+1]}``:
    ``L = −Σ m log p(y) / max(1, Σ m)``, its logits taken ``chunk`` positions at a time
    (:mod:`jaxcl.objectives.chunked`; 0: whole)."""

    def loss_fn(params, batch: Batch, frozen) -> tuple[jax.Array, Metrics]:
        del frozen
        tokens = batch["tokens"]
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        logps = token_logps_of(apply, params, row_inputs(batch), tokens[:, 1:], chunk)
        loss = jnp.sum(-logps * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return loss, {"loss": loss}

    return Objective(loss_fn, chunk=chunk)


def pair_logps(
    apply, params, batch: Batch, chunk: int = DEFAULT_CHUNK
) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probs of the chosen and rejected sequences, in one forward pass."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    logps = token_logps_of(apply, params, tokens[:, :-1], tokens[:, 1:], chunk)
    logps = jnp.sum(logps * mask[:, 1:], axis=-1)
    half = batch["chosen_tokens"].shape[0]
    return logps[:half], logps[half:]


def dpo_objective(
    apply, *, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0
) -> Objective:
    """DPO against the frozen ``reference``; reports TRL's reward metrics. IPO sees
    length-averaged log-probs (:data:`~jaxcl.objectives.preference.LENGTH_AVERAGED_KINDS`).

    Kept for direct use; recipes compile through :func:`jaxcl.objectives.terms.compose_objective`.
    """

    def loss_fn(params, batch: Batch, frozen) -> tuple[jax.Array, Metrics]:
        chosen, rejected = pair_logps(apply, params, batch)
        ref_chosen, ref_rejected = jax.lax.stop_gradient(
            pair_logps(apply, frozen["reference"], batch)
        )
        if kind in LENGTH_AVERAGED_KINDS:
            n_c, n_r = (jnp.maximum(jnp.sum(batch[f"{s}_mask"][:, 1:], -1), 1.0) for s in PAIR)
            chosen, rejected, ref_chosen, ref_rejected = (
                chosen / n_c,
                rejected / n_r,
                ref_chosen / n_c,
                ref_rejected / n_r,
            )
        losses = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=beta,
            kind=kind,
            label_smoothing=label_smoothing,
        )
        loss = jnp.mean(losses)
        metrics = preference_metrics(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
        return loss, {"loss": loss, **metrics}

    return Objective(loss_fn, frozen=("reference",))


def row_inputs(batch: Batch, tokens: jax.Array | None = None) -> Any:
    """What a batch of rows feeds the model: ``tokens[:, :-1]``, or for packed rows (with
    ``segment_ids``) a dict adding their ``positions`` and ``segment_ids`` (attention kept
    inside each document, rotary positions restarting)."""
    tokens = batch["tokens"] if tokens is None else tokens
    if "segment_ids" not in batch:
        return tokens[:, :-1]
    return {
        "input_ids": tokens[:, :-1],
        "positions": batch["positions"][:, :-1],
        "segment_ids": batch["segment_ids"][:, :-1],
    }
