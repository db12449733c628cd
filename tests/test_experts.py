"""MoE-LoRA (MoELoRA, Luo et al. 2024; LoRAMoE, Dou et al. 2024): routed LoRA experts.

Oracles: jaxcl's plain LoRA adapters (:mod:`jaxcl.models.lora`) with the same ``A``, ``B`` (a
one-hot router is per-task LoRA), a numpy implementation of the routed sum and of Switch's
load-balancing term ``N·Σ f_e·P_e``, and the optimizer's own updates (only the routers and the
task's expert move; the base stays bit-identical)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcl.methods.experts import MoELoraSpec, new_param_count, train_experts, trained_count
from jaxcl.models import Decoder, preset
from jaxcl.models import lora as lora_lib
from jaxcl.models.experts import add_moe_lora, balance_loss, route, set_active
from jaxcl.recipe import RecipeError, validate
from tests.fake_devices import run_on_fake_devices


def _ids(vocab, shape=(2, 12), seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _grown(scan=False, experts=3, top_k=None, targets=("q", "v"), balance=0.01):
    cfg = preset("test-micro").replace(scan_layers=scan)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    add_moe_lora(model, experts=experts, rank=4, alpha=8.0, targets=targets, top_k=top_k,
                 balance=balance)  # fmt: skip
    return cfg, model


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_routed(x, w_r, a, b, scale, active, top_k):
    """Numpy: Σ_e g_e(x)·scale·x·A_e·B_e, g = softmax over the active experts (top-k renorm)."""
    logits = x @ w_r
    logits = np.where(active > 0, logits, -np.inf)
    p = _np_softmax(logits)
    if top_k is not None:
        order = np.argsort(-p, axis=-1)[..., :top_k]
        keep = np.zeros_like(p, bool)
        np.put_along_axis(keep, order, True, axis=-1)
        p = np.where(keep, p, 0.0)
        p = p / p.sum(-1, keepdims=True)
    out = 0
    for e in range(a.shape[0]):
        out = out + p[..., e : e + 1] * ((x @ a[e]) @ b[e]) * scale
    return out


@pytest.mark.parametrize("top_k", [None, 2])
def test_routed_sum_matches_numpy(top_k):
    cfg, model = _grown(top_k=top_k)
    moe = model.layers[0].attn.moe_lora["q"]
    rng = np.random.default_rng(0)
    moe.b[...] = jnp.asarray(rng.normal(size=moe.b.shape), jnp.float32)  # experts that matter
    active = np.array([1.0, 1.0, 0.0], np.float32)
    moe.active[...] = jnp.asarray(active)
    x = rng.normal(size=(2, 5, cfg.hidden_size)).astype(np.float32)
    got = np.asarray(moe(jnp.asarray(x)))
    want = _np_routed(
        x.astype(np.float64), np.asarray(moe.router[...], np.float64),
        np.asarray(moe.a[...], np.float64), np.asarray(moe.b[...], np.float64),
        moe.scale, active, top_k,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_one_hot_router_equals_plain_per_task_lora(scan):
    """Only expert t active: its gate is exactly 1 and the model is jaxcl's LoRA with A_t, B_t."""
    cfg, moe_model = _grown(scan=scan)
    plain = Decoder(cfg, rngs=nnx.Rngs(0))  # the same base weights
    ids = _ids(cfg.vocab_size)
    assert np.array_equal(np.asarray(moe_model(ids)), np.asarray(plain(ids)))  # B = 0: no change
    gd, state = nnx.split(moe_model, nnx.Param)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype)
        if getattr(p[-1], "key", None) == "b" else x,
        params,
    )  # fmt: skip
    lora_cfg = lora_lib.LoRAConfig(rank=4, alpha=8.0, targets=("q", "v"))
    for t in range(3):
        one_hot = [1.0 if e == t else 0.0 for e in range(3)]
        routed = nnx.merge(gd, set_active(params, one_hot))(ids)
        ref = Decoder(cfg, rngs=nnx.Rngs(0))
        lora_lib.add_adapter(ref, "task", lora_cfg, rngs=nnx.Rngs(1))
        for path, module in nnx.iter_modules(ref):
            if isinstance(module, lora_lib.LoRAPair):
                *mod_path, _, proj, _, _ = path  # .../attn/lora/q/tasks/task
                src = params
                for k in (*mod_path, "moe_lora", proj):
                    src = src[k]
                module.a[...] = src["a"][..., t, :, :]
                module.b[...] = src["b"][..., t, :, :]
        np.testing.assert_allclose(np.asarray(routed), np.asarray(ref(ids)), rtol=1e-6, atol=1e-6)


def test_balance_loss_matches_numpy_switch_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 7, 4)).astype(np.float32)
    active = np.array([1, 1, 1, 0], np.float32)
    for top_k in (None, 2):
        _, probs = route(jnp.asarray(logits), jnp.asarray(active), top_k)
        got = float(balance_loss(probs, jnp.asarray(active), top_k))
        p = _np_softmax(np.where(active > 0, logits, -np.inf)).reshape(-1, 4)
        k = top_k or 1
        top = np.argsort(-p, axis=-1)[:, :k]
        f = np.bincount(top.ravel(), minlength=4) / (p.shape[0] * k)
        want = 3 * np.sum(f * p.mean(0))
        assert got == pytest.approx(want, rel=1e-5)
    uniform = jnp.full((8, 3), 1 / 3)
    assert float(balance_loss(uniform, jnp.ones(3), None)) == pytest.approx(1.0)


def test_balance_gradient_reaches_the_routers_and_weighs_as_declared():
    """With B = 0 the LM loss has no gradient for the routers: what they get is balance·∇aux."""
    cfg, model = _grown(balance=0.5)
    gd, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    ids = _ids(cfg.vocab_size)
    g = jax.grad(lambda p: jnp.mean(nnx.merge(gd, p)(ids) ** 2))(params)
    router_grad = g["layers"][0]["attn"]["moe_lora"]["q"]["router"]
    assert float(jnp.abs(router_grad).max()) > 0
    _, off = _grown(balance=0.0)
    gd0, st0 = nnx.split(off, nnx.Param)
    g0 = jax.grad(lambda p: jnp.mean(nnx.merge(gd0, p)(ids) ** 2))(nnx.to_pure_dict(st0))
    assert not np.any(np.asarray(g0["layers"][0]["attn"]["moe_lora"]["q"]["router"]))


def test_per_task_mask_trains_only_the_routers_and_expert_t():
    cfg, model = _grown()
    gd, state = nnx.split(model, nnx.Param)
    params = set_active(nnx.to_pure_dict(state), [1.0, 1.0, 0.0])  # task 1
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.chain(optax.sgd(1.0), train_experts("per_task"))
    updates, _ = tx.update(grads, tx.init(params), params)
    moe = updates["layers"][0]["attn"]["moe_lora"]["q"]
    assert np.all(np.asarray(moe["router"]) != 0)
    for name in ("a", "b"):
        u = np.asarray(moe[name])
        assert np.all(u[1] != 0) and not np.any(u[0]) and not np.any(u[2])
    assert not np.any(np.asarray(moe["active"]))
    assert not np.any(np.asarray(updates["layers"][0]["attn"]["q"]))
    assert not np.any(np.asarray(updates["embed"]))
    pool = optax.chain(optax.sgd(1.0), train_experts("pool"))
    pu, _ = pool.update(grads, pool.init(params), params)
    assert np.all(np.asarray(pu["layers"][0]["attn"]["moe_lora"]["q"]["a"]) != 0)
    n_moe = new_param_count(params)
    per_q = cfg.hidden_size * 3 + 3 * (
        cfg.hidden_size * 4 + 4 * cfg.num_heads * cfg.resolved_head_dim
    )
    assert n_moe > per_q
    assert trained_count(params, "pool") == n_moe - sum(
        x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
        if getattr(p[-1], "key", None) == "active"
    )  # fmt: skip


def _recipe(out, experts=3, mode="per_task", tasks=3):
    names = ("sentiment", "capitals", "antonyms")[:tasks]
    return {
        "name": "moe", "out_dir": str(out), "seed": 0, "probes": False,
        "model": {"preset": "test-micro", "moe_lora": {"experts": experts}},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "stages": [{
            "name": "cit", "kind": "instruct", "seq_len": 48, "batch_size": 4,
            "steps_per_task": 2, "methods": [{"name": "moe_lora", "mode": mode}],
            "tasks": [{"name": n, "data": {"bundled": f"cit/{n}", "train_size": 16,
                                           "eval_size": 4}} for n in names],
        }],
    }  # fmt: skip


def test_bad_input_is_refused_naming_the_field(tmp_path):
    raw = _recipe(tmp_path, experts=0)
    with pytest.raises(RecipeError, match=r"model\.moe_lora\.experts"):
        validate(raw)
    with pytest.raises(RecipeError, match=r"model\.moe_lora\.experts: 2 experts .* 3 tasks"):
        validate(_recipe(tmp_path, experts=2))
    validate(_recipe(tmp_path, experts=2, mode="pool"))  # a pool of 2 serves 3 tasks
    raw = _recipe(tmp_path)
    del raw["model"]["moe_lora"]
    with pytest.raises(RecipeError, match=r"model\.moe_lora"):
        validate(raw)
    raw = _recipe(tmp_path)
    raw["model"]["moe_lora"]["top_k"] = 4
    with pytest.raises(RecipeError, match=r"top_k"):
        validate(raw)
    with pytest.raises(ValueError, match=r"experts: must be an integer >= 1"):
        add_moe_lora(Decoder(preset("test-micro"), rngs=nnx.Rngs(0)), experts=0)


def test_dry_run_plan_counts_new_and_trained_parameters(tmp_path):
    from jaxcl.plan import plan

    recipe = validate(_recipe(tmp_path))
    out = plan(recipe)
    _, params, _ = recipe.model.build_abstract()
    assert out["new_parameters"] == new_param_count(params) > 0
    assert out["stages"][0]["trainable"] == trained_count(params, "per_task")
    assert trained_count(params, "per_task") < trained_count(params, "pool")


@pytest.mark.slow  # ~60 s on 2 CPU cores: a two-task recipe run, checkpoints read back
def test_a_stage_moves_only_the_experts_and_keeps_earlier_experts(tmp_path):
    from flax.traverse_util import flatten_dict

    from jaxcl import checkpoint
    from jaxcl.train.runner import run_recipe

    recipe = validate(_recipe(tmp_path, tasks=2))
    start = flatten_dict(recipe.model.build(recipe.seed)[1])
    run_recipe(recipe, overwrite=True)
    stage_dir = tmp_path / "checkpoints" / "cit"
    steps = checkpoint.all_steps(stage_dir)
    like = checkpoint.abstract(recipe.model.build(recipe.seed)[1])
    after = [flatten_dict(checkpoint.restore_params(stage_dir, like, step=s)) for s in steps]
    for key, value in start.items():
        moved = [not np.array_equal(np.asarray(a[key]), np.asarray(value)) for a in after]
        if "moe_lora" not in key:
            assert not any(moved), key  # the base is bit-identical
    b = ("layers", 0, "attn", "moe_lora", "q", "b")
    first, second = (np.asarray(a[b]) for a in after)
    assert np.any(first[0]) and not np.any(first[1])  # task 0 trained expert 0 only
    assert np.array_equal(first[0], second[0]) and np.any(second[1])  # then expert 1, 0 frozen
    act = ("layers", 0, "attn", "moe_lora", "q", "active")
    assert list(np.asarray(after[1][act])) == [1.0, 1.0, 0.0]


def test_new_parameters_shard_by_their_logical_names():
    script = """
import jax
from jaxcl import parallel
from jaxcl.models.spec import ModelSpec
spec = ModelSpec(preset="test-micro", moe_lora={"experts": 4, "targets": ["q", "up"]})
mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
rules = list(parallel.DEFAULT_RULES) + [("experts", None), ("lora_rank", None)]
_, params, names = spec.build_abstract()
sh = parallel.tree_shardings(names, params, mesh, rules)
q = sh["layers"][0]["attn"]["moe_lora"]["q"]
up = sh["layers"][0]["mlp"]["moe_lora"]["up"]
print("A", tuple(q["a"].spec), "B", tuple(q["b"].spec), "R", tuple(q["router"].spec))
print("UPB", tuple(up["b"].spec))
"""
    out = run_on_fake_devices(script)
    assert "A (None, 'fsdp', None)" in out
    assert "B (None, None, 'tensor')" in out
    assert "R ('fsdp', None)" in out
    assert "UPB (None, None, 'tensor')" in out


def test_spec_binds_the_models_expert_count(tmp_path):
    recipe = validate(_recipe(tmp_path))
    (spec,) = recipe.stages[0].methods
    assert isinstance(spec, MoELoraSpec) and spec.experts == 3
    assert spec.active(1) == [1.0, 1.0, 0.0]


def test_export_refuses_a_model_with_routed_experts(tmp_path):
    from jaxcl.models import save_pretrained

    _, model = _grown()
    with pytest.raises(ValueError, match=r"moe_lora.*not a plain Llama"):
        save_pretrained(model, tmp_path / "hf")
