"""Vocabulary expansion (ToolkenGPT-style new tokens): new embedding / head rows initialised as
the mean of the token's sub-tokens under the original tokenizer.

Oracles: the unexpanded model (old tokens' logits unchanged), numpy means of the sub-token rows
computed from the UTF-8 bytes (the byte tokenizer's definition, not jaxcl's code),
transformers + torch on the exported directory (logits and tokenizer round trip), and the
checkpoint of a recipe stage (only the new rows moved)."""

import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from jaxcl import checkpoint
from jaxcl.models import Decoder, preset, save_pretrained
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.models.vocab import byte_tokenizer_hf, expand_vocab_model
from jaxcl.recipe import RecipeError, validate
from tests.fake_devices import run_on_fake_devices

TOKENS = ["<calc>", "Paris", "été", "the"]


def _old_ids(shape=(2, 24), seed=1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, ByteTokenizer.vocab_size)


def test_byte_tokenizer_hf_gives_the_byte_tokenizers_ids():
    hf, byte = byte_tokenizer_hf(384), ByteTokenizer()
    rng = random.Random(0)
    texts = ["", "  a  b ", "un été chaud 日本 \n\t x", "<0x41> <bos>"]
    texts += ["".join(chr(rng.randint(1, 0x2FFF)) for _ in range(200)) for _ in range(3)]
    for text in texts:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == [b + 3 for b in text.encode("utf-8")]  # the byte tokenizer's definition
        assert ids == byte.encode(text)
        assert hf.decode(ids) == text
    assert len(hf) == 384 and (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name", ["test-micro", "tiny", "test-qwen2"])  # untied, tied, tied
def test_old_tokens_logits_unchanged_and_new_rows_are_sub_token_means(name, scan):
    cfg = preset(name).replace(scan_layers=scan)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = _old_ids()
    before = np.asarray(model(ids))
    grown, tokenizer, new = expand_vocab_model(model, ByteTokenizer(), TOKENS, pad_to_multiple_of=8)
    assert new == [384, 385, 386, 387] and grown.config.vocab_size == 392
    after = np.asarray(grown(ids))
    assert after.shape == (2, 24, 392)
    # the hidden states are bit-identical; the wider head matmul may round differently (float32
    # ulps of the logits' scale)
    np.testing.assert_array_equal(np.asarray(grown.hidden_states(ids)), model.hidden_states(ids))
    diff = float(np.abs(after[..., :384] - before).max()) / float(np.abs(before).max())
    print(
        f"\nmax |old-token logit change| / max |logit| ({name}, "
        f"{'scanned' if scan else 'unrolled'}): {diff:.1e}"
    )
    assert diff <= 1e-6, diff
    embed_old = np.asarray(model.embed[...])
    embed = np.asarray(grown.embed[...])
    assert np.array_equal(embed[:384], embed_old)
    for token, i in zip(TOKENS, new):
        subs = [b + 3 for b in token.encode("utf-8")]
        np.testing.assert_allclose(embed[i], embed_old[subs].mean(0), rtol=1e-6, atol=1e-7)
        if not cfg.tie_embeddings:
            head_old, head = np.asarray(model.lm_head[...]), np.asarray(grown.lm_head[...])
            assert np.array_equal(head[:, :384], head_old)
            np.testing.assert_allclose(head[:, i], head_old[:, subs].mean(1), rtol=1e-6, atol=1e-7)
    # padding rows: the mean of all old rows
    for pad in range(388, 392):
        np.testing.assert_allclose(embed[pad], embed_old.mean(0), rtol=1e-5, atol=1e-7)
    # the extended tokenizer: new tokens are one id each, old text unchanged
    assert tokenizer("x<calc>", add_special_tokens=False)["input_ids"] == [123, 384]


def test_hf_export_loads_in_transformers_with_the_extended_tokenizer(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in ("test-micro", "tiny"):  # untied and tied heads (llama: qwen2 maps to its own
        # transformers tokenizer class, which rebuilds a byte-level BPE from the vocabulary)
        cfg = preset(name)
        grown, tokenizer, new = expand_vocab_model(
            Decoder(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), TOKENS
        )
        # move the new rows off their initialisation, as training would
        grown.embed[...] = (
            grown.embed[...]
            .at[384:]
            .add(0.1 * jax.random.normal(jax.random.key(3), (4, cfg.hidden_size)))
        )
        out = save_pretrained(grown, tmp_path / name, tokenizer=tokenizer)
        config = json.loads((Path(out) / "config.json").read_text())
        assert config["vocab_size"] == 388
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
        text = "Paris, été: <calc> the end"
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert set(new) <= set(ids)  # every new token is one id
        assert hf_tok.decode(ids) == text  # round trip
        assert hf_tok.convert_tokens_to_ids(TOKENS) == new
        batch = np.array([ids, ids[::-1]])
        with torch.no_grad():
            theirs = hf(torch.from_numpy(batch)).logits.numpy()
        ours = np.asarray(grown(jnp.asarray(batch)))
        diff = float(np.abs(ours - theirs).max())
        print(f"\nmax |logit diff| jaxcl vs transformers ({name}, vocab expanded): {diff:.2e}")
        assert diff <= 1e-4


def test_convert_add_tokens_writes_model_and_tokenizer(tmp_path, capsys):
    from jaxcl.convert import convert_main

    file = tmp_path / "tools.txt"
    file.write_text("<calc>\n\n<search>\n", encoding="utf-8")
    assert convert_main("test-micro", str(tmp_path / "out"), add_tokens=str(file)) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_tokens_to_ids(["<calc>", "<search>"]) == [384, 385]
    bad = tmp_path / "bad.txt"
    bad.write_text("<calc>\nZ\n", encoding="utf-8")
    assert convert_main("test-micro", str(tmp_path / "bad"), add_tokens=str(bad)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "'Z'" in err and "already" in err


# ----------------------------------------------------------------------------- recipe


def _recipe(out, model=None, method=None, steps=3, **extra):
    return {
        "name": "vocab",
        "out_dir": str(out),
        "seed": 0,
        "model": model or {"preset": "test-micro", "add_tokens": {"tokens": ["the", "and"]}},
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
                "methods": [method or {"name": "new_tokens"}],
            }
        ],
        **extra,
    }


def test_bad_token_file_is_refused_naming_the_file_and_tokens(tmp_path):
    file = tmp_path / "tokens.txt"
    file.write_text("<calc>\nq\né\n", encoding="utf-8")  # 'q' is one byte: already a token
    model = {"preset": "test-micro", "add_tokens": {"file": str(file)}}
    with pytest.raises(RecipeError, match=rf"add_tokens\.file \({file}\).*'q'") as err:
        validate(_recipe(tmp_path / "run", model=model))
    assert "'<calc>'" not in str(err.value) and "'é'" not in str(err.value)
    file.write_text("<calc>\n<calc>\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="listed twice"):
        validate(_recipe(tmp_path / "run", model=model))
    # the method without tokens to train
    with pytest.raises(RecipeError, match=r"methods\[0\].*tokens"):
        validate(_recipe(tmp_path / "run", model={"preset": "test-micro"}))
    with pytest.raises(RecipeError, match="not tokens of the model's tokenizer"):
        validate(_recipe(tmp_path / "run", method={"name": "new_tokens", "tokens": ["<x>"]}))


def _final(out: Path, stage: str) -> Path:
    stage_dir = out / "checkpoints" / stage
    return stage_dir / str(checkpoint.latest_step(stage_dir))


def test_a_stage_trains_only_the_new_rows(tmp_path):
    from jaxcl.train.runner import make_context, run_recipe

    out = tmp_path / "run"
    recipe = validate(_recipe(out))
    assert recipe.stages[0].methods[0].ids == [384, 385]  # bound to the model section
    _, start, _, tokenizer = recipe.model.build(recipe.seed)
    assert tokenizer.convert_tokens_to_ids(["the", "and"]) == [384, 385]
    run_recipe(recipe)
    ctx, _ = make_context(recipe, console=None)
    end = ctx.restore_model(_final(out, "cpt"))
    before = {k: np.asarray(v) for k, v in flatten_dict(start).items()}
    after = {k: np.asarray(v) for k, v in flatten_dict(end).items()}
    assert before.keys() == after.keys()
    for key in before:
        if key == ("embed",):
            assert np.array_equal(before[key][:384], after[key][:384])
            assert not np.array_equal(before[key][384:], after[key][384:])  # "the" is in the text
        elif key == ("lm_head",):
            assert np.array_equal(before[key][:, :384], after[key][:, :384])
            assert not np.array_equal(before[key][:, 384:], after[key][:, 384:])
        else:
            assert np.array_equal(before[key], after[key]), key  # bit-exact


def test_dry_run_counts_new_and_trained_parameters(tmp_path):
    from jaxcl.plan import format_plan, plan

    model = {
        "preset": "test-micro",
        "add_tokens": {"tokens": ["the", "and"], "pad_to_multiple_of": 64},
    }
    p = plan(validate(_recipe(tmp_path / "plan", model=model)))
    d = preset("test-micro").hidden_size
    assert p["parameters"] == preset("test-micro").replace(vocab_size=448).num_params()
    assert p["new_parameters"] == 64 * d * 2  # 2 new rows + 62 padding rows, embed and head
    assert p["stages"][0]["trainable"] == 2 * d * 2  # only the new tokens' rows train
    assert f"{64 * d * 2:,} new" in format_plan(p)


MESH_SCRIPT = """
import json, sys
from jaxcl.recipe import validate
from jaxcl.train import runner
recipe = validate(json.loads(sys.argv[1]))
seen = {}
original = runner.run_stage
def spy(ctx, stage, params, parent, cursor=None):
    for k in ("embed", "lm_head"):
        seen[k] = [str(params[k].sharding.spec), list(params[k].shape)]
    return original(ctx, stage, params, parent, cursor)
runner.run_stage = spy
runner.run_recipe(recipe)
print("SHARDING" + json.dumps(seen))
"""


def test_new_rows_shard_by_logical_names_on_8_devices(tmp_path):
    model = {
        "preset": "test-micro",
        "add_tokens": {"tokens": ["the", "and"], "pad_to_multiple_of": 8},
    }
    raw = _recipe(tmp_path / "mesh", model=model, steps=1)
    raw["mesh"] = {"data": 2, "fsdp": 2, "tensor": 2}
    stdout = run_on_fake_devices(MESH_SCRIPT, json.dumps(raw))
    seen = json.loads(stdout.split("SHARDING")[-1])
    print(f"\nexpanded vocabulary shardings: {seen}")
    assert seen["embed"] == ["P('tensor', 'fsdp')", [392, 64]]  # (vocab, embed)
    assert seen["lm_head"] == ["P('fsdp', 'tensor')", [64, 392]]  # (embed, vocab)
