"""Weight-space recipe methods against independent numpy oracles of their papers' procedures.

Each test drives a spec's hooks with a small hand-written stage loop in the order of
:mod:`jaxcl.methods.protocol` (task_start → steps with their step hooks → score on the eval view →
fold/renew/memory/merge) on a parameter tree of several leaves of different shapes, and checks
the scored and the kept weights against a plain numpy implementation of the method:

* EMA: θ̄ ← d θ̄ + (1 − d) θ after every step.
* Elastic Reset (Noukhovitch et al., 2023; reference mnoukhov/elastic-reset,
  ``stackllama/er_training.py``: torch_ema's EMA after each PPO step, then every ``reset_freq``
  iterations ``ema.copy_to()`` (online ← EMA) and ``ema.load_state_dict(initial)`` (EMA ← θ_0),
  optimizer untouched).
* Model averaging at task ends (interpolation with the task's start; running uniform mean).
* Task arithmetic (Ilharco et al., 2023): independent fine-tunes from one base,
  θ = θ_b + λ Σ_t (θ_t − θ_b).
* HMA (Lin et al., 2024; reference avalonstrel/Mitigating-the-Alignment-Tax-of-RLHF:
  ``weight_interpolation.py`` merges layer blocks with per-block ratios of the pre-RLHF model,
  ``mask_trainer.py`` learns them as α K (σ(m_k)+ε)/Σ_j(σ(m_j)+ε) with an L1 pull toward α,
  AdamW at 2e-5 with HF's linear decay, one epoch).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.methods.hma import HmaSpec, _one_pass, layer_groups
from jaxcl.methods.protocol import (
    END_PHASES,
    Carry,
    Context,
    TaskInfo,
    compose_views,
    run_hooks,
    run_step_hooks,
)
from jaxcl.methods.weights import AverageSpec, ElasticResetSpec, EmaSpec, TaskArithmeticSpec

ETA = 0.3  # the fake optimizer's pull toward the task's target


class State(NamedTuple):
    step: Any
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------- numpy side


def flat(tree: Any) -> dict[str, np.ndarray]:
    """``{"a/b": array}`` in float64."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x, np.float64)
        for path, x in leaves
    }


def np_train(theta: dict, target: dict, noise: dict) -> dict:
    return {k: theta[k] - ETA * (theta[k] - target[k]) + noise[k] for k in theta}


def assert_close(tree: Any, expected: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    got = flat(tree)
    assert sorted(got) == sorted(expected)
    for k in got:
        np.testing.assert_allclose(got[k], expected[k], rtol=rtol, atol=atol, err_msg=k)


# ----------------------------------------------------------------------------- jax-side harness


SHAPES = {"w": (5, 3), "b": (3,), "layers": {"k": (2, 4, 3)}}


def random_tree(rng: np.random.Generator, shapes=SHAPES, scale: float = 1.0) -> Any:
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def make_ctx(t: int, n_tasks: int, steps: int, *, split=None, join=None, **kw) -> Context:
    names = tuple(f"task{i}" for i in range(n_tasks))
    return Context(
        task=TaskInfo(t, names[t], steps, kw.pop("examples", ()), (), names),
        loss_fn=kw.pop("loss_fn", lambda p, b: 0.0),
        apply=lambda p, x: x,
        split=split or (lambda p: (p, {})),
        join=join or (lambda tr, fx: tr),
        batches=kw.pop("batches", lambda n: iter(())),
    )


def run_stage(spec, params, targets, noise, steps, ctx_kw=None):
    """The protocol's loop: returns per task the scored weights (eval view), the weights after
    the merge phase, and the final carry. The fake step moves the trainable part toward the
    task's target (θ ← θ − η (θ − T_t) + ε_{t,k})."""
    hooks, n_tasks = spec.hooks(), len(targets)
    view = compose_views([v for v in [spec.eval_view()] if v is not None]) or (lambda p, c, i: p)
    carry = Carry(State(jnp.zeros((), jnp.int32), params, None), {}, None)
    scored, after = [], []
    for t in range(n_tasks):
        ctx = make_ctx(t, n_tasks, steps, **(ctx_kw or {}))
        carry = run_hooks(hooks, "task_start", ctx, carry)
        for k in range(steps):
            trainable, fixed = ctx.split(carry.state.params)
            new = jax.tree.map(
                lambda p, tg, nz: (p - ETA * (p - tg) + nz).astype(p.dtype),
                trainable,
                targets[t],
                noise[t][k],
            )
            state = carry.state._replace(step=carry.state.step + 1, params=ctx.join(new, fixed))
            carry = run_step_hooks(hooks, k, ctx, carry._replace(state=state))
        scored.append([view(carry.state.params, carry, i) for i in range(t + 1)])
        for phase in END_PHASES:
            carry = run_hooks(hooks, phase, ctx, carry)
        after.append(carry.state.params)
    return scored, after, carry


def problem(seed: int, n_tasks: int, steps: int, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    params = random_tree(rng, shapes)
    targets = [random_tree(rng, shapes, 2.0) for _ in range(n_tasks)]
    noise = [[random_tree(rng, shapes, 0.05) for _ in range(steps)] for _ in range(n_tasks)]
    return params, targets, noise


def np_problem(params, targets, noise):
    return flat(params), [flat(t) for t in targets], [[flat(x) for x in row] for row in noise]


# ----------------------------------------------------------------------------- EMA


def test_ema_scores_and_exports_the_numpy_ema_of_every_step():
    n_tasks, steps, d = 2, 6, 0.8
    params, targets, noise = problem(0, n_tasks, steps)
    scored, after, carry = run_stage(EmaSpec(name="ema", decay=d), params, targets, noise, steps)

    theta, T, N = np_problem(params, targets, noise)
    avg = dict(theta)
    for t in range(n_tasks):
        for k in range(steps):
            theta = np_train(theta, T[t], N[t][k])
            avg = {x: d * avg[x] + (1 - d) * theta[x] for x in avg}
        for view in scored[t]:
            assert_close(view, avg)  # R[t][i] is scored on the EMA
        if t < n_tasks - 1:
            assert_close(after[t], theta)  # training continues on the online weights
    assert_close(after[-1], avg)  # the stage ends on the EMA (export)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(carry.frozen["ema"]))
    # the online and the averaged weights differ here, so the checks above can fail
    assert np.abs(theta["w"] - avg["w"]).max() > 1e-2


def test_ema_online_options_score_and_export_the_trained_weights():
    params, targets, noise = problem(1, 2, 4)
    spec = EmaSpec(name="ema", decay=0.5, evaluate="online", export="online")
    assert spec.eval_view() is None
    scored, after, _ = run_stage(spec, params, targets, noise, 4)
    theta, T, N = np_problem(params, targets, noise)
    for t in range(2):
        for k in range(4):
            theta = np_train(theta, T[t], N[t][k])
    assert_close(after[-1], theta)


def test_ema_on_a_lora_stage_averages_the_adapters_only():
    shapes = {"w": (4, 3), "lora": {"a": (3, 2), "b": (2, 3)}}
    rng = np.random.default_rng(2)
    params = random_tree(rng, shapes)
    adapter_shapes = {"lora": shapes["lora"]}
    targets = [random_tree(rng, adapter_shapes, 2.0) for _ in range(2)]
    noise = [[random_tree(rng, adapter_shapes, 0.05) for _ in range(3)] for _ in range(2)]
    split = lambda p: ({"lora": p["lora"]}, {"w": p["w"]})  # noqa: E731
    join = lambda tr, fx: {**fx, **tr}  # noqa: E731
    kw = {"split": split, "join": join}
    scored, after, carry = run_stage(
        EmaSpec(name="ema", decay=0.6), params, targets, noise, 3, ctx_kw=kw
    )
    assert sorted(carry.frozen["ema"]) == ["lora"]  # no copy of the fixed weights
    w0 = np.asarray(params["w"])
    theta = flat({"lora": params["lora"]})
    avg = dict(theta)
    for t in range(2):
        for k in range(3):
            theta = np_train(theta, flat(targets[t]), flat(noise[t][k]))
            avg = {x: 0.6 * avg[x] + 0.4 * theta[x] for x in avg}
    assert_close(scored[-1][0], {**avg, "w": w0})
    assert_close(after[-1], {**avg, "w": w0})


# ----------------------------------------------------------------------------- Elastic Reset


def np_elastic(theta, T, N, n_tasks, steps, d, every, at_task_end):
    """The reference loop: EMA after each step; every ``every`` steps (θ, θ̄) ← (θ̄, θ_0)."""
    init, avg, done, ends = dict(theta), dict(theta), 0, []
    for t in range(n_tasks):
        for k in range(steps):
            theta = np_train(theta, T[t], N[t][k])
            avg = {x: d * avg[x] + (1 - d) * theta[x] for x in avg}
            done += 1
            if (every and done % every == 0) or (at_task_end and k == steps - 1):
                theta, avg = dict(avg), dict(init)
        ends.append((theta, avg))
    return ends


@pytest.mark.parametrize(("every", "at_task_end"), [(4, False), (None, True), (3, True), (5, True)])
def test_elastic_reset_matches_the_reference_loop(every, at_task_end):
    n_tasks, steps, d = 2, 5, 0.7
    params, targets, noise = problem(3, n_tasks, steps)
    spec = ElasticResetSpec(name="elastic_reset", decay=d, every=every, at_task_end=at_task_end)
    scored, after, carry = run_stage(spec, params, targets, noise, steps)
    ends = np_elastic(*np_problem(params, targets, noise), n_tasks, steps, d, every, at_task_end)
    for t, (theta, _) in enumerate(ends):
        assert_close(scored[t][0], theta)  # the paper scores the online model
        assert_close(after[t], theta)
    assert_close(carry.frozen["elastic_ema"], ends[-1][1])
    # without resets the trajectory differs: the reset is what the test checks
    plain = np_elastic(*np_problem(params, targets, noise), n_tasks, steps, d, None, False)
    assert np.abs(plain[-1][0]["w"] - ends[-1][0]["w"]).max() > 1e-2


def test_elastic_reset_can_score_and_export_its_ema():
    params, targets, noise = problem(4, 2, 5)
    spec = ElasticResetSpec(name="elastic_reset", decay=0.7, every=4, evaluate="ema", export="ema")
    scored, after, _ = run_stage(spec, params, targets, noise, 5)
    ends = np_elastic(*np_problem(params, targets, noise), 2, 5, 0.7, 4, False)
    assert_close(scored[0][0], ends[0][1])
    assert_close(after[0], ends[0][0])  # not the last task: the online model trains on
    assert_close(after[-1], ends[-1][1])


# ----------------------------------------------------------------------------- averaging


def test_average_interpolates_with_the_task_start_at_every_task_end():
    n_tasks, steps, a = 3, 3, 0.3
    params, targets, noise = problem(5, n_tasks, steps)
    spec = AverageSpec(name="average", alpha=a)
    scored, after, carry = run_stage(spec, params, targets, noise, steps)
    theta, T, N = np_problem(params, targets, noise)
    for t in range(n_tasks):
        start = dict(theta)
        for k in range(steps):
            theta = np_train(theta, T[t], N[t][k])
        theta = {x: (1 - a) * start[x] + a * theta[x] for x in theta}
        assert_close(scored[t][-1], theta)  # scored as merged
        assert_close(after[t], theta)  # and the next task starts there
    assert "average_anchor" not in carry.frozen
    view = spec.eval_view()
    assert_close(view(after[-1], carry, 0), theta)  # a merged checkpoint is not merged again


def np_slerp(a: np.ndarray, b: np.ndarray, t: float, threshold: float = 0.9995) -> np.ndarray:
    """Shoemake's SLERP on the flattened arrays, the angle from the unit vectors; linear when
    they are nearly colinear (mergekit's rule)."""
    x, y = a.ravel(), b.ravel()
    cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def test_average_slerps_with_the_task_start_at_every_task_end():
    """``mode: slerp``: θ ← slerp(θ_start, θ; α) at each task end, a stacked ``layers`` leaf
    layer by layer; spherical, so not the linear interpolation."""
    n_tasks, steps, a = 3, 3, 0.3
    params, targets, noise = problem(5, n_tasks, steps)
    spec = AverageSpec(name="average", mode="slerp", alpha=a)
    scored, after, carry = run_stage(spec, params, targets, noise, steps)
    theta, T, N = np_problem(params, targets, noise)
    for t in range(n_tasks):
        start = dict(theta)
        for k in range(steps):
            theta = np_train(theta, T[t], N[t][k])
        linear = {x: (1 - a) * start[x] + a * theta[x] for x in theta}
        theta = {
            x: np.stack([np_slerp(s, e, a) for s, e in zip(start[x], theta[x])])
            if x.startswith("layers/")
            else np_slerp(start[x], theta[x], a)
            for x in theta
        }
        assert max(np.abs(theta[x] - linear[x]).max() for x in theta) > 1e-3
        assert_close(scored[t][-1], theta, rtol=1e-4, atol=1e-5)
        assert_close(after[t], theta, rtol=1e-4, atol=1e-5)
    assert "average_anchor" not in carry.frozen


def test_average_running_is_the_uniform_mean_of_task_end_weights():
    n_tasks, steps = 3, 3
    params, targets, noise = problem(6, n_tasks, steps)
    spec = AverageSpec(name="average", mode="running")
    scored, after, carry = run_stage(spec, params, targets, noise, steps)
    theta, T, N = np_problem(params, targets, noise)
    ends = []
    for t in range(n_tasks):
        for k in range(steps):
            theta = np_train(theta, T[t], N[t][k])
        ends.append(theta)
        theta = {x: np.mean([e[x] for e in ends], axis=0) for x in theta}
        assert_close(scored[t][0], theta)
        assert_close(after[t], theta)
    assert int(carry.frozen["average_count"]) == n_tasks
    assert_close(spec.eval_view()(after[-1], carry, 0), theta)


# ----------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_sums_the_vectors_of_fine_tunes_from_one_base():
    n_tasks, steps, lam = 3, 4, 0.6
    params, targets, noise = problem(7, n_tasks, steps)
    spec = TaskArithmeticSpec(name="task_arithmetic", lam=lam)
    scored, after, carry = run_stage(spec, params, targets, noise, steps)
    base, T, N = np_problem(params, targets, noise)
    vectors = []
    for t in range(n_tasks):
        theta = dict(base)  # every task is fine-tuned from the base
        for k in range(steps):
            theta = np_train(theta, T[t], N[t][k])
        vectors.append({x: theta[x] - base[x] for x in base})
        merged = {x: base[x] + lam * sum(v[x] for v in vectors) for x in base}
        for view in scored[t]:
            assert_close(view, merged, rtol=1e-5, atol=1e-5)
        assert_close(after[t], merged if t == n_tasks - 1 else base, atol=1e-5)
    assert "task_arithmetic_sum" not in carry.frozen


# ----------------------------------------------------------------------------- HMA


HMA_SHAPES = {
    "embed": (7, 3),
    "layers": {i: {"attn": {"q": (3, 3)}, "norm": {"scale": (3,)}} for i in range(6)},
    "final_norm": {"scale": (3,)},
    "lm_head": (3, 7),
}


def np_groups(n_layers: int, k: int) -> list[int]:
    """The reference's ``blockK``: ⌊L/K⌋ layers per block, the rest in the last."""
    each, out = n_layers // k, []
    for layer in range(n_layers):
        block = 0
        for b in range(k):
            block = b
            if layer < each * (b + 1):
                break
        out.append(block)
    return out


def np_hma(pre: dict, post: dict, ratios, alpha, groups) -> dict:
    """Per leaf ρ θ_0 + (1 − ρ) θ: a layer's leaves take their block's ratio, the embedding the
    first block's (reference: layer index 0 by default), other leaves α."""
    out = {}
    for key in post:
        if key.startswith("layers/"):
            rho = ratios[groups[int(key.split("/")[1])]]
        elif key.startswith("embed"):
            rho = ratios[0]
        else:
            rho = alpha
        out[key] = rho * pre[key] + (1 - rho) * post[key]
    return out


def stacked(tree: Any) -> Any:
    """The same parameters with the layers scanned (leaves ``[L, ...]``)."""
    layers = [tree["layers"][i] for i in sorted(tree["layers"])]
    return {**tree, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def test_layer_groups_follow_the_reference_blocks_and_explicit_boundaries():
    for n, k in [(6, 3), (7, 3), (26, 3), (32, 3), (5, 5), (9, 2)]:
        assert layer_groups(n, k).tolist() == np_groups(n, k)
    assert layer_groups(6, 3, [1, 5]).tolist() == [0, 1, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="groups"):
        layer_groups(2, 3)


@pytest.mark.parametrize("scanned", [False, True])
def test_hma_fixed_ratios_merge_at_the_stage_end_with_the_stage_start(scanned):
    n_tasks, steps, ratios, alpha = 2, 3, [0.9, 0.5, 0.1], 0.3
    params, targets, noise = problem(8, n_tasks, steps, HMA_SHAPES)
    base, T, N = np_problem(params, targets, noise)
    if scanned:
        params, targets = stacked(params), [stacked(x) for x in targets]
        noise = [[stacked(x) for x in row] for row in noise]
    spec = HmaSpec(name="hma", ratios=ratios, alpha=alpha)
    scored, after, carry = run_stage(spec, params, targets, noise, steps)
    theta = dict(base)
    for t in range(n_tasks):
        for k in range(steps):
            theta = np_train(theta, T[t], N[t][k])
        if t == 0:
            unmerged = theta
    merged = np_hma(base, theta, ratios, alpha, np_groups(6, 3))
    if scanned:
        unmerged = flat(stacked(_unflat(unmerged)))
        merged = flat(stacked(_unflat(merged)))
    assert_close(scored[0][0], unmerged)  # the stage's first task: not merged
    assert_close(scored[1][0], merged)
    assert_close(after[-1], merged)
    assert "hma_ratios" not in carry.frozen
    assert_close(spec.eval_view()(after[-1], carry, 0), merged)  # idempotent once merged


def _unflat(d: dict) -> Any:
    """``{"layers/0/attn/q": x}`` → the HMA_SHAPES tree (numpy leaves)."""
    out: dict = {}
    for key, value in d.items():
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(value, jnp.float32)
    return out


def test_hma_at_task_end_merges_each_task_with_its_own_start():
    ratios, alpha = [0.7, 0.4, 0.2], 0.5
    params, targets, noise = problem(9, 2, 3, HMA_SHAPES)
    spec = HmaSpec(
        name="hma",
        ratios=ratios,
        alpha=alpha,
        at="task_end",
        anchor="task_start",
        boundaries=[1, 5],
    )
    _, after, _ = run_stage(spec, params, targets, noise, 3)
    theta, T, N = np_problem(params, targets, noise)
    for t in range(2):
        start = dict(theta)
        for k in range(3):
            theta = np_train(theta, T[t], N[t][k])
        theta = np_hma(start, theta, ratios, alpha, [0, 1, 1, 1, 1, 2])
        assert_close(after[t], theta)


def np_learned_ratios(pre, post, target, scales, alpha, eps, lr, reg, groups, kernels):
    """The reference's search in numpy: r = α K (σ(m)+ε)/Σ(σ(m)+ε), loss s_b Σ (θ_r − T)² +
    reg Σ_k n_k |r_k − α|, Adam (β 0.9/0.999, ε 1e-8) with the rate decaying linearly to 0."""
    k_groups = max(groups) + 1
    m = np.full(k_groups, math.log(alpha / (1 - alpha)))
    mu, nu, n = np.zeros(k_groups), np.zeros(k_groups), len(scales)

    def ratios_of(m):
        s = 1 / (1 + np.exp(-m)) + eps
        return alpha * k_groups * s / s.sum(), s

    for step, scale in enumerate(scales):
        r, s = ratios_of(m)
        rho_grad = np.zeros(k_groups)  # dL/dr_k
        for key in post:
            if key.startswith("layers/"):
                g = groups[int(key.split("/")[1])]
            elif key.startswith("embed"):
                g = 0
            else:
                continue  # final norm, head: the fixed α
            merged = r[g] * pre[key] + (1 - r[g]) * post[key]
            rho_grad[g] += np.sum(2 * scale * (merged - target[key]) * (pre[key] - post[key]))
        rho_grad += reg * kernels * np.sign(r - alpha)
        # r_k = α K s_k / S: dr_k/ds_j = α K (δ_kj / S − s_k / S²); ds_j/dm_j = σ(1 − σ)
        total = s.sum()
        jac = alpha * k_groups * (np.eye(k_groups) / total - s[:, None] / total**2)
        sig = s - eps
        grad = (rho_grad @ jac) * sig * (1 - sig)
        mu = 0.9 * mu + 0.1 * grad
        nu = 0.999 * nu + 0.001 * grad**2
        mu_hat, nu_hat = mu / (1 - 0.9 ** (step + 1)), nu / (1 - 0.999 ** (step + 1))
        m = m - lr * (1 - step / n) * mu_hat / (np.sqrt(nu_hat) + 1e-8)
    return ratios_of(m)[0]


def test_hma_learns_the_ratios_as_the_reference_does():
    alpha, eps, lr, reg, n = 0.5, 0.25, 0.2, 1e-3, 8
    params, targets, noise = problem(10, 1, 3, HMA_SHAPES)
    base, T, N = np_problem(params, targets, noise)
    theta = dict(base)
    for k in range(3):
        theta = np_train(theta, T[0], N[0][k])
    # the search's target: the start's weights in the first block, the trained ones in the last
    target = {
        x: base[x] if x.startswith(("layers/0", "layers/1", "embed")) else theta[x] for x in base
    }
    target_tree = _unflat(target)
    scales = [1.0 + 0.25 * b for b in range(n)]

    def loss_fn(p, batch):
        sq = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p, target_tree)
        return batch["s"] * sum(jax.tree.leaves(sq))

    batches = lambda count: ({"s": jnp.float32(scales[b])} for b in range(count))  # noqa: E731
    spec = HmaSpec(name="hma", alpha=alpha, epsilon=eps, lr=lr, reg=reg, learn_batches=n)
    kw = {"loss_fn": loss_fn, "batches": batches}
    _, after, carry = run_stage(spec, params, targets, noise, 3, ctx_kw=kw)

    groups = np_groups(6, 3)
    kernels = np.array([2.0, 2.0, 2.0])  # one kernel (q) per layer, two layers per block
    expected = np_learned_ratios(base, theta, target, scales, alpha, eps, lr, reg, groups, kernels)
    learned = np.asarray(carry.frozen["hma_ratios_applied"])
    np.testing.assert_allclose(learned, expected, rtol=1e-4, atol=1e-6)
    assert abs(learned.mean() - alpha) < 1e-6  # the constraint mean α_k = α
    assert learned[0] > alpha + 0.05 and learned[2] < alpha - 0.05  # it did move
    assert_close(after[-1], np_hma(base, theta, list(expected), alpha, groups), rtol=1e-4)


def test_hma_one_pass_counts_batches_of_the_task():
    calls = []

    def batches(count):
        calls.append(count)
        return ({"tokens": jnp.zeros((4, 5), jnp.int32)} for _ in range(count))

    ctx = make_ctx(0, 1, 1, batches=batches, examples=list(range(10)))
    assert _one_pass(ctx) == 3  # ⌈10 / 4⌉


# ----------------------------------------------------------------------------- refusals, dtypes


@pytest.mark.parametrize(
    "spec",
    [
        AverageSpec(name="average"),
        TaskArithmeticSpec(name="task_arithmetic"),
        HmaSpec(name="hma", ratios=[0.5, 0.5, 0.5]),
    ],
)
def test_merges_refuse_lora_stages(spec):
    params = {"w": jnp.ones((3, 3)), "lora": {"a": jnp.ones((3, 1))}}
    ctx = make_ctx(0, 2, 1, split=lambda p: ({"lora": p["lora"]}, {"w": p["w"]}))
    carry = Carry(State(jnp.zeros((), jnp.int32), params, None), {}, None)
    with pytest.raises(ValueError, match="LoRA"):
        run_hooks(spec.hooks(), "task_start", ctx, carry)


def test_weight_methods_refuse_per_task_lora_and_validate_options():
    for cls in (EmaSpec, ElasticResetSpec, AverageSpec, TaskArithmeticSpec, HmaSpec):
        assert cls.describes_weights
    with pytest.raises(ValueError, match="ratios"):
        HmaSpec(name="hma", ratios=[0.5, 0.5])
    with pytest.raises(ValueError, match="boundaries"):
        HmaSpec(name="hma", boundaries=[4, 2])


@pytest.mark.parametrize(
    "spec",
    [
        EmaSpec(name="ema", decay=0.5),
        ElasticResetSpec(name="elastic_reset", every=2, export="ema"),
        AverageSpec(name="average"),
        AverageSpec(name="average", mode="running"),
        TaskArithmeticSpec(name="task_arithmetic"),
        HmaSpec(name="hma", ratios=[0.5, 0.5, 0.5]),
    ],
)
def test_merged_weights_keep_each_leafs_dtype(spec):
    params, targets, noise = problem(11, 2, 2, HMA_SHAPES)
    params = {**params, "lm_head": params["lm_head"].astype(jnp.bfloat16)}
    _, after, _ = run_stage(spec, params, targets, noise, 2)
    dtypes = jax.tree.map(lambda x: x.dtype, after[-1])
    assert dtypes == jax.tree.map(lambda x: x.dtype, params)
    assert dtypes["lm_head"] == jnp.bfloat16
