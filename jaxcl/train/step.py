"""Train state, objectives bound to a model, and the jitted train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxcl.objectives import causal_lm_loss, dpo_loss, dpo_rewards, sequence_logps

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
    step: jax.Array
    params: optax.Params
    opt_state: optax.OptState


def make_apply(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``apply(params, input_ids, **kw) -> logits``: the NNX model used as a pure function."""

    def apply(params: optax.Params, input_ids: jax.Array, **kwargs: Any) -> jax.Array:
        return nnx.merge(graphdef, params)(input_ids, **kwargs)

    return apply


def lm_objective(apply: Callable[..., jax.Array]):
    """Masked causal-LM loss on ``batch = {tokens [B, L+1], loss_mask [B, L+1]}``."""

    def loss_fn(params: optax.Params, batch: Batch) -> tuple[jax.Array, Metrics]:
        tokens = batch["tokens"]
        logits = apply(params, tokens[:, :-1])
        loss = causal_lm_loss(logits, tokens[:, 1:], batch["loss_mask"][:, 1:])
        return loss, {"loss": loss}

    return loss_fn


def pair_logps(apply, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probs of the chosen and rejected sequences, in one forward pass."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    logps = sequence_logps(apply(params, tokens[:, :-1]), tokens[:, 1:], mask[:, 1:])
    half = batch["chosen_tokens"].shape[0]
    return logps[:half], logps[half:]


def dpo_objective(apply, *, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0):
    """DPO against a frozen reference: ``loss_fn(params, batch, ref_params)``.

    Reports TRL's metrics: chosen/rejected rewards, their margin and the reward accuracy.
    """

    def loss_fn(params, batch: Batch, ref_params) -> tuple[jax.Array, Metrics]:
        chosen, rejected = pair_logps(apply, params, batch)
        ref_chosen, ref_rejected = jax.lax.stop_gradient(pair_logps(apply, ref_params, batch))
        losses = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=beta,
            kind=kind,
            label_smoothing=label_smoothing,
        )
        r_chosen = dpo_rewards(chosen, ref_chosen, beta=beta)
        r_rejected = dpo_rewards(rejected, ref_rejected, beta=beta)
        loss = jnp.mean(losses)
        return loss, {
            "loss": loss,
            "rewards/chosen": jnp.mean(r_chosen),
            "rewards/rejected": jnp.mean(r_rejected),
            "rewards/margin": jnp.mean(r_chosen - r_rejected),
            "rewards/accuracy": jnp.mean((r_chosen > r_rejected).astype(jnp.float32)),
        }

    return loss_fn


def make_train_step(
    loss_fn: Callable[..., tuple[jax.Array, Metrics]],
    tx: optax.GradientTransformationExtraArgs,
    *,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    aux_shardings: tuple[Any, ...] = (),
):
    """``step(state, batch, *aux) -> (state, metrics)``, jitted with the state donated.

    ``aux`` are extra, non-differentiated inputs of the objective (the DPO reference params).
    Metrics include the loss, the global gradient norm and the learning-rate-free update norm.
    """

    def step(state: TrainState, batch: Batch, *aux: Any) -> tuple[TrainState, Metrics]:
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, *aux)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return TrainState(state.step + 1, params, opt_state), metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, *aux_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )


def state_shardings_for(tx, params, param_shardings, replicated) -> TrainState:
    """Shardings of a whole :class:`TrainState`: every parameter-shaped leaf of the optimizer
    state (moments, EWC anchors and Fishers...) follows its parameter; scalars are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(replicated, param_shardings, opt_shardings)
