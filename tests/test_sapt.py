"""SAPT (Zhao et al., ACL 2024): task LoRA blocks mixed by shared attentive selection.

Oracles: numpy implementations of the paper's (and reference code's) formulas, the selection
``softmax(k · LayerNorm(SiLU(maxpool(E[x])·W₁·W₂)) / √d)`` and the weighted sum of the blocks'
outputs; jaxcl's own LoRA adapters (:mod:`jaxcl.models.lora`, an independent module) for the
one-hot selection; torch's ``KLDivLoss(reduction="batchmean")`` exactly as the reference's
``memory_replay`` calls it for attentive reflection; the checkpoints of a recipe stage for the
earlier blocks staying bit-identical."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from jaxcl import checkpoint
from jaxcl.models import Decoder, preset, save_pretrained
from jaxcl.models import lora as lora_lib
from jaxcl.models.sapt import (
    SaptBank,
    SaptConfig,
    add_sapt,
    block_weights,
    reflection_loss,
    router_params,
    routing,
)
from jaxcl.recipe import RecipeError, validate
from tests.fake_devices import run_on_fake_devices

TASKS = ("sentiment", "capitals", "antonyms")


def _ids(vocab: int, shape=(2, 10), seed=1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 3, vocab)


def _sapt_model(scan=False, tasks=3, targets=("q", "v"), seed=0) -> Decoder:
    """test-micro with SAPT blocks whose B are random (so every block changes the output) and a
    random query projection."""
    model = Decoder(preset("test-micro").replace(scan_layers=scan), rngs=nnx.Rngs(0))
    add_sapt(model, SaptConfig(tasks=tasks, samples=3, targets=targets), rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 7)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, SaptBank):
            key, sub = jax.random.split(key)
            module.b[...] = 0.05 * jax.random.normal(sub, module.b[...].shape)
    router = model.sapt
    k1, k2 = jax.random.split(key)
    router.ln_scale[...] = 1 + 0.1 * jax.random.normal(k1, router.ln_scale[...].shape)
    router.ln_bias[...] = 0.1 * jax.random.normal(k2, router.ln_bias[...].shape)
    return model


# ----------------------------------------------------------------------------- numpy oracles


def np_weights(embed, ids, router, tau):
    """The reference's cal_attention, made causal: position t pools tokens 0..t."""
    e = embed[ids].astype(np.float64)  # [B, T, d]
    q = np.maximum.accumulate(e, axis=1)
    h = q @ router["w1"] @ router["w2"]
    h = h / (1 + np.exp(-h))  # SiLU
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    h = h * router["ln_scale"] + router["ln_bias"]
    s = h @ router["keys"].T / tau
    s = np.where(router["active"] > 0.5, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    return s / s.sum(-1, keepdims=True)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def test_selection_matches_numpy_oracle():
    model = _sapt_model()
    model.sapt.active[...] = jnp.asarray([1.0, 1.0, 0.0])
    router = _np(router_params(model.sapt))
    ids = _ids(model.config.vocab_size)
    with routing(model, ids):
        got = np.asarray(block_weights())
    want = np_weights(np.asarray(model.embed[...]), np.asarray(ids), router, math.sqrt(64))
    assert got.shape == (2, 10, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[..., 2] == 0)  # the inactive block gets no weight
    assert np.all(got[..., 0] > 0) and np.all(got[..., 1] > 0)


def test_weighted_combination_matches_numpy_sum_of_blocks():
    """``(α/r) Σ_n w_n · x·A_n·B_n`` against numpy, block by block."""
    rng = np.random.default_rng(0)
    n, d_in, r, d_out = 3, 8, 2, 5
    a, b = rng.normal(size=(n, d_in, r)), rng.normal(size=(n, r, d_out))
    x = rng.normal(size=(2, 4, d_in))
    w = rng.dirichlet(np.ones(n), size=(2, 4))
    bank = SaptBank(
        jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), ("embed", "heads"), 4.0
    )
    got = np.asarray(bank(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)))
    want = sum(w[..., i : i + 1] * (x @ a[i] @ b[i]) for i in range(n)) * 4.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_one_hot_selection_equals_plain_per_task_lora(scan):
    """Only block j active: the softmax is exactly one-hot, and the model is the base model with
    jaxcl's own LoRA adapter (A_j, B_j, the same α/r) on the same projections."""
    model = _sapt_model(scan=scan, targets=("q", "v", "down"))
    ids = _ids(model.config.vocab_size)
    base = Decoder(preset("test-micro").replace(scan_layers=scan), rngs=nnx.Rngs(0))
    plain = _jitted(base)(ids)
    for j in (0, 2):
        model.sapt.active[...] = jnp.asarray(np.eye(3)[j], jnp.float32)
        got = _jitted(model)(ids)
        ref = Decoder(preset("test-micro").replace(scan_layers=scan), rngs=nnx.Rngs(0))
        cfg = lora_lib.LoRAConfig(rank=4, alpha=32.0, targets=("q", "v", "down"))
        lora_lib.add_adapter(ref, "task", cfg, rngs=nnx.Rngs(0))
        for (_, ours), (_, theirs) in zip(_banks(model), _pairs(ref), strict=True):
            theirs.a[...] = ours.a[...][..., j, :, :]
            theirs.b[...] = ours.b[...][..., j, :, :]
        want = _jitted(ref)(ids)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert not np.allclose(got, plain, atol=1e-3)  # the block does change the model


def _jitted(model):
    """``ids -> logits`` of ``model`` as it is now, compiled (eager NNX dispatch is slow)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    return lambda ids: np.asarray(fn(state, ids))


def _banks(model):
    return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, SaptBank)]


def _pairs(model):
    return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, lora_lib.LoRAPair)]


def test_fresh_blocks_leave_the_model_bit_identical_and_decode_matches_the_forward():
    cfg = preset("test-micro")
    base = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = _ids(cfg.vocab_size)
    before = _jitted(base)(ids)
    add_sapt(base, SaptConfig(tasks=2), rngs=nnx.Rngs(1))
    assert np.array_equal(_jitted(base)(ids), before)  # B = 0: bit for bit
    # a key/value-cache decode carries the running max: the same logits as the full forward
    model = _sapt_model()
    model.sapt.active[...] = jnp.ones(3)
    full = _jitted(model)(ids)
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda st, *a: nnx.merge(graphdef, st).decode(*a))
    cache = model.init_cache(2, 12)
    valid = jnp.zeros((2, 12), bool).at[:, :6].set(True)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    logits, cache = decode(state, ids[:, :6], pos, cache, valid, 0)
    np.testing.assert_allclose(np.asarray(logits), full[:, :6], rtol=1e-4, atol=1e-5)
    for t in range(6, 10):
        valid = valid.at[:, t].set(True)
        step, cache = decode(state, ids[:, t : t + 1], jnp.full((2, 1), t), cache, valid, t)
        np.testing.assert_allclose(np.asarray(step[:, 0]), full[:, t], rtol=1e-4, atol=1e-5)


def test_reflection_matches_torch_kldiv_of_the_reference():
    """``Σ_{i<k} KLDivLoss(batchmean)(log_softmax(scores_i), [y_i, 0…])`` as the reference's
    memory_replay computes it per earlier task (its targets zero on later blocks)."""
    torch = pytest.importorskip("torch")
    model = _sapt_model(tasks=4)
    rng = np.random.default_rng(3)
    router = router_params(model.sapt)
    router["memory_x"] = jnp.asarray(rng.normal(size=(4, 3, 64)) * 0.1, jnp.float32)
    y = np.zeros((4, 4))
    y[0, :1] = 1.0
    y[1, :2] = rng.dirichlet(np.ones(2))
    y[2, :3] = rng.dirichlet(np.ones(3))
    router["memory_y"] = jnp.asarray(y, jnp.float32)
    router["active"] = jnp.asarray([1.0, 1, 1, 0])  # training block 2: tasks 0 and 1 replayed
    got = float(reflection_loss(router, math.sqrt(64)))
    r = _np(router)
    want = 0.0
    for i in range(2):
        q = r["memory_x"][i]
        h = q @ r["w1"] @ r["w2"]
        h = h / (1 + np.exp(-h))
        h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
        h = h * r["ln_scale"] + r["ln_bias"]
        scores = torch.tensor((h @ r["keys"].T / 8.0)[:, :3])  # the active blocks
        target = torch.tensor(y[i, :3]).repeat(3, 1)
        kl = torch.nn.KLDivLoss(reduction="batchmean")
        want += float(kl(torch.nn.functional.log_softmax(scores, 1), target))
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)
    router["active"] = jnp.asarray([1.0, 0, 0, 0])  # the first task replays nothing
    assert float(reflection_loss(router, 8.0)) == 0.0


def test_mask_keeps_the_current_block_and_the_query_projection_only():
    from jaxcl.methods.sapt import sapt_mask, trained_count

    model = _sapt_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["sapt"]["active"] = jnp.asarray([1.0, 1.0, 0.0])  # block 1 trains
    tx = sapt_mask()
    ones = jax.tree.map(jnp.ones_like, params)
    out, _ = tx.update(ones, tx.init(params), params)
    flat = {k: np.asarray(v) for k, v in flatten_dict(out).items()}
    kept = 0
    for key, u in flat.items():
        if "sapt" not in key:
            assert not u.any(), key
        elif key[-1] in ("w1", "w2", "ln_scale", "ln_bias"):
            assert u.all(), key
        elif key[-1] == "keys" or key[-1] in ("a", "b"):
            rows = u if key[-1] == "keys" else u.reshape(u.shape[-3], -1)
            assert rows[1].all() and not rows[0].any() and not rows[2].any(), key
        else:  # active, memory_x, memory_y
            assert not u.any(), key
        kept += int(u.sum())
    assert kept == trained_count(params)


# ----------------------------------------------------------------------------- recipes


def _recipe(out, tasks=2, model=None, method=None, steps=3, **stage):
    return {
        "name": "sapt", "out_dir": str(out), "seed": 0, "probes": False,
        "model": model or {"preset": "test-micro", "sapt": {"tasks": 3, "samples": 4}},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "optimizer": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                      "weight_decay": 0.1},
        "stages": [{"name": "cit", "kind": "instruct", "seq_len": 40, "batch_size": 4,
                    "eval_batch_size": 8, "steps_per_task": steps,
                    "methods": [method or {"name": "sapt", "max_new_tokens": 6, "record": 8}],
                    "tasks": [{"name": t, "data": {"bundled": f"cit/{t}", "train_size": 32,
                                                   "eval_size": 8}} for t in TASKS[:tasks]],
                    **stage}],
    }  # fmt: skip


def test_bad_input_is_refused_naming_the_field():
    with pytest.raises(RecipeError, match=r"sapt\.tasks"):
        validate(_recipe("/tmp/unused", model={"preset": "test-micro", "sapt": {"tasks": 0}}))
    with pytest.raises(RecipeError, match=r"sapt\.targets"):
        validate(
            _recipe(
                "/tmp/x", model={"preset": "test-micro", "sapt": {"tasks": 2, "targets": ["qq"]}}
            )
        )
    with pytest.raises(RecipeError, match=r"methods\[0\] \(sapt\): model\.sapt: not set"):
        validate(_recipe("/tmp/unused", model={"preset": "test-micro"}))
    with pytest.raises(RecipeError, match=r"model\.sapt\.tasks: 2 task blocks for the 3 tasks"):
        validate(_recipe("/tmp/x", tasks=3, model={"preset": "test-micro", "sapt": {"tasks": 2}}))
    with pytest.raises(RecipeError, match=r"sapt.*drop lora or sapt"):
        validate(_recipe("/tmp/unused", lora={"rank": 2}))


def test_export_is_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match=r"SAPT task blocks.*cannot be exported"):
        save_pretrained(_sapt_model(), tmp_path / "hf")


def test_dry_run_counts_new_and_trained_parameters(tmp_path):
    from jaxcl.plan import format_plan, plan

    p = plan(validate(_recipe(tmp_path / "plan")))
    cfg = preset("test-micro")
    d, layers, n, r, h, m = cfg.hidden_size, cfg.num_layers, 3, 4, 100, 4
    kv = cfg.num_kv_heads * cfg.resolved_head_dim
    nq = cfg.num_heads * cfg.resolved_head_dim
    block = layers * ((d * r + r * nq) + (d * r + r * kv))  # q and v, one task
    router = 2 * d * h + 2 * d
    new = n * block + router + n * d + n + n * m * d + n * n
    assert p["parameters"] == cfg.num_params() + new
    assert p["new_parameters"] == new
    assert p["stages"][0]["trainable"] == block + router + d  # a block, the query, one key
    assert f"{new:,} new" in format_plan(p)


def _final(out: Path, stage: str) -> Path:
    stage_dir = out / "checkpoints" / stage
    return stage_dir / str(checkpoint.latest_step(stage_dir))


@pytest.mark.slow  # ~40 s on 2 loaded CPU cores: two tasks, each scored twice
def test_a_stage_trains_one_block_per_task_and_keeps_the_earlier_ones(tmp_path):
    """Two tasks: after the second, block 0 and key 0 are bit-identical to the end of the first,
    the base model to the start; each task's target and pseudo-samples are recorded."""
    from jaxcl.train.runner import make_context, run_recipe

    out = tmp_path / "run"
    method = {"name": "sapt", "pseudo": "real", "record": 8}
    recipe = validate(_recipe(out, method=method, steps=2))
    _, start, _, _ = recipe.model.build(recipe.seed)
    run_recipe(recipe)
    ctx, _ = make_context(recipe, console=None)
    stage_dir = out / "checkpoints" / "cit"
    first, last = sorted(checkpoint.all_steps(stage_dir))
    one = {
        k: np.asarray(v) for k, v in flatten_dict(ctx.restore_model(stage_dir / str(first))).items()
    }
    two = {
        k: np.asarray(v) for k, v in flatten_dict(ctx.restore_model(stage_dir / str(last))).items()
    }
    begin = {k: np.asarray(v) for k, v in flatten_dict(start).items()}
    for key in begin:
        if "sapt" not in key:
            assert np.array_equal(begin[key], one[key]) and np.array_equal(one[key], two[key]), key
        elif key[-1] in ("a", "b"):
            assert np.array_equal(one[key][0], two[key][0]), key  # block 0 after task 1
            assert np.array_equal(begin[key][1], one[key][1]), key  # block 1 before task 2
            assert np.array_equal(begin[key][2], two[key][2]), key  # block 2 never trained
    assert any(not np.array_equal(begin[k][0], one[k][0]) for k in begin if k[-1] == "b")
    assert any(not np.array_equal(one[k][1], two[k][1]) for k in begin if k[-1] == "b")
    keys = ("sapt", "keys")
    assert np.array_equal(one[keys][0], two[keys][0]) and not np.array_equal(
        one[keys][1], two[keys][1]
    )
    assert two[("sapt", "active")].tolist() == [1, 1, 0]
    y = two[("sapt", "memory_y")]
    assert y[0, 0] == pytest.approx(1.0) and y[0, 1:].sum() == 0  # one block: weight 1
    assert y[1].sum() == pytest.approx(1.0, abs=1e-5) and y[1, 2] == 0 and y[2].sum() == 0
    assert (
        np.abs(two[("sapt", "memory_x")][:2]).sum() > 0 and not two[("sapt", "memory_x")][2].any()
    )
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    second = [x["terms/sapt_reflection"] for x in losses if x.get("task") == TASKS[1]]
    assert second and all(v > 0 for v in second)  # task 0 replayed while task 1 trains


MESH_SCRIPT = """
import json, sys
import jax
from jaxcl import parallel
from jaxcl.recipe import validate
recipe = validate(json.loads(sys.argv[1]))
graphdef, params, names, _ = recipe.model.build(0)
mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
shardings = parallel.tree_shardings(names, params, mesh, parallel.DEFAULT_RULES)
placed = jax.device_put(params, shardings)
bank = placed["layers"][0]["attn"]["sapt"]
router = placed["sapt"]
seen = {"q.a": bank["q"]["a"], "q.b": bank["q"]["b"], "keys": router["keys"],
        "w1": router["w1"], "memory_x": router["memory_x"]}
print("SHARDING" + json.dumps({k: str(v.sharding.spec) for k, v in seen.items()}))
"""


def test_new_parameters_shard_by_logical_names_on_8_devices(tmp_path):
    stdout = run_on_fake_devices(MESH_SCRIPT, json.dumps(_recipe(tmp_path / "mesh")))
    seen = json.loads(stdout.split("SHARDING")[-1])
    print(f"\nSAPT shardings: {seen}")
    assert seen["q.a"] == "P(None, 'fsdp', None)"  # (sapt_tasks, embed, lora_rank)
    assert seen["q.b"] == "P(None, None, 'tensor')"  # (sapt_tasks, lora_rank, heads)
    assert seen["keys"] == "P(None, 'fsdp')"  # (sapt_tasks, embed)
    assert seen["w1"] == "P('fsdp', None)"  # (embed, sapt_hidden)
    assert seen["memory_x"] == "P(None, None, 'fsdp')"


def test_task_end_records_the_target_and_generated_pseudo_samples():
    """The memory hook: the target is the mean selection over the task's examples (numpy
    oracle at each example's last token), the pseudo-samples are the finished model's
    continuations of the task's prompt prefix, pooled as the forward pass pools them."""
    from jaxcl.methods.protocol import Carry, Context, TaskInfo
    from jaxcl.methods.sapt import SaptSpec, activate
    from jaxcl.models.tokenizer import ByteTokenizer
    from jaxcl.train.step import TrainState

    model = _sapt_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tok = ByteTokenizer()
    prompts = ["Q: capital of France?\nA:", "Q: capital of Peru?\nA:", "Q: capital of Chad?\nA:"]
    rows = []
    for p in prompts:
        ids = tok.encode(p + " x", add_bos=True) + [tok.eos_token_id]
        tokens = np.zeros(40, np.int32)
        mask = np.zeros(40, np.float32)
        tokens[: len(ids)], mask[len(ids) - 3 : len(ids)] = ids, 1.0
        rows.append({"tokens": tokens, "loss_mask": mask})
    asked = []

    def generate(p, texts, **kw):
        asked.append((list(texts), kw))
        return [f" {i}zz" for i in range(len(texts))]

    info = TaskInfo(0, "capitals", 2, rows, prompts)
    tools = {"generate": generate, "tokenizer": tok, "seed": 0}
    ctx = Context(info, None, None, None, None, None, tools)
    carry = Carry(TrainState(np.zeros((), np.int32), params, None), {}, None)
    carry = activate(ctx, carry)
    params["sapt"]["active"] = jnp.asarray([1.0, 1.0, 0.0])  # as if block 1 trains now
    carry = carry._replace(state=carry.state._replace(params=params))
    spec = SaptSpec(name="sapt", record=8, max_new_tokens=5, tasks=3)
    out = spec._remember(ctx, carry).state.params["sapt"]
    assert asked[0][0] == ["Q: capital of "] * 3 and asked[0][1]["max_new_tokens"] == 5
    embed = np.asarray(params["embed"], np.float64)
    for i in range(3):
        ids = [tok.bos_token_id, *tok.encode(f"Q: capital of  {i}zz")]
        np.testing.assert_allclose(np.asarray(out["memory_x"][1, i]), embed[ids].max(0), 1e-6)
    router = _np(params["sapt"])
    want = np.mean(
        [
            np_weights(
                embed, r["tokens"][None, : int(np.nonzero(r["loss_mask"])[0][-1]) + 1], router, 8.0
            )[0, -1]
            for r in rows
        ],
        axis=0,
    )
    np.testing.assert_allclose(np.asarray(out["memory_y"][1]), want, rtol=1e-5, atol=1e-6)
    assert float(out["memory_y"][1].sum()) == pytest.approx(1.0) and out["memory_y"][1, 2] == 0
    assert not np.asarray(out["memory_y"][0]).any()  # other tasks' rows untouched
