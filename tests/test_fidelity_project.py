"""A-GEM, OGD and O-LoRA against independent numpy oracles of their papers (and the reference
code), on a parameter tree of several leaves of different shapes; and the promise each makes
(no first-order increase of the memory loss, outputs of earlier tasks unchanged to first order)
checked on the update AdamW actually applies, including through the trainer's chain and step.

References read (none is copied):
* A-GEM, Chaudhry et al. 2019 (and Avalanche/mammoth's ``agem``): one global projection
  ``g̃ = g − (g·g_ref/‖g_ref‖²) g_ref`` when ``g·g_ref < 0``, then SGD.
* OGD, Farajtabar et al. 2020; Bennani et al.'s reproduction (MehdiAbbanaBennani/
  continual-learning-ogdplus, ``ogd/ogd_core_new.py``): after each task, ``memory_size`` random
  examples of it, the gradient of the ground-truth logit ``out[0, label]`` per example (batch
  size 1), over ``parameters_to_vector`` (the whole parameter vector), Gram-Schmidt of the whole
  stored basis, and the SGD step ``θ ← θ − η (g − V Vᵀ g)`` on the flattened vector. TRACE's LLM
  port (BeyonderXX/TRACE ``model/Regular/OGD.py``) instead stores the per-step batch loss
  gradients of the LoRA leaves (``max_memories=150``) and projects them through per-parameter
  slices of one flat basis.
* O-LoRA, cmadt/O-LoRA ``src/uie_trainer_lora.py`` (and TRACE's ``O_LoRA.py``): loss +
  ``lamda_1 Σ_layers Σ |lora_A · loranew_Aᵀ|`` + ``lamda_2 Σ torch.norm(loranew_*)`` (A and B of
  the new adapter, Frobenius norm, not squared), ``lamda_1 = 0.5``, ``lamda_2 = 0`` in every
  script; the finished task's ``loranew_A`` rows are concatenated to ``lora_A``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl import methods
from jaxcl.methods.project import AgemSpec, OgdSpec, OLoraSpec, gram_schmidt_insert
from jaxcl.methods.protocol import Carry, Context, TaskInfo
from jaxcl.methods.specs import compile_methods
from jaxcl.train.step import TrainState

SHAPES = {"w": (5, 3), "b": (3,), "layers": {"k": (2, 4, 3)}}


def _tree(rng, scale=1.0):
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s) * scale, jnp.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _flat(tree) -> np.ndarray:
    """The whole parameter vector, float64 (leaves in pytree order)."""
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# ----------------------------------------------------------------------------- A-GEM


def _agem_oracle(x: np.ndarray, ref: np.ndarray, side: str) -> np.ndarray:
    """Chaudhry et al.: on the gradient, project when g·g_ref < 0; on an update u (= −η g),
    when u·g_ref > 0 (the same condition on the step)."""
    dot = x @ ref
    conflict = dot < 0 if side == "gradient" else dot > 0
    return x - dot / (ref @ ref) * ref if conflict else x


@pytest.mark.parametrize("project", ["gradient", "update"])
def test_agem_projection_matches_the_numpy_formula_on_a_multi_leaf_tree(project):
    rng = np.random.default_rng(0)
    tx = methods.agem(project=project)
    assert methods.position(tx) == ("front" if project == "gradient" else "behind")
    projected = 0
    for _ in range(6):
        x, ref = _tree(rng), _tree(rng)
        out, _ = tx.update(x, tx.init(x), memory_grads=ref)
        want = _agem_oracle(_flat(x), _flat(ref), project)
        np.testing.assert_allclose(_flat(out), want, rtol=1e-5, atol=1e-6)
        projected += not np.allclose(want, _flat(x))
    assert 0 < projected < 6  # both branches were taken
    with pytest.raises(ValueError, match="memory_grads"):
        tx.update(x, tx.init(x))


def _applied(tx, steps=12, seed=1):
    """Run ``tx`` on random gradients that conflict with a random memory gradient; returns
    ``[(u·g_ref, ‖u‖·‖g_ref‖)]`` for each applied update ``u``."""
    rng = np.random.default_rng(seed)
    params = _tree(rng)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        ref = _tree(rng)
        g = jax.tree.map(lambda a, b: a - 0.8 * b, _tree(rng), ref)  # mostly g·g_ref < 0
        u, state = tx.update(g, state, params, memory_grads=ref)
        params = optax.apply_updates(params, u)
        out.append(
            (float(_flat(u) @ _flat(ref)), np.linalg.norm(_flat(u)) * np.linalg.norm(_flat(ref)))
        )
    return np.array(out)


def test_agem_update_form_keeps_the_adamw_update_off_the_memory_gradient():
    """With AdamW (weight decay 0.1) the paper's gradient-side projection lets the applied update
    raise the memory loss to first order (u·g_ref > 0); projecting the final update does not."""
    adamw = lambda: optax.adamw(1e-2, weight_decay=0.1)  # noqa: E731
    old = _applied(optax.chain(methods.agem(project="gradient"), adamw()))
    new = _applied(methods.chain(adamw(), methods.agem()))
    cos_old = old[:, 0] / old[:, 1]
    print(
        f"A-GEM u·g_ref: gradient form max {old[:, 0].max():.3e} (cos {cos_old.max():.3f}, "
        f"{(old[:, 0] > 0).sum()}/{len(old)} steps > 0); update form max {new[:, 0].max():.3e}"
    )
    assert old[:, 0].max() > 1e-3 and cos_old.max() > 0.05  # the old placement breaks it
    assert new[:, 0].max() <= 1e-7


def test_agem_forms_give_the_same_step_under_sgd():
    a = _applied(optax.chain(methods.agem(project="gradient"), optax.sgd(0.1)), steps=5)
    b = _applied(optax.chain(optax.sgd(0.1), methods.agem()), steps=5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # dots ≈ 0 up to round-off
    assert a[:, 0].max() <= 1e-6


# ----------------------------------------------------------------------------- OGD


def _gram_schmidt(vectors: list[np.ndarray], tol: float = 1e-5) -> np.ndarray:
    """Orthonormal columns from ``vectors`` in order (modified Gram-Schmidt in float64), a
    vector already spanned (relative residual < tol) skipped."""
    q: list[np.ndarray] = []
    for v in vectors:
        r = v.copy()
        for b in q:
            r = r - (b @ r) * b
        if np.linalg.norm(r) > tol * np.linalg.norm(v):
            q.append(r / np.linalg.norm(r))
    return np.stack(q, 1)


def _slots(state) -> np.ndarray:
    """Basis slot j as a column of the whole (selected) parameter vector."""
    leaves = [np.asarray(b, np.float64) for b in jax.tree.leaves(state.basis)]
    k = leaves[0].shape[0]
    return np.stack([np.concatenate([np.ravel(b[j]) for b in leaves]) for j in range(k)], 1)


def test_ogd_basis_is_global_gram_schmidt_and_projection_matches_numpy():
    rng = np.random.default_rng(2)
    params = _tree(rng)
    dirs = [_tree(rng) for _ in range(3)]
    dirs.append(jax.tree.map(lambda a, b: 2 * a - b, dirs[0], dirs[2]))  # spanned: skipped
    dirs.append(_tree(rng))
    tx = methods.ogd(max_directions=6, project="gradient")
    state = methods.consolidate(tx.init(params), params=params, ogd_grads=dirs)
    q = _gram_schmidt([_flat(d) for d in dirs])
    assert q.shape[1] == 4 and int(state.size) == 4
    basis = _slots(state)
    np.testing.assert_allclose(basis[:, :4], q, atol=2e-6)
    np.testing.assert_array_equal(basis[:, 4:], 0)
    # Per leaf the stored directions are *not* orthonormal: one inner product over all leaves.
    w = np.stack([np.ravel(np.asarray(state.basis["w"][j])) for j in range(4)], 1)
    assert np.abs(w.T @ w - np.eye(4)).max() > 0.1
    for _ in range(3):
        g = _tree(rng)
        out, _ = tx.update(g, state, params)
        want = _flat(g) - q @ (q.T @ _flat(g))
        np.testing.assert_allclose(_flat(out), want, rtol=1e-5, atol=1e-5)
        assert np.abs(q.T @ _flat(out)).max() < 1e-5
    # A second task (a stacked [n, ...] tree this time) continues the same Gram-Schmidt.
    more = [_tree(rng) for _ in range(2)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *more)
    state2 = methods.consolidate(state, params=params, ogd_grads=stacked)
    q2 = _gram_schmidt([_flat(d) for d in dirs + more])
    np.testing.assert_allclose(_slots(state2), q2, atol=3e-6)
    # A full basis refuses directions it cannot hold instead of leaving them unprotected.
    with pytest.raises(ValueError, match="basis is full"):
        methods.consolidate(state2, params=params, ogd_grads=[_tree(rng)])
    fresh = jax.tree.map(lambda *x: jnp.stack(x), *[_tree(rng) for _ in range(2)])
    again, dropped = jax.jit(gram_schmidt_insert)(state2, fresh)
    assert int(dropped) == 2 and int(again.size) == 6  # under jit: counted and dropped


def test_ogd_include_protects_only_the_selected_leaves_as_one_vector():
    rng = np.random.default_rng(3)
    params = _tree(rng)
    dirs = [_tree(rng) for _ in range(2)]
    tx = methods.ogd(3, select=r"^(w|layers)")
    state = methods.consolidate(tx.init(params), params=params, ogd_grads=dirs)
    assert methods.skipped(state.basis["b"])

    def sub(t):
        return np.concatenate([_flat(t["layers"]), _flat(t["w"])])  # pytree order

    q = _gram_schmidt([sub(d) for d in dirs])
    g = _tree(rng)
    out, _ = tx.update(g, state, params)
    np.testing.assert_array_equal(out["b"], g["b"])
    np.testing.assert_allclose(sub(out), sub(g) - q @ (q.T @ sub(g)), rtol=1e-5, atol=1e-5)


def test_ogd_update_form_keeps_the_applied_adamw_update_orthogonal():
    rng = np.random.default_rng(4)
    params = _tree(rng)
    dirs = [_tree(rng) for _ in range(3)]
    figures = {}
    for project in ("gradient", "update"):
        ogd = methods.ogd(4, project=project)
        adamw = optax.adamw(1e-2, weight_decay=0.1)
        tx = methods.chain(ogd, adamw) if project == "gradient" else methods.chain(adamw, ogd)
        state = tx.init(params)
        index = 0 if project == "gradient" else 1
        parts = list(state)
        parts[index] = methods.consolidate(state[index], params=params, ogd_grads=dirs)
        state = tuple(parts)
        q = _gram_schmidt([_flat(d) for d in dirs])
        p, worst, rel = params, 0.0, 0.0
        for _ in range(8):
            u, state = tx.update(_tree(rng), state, p)
            p = optax.apply_updates(p, u)
            dots = np.abs(q.T @ _flat(u))
            worst, rel = max(worst, dots.max()), max(rel, dots.max() / np.linalg.norm(_flat(u)))
        figures[project] = (worst, rel)
    print(
        f"OGD max |<u, b_j>|: gradient form {figures['gradient'][0]:.3e} "
        f"(relative {figures['gradient'][1]:.3f}), update form {figures['update'][0]:.3e}"
    )
    assert figures["gradient"][1] > 0.05
    assert figures["update"][0] <= 1e-7


V, D = 7, 4  # a one-layer "LM": logits = embed[x] @ head/w + head/b


def _lm_params(rng):
    return {
        "embed": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
        "head": {
            "w": jnp.asarray(rng.normal(size=(D, V)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(V,)), jnp.float32),
        },
    }


def _lm_apply(p, ids):
    return p["embed"][ids] @ p["head"]["w"] + p["head"]["b"]


def _output_grad_oracle(p, tokens, mask, output):
    """∇ of f = Σ_t m[t+1] · (log p(y_t) or the logit z_t[y_t]), y_t = tokens[t+1], by hand:
    ∂f/∂z_t = m[t+1] (e_{y_t} − softmax(z_t)) (logprob) or m[t+1] e_{y_t} (logit)."""
    emb, w, b = (np.asarray(x, np.float64) for x in (p["embed"], p["head"]["w"], p["head"]["b"]))
    g_emb, g_w, g_b = np.zeros_like(emb), np.zeros_like(w), np.zeros_like(b)
    for t in range(len(tokens) - 1):
        h = emb[tokens[t]]
        z = h @ w + b
        dz = np.eye(V)[tokens[t + 1]]
        if output == "logprob":
            dz = dz - np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        dz = dz * mask[t + 1]
        g_w += np.outer(h, dz)
        g_b += dz
        g_emb[tokens[t]] += w @ dz
    return {"embed": g_emb, "head": {"b": g_b, "w": g_w}}


@pytest.mark.parametrize("output", ["logprob", "logit"])
def test_ogd_estimates_are_per_example_output_gradients(output):
    rng = np.random.default_rng(5)
    params = _lm_params(rng)
    tokens = rng.integers(0, V, size=(6, 6)).astype(np.int32)
    mask = (rng.random((6, 6)) > 0.3).astype(np.float32)
    mask[:, 0] = 0  # a prompt token: never a target
    batches = [
        {"tokens": jnp.asarray(tokens[i : i + 3]), "loss_mask": jnp.asarray(mask[i : i + 3])}
        for i in (0, 3)
    ]
    asked = []

    def own(n):
        asked.append(n)
        return iter(batches)

    info = TaskInfo(0, "t", 1, [], [])
    ctx = Context(info, None, _lm_apply, lambda p: (p, {}), lambda t, f: t, own)
    spec = OgdSpec(name="ogd", per_task=4, max_directions=8, output=output)
    carry = Carry(TrainState(jnp.int32(0), params, None), {}, None)
    grads = spec.estimates(ctx, carry)["ogd_grads"]
    assert asked == [4]
    assert jax.tree.leaves(grads)[0].shape[0] == 4  # 3 rows of the first batch, 1 of the second
    for i in range(4):
        want = _output_grad_oracle(params, tokens[i], mask[i], output)
        got = jax.tree.map(lambda x, i=i: np.asarray(x[i]), grads)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_specs_place_by_project_and_refuse_a_basis_one_task_fills():
    for spec in (AgemSpec(name="agem"), OgdSpec(name="ogd")):
        assert spec.project == "update" and spec.place() == "behind"
        assert spec.model_copy(update={"project": "gradient"}).place() == "front"
    compiled = compile_methods([AgemSpec(name="agem"), OgdSpec(name="ogd")])
    assert not compiled.front and [methods.position(t) for t in compiled.behind] == ["behind"] * 2
    with pytest.raises(ValueError, match="per_task .* must not exceed max_directions"):
        OgdSpec(name="ogd", per_task=9, max_directions=8)


# ----------------------------------------------------------------------------- O-LoRA


def _olora_params(rng):
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {
        "layers": {"q": {"lora": {"a": f(2, 6, 2), "b": f(2, 2, 5)}}},  # scanned: [layers, ...]
        "mlp": {"lora_a": f(6, 3), "lora_b": f(3, 4)},
        "w": f(5, 3),
    }


def _olora_oracle(a_old: list[np.ndarray], a_new: np.ndarray, b_new: np.ndarray, lam, l2):
    """O-LoRA's code on one layer, in PEFT's [r, in] layout: loss = lam Σ|lora_A · loranew_Aᵀ|
    + l2 (‖loranew_A‖ + ‖loranew_B‖); its gradient w.r.t. jaxcl's A [in, r] and B [r, out]."""
    old = np.concatenate([a.T for a in a_old], 0)  # lora_A: [r_sum, in], rows appended per task
    new = a_new.T  # loranew_A: [r, in]
    m = old @ new.T
    loss = lam * np.abs(m).sum() + l2 * (np.linalg.norm(a_new) + np.linalg.norm(b_new))
    d_new = lam * np.sign(m).T @ old  # ∂/∂loranew_A: [r, in]
    grad_a = d_new.T + l2 * a_new / np.linalg.norm(a_new)
    grad_b = l2 * b_new / np.linalg.norm(b_new)
    return loss, grad_a, grad_b


def _lora_matrix(tree, ab: str, layer: int | None):
    if layer is None:
        return tree["mlp"][f"lora_{ab}"]
    return tree["layers"]["q"]["lora"][ab][layer]


def test_o_lora_penalty_and_gradient_match_the_reference_loss():
    rng = np.random.default_rng(6)
    lam, l2 = 0.5, 0.1
    tx = methods.o_lora(lam, max_tasks=3, l2=l2)
    first, second, now = _olora_params(rng), _olora_params(rng), _olora_params(rng)
    state = tx.init(first)
    state = methods.consolidate(state, params=first)
    state = methods.consolidate(state, params=second)
    assert int(state.tasks) == 2
    hist = np.asarray(state.history["mlp"]["lora_a"])
    np.testing.assert_array_equal(hist[:, :3], first["mlp"]["lora_a"])
    np.testing.assert_array_equal(hist[:, 3:6], second["mlp"]["lora_a"])
    np.testing.assert_array_equal(hist[:, 6:], 0)
    g = _olora_params(rng)
    out, _ = tx.update(g, state, now)
    np.testing.assert_array_equal(out["w"], g["w"])
    total = 0.0
    for layer in (None, 0, 1):  # the plain leaf, then each layer of the scanned one
        pick = lambda t, ab="a", layer=layer: _lora_matrix(t, ab, layer)  # noqa: E731
        pick_b = lambda t, layer=layer: _lora_matrix(t, "b", layer)  # noqa: E731
        olds = [np.asarray(pick(first), np.float64), np.asarray(pick(second), np.float64)]
        loss, ga, gb = _olora_oracle(
            olds, np.asarray(pick(now), np.float64), np.asarray(pick_b(now), np.float64), lam, l2
        )
        total += loss
        np.testing.assert_allclose(
            np.asarray(pick(out)) - np.asarray(pick(g)), ga, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(pick_b(out)) - np.asarray(pick_b(g)), gb, rtol=1e-5, atol=1e-6
        )
    got = float(methods.o_lora_penalty(now, state, lam, l2=l2))
    assert got == pytest.approx(total, rel=1e-5)
    # The reference's defaults: λ1 = 0.5, λ2 = 0 (no L2 term unless asked for).
    spec = OLoraSpec(name="o_lora")
    assert (spec.lam, spec.l2) == (0.5, 0.0)
    plain = methods.o_lora(lam, max_tasks=3)
    out0, _ = plain.update(g, plain.init(now), now)
    np.testing.assert_array_equal(out0["mlp"]["lora_b"], g["mlp"]["lora_b"])


def test_o_lora_l2_gradient_is_zero_at_a_zero_matrix():
    """PEFT's new B starts at 0; torch's norm has gradient 0 there (no NaN)."""
    params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
    tx = methods.o_lora(0.5, max_tasks=2, l2=1.0)
    out, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_array_equal(out["lora_b"], 0)
    np.testing.assert_allclose(out["lora_a"], np.ones((4, 2)) / np.sqrt(8), rtol=1e-6)
