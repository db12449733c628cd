"""Every method of the catalog against its closed form on random pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl import methods


def _tree(key, scale=1.0):
    k = jax.random.split(key, 4)
    return {
        "dense": {
            "kernel": scale * jax.random.normal(k[0], (6, 4)),
            "bias": jax.random.normal(k[1], (4,)),
        },
        "layers": {0: {"w": scale * jax.random.normal(k[2], (3, 5, 2))}},
        "lora_a": jax.random.normal(k[3], (6, 2)),
    }


def _trees(seed, n):
    return [_tree(k) for k in jax.random.split(jax.random.key(seed), n)]


def _close(a, b, **kw):
    kw.setdefault("rtol", 1e-5)
    kw.setdefault("atol", 1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def _zeros(t):
    return jax.tree.map(jnp.zeros_like, t)


def test_mas_is_weighted_pull_and_accumulates_with_decay():
    anchor, theta, grads, imp = _trees(0, 4)
    imp = jax.tree.map(jnp.abs, imp)
    tx = methods.mas(2.5, decay=0.5)
    state = methods.consolidate(tx.init(theta), params=anchor, mas_importance=imp)
    upd, _ = tx.update(grads, state, theta)
    # The paper's penalty λ Σ Ω (θ − θ*)²: gradient 2λΩ(θ − θ*).
    want = jax.tree.map(lambda g, o, t, a: g + 2 * 2.5 * o * (t - a), grads, imp, theta, anchor)
    _close(upd, want)
    state = methods.consolidate(state, params=theta, mas_importance=imp)
    _close(state.importance, jax.tree.map(lambda o: 1.5 * o, imp))


def test_si_importance_after_a_known_trajectory():
    xi, lam = 0.1, 3.0
    tx = methods.si(lam, damping=xi)
    thetas = _trees(1, 4)  # θ0 (start = anchor), θ1, θ2, θ3 (end)
    grads = _trees(2, 3)  # g0 at θ0, g1 at θ1, g2 at θ2
    state = tx.init(thetas[0])
    for k in range(3):
        upd, state = tx.update(grads[k], state, thetas[k])
        _close(upd, grads[k])  # Ω = 0 during the first task: no penalty
    state = methods.consolidate(state, params=thetas[3])

    def expected(t0, t1, t2, t3, g0, g1, g2):
        w = -(g0 * (t1 - t0) + g1 * (t2 - t1) + g2 * (t3 - t2))
        return np.maximum(w, 0) / ((t3 - t0) ** 2 + xi)

    omega = jax.tree.map(expected, *thetas, *grads)
    _close(state.omega, omega, rtol=1e-4)
    _close(state.anchor, thetas[3])
    _close(state.path, _zeros(thetas[0]))
    # Next task: the gradient of the paper's penalty c Σ Ω (θ − θ*)², 2c Ω (θ − θ*).
    upd, _ = tx.update(_zeros(grads[0]), state, thetas[0])
    want = jax.tree.map(lambda o, t, a: 2 * lam * o * (t - a), omega, thetas[0], thetas[3])
    _close(upd, want, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["sigmoid", "linear", "constant"])
def test_recadam_anneals_and_decouples_its_recall_term(schedule):
    anchor, theta, u = _trees(3, 3)
    lr, coef, k, t0 = 0.01, 7.0, 0.3, 4.0
    tx = methods.recadam(lambda s: lr * (1 + s), coef, schedule=schedule, k=k, t0=t0, value=0.3)
    assert methods.position(tx) == "behind"
    state = tx.init(anchor)
    for t in range(3):
        out, state = tx.update(u, state, theta)
        step = t + 1  # RecAdam.py counts the task's updates from 1
        lam_t = {
            "sigmoid": 1 / (1 + np.exp(-k * (step - t0))),
            "linear": min(1, step / t0),
            "constant": 0.3,
        }[schedule]
        eta = lr * (1 + t)
        r = eta * (1 - lam_t) * coef  # the recall acts at θ + λu, as in RecAdam.py
        _close(
            out,
            jax.tree.map(
                lambda x, p, a, lt=lam_t, r=r: lt * (1 - r) * x - r * (p - a), u, theta, anchor
            ),
            rtol=1e-4,
        )
    state = methods.consolidate(state, params=theta)
    assert int(state.count) == 0 and int(state.step) == 3
    _close(state.anchor, theta)


def test_agem_projects_only_when_the_step_conflicts_with_the_memory_gradient():
    g, ref = _trees(4, 2)
    dot = methods._tree.vdot(g, ref)
    neg_ref = jax.tree.map(lambda r: -r, ref) if dot > 0 else ref
    pos_ref = jax.tree.map(lambda r: -r, neg_ref)
    d, rr = methods._tree.vdot(g, neg_ref), methods._tree.vdot(neg_ref, neg_ref)
    projected = jax.tree.map(lambda x, r: x - d / rr * r, g, neg_ref)
    # On a gradient (the paper's form): project when g·g_ref < 0.
    tx = methods.agem(project="gradient")
    out, _ = tx.update(g, tx.init(g), memory_grads=pos_ref)
    _close(out, g)
    out, _ = tx.update(g, tx.init(g), memory_grads=neg_ref)
    _close(out, projected, rtol=1e-5)
    assert abs(float(methods._tree.vdot(out, neg_ref))) < 1e-4
    # On an update (the default, behind AdamW): project when u·g_ref > 0.
    tx = methods.agem()
    out, _ = tx.update(g, tx.init(g), memory_grads=neg_ref)
    _close(out, g)
    out, _ = tx.update(g, tx.init(g), memory_grads=pos_ref)
    _close(out, projected, rtol=1e-5)
    with pytest.raises(ValueError, match="memory_grads"):
        tx.update(g, tx.init(g))


def test_ogd_basis_is_orthonormal_over_the_whole_vector_and_projection_matches_qr():
    params, g = _trees(5, 2)
    stored = _trees(6, 3)

    def flat(t):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])

    tx = methods.ogd(max_directions=4)
    state = methods.consolidate(tx.init(params), params=params, ogd_grads=stored)
    out, _ = tx.update(g, state)
    q, _ = np.linalg.qr(np.stack([flat(s) for s in stored], 1))
    np.testing.assert_allclose(flat(out), flat(g) - q @ (q.T @ flat(g)), rtol=1e-4, atol=1e-5)

    def columns(state):
        leaves = jax.tree.leaves(state.basis)
        return np.stack([np.concatenate([np.ravel(b[j]) for b in leaves]) for j in range(4)], 1)

    basis = columns(state)
    np.testing.assert_allclose(basis.T @ basis, np.diag([1, 1, 1, 0]), atol=1e-5)
    # A direction already spanned is not added; a new one takes the free slot.
    state2 = methods.consolidate(state, params=params, ogd_grads=[stored[0], *_trees(7, 1)])
    basis2 = columns(state2)
    np.testing.assert_allclose(basis2.T @ basis2, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(basis2[:, :3], basis[:, :3])
    with pytest.raises(ValueError, match="basis is full"):  # a fifth direction has no room
        methods.consolidate(state2, params=params, ogd_grads=_trees(8, 1))


def _gpm_reference(basis, x, eps):
    """Saha et al.: criterion on the SVD of the residual representation."""
    total = np.sum(x**2)
    if basis is None:
        u, s, _ = np.linalg.svd(x.T, full_matrices=False)
        r = int(np.sum(np.cumsum(s**2) / total < eps)) + 1
        return u[:, :r]
    resid = x.T - basis @ (basis.T @ x.T)
    u, s, _ = np.linalg.svd(resid, full_matrices=False)
    captured = total - np.sum(s**2)
    r = int(np.sum((captured + np.cumsum(s**2)) / total < eps)) + (captured / total < eps)
    return np.concatenate([basis, u[:, :r]], 1)


def test_gpm_bases_match_the_svd_criterion_and_projection_removes_them():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 8)) * np.array([5, 3, 2, 1, 0.5, 0.2, 0.1, 0.05])[:, None]
    xa, xb = rng.normal(size=(64, 8)) @ mix, rng.normal(size=(64, 8)) @ mix[::-1]
    params = {"w": jnp.zeros((8, 3)), "b": jnp.zeros(3)}
    tx = methods.gpm(0.95)
    state = tx.init(params)
    cov = lambda x: {"w": jnp.asarray(x.T @ x / len(x), jnp.float32)}  # noqa: E731
    state = methods.consolidate(state, params=params, gpm_covariance=cov(xa))
    want = _gpm_reference(None, xa, 0.95)
    got = np.asarray(state.basis["w"])
    r = want.shape[1]
    np.testing.assert_allclose(np.abs(got[:, :r].T @ want), np.eye(r), atol=1e-4)
    assert np.allclose(got[:, r:], 0)
    state = methods.consolidate(state, params=params, gpm_covariance=cov(xb))
    want2 = _gpm_reference(want, xb, 0.95)
    got2 = np.asarray(state.basis["w"])[:, : want2.shape[1]]
    np.testing.assert_allclose(got2 @ got2.T, want2 @ want2.T, atol=1e-4)
    g = {"w": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), "b": jnp.ones(3)}
    out, _ = tx.update(g, state)
    np.testing.assert_allclose(got2.T @ np.asarray(out["w"]), 0, atol=1e-4)
    np.testing.assert_allclose(out["b"], 0.0)  # 1-D parameters are fixed after the first task


def test_o_lora_gradient_is_the_gradient_of_its_penalty():
    params = _tree(jax.random.key(8))
    lam = 0.7
    tx = methods.o_lora(lam, max_tasks=3)
    state = tx.init(params)
    for seed in (9, 10):
        old = _tree(jax.random.key(seed))
        state = methods.consolidate(state, params=old)
    assert int(state.tasks) == 2
    zero = _zeros(params)
    out, _ = tx.update(zero, state, params)
    want = jax.grad(lambda p: methods.o_lora_penalty(p, state, lam))(params)
    _close(out, want, rtol=1e-5)
    hist = np.asarray(state.history["lora_a"])
    np.testing.assert_allclose(hist[:, 2:4], _tree(jax.random.key(10))["lora_a"])
    assert methods.skipped(state.history["dense"]["kernel"])  # unselected leaves cost nothing
    penalty = methods.o_lora_penalty(params, state, lam)
    a = np.asarray(params["lora_a"])
    np.testing.assert_allclose(penalty, lam * np.abs(hist.T @ a).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="no parameter matches"):
        methods.o_lora(select="nothing_here").init(params)


def test_freeze_zeroes_selected_leaves():
    g = _tree(jax.random.key(11))
    tx = methods.freeze("dense/")
    out, _ = tx.update(g, tx.init(g))
    _close(out["dense"], _zeros(g["dense"]))
    _close(out["layers"], g["layers"])


def test_packnet_keeps_owned_weights_bit_identical_through_adamw_with_weight_decay():
    params = _tree(jax.random.key(12))
    tx = methods.chain(optax.adamw(0.1, weight_decay=0.5), methods.packnet(prune=0.75))
    state = tx.init(params)
    state = methods.consolidate(state, params=params)
    owner = state[1].owner
    kernel_owner = np.asarray(owner["dense"]["kernel"])
    assert kernel_owner.sum() == 6  # 24 free, 18 pruned, the 6 largest |θ| kept
    mags = np.abs(np.asarray(params["dense"]["kernel"]))
    assert mags[kernel_owner == 1].min() >= mags[kernel_owner == 0].max()
    assert methods.skipped(owner["dense"]["bias"])  # 1-D leaves are not packed
    before = params
    for seed in range(5):
        g = _tree(jax.random.key(100 + seed))
        upd, state = tx.update(g, state, params)
        params = optax.apply_updates(params, upd)
    leaves = lambda t: jax.tree.leaves(t, is_leaf=methods.skipped)  # noqa: E731
    for o, b, a in zip(*(leaves(t) for t in (owner, before, params))):
        if not methods.skipped(o):
            owned = np.asarray(o) > 0
            assert np.array_equal(np.asarray(b)[owned], np.asarray(a)[owned])
            assert not np.array_equal(np.asarray(b)[~owned], np.asarray(a)[~owned])
    # Task 2 (pruned at consolidate: no prune hook ran) keeps 1/4 of the 18 free weights:
    # round(0.75*18) = round(13.5) = 14 pruned (half to even, Python's round in the reference).
    state = methods.consolidate(state, params=params)
    assert np.sum(np.asarray(state[1].owner["dense"]["kernel"]) == 2) == 4
    view = methods.packnet_task_params(params, state[1], 1)
    np.testing.assert_array_equal(view["dense"]["kernel"] != 0, kernel_owner == 1)


def test_soft_mask_scales_updates_by_one_minus_the_max_of_the_task_masks():
    # The estimate is already normalised per layer and unit type (tests/test_fidelity_softmask.py
    # checks it against DAS); the transform accumulates by max and scales by 1 - mask.
    u, m1, m2 = _trees(13, 3)
    m1, m2 = (jax.tree.map(lambda x: jax.nn.sigmoid(3 * x), m) for m in (m1, m2))
    tx = methods.soft_mask()
    state = tx.init(u)
    out, _ = tx.update(u, state)
    _close(out, u)
    state = methods.consolidate(state, params=u, soft_mask_importance=m1)
    state = methods.consolidate(state, params=u, soft_mask_importance=m2)
    m = jax.tree.map(lambda a, b: np.maximum(np.asarray(a), np.asarray(b)), m1, m2)
    out, _ = tx.update(u, state)
    _close(out, jax.tree.map(lambda x, mm: x * (1 - mm), u, m), rtol=1e-5)


def test_weight_space_functions():
    a, b, c = _trees(14, 3)
    _close(methods.interpolate(a, b, 0.25), jax.tree.map(lambda x, y: 0.75 * x + 0.25 * y, a, b))
    _close(
        methods.average([a, b, c], [1, 1, 2]),
        jax.tree.map(lambda x, y, z: (x + y + 2 * z) / 4, a, b, c),
    )
    _close(methods.ema(a, b, 0.9), jax.tree.map(lambda x, y: 0.9 * x + 0.1 * y, a, b))
    online, ema = methods.elastic_reset(a, b, c)
    _close(online, b)
    _close(ema, c)
    merged = methods.task_arithmetic(a, [b, c], [0.5, 2.0])
    _close(
        merged, jax.tree.map(lambda x, y, z: x + 0.5 * (y - x) + 2 * (z - x), a, b, c), rtol=1e-5
    )
    _close(methods.task_vector(b, a), jax.tree.map(jnp.subtract, b, a))


def test_mas_importance_closed_form_for_a_linear_map():
    # f(x) = x W, ‖f‖² summed over outputs, mean over batch: ∂/∂W = (2/n) xᵀ x W.
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    batches = [jnp.asarray(rng.normal(size=(5, 4)), jnp.float32) for _ in range(3)]
    got = methods.mas_importance(lambda p, x: x @ p["w"], {"w": w}, batches, per_example=False)
    want = np.mean(
        [np.abs(2 / 5 * np.asarray(x).T @ np.asarray(x) @ np.asarray(w)) for x in batches], 0
    )
    np.testing.assert_allclose(got["w"], want, rtol=1e-5)
    got = methods.mas_importance(lambda p, x: x @ p["w"], {"w": w}, batches)  # per example
    per = [np.abs(2 * np.outer(xi, xi @ np.asarray(w))) for x in batches for xi in np.asarray(x)]
    np.testing.assert_allclose(got["w"], np.mean(per, 0), rtol=1e-5)


def test_activation_covariance_finds_the_inputs_of_each_kernel():
    rng = np.random.default_rng(2)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
        "b": jnp.zeros(6),
    }

    @jax.jit
    def inner(h, w):  # a nested jit: the walk follows it
        return h @ w

    def model(p, x):
        h = jnp.tanh(x @ p["w1"] + p["b"])
        return inner(h, p["w2"].astype(jnp.float32))

    xs = [jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32) for _ in range(2)]
    cov = methods.activation_covariance(model, params, xs)
    assert set(cov) == {"w1", "w2"}
    x = np.concatenate([np.asarray(b).reshape(-1, 4) for b in xs])
    np.testing.assert_allclose(cov["w1"], x.T @ x / len(x), rtol=1e-5)
    h = np.tanh(x @ np.asarray(params["w1"]))
    np.testing.assert_allclose(cov["w2"], h.T @ h / len(h), rtol=1e-4, atol=1e-6)
