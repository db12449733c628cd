"""Soft prompts (issue 16): per-task prompt tuning, Progressive Prompts and L2P.

Oracles: the plain model on real tokens (a prompt whose rows are the embeddings of token ids
``v`` must act exactly as those tokens typed before the input: the virtual tokens' positions,
the order ``[P_t; …; P_0; x]`` and the masking of later prompts all show there), a numpy top-k
over numpy cosines for L2P's selection and its key loss, and the checkpoints of recipe stages
(what trained, what stayed bit-identical)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from jaxcl import checkpoint
from jaxcl.methods.prompts import set_task, train_prompts
from jaxcl.models import Decoder, preset, save_pretrained
from jaxcl.models.prompts import PromptsSpec, add_prompts, key_loss, select
from jaxcl.recipe import RecipeError, validate
from tests.fake_devices import run_on_fake_devices

L = 3  # virtual tokens per prompt


def _model(kind: str, count: int = 3, top_k: int = 2, name: str = "test-micro"):
    base = Decoder(preset(name), rngs=nnx.Rngs(0))
    spec = PromptsSpec(kind=kind, count=count, length=L, top_k=top_k)
    return add_prompts(base, spec, seed=0)


def _as_tokens(model, rng: np.random.Generator) -> np.ndarray:
    """Set every prompt to the embeddings of random token ids; returns the ids ``[N, L]``."""
    n = model.prompts.embed.shape[0]
    ids = rng.integers(3, model.config.vocab_size, size=(n, L))
    model.prompts.embed[...] = jnp.take(model.embed[...], jnp.asarray(ids), axis=0)
    return ids


def _plain_logits(model, ids: np.ndarray) -> np.ndarray:
    """The same weights without prompts, on real tokens."""
    bank = model.prompts
    del model.prompts
    try:
        return np.asarray(model(jnp.asarray(ids)))
    finally:
        model.prompts = bank


def _x(model, shape=(2, 10), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, model.config.vocab_size, size=shape)


@pytest.mark.parametrize("kind", ["per_task", "progressive"])
def test_declared_prompts_act_as_typed_tokens(kind):
    model = _model(kind)
    ids = _as_tokens(model, np.random.default_rng(0))
    x = _x(model)
    for t in range(3):
        model.prompts.task[...] = jnp.float32(t)
        prefix = ids[t] if kind == "per_task" else ids[t::-1].reshape(-1)  # [P_t; ...; P_0]
        full = np.concatenate([np.broadcast_to(prefix, (x.shape[0], prefix.size)), x], axis=1)
        want = _plain_logits(model, full)[:, prefix.size :]
        got = np.asarray(model(jnp.asarray(x)))
        assert got.shape == (*x.shape, model.config.vocab_size)  # real tokens only
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _np_select(model, x: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy oracle: query = mean over positions of the plain model's final hidden states,
    cosine to every key, top-k by argsort (most similar first)."""
    bank = model.prompts
    del model.prompts
    try:
        h = np.asarray(model.hidden_states(jnp.asarray(x)), np.float64)
    finally:
        model.prompts = bank
    q = h.mean(axis=1)
    k = np.asarray(model.prompts.keys[...], np.float64)
    cos = (q @ k.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(k, axis=1)[None, :]
    return np.argsort(-cos, axis=1, kind="stable")[:, :top_k], cos


def test_l2p_selection_equals_numpy_top_k_over_cosine():
    model = _model("pool", count=8, top_k=3)
    x = _x(model, shape=(16, 12), seed=2)
    want, cos = _np_select(model, x, 3)
    ids, active, sim = select(model, jnp.asarray(x))
    assert np.asarray(active).all()
    np.testing.assert_allclose(np.asarray(sim), cos, atol=1e-5)
    assert np.array_equal(np.asarray(ids), want)
    assert len({tuple(sorted(r)) for r in want}) > 1  # rows do select different prompts
    # surrogate loss: (1/B) Σ_b Σ_{j ∈ s(x_b)} (1 − cos(q_b, K_j))
    loss = float(key_loss(model, jnp.asarray(x)))
    oracle = np.mean(np.sum(1.0 - np.take_along_axis(cos, want, axis=1), axis=1))
    assert loss == pytest.approx(oracle, abs=1e-5)
    # the selected prompts are prepended in that order: they act as typed tokens
    tokens = _as_tokens(model, np.random.default_rng(3))
    prefix = tokens[want].reshape(x.shape[0], -1)
    full = _plain_logits(model, np.concatenate([prefix, x], axis=1))[:, prefix.shape[1] :]
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), full, rtol=1e-5, atol=1e-5)


def test_key_loss_moves_only_the_keys():
    model = _model("pool", count=6, top_k=2)
    x = jnp.asarray(_x(model, shape=(4, 8)))
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.grad(lambda p: key_loss(nnx.merge(graphdef, p), x))(params)
    flat = flatten_dict(nnx.to_pure_dict(grads))
    moved = [k for k, v in flat.items() if np.any(np.asarray(v))]
    assert moved == [("prompts", "keys")]


def test_progressive_earlier_tasks_stay_bit_identical():
    """Train task 0, then 1 and 2 (AdamW with weight decay, the mask behind it): task 0's
    logits under its view (prompts ≤ 0) are bit-identical, and every base weight too."""
    model = _model("progressive")
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    start = jax.tree.map(np.asarray, params)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), train_prompts("progressive"))
    opt = tx.init(params)
    x = jnp.asarray(_x(model, shape=(4, 10)))

    def loss(p):
        logits = nnx.merge(graphdef, p)(x[:, :-1])
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    @jax.jit
    def step(p, o):
        u, o = tx.update(jax.grad(loss)(p), o, p)
        return optax.apply_updates(p, u), o

    def logits(p, i):
        return np.asarray(nnx.merge(graphdef, set_task(p, i))(x))

    seen = {}
    for t in range(3):
        params = set_task(params, t)
        for _ in range(3):
            params, opt = step(params, opt)
        seen[t] = logits(params, t)
    for i in range(3):
        assert np.array_equal(logits(params, i), seen[i])  # bit for bit
    end = jax.tree.map(np.asarray, params)
    for key, value in flatten_dict(start).items():
        if key == ("prompts", "embed"):
            for row in range(3):  # each task trained its own prompt
                assert not np.array_equal(value[row], flatten_dict(end)[key][row])
        elif key != ("prompts", "task"):
            assert np.array_equal(value, flatten_dict(end)[key]), key


def test_plain_model_unchanged_and_export_and_decode_refused(tmp_path):
    model = _model("per_task")
    with pytest.raises(ValueError, match="soft prompts"):
        save_pretrained(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="KV-cache generation"):
        model.decode(
            jnp.ones((1, 2), jnp.int32),
            jnp.zeros((1, 2), jnp.int32),
            model.init_cache(1, 4),
            jnp.ones((1, 4), bool),
            0,
        )
    with pytest.raises(ValueError, match="packing: none"):
        model(jnp.ones((1, 4), jnp.int32), segment_ids=jnp.ones((1, 4), jnp.int32))


# ----------------------------------------------------------------------------- recipes

KIND = {"soft_prompt": "per_task", "progressive_prompts": "progressive", "l2p": "pool"}


def _recipe(out, method="progressive_prompts", prompts=None, steps=2, tasks=2, **stage):
    kind = KIND[method]
    pool = {"count": 4, "top_k": 2}
    prompts = prompts or {
        "kind": kind,
        "length": 4,
        **(pool if kind == "pool" else {"count": tasks}),
    }
    names = ("sentiment", "capitals", "antonyms")[:tasks]
    return {
        "name": "prompts",
        "out_dir": str(out),
        "seed": 0,
        "model": {"preset": "test-micro", "prompts": prompts},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "optimizer": {"lr": 3e-2, "warmup_steps": 0, "weight_decay": 0.1},
        "probes": False,
        "log_every": 1,
        "stall_steps": 0,
        "stages": [
            {
                "name": "cit",
                "kind": "instruct",
                "seq_len": 48,
                "batch_size": 4,
                "eval_batch_size": 8,
                "steps_per_task": steps,
                "tasks": [
                    {"name": n, "data": {"bundled": f"cit/{n}", "train_size": 32, "eval_size": 8}}
                    for n in names
                ],
                "methods": [{"name": method}],
                **stage,
            }
        ],
    }


@pytest.mark.parametrize(
    "change, field",
    [
        (
            lambda r: r["model"]["prompts"].update(length=60),
            r"model\.prompts\.length: 60 .*seq_len",
        ),
        (
            lambda r: r["model"]["prompts"].update(length=40, count=8),
            r"model\.prompts\.length: 320 virtual tokens .* max_position_embeddings \(256\)",
        ),
        (lambda r: r["model"]["prompts"].update(count=1), r"model\.prompts\.count: 1 prompts"),
        (
            lambda r: r["model"]["prompts"].update(kind="pool", top_k=2),
            r"model\.prompts\.kind: 'pool', but progressive_prompts needs",
        ),
        (lambda r: r["model"].pop("prompts"), r"model\.prompts: not set"),
        (lambda r: r["stages"][0].update(methods=[]), r"stages\[0\]\.methods: .*exactly one"),
        (lambda r: r["stages"][0].update(packing="concat"), r"stages\[0\]\.packing: concat"),
        (lambda r: r["stages"][0].update(metric="rouge_l"), r"metric rouge_l scores generations"),
        (
            lambda r: r["stages"][0].update(lora={"rank": 2}),
            r"progressive_prompts.*LoRA adapters",
        ),
        (
            lambda r: r["model"].update(prompts={"kind": "pool", "count": 2, "length": 2}),
            r"top_k: 5 prompts selected from a pool of count=2",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_field(change, field):
    raw = _recipe("/tmp/unused")
    change(raw)
    with pytest.raises(RecipeError, match=field):
        validate(raw)


def _checkpoints(out: Path, like) -> list[dict]:
    """Every task end's parameters (flattened numpy)."""
    stage_dir = out / "checkpoints" / "cit"
    return [
        {
            k: np.asarray(v)
            for k, v in flatten_dict(checkpoint.restore_params(stage_dir, like, s)).items()
        }
        for s in checkpoint.all_steps(stage_dir)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["progressive_prompts", "l2p"])
def test_a_stage_trains_only_the_prompts(tmp_path, method):
    from jaxcl.train.runner import run_recipe

    out = tmp_path / "run"
    recipe = validate(_recipe(out, method))
    _, start, _, _ = recipe.model.build(recipe.seed)
    run_recipe(recipe)
    result = json.loads((out / "results.json").read_text())
    stage = result["stages"][0] if "stages" in result else result
    losses = [e for e in stage["losses"]] if "losses" in stage else []
    ends = _checkpoints(out, start)
    assert len(ends) == 2  # one per task
    first, last = ends
    for key, value in flatten_dict(start).items():
        value = np.asarray(value)
        if key[0] != "prompts":
            assert np.array_equal(value, last[key]), key  # the base: bit-identical
    embed = ("prompts", "embed")
    if method == "progressive_prompts":
        assert first[("prompts", "task")] == 0 and last[("prompts", "task")] == 1
        assert np.array_equal(first[embed][0], last[embed][0])  # P_0 frozen after task 0
        assert not np.array_equal(np.asarray(start["prompts"]["embed"][1]), last[embed][1])
    else:
        assert not np.array_equal(np.asarray(start["prompts"]["keys"]), last[("prompts", "keys")])
        if losses:
            assert "terms/l2p_keys" in losses[-1]


def test_dry_run_counts_new_and_trained_parameters(tmp_path):
    from jaxcl.plan import plan

    d = preset("test-micro").hidden_size
    p = plan(validate(_recipe(tmp_path / "a", "soft_prompt")))
    assert p["new_parameters"] == 2 * 4 * d + 1  # two prompts of 4 tokens + the task scalar
    assert p["stages"][0]["trainable"] == 4 * d  # one prompt per task
    p = plan(
        validate(
            _recipe(
                tmp_path / "b", "l2p", prompts={"kind": "pool", "count": 5, "length": 4, "top_k": 2}
            )
        )
    )
    assert p["new_parameters"] == p["stages"][0]["trainable"] == 5 * 4 * d + 5 * d


MESH_SCRIPT = """
import json, sys
from jaxcl.recipe import validate
from jaxcl.train import runner
recipe = validate(json.loads(sys.argv[1]))
seen = {}
original = runner.run_stage
def spy(ctx, stage, params, parent, cursor=None):
    seen.update({k: str(v.sharding.spec) for k, v in params["prompts"].items()})
    seen["embed_table"] = str(params["embed"].sharding.spec)
    return original(ctx, stage, params, parent, cursor)
runner.run_stage = spy
runner.run_recipe(recipe)
print("SHARDING" + json.dumps(seen))
"""


@pytest.mark.slow
def test_prompts_shard_by_logical_names_on_8_devices(tmp_path):
    raw = _recipe(tmp_path / "mesh", "l2p", steps=1, tasks=1)
    raw["mesh"] = {"data": 2, "fsdp": 4, "tensor": 1}
    raw["stages"][0].update(batch_size=8, eval_batch_size=8)  # rows split over 8 devices
    stdout = run_on_fake_devices(MESH_SCRIPT, json.dumps(raw))
    seen = json.loads(stdout.split("SHARDING")[-1])
    print(f"\nprompt bank shardings: {seen}")
    assert seen["embed"] == "P(None, None, 'fsdp')"  # (prompts, prompt_length, embed)
    assert seen["keys"] == "P(None, 'fsdp')"  # (prompts, embed)
