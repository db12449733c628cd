"""Losses against their closed forms on random log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.objectives import causal_lm_loss, dpo_loss, sequence_logps

rng = np.random.default_rng(0)
PC, PR, RC, RR = (jnp.asarray(rng.normal(-20, 5, size=16), jnp.float32) for _ in range(4))


def _np_log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def test_dpo_sigmoid_closed_form_and_gradient():
    beta = 0.3
    h = np.asarray((PC - RC) - (PR - RR))
    got = dpo_loss(PC, PR, RC, RR, beta=beta)
    np.testing.assert_allclose(got, -_np_log_sigmoid(beta * h), rtol=1e-5)
    # d/d(pc) = −β σ(−βh); d/d(pr) = +β σ(−βh)
    sig = 1 / (1 + np.exp(beta * h))
    g_c, g_r = jax.grad(lambda c, r: dpo_loss(c, r, RC, RR, beta=beta).sum(), argnums=(0, 1))(
        PC, PR
    )
    np.testing.assert_allclose(g_c, -beta * sig, rtol=1e-5)
    np.testing.assert_allclose(g_r, beta * sig, rtol=1e-5)


def test_dpo_with_reference_equal_to_policy_is_log2():
    got = dpo_loss(PC, PR, PC, PR, beta=0.1)
    np.testing.assert_allclose(got, np.full(16, np.log(2.0)), rtol=1e-6)


def test_conservative_ipo_hinge_simpo():
    beta, eps = 0.5, 0.1
    h = np.asarray((PC - RC) - (PR - RR))
    np.testing.assert_allclose(
        dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps),
        -(1 - eps) * _np_log_sigmoid(beta * h) - eps * _np_log_sigmoid(-beta * h),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        dpo_loss(PC, PR, RC, RR, beta=beta, kind="ipo"), (h - 1 / (2 * beta)) ** 2, rtol=1e-5
    )
    np.testing.assert_allclose(
        dpo_loss(PC, PR, RC, RR, beta=beta, kind="hinge"), np.maximum(0, 1 - beta * h), rtol=1e-5
    )
    simpo = dpo_loss(PC / 10, PR / 10, RC, RR, beta=2.0, kind="simpo", simpo_gamma=0.3)
    np.testing.assert_allclose(
        simpo, -_np_log_sigmoid(2.0 * np.asarray(PC / 10 - PR / 10) - 0.3), rtol=1e-5
    )
    with pytest.raises(ValueError, match="valid kinds"):
        dpo_loss(PC, PR, RC, RR, beta=beta, kind="nope")


def test_causal_lm_loss_masks_tokens():
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, size=(2, 5)))
    mask = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    logp = np.asarray(jax.nn.log_softmax(logits))
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    expected = -(picked * np.asarray(mask)).sum() / np.asarray(mask).sum()
    np.testing.assert_allclose(causal_lm_loss(logits, targets, mask), expected, rtol=1e-6)
    np.testing.assert_allclose(
        sequence_logps(logits, targets, mask), (picked * np.asarray(mask)).sum(-1), rtol=1e-6
    )
    # Changing a masked-out target changes nothing.
    other = targets.at[0, 0].set((targets[0, 0] + 1) % 7)
    assert causal_lm_loss(logits, other, mask) == causal_lm_loss(logits, targets, mask)
