"""The decoder against transformers + torch (independent oracle) on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.models.config import preset
from jaxcl.models.llama import Decoder
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.parallel import param_logical_names

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_state_dict(params, cfg):
    t = lambda x: torch.from_numpy(np.asarray(x).copy())
    sd = {
        "model.embed_tokens.weight": t(params["embed"]),
        "model.norm.weight": t(params["final_norm"]["scale"]),
    }
    for i, layer in params["layers"].items():
        p = f"model.layers.{i}."
        for ours, theirs in [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")]:
            sd[p + f"self_attn.{theirs}.weight"] = t(layer["attn"][ours]).T.contiguous()
        for ours in ("gate", "up", "down"):
            sd[p + f"mlp.{ours}_proj.weight"] = t(layer["mlp"][ours]).T.contiguous()
        sd[p + "input_layernorm.weight"] = t(layer["attn_norm"]["scale"])
        sd[p + "post_attention_layernorm.weight"] = t(layer["mlp_norm"]["scale"])
    sd["lm_head.weight"] = (
        t(params["lm_head"]).T.contiguous()
        if not cfg.tie_embeddings
        else sd["model.embed_tokens.weight"]
    )
    return sd


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_llama(tied):
    cfg = preset("test-micro").replace(tie_embeddings=tied)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=tied,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    rng = np.random.default_rng(0)
    # Non-trivial norm scales, so a mis-mapped norm cannot hide.
    for layer in params["layers"].values():
        layer["attn_norm"]["scale"] = jnp.asarray(
            rng.uniform(0.5, 1.5, cfg.hidden_size), jnp.float32
        )
    nnx.update(model, params)
    missing, unexpected = hf.load_state_dict(_hf_state_dict(params, cfg), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = rng.integers(3, cfg.vocab_size, size=(2, 17))
    ours = np.asarray(model(jnp.asarray(ids)))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)


def test_segment_ids_keep_packed_documents_apart():
    model = Decoder(preset("test-micro"), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 300, size=(1, 6)), rng.integers(3, 300, size=(1, 5))
    packed = jnp.asarray(np.concatenate([a, b], axis=1))
    segments = jnp.asarray([[1] * 6 + [2] * 5])
    positions = jnp.asarray([list(range(6)) + list(range(5))])
    out = model(packed, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(out[:, :6], model(jnp.asarray(a)), atol=1e-5)
    np.testing.assert_allclose(out[:, 6:], model(jnp.asarray(b)), atol=1e-5)


def test_every_parameter_has_logical_axis_names():
    model = Decoder(preset("tiny"), rngs=nnx.Rngs(0))
    names = param_logical_names(model)
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for n, x in zip(
        jax.tree.leaves(names, is_leaf=lambda v: isinstance(v, tuple)), jax.tree.leaves(shapes)
    ):
        assert len(n) == x.ndim and all(isinstance(a, str) for a in n)
    assert preset("tiny").num_params() == sum(x.size for x in jax.tree.leaves(shapes))


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "Größe 東京 — ok"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_token_id and min(ids[1:]) >= tok.offset
    assert max(ids) < tok.vocab_size <= preset("tiny").vocab_size
    assert tok.decode(ids) == text
