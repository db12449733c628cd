"""Train state, the model as a pure function, and the jitted train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from flax import nnx

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


def make_train_step(
    loss_fn: Callable[..., tuple[jax.Array, Metrics]],
    tx: optax.GradientTransformationExtraArgs,
    *,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    frozen_shardings: Any = None,
    memory_grads: bool = False,
):
    """``step(state, batch, frozen, memory) -> (state, metrics)``, jitted, the state donated.

    ``frozen`` is the dict of non-trained parameter trees the objective reads (see
    :mod:`jaxcl.objectives.bound`). With ``memory_grads=True`` the gradient of the objective on
    the ``memory`` batch (examples of earlier tasks) reaches the chain as the extra argument
    ``memory_grads`` (A-GEM); otherwise ``memory`` is ignored and may be ``None``.
    Metrics include the objective's, and the global gradient norm.
    """

    def step(state: TrainState, batch: Batch, frozen: dict, memory: Batch | None):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, batch, frozen)
        extra = {}
        if memory_grads:
            extra["memory_grads"] = grad_fn(state.params, memory, frozen)[1]
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return TrainState(state.step + 1, params, opt_state), metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    memory_sharding = batch_sharding if memory_grads else None
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, frozen_shardings, memory_sharding),
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
