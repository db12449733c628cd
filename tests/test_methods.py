"""EWC / L2 transforms, consolidate and the Fisher estimator against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl import methods


def _random_tree(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jax.random.normal(k2, (3,))},
        "layers": {0: {"scale": jax.random.normal(k3, (5,))}},
    }


def _close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_ewc_gradient_term_is_lam_fisher_times_displacement():
    keys = jax.random.split(jax.random.key(0), 5)
    anchor, theta, grads = (_random_tree(k) for k in keys[:3])
    fisher = jax.tree.map(jnp.abs, _random_tree(keys[3]))
    lam = 3.7
    tx = methods.ewc(lam)
    state = methods.EwcState(anchor=anchor, fisher=fisher, decay=jnp.float32(1.0))
    updates, _ = tx.update(grads, state, theta)
    expected = jax.tree.map(lambda g, f, t, a: g + lam * f * (t - a), grads, fisher, theta, anchor)
    _close(updates, expected, rtol=1e-6)
    # And it is the gradient of the penalty (lam/2) Σ F (θ − θ*)².
    penalty = lambda p: (
        0.5
        * lam
        * sum(
            jnp.sum(f * (x - a) ** 2)
            for f, x, a in zip(*(jax.tree.leaves(t) for t in (fisher, p, anchor)))
        )
    )
    zero = jax.tree.map(jnp.zeros_like, grads)
    only_penalty, _ = tx.update(zero, state, theta)
    _close(only_penalty, jax.grad(penalty)(theta), rtol=1e-5)


def test_ewc_starts_without_penalty():
    params = _random_tree(jax.random.key(1))
    grads = _random_tree(jax.random.key(2))
    tx = methods.ewc(10.0)
    moved = jax.tree.map(lambda p: p + 1.0, params)
    updates, _ = tx.update(grads, tx.init(params), moved)
    _close(updates, grads)


def test_consolidate_refreshes_anchor_and_fisher_inside_a_chain():
    params = _random_tree(jax.random.key(3))
    tx = optax.chain(
        methods.ewc(1.0, decay=0.5),
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    )
    state = tx.init(params)
    new_params = jax.tree.map(lambda p: p * 2 + 1, params)
    f1 = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    state = methods.consolidate(state, params=new_params, fisher=f1)
    ewc_state = state[0]
    _close(ewc_state.anchor, new_params)
    _close(ewc_state.fisher, f1)  # 0.5 * 0 + F1
    f2 = jax.tree.map(lambda p: jnp.full_like(p, 4.0), params)
    state = methods.consolidate(state, params=params, fisher=f2)
    _close(state[0].fisher, jax.tree.map(lambda p: jnp.full_like(p, 0.5 * 2.0 + 4.0), params))
    _close(state[0].anchor, params)
    # The base optimizer's state is untouched and the structure unchanged.
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    _close(state[2], tx.init(params)[2])


def test_consolidate_names_the_missing_estimate():
    params = _random_tree(jax.random.key(4))
    state = optax.chain(methods.ewc(1.0), optax.sgd(0.1)).init(params)
    with pytest.raises(ValueError, match="'ewc' needs the estimate.*fisher"):
        methods.consolidate(state, params=params)


def test_l2_anchor_moves_its_anchor_at_consolidate():
    params = _random_tree(jax.random.key(5))
    tx = methods.l2_anchor(0.5)
    state = tx.init(params)
    moved = jax.tree.map(lambda p: p + 2.0, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, state, moved)
    _close(updates, jax.tree.map(lambda p: jnp.full_like(p, 1.0), params))
    state = methods.consolidate(state, params=moved)
    updates, _ = tx.update(zero, state, moved)
    _close(updates, zero)


def test_fisher_diagonal_matches_closed_form_for_linear_regression():
    # L(w) = mean_n (x_n·w − y_n)²/2  =>  ∂L/∂w = mean_n (x_n·w − y_n) x_n.
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=3), jnp.float32)
    batches = [
        {
            "x": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=4), jnp.float32),
        }
        for _ in range(5)
    ]
    loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2) / 2

    def residual_x(b):
        return (np.asarray(b["x"]) @ np.asarray(w) - np.asarray(b["y"]))[:, None] * np.asarray(
            b["x"]
        )

    per_batch = np.mean([residual_x(b).mean(0) ** 2 for b in batches], axis=0)
    per_example = np.mean([(residual_x(b) ** 2).mean(0) for b in batches], axis=0)
    got = methods.fisher_diagonal(loss, {"w": w}, batches)  # per example by default
    np.testing.assert_allclose(got["w"], per_example, rtol=1e-5)
    got = methods.fisher_diagonal(loss, {"w": w}, batches, per_example=False)
    np.testing.assert_allclose(got["w"], per_batch, rtol=1e-5)


def test_fisher_diagonal_needs_batches():
    with pytest.raises(ValueError, match="no batches"):
        methods.fisher_diagonal(lambda p, b: 0.0, {"w": jnp.ones(2)}, [])


def test_ewc_reduces_drift_of_important_weights():
    """Task A fixes w; on task B, EWC keeps the Fisher-heavy coordinate near its anchor."""
    target_a, target_b = jnp.array([1.0, 1.0]), jnp.array([-1.0, -1.0])
    loss_b = lambda p: jnp.sum((p["w"] - target_b) ** 2)
    params = {"w": target_a}
    fisher = {"w": jnp.array([10.0, 0.0])}
    tx = optax.chain(methods.ewc(5.0), optax.sgd(0.01))
    state = methods.consolidate(tx.init(params), params=params, fisher=fisher)
    for _ in range(2000):
        updates, state = tx.update(jax.grad(loss_b)(params), state, params)
        params = optax.apply_updates(params, updates)
    # Stationary point: 2(w − t_B) + lam F (w − t_A) = 0 -> w = (2 t_B + 50 t_A) / 52.
    np.testing.assert_allclose(params["w"][0], (2 * -1.0 + 50 * 1.0) / 52, rtol=1e-4)
    np.testing.assert_allclose(params["w"][1], -1.0, atol=1e-4)
