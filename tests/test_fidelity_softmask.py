"""soft_mask against DAS (Ke et al., 2023, "Continual Pre-training of Language Models", ICLR).

The reference code (UIC-Liu-Lab/ContinualLM, ``networks/baselines/softmask.py`` and
``approaches/before_posttrain.py``) multiplies RoBERTa's heads (``head_mask`` on the attention
probabilities), intermediate neurons and output neurons by virtual gates of 1, takes the gradient
of a loss with respect to the gates (the KL between two passes before the first domain, the MLM
loss after each domain), normalises each layer's importances by ``|tanh(standardised)|``,
accumulates them over domains by an element-wise max and scales the gradients of each unit's
weights by ``1 − importance`` before ``AdamW.step``.

The oracle below is a plain numpy model of attention heads (grouped-query) and a SwiGLU FFN with
those gates written into its forward pass; the gate gradients are central finite differences in
float64, so nothing of jaxcl's gate identity is reused.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl import methods
from jaxcl.methods import softmask as sm
from jaxcl.methods.protocol import Carry, Context, TaskInfo, run_hooks

D, H, K, F, V, T, L = 8, 4, 2, 6, 11, 5, 2  # hidden, q heads, kv heads, ffn, vocab, seq, layers
HD = D // H


def make_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def n(*shape, s=0.5):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    layers = {}
    for i in range(L):
        attn = {
            "q": n(D, H * HD),
            "k": n(D, K * HD),
            "v": n(D, K * HD),
            "o": n(H * HD, D),
            "q_bias": n(H * HD, s=0.1),
            "k_bias": n(K * HD, s=0.1),
            "v_bias": n(K * HD, s=0.1),
        }
        if i == 0:
            attn["o_bias"] = n(D, s=0.1)  # owned by no unit: never masked
        mlp = {
            "gate": n(D, F),
            "up": n(D, F),
            "down": n(F, D),
            "gate_bias": n(F, s=0.1),
            "up_bias": n(F, s=0.1),
            "down_bias": n(D, s=0.1),
        }
        layers[i] = {"attn": attn, "mlp": mlp}
    return {
        "embed": n(V, D, s=1.0),
        "norm": {"scale": 1.0 + n(D, s=0.1)},
        "layers": layers,
        "head": n(D, V),
    }


def ones_gates(xp=np) -> dict:
    return {
        i: {"heads": xp.ones(H), "intermediate": xp.ones(F), "output": xp.ones(D)} for i in range(L)
    }


def forward(xp, params, tokens, gates=None, drops=None):
    """Logits ``[B, T, V]`` of the test model, in numpy or jax (``xp``): heads gated on their
    attention output, FFN neurons on the SwiGLU hidden unit and on the down projection's output;
    ``drops[i] = (attn, ffn)`` are dropout masks on the two residual branches' outputs."""
    gates = gates or ones_gates(xp)
    x = params["embed"][tokens]
    causal = xp.tril(xp.ones((tokens.shape[-1],) * 2, bool))
    for i in range(L):
        a, m, g = params["layers"][i]["attn"], params["layers"][i]["mlp"], gates[i]
        q = (x @ a["q"] + a["q_bias"]).reshape(*x.shape[:-1], H, HD)
        k = (x @ a["k"] + a["k_bias"]).reshape(*x.shape[:-1], K, HD)
        v = (x @ a["v"] + a["v_bias"]).reshape(*x.shape[:-1], K, HD)
        heads = []
        for h in range(H):
            kv = h // (H // K)  # query heads grouped as jax.nn.dot_product_attention does
            s = xp.einsum("btd,bsd->bts", q[..., h, :], k[..., kv, :]) / np.sqrt(HD)
            s = xp.where(causal, s, -1e30)
            p = xp.exp(s - s.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            heads.append(
                g["heads"][..., h, None, None] * xp.einsum("bts,bsd->btd", p, v[..., kv, :])
            )
        branch = xp.concatenate(heads, axis=-1) @ a["o"] + a.get("o_bias", 0.0)
        if drops is not None:
            branch = branch * drops[i][0]
        x = x + branch
        z = x @ m["gate"] + m["gate_bias"]
        hidden = (
            z / (1 + xp.exp(-z)) * (x @ m["up"] + m["up_bias"]) * g["intermediate"][..., None, :]
        )
        branch = (hidden @ m["down"] + m["down_bias"]) * g["output"][..., None, :]
        if drops is not None:
            branch = branch * drops[i][1]
        x = x + branch
    return (x * params["norm"]["scale"]) @ params["head"]


def log_softmax(xp, z):
    z = z - z.max(-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(-1, keepdims=True))


def lm_rows(xp, params, tokens, gates=None):
    """Mean next-token NLL per row (targets: the tokens shifted by one, the last predicting 0)."""
    lp = log_softmax(xp, forward(xp, params, tokens, gates))
    targets = xp.concatenate([tokens[:, 1:], xp.zeros_like(tokens[:, :1])], axis=1)
    return -xp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0].mean(-1)


def lm_loss(xp, params, tokens, gates=None):
    return lm_rows(xp, params, tokens, gates).mean()


def kl_rows(xp, params, tokens, drops, gates=None):
    """DAS's proxy: KL(p₁ ‖ p₂) of two passes with different dropout masks, mean over positions."""
    lp1 = log_softmax(xp, forward(xp, params, tokens, gates, drops[0]))
    lp2 = log_softmax(xp, forward(xp, params, tokens, gates, drops[1]))
    return (xp.exp(lp1) * (lp1 - lp2)).sum(-1).mean(-1)


# ----------------------------------------------------------------------------- the numpy oracle


def np64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def fd_gate_grads(rows, x, eps=1e-5) -> dict:
    """``∂loss(x)/∂g`` at g = 1 by central differences, per layer and unit type: every perturbed
    gate vector is one row of a single batched numpy pass, ``rows(tokens, gates) -> [rows]``."""
    plan = [
        (i, unit, u, sign)
        for i in range(L)
        for unit, size in (("heads", H), ("intermediate", F), ("output", D))
        for u in range(size)
        for sign in (1, -1)
    ]
    gates = {
        i: {k: np.tile(v, (len(plan), 1)) for k, v in g.items()} for i, g in ones_gates().items()
    }
    for r, (i, unit, u, sign) in enumerate(plan):
        gates[i][unit][r, u] += sign * eps
    vals = rows(np.tile(x, (len(plan), 1)), gates)
    out = {
        (i, unit): np.zeros(size)
        for i in range(L)
        for unit, size in (("heads", H), ("intermediate", F), ("output", D))
    }
    for r in range(0, len(plan), 2):
        i, unit, u, _ = plan[r]
        out[(i, unit)][u] = (vals[r] - vals[r + 1]) / (2 * eps)
    return out


def oracle_importance(rows, examples) -> dict:
    """DAS eq. 1: ``I = (1/N) Σ_n |∂L(x_n)/∂g|``."""
    grads = [fd_gate_grads(rows, x) for x in examples]
    return {k: np.mean([np.abs(gr[k]) for gr in grads], axis=0) for k in grads[0]}


def oracle_normalise(imp: np.ndarray) -> np.ndarray:
    """The reference's ``impt_norm``: per layer, ``|tanh((I − mean) / std)|``, torch's std."""
    return np.abs(np.tanh((imp - imp.mean()) / imp.std(ddof=1)))


def oracle_param_masks(masks: dict, params: dict) -> dict:
    """Broadcast unit masks to the parameters each unit owns (module doc of softmask)."""
    out = {"embed": None, "norm": {"scale": None}, "head": None, "layers": {}}
    for i in range(L):
        mh, mi, mo = masks[(i, "heads")], masks[(i, "intermediate")], masks[(i, "output")]
        qcol = np.repeat(mh, HD)
        kvcol = np.repeat(
            np.array([mh[j * (H // K) : (j + 1) * (H // K)].max() for j in range(K)]), HD
        )
        attn = {
            "q": np.tile(qcol, (D, 1)),
            "k": np.tile(kvcol, (D, 1)),
            "v": np.tile(kvcol, (D, 1)),
            "o": np.tile(qcol[:, None], (1, D)),
            "q_bias": qcol,
            "k_bias": kvcol,
            "v_bias": kvcol,
        }
        if "o_bias" in params["layers"][i]["attn"]:
            attn["o_bias"] = None
        mlp = {
            "gate": np.tile(mi, (D, 1)),
            "up": np.tile(mi, (D, 1)),
            "down": np.tile(mo, (F, 1)),
            "gate_bias": mi,
            "up_bias": mi,
            "down_bias": mo,
        }
        out["layers"][i] = {"attn": attn, "mlp": mlp}
    return out


def tokens_batch(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (n, T)).astype(np.int32)


def jax_lm_loss(params, batch):
    return lm_loss(jnp, params, batch["tokens"])


def leaves_with_none(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: x is None or methods.skipped(x))


# ----------------------------------------------------------------------------- tests


def test_gate_identity_matches_an_explicit_gated_forward_pass():
    """∂L/∂g_h = <W_o^h, ∂L/∂W_o^h>, ∂L/∂g_n = <W_down[n], ∂L/∂W_down[n]>, ∂L/∂g_j = <W_down[:, j],
    ∂L/∂W_down[:, j]> + b_j ∂L/∂b_j, against jax.grad through gates in the forward pass."""
    params = jax.tree.map(jnp.asarray, make_params(1))
    tokens = jnp.asarray(tokens_batch(2, 3))
    gated = jax.jit(jax.grad(lambda g: lm_loss(jnp, params, tokens, g)))(ones_gates(jnp))
    grads = jax.jit(jax.grad(lambda p: lm_loss(jnp, p, tokens)))(params)
    scores = sm.gate_scores(params, grads, num_heads=H)
    assert set(scores) == {
        f"layers/{i}/{b}:{u}"
        for i in range(L)
        for b, u in (("attn", "heads"), ("mlp", "intermediate"), ("mlp", "output"))
    }
    for i in range(L):
        np.testing.assert_allclose(
            scores[f"layers/{i}/attn:heads"], gated[i]["heads"], rtol=2e-4, atol=1e-6
        )
        for unit in ("intermediate", "output"):
            np.testing.assert_allclose(
                scores[f"layers/{i}/mlp:{unit}"], gated[i][unit], rtol=2e-4, atol=1e-6
            )
        assert np.abs(gated[i]["heads"]).min() > 0  # every unit matters: the check can fail


def test_das_oracle_importance_normalisation_accumulation_and_update_scaling():
    """Two tasks: I_t = mean_n |∂L_t(x_n)/∂g|, Î_t = |tanh(standardised per layer)|,
    Î = max(Î_1, Î_2) broadcast to each unit's parameters, update ← u ⊙ (1 − Î)."""
    params = make_params(3)
    p64 = np64(params)
    jparams = jax.tree.map(jnp.asarray, params)
    tasks = [tokens_batch(10, 6), tokens_batch(11, 6)]

    tx = methods.soft_mask(sm.unit_leaf_select(sm.UNITS))
    state = tx.init(jparams)
    expected = None
    score = sm.loss_scores(jax_lm_loss, num_heads=H)
    for data in tasks:
        imp = oracle_importance(lambda x, g: lm_rows(np, p64, x, g), data)
        norm = {k: oracle_normalise(v) for k, v in imp.items()}
        expected = norm if expected is None else {k: np.maximum(expected[k], norm[k]) for k in norm}
        # jaxcl: 2 batches of 3 examples, the per-example gradients vmapped 3 at a time
        batches = [{"tokens": jnp.asarray(data[:3])}, {"tokens": jnp.asarray(data[3:])}]
        got = sm.unit_importance(score, jparams, batches, micro_batch=3)
        for i in range(L):
            for blk, unit in (("attn", "heads"), ("mlp", "intermediate"), ("mlp", "output")):
                np.testing.assert_allclose(
                    got[f"layers/{i}/{blk}:{unit}"], imp[(i, unit)], rtol=2e-3, atol=1e-6
                )
        tree = sm.unit_mask_tree(jparams, sm.unit_masks(got), num_heads=H)
        state = methods.consolidate(state, params=jparams, soft_mask_importance=tree)

    want = oracle_param_masks(expected, params)
    updates = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32),
        jparams,
    )
    out, _ = tx.update(updates, state, jparams)
    flat_want = leaves_with_none(want)
    flat_u, flat_out = jax.tree.leaves(updates), jax.tree.leaves(out)
    assert len(flat_want) == len(flat_u) == len(flat_out)
    masked = 0
    for m, u, o in zip(flat_want, flat_u, flat_out):
        if m is None:  # embed, norm, head, o_bias: untouched
            np.testing.assert_array_equal(o, u)
        else:
            np.testing.assert_allclose(o, np.asarray(u) * (1 - m), rtol=2e-3, atol=2e-4)
            masked += 1
    assert masked == L * 13
    # the masks are neither trivial nor saturated
    all_m = np.concatenate([m.ravel() for m in flat_want if m is not None])
    assert 0.1 < all_m.mean() < 0.9 and all_m.min() < 0.2 and all_m.max() > 0.6


def test_proxy_gate_gradients_match_the_oracle_kl_of_two_dropout_passes():
    """DAS's general-knowledge proxy: ∂KL(p(x; D₁) ‖ p(x; D₂))/∂g with the gates in both passes
    (the dropout masks on the attention and FFN outputs, as RoBERTa's hidden dropout)."""
    params = make_params(4)
    jparams = jax.tree.map(jnp.asarray, params)
    rng = np.random.default_rng(6)
    keep = 1 - 0.1
    draws = [[(rng.random(D) < keep) / keep for _ in range(2 * L)] for _ in range(2)]
    drops = [[(d[2 * i], d[2 * i + 1]) for i in range(L)] for d in draws]
    jmasks = tuple(
        {f"layers/{i}/attn": jnp.asarray(d[2 * i], jnp.float32) for i in range(L)}
        | {f"layers/{i}/mlp": jnp.asarray(d[2 * i + 1], jnp.float32) for i in range(L)}
        for d in draws
    )
    x = tokens_batch(7, 1)
    want = fd_gate_grads(lambda t, g: kl_rows(np, np64(params), t, drops, g), x[0], eps=1e-4)

    def apply(p, inputs):
        return forward(jnp, p, inputs)

    batch = {"tokens": jnp.asarray(np.pad(x, ((0, 0), (0, 1))))}  # the model sees tokens[:, :-1]
    proxy = jax.jit(lambda p, b, m: sm.kl_proxy_scores(apply, p, b, m, num_heads=H))
    got = proxy(jparams, batch, jmasks)
    for i in range(L):
        for blk, unit in (("attn", "heads"), ("mlp", "intermediate"), ("mlp", "output")):
            np.testing.assert_allclose(
                got[f"layers/{i}/{blk}:{unit}"], want[(i, unit)], rtol=5e-3, atol=1e-6
            )
    assert max(np.abs(v).max() for v in want.values()) > 1e-3  # the two passes differ


def test_hidden_dropout_masks_are_inverted_dropout_per_block_and_key():
    params = jax.tree.map(jnp.asarray, make_params(0))
    a = sm.hidden_dropout_masks(jax.random.key(0), params, 0.25)
    b = sm.hidden_dropout_masks(jax.random.key(1), params, 0.25)
    assert set(a) == {f"layers/{i}/{blk}" for i in range(L) for blk in ("attn", "mlp")}
    vals = np.concatenate([np.asarray(v) for v in a.values()])
    assert np.all(np.isclose(vals, 0.0) | np.isclose(vals, 1 / 0.75))
    assert not all(np.array_equal(a[k], b[k]) for k in a)
    dropped = sm.with_hidden_dropout(params, a)
    m = np.asarray(a["layers/0/attn"])
    np.testing.assert_allclose(
        dropped["layers"][0]["attn"]["o"], params["layers"][0]["attn"]["o"] * m
    )
    np.testing.assert_allclose(
        dropped["layers"][0]["attn"]["o_bias"], params["layers"][0]["attn"]["o_bias"] * m
    )
    np.testing.assert_array_equal(
        dropped["layers"][0]["attn"]["q"], params["layers"][0]["attn"]["q"]
    )
    with pytest.raises(ValueError, match="dropout rate"):
        sm.proxy_scores(lambda p, x: x, num_heads=H, rate=0.0)


def test_normalisation_is_per_layer_with_torch_std_and_constant_layers_map_to_zero():
    x = np.array([[1.0, 2.0, 4.0, 8.0], [3.0, 3.0, 3.0, 3.0]])
    got = np.asarray(sm.normalized_importance(jnp.asarray(x)))
    np.testing.assert_allclose(got[0], oracle_normalise(x[0]), rtol=1e-6)
    np.testing.assert_array_equal(got[1], 0.0)


def _context(index, batches, params):
    return Context(
        TaskInfo(index, f"t{index}", 2, [], []),
        jax_lm_loss,
        lambda p, inputs: forward(jnp, p, inputs),
        lambda p: (p, {}),
        lambda t, f: t,
        lambda n: iter(batches[:n]),
        {"seed": 3, "model_config": dataclasses.make_dataclass("Cfg", ["num_heads"])(H)},
    )


def test_spec_general_importance_at_task_start_then_task_importance_accumulates():
    """The task_start hook fills Î with the proxy importance on task 0 only; the end-of-task
    estimate is accumulated by max; the update is u ⊙ (1 − Î) behind the optimizer."""
    from jaxcl.train.step import TrainState

    spec = sm.SoftMaskSpec(name="soft_mask", importance_batches=1)
    assert spec.place() == "behind"
    params = jax.tree.map(jnp.asarray, make_params(8))
    tx = optax.chain(optax.adam(1e-2), spec.transform())
    carry = Carry(TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), {}, None)
    batches = [{"tokens": jnp.asarray(tokens_batch(20 + i, 2))} for i in range(2)]

    (hook,) = spec.hooks()
    assert hook.phase == "task_start"
    untouched = run_hooks([hook], "task_start", _context(1, batches, params), carry)
    assert untouched is carry
    carry = run_hooks([hook], "task_start", _context(0, batches, params), carry)
    general = carry.state.opt_state[1].importance
    assert methods.skipped(general["embed"]) and methods.skipped(
        general["layers"][0]["attn"]["o_bias"]
    )
    q = np.asarray(general["layers"][0]["attn"]["q"])
    assert 0 < q.mean() < 1 and np.ptp(q) > 0.1
    np.testing.assert_array_equal(q, np.tile(q[0], (D, 1)))  # one value per head column block

    ctx = _context(0, batches, params)
    est = spec.estimates(ctx, carry)["soft_mask_importance"]
    opt = methods.consolidate(carry.state.opt_state, params=params, soft_mask_importance=est)
    acc = opt[1].importance
    for g, e, a in zip(*(jax.tree.leaves(t) for t in (general, est, acc))):
        np.testing.assert_allclose(a, np.maximum(g, e), rtol=1e-6)
    upd = jax.tree.map(jnp.ones_like, params)
    out, _ = spec.transform().update(upd, opt[1], params)
    np.testing.assert_allclose(out["layers"][1]["mlp"]["down"], 1 - acc["layers"][1]["mlp"]["down"])
    np.testing.assert_array_equal(out["head"], 1.0)


def test_gradient_placement_is_what_adam_undoes_and_update_placement_is_not():
    """Why the default masks the update: with a constant mask c, Adam's m/√v is scale-free, so
    masking the gradient in front of Adam (the reference's placement) changes almost nothing."""
    params = {"mlp": {"gate": jnp.ones((3, 4)), "up": jnp.ones((3, 4)), "down": jnp.ones((4, 3))}}
    mask = jax.tree.map(lambda p: jnp.full(p.shape, 0.8), params)
    grads = [
        jax.tree.map(lambda p, s=s: jnp.sin(s + jnp.arange(p.size).reshape(p.shape)), params)
        for s in range(3)
    ]

    def run(tx):
        state = tx.init(params)
        state = sm.refresh_soft_masks(state, mask)
        for g in grads:
            upd, state = tx.update(g, state, params)
        return upd

    plain = run(optax.adam(1e-2))
    gradient = run(methods.chain(methods.soft_mask(placement="gradient"), optax.adam(1e-2)))
    update = run(methods.chain(optax.adam(1e-2), methods.soft_mask(placement="update")))
    np.testing.assert_allclose(gradient["mlp"]["up"], plain["mlp"]["up"], rtol=1e-5)
    np.testing.assert_allclose(update["mlp"]["up"], 0.2 * plain["mlp"]["up"], rtol=1e-6)
    assert sm.SoftMaskSpec(name="soft_mask", placement="gradient").place() == "front"
    assert (
        methods.position(sm.SoftMaskSpec(name="soft_mask", placement="gradient").transform())
        == "front"
    )


@pytest.mark.parametrize("units", [("heads",), ("intermediate", "output")])
def test_units_option_masks_only_the_leaves_those_units_own(units):
    params = jax.tree.map(jnp.asarray, make_params(2))
    spec = sm.SoftMaskSpec(name="soft_mask", units=units, num_heads=H)
    state = spec.transform().init(params)
    owned = {leaf for u in units for leaf in sm.UNIT_LEAVES[u]}
    flat = jax.tree_util.tree_flatten_with_path(state.importance, is_leaf=methods.skipped)[0]
    for path, leaf in flat:
        name = str(path[-1].key)
        assert methods.skipped(leaf) == (name not in owned), name


def test_llama_units_agree_between_stacked_and_per_layer_layouts():
    """The mapping on jaxcl's Llama tree (q/k/v/o, gate/up/down; GQA: 4 q heads on 2 kv heads),
    per layer and with scan_layers' leading layer axis (the same weights and gradients)."""
    from flax import nnx

    from jaxcl.models.config import preset
    from jaxcl.models.llama import Decoder, stack_layers
    from jaxcl.objectives.lm import causal_lm_loss

    cfg = preset("test-micro")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 9)), jnp.int32)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    plain = nnx.to_pure_dict(state)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return causal_lm_loss(logits, tokens[:, 1:], jnp.ones((2, 8)))

    grads = jax.jit(jax.grad(loss))(plain)
    results = {}
    for scan, (p, g) in {
        False: (plain, grads),
        True: (stack_layers(plain), stack_layers(grads)),
    }.items():
        imp = sm.gate_scores(p, g, num_heads=cfg.num_heads)
        results[scan] = (imp, sm.unit_mask_tree(p, sm.unit_masks(imp), num_heads=cfg.num_heads))
    (imp0, tree0), (imp1, tree1) = results[False], results[True]
    n = cfg.num_layers
    assert set(imp1) == {"layers/attn:heads", "layers/mlp:intermediate", "layers/mlp:output"}
    for unit, blk in (("heads", "attn"), ("intermediate", "mlp"), ("output", "mlp")):
        stacked = np.stack([imp0[f"layers/{i}/{blk}:{unit}"] for i in range(n)])
        np.testing.assert_allclose(imp1[f"layers/{blk}:{unit}"], stacked, rtol=1e-6)
    for i in range(n):
        for blk, leaf in (
            ("attn", "q"),
            ("attn", "k"),
            ("attn", "o"),
            ("mlp", "up"),
            ("mlp", "down"),
        ):
            np.testing.assert_allclose(tree1["layers"][blk][leaf][i], tree0["layers"][i][blk][leaf])
    k = np.asarray(tree0["layers"][0]["attn"]["k"])
    heads = np.asarray(sm.unit_masks(imp0)["layers/0/attn:heads"])
    hd = cfg.resolved_head_dim
    np.testing.assert_allclose(k[:, :hd], max(heads[0], heads[1]), rtol=1e-6)
    np.testing.assert_allclose(k[:, hd:], max(heads[2], heads[3]), rtol=1e-6)
    assert methods.skipped(tree0["embed"]) and methods.skipped(tree0["lm_head"])
    masks, leaves = jax.tree.leaves(tree0, is_leaf=methods.skipped), jax.tree.leaves(plain)
    assert len(masks) == len(leaves)
    owned = [(m, p) for m, p in zip(masks, leaves) if not methods.skipped(m)]
    assert len(owned) == n * 7 and all(m.shape == p.shape for m, p in owned)


def test_no_units_in_the_trained_tree_is_refused():
    lora_like = {
        "layers": {"attn": {"lora": {"q": {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 4))}}}}
    }
    score = sm.loss_scores(lambda p, b: jnp.sum(p["layers"]["attn"]["lora"]["q"]["a"]), num_heads=2)
    with pytest.raises(ValueError, match="no attention"):
        sm.unit_importance(score, lora_like, [{"tokens": jnp.zeros((1, 3), jnp.int32)}])
