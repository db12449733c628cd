"""ORPO, retention and distillation terms, and composite objectives, against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.objectives.preference import orpo_loss, preference_metrics
from jaxcl.objectives.reference import annotate_reference_logps, make_pair_logps_fn
from jaxcl.objectives.retention import confidence_weights, cppo_penalty, distill_kl, token_kl
from jaxcl.objectives.terms import (
    compose_objective,
    cppo_term,
    distill_term,
    dpo_term,
    kl_term,
    lm_term,
    orpo_term,
)

rng = np.random.default_rng(1)
V, D, B, L = 11, 6, 3, 7


def _np_log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_orpo_closed_form_and_gradient():
    lw = jnp.asarray(rng.uniform(-3, -0.05, 8), jnp.float32)
    ll = jnp.asarray(rng.uniform(-3, -0.05, 8), jnp.float32)
    w, l_ = np.asarray(lw, np.float64), np.asarray(ll, np.float64)
    z = (w - np.log(1 - np.exp(w))) - (l_ - np.log(1 - np.exp(l_)))
    np.testing.assert_allclose(orpo_loss(lw, ll), -_np_log_sigmoid(z), rtol=1e-4)
    g_w, g_l = jax.grad(lambda a, b: orpo_loss(a, b).sum(), argnums=(0, 1))(lw, ll)
    sig = 1 / (1 + np.exp(z))  # σ(−z)
    np.testing.assert_allclose(g_w, -sig / (1 - np.exp(w)), rtol=1e-3)
    np.testing.assert_allclose(g_l, sig / (1 - np.exp(l_)), rtol=1e-3)


def test_preference_metrics_like_trl():
    pc, pr, rc, rr = (jnp.asarray(rng.normal(-10, 3, 5), jnp.float32) for _ in range(4))
    m = preference_metrics(pc, pr, rc, rr, beta=0.2)
    r_c, r_r = 0.2 * np.asarray(pc - rc), 0.2 * np.asarray(pr - rr)
    np.testing.assert_allclose(m["rewards/chosen"], r_c.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], (r_c - r_r).mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/accuracies"], (r_c > r_r).mean())
    np.testing.assert_allclose(m["logps/rejected"], np.asarray(pr).mean(), rtol=1e-6)


def test_cppo_penalty_and_gradient():
    pol = jnp.asarray(rng.normal(-20, 4, 6), jnp.float32)
    prev = jnp.asarray(rng.normal(-20, 4, 6), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 2, 6), jnp.float32)
    d = np.asarray(pol - prev)
    np.testing.assert_allclose(cppo_penalty(pol, prev, w), np.asarray(w) * d**2, rtol=1e-5)
    np.testing.assert_allclose(cppo_penalty(pol, prev), d**2, rtol=1e-5)
    g = jax.grad(lambda p: cppo_penalty(p, prev, w).sum())(pol)
    np.testing.assert_allclose(g, 2 * np.asarray(w) * d, rtol=1e-5)
    cw = np.asarray(confidence_weights(jnp.asarray([-0.1, -1.0, -3.0])))
    c = np.exp([-0.1, -1.0, -3.0])
    np.testing.assert_allclose(cw, 3 * c / c.sum(), rtol=1e-5)
    assert cw.mean() == pytest.approx(1.0)


def test_token_kl_and_distillation_closed_forms():
    p_logits = rng.normal(size=(2, 4, V)).astype(np.float32)
    q_logits = rng.normal(size=(2, 4, V)).astype(np.float32)
    lp, lq = _np_log_softmax(p_logits), _np_log_softmax(q_logits)
    np.testing.assert_allclose(
        token_kl(p_logits, q_logits), (np.exp(lp) * (lp - lq)).sum(-1), rtol=1e-4
    )
    assert float(jnp.abs(token_kl(p_logits, p_logits)).max()) < 1e-5
    T, k = 2.0, 3
    lp_t, lq_t = _np_log_softmax(p_logits / T), _np_log_softmax(q_logits / T)
    full = T * T * (np.exp(lp_t) * (lp_t - lq_t)).sum(-1)
    np.testing.assert_allclose(
        distill_kl(p_logits, q_logits, temperature=T), full, rtol=1e-4, atol=1e-6
    )
    # top-k: the teacher renormalised over its k most likely tokens
    top = np.argsort(-p_logits, axis=-1)[..., :k]
    zt = np.take_along_axis(p_logits / T, top, -1)
    lpk = _np_log_softmax(zt)
    expect = T * T * (np.exp(lpk) * (lpk - np.take_along_axis(lq_t, top, -1))).sum(-1)
    got = distill_kl(p_logits, q_logits, temperature=T, top_k=k)
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-6)
    # gradient w.r.t. the student's logits: T (q_T − p_T)
    g = jax.grad(lambda q: distill_kl(p_logits, q, temperature=T).sum())(jnp.asarray(q_logits))
    np.testing.assert_allclose(g, T * (np.exp(lq_t) - np.exp(lp_t)), rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- composite


def _apply(params, ids):
    return jnp.tanh(params["emb"][ids]) @ params["out"]


def _params(seed):
    r = np.random.default_rng(seed)
    return {
        "emb": jnp.asarray(r.normal(size=(V, D)), jnp.float32),
        "out": jnp.asarray(r.normal(size=(D, V)), jnp.float32),
    }


def _pair_batch():
    def side():
        tokens = rng.integers(0, V, size=(B, L + 1)).astype(np.int32)
        mask = np.zeros((B, L + 1), np.float32)
        mask[:, 3:] = 1
        mask[0, -2:] = 0  # a shorter response
        return jnp.asarray(tokens), jnp.asarray(mask)

    (ct, cm), (rt, rm) = side(), side()
    return {"chosen_tokens": ct, "chosen_mask": cm, "rejected_tokens": rt, "rejected_mask": rm}


def _seq_logps(params, tokens, mask):
    lp = _np_log_softmax(np.asarray(_apply(params, tokens[:, :-1]), np.float64))
    picked = np.take_along_axis(lp, np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
    m = np.asarray(mask[:, 1:])
    return (picked * m).sum(-1), m.sum(-1), picked, m


def test_dpo_objective_with_reference_equal_to_policy_is_log2_with_zero_rewards():
    params, batch = _params(0), _pair_batch()
    obj = compose_objective(_apply, [dpo_term(beta=0.3)])
    assert obj.frozen == ("reference",)
    loss, m = obj.loss_fn(params, batch, {"reference": params})
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(m[key])) < 1e-6
    assert float(m["rewards/accuracies"]) == 0.0


def test_composite_equals_weighted_sum_of_closed_forms():
    params, prev, batch = _params(0), _params(1), _pair_batch()
    beta = 0.3
    obj = compose_objective(
        _apply,
        [
            dpo_term(beta=beta),
            lm_term(0.5),
            orpo_term(0.1),
            cppo_term(0.2),
            kl_term(0.7),
            distill_term(0.4, temperature=2.0),
        ],
    )
    assert set(obj.frozen) == {"reference", "task_start"}
    loss, m = obj.loss_fn(params, batch, {"reference": prev, "task_start": prev})
    ct, cm, rt, rm = (
        batch[k] for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")
    )
    pc, nc, pick_c, mc = _seq_logps(params, ct, cm)
    pr, nr, _, mr = _seq_logps(params, rt, rm)
    rc, _, _, _ = _seq_logps(prev, ct, cm)
    rr, _, _, _ = _seq_logps(prev, rt, rm)
    h = (pc - rc) - (pr - rr)
    dpo = np.mean(-_np_log_sigmoid(beta * h))
    lm = -(pick_c * mc).sum() / mc.sum()
    w, l_ = pc / nc, pr / nr
    orpo = np.mean(-_np_log_sigmoid((w - np.log1p(-np.exp(w))) - (l_ - np.log1p(-np.exp(l_)))))
    cppo = np.mean(np.concatenate([(pc - rc) ** 2, (pr - rr) ** 2]))
    tokens = np.concatenate([ct, rt])
    mask = np.concatenate([mc, mr])
    zp = np.asarray(_apply(params, tokens[:, :-1]), np.float64)
    zq = np.asarray(_apply(prev, tokens[:, :-1]), np.float64)
    lp, lq = _np_log_softmax(zp), _np_log_softmax(zq)
    kl = ((np.exp(lp) * (lp - lq)).sum(-1) * mask).sum() / mask.sum()
    lp2, lq2 = _np_log_softmax(zq / 2), _np_log_softmax(zp / 2)
    distill = (4 * (np.exp(lp2) * (lp2 - lq2)).sum(-1) * mask).sum() / mask.sum()
    parts = {"dpo": dpo, "lm": lm, "orpo": orpo, "cppo": cppo, "kl": kl, "distill": distill}
    for name, value in parts.items():
        np.testing.assert_allclose(m[f"terms/{name}"], value, rtol=2e-4, err_msg=name)
    weights = {"dpo": 1, "lm": 0.5, "orpo": 0.1, "cppo": 0.2, "kl": 0.7, "distill": 0.4}
    np.testing.assert_allclose(loss, sum(weights[k] * v for k, v in parts.items()), rtol=2e-4)


def test_retention_terms_vanish_with_zero_gradient_at_the_previous_policy():
    params, batch = _params(0), {"tokens": jnp.asarray(rng.integers(0, V, (B, L + 1)))}
    batch["loss_mask"] = jnp.ones((B, L + 1), jnp.float32)
    obj = compose_objective(
        _apply, [cppo_term(1.0), kl_term(1.0), distill_term(1.0, temperature=3.0)]
    )
    grad, m = jax.grad(lambda p: obj.loss_fn(p, batch, {"task_start": params}), has_aux=True)(
        params
    )
    assert float(m["loss"]) == pytest.approx(0.0, abs=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) < 1e-5


def test_simpo_term_uses_length_normalised_logps_without_reference():
    params, batch = _params(0), _pair_batch()
    obj = compose_objective(_apply, [dpo_term(beta=2.0, kind="simpo", simpo_gamma=0.3)])
    assert obj.frozen == ()
    loss, _ = obj.loss_fn(params, batch, {})
    pc, nc, _, _ = _seq_logps(params, batch["chosen_tokens"], batch["chosen_mask"])
    pr, nr, _, _ = _seq_logps(params, batch["rejected_tokens"], batch["rejected_mask"])
    expect = np.mean(-_np_log_sigmoid(2.0 * (pc / nc - pr / nr) - 0.3))
    np.testing.assert_allclose(loss, expect, rtol=1e-5)


def test_precomputed_reference_matches_on_the_fly_and_frees_the_tree():
    params, ref, batch = _params(0), _params(2), _pair_batch()
    rows = [{k: np.asarray(v[i]) for k, v in batch.items()} for i in range(B)]
    annotated = annotate_reference_logps(make_pair_logps_fn(_apply), ref, rows, batch_size=2)
    cached = {k: jnp.stack([r[k] for r in annotated]) for k in annotated[0]}
    live = compose_objective(_apply, [dpo_term(beta=0.1)])
    pre = compose_objective(
        _apply, [dpo_term(beta=0.1, precomputed=True)], precompute=("reference",)
    )
    assert pre.frozen == () and pre.precompute == ("reference",)
    (l1, m1), g1 = jax.value_and_grad(live.loss_fn, has_aux=True)(params, batch, {"reference": ref})
    (l2, m2), g2 = jax.value_and_grad(pre.loss_fn, has_aux=True)(params, cached, {})
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(m1["rewards/margins"], m2["rewards/margins"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(KeyError, match="annotate_reference_logps"):
        pre.loss_fn(params, batch, {})


def test_pair_terms_refuse_lm_batches():
    batch = {"tokens": jnp.zeros((B, L + 1), jnp.int32), "loss_mask": jnp.ones((B, L + 1))}
    with pytest.raises(ValueError, match="needs preference pairs"):
        compose_objective(_apply, [orpo_term()]).loss_fn(_params(0), batch, {})
    with pytest.raises(ValueError, match="unique"):
        compose_objective(_apply, [lm_term(), lm_term()])
