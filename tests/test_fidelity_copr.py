"""COPR (Zhang et al., arXiv 2310.15694 / 2402.14228, ACL Findings 2025) against hand-worked
examples and an independent numpy implementation of the paper's formulas:

* the sampling distribution of the optimal policy on the ranked set ``Y_x``,
  ``P*(y_j|Y_x) ∝ π_{t−1}(y_j|x) exp(Adv_j/β)``, with the moderate (linear) advantage
  ``Adv(x, y_j) = r (2j/(J−1) − (J+1)/(J−1))``, ``j = 1`` the worst response;
* the fitting loss ``Σ_y |Y_x|^{-1} (log P_θ(y|Y_x) − log P*(y|Y_x))²``;
* the Lagrangian ``J_t + Σ_i λ_i J_{C_i}`` and the dual ascent ``λ ← max(0, λ + η J_C)``;
* the method's task-boundary actions (the stored historical targets, the multipliers' update)
  and its gradient through the trainer's memory gradients;

and a forgetting comparison on the built-in ``test-micro`` model: COPR against DPO and DPO + KL
on two preference shifts (slow).
"""

import copy
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.data.replay import ReplayBuffer
from jaxcl.methods.copr import CoprSpec, CoprState, copr_constraints, memory_targets
from jaxcl.methods.isolate import find_state, replace_state
from jaxcl.methods.protocol import Carry, Context, TaskInfo, run_hooks, run_step_hooks
from jaxcl.objectives.copr import (
    TARGET_KEY,
    copr_term,
    dual_ascent,
    fit_loss,
    lagrangian,
    optimal_logps,
    rank_advantages,
)
from jaxcl.objectives.terms import compose_objective
from jaxcl.train.step import TrainState

V, D, B, L = 11, 6, 4, 7
EPS = 1e-5  # central differences, float64
KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")


# ----------------------------------------------------------------------------- numpy oracle


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_advantages(J, r):
    """The paper's ``Adv(x, y_j) = r (2j/(J−1) − (J+1)/(J−1))``, ``j = 1..J`` (1 = worst),
    returned best first (jaxcl's order: chosen before rejected)."""
    j = np.arange(1, J + 1, dtype=np.float64)
    return (r * (2 * j / (J - 1) - (J + 1) / (J - 1)))[::-1]


def np_optimal(ref_logps, adv, beta):
    """``P*(y|Y_x) = π_ref(y|x) e^{Adv/β} / Σ_{y'} π_ref(y'|x) e^{Adv'/β}`` in probability
    space (the partition function over Y_x), as log-probabilities."""
    w = np.exp(np.asarray(ref_logps, np.float64) - np.max(ref_logps, -1, keepdims=True))
    w = w * np.exp(adv / beta)
    return np.log(w / w.sum(-1, keepdims=True))


def np_fit(policy_logps, target):
    p = np.exp(np.asarray(policy_logps, np.float64))  # tiny sequences: no underflow here
    p_set = p / p.sum(-1, keepdims=True)
    return np.mean((np.log(p_set) - target) ** 2, axis=-1)


def _apply(params, ids):
    return jnp.tanh(params["emb"][ids]) @ params["out"]


def _params(seed):
    r = np.random.default_rng(seed)
    return {
        "emb": jnp.asarray(r.normal(size=(V, D)), jnp.float32),
        "out": jnp.asarray(r.normal(size=(D, V)), jnp.float32),
    }


def _rows(n, seed):
    """``n`` encoded pairs (response tokens from position 3 on, some shorter)."""
    r = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {}
        for side in ("chosen", "rejected"):
            mask = np.zeros(L + 1, np.float32)
            mask[3 : L + 1 - (i + (side == "rejected")) % 3] = 1
            row[f"{side}_tokens"] = r.integers(0, V, L + 1).astype(np.int32)
            row[f"{side}_mask"] = mask
        rows.append(row)
    return rows


def _batch(rows, keys=KEYS):
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in keys}


def np_seq_logps(params, tokens, mask):
    """Summed response log-probabilities and the per-token ones, float64."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    tokens, mask = np.asarray(tokens), np.asarray(mask, np.float64)
    logits = np.tanh(params["emb"][tokens[:, :-1]]) @ params["out"]
    picked = np.take_along_axis(np_log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
    return (picked * mask[:, 1:]).sum(-1), picked, mask[:, 1:]


def np_pair_logps(params, rows):
    b = _batch(rows)
    c, pick_c, m_c = np_seq_logps(params, b["chosen_tokens"], b["chosen_mask"])
    r, _, _ = np_seq_logps(params, b["rejected_tokens"], b["rejected_mask"])
    return np.stack([c, r], -1), pick_c, m_c


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("J", [2, 3, 4, 7])
def test_advantages_are_the_papers_linear_rank_reward(J):
    for r in (0.5, 1.0, 2.5):
        got = np.asarray(rank_advantages(J, r), np.float64)
        np.testing.assert_allclose(got, np_advantages(J, r), rtol=1e-6, atol=1e-7)
        assert got[0] == pytest.approx(r) and got[-1] == pytest.approx(-r)
        assert abs(got.sum()) < 1e-5  # zero mean: no baseline needed
        np.testing.assert_allclose(np.diff(got), -2 * r / (J - 1), rtol=1e-5)  # linear in rank
    # hand-worked: J = 3, r = 1 -> +1, 0, -1; a range per prompt broadcasts
    np.testing.assert_allclose(rank_advantages(3, 1.0), [1.0, 0.0, -1.0], atol=1e-7)
    per_prompt = rank_advantages(2, jnp.asarray([[0.5], [2.0]]))
    np.testing.assert_allclose(per_prompt, [[0.5, -0.5], [2.0, -2.0]])
    with pytest.raises(ValueError, match="at least 2"):
        rank_advantages(1)


def test_optimal_policy_target_hand_worked_pair():
    # π_ref: log π(w) = −10, log π(l) = −12; β = 0.1, r = 0.1 -> Adv/β = (+1, −1)
    # P*(w) = e^{−10+1} / (e^{−10+1} + e^{−12−1}) = σ(4) = 0.9820138
    target = optimal_logps(jnp.asarray([-10.0, -12.0]), rank_advantages(2, 0.1), beta=0.1)
    np.testing.assert_allclose(np.exp(target), [0.9820138, 0.0179862], rtol=1e-5)
    # the policy at even odds: log P_θ = (log ½, log ½); the fit is the mean squared gap
    # ((−0.693147 + 0.018150)² + (−0.693147 + 4.018150)²) / 2 = 5.755632
    loss = fit_loss(jnp.asarray([-11.0, -11.0]), target)
    np.testing.assert_allclose(loss, 5.755632, rtol=1e-5)


@pytest.mark.parametrize("J", [2, 4, 6])
def test_optimal_target_and_fit_match_the_numpy_oracle(J):
    rng = np.random.default_rng(J)
    ref = rng.normal(-30, 6, (5, J))
    pol = rng.normal(-30, 6, (5, J))
    beta, r = 0.3, 0.7
    target = optimal_logps(jnp.asarray(ref, jnp.float32), rank_advantages(J, r), beta=beta)
    want = np_optimal(ref, np_advantages(J, r), beta)
    np.testing.assert_allclose(target, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.exp(target).sum(-1), 1.0, rtol=1e-5)
    # a constant shift of every reward (or of log π_ref) cancels: Z is never needed
    shifted = optimal_logps(
        jnp.asarray(ref + 5.0, jnp.float32), rank_advantages(J, r) + 3.0, beta=beta
    )
    np.testing.assert_allclose(shifted, target, atol=2e-5)
    pol_small = pol / 10  # exp() of the oracle's probability space stays finite
    got = fit_loss(jnp.asarray(pol_small, jnp.float32), jnp.asarray(want, jnp.float32))
    np.testing.assert_allclose(got, np_fit(pol_small, want), rtol=1e-5)
    # the fit is zero exactly when P_θ = P* on Y_x (any common shift of the policy's log-probs)
    np.testing.assert_allclose(
        fit_loss(jnp.asarray(want + 4.0, jnp.float32), target), 0.0, atol=1e-9
    )
    # its gradient in log π_θ(y_j): (2/J)(e_j − P_θ(y_j) Σ_k e_k), e = log P_θ − log P*
    grad = jax.grad(lambda x: fit_loss(x, target).sum())(jnp.asarray(pol, jnp.float32))
    e = np_log_softmax(pol) - want
    p = np.exp(np_log_softmax(pol))
    np.testing.assert_allclose(
        grad, 2 / J * (e - p * e.sum(-1, keepdims=True)), rtol=1e-4, atol=1e-5
    )


def test_pair_fit_is_minimal_where_the_margin_exceeds_the_reference_by_2r_over_beta():
    beta, r = 0.1, 0.05  # 2r/β = 1 nat
    ref = jnp.asarray([-20.0, -23.0])  # reference margin 3
    target = optimal_logps(ref, rank_advantages(2, r), beta=beta)
    margins = np.linspace(-2, 10, 1201)
    fits = [float(fit_loss(jnp.asarray([m, 0.0]), target)) for m in margins]
    assert margins[int(np.argmin(fits))] == pytest.approx(3.0 + 2 * r / beta, abs=0.02)
    # unlike DPO's, the loss rises again past the target: the margin stays bounded
    assert fits[-1] > 10 * min(fits) + 1.0


def test_lagrangian_and_dual_ascent_hand_worked():
    lam = jnp.asarray([0.5, 0.0, 2.0])
    c = jnp.asarray([0.3, 0.05, 0.0])
    # J_t + Σ λ_i (c_i − d_i) = 1 + 0.5·0.2 + 0 + 2·(−0.1) = 0.9
    np.testing.assert_allclose(lagrangian(1.0, c, lam, 0.1), 0.9, rtol=1e-6)
    # λ_i ← max(0, λ_i + η (c_i − d_i)), η = 2, d = 0.1: (0.9, max(0, −0.1) = 0, 1.8)
    np.testing.assert_allclose(
        dual_ascent(lam, c, lr=2.0, thresholds=0.1), [0.9, 0.0, 1.8], rtol=1e-6
    )
    # the ascent step is the Lagrangian's gradient in λ, projected on λ ≥ 0
    g = jax.grad(lambda m: lagrangian(1.0, c, m, 0.1))(lam)
    np.testing.assert_allclose(g, np.asarray(c) - 0.1, rtol=1e-6)
    # repeated: a violated constraint's multiplier grows linearly, a satisfied one decays to 0
    lam2 = jnp.asarray([1.0, 1.0])
    for _ in range(60):
        lam2 = dual_ascent(lam2, jnp.asarray([0.5, 0.0]), lr=0.1, thresholds=0.2)
    np.testing.assert_allclose(lam2, [1.0 + 60 * 0.1 * 0.3, 0.0], rtol=1e-5)


# ----------------------------------------------------------------------------- the term


def test_copr_term_on_a_model_matches_the_oracle_on_current_and_memory_batches():
    params, prev = _params(0), _params(1)
    rows = _rows(B, 0)
    beta, r, sft = 0.2, 0.4, 0.3
    obj = compose_objective(_apply, [copr_term(beta=beta, reward_range=r, sft=sft)])
    assert obj.frozen == ("task_start",) and obj.terms == ("copr",)
    loss, m = obj.loss_fn(params, _batch(rows), {"task_start": prev})
    pol, pick_c, m_c = np_pair_logps(params, rows)
    ref, _, _ = np_pair_logps(prev, rows)
    target = np_optimal(ref, np_advantages(2, r), beta)
    fit = np.mean((np_log_softmax(pol) - target) ** 2)
    nll = -(pick_c * m_c).sum() / m_c.sum()
    np.testing.assert_allclose(m["copr/fit"], fit, rtol=1e-4)
    np.testing.assert_allclose(m["copr/sft"], nll, rtol=1e-5)
    np.testing.assert_allclose(loss, fit + sft * nll, rtol=1e-4)
    np.testing.assert_allclose(m["copr/target_chosen"], np.exp(target[:, 0]).mean(), rtol=1e-4)
    # a memory batch carries stored targets: the term is the fit to them (the constraint)
    stored = np.asarray(np_optimal(pol * 0.5, np_advantages(2, 1.0), 0.5), np.float32)
    memory = dict(_batch(rows), **{TARGET_KEY: jnp.asarray(stored)})
    value, mm = obj.loss_fn(params, memory, {"task_start": prev})
    want = np.mean((np_log_softmax(pol) - stored) ** 2)
    np.testing.assert_allclose(value, want, rtol=1e-4)
    np.testing.assert_allclose(mm["copr/constraint"], want, rtol=1e-4)
    # at the task start (policy = π_{t−1}) a small step down the fit's gradient raises the
    # chosen responses' share of Y_x
    fit_only = copr_term(beta=beta, reward_range=r, sft=0.0)
    grad = jax.grad(lambda p: fit_only.fn(_pass(p, rows, prev))[0])(prev)
    step = jax.tree.map(lambda p, g: p - 1e-3 * g, prev, grad)
    before, after = np_pair_logps(prev, rows)[0], np_pair_logps(step, rows)[0]
    assert np.mean(after[:, 0] - after[:, 1]) > np.mean(before[:, 0] - before[:, 1])


def _pass(params, rows, prev):
    from jaxcl.objectives.terms import Pass

    return Pass(_apply, params, _batch(rows), {"task_start": prev})


# ----------------------------------------------------------------------------- the method


def _ctx(task_name, rows, index=0, names=("a", "b", "c")):
    info = TaskInfo(index, task_name, 10, rows, [f"q{i}" for i in range(len(rows))], names)
    return Context(
        info,
        loss_fn=None,
        apply=_apply,
        split=lambda p: (p, {}),
        join=lambda t, f: t,
        batches=None,
    )


def _chain(spec):
    return optax.chain(spec.transform(), optax.sgd(0.1))


def test_memory_hook_stores_the_historical_targets_of_the_policy_the_task_started_from():
    spec = CoprSpec(name="copr", beta=0.25, reward_range=0.6, capacity=5)
    start, end = _params(3), _params(4)  # π_{i−1} (task start) and the trained policy
    rows = _rows(9, 1)
    tx = _chain(spec)
    carry = Carry(
        TrainState(jnp.asarray(10), end, tx.init(end)),
        {"task_start": start},
        spec.new_memory(seed=0, n_tasks=2),
    )
    carry = run_hooks(spec.hooks(), "memory", _ctx("a", rows), carry)
    kept = carry.buffer.stored("a")
    assert len(kept) == 5 and all(TARGET_KEY in row for row in kept)  # a reservoir sample
    ref, _, _ = np_pair_logps(start, kept)
    want = np_optimal(ref, np_advantages(2, 0.6), 0.25)
    got = np.stack([row[TARGET_KEY] for row in kept])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # each kept row is one of the task's pairs, unchanged
    for row in kept:
        assert any(all(np.array_equal(row[k], r[k]) for k in KEYS) for r in rows)
    # the default threshold d_a: the fit to those targets under the policy that finished the
    # task, in the state (checkpointed) and the notes
    pol, _, _ = np_pair_logps(end, kept)
    d = np.mean((np_log_softmax(pol) - want) ** 2)
    state = find_state(carry.state.opt_state, CoprState)
    np.testing.assert_allclose(state.thresholds[0], d, rtol=1e-4)
    np.testing.assert_allclose(state.thresholds[1:], 0.0)
    assert carry.buffer.notes["a"]["threshold"] == pytest.approx(d, rel=1e-4)
    # during the next task, at the policy that stored them, c_a = d_a: λ_a does not move
    nxt = run_step_hooks(spec.hooks(), 0, _ctx("b", rows, 1), carry)
    lam = find_state(nxt.state.opt_state, CoprState).multipliers
    np.testing.assert_allclose(lam[0], spec.lam_init, atol=1e-5)
    # without the task-start policy (no copr term in the objective) the hook refuses
    with pytest.raises(ValueError, match="copr term"):
        run_hooks(spec.hooks(), "memory", _ctx("b", rows, 1), carry._replace(frozen={}))


def test_dual_hook_is_projected_ascent_on_each_tasks_constraint():
    spec = CoprSpec(
        name="copr", lam_init=0.5, dual_lr=0.8, threshold=0.3, dual_batch=6, capacity=12
    )
    params = _params(5)
    buf = ReplayBuffer(12, seed=0)
    for name, seed, tparams in (("a", 2, _params(6)), ("b", 3, _params(7))):
        rows = _rows(6, seed)
        ref, _, _ = np_pair_logps(tparams, rows)
        target = np_optimal(ref, np_advantages(2, 1.0), 0.1).astype(np.float32)
        buf.add_task(name, [dict(r, **{TARGET_KEY: t}) for r, t in zip(rows, target)])
    tx = _chain(spec)
    carry = Carry(TrainState(jnp.asarray(3), params, tx.init(params)), {}, buf)
    carry = run_step_hooks(spec.hooks(), 2, _ctx("c", _rows(4, 9), 2), carry)
    lam = np.asarray(find_state(carry.state.opt_state, CoprState).multipliers)
    want = []
    for name in ("a", "b"):
        stored = buf.stored(name)
        pol, _, _ = np_pair_logps(params, stored)
        c = np.mean((np_log_softmax(pol) - np.stack([r[TARGET_KEY] for r in stored])) ** 2)
        want.append(max(0.0, 0.5 + 0.8 * (c - 0.3)))
    np.testing.assert_allclose(lam[:2], want, rtol=1e-4)
    np.testing.assert_allclose(lam[2:], 0.5)  # tasks not yet in the memory keep λ_0
    # the memory phase records each earlier task's multiplier after the task
    carry = carry._replace(frozen={"task_start": params})
    carry = run_hooks(spec.hooks(), "memory", _ctx("c", _rows(4, 9), 2), carry)
    assert buf.notes["a"]["lambda"]["c"] == pytest.approx(want[0], rel=1e-5)
    # during the first task (empty memory) the hook changes nothing
    empty = Carry(TrainState(jnp.asarray(1), params, tx.init(params)), {}, ReplayBuffer(4))
    out = run_step_hooks(spec.hooks(), 0, _ctx("a", _rows(2, 0)), empty)
    assert out is empty


def test_default_thresholds_lower_a_satisfied_multiplier_to_zero_and_raise_a_violated_one():
    """With the default thresholds (each task's stored ``d_i``), ten ascent steps against the
    numpy dual ascent ``λ_i ← max(0, λ_i + η (c_i − d_i))``: task a fits its targets better than
    when they were stored (``c_a < d_a``), so ``λ_a`` decays to 0; task b fits them worse, so
    ``λ_b`` grows."""
    spec = CoprSpec(name="copr", lam_init=0.5, dual_lr=0.5, dual_batch=6, capacity=12)
    assert spec.threshold is None
    params = _params(5)
    buf = ReplayBuffer(12, seed=0)
    cs = []
    for name, seed, tparams in (("a", 2, _params(6)), ("b", 3, _params(7))):
        rows = _rows(6, seed)
        ref, _, _ = np_pair_logps(tparams, rows)
        target = np_optimal(ref, np_advantages(2, 1.0), 0.1).astype(np.float32)
        buf.add_task(name, [dict(r, **{TARGET_KEY: t}) for r, t in zip(rows, target)])
        stored = buf.stored(name)
        pol, _, _ = np_pair_logps(params, stored)
        cs.append(np.mean((np_log_softmax(pol) - np.stack([r[TARGET_KEY] for r in stored])) ** 2))
    d = np.asarray([cs[0] + 0.3, cs[1] - 0.2])  # a satisfied, b violated
    tx = _chain(spec)
    opt = tx.init(params)
    state = find_state(opt, CoprState)
    state = state._replace(thresholds=state.thresholds.at[:2].set(jnp.asarray(d, jnp.float32)))
    carry = Carry(TrainState(jnp.asarray(0), params, replace_state(opt, CoprState, state)), {}, buf)
    want = np.asarray([0.5, 0.5])
    for k in range(10):
        carry = run_step_hooks(spec.hooks(), k, _ctx("c", _rows(4, 9), 2), carry)
        want = np.maximum(0.0, want + 0.5 * (np.asarray(cs) - d))  # the numpy oracle
        lam = np.asarray(find_state(carry.state.opt_state, CoprState).multipliers)
        np.testing.assert_allclose(lam[:2], want, rtol=1e-4, atol=1e-5)
    assert lam[0] == 0.0 and lam[1] == pytest.approx(0.5 + 10 * 0.5 * 0.2, rel=1e-4)
    np.testing.assert_allclose(lam[2:], 0.5)
    # an explicit threshold overrides the stored ones (one d for every task)
    fixed = spec.model_copy(update={"threshold": 0.0})
    out = run_step_hooks(fixed.hooks(), 0, _ctx("c", _rows(4, 9), 2), carry)
    got = np.asarray(find_state(out.state.opt_state, CoprState).multipliers)
    np.testing.assert_allclose(got[:2], np.maximum(0.0, lam[:2] + 0.5 * np.asarray(cs)), rtol=1e-4)


def test_update_is_the_lagrangian_gradient_through_the_trainers_memory_gradients():
    """The trainer differentiates the objective on the current batch and on one memory batch
    per earlier task; the transform adds Σ λ_i g_i. The result must be the θ-gradient of
    COPR's Lagrangian, checked by float64 central differences of the numpy Lagrangian along
    random directions."""
    beta, r, sft = 0.3, 0.5, 0.2
    params, prev = _params(10), _params(11)
    current = _rows(B, 20)
    memories = []
    for seed, old in ((21, _params(12)), (22, _params(13))):
        rows = _rows(B, seed)
        ref, _, _ = np_pair_logps(old, rows)
        target = np_optimal(ref, np_advantages(2, r), beta).astype(np.float32)
        memories.append([dict(row, **{TARGET_KEY: t}) for row, t in zip(rows, target)])
    obj = compose_objective(_apply, [copr_term(beta=beta, reward_range=r, sft=sft)])
    frozen = {"task_start": prev}
    grad = jax.grad(lambda p, b: obj.loss_fn(p, b, frozen)[0])
    g = grad(params, _batch(current))
    stacked = jax.tree.map(
        lambda *x: jnp.stack(x), *[grad(params, _batch(m, (*KEYS, TARGET_KEY))) for m in memories]
    )
    lam = np.asarray([0.7, 1.9], np.float32)
    tx = copr_constraints(lam_init=0.0, max_tasks=4)
    state = CoprState(jnp.zeros(4).at[:2].set(lam), jnp.zeros(4))
    update, same = tx.update(g, state, params, memory_grads=stacked)
    assert same is state

    ref, _, _ = np_pair_logps(prev, current)
    target_t = np_optimal(ref, np_advantages(2, r), beta)

    def np_lagrangian(p):
        pol, pick, mask = np_pair_logps(p, current)
        nll = -(pick * mask).sum() / mask.sum()
        j_t = np.mean((np_log_softmax(pol) - target_t) ** 2) + sft * nll
        cons = []
        for m in memories:
            pol_m, _, _ = np_pair_logps(p, m)
            stored = np.stack([x[TARGET_KEY] for x in m])
            cons.append(np.mean((np_log_softmax(pol_m) - stored) ** 2))
        return j_t + float(np.dot(lam, cons))

    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    for _ in range(3):
        direction = jax.tree.map(lambda x: rng.normal(size=x.shape), base)
        plus = jax.tree.map(lambda x, d: x + EPS * d, base, direction)
        minus = jax.tree.map(lambda x, d: x - EPS * d, base, direction)
        fd = (np_lagrangian(plus) - np_lagrangian(minus)) / (2 * EPS)
        got = sum(
            float(np.vdot(np.asarray(u, np.float64), d))
            for u, d in zip(jax.tree.leaves(update), jax.tree.leaves(direction))
        )
        assert got == pytest.approx(fd, rel=2e-3, abs=1e-4)


def test_memory_targets_use_the_full_tree_of_the_given_policy():
    rows = _rows(3, 4)
    ref_params = _params(8)
    out = memory_targets(_ctx("a", rows), ref_params, rows, beta=0.5, reward_range=2.0)
    ref, _, _ = np_pair_logps(ref_params, rows)
    np.testing.assert_allclose(
        np.stack([o[TARGET_KEY] for o in out]),
        np_optimal(ref, np_advantages(2, 2.0), 0.5),
        rtol=1e-4,
        atol=1e-5,
    )
    assert all("ref_chosen_logps" not in o for o in out)  # no precomputed-reference keys left


# ----------------------------------------------------------------------------- recipes


def _stage(kind="align", **extra):
    data = {"align": "pref/helpful", "instruct": "cit/sentiment"}[kind]
    stage = {
        "name": "s",
        "kind": kind,
        "seq_len": 64,
        "batch_size": 8,
        "steps_per_task": 4,
        "tasks": [
            {
                "name": n,
                "data": {
                    "bundled": data if kind == "instruct" else f"pref/{n}",
                    "train_size": 16,
                    "eval_size": 8,
                },
            }
            for n in ("helpful", "harmless")
        ],
        "methods": [{"name": "copr"}],
    }
    stage.update(extra)
    return {
        "name": "r",
        "out_dir": "/tmp/unused",
        "model": {"preset": "test-micro"},
        "stages": [stage],
    }


def test_recipe_method_adds_its_term_and_refuses_what_it_cannot_serve():
    from jaxcl.methods import CATALOG
    from jaxcl.objectives.spec import stage_objective
    from jaxcl.recipe import RecipeError, validate

    stage = validate(_stage()).stages[0]
    for obj in (stage_objective(stage, None), stage.build_objective(None)):
        assert obj.terms == ("copr",) and obj.frozen == ("task_start",)
    # beside the stage's own terms
    both = validate(_stage(terms=[{"name": "dpo"}])).stages[0]
    assert stage_objective(both, None).terms == ("dpo", "copr")
    assert "copr" in CATALOG and CATALOG["copr"].family == "alignment"

    def error(raw):
        with pytest.raises(RecipeError) as err:
            validate(raw)
        return str(err.value)

    msg = error(_stage("instruct"))
    assert "methods[0] (copr)" in msg and "preference pairs" in msg
    assert "dpo:" in error(_stage(dpo={"beta": 0.2}))
    msg = error(_stage(lora={"rank": 2, "per_task": True}))
    assert "lora.per_task" in msg
    raw = _stage()
    raw["stages"][0]["methods"].append({"name": "replay"})
    assert "memory" in error(raw)


def test_the_documented_copr_stage_validates():
    import re
    from pathlib import Path

    import yaml

    from jaxcl.objectives.spec import stage_objective
    from jaxcl.recipe import validate

    doc = (Path(__file__).parent.parent / "docs" / "alignment.md").read_text()
    section = doc[doc.index("## COPR") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (stage,) = yaml.safe_load(block)
    raw = {"name": "d", "out_dir": "/tmp/unused", "model": {"preset": "test-micro"}}
    stage = validate({**raw, "stages": [stage]}).stages[0]
    assert [m.name for m in stage.methods] == ["copr"]
    assert stage_objective(stage, None).terms == ("copr",)


# ----------------------------------------------------------------------------- forgetting


def _align(out, terms, methods=(), steps=30):
    stage = {
        "name": "align",
        "kind": "align",
        "seq_len": 96,
        "batch_size": 16,
        "steps_per_task": steps,
        "tasks": [
            {"name": n, "data": {"bundled": f"pref/{n}", "train_size": 256, "eval_size": 64}}
            for n in ("helpful", "harmless")
        ],
        "methods": list(methods),
    }
    if terms:
        stage["terms"] = terms
    return {
        "name": "copr-compare",
        "out_dir": str(out),
        "model": {"preset": "test-micro"},
        "optimizer": {"lr": 1e-3, "warmup_steps": 2, "schedule": "constant"},
        "log_every": 1000,
        "probes": False,
        "stages": [stage],
    }


def _helpful_margins(out, like_recipe):
    """Mean per-token log-likelihood margin (chosen − rejected) on the helpful eval set: before
    training and after each task (from the run's checkpoints)."""
    from jaxcl import checkpoint
    from jaxcl.data import encode_all, eval_batches
    from jaxcl.data.benchmarks import generate
    from jaxcl.eval import make_batch_scorer
    from jaxcl.train.step import make_apply

    graphdef, init, _, tok = like_recipe.model.build(0)
    score = make_batch_scorer(make_apply(graphdef))
    batch = eval_batches(
        encode_all(generate("pref/helpful", "eval", 64), "preference", tok, 96), 64
    )[0]

    def margin(p):
        nc, cc, _ = score(p, batch["chosen_tokens"], batch["chosen_mask"])
        nr, cr, _ = score(p, batch["rejected_tokens"], batch["rejected_mask"])
        return float(np.mean(-np.asarray(nc) / cc + np.asarray(nr) / cr))

    stage_dir = out / "checkpoints" / "align"
    steps = checkpoint.all_steps(stage_dir)
    return [margin(init)] + [margin(checkpoint.restore_params(stage_dir, init, s)) for s in steps]


@pytest.mark.slow
def test_copr_retains_the_first_preference_shift_better_than_dpo_and_dpo_kl(tmp_path):
    """Two shifts (helpful, then harmless, whose rejected compliance reuses the wording helpful
    pushed up), 30 steps each on ``test-micro``. Retention figures on helpful's eval set, with
    ``m`` the mean per-token log-likelihood margin (chosen − rejected) before training, after
    task 1 and after task 2: the drop ``m_1 − m_2`` and the share of task 1's gain left,
    ``(m_2 − m_0) / (m_1 − m_0)``.

    Measured (2 CPU cores, about 80 s of CPU): m_0 = −0.251; dpo 3.013 -> 0.977 (drop 2.04,
    retained 0.38); dpo + kl (weight 10) 0.94 -> 0.33 (drop 0.61, retained 0.48); copr
    (defaults, capacity 64; d_i each task's own fit at its end) 0.25 -> 0.25 (drop 0.00 to two
    decimals, retained 1.00); pref_accuracy R = [[1, 0], [1, 1]] for dpo and dpo + kl,
    [[1, 0], [1, 0.95]] for copr.
    COPR learns the smaller margin (its target is bounded: 2r/β above the task-start policy's),
    and keeps nearly all of it."""
    from rich.console import Console

    from jaxcl.recipe import validate
    from jaxcl.train.runner import run_recipe

    configs = {
        "dpo": ([{"name": "dpo", "beta": 0.1}], []),
        "dpo+kl": ([{"name": "dpo", "beta": 0.1}, {"name": "kl", "weight": 10.0}], []),
        "copr": (None, [{"name": "copr", "capacity": 64}]),
    }
    quiet = Console(file=io.StringIO())
    figures = {}
    for name, (terms, methods) in configs.items():
        recipe = validate(_align(tmp_path / name, copy.deepcopy(terms), methods))
        stage = run_recipe(recipe, quiet)["stages"][0]
        m0, m1, m2 = _helpful_margins(tmp_path / name, recipe)
        figures[name] = {
            "R": stage["R"],
            "margins": (m0, m1, m2),
            "drop": m1 - m2,
            "retained": (m2 - m0) / (m1 - m0),
        }
    for name, f in figures.items():
        m0, m1, m2 = f["margins"]
        print(
            f"{name}: R {f['R']}, helpful margin {m0:.2f} -> {m1:.2f} -> {m2:.2f}, "
            f"drop {f['drop']:.2f}, retained {f['retained']:.2f}"
        )
    for name, f in figures.items():
        assert f["R"][0][0] >= 0.9 and f["R"][1][1] >= 0.8, name  # each learns both shifts
        assert f["margins"][1] > f["margins"][0] + 0.3, name  # task 1 raised helpful's margin
    copr, kl, dpo = figures["copr"], figures["dpo+kl"], figures["dpo"]
    assert copr["R"][1][0] >= 0.9  # helpful still preferred after harmless
    assert copr["drop"] < 0.5 * kl["drop"] and kl["drop"] < dpo["drop"]
    assert copr["retained"] > max(kl["retained"], dpo["retained"]) + 0.2
