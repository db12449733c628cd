"""Block expansion (LLaMA Pro, Wu et al. 2024): identity blocks inserted after every k-th block.

Oracles: the unexpanded model itself (an inserted block with zeroed output projections is the
identity, so the logits are bit-identical), transformers' own Llama on the exported directory,
and the checkpoint of a recipe stage (only the inserted blocks moved)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from jaxcl import checkpoint
from jaxcl.models import Decoder, preset, save_pretrained
from jaxcl.models.expand import expand_blocks, expand_model, new_layer_ids
from jaxcl.models.llama import unstack_layers
from jaxcl.recipe import RecipeError, validate
from tests.fake_devices import run_on_fake_devices

ROOT = Path(__file__).parent.parent


def _ids(vocab: int, shape=(2, 16), seed=1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name,every", [("test-micro", 1), ("tiny", 2), ("test-qwen2", 2)])
def test_identity_blocks_leave_logits_bit_identical(name, every, scan):
    cfg = preset(name).replace(scan_layers=scan)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = _ids(cfg.vocab_size)
    before = np.asarray(model(ids))
    deeper, new = expand_model(model, every=every)
    layers = cfg.num_layers
    assert deeper.config.num_layers == layers + layers // every
    assert new == [g * (every + 1) + every for g in range(layers // every)]
    assert np.array_equal(np.asarray(deeper(ids)), before)  # bit for bit
    # the inserted block is a copy of the block before it, output projections zeroed
    params = unstack_layers(nnx.to_pure_dict(nnx.state(deeper, nnx.Param)))
    for i in new:
        flat_new = flatten_dict(params["layers"][i])
        flat_old = flatten_dict(params["layers"][i - 1])
        for key, value in flat_new.items():
            if key in (("attn", "o"), ("mlp", "down"), ("attn", "o_bias"), ("mlp", "down_bias")):
                assert not np.any(np.asarray(value))
            else:
                assert np.array_equal(np.asarray(value), np.asarray(flat_old[key])), key


def test_bad_every_is_refused_naming_the_field():
    cfg = preset("tiny")  # 4 layers
    params = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    for bad in (3, 0, 8):
        with pytest.raises(ValueError, match=r"every: .* divisor of the model's 4 layers"):
            expand_blocks(params, cfg, every=bad)
    with pytest.raises(ValueError, match="every"):
        new_layer_ids(4, 3)
    # in a recipe: the message names model.expand.every, before any training
    with pytest.raises(RecipeError, match=r"expand\.every: 3"):
        validate(_recipe("/tmp/unused", model={"preset": "tiny", "expand": {"every": 3}}))
    # the method without an expanded model, or disagreeing with it
    with pytest.raises(RecipeError, match=r"methods\[0\].*every"):
        validate(_recipe("/tmp/unused", model={"preset": "tiny"}))
    with pytest.raises(RecipeError, match=r"every: 1 differs from model\.expand\.every"):
        validate(_recipe("/tmp/unused", method={"name": "block_expansion", "every": 1}))


def test_hf_export_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = preset("test-micro")
    deeper, new = expand_model(Decoder(cfg, rngs=nnx.Rngs(0)), every=1)
    # move the inserted blocks off the identity, as training would, so their place shows
    for i in new:
        for proj in (deeper.layers[i].attn.o, deeper.layers[i].mlp.down):
            proj[...] = 0.05 * jax.random.normal(jax.random.key(i), proj[...].shape)
    out = save_pretrained(deeper, tmp_path / "hf")
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.array(_ids(cfg.vocab_size))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(deeper(jnp.asarray(ids)))
    diff = float(np.abs(ours - theirs).max())
    print(f"\nmax |logit diff| jaxcl vs transformers (expanded test-micro): {diff:.2e}")
    assert diff <= 1e-4


# ----------------------------------------------------------------------------- recipe


def _recipe(out, model=None, method=None, steps=3, **extra):
    return {
        "name": "llama-pro",
        "out_dir": str(out),
        "seed": 0,
        "model": model or {"preset": "test-micro", "expand": {"every": 2}},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "optimizer": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1},
        "probes": False,
        "log_every": 1,
        "stall_steps": 0,
        "stages": [
            {
                "name": "cpt",
                "kind": "pretrain",
                "seq_len": 32,
                "batch_size": 4,
                "eval_batch_size": 8,
                "steps_per_task": steps,
                "tasks": [
                    {
                        "name": "recipes",
                        "data": {"bundled": "cpt/recipes", "train_size": 64, "eval_size": 8},
                    }
                ],
                "methods": [method or {"name": "block_expansion"}],
            }
        ],
        **extra,
    }


def _final(out: Path, stage: str) -> Path:
    stage_dir = out / "checkpoints" / stage
    return stage_dir / str(checkpoint.latest_step(stage_dir))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_a_stage_trains_only_the_new_blocks(tmp_path, scan):
    from jaxcl.train.runner import make_context, run_recipe

    out = tmp_path / "run"
    recipe = validate(
        _recipe(out, model={"preset": "test-micro", "expand": {"every": 1}, "scan_layers": scan})
    )
    assert recipe.stages[0].methods[0].every == 1  # bound to the model section
    _, start, _, _ = recipe.model.build(recipe.seed)
    run_recipe(recipe)
    ctx, _ = make_context(recipe, console=None)
    end = ctx.restore_model(_final(out, "cpt"))
    new = {1, 3}
    before = {k: np.asarray(v) for k, v in flatten_dict(start).items()}
    after = {k: np.asarray(v) for k, v in flatten_dict(end).items()}
    assert before.keys() == after.keys()
    moved = []
    for key in before:
        if scan and key[0] == "layers":  # stacked [layers, ...]: compare row by row
            for i in range(before[key].shape[0]):
                same = np.array_equal(before[key][i], after[key][i])
                if i not in new:
                    assert same, (key, i)
                elif not same:
                    moved.append((key, i))
        elif key[0] == "layers" and key[1] in new:
            if not np.array_equal(before[key], after[key]):
                moved.append(key)
        else:
            assert np.array_equal(before[key], after[key]), key  # bit-exact
    assert moved  # the new blocks did train
    # their output projections left zero: the new blocks now change the function
    assert any("o" in k or "down" in k for k in map(str, moved))


def test_dry_run_counts_new_and_trained_parameters(tmp_path):
    from jaxcl.plan import format_plan, plan

    recipe = validate(_recipe(tmp_path / "plan"))
    p = plan(recipe)
    cfg = preset("test-micro")
    per_layer = (cfg.num_params() - Decoder_embed(cfg)) // cfg.num_layers
    assert p["parameters"] == cfg.num_params() + per_layer  # 2 layers + 1 inserted
    assert p["new_parameters"] == per_layer
    assert p["stages"][0]["trainable"] == per_layer  # only the inserted block trains
    text = format_plan(p)
    assert f"{per_layer:,} new" in text
    plain = plan(validate(_recipe(tmp_path / "plain", method={"name": "l2_anchor"})))
    assert plain["stages"][0]["trainable"] == plain["parameters"]


def Decoder_embed(cfg) -> int:  # noqa: N802
    """Parameters outside the decoder blocks: embeddings, output head, final norm."""
    return cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2) + cfg.hidden_size


MESH_SCRIPT = """
import json, sys
from jaxcl.recipe import validate
from jaxcl.train import runner
recipe = validate(json.loads(sys.argv[1]))
seen = {}
original = runner.run_stage
def spy(ctx, stage, params, parent, cursor=None):
    for i, layer in params["layers"].items():
        seen[str(i)] = {
            k: str(v.sharding.spec)
            for k, v in {"q": layer["attn"]["q"], "o": layer["attn"]["o"],
                         "gate": layer["mlp"]["gate"], "down": layer["mlp"]["down"],
                         "norm": layer["attn_norm"]["scale"]}.items()
        }
    return original(ctx, stage, params, parent, cursor)
runner.run_stage = spy
runner.run_recipe(recipe)
print("SHARDING" + json.dumps(seen))
"""


def test_new_blocks_shard_by_logical_names_on_8_devices(tmp_path):
    raw = _recipe(tmp_path / "mesh", steps=1)
    raw["mesh"] = {"data": 2, "fsdp": 2, "tensor": 2}
    stdout = run_on_fake_devices(MESH_SCRIPT, json.dumps(raw))
    seen = json.loads(stdout.split("SHARDING")[-1])
    assert sorted(seen) == ["0", "1", "2"]  # 2 layers + 1 inserted after layer 1
    print(f"\nnew block 2 shardings: {seen['2']}")
    assert seen["2"] == seen["1"] == seen["0"]
    assert seen["2"]["q"] == "P('fsdp', 'tensor')"  # (embed, heads)
    assert seen["2"]["down"] == "P('tensor', 'fsdp')"  # (mlp, embed)
