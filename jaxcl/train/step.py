"""Train state, the model as a pure function, and the jitted train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxcl import methods

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
    step: jax.Array
    params: optax.Params
    opt_state: optax.OptState


def make_apply(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``apply(params, input_ids, **kw) -> logits``: the NNX model used as a pure function;
    ``input_ids`` may be a dict of ``input_ids``, ``positions`` and ``segment_ids`` (packed rows,
    :func:`jaxcl.objectives.bound.row_inputs`)."""

    def apply(params: optax.Params, input_ids: Any, **kwargs: Any) -> jax.Array:
        if isinstance(input_ids, dict):  # packed rows: ids with their positions and segments
            return nnx.merge(graphdef, params)(**input_ids, **kwargs)
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
    memory_per_task: bool = False,
    accum_steps: int = 1,
    partition: tuple[Callable, Callable] | None = None,
):
    """``step(state, batch, frozen, memory) -> (state, metrics)``, jitted, the state donated.

    ``partition = (split, join)`` trains part of the parameters: ``split(params) -> (trainable,
    fixed)``; the loss is differentiated with respect to ``trainable`` only and the optimizer
    state covers only it (LoRA: the adapters; see :mod:`jaxcl.train.adapters`).

    ``frozen`` is the dict of non-trained parameter trees the objective reads (see
    :mod:`jaxcl.objectives.bound`). With ``memory_grads=True`` the gradient of the objective on
    the ``memory`` batch (examples of earlier tasks) reaches the chain as the extra argument
    ``memory_grads`` (A-GEM); with ``memory_per_task`` too, ``memory`` holds one batch per
    earlier task (leaves ``[tasks, batch, ...]``) and ``memory_grads`` one gradient per task
    (leaves ``[tasks, *param.shape]``, a ``lax.map``: one task's activations live at a time,
    but the ``T`` gradients are stacked, ``T × P`` of gradient memory per step for ``T`` earlier
    tasks and ``P`` trainable parameters; GEM, COPR); otherwise ``memory`` is ignored and may be
    ``None``.
    With ``accum_steps > 1`` the batch is split into that many micro-batches whose gradients and
    metrics are averaged (each micro-batch's loss is its own mean, as in most LLM trainers).
    Metrics include the objective's, and the global gradient norm.
    """

    split, join = partition or (lambda p: (p, {}), lambda t, f: t)

    def partial_loss(trainable, fixed, batch: Batch, frozen: dict):
        return loss_fn(join(trainable, fixed), batch, frozen)

    value_and_grad = jax.value_and_grad(partial_loss, has_aux=True)

    def single(params, batch: Batch, frozen: dict) -> tuple[Metrics, Any]:
        (_, metrics), grads = value_and_grad(*split(params), batch, frozen)
        return metrics, grads

    def grad_fn(params, batch: Batch, frozen: dict) -> tuple[Metrics, Any]:
        """Metrics and gradients, averaged over ``accum_steps`` micro-batches (a scan, so the
        activations of one micro-batch are live at a time)."""
        if accum_steps == 1:
            return single(params, batch, frozen)
        micro = jax.tree.map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch
        )

        def body(total, one):
            return jax.tree.map(jnp.add, total, single(params, one, frozen)), None

        shapes = jax.eval_shape(single, params, jax.tree.map(lambda x: x[0], micro), frozen)
        total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, shapes), micro)
        return jax.tree.map(lambda x: x / accum_steps, total)

    def step(state: TrainState, batch: Batch, frozen: dict, memory: Batch | None):
        metrics, grads = grad_fn(state.params, batch, frozen)
        extra = {}
        if memory_grads and memory_per_task:
            extra["memory_grads"] = jax.lax.map(
                lambda one: grad_fn(state.params, one, frozen)[1], memory
            )
        elif memory_grads:
            extra["memory_grads"] = grad_fn(state.params, memory, frozen)[1]
        trainable, fixed = split(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, trainable, **extra)
        params = join(optax.apply_updates(trainable, updates), fixed)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return TrainState(state.step + 1, params, opt_state), metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    memory_sharding = None
    if memory_grads:
        memory_sharding = per_task_sharding(batch_sharding) if memory_per_task else batch_sharding
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, frozen_shardings, memory_sharding),
        out_shardings=(state_shardings, state_shardings.step),  # metrics: replicated
        donate_argnums=0,
    )


def per_task_sharding(batch_sharding: Any) -> Any:
    """A batch sharding with an unsharded leading task axis (``[tasks, batch, ...]``)."""
    if batch_sharding is None:
        return None
    spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
    return jax.sharding.NamedSharding(batch_sharding.mesh, spec)


def state_shardings_for(
    tx, params, param_shardings, replicated, split: Callable | None = None
) -> TrainState:
    """Shardings of a whole :class:`TrainState`: every parameter-shaped leaf of the optimizer
    state (moments, EWC anchors and Fishers, GPM bases...) follows its parameter's mesh axes;
    scalars are replicated (see :func:`jaxcl.methods.state_shardings`). With ``split`` the
    optimizer state covers only the trainable part of the parameters."""
    split = split or (lambda p: (p, {}))
    trainable, trainable_shardings = split(params)[0], split(param_shardings)[0]
    opt = methods.state_shardings(tx, trainable, trainable_shardings, replicated)
    return TrainState(replicated, param_shardings, opt)
