"""GEM (Lopez-Paz & Ranzato, 2017) against independent solvers and its own promise.

Reference read (not copied): facebookresearch/GradientEpisodicMemory ``model/gem.py``:
``project2cone2`` solves the dual ``min ½ vᵀ(G Gᵀ)v + (G g)ᵀ v, v ≥ margin`` with quadprog
(``memory_strength`` the margin) and returns ``Gᵀ v + g``, only when some ``g·g_k < 0``.

The oracle is scipy, at test time only: ``scipy.optimize.nnls`` (Lawson-Hanson) on
``min_{v ≥ 0} ‖Gᵀ v + g‖²``, the dual as least squares, and ``scipy.optimize.minimize`` (L-BFGS-B
with bounds) on the margin form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

scipy_optimize = pytest.importorskip("scipy.optimize")

from jaxcl import methods  # noqa: E402
from jaxcl.methods.gem import GemSpec, gem_project, solve_gem_dual  # noqa: E402
from jaxcl.methods.specs import compile_methods  # noqa: E402

SHAPES = {"w": (5, 3), "b": (3,), "layers": {"k": (2, 4, 3)}}  # 41 numbers


def _tree(rng, lead=()):
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=(*lead, *s)), jnp.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _flat(tree, lead=0) -> np.ndarray:
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    if lead:
        return np.concatenate([x.reshape(lead, -1) for x in leaves], axis=1)
    return np.concatenate([x.ravel() for x in leaves])


def _conflicting(rng, t):
    """A gradient and ``t`` memory gradients, at least one at odds with it."""
    while True:
        g, mem = _tree(rng), _tree(rng, (t,))
        if (_flat(mem, t) @ _flat(g) < 0).any():
            return g, mem


@pytest.mark.parametrize("t", [2, 3, 5, 8])
def test_dual_solution_equals_scipy_nnls_and_every_constraint_holds(t):
    rng = np.random.default_rng(t)
    for _ in range(4):
        g, mem = _conflicting(rng, t)
        G, x = _flat(mem, t), _flat(g)
        want, _ = scipy_optimize.nnls(G.T, -x)
        got = np.asarray(solve_gem_dual(jnp.asarray(G @ G.T), jnp.asarray(G @ x)), np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
        projected = _flat(gem_project(g, mem))
        np.testing.assert_allclose(projected, x + G.T @ want, rtol=1e-4, atol=1e-4)
        dots = G @ projected
        assert (dots >= -1e-4 * np.linalg.norm(G, axis=1) * np.linalg.norm(projected)).all()
        # the primal problem solved independently (SLSQP on min ‖x̃ − x‖² s.t. G x̃ ≥ 0): the same x̃
        primal = scipy_optimize.minimize(
            lambda z, x=x: 0.5 * np.sum((z - x) ** 2),
            x,
            jac=lambda z, x=x: z - x,
            constraints=[{"type": "ineq", "fun": lambda z, G=G: G @ z, "jac": lambda z, G=G: G}],
            method="SLSQP",
            options={"ftol": 1e-12, "maxiter": 500},
        )
        assert primal.success, primal.message
        np.testing.assert_allclose(projected, primal.x, rtol=1e-3, atol=1e-3)


def test_margin_form_equals_a_bounded_scipy_solve():
    rng = np.random.default_rng(11)
    t, margin = 4, 0.5
    g, mem = _conflicting(rng, t)
    G, x = _flat(mem, t), _flat(g)
    M, b = G @ G.T, G @ x

    def f(v):
        return 0.5 * v @ M @ v + b @ v, M @ v + b

    res = scipy_optimize.minimize(
        f,
        np.full(t, margin),
        jac=True,
        bounds=[(margin, None)] * t,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000},
    )
    got = np.asarray(solve_gem_dual(jnp.asarray(M), jnp.asarray(b), margin), np.float64)
    np.testing.assert_allclose(got, res.x, rtol=1e-3, atol=1e-3)
    assert got.min() >= margin - 1e-6


def test_no_conflict_leaves_the_gradient_as_it_is():
    rng = np.random.default_rng(3)
    g = _tree(rng)
    mem = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), g)  # both aligned with g
    out = gem_project(g, mem, margin=0.5)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("project", ["gradient", "update"])
def test_one_earlier_task_is_agem(project):
    """With one memory gradient GEM's projection is A-GEM's, on either side of the optimizer."""
    rng = np.random.default_rng(5)
    a, b = methods.gem(project=project), methods.agem(project=project)
    for _ in range(6):
        x, ref = _tree(rng), _tree(rng)
        stacked = jax.tree.map(lambda r: r[None], ref)
        got, _ = a.update(x, a.init(x), None, memory_grads=stacked)
        want, _ = b.update(x, b.init(x), None, memory_grads=ref)
        np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-5, atol=1e-6)


def test_update_form_keeps_the_adamw_update_off_every_memory_gradient():
    """Behind AdamW (the default) the applied update u has u·g_k ≤ 0 for every earlier task."""
    rng = np.random.default_rng(9)
    params = _tree(rng)
    tx = methods.chain(optax.adamw(1e-2, weight_decay=0.1), methods.gem())
    state = tx.init(params)
    for _ in range(5):
        g, mem = _conflicting(rng, 3)
        u, state = tx.update(g, state, params, memory_grads=mem)
        dots = _flat(mem, 3) @ _flat(u)
        assert (dots <= 1e-6 * np.abs(_flat(u)).sum()).all(), dots
        params = optax.apply_updates(params, u)


def test_a_margin_behind_adamw_is_refused():
    """γ·g_k is a raw gradient: behind AdamW (project: update) it would skip the learning rate."""
    with pytest.raises(ValueError, match="project='gradient'"):
        methods.gem(0.5)
    with pytest.raises(ValueError, match="margin > 0 needs project: gradient"):
        GemSpec(name="gem", margin=0.5)
    assert GemSpec(name="gem", margin=0.5, project="gradient").margin == 0.5


def test_stage_limits_and_spec():
    spec = GemSpec(name="gem")
    compiled = compile_methods([spec])
    assert compiled.needs_memory_grads and compiled.memory_grads_per_task
    spec.check_stage(n_tasks=13, lora=None)
    with pytest.raises(ValueError, match="at most 13 tasks per stage"):
        spec.check_stage(n_tasks=14, lora=None)


def test_per_task_memory_gradients_in_the_train_step():
    """``memory_per_task``: the step hands GEM one gradient per task batch (a lax.map), each
    equal to the gradient of that batch alone."""
    from jaxcl.models.config import preset
    from jaxcl.models.llama import Decoder
    from jaxcl.objectives.bound import lm_objective
    from jaxcl.train.step import TrainState, make_apply, make_train_step

    model = Decoder(preset("test-micro"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    objective = lm_objective(make_apply(graphdef))
    rng = np.random.default_rng(0)

    def batch():
        return {
            "tokens": jnp.asarray(rng.integers(3, 250, size=(2, 9)), jnp.int32),
            "loss_mask": jnp.ones((2, 9), jnp.float32),
        }

    def pick(i):
        """A transform whose update is the step's i-th memory gradient (so params + it)."""

        def update(updates, state, params=None, *, memory_grads=None, **_):
            return jax.tree.map(lambda m: m[i], memory_grads), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    tasks = [batch(), batch(), batch()]
    memory = {k: jnp.stack([b[k] for b in tasks]) for k in tasks[0]}
    for i in (0, 2):
        step = make_train_step(objective.loss_fn, pick(i), memory_grads=True, memory_per_task=True)
        st = TrainState(jnp.int32(0), jax.tree.map(jnp.array, params), optax.EmptyState())
        st, _ = step(st, batch(), {}, memory)
        got = jax.tree.map(lambda a, b: a - b, st.params, params)
        want = jax.grad(lambda p, b=tasks[i]: objective.loss_fn(p, b, {})[0])(params)
        np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gem_through_the_trainer_gets_one_memory_batch_per_earlier_task(tmp_path, monkeypatch):
    """A recipe stage of three tasks with ``gem`` on the built-in micro decoder: during task t
    the step receives ``t`` memory batches (``[t, batch, seq]``), each drawn from one earlier
    task's kept examples only (none during task 0: the all-masked stand-in), and the run
    scores every task."""
    from jaxcl.recipe import validate
    from jaxcl.train import stage as stage_mod
    from jaxcl.train.runner import run_recipe

    seen = []
    original = stage_mod.StageRun.memory_batch

    def rows_of(examples):
        return {np.asarray(e["tokens"]).tobytes() for e in examples}

    def spy(self, memory, k, rows):
        out = original(self, memory, k, rows)
        buffer = self.cursor.buffer
        kept = [rows_of(buffer.examples(name)) for name in buffer.tasks] if buffer else []
        seen.append((kept, out))
        return out

    monkeypatch.setattr(stage_mod.StageRun, "memory_batch", spy)
    names = ("capitals", "antonyms", "arith")
    stage = {
        "name": "cit",
        "kind": "instruct",
        "metric": "perplexity",
        "seq_len": 32,
        "batch_size": 4,
        "eval_batch_size": 8,
        "steps_per_task": 2,
        "methods": [{"name": "gem", "per_task": 6}],
        "tasks": [
            {"name": n, "data": {"bundled": f"cit/{n}", "train_size": 12, "eval_size": 4}}
            for n in names
        ],
    }
    recipe = validate(
        {
            "name": "gem",
            "out_dir": str(tmp_path),
            "model": {"preset": "test-micro"},
            "stages": [stage],
        }
    )
    result = run_recipe(recipe)
    assert np.asarray(result["stages"][0]["R"]).shape == (3, 3)
    assert [len(kept) for kept, _ in seen] == [0, 0, 1, 1, 2, 2]
    for kept, batch in seen:
        tokens = np.asarray(batch["tokens"])
        assert tokens.shape[:2] == (max(len(kept), 1), 4)
        if not kept:
            assert float(np.asarray(batch["loss_mask"]).sum()) == 0.0
            continue
        assert all(k for k in kept) and sum(map(len, kept)) <= 18  # per_task × tasks in all
        assert len(kept) == 1 or not kept[0] & kept[1]  # two tasks, two pools
        for i, task_rows in enumerate(kept):  # slice i holds task i's kept rows only
            assert {r.tobytes() for r in tokens[i]} <= task_rows, i
