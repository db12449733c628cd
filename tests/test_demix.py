"""DEMix domain experts (jaxcl.models.demix, jaxcl.methods.demix) against independent oracles:
a plain decoder carrying expert j's FFN weights (one expert's forward), numpy implementations of
the posterior mixture and of the reference scorer's cached prior (kernelmachine/demix, BTM)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcl.methods.demix import DemixSpec, new_param_count, train_expert, trained_count
from jaxcl.models import Decoder, preset
from jaxcl.models import demix as dm
from jaxcl.recipe import RecipeError, validate
from jaxcl.train.step import make_apply
from tests.fake_devices import run_on_fake_devices

E = 3


def _ids(vocab, shape=(2, 10), seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _grown(scan=False, experts=E):
    cfg = preset("test-micro").replace(scan_layers=scan)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    dm.add_demix(model, experts=experts)
    graphdef, state = nnx.split(model, nnx.Param)
    return cfg, graphdef, nnx.to_pure_dict(state)


def _perturbed(params, seed=0, scale=0.5):
    """Experts that differ from each other (each expert's FFN weights moved at random)."""
    key = [jax.random.key(seed)]

    def leaf(path, x):
        keys = [getattr(k, "key", k) for k in path]
        if dm.ATTR in keys and keys[-1] in dm.WEIGHTS:
            key[0], sub = jax.random.split(key[0])
            return x + scale * jnp.std(x) * jax.random.normal(sub, x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


def _plain_with_expert(cfg, params, j):
    """The oracle of one expert's forward: a plain decoder whose FFN weights are expert j's."""
    plain = jax.tree.map(lambda x: x, params)
    layers = plain["layers"]
    for layer in layers.values():
        experts = layer["mlp"].pop(dm.ATTR)
        for name in ("gate", "up", "down"):
            layer["mlp"][name] = experts[name][j]
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model, nnx.Param)
    return make_apply(graphdef), plain


def _np_log_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _np_mixture(expert_logits, ids, prior):
    """numpy DEMix scorer: p(x_t|x_<t) = Σ_j p(j|x_<t) p_j(x_t|x_<t) with the posterior
    p(j|x_<t) ∝ p(j) Π_{s<t} p_j(x_s|x_<s) (the prefix the prediction at t conditions on)."""
    lp = _np_log_softmax(np.asarray(expert_logits, np.float64))  # [E, B, T, V]
    e, b, t, _ = lp.shape
    out = np.zeros(lp.shape[1:])
    for r in range(b):
        for pos in range(t):
            prefix = np.array(
                [sum(lp[j, r, s, ids[r, s + 1]] for s in range(pos)) for j in range(e)]
            )
            with np.errstate(divide="ignore"):
                z = np.log(prior) + prefix
            post = np.exp(z - z.max())
            post /= post.sum()
            out[r, pos] = np.log(np.einsum("j,jv->v", post, np.exp(lp[:, r, pos])))
    return out


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_experts_leave_logits_bit_identical(scan):
    cfg = preset("test-micro").replace(scan_layers=scan)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = _ids(cfg.vocab_size)
    before = model(ids)
    dm.add_demix(model, experts=E)
    assert jnp.array_equal(model(ids), before)
    _, graphdef, params = _grown(scan)
    apply = make_apply(graphdef)
    for j in range(E):  # each fresh expert (a copy of the base FFN) computes the base's logits
        assert jnp.array_equal(apply(dm.select(params, j), ids), before)


def test_selected_expert_forward_equals_a_plain_model_with_its_ffn():
    cfg, graphdef, params = _grown()
    params = _perturbed(params)
    apply, ids = make_apply(graphdef), _ids(cfg.vocab_size)
    for j in range(E):
        oracle_apply, plain = _plain_with_expert(cfg, params, j)
        np.testing.assert_allclose(
            apply(dm.select(params, j), ids), oracle_apply(plain, ids), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("active", [[1, 1, 1], [1, 1, 0]])
def test_posterior_mixture_matches_numpy(active):
    cfg, graphdef, params = _grown()
    params = _perturbed(params, scale=2.0)
    apply, ids = make_apply(graphdef), _ids(cfg.vocab_size, (2, 7))
    prior = np.array([0.5, 0.3, 0.2]) * np.array(active)
    params = dm.set_leaf(dm.set_leaf(params, "active", active), "prior", [0.5, 0.3, 0.2])
    got = jax.jit(lambda p, x: dm.mixture_logprobs(apply, p, x))(params, ids)
    one = jax.jit(lambda p, j, x: apply(dm.select(p, j), x))
    logits = np.stack([np.asarray(one(params, j, ids)) for j in range(E)])
    want = _np_mixture(logits, np.asarray(ids), prior / prior.sum())
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_one_hot_posterior_mixture_equals_the_single_expert():
    cfg, graphdef, params = _grown()
    params = _perturbed(params, scale=2.0)
    apply, ids = make_apply(graphdef), _ids(cfg.vocab_size)
    params = dm.set_leaf(params, "active", [1, 1, 1])
    params = dm.set_leaf(params, "prior", [0.0, 1.0, 0.0])  # one-hot prior: one-hot posterior
    got = dm.mixture_logprobs(apply, params, ids)
    single = jax.nn.log_softmax(apply(dm.select(params, 1), ids), -1)
    np.testing.assert_allclose(got, single, rtol=1e-6, atol=1e-6)
    one = dm.set_leaf(params, "active", [0, 1, 0])  # one active expert: the same
    np.testing.assert_allclose(dm.mixture_logprobs(apply, one, ids), single, atol=1e-6)


def test_posterior_restarts_at_each_packed_segment():
    lp = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 6)), jnp.float32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2]])
    prior = jnp.log(jnp.asarray([0.25, 0.75]))
    got = np.asarray(dm.posterior(prior, lp, seg))
    for t, start in enumerate([0, 0, 0, 3, 3, 3]):
        z = np.asarray(prior) + np.asarray(lp[:, 0, start:t]).sum(-1)
        np.testing.assert_allclose(got[:, 0, t], _np_log_softmax(z, 0), atol=1e-6)


def _reference_prior(logliks, alpha):
    """The paper's code's cached prior (kernelmachine/demix ``fairseq_cli/ensemble_eval_lm.py``,
    ``updating_prior`` estimate pass): each sequence's posterior under a uniform prior, averaged
    by ``pd.DataFrame(posteriors).ewm(alpha=0.3, adjust=False).mean()``, its last row."""
    pd = pytest.importorskip("pandas")
    z = logliks - logliks.max(axis=1, keepdims=True)
    post = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return pd.DataFrame(post).ewm(alpha=alpha, adjust=False).mean().tail(n=1).to_numpy()[0]


def test_cached_prior_matches_the_reference_moving_average():
    rng = np.random.default_rng(0)
    ll = rng.normal(-40, 2, size=(100, 3))
    np.testing.assert_allclose(dm.cached_prior(ll, 0.3), _reference_prior(ll, 0.3), rtol=1e-12)
    got = dm.cached_prior(ll, 0.3, active=np.array([1, 0, 1]))  # an inactive expert: prior 0
    assert got[1] == 0.0
    np.testing.assert_allclose(got[[0, 2]], _reference_prior(ll[:, [0, 2]], 0.3), rtol=1e-12)


@pytest.mark.parametrize("scan", [False, True])
def test_mask_trains_only_the_selected_expert(scan):
    cfg, graphdef, params = _grown(scan)
    params = dm.select(dm.set_leaf(params, "active", [1, 1, 0]), 1)
    apply, ids = make_apply(graphdef), _ids(cfg.vocab_size)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), train_expert())
    state = tx.init(params)

    def loss(p):
        return -jnp.mean(jax.nn.log_softmax(apply(p, ids[:, :-1]))[..., 0])

    @jax.jit
    def step(p, state):
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    new = params
    for _ in range(2):
        new, state = step(new, state)
    moved = dict(jax.tree_util.tree_leaves_with_path(new))
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", k) for k in path]
        a, b = np.asarray(a), np.asarray(moved[path])
        if dm.ATTR in keys and keys[-1] in dm.WEIGHTS:
            axis = a.ndim - 3
            for j in range(E):
                same = np.array_equal(np.take(a, j, axis), np.take(b, j, axis))
                assert same == (j != 1), (keys, j)  # expert 1 moved, the others bit-identical
        else:
            assert np.array_equal(a, b), keys  # base, attention, embeddings, control leaves


def test_copy_expert_from_base_and_from_an_expert():
    _, _, params = _grown(scan=True)
    params = _perturbed(params)
    mlp = params["layers"]["mlp"]
    out = dm.copy_expert(params, None, 2)["layers"]["mlp"]
    np.testing.assert_array_equal(out[dm.ATTR]["gate"][:, 2], mlp["gate"])
    np.testing.assert_array_equal(out[dm.ATTR]["down"][:, 0], mlp[dm.ATTR]["down"][:, 0])
    out = dm.copy_expert(params, 0, 1)["layers"]["mlp"][dm.ATTR]
    np.testing.assert_array_equal(out["up"][:, 1], mlp[dm.ATTR]["up"][:, 0])


def test_nearest_init_picks_the_expert_with_the_highest_cached_prior():
    from types import SimpleNamespace

    cfg, graphdef, params = _grown()
    params = _perturbed(params, scale=2.0)
    apply = make_apply(graphdef)
    tokens = np.asarray(_ids(cfg.vocab_size, (6, 9), seed=3))
    rows = {"tokens": tokens, "loss_mask": np.ones_like(tokens)}
    spec = DemixSpec(name="demix", experts=E, batch_size=4)
    # the oracle: each earlier expert's summed log-likelihood of each sequence, then the
    # reference's moving average of the posteriors, its argmax
    ll = np.zeros((len(tokens), 2))
    for j in range(2):
        lp = np.asarray(jax.nn.log_softmax(apply(dm.select(params, j), tokens[:, :-1]), -1))
        ll[:, j] = np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0].sum(-1)
    want = int(np.argmax(_reference_prior(ll, 0.3)))
    ctx = SimpleNamespace(apply=apply)
    assert spec._source(ctx, params, rows, 2) == want  # experts 0, 1 exist before domain 2
    assert spec._source(ctx, params, rows, 0) is None  # the first domain: the base FFN
    assert spec.model_copy(update={"init": "previous"})._source(ctx, params, rows, 2) == 1


def _recipe(out, experts=2, tasks=2, steps=2):
    names = ("recipes", "starlog")[:tasks]
    return {
        "name": "demix", "out_dir": str(out), "seed": 0, "probes": False,
        "model": {"preset": "test-micro", "demix": {"experts": experts}},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "stages": [{
            "name": "cpt", "kind": "pretrain", "seq_len": 32, "batch_size": 4,
            "steps_per_task": steps, "methods": [{"name": "demix", "prior_sequences": 8}],
            "tasks": [{"name": n, "data": {"bundled": f"cpt/{n}", "train_size": 32,
                                           "eval_size": 8}} for n in names],
        }],
    }  # fmt: skip


def test_bad_input_is_refused_naming_the_field(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.demix\.experts"):
        validate(_recipe(tmp_path, experts=0))
    with pytest.raises(RecipeError, match=r"model\.demix\.experts: 1 experts .* 2 domains"):
        validate(_recipe(tmp_path, experts=1))
    raw = _recipe(tmp_path)
    del raw["model"]["demix"]
    with pytest.raises(RecipeError, match=r"model\.demix"):
        validate(raw)
    raw = _recipe(tmp_path)
    raw["stages"][0]["kind"] = "instruct"
    raw["stages"][0]["tasks"] = [
        {"name": n, "data": {"bundled": f"cit/{n}", "train_size": 8, "eval_size": 4}}
        for n in ("sentiment", "capitals")
    ]
    with pytest.raises(RecipeError, match=r"demix"):
        validate(raw)
    with pytest.raises(ValueError, match=r"demix\.experts: must be an integer >= 1"):
        dm.add_demix(Decoder(preset("test-micro"), rngs=nnx.Rngs(0)), experts=0)


def test_dry_run_plan_counts_new_and_trained_parameters(tmp_path):
    from jaxcl.plan import plan

    recipe = validate(_recipe(tmp_path, experts=3))
    (spec,) = recipe.stages[0].methods
    assert isinstance(spec, DemixSpec) and spec.experts == 3
    out = plan(recipe)
    _, params, _ = recipe.model.build_abstract()
    ffn = sum(
        int(np.prod(layer["mlp"][k].shape))
        for layer in params["layers"].values()
        for k in ("gate", "up", "down")
    )
    assert out["new_parameters"] == new_param_count(params) == 3 * ffn + 3 * 3 * 2
    assert out["stages"][0]["trainable"] == trained_count(params) == ffn


def test_new_parameters_shard_by_their_logical_names():
    script = """
from jaxcl import parallel
from jaxcl.models.spec import ModelSpec
spec = ModelSpec(preset="test-micro", demix={"experts": 2}, scan_layers=True)
mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
rules = list(parallel.DEFAULT_RULES) + [("experts", "data")]
_, params, names = spec.build_abstract()
sh = parallel.tree_shardings(names, params, mesh, rules)
d = sh["layers"]["mlp"]["demix"]
print("G", tuple(d["gate"].spec), "D", tuple(d["down"].spec), "S", tuple(d["select"].spec))
"""
    out = run_on_fake_devices(script)
    assert "G (None, 'data', 'fsdp', 'tensor')" in out
    assert "D (None, 'data', 'tensor', 'fsdp')" in out
    assert "S (None, 'data')" in out


def test_export_refuses_a_model_with_demix_experts(tmp_path):
    from jaxcl.models import save_pretrained

    model = Decoder(preset("test-micro"), rngs=nnx.Rngs(0))
    dm.add_demix(model, experts=2)
    with pytest.raises(ValueError, match=r"DEMix.*not a plain Llama"):
        save_pretrained(model, tmp_path / "hf")


@pytest.mark.slow  # ~45 s on 2 CPU cores: a two-domain run, checkpoints read back
def test_a_stage_trains_expert_t_only_and_scores_the_mixture(tmp_path):
    import json

    from flax.traverse_util import flatten_dict

    from jaxcl import checkpoint
    from jaxcl.train.runner import run_recipe

    recipe = validate(_recipe(tmp_path))
    start = flatten_dict(recipe.model.build(recipe.seed)[1])
    run_recipe(recipe, overwrite=True)
    stage_dir = tmp_path / "checkpoints" / "cpt"
    like = checkpoint.abstract(recipe.model.build(recipe.seed)[1])
    after = [
        flatten_dict(checkpoint.restore_params(stage_dir, like, step=s))
        for s in checkpoint.all_steps(stage_dir)
    ]
    for key, value in start.items():
        if dm.ATTR not in key:  # attention, norms, embeddings, the base FFN: bit-identical
            assert all(np.array_equal(np.asarray(a[key]), np.asarray(value)) for a in after), key
    gate = ("layers", 0, "mlp", dm.ATTR, "gate")
    first, second = (np.asarray(a[gate]) for a in after)
    g0 = np.asarray(start[gate])
    assert not np.array_equal(first[0], g0[0]) and np.array_equal(first[1], g0[1])
    assert np.array_equal(second[0], first[0]) and not np.array_equal(second[1], first[1])
    act = ("layers", 0, "mlp", dm.ATTR, "active")
    assert list(np.asarray(after[1][act])) == [1.0, 1.0]
    results = json.loads((tmp_path / "results.json").read_text())
    final = results["stages"][0]["R"][-1]
    assert np.all(np.isfinite(results["stages"][0]["R"]))
    from jaxcl.evaluate import evaluate  # jaxcl eval scores the mixture as training did

    last = stage_dir / str(checkpoint.all_steps(stage_dir)[-1])
    scores = evaluate(recipe, last)["stages"]["cpt"]["scores"]
    np.testing.assert_allclose([scores["recipes"], scores["starlog"]], final, rtol=1e-5)
