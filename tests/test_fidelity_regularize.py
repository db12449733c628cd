"""EWC, MAS, SI, RecAdam and their estimators against independent numpy oracles of the papers.

Every oracle below is plain numpy written from the paper (and checked against the published
reference code named in each test), on a parameter tree of several leaves of different shapes:
``{"w": (5, 3), "b": (3,), "layers": {"k": (2, 4, 3)}}``. None of them calls jaxcl code.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl import methods
from jaxcl.methods.protocol import Carry, Context, TaskInfo
from jaxcl.methods.regularize import EwcSpec, MasSpec, RecAdamSpec, SiSpec


def _np_tree(rng: np.random.Generator, scale: float = 1.0) -> dict[str, Any]:
    return {
        "w": scale * rng.normal(size=(5, 3)),
        "b": scale * rng.normal(size=3),
        "layers": {"k": scale * rng.normal(size=(2, 4, 3))},
    }


def _jnp(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _close(got: Any, want: Any, **kw: Any) -> None:
    kw.setdefault("rtol", 1e-5)
    kw.setdefault("atol", 1e-6)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, **kw), got, want)


def _map(fn, *trees):
    return jax.tree.map(fn, *trees)


# ----------------------------------------------------------------------------- softmax regression
# logits(x, z) = x W + b + Σ_j z_j K_j, loss = −log softmax(logits)[y]. Per example, with
# r = softmax(logits) − onehot(y): ∂/∂W = x ⊗ r, ∂/∂b = r, ∂/∂K_j = z_j ⊗ r.


def _data(rng: np.random.Generator, sizes: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    return [
        {
            "x": rng.normal(size=(n, 5)),
            "z": rng.normal(size=(n, 2, 4)),
            "y": rng.integers(0, 3, size=n),
        }
        for n in sizes
    ]


def _jax_batches(batches):
    return [
        {"x": jnp.asarray(b["x"], jnp.float32), "z": jnp.asarray(b["z"], jnp.float32),
         "y": jnp.asarray(b["y"], jnp.int32)}
        for b in batches
    ]  # fmt: skip


def _logits_np(p, x, z):
    return x @ p["w"] + p["b"] + np.einsum("jf,jfc->c", z, p["layers"]["k"])


def _softmax_np(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def _example_grad_np(p, x, z, y):
    r = _softmax_np(_logits_np(p, x, z))
    r[y] -= 1.0
    return {"w": np.outer(x, r), "b": r, "layers": {"k": z[:, :, None] * r[None, None, :]}}


def _loss_jax(p, batch):
    logits = batch["x"] @ p["w"] + p["b"] + jnp.einsum("njf,jfc->nc", batch["z"], p["layers"]["k"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def _examples(batches):
    for b in batches:
        yield from zip(b["x"], b["z"], b["y"])


@pytest.mark.parametrize("chunk", [1, 3])
def test_fisher_is_the_per_example_empirical_fisher_over_batches_of_different_sizes(chunk):
    rng = np.random.default_rng(0)
    params = _np_tree(rng)
    batches = _data(rng, (5, 3, 7))
    per = [_example_grad_np(params, x, z, y) for x, z, y in _examples(batches)]
    want = _map(lambda *g: np.mean(np.square(g), axis=0), *per)  # mean over all 15 examples
    got = methods.fisher_diagonal(_loss_jax, _jnp(params), _jax_batches(batches), chunk=chunk)
    _close(got, want)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))


def test_batch_level_fisher_is_the_squared_batch_mean_gradient_weighted_by_examples():
    rng = np.random.default_rng(1)
    params = _np_tree(rng)
    batches = _data(rng, (4, 6))
    squares = []
    for b in batches:
        grads = [_example_grad_np(params, *ex) for ex in zip(b["x"], b["z"], b["y"])]
        mean = _map(lambda *g: np.mean(g, axis=0), *grads)
        squares.append(_map(lambda m, n=b["y"].size: n * m**2, mean))
    want = _map(lambda *s: np.sum(s, axis=0) / 10, *squares)
    got = methods.fisher_diagonal(_loss_jax, _jnp(params), _jax_batches(batches), per_example=False)
    _close(got, want)
    per_example = methods.fisher_diagonal(_loss_jax, _jnp(params), _jax_batches(batches))
    ratio = np.asarray(per_example["w"]) / np.asarray(got["w"])
    assert ratio.min() > 1.5  # the batch-level estimate is much smaller, by varying factors
    assert ratio.max() / ratio.min() > 1.5


def test_estimators_refuse_ragged_batches_and_no_batches():
    params = _jnp(_np_tree(np.random.default_rng(2)))
    ragged = {"x": jnp.zeros((3, 5)), "z": jnp.zeros((2, 2, 4)), "y": jnp.zeros(3, jnp.int32)}
    with pytest.raises(ValueError, match="same leading"):
        methods.fisher_diagonal(_loss_jax, params, [ragged])
    with pytest.raises(ValueError, match="no batches"):
        methods.fisher_diagonal(_loss_jax, params, [])
    with pytest.raises(ValueError, match="chunk"):
        methods.mas_importance(lambda p, b: b, params, [], chunk=0)


# ----------------------------------------------------------------------------- MAS importance
# A sequence model: f_t = x_t W + b + Σ_j z_j K_j for t = 1..T (output [T, 3]); MAS's
# ‖f‖² = (1/T) Σ_t Σ_c f_tc², so ∂/∂W = (2/T) Σ_t x_t ⊗ f_t, ∂/∂b = (2/T) Σ_t f_t,
# ∂/∂K_j = z_j ⊗ (2/T) Σ_t f_t.


def _seq_outputs_np(p, x, z):
    return x @ p["w"] + p["b"] + np.einsum("jf,jfc->c", z, p["layers"]["k"])  # [T, 3]


def _mas_grad_np(p, x, z):
    f = _seq_outputs_np(p, x, z)
    t = x.shape[0]
    fsum = 2.0 / t * f.sum(0)
    return {"w": 2.0 / t * x.T @ f, "b": fsum, "layers": {"k": z[:, :, None] * fsum}}


def _seq_output_jax(p, batch):
    zk = jnp.einsum("njf,jfc->nc", batch["z"], p["layers"]["k"])
    return batch["x"] @ p["w"] + p["b"] + zk[:, None, :]  # [n, T, 3]


def _seq_data(rng, sizes, t=4):
    return [{"x": rng.normal(size=(n, t, 5)), "z": rng.normal(size=(n, 2, 4))} for n in sizes]


def test_mas_importance_is_the_per_example_mean_absolute_gradient():
    # Aljundi et al. eq. 4: Ω = (1/N) Σ_k |g(x_k)|, g the gradient of the squared L2 norm of the
    # output at one data point (the reference code's "b1" mode: importance batches of size 1).
    rng = np.random.default_rng(3)
    params = _np_tree(rng)
    batches = _seq_data(rng, (3, 5))
    per = [_mas_grad_np(params, x, z) for b in batches for x, z in zip(b["x"], b["z"])]
    want = _map(lambda *g: np.mean(np.abs(g), axis=0), *per)
    got = methods.mas_importance(_seq_output_jax, _jnp(params), _jnp(batches), chunk=4)
    _close(got, want, rtol=1e-4)
    # per_example=False: |gradient of the batch mean| per batch, weighted by its examples.
    pooled = []
    for b in batches:
        grads = [_mas_grad_np(params, x, z) for x, z in zip(b["x"], b["z"])]
        pooled.append(_map(lambda *g: len(g) * np.abs(np.mean(g, axis=0)), *grads))
    want = _map(lambda *s: np.sum(s, axis=0) / 8, *pooled)
    got = methods.mas_importance(_seq_output_jax, _jnp(params), _jnp(batches), per_example=False)
    _close(got, want, rtol=1e-4)


# ----------------------------------------------------------------------------- EWC over tasks


def _three_tasks(seed):
    rng = np.random.default_rng(seed)
    anchors = [_np_tree(rng) for _ in range(3)]
    fishers = [_map(lambda x: np.abs(x) * (x > -0.5), _np_tree(rng)) for _ in range(3)]
    theta = _np_tree(rng)
    return anchors, fishers, theta


def _added_gradient(tx, state, theta):
    zero = _map(jnp.zeros_like, _jnp(theta))
    out, _ = tx.update(zero, state, _jnp(theta))
    return out


def test_ewc_is_the_sum_of_the_per_task_penalties_in_two_buffers():
    # Kirkpatrick et al. 2017: after tasks A, B, C the loss is L_D + Σ_t (λ/2) Σ_i F_t,i
    # (θ_i − θ*_t,i)², one penalty per task. Its gradient: λ Σ_t F_t (θ − θ*_t).
    lam = 2.5
    anchors, fishers, theta = _three_tasks(4)

    def penalty(p):
        return sum(
            0.5 * lam * np.sum(f * (x - a) ** 2)
            for fa, aa in zip(fishers, anchors)
            for f, x, a in zip(*(jax.tree.leaves(t) for t in (fa, p, aa)))
        )

    want = _map(lambda x, *fa: lam * sum(f * (x - a) for f, a in zip(fa[:3], fa[3:])), theta,
                *fishers, *anchors)  # fmt: skip
    tx = methods.ewc(lam)
    state = tx.init(_jnp(anchors[0]))
    for a, f in zip(anchors, fishers):
        state = methods.consolidate(state, params=_jnp(a), fisher=_jnp(f))
    got = _added_gradient(tx, state, theta)
    _close(got, want, rtol=1e-4, atol=1e-5)
    # The numpy penalty's directional derivative agrees with the added gradient.
    direction = _np_tree(np.random.default_rng(5))
    eps = 1e-4
    moved = [_map(lambda x, d, s=s: x + s * eps * d, theta, direction) for s in (1, -1)]
    slope = (penalty(moved[0]) - penalty(moved[1])) / (2 * eps)
    dot = sum(np.sum(np.asarray(g) * d) for g, d in zip(*map(jax.tree.leaves, (got, direction))))
    np.testing.assert_allclose(dot, slope, rtol=1e-4)
    # Memory: two parameter-shaped buffers, whatever the number of tasks.
    for buffer in (state.anchor, state.fisher):
        assert jax.tree.structure(buffer) == jax.tree.structure(theta)
        assert [x.shape for x in jax.tree.leaves(buffer)] == [
            np.shape(x) for x in jax.tree.leaves(theta)
        ]
    assert [np.shape(x) for x in jax.tree.leaves(theta)] == [(3,), (2, 4, 3), (5, 3)]


def test_online_ewc_decays_the_fisher_and_keeps_the_latest_anchor():
    # Schwarz et al. 2018: F*_t = γ F*_{t−1} + F_t, penalty (λ/2) Σ F* (θ − θ*_{t})², θ* the
    # latest task's end.
    lam, gamma = 3.0, 0.6
    anchors, fishers, theta = _three_tasks(6)
    total = _map(lambda a, b, c: gamma**2 * a + gamma * b + c, *fishers)
    want = _map(lambda f, x, a: lam * f * (x - a), total, theta, anchors[2])
    tx = methods.ewc(lam, decay=gamma)
    state = tx.init(_jnp(theta))
    for a, f in zip(anchors, fishers):
        state = methods.consolidate(state, params=_jnp(a), fisher=_jnp(f))
    _close(_added_gradient(tx, state, theta), want, rtol=1e-4, atol=1e-5)
    _close(state.anchor, anchors[2])


# ----------------------------------------------------------------------------- MAS over tasks


def test_mas_sums_importances_and_pulls_with_the_papers_lambda():
    # Aljundi et al. eq. 6: L = L_n + λ Σ Ω (θ − θ*)², gradient 2λΩ(θ − θ*) (the reference code
    # adds weight_dif · 2·reg_lambda·omega); Ω accumulates by summation over tasks
    # (accumelate_reg_params: prev_omega + omega) and θ* is the latest task's end.
    lam = 1.5
    anchors, importances, theta = _three_tasks(7)
    total = _map(lambda a, b, c: a + b + c, *importances)
    want = _map(lambda o, x, a: 2 * lam * o * (x - a), total, theta, anchors[2])
    tx = methods.mas(lam)
    state = tx.init(_jnp(theta))
    for a, o in zip(anchors, importances):
        state = methods.consolidate(state, params=_jnp(a), mas_importance=_jnp(o))
    _close(_added_gradient(tx, state, theta), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- SI


def _si_oracle(lam, xi, clamp, tasks, lr, steps, noise, mu=0.9):
    """Zenke et al. 2017 with SGD + momentum μ, as ganguli-lab/pathint computes it: per step
    ω ← ω − g_unreg ⊙ Δθ_step (its 'grads2' step update); per task c = ω / (Δ² + ξ) and
    (pathint, omega_decay='sum') Ω ← relu(Ω + c); the loss adds lam Σ Ω (θ − θ*)²."""
    theta = _map(np.zeros_like, tasks[0][0])
    anchor = _map(np.copy, theta)
    omega = _map(np.zeros_like, theta)
    trace = _map(np.zeros_like, theta)
    omegas = []
    for t, (target, curvature) in enumerate(tasks):
        w = _map(np.zeros_like, theta)
        for k in range(steps):
            g = _map(lambda x, c, y, e: c * (x - y) + e, theta, curvature, target, noise[t][k])
            full = _map(lambda gg, o, x, a: gg + 2 * lam * o * (x - a), g, omega, theta, anchor)
            trace = _map(lambda m, d: d + mu * m, trace, full)
            step = _map(lambda m: -lr * m, trace)
            w = _map(lambda ww, gg, s: ww - gg * s, w, g, step)
            theta = _map(np.add, theta, step)
        c = _map(lambda ww, x, a: ww / ((x - a) ** 2 + xi), w, theta, anchor)
        rule = {
            "total": lambda o, cc: np.maximum(o + cc, 0),
            "task": lambda o, cc: o + np.maximum(cc, 0),
            "none": lambda o, cc: o + cc,
        }[clamp]
        omega = _map(rule, omega, c)
        anchor = _map(np.copy, theta)
        omegas.append(omega)
    return omegas, theta


def _si_run(lam, xi, clamp, tasks, lr, steps, noise):
    tx = methods.chain(methods.si(lam, damping=xi, clamp=clamp), optax.sgd(lr, momentum=0.9))
    params = _jnp(_map(np.zeros_like, tasks[0][0]))
    state = tx.init(params)
    omegas = []
    for t, (target, curvature) in enumerate(tasks):
        for k in range(steps):
            g = _map(lambda x, c, y, e: c * (x - y) + e, params, _jnp(curvature), _jnp(target),
                     _jnp(noise[t][k]))  # fmt: skip
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
        state = methods.consolidate(state, params=params)
        omegas.append(state[0].omega)
    return omegas, params


def test_si_matches_the_pathint_algorithm_and_its_clamp_options():
    rng = np.random.default_rng(10)
    tasks = [(_np_tree(rng), _map(lambda x: 0.5 + np.abs(x), _np_tree(rng))) for _ in range(3)]
    steps, lr, lam, xi = 6, 0.1, 0.05, 0.1
    noise = [[_np_tree(rng, 3.0) for _ in range(steps)] for _ in tasks]  # noisy: some ω < 0
    finals = {}
    for clamp in ("total", "task", "none"):
        want, want_theta = _si_oracle(lam, xi, clamp, tasks, lr, steps, noise)
        got, got_theta = _si_run(lam, xi, clamp, tasks, lr, steps, noise)
        for g, w in zip(got, want):
            _close(g, w, rtol=2e-4, atol=2e-5)
        _close(got_theta, want_theta, rtol=2e-4, atol=2e-5)
        finals[clamp] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(want[-1])])
    # The trajectory has negative path integrals, so the three rules differ (the test can fail).
    assert finals["none"].min() < 0
    assert np.abs(finals["total"] - finals["task"]).max() > 1.0
    assert np.abs(finals["total"] - finals["none"]).max() > 1.0
    with pytest.raises(ValueError, match="clamp"):
        methods.si(1.0, clamp="nope")


# ----------------------------------------------------------------------------- RecAdam


def _reference_step(size, lam, lr, coef, wd, eps):
    def step(x, m, v, pre):
        x = x - size * lam * m / (np.sqrt(v) + eps)  # Adam's step times λ(t)
        x = x - lr * (1 - lam) * coef * (x - pre)  # the recall term, at the moved point
        return x - lr * wd * x  # weight decay, unscaled

    return step


def _recadam_oracle(grads_of, theta0, pretrained, *, lr_of, coef, wd, k, t0, steps, eps):
    """RecAdam.step of Sanyuan-Chen/RecAdam in numpy: Adam moments of ∇L only, bias-corrected
    step size; p ← p − step_size·λ(t)·m/(√v + eps); p ← p − lr(1 − λ(t))γ(p − p*); p ← p − lr·wd·p,
    with t the 1-based step and λ(t) = sigmoid(k(t − t0))."""
    b1, b2 = 0.9, 0.999
    p = _map(np.copy, theta0)
    m = _map(np.zeros_like, p)
    v = _map(np.zeros_like, p)
    for t in range(1, steps + 1):
        g = grads_of(p)
        lr = lr_of(t - 1)
        m = _map(lambda a, gg: b1 * a + (1 - b1) * gg, m, g)
        v = _map(lambda a, gg: b2 * a + (1 - b2) * gg * gg, v, g)
        size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        lam = 1 / (1 + np.exp(-k * (t - t0)))
        p = _map(_reference_step(size, lam, lr, coef, wd, eps), p, m, v, pretrained)
    return p


def test_recadam_matches_the_reference_optimizer_step_with_weight_decay():
    rng = np.random.default_rng(9)
    pretrained, target = _np_tree(rng), _np_tree(rng)
    theta0 = _map(lambda a, e: a + 0.1 * e, pretrained, _np_tree(rng))
    coef, wd, k, t0, steps, eps = 4.0, 0.1, 0.7, 5.0, 12, 1e-8
    lr_of = lambda s: 0.05 * (1 + 0.1 * s)
    grads_of = lambda p: _map(lambda x, y: x - y, p, target)
    want = _recadam_oracle(grads_of, theta0, pretrained, lr_of=lr_of, coef=coef, wd=wd, k=k,
                           t0=t0, steps=steps, eps=eps)  # fmt: skip
    tx = methods.chain(
        optax.adamw(lr_of, eps=eps, weight_decay=wd),
        methods.recadam(lr_of, coef, weight_decay=wd, schedule="sigmoid", k=k, t0=t0),
    )
    params = _jnp(theta0)
    state = tx.init(_jnp(pretrained))  # θ* = the pretrained parameters
    for _ in range(steps):
        updates, state = tx.update(grads_of(params), state, params)
        params = optax.apply_updates(params, updates)
    _close(params, want, rtol=1e-4, atol=1e-5)


def test_recadam_spec_takes_the_optimizers_weight_decay():
    # λ ≡ 0, γ = 2, η = 0.1, a zero Adam direction: θ₂ − θ = −ηγ(θ − θ*), then the decay.
    spec = RecAdamSpec(name="recadam", coef=2.0, schedule="constant", value=0.0)
    theta = _np_tree(np.random.default_rng(10))
    r = 0.1 * 2.0
    for wd in (0.0, 0.5):
        d = 0.1 * wd
        tx = spec.transform(learning_rate=0.1, weight_decay=wd)
        state = tx.init(_map(jnp.ones_like, _jnp(theta)))
        adamw_update = _jnp(_map(lambda p, d=d: -d * p, theta))  # AdamW's decay alone
        out, _ = tx.update(adamw_update, state, _jnp(theta))
        _close(out, _map(lambda p, d=d: (1 - d) * (-r * (p - 1)) - d * p, theta), rtol=1e-5)
    with pytest.raises(ValueError, match="learning rate"):
        spec.transform()


# ----------------------------------------------------------------------------- recipe specs


class _State(NamedTuple):
    step: Any
    params: Any
    opt_state: Any


def _context(task_size, batch_size, loss_fn=None, apply=None, rng_seed=11):
    rng = np.random.default_rng(rng_seed)
    data = _data(rng, (task_size,))[0]
    requested: list[int] = []

    def batches(n):
        requested.append(n)
        for i in range(n):
            rows = [(i * batch_size + j) % task_size for j in range(batch_size)]
            yield {
                "x": jnp.asarray(data["x"][rows], jnp.float32),
                "z": jnp.asarray(data["z"][rows], jnp.float32),
                "y": jnp.asarray(data["y"][rows], jnp.int32),
            }

    info = TaskInfo(0, "t", 10, [dict(i=i) for i in range(task_size)], [""] * task_size)
    ctx = Context(info, loss_fn or _loss_jax, apply, lambda p: (p, None), lambda p, _: p, batches)
    return ctx, data, requested


@pytest.mark.parametrize(
    ("fields", "task_size", "calls", "examples"),
    [
        ({"fisher_examples": 10}, 20, [1, 3], 12),  # ⌈10 / 4⌉ batches of 4
        ({}, 20, [1, 5], 20),  # default 128, capped at the task's 20 examples
        ({"fisher_batches": 2}, 20, [2], 8),  # the former field: whole batches
    ],
)
def test_ewc_spec_estimates_on_the_tasks_own_examples(fields, task_size, calls, examples):
    spec = EwcSpec(name="ewc", chunk=3, **fields)
    params = _np_tree(np.random.default_rng(12))
    ctx, data, requested = _context(task_size, batch_size=4)
    carry = Carry(_State(0, _jnp(params), None), {}, None)
    got = spec.estimates(ctx, carry)["fisher"]
    assert requested == calls
    per = [
        _example_grad_np(params, data["x"][i % task_size], data["z"][i % task_size],
                         data["y"][i % task_size])
        for i in range(examples)
    ]  # fmt: skip
    _close(got, _map(lambda *g: np.mean(np.square(g), axis=0), *per), rtol=1e-4)
    batch_level = EwcSpec(name="ewc", per_example=False, **fields).estimates(ctx, carry)
    assert not np.allclose(batch_level["fisher"]["w"], got["w"])


def test_specs_refuse_both_counts_and_expose_their_options():
    with pytest.raises(ValueError, match="not both"):
        EwcSpec(name="ewc", fisher_examples=8, fisher_batches=2)
    with pytest.raises(ValueError, match="not both"):
        MasSpec(name="mas", importance_examples=8, importance_batches=2)
    si_tx = SiSpec(name="si", clamp="task").transform()
    assert int(si_tx.init({"a": jnp.zeros(2)}).clamp) == 1
    # pathint's rule (relu of the accumulated Ω) is the default, in the library and in recipes.
    assert int(methods.si(1.0).init({"a": jnp.zeros(2)}).clamp) == 2
    assert SiSpec(name="si").clamp == "total"
    assert MasSpec(name="mas").per_example and EwcSpec(name="ewc").per_example


def test_mas_spec_uses_the_models_logits_on_the_tasks_examples():
    # ctx.apply(params, tokens[:, :-1]) -> [n, T, 3]: an embedding E then f_t = E[id_t] W + b.
    rng = np.random.default_rng(13)
    params = {"emb": rng.normal(size=(7, 5)), "w": rng.normal(size=(5, 3)), "b": rng.normal(size=3)}
    tokens = rng.integers(0, 7, size=(6, 5))

    def apply(p, ids):
        return p["emb"][ids] @ p["w"] + p["b"]

    def batches(n):
        for i in range(n):
            yield {"tokens": jnp.asarray(tokens[3 * i : 3 * i + 3], jnp.int32)}

    info = TaskInfo(0, "t", 1, [{}] * 6, [""] * 6)
    ctx = Context(info, None, apply, lambda p: (p, None), lambda p, _: p, batches)
    carry = Carry(_State(0, _jnp(params), None), {}, None)
    got = MasSpec(name="mas", importance_examples=6).estimates(ctx, carry)["mas_importance"]

    def grad_np(ids):
        x = params["emb"][ids]  # [T, 5]
        f = x @ params["w"] + params["b"]
        t = len(ids)
        d_x = 2.0 / t * f @ params["w"].T
        emb = np.zeros_like(params["emb"])
        np.add.at(emb, ids, d_x)
        return {"emb": emb, "w": 2.0 / t * x.T @ f, "b": 2.0 / t * f.sum(0)}

    per = [grad_np(row[:-1]) for row in tokens]
    _close(got, _map(lambda *g: np.mean(np.abs(g), axis=0), *per), rtol=1e-4, atol=1e-5)


def test_bench_times_the_boundary_estimates_per_thousand_examples():
    from jaxcl.bench import format_boundary, time_boundary

    timings = [
        time_boundary("test-micro", kind, examples=4, batch_size=2, seq_len=8)
        for kind in ("fisher", "mas")
    ]
    for t in timings:
        assert t.examples == 4 and t.chunk == 1 and t.seq_len == 8
        assert t.seconds_per_1000 > 0 and t.first_batch_seconds > 0
    table = format_boundary(timings, "title")
    assert "test-micro fisher" in table and "test-micro mas" in table
    with pytest.raises(ValueError, match="fisher or mas"):
        time_boundary("test-micro", "ogd")
