"""The jitted train step: gradient accumulation, memory gradients, learning-rate schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcl.models.config import preset
from jaxcl.models.llama import Decoder
from jaxcl.objectives.bound import lm_objective
from jaxcl.recipe import OptimizerSpec
from jaxcl.train.optim import lr_schedule
from jaxcl.train.step import TrainState, make_apply, make_train_step


def _setup():
    model = Decoder(preset("test-micro"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": jnp.asarray(rng.integers(3, 300, size=(8, 17)), jnp.int32),
        "loss_mask": jnp.ones((8, 17), jnp.float32),  # equal token counts per micro-batch
    }
    return make_apply(graphdef), params, batch


def test_gradient_accumulation_equals_the_full_batch_step():
    apply, params, batch = _setup()
    objective = lm_objective(apply)
    tx = optax.sgd(0.5)  # the update is the gradient itself, so this compares gradients
    results = []
    for accum in (1, 2, 4):
        step = make_train_step(objective.loss_fn, tx, accum_steps=accum)
        copy = jax.tree.map(jnp.array, params)
        state, metrics = step(TrainState(jnp.int32(0), copy, tx.init(copy)), batch, {}, None)
        results.append((state.params, float(metrics["loss"])))
    for other, loss in results[1:]:
        assert loss == pytest.approx(results[0][1], rel=1e-6)
        for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][0]))
    ]
    assert all(moved)


def test_memory_grads_reach_the_chain():
    """A transform that replaces the update by ``memory_grads``: with SGD(1) the parameters move
    by exactly the gradient on the memory batch."""
    apply, params, batch = _setup()
    objective = lm_objective(apply)
    memory = {k: v[:4] for k, v in batch.items()}
    expected = jax.grad(lambda p: objective.loss_fn(p, memory, {})[0])(params)

    def use_memory(updates, state, params=None, *, memory_grads=None, **_):
        return memory_grads, state

    spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), use_memory)
    tx = optax.chain(spy, optax.sgd(1.0))
    step = make_train_step(objective.loss_fn, tx, memory_grads=True)
    start = jax.tree.map(jnp.array, params)
    state, _ = step(TrainState(jnp.int32(0), start, tx.init(start)), batch, {}, memory)
    moved = jax.tree.map(lambda a, b: a - b, params, state.params)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_warms_up_then_decays(schedule):
    spec = OptimizerSpec(lr=1.0, warmup_steps=4, schedule=schedule, end_lr_factor=0.1)
    f = lr_schedule(spec, total_steps=20)
    assert float(f(0)) == pytest.approx(0.25) and float(f(4)) == pytest.approx(1.0)
    end = float(f(20))
    assert end == pytest.approx(1.0 if schedule == "constant" else 0.1, rel=1e-5)


def test_rewarm_per_task_restarts_the_schedule():
    spec = OptimizerSpec(
        lr=1.0, warmup_steps=2, schedule="linear", end_lr_factor=0.0, rewarm="task"
    )
    f = lr_schedule(spec, total_steps=30, task_steps=10)
    first = [float(f(k)) for k in range(10)]
    assert [float(f(k)) for k in range(10, 20)] == pytest.approx(first)
    assert first[0] == pytest.approx(0.5) and first[2] == pytest.approx(1.0) and first[9] < 0.2
    whole = lr_schedule(spec.model_copy(update={"rewarm": "stage"}), 30, 10)
    assert float(whole(10)) > 0.5  # one schedule over the stage: no restart at step 10


def _nodes(tree, kind):
    return [
        s
        for s in jax.tree.leaves(tree, is_leaf=lambda s: isinstance(s, kind))
        if isinstance(s, kind)
    ]


def test_restarted_moments_make_the_next_update_adams_first_step():
    """`optimizer.moments: task`: after `restart_moments`, AdamW's next update is
    -lr_t · g/(|g| + eps) per coordinate (Adam's first step), at the schedule's current position;
    the schedule count and the CL state (EWC's anchor and Fisher) are untouched."""
    from jaxcl.methods import consolidate
    from jaxcl.methods.regularize import EwcState
    from jaxcl.methods.specs import EwcSpec
    from jaxcl.train.optim import build_chain, restart_moments

    spec = OptimizerSpec(lr=0.1, warmup_steps=0, schedule="linear", end_lr_factor=0.0)
    tx, _ = build_chain(spec, 20, [EwcSpec(name="ewc", lam=0.0)], 10)
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3)}
    state = tx.init(params)
    rng = np.random.default_rng(1)
    for _ in range(5):
        g = {"w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    state = consolidate(state, params=params, fisher={"w": jnp.full((2, 3), 2.0)})
    fresh = restart_moments(state)
    (adam,) = _nodes(fresh, optax.ScaleByAdamState)
    assert int(adam.count) == 0 and not np.any(adam.mu["w"]) and not np.any(adam.nu["w"])
    (schedule,) = _nodes(fresh, optax.ScaleByScheduleState)
    assert int(schedule.count) == 5
    (ewc_before,), (ewc_after,) = _nodes(state, EwcState), _nodes(fresh, EwcState)
    np.testing.assert_array_equal(ewc_after.anchor["w"], ewc_before.anchor["w"])
    np.testing.assert_array_equal(ewc_after.fisher["w"], np.full((2, 3), 2.0))
    g = {"w": jnp.asarray([[1.0, -2.0, 0.5], [-0.1, 3.0, -4.0]])}
    updates, _ = tx.update(g, fresh, params)
    lr_now = 0.1 * (1 - 5 / 20)  # linear decay after 5 of 20 steps: the schedule kept its place
    np.testing.assert_allclose(updates["w"], -lr_now * np.sign(g["w"]), rtol=1e-5)
