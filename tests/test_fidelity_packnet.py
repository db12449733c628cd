"""PackNet (Mallya & Lazebnik, 2018) against an independent numpy oracle of its procedure.

The oracle follows the paper and the reference code (arunmallya/packnet, ``src/prune.py`` and
``src/main.py``): a task trains the weights free at its start (``make_grads_zero`` zeroes every
other gradient, biases and batch-norm ones included after the first task), then
``SparsePruner.prune`` ranks the free weights of each layer by ``|θ|``, takes the
``round(prune_perc · n)``-th smallest as the cutoff, sets every free weight at or below it to
zero (released for later tasks) and gives the rest to the task; the post-prune epochs retrain
only those (10 retraining epochs after 20 training ones in ``run_sequence.sh``), the pruned
ones held at zero (``make_pruned_zero``); the last task of a sequence is not pruned (prune
fraction -1 in ``run_all_sequence.sh``). ``apply_mask(idx)`` scores task ``idx`` with the
weights owned by tasks ``1..idx``, all others zeroed.

Here the oracle runs that procedure in numpy on a tree of several leaves, with SGD or AdamW
(moments over every coordinate, the mask on the final update, as jaxcl's chain places it), and
jaxcl's transform and hooks run in a hand-written loop that calls them as
:mod:`jaxcl.methods.protocol` describes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcl import methods
from jaxcl.methods.isolate import (
    RETRAIN,
    TRAIN,
    PackNetSpec,
    PackNetState,
    find_state,
    packnet_task_params,
    train_steps,
)
from jaxcl.methods.protocol import (
    END_PHASES,
    Carry,
    Context,
    TaskInfo,
    run_hooks,
    run_step_hooks,
    with_state,
)
from jaxcl.train.step import TrainState

SHAPES = {"w": (5, 3), "b": (3,), "layers": {"k": (2, 4, 3)}, "base": (3, 3)}
PACKED = ("w", "layers/k")  # kernels (ndim ≥ 2) of the trainable part
ONE_D = ("b",)  # trains on the first task only
FIXED = ("base",)  # outside the trainable part (as LoRA's base weights are)
NAMES = ("t0", "t1", "t2")
STEPS = 6  # 4 training steps, then the prune, then 2 retraining steps (retrain = 1/3)
LR, WD, B1, B2, EPS = 0.05, 0.1, 0.9, 0.999, 1e-8


def _flat(tree) -> dict[str, np.ndarray]:
    """``{"a/b": array}``; skipped leaves (PackNet's owners of unpacked leaves) left out."""
    flat = flatten_dict(tree)
    return {"/".join(k): np.asarray(v) for k, v in flat.items() if not methods.skipped(v)}


def _unflat(flat: dict[str, np.ndarray]):
    return unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})


def _start() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    flat = {
        "/".join(k): rng.normal(size=s).astype(np.float32)
        for k, s in flatten_dict(SHAPES, is_leaf=lambda _, x: isinstance(x, tuple)).items()
    }
    targets = [
        {k: (2.0 * rng.normal(size=v.shape)).astype(np.float32) for k, v in flat.items()}
        for _ in NAMES
    ]
    return flat, targets


# ----------------------------------------------------------------------------- numpy oracle


def _oracle_prune(theta, owner, task, fraction):
    """The reference's per-layer prune: returns (owner, theta) after it."""
    free = owner == 0
    mag = np.abs(theta[free])
    k = round(fraction * mag.size)  # Python's round, as in SparsePruner.pruning_mask
    if k == 0:
        remove = np.zeros_like(free)
    else:
        cutoff = np.sort(mag)[k - 1]  # torch.kthvalue(k)
        remove = free & (np.abs(theta) <= cutoff)
    owner = np.where(free & ~remove, task, owner)
    return owner, np.where(remove, np.float32(0), theta)


def oracle(optimizer: str, prune: float, prune_last: bool, retrain: float = 1 / 3):
    """PackNet over the three tasks; returns per task (owners, params, views of every task)."""
    theta, targets = _start()
    owner = {k: np.zeros(theta[k].shape, np.int8) for k in PACKED}
    m = {k: np.zeros_like(v) for k, v in theta.items() if k not in FIXED}
    v = {k: np.zeros_like(x) for k, x in m.items()}
    count = 0
    n_retrain = min(round(retrain * STEPS), STEPS - 1)
    out = []
    for t in range(len(NAMES)):
        task = t + 1
        for step in range(STEPS):
            pruned = step >= STEPS - n_retrain
            count += 1
            for key in m:
                g = theta[key] - targets[t][key]
                if optimizer == "sgd":
                    u = -LR * g
                else:
                    m[key] = B1 * m[key] + (1 - B1) * g
                    v[key] = B2 * v[key] + (1 - B2) * g * g
                    m_hat = m[key] / (1 - B1**count)
                    v_hat = v[key] / (1 - B2**count)
                    u = -LR * (m_hat / (np.sqrt(v_hat) + EPS) + WD * theta[key])
                if key in owner:
                    allowed = owner[key] == (task if pruned else 0)
                else:
                    allowed = np.full(u.shape, t == 0)
                theta[key] = (theta[key] + np.where(allowed, u, 0)).astype(np.float32)
            if step == STEPS - n_retrain - 1:  # the prune, after the training steps
                last = t == len(NAMES) - 1
                fraction = prune if prune_last or not last else 0.0
                for key in owner:
                    owner[key], theta[key] = _oracle_prune(theta[key], owner[key], task, fraction)
        views = []
        for i in range(len(NAMES)):  # apply_mask(i + 1): owners 1..i+1 kept, all else zero
            view = dict(theta)
            for key in owner:
                keep = (owner[key] > 0) & (owner[key] <= i + 1)
                view[key] = np.where(keep, theta[key], np.float32(0))
            views.append(view)
        out.append(({k: o.copy() for k, o in owner.items()}, dict(theta), views))
    return out


# ----------------------------------------------------------------------------- jaxcl, driven


def split(params):
    flat = flatten_dict(params)
    is_fixed = lambda k: "/".join(k) in FIXED  # noqa: E731
    trainable = unflatten_dict({k: x for k, x in flat.items() if not is_fixed(k)})
    return trainable, unflatten_dict({k: x for k, x in flat.items() if is_fixed(k)})


def join(trainable, fixed):
    return unflatten_dict({**flatten_dict(fixed), **flatten_dict(trainable)})


def driven(optimizer: str, spec: PackNetSpec):
    """jaxcl's PackNet in a loop that runs the protocol: task_start hooks, each step then its
    step hooks, the eval views, estimates, consolidate, the end phases."""
    theta, targets = _start()
    base = optax.sgd(LR) if optimizer == "sgd" else optax.adamw(LR, B1, B2, EPS, weight_decay=WD)
    tx = methods.chain(base, spec.transform())
    hooks, view = spec.hooks(), spec.eval_view()
    params = _unflat(theta)
    carry = Carry(TrainState(jnp.int32(0), params, tx.init(split(params)[0])), {}, None)

    @jax.jit
    def train_step(state: TrainState, target):
        trainable, fixed = split(state.params)
        grads = jax.tree.map(jnp.subtract, trainable, split(target)[0])
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        return TrainState(
            state.step + 1, join(optax.apply_updates(trainable, updates), fixed), opt_state
        )

    out = []
    for t, name in enumerate(NAMES):
        info = TaskInfo(t, name, STEPS, [], [], NAMES)
        ctx = Context(info, None, None, split, join, lambda n: iter(()))
        carry = run_hooks(hooks, "task_start", ctx, carry)
        target = _unflat(targets[t])
        for k in range(STEPS):
            carry = carry._replace(state=train_step(carry.state, target))
            carry = run_step_hooks(hooks, k, ctx, carry)
        views = [view(carry.state.params, carry, i) for i in range(len(NAMES))]
        estimates = spec.estimates(ctx, carry)
        opt_state = methods.consolidate(
            carry.state.opt_state, params=ctx.trainable(carry), **estimates
        )
        carry = with_state(carry, opt_state=opt_state)
        for phase in END_PHASES:
            carry = run_hooks(hooks, phase, ctx, carry)
        state = find_state(carry.state.opt_state, PackNetState)
        assert int(state.tasks) == t + 1 and int(state.phase) == TRAIN
        out.append((_flat(state.owner), _flat(carry.state.params), [_flat(x) for x in views]))
    return out


def _score(view: dict[str, np.ndarray]) -> float:
    """A stand-in for a task's score: any fixed function of the parameters it is scored with."""
    x = np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3)
    h = np.tanh(x.T @ view["w"] + view["b"])
    return float(np.sum(h) + np.sum(np.tanh(view["layers/k"])) + np.sum(view["base"]))


@pytest.mark.parametrize(
    ("optimizer", "prune", "prune_last"),
    [("sgd", 0.5, False), ("adamw", 0.5, False), ("adamw", 0.6, True)],
)
def test_packnet_matches_the_numpy_oracle_over_three_tasks(optimizer, prune, prune_last):
    spec = PackNetSpec(name="packnet", prune=prune, prune_last=prune_last)
    want, got = oracle(optimizer, prune, prune_last), driven(optimizer, spec)
    start, _ = _start()
    for t, ((o_owner, o_theta, o_views), (owner, theta, views)) in enumerate(
        zip(want, got, strict=True)
    ):
        assert set(owner) == set(PACKED)
        for key in PACKED:
            np.testing.assert_array_equal(owner[key], o_owner[key], err_msg=f"task {t}: {key}")
            # pruned weights are exactly zero, and free (released for the next task)
            assert np.all(theta[key][owner[key] == 0] == 0)
        for key in theta:
            np.testing.assert_allclose(theta[key], o_theta[key], rtol=2e-5, atol=2e-6)
            for i in range(len(NAMES)):
                np.testing.assert_allclose(views[i][key], o_views[i][key], rtol=2e-5, atol=2e-6)
        np.testing.assert_array_equal(theta["base"], start["base"])  # not trainable
    # Each task kept round((1 - prune)·n) of the n weights free at its start (no ties here).
    for key in PACKED:
        free = np.prod(start[key].shape)
        for t in range(len(NAMES)):
            kept = int(np.sum(got[t][0][key] == t + 1))
            last = t == len(NAMES) - 1 and not prune_last
            assert kept == (free if last else free - round(prune * free)), (key, t)
            free -= kept


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_tasks_view_is_bit_identical_after_later_tasks(optimizer):
    """The no-forgetting property: ``R[t][i] == R[i][i]`` exactly for every ``t > i``."""
    got = driven(optimizer, PackNetSpec(name="packnet"))
    R = [[_score(view) for view in views] for _, _, views in got]
    for t in range(len(NAMES)):
        for i in range(t):
            for key, leaf in got[i][2][i].items():
                assert np.array_equal(got[t][2][i][key], leaf), (t, i, key)
            assert R[t][i] == R[i][i]
    # the 1-D leaf trained on the first task only; every task changed its own kernels' weights
    start, _ = _start()
    assert not np.array_equal(got[0][1]["b"], start["b"])
    assert np.array_equal(got[1][1]["b"], got[0][1]["b"])
    assert np.array_equal(got[2][1]["b"], got[0][1]["b"])
    assert len({_score(views[t]) for t, (_, _, views) in enumerate(got)}) == len(NAMES)


def test_without_the_masks_the_property_fails():
    """The check above can fail: a chain without PackNet's mask (the views alone) forgets."""

    class NoMask(PackNetSpec):
        def transform(self, **_):
            return methods.compose.behind(methods.packnet().init, lambda u, s, p=None, **_: (u, s))

    got = driven("sgd", NoMask(name="packnet"))
    assert not np.array_equal(got[2][2][0]["w"], got[0][2][0]["w"])


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("steps", "retrain", "before"),
    [
        (30, 1 / 3, 20),
        (6, 1 / 3, 4),
        (3, 1 / 3, 2),
        (2, 1 / 3, 1),
        (1, 1 / 3, 1),
        (10, 0.0, 10),
        (4, 0.9, 1),
    ],
)
def test_prune_step_leaves_the_declared_share_for_retraining(steps, retrain, before):
    assert train_steps(steps, retrain) == before
    spec = PackNetSpec(name="packnet", retrain=retrain)
    (hook,) = spec.hooks()
    fired = [k for k in range(steps) if hook.when(k, steps)]
    assert fired == [before - 1]


def test_consolidate_prunes_a_task_whose_prune_hook_did_not_run():
    """Library use without the hooks (or a run that skipped the prune): consolidate prunes as
    the reference would, without zeroing; after a prune that ran it only closes the task."""
    theta, _ = _start()
    params = split(_unflat(theta))[0]
    tx = methods.packnet(0.5)
    state = methods.consolidate(tx.init(params), params=params)
    for key in PACKED:
        want, _ = _oracle_prune(theta[key], np.zeros(theta[key].shape, np.int8), 1, 0.5)
        np.testing.assert_array_equal(_flat(state.owner)[key], want)
    pruned_state, pruned = methods.isolate.packnet_prune(tx.init(params), params, jnp.float32(0.5))
    assert int(pruned_state.phase) == RETRAIN
    closed = methods.consolidate(pruned_state, params=pruned)
    for key in PACKED:
        np.testing.assert_array_equal(_flat(closed.owner)[key], _flat(state.owner)[key])
        assert np.all(_flat(pruned)[key][_flat(closed.owner)[key] == 0] == 0)
    # a second prune in the same task is a no-op
    again, same = methods.isolate.packnet_prune(pruned_state, pruned, jnp.float32(0.5))
    for a, b in zip(jax.tree.leaves((again, same)), jax.tree.leaves((pruned_state, pruned))):
        np.testing.assert_array_equal(a, b)


def test_views_before_and_during_a_task():
    """Before any task the view is the model as is (the baseline); during task c the finished
    tasks see only their own weights, the current and later tasks the free weights too."""
    theta, _ = _start()
    params = _unflat(theta)
    tx = methods.packnet(0.5)
    state = tx.init(split(params)[0])
    for task in (1, 2, 3):
        for a, b in zip(
            jax.tree.leaves(packnet_task_params(params, state, task)), jax.tree.leaves(params)
        ):
            np.testing.assert_array_equal(a, b)
    state = methods.consolidate(state, params=split(params)[0])  # task 1 done, free kept as is
    owner = _flat(state.owner)["w"]
    assert 0 < np.sum(owner == 1) < owner.size
    done = _flat(packnet_task_params(params, state, 1))
    current = _flat(packnet_task_params(params, state, 2))
    np.testing.assert_array_equal(done["w"], np.where(owner == 1, theta["w"], 0))
    np.testing.assert_array_equal(current["w"], theta["w"])
    np.testing.assert_array_equal(done["base"], theta["base"])  # leaves it does not cover
    np.testing.assert_array_equal(done["b"], theta["b"])


def test_spec_declares_its_hook_view_and_place():
    spec = PackNetSpec(name="packnet")
    assert spec.place() == "behind" and spec.describes_weights
    assert spec.prune == 0.5 and spec.retrain == pytest.approx(1 / 3) and not spec.prune_last
    assert [h.phase for h in spec.hooks()] == ["step"] and spec.eval_view() is not None
    with pytest.raises(ValueError):
        PackNetSpec(name="packnet", retrain=1.0)


# ----------------------------------------------------------------------------- through the trainer


def _packnet_recipe(out, methods_list):
    from jaxcl.recipe import validate

    stage = {
        "name": "cit",
        "kind": "instruct",
        "metric": "perplexity",  # a continuous score: any change of a task's weights shows
        "seq_len": 32,
        "batch_size": 8,
        "eval_batch_size": 16,
        "steps_per_task": 3,  # 2 training steps, the prune, 1 retraining step
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
        "methods": methods_list,
        "tasks": [
            {"name": n, "data": {"bundled": f"cit/{n}", "train_size": 16, "eval_size": 8}}
            for n in ("capitals", "antonyms", "arith")
        ],
    }
    return validate(
        {
            "name": "packnet",
            "out_dir": str(out),
            "model": {"preset": "test-micro"},
            "stages": [stage],
        }
    )


@pytest.mark.slow
def test_packnet_through_the_trainer_never_forgets(tmp_path):
    """The recipe's chain (clip, AdamW with weight decay, PackNet behind), the stage loop's
    hooks and eval views, on the built-in micro decoder over three tasks: ``R[t][i] ==
    R[i][i]`` exactly for every ``t > i``; ``jaxcl eval`` of the final checkpoint scores each
    task with its own mask too (R's last row). That the check can fail without PackNet's mask
    is shown by ``test_without_the_masks_the_property_fails``."""
    from jaxcl.train.runner import run_recipe

    recipe = _packnet_recipe(tmp_path / "run", [{"name": "packnet"}])
    result = run_recipe(recipe)
    R = np.asarray(result["stages"][0]["R"])
    print(f"trainer PackNet R = {R.tolist()}")
    assert R.shape == (3, 3)
    for t in range(3):
        for i in range(t):
            assert R[t][i] == R[i][i], (t, i)
    assert len({R[i][i] for i in range(3)}) == 3  # each task scored with its own weights
    baseline = result["stages"][0]["baseline"]
    assert all(R[i][i] < baseline[i] for i in range(3))  # each task learned something
    from jaxcl.evaluate import evaluate

    scores = evaluate(recipe, result["stages"][0]["checkpoint"])["stages"]["cit"]["scores"]
    assert list(scores.values()) == R[-1].tolist()
