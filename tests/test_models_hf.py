"""jaxcl's decoder against transformers + torch (fp32) on random tiny Llama/Qwen2/Mistral
checkpoints: logits, greedy generation, import of HF directories and export back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcl
from jaxcl.models import from_pretrained, save_pretrained
from jaxcl.models.config import PRESETS
from jaxcl.models.llama import Decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# Each case covers a family member: GQA, MHA, tied/untied, biases, rope scaling, sliding window.
CASES = {
    "llama-gqa-untied": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=10_000.0)),
    "llama-mha-tied-bias": (
        "LlamaConfig",
        dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "llama3-rope-scaling": (
        "LlamaConfig",
        dict(
            num_key_value_heads=1,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500_000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "qwen2-bias-tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral-window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=6)),
}


def hf_model(case: str, seed: int = 0):
    cls, extra = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**BASE, **extra)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped one cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def rel_err(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(case, HF torch model, the jaxcl model loaded from its saved directory, that dir)."""
    case = request.param
    model = hf_model(case)
    out = tmp_path_factory.mktemp(case)
    model.save_pretrained(out)
    return case, model, from_pretrained(out), out


def test_logits_match_transformers(pair):
    case, hf, ours, _ = pair
    ids = np.random.default_rng(0).integers(0, BASE["vocab_size"], size=(2, 19))
    err = rel_err(ours(jnp.asarray(ids)), hf_logits(hf, ids))
    assert err <= 1e-4, f"{case}: max relative error {err:.2e}"


def test_config_fields_mapped(pair):
    case, _, ours, _ = pair
    cfg = ours.config
    assert cfg.qkv_bias == (case in ("llama-mha-tied-bias", "qwen2-bias-tied"))
    assert cfg.tie_embeddings == ("-tied" in case)
    assert (cfg.rope_scaling is not None) == (case == "llama3-rope-scaling")
    assert cfg.sliding_window == (6 if case == "mistral-window" else None)


@pytest.mark.slow
def test_greedy_generation_matches_transformers(pair):
    case, hf, ours, _ = pair
    prompt = np.random.default_rng(1).integers(0, BASE["vocab_size"], size=(1, 7))
    with torch.no_grad():
        theirs = hf.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.ones_like(torch.from_numpy(prompt)),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 7:].numpy()
    mine = np.asarray(jaxcl.generate(ours, prompt, max_new_tokens=32, stop_tokens=()))[0]
    assert len(set(theirs.tolist())) > 1, "degenerate oracle output"
    np.testing.assert_array_equal(mine, theirs, err_msg=case)


def test_save_pretrained_round_trip_through_transformers(pair, tmp_path):
    case, _, ours, _ = pair
    # Perturb the weights so the export cannot just echo the imported files.
    params = nnx.state(ours, nnx.Param)
    key = iter(jax.random.split(jax.random.key(3), 100))
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(next(key), x.shape), params)
    model = nnx.merge(nnx.graphdef(ours), params)
    save_pretrained(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__.lower().startswith(case.split("-")[0].replace("llama3", "llama"))
    ids = np.random.default_rng(2).integers(0, BASE["vocab_size"], size=(2, 13))
    err = rel_err(model(jnp.asarray(ids)), hf_logits(back, ids))
    assert err <= 1e-5, f"{case}: round-trip relative error {err:.2e}"


@pytest.mark.slow
def test_sharded_checkpoint_with_index(tmp_path):
    hf = hf_model("llama-gqa-untied", seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = np.arange(30).reshape(2, 15)
    assert rel_err(from_pretrained(tmp_path)(jnp.asarray(ids)), hf_logits(hf, ids)) <= 1e-4


@pytest.mark.slow
def test_scan_layers_and_remat_match_the_loop(tmp_path):
    hf_model("llama-gqa-untied", seed=5).save_pretrained(tmp_path)
    ids = jnp.asarray(np.arange(24).reshape(2, 12))
    loop = from_pretrained(tmp_path)
    scanned = from_pretrained(tmp_path, scan_layers=True, remat=True)
    assert nnx.state(scanned, nnx.Param)["layers"]["attn"]["q"].shape == (2, 64, 64)
    np.testing.assert_allclose(scanned(ids), loop(ids), atol=1e-5, rtol=1e-5)

    # A gradient through the rematerialised scan equals the plain one.
    def loss(model):
        return jnp.mean(model(ids) ** 2)

    g_loop = nnx.grad(loss)(loop)["layers"][1]["mlp"]["up"][...]
    g_scan = nnx.grad(loss)(scanned)["layers"]["mlp"]["up"][...][1]
    np.testing.assert_allclose(g_scan, g_loop, atol=1e-6, rtol=1e-4)


def test_scanned_program_size_does_not_grow_with_depth():
    def size(layers: int, scan: bool) -> int:
        cfg = PRESETS["test-micro"].replace(num_layers=layers, scan_layers=scan)
        model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        fn = lambda s, ids: nnx.merge(graphdef, s)(ids)
        return len(jax.make_jaxpr(fn)(state, jnp.zeros((1, 8), jnp.int32)).eqns)

    assert size(2, True) == size(12, True)
    assert size(12, False) > 3 * size(2, False)


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params(tmp_path):
    hf = hf_model("qwen2-bias-tied", seed=6)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ids = np.arange(20).reshape(2, 10)
    out = model(jnp.asarray(ids))
    assert out.dtype == jnp.float32
    assert rel_err(out, hf_logits(hf, ids)) < 3e-2


@pytest.mark.slow
def test_export_dtype_and_config(tmp_path):
    model = from_pretrained("test-qwen2")
    save_pretrained(model, tmp_path, dtype="bfloat16")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    back = from_pretrained(tmp_path)
    ids = jnp.asarray(np.arange(16).reshape(2, 8))
    assert rel_err(back(ids), np.asarray(model(ids))) < 3e-2  # bf16 storage rounding
