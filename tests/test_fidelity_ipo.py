"""IPO (Azar et al., 2023) against an independent numpy oracle of TRL's ``loss_type="ipo"``.

TRL's ``DPOTrainer.concatenated_forward`` sums each sequence's response-token log-probs and, for
IPO only, divides the sum by the number of response tokens (``all_logps / loss_mask.sum(-1)``),
for the policy and (through the same forward on the reference model) the reference; the loss is
then Eq. 17 of the IPO paper with τ = β: ``((ℓ̄_θ(w) − ℓ̄_ref(w)) − (ℓ̄_θ(l) − ℓ̄_ref(l)) −
1/(2β))²``, averaged over the batch, and the logged rewards are ``β (ℓ̄_θ − ℓ̄_ref)``. The oracle
below recomputes that from the logits in float64 numpy, on a model whose parameter tree has leaves
of three shapes and on responses of different lengths (so sums and means disagree).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.objectives.bound import dpo_objective
from jaxcl.objectives.reference import annotate_reference_logps, make_pair_logps_fn
from jaxcl.objectives.terms import compose_objective, dpo_term

V, D, B, L = 13, 5, 4, 9
BETA = 0.3


def _apply(params, ids):
    return jnp.tanh(params["emb"][ids] + params["bias"]) @ params["head"]["w"]


def _params(seed):
    r = np.random.default_rng(seed)
    return {
        "emb": jnp.asarray(r.normal(size=(V, D)), jnp.float32),
        "bias": jnp.asarray(r.normal(size=(D,)), jnp.float32),
        "head": {"w": jnp.asarray(r.normal(size=(D, V)), jnp.float32)},
    }


def _batch(seed=0):
    """Pairs whose chosen and rejected responses have different lengths (1 to 6 tokens)."""
    r = np.random.default_rng(seed)
    out = {}
    prompt = 3
    for side, lengths in (("chosen", [2, 6, 1, 4]), ("rejected", [5, 1, 6, 3])):
        tokens = r.integers(0, V, size=(B, L + 1)).astype(np.int32)
        mask = np.zeros((B, L + 1), np.float32)
        for b, n in enumerate(lengths):
            mask[b, prompt : prompt + n] = 1
        out[f"{side}_tokens"], out[f"{side}_mask"] = jnp.asarray(tokens), jnp.asarray(mask)
    return out


# ----------------------------------------------------------------------------- numpy oracle


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_forward(params, ids):
    p = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "head"}
    w = np.asarray(params["head"]["w"], np.float64)
    return np.tanh(p["emb"][ids] + p["bias"]) @ w


def _np_mean_logps(params, tokens, mask):
    """TRL: per-token log-probs of the labels, summed under the loss mask, / mask.sum(-1)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask, np.float64)
    logp = _np_log_softmax(_np_forward(params, tokens[:, :-1]))
    picked = np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    m = mask[:, 1:]
    return (picked * m).sum(-1) / m.sum(-1), (picked * m).sum(-1)


def _np_ipo(policy, reference, batch, beta=BETA):
    pc, pc_sum = _np_mean_logps(policy, batch["chosen_tokens"], batch["chosen_mask"])
    pr, pr_sum = _np_mean_logps(policy, batch["rejected_tokens"], batch["rejected_mask"])
    rc, rc_sum = _np_mean_logps(reference, batch["chosen_tokens"], batch["chosen_mask"])
    rr, rr_sum = _np_mean_logps(reference, batch["rejected_tokens"], batch["rejected_mask"])
    h = (pc - rc) - (pr - rr)
    h_sum = (pc_sum - rc_sum) - (pr_sum - rr_sum)
    return {
        "loss": np.mean((h - 1 / (2 * beta)) ** 2),
        "summed_loss": np.mean((h_sum - 1 / (2 * beta)) ** 2),  # the old, unfaithful input
        "rewards/chosen": np.mean(beta * (pc - rc)),
        "rewards/margins": np.mean(beta * (pc - rc) - beta * (pr - rr)),
        "logps/chosen": np.mean(pc),
    }


# ----------------------------------------------------------------------------- tests


def test_ipo_term_uses_length_averaged_logps_like_trl():
    policy, reference, batch = _params(0), _params(1), _batch()
    expect = _np_ipo(policy, reference, batch)
    # responses of unequal lengths make the summed and averaged losses far apart
    assert abs(expect["summed_loss"] - expect["loss"]) > 0.5 * expect["loss"]
    obj = compose_objective(_apply, [dpo_term(beta=BETA, kind="ipo")])
    loss, metrics = obj.loss_fn(policy, batch, {"reference": reference})
    np.testing.assert_allclose(float(loss), expect["loss"], rtol=1e-5)
    for key in ("rewards/chosen", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(float(metrics[key]), expect[key], rtol=1e-4, atol=1e-6)


def test_ipo_with_precomputed_reference_logps_matches_the_oracle():
    """The cached reference log-probs are sums; the term averages them by the same lengths."""
    policy, reference, batch = _params(0), _params(2), _batch(1)
    rows = [{k: np.asarray(v[i]) for k, v in batch.items()} for i in range(B)]
    cached = annotate_reference_logps(make_pair_logps_fn(_apply), reference, rows, batch_size=2)
    stacked = {k: jnp.stack([r[k] for r in cached]) for k in cached[0]}
    obj = compose_objective(
        _apply, [dpo_term(beta=BETA, kind="ipo", precomputed=True)], precompute=("reference",)
    )
    loss, _ = obj.loss_fn(policy, stacked, {})
    np.testing.assert_allclose(float(loss), _np_ipo(policy, reference, batch)["loss"], rtol=1e-5)


@pytest.mark.parametrize("beta", [0.05, 1.0])
def test_direct_dpo_objective_with_ipo_matches_the_oracle(beta):
    policy, reference, batch = _params(3), _params(4), _batch(2)
    obj = dpo_objective(_apply, beta=beta, kind="ipo")
    loss, metrics = obj.loss_fn(policy, batch, {"reference": reference})
    expect = _np_ipo(policy, reference, batch, beta)
    np.testing.assert_allclose(float(loss), expect["loss"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), expect["rewards/margins"], 1e-4)


def test_ipo_minimum_sits_at_the_target_margin():
    """At a policy whose averaged margin h equals 1/(2β) the loss and its gradient vanish: shift
    the reference so that h = 1/(2β) exactly on every pair (the closed form's minimiser)."""
    policy, batch = _params(5), _batch(3)
    pc, _ = _np_mean_logps(policy, batch["chosen_tokens"], batch["chosen_mask"])
    pr, _ = _np_mean_logps(policy, batch["rejected_tokens"], batch["rejected_mask"])
    lengths = {s: np.asarray(batch[f"{s}_mask"])[:, 1:].sum(-1) for s in ("chosen", "rejected")}
    # reference means rr = pr and rc = pc − 1/(2β): then (pc − rc) − (pr − rr) = 1/(2β)
    rc = pc - 1 / (2 * BETA)
    stacked = dict(batch)
    stacked["ref_chosen_logps"] = jnp.asarray(rc * lengths["chosen"], jnp.float32)
    stacked["ref_rejected_logps"] = jnp.asarray(pr * lengths["rejected"], jnp.float32)
    obj = compose_objective(_apply, [dpo_term(beta=BETA, kind="ipo", precomputed=True)])
    (loss, _), grad = jax.value_and_grad(obj.loss_fn, has_aux=True)(policy, stacked, {})
    assert float(loss) < 1e-8
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) < 1e-4
