"""Two tasks on a small network: every regularization and projection method forgets less than
plain fine-tuning (BWT = score on task A after task B − score after task A, score = −MSE)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl import methods

D_IN, HIDDEN, D_OUT, N = 10, 16, 3, 64
STEPS, LR = 200, 3e-2
MARGIN = 0.4  # BWT must improve on plain fine-tuning by at least 40% of its forgetting


def _task(seed):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(D_IN, 3)))[0]  # inputs in a random 3-dim subspace
    x = rng.normal(size=(N, 3)) @ basis.T * 2
    t1, t2 = rng.normal(size=(D_IN, HIDDEN)), rng.normal(size=(HIDDEN, D_OUT)) / 3
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(np.tanh(x @ t1) @ t2, jnp.float32)}


TASKS = [_task(1), _task(2)]


def model(p, x):
    h = x @ p["w1"]
    if "lora_a" in p:
        h = h + (x @ p["lora_a"]) @ p["lora_b"]
    return jnp.tanh(h) @ p["w2"]


def loss(p, batch):
    return jnp.mean((model(p, batch["x"]) - batch["y"]) ** 2)


def _init(lora=False):
    k = jax.random.split(jax.random.key(0), 4)
    p = {
        "w1": jax.random.normal(k[0], (D_IN, HIDDEN)) / np.sqrt(D_IN),
        "w2": jax.random.normal(k[1], (HIDDEN, D_OUT)) / np.sqrt(HIDDEN),
    }
    if lora:
        p["lora_a"] = jax.random.normal(k[2], (D_IN, 4)) * 0.01
        p["lora_b"] = jnp.zeros((4, HIDDEN))
    return p


def _estimates(p, task):
    batches = [jax.tree.map(lambda v, i=i: v[i::4], task) for i in range(4)]
    # OGD's directions: per-example gradients of every output (OGD-ALL; a regression has no
    # ground-truth logit) on 30 of the task's 64 examples, projected over the whole vector
    out_grads = [
        jax.grad(lambda q, i=i, j=j: model(q, task["x"][i])[j])(p)
        for i in range(30)
        for j in range(D_OUT)
    ]
    return {
        "fisher": methods.fisher_diagonal(loss, p, batches, per_example=True),
        "mas_importance": methods.mas_importance(lambda q, b: model(q, b["x"]), p, batches),
        "ogd_grads": out_grads,
        "gpm_covariance": methods.activation_covariance(lambda q, b: model(q, b["x"]), p, batches),
    }


def two_tasks(method, lora=False):
    """Train task A then task B with ``chain(method, adam)``; returns (R[0][0], R[1][0]) and
    checks task B was still learned (its loss at least halved)."""
    params = _init(lora)
    tx = optax.chain(*([method] if methods.position(method) == "front" else []), optax.adam(LR))
    if methods.position(method) == "behind":
        tx = optax.chain(optax.adam(LR), method)
    if lora:  # only the adapter trains (the base is frozen), as with LoRA
        tx = optax.chain(tx, methods.freeze("w1|w2"))
    state = tx.init(params)
    memory = TASKS[0]

    @jax.jit
    def step(p, s, batch, mem):
        g = jax.grad(loss)(p, batch)
        upd, s = tx.update(g, s, p, memory_grads=jax.grad(loss)(p, mem))
        return optax.apply_updates(p, upd), s

    scores = []
    for t, task in enumerate(TASKS):
        start = float(loss(params, task))
        for _ in range(STEPS):
            params, state = step(params, state, task, memory if t else task)
        assert float(loss(params, task)) < 0.5 * start, f"task {t} was not learned"
        scores.append(-float(loss(params, TASKS[0])))
        if t == 0:
            state = methods.consolidate(state, params=params, **_estimates(params, task))
            if lora:  # O-LoRA: merge the finished adapter, start a fresh one
                params = dict(params, w1=params["w1"] + params["lora_a"] @ params["lora_b"])
                fresh = _init(lora=True)
                params.update(lora_a=fresh["lora_a"], lora_b=fresh["lora_b"])
    return scores


METHODS = {
    "l2_anchor": lambda: methods.l2_anchor(1.0),
    "ewc": lambda: methods.ewc(300.0),
    "mas": lambda: methods.mas(1.0),
    "si": lambda: methods.si(1.0, damping=0.1),
    "recadam": lambda: methods.recadam(LR, 10.0, schedule="sigmoid", k=0.1, t0=100),
    "agem": lambda: methods.agem(),
    "ogd": lambda: methods.ogd(90),
    "gpm": lambda: methods.gpm(0.99),
}


@pytest.fixture(scope="module")
def plain_bwt():
    first, after = two_tasks(methods.l2_anchor(0.0))
    assert after < first - 0.05, "plain fine-tuning must forget for the test to mean anything"
    return after - first


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_forgets_less_than_plain_fine_tuning(name, plain_bwt):
    first, after = two_tasks(METHODS[name]())
    bwt = after - first
    print(f"{name}: bwt {bwt:.4f} vs plain {plain_bwt:.4f}")
    assert bwt > plain_bwt * (1 - MARGIN), (name, bwt, plain_bwt)


@pytest.mark.slow
def test_o_lora_forgets_less_than_a_fresh_unconstrained_adapter():
    first, after = two_tasks(methods.o_lora(0.0, "lora_a", max_tasks=2), lora=True)
    plain = after - first
    assert plain < -0.02
    first, after = two_tasks(methods.o_lora(1.0, "lora_a", max_tasks=2), lora=True)
    print(f"o_lora: bwt {after - first:.4f} vs unconstrained {plain:.4f}")
    assert after - first > plain * (1 - MARGIN)
