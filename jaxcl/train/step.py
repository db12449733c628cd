"""Train state, the model as a pure function, and the jitted train step."""

from __future__ import annotations

import functools
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
    :func:`jaxcl.objectives.bound.row_inputs`). It also has ``apply.hidden`` and ``apply.head``
    (:class:`jaxcl.objectives.chunked.ModelApply`), for losses over chunks of the logits."""
    from jaxcl.objectives.chunked import ModelApply

    return ModelApply(graphdef)


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
    compute_dtype: Any = None,
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
    With ``compute_dtype`` (``bfloat16``) the parameters stay float32 master weights: each step
    casts their floating leaves (and the frozen trees') to ``compute_dtype`` for the forward and
    backward passes, and the gradients (the cast's transpose), their micro-batch sums, the
    optimizer state and the updates stay float32 (``model.precision: bf16`` in a recipe).
    """

    split, join = partition or (lambda p: (p, {}), lambda t, f: t)
    cast = functools.partial(cast_floats, dtype=compute_dtype)

    def partial_loss(trainable, fixed, batch: Batch, frozen: dict):
        if compute_dtype is None:
            return loss_fn(join(trainable, fixed), batch, frozen)
        # master weights: the float32 tree cast for the forward and backward passes; the cast's
        # transpose brings each gradient back to float32 before accumulation and the optimizer
        return loss_fn(cast(join(trainable, fixed)), batch, cast(frozen))

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
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, frozen_shardings, memory_sharding),
        out_shardings=(state_shardings, state_shardings.step),  # metrics: replicated
        donate_argnums=0,
    )
    return traced_under_mesh(jitted, batch_sharding.mesh)


def traced_under_mesh(jitted: Callable, mesh: Any) -> Callable:
    """``jitted`` called (and so traced) with ``mesh`` in context (``jax.set_mesh``): a kernel
    that runs under ``shard_map`` (splash attention) needs the mesh while it is traced. The
    wrapper keeps ``lower`` for ahead-of-time compilation."""

    def call(*args: Any) -> Any:
        with jax.set_mesh(mesh):
            return jitted(*args)

    def lower(*args: Any) -> Any:
        with jax.set_mesh(mesh):
            return jitted.lower(*args)

    call.lower = lower  # type: ignore[attr-defined]
    return call


def cast_floats(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating-point leaves cast to ``dtype`` (others untouched)."""
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)

    def one(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x

    return jax.tree.map(one, tree)


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
