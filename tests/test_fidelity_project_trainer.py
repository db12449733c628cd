"""A-GEM through the trainer's chain and step on the built-in micro decoder: the update the
recipe's optimizer applies does not raise the memory loss to first order (issue 12's acceptance).
The unit-level oracles are in ``test_fidelity_project.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcl import methods
from jaxcl.methods.project import AgemSpec
from jaxcl.models.config import preset
from jaxcl.models.llama import Decoder
from jaxcl.objectives.bound import lm_objective
from jaxcl.recipe import OptimizerSpec
from jaxcl.train.optim import build_chain
from jaxcl.train.step import TrainState, make_apply, make_train_step


def test_agem_through_the_trainer_does_not_raise_the_memory_loss_to_first_order():
    """The recipe's chain (build_chain: clip, AdamW with weight decay, A-GEM behind it) and the
    jitted train step on the built-in micro decoder, trained on task A, then on task B with A as
    the memory: at every step, with g_ref the gradient of the memory batch's loss at the step's
    parameters θ and u the change the step made, d/ds L_mem(θ + s u)|₀ = g_ref·u ≤ 0 (round-off
    aside). The paper's gradient-side placement, under the same AdamW, breaks it."""
    model = Decoder(preset("test-micro"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params0 = nnx.to_pure_dict(state)
    objective = lm_objective(make_apply(graphdef))
    rng = np.random.default_rng(7)

    def batch(lo, hi):
        return {
            "tokens": jnp.asarray(rng.integers(lo, hi, size=(4, 13)), jnp.int32),
            "loss_mask": jnp.ones((4, 13), jnp.float32),
        }

    task_a = [batch(150, 250) for _ in range(4)]
    task_b = [batch(3, 100) for _ in range(6)]

    def loss(p, b):
        return objective.loss_fn(p, b, {})[0]

    @jax.jit
    def probe(before, after, m):
        """g_ref·u (= d/ds L_mem(θ + s u) at s = 0) and ‖g_ref‖·‖u‖."""
        u = jax.tree.map(lambda a, c: a - c, after, before)
        ref = jax.grad(loss)(before, m)
        return methods._tree.vdot(ref, u), optax.tree.norm(ref) * optax.tree.norm(u)

    spec = OptimizerSpec(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1)
    steps = {}
    for project in ("gradient", "update"):
        tx, compiled = build_chain(spec, 6, [AgemSpec(name="agem", project=project)])
        assert compiled.needs_memory_grads and len(compiled.behind) == (project == "update")
        steps[project] = (tx, make_train_step(objective.loss_fn, tx, memory_grads=True))
    tx, step = steps["gradient"]
    st = TrainState(jnp.int32(0), jax.tree.map(jnp.array, params0), tx.init(params0))
    for i in range(12):  # task A; the batch as its own memory: g·g ≥ 0, plain AdamW
        st, _ = step(st, task_a[i % 4], {}, task_a[i % 4])
    after_a = st.params
    figures = {}
    for project, (tx, step) in steps.items():
        st = TrainState(jnp.int32(0), jax.tree.map(jnp.array, after_a), tx.init(after_a))
        rows = []
        for b, m in zip(task_b, task_a + task_a):
            before = jax.tree.map(jnp.array, st.params)
            st, _ = step(st, b, {}, m)
            rows.append([float(x) for x in probe(before, st.params, m)])
        figures[project] = np.array(rows)
    old, new = figures["gradient"], figures["update"]
    cos = (new[:, 0] / new[:, 1]).max()
    print(
        f"trainer A-GEM g_ref·u per step: gradient form {np.round(old[:, 0], 4).tolist()}; "
        f"update form {np.round(new[:, 0], 9).tolist()} (max cos {cos:.1e})"
    )
    assert (new[:, 0] <= 1e-6 * new[:, 1]).all()  # ≤ 0 up to float32 round-off
    assert old[:, 0].max() > 0.01 and (old[:, 0] / old[:, 1]).max() > 0.05
