"""Chunked losses equal the unchunked ones (values and gradients, 1e-5 relative), and the
unchunked ones equal a numpy log-softmax oracle: LM cross-entropy with loss masks (and packed
rows), DPO log-probs, KL retention, distillation, the pair log-probs of precomputed references
and the eval scorer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.eval.scoring import make_batch_scorer
from jaxcl.models.config import ModelConfig
from jaxcl.models.llama import Decoder
from jaxcl.objectives.bound import lm_objective
from jaxcl.objectives.chunked import ModelApply, chunk_map, num_chunks
from jaxcl.objectives.reference import make_pair_logps_fn
from jaxcl.objectives.terms import compose_objective, distill_term, dpo_term, kl_term, lm_term

CFG = ModelConfig(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
B, T, CHUNK = 3, 40, 16  # 40 = 16 + 16 + 8: a ragged last chunk


def _model(seed: int, **overrides):
    model = Decoder(CFG.replace(**overrides), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return ModelApply(graphdef), params


def _rows(seed: int) -> tuple[jax.Array, jax.Array]:
    r = np.random.default_rng(seed)
    tokens = r.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    mask = (r.random((B, T + 1)) < 0.7).astype(np.int32)
    mask[:, :5] = 0  # a prompt
    return jnp.asarray(tokens), jnp.asarray(mask)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _assert_same(chunked, whole, tol=1e-5):
    (v_c, m_c), g_c = chunked
    (v_w, m_w), g_w = whole
    assert _rel(v_c, v_w) < tol
    for key in m_w:
        assert _rel(m_c[key], m_w[key]) < tol, key
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_w)):
        assert _rel(a, b) < tol


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_hidden_and_head_compose_to_the_model():
    apply, params = _model(0)
    tokens, _ = _rows(0)
    whole = apply(params, tokens[:, :-1])
    split = apply.head(params, apply.hidden(params, tokens[:, :-1]))
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(split))
    assert apply.hidden(params, tokens[:, :-1]).shape == (B, T, CFG.hidden_size)


def test_chunk_map_pads_and_joins():
    x = jnp.arange(2 * 10 * 3, dtype=jnp.float32).reshape(2, 10, 3)
    out = chunk_map(lambda c, a: a.sum(-1) * c, 2.0, (x,), 4)
    np.testing.assert_allclose(out, x.sum(-1) * 2.0)
    assert num_chunks(10, 4) == 3 and num_chunks(10, 0) == 1 and num_chunks(10, 10) == 1


@pytest.mark.parametrize("tied", [True, False])
def test_lm_loss_with_masks_chunked_equals_whole_and_numpy(tied):
    apply, params = _model(1, tie_embeddings=tied)
    tokens, mask = _rows(1)
    batch = {"tokens": tokens, "loss_mask": mask}

    def run(chunk):
        loss_fn = compose_objective(apply, [lm_term(question_loss=0.25)], chunk=chunk).loss_fn
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, {}), has_aux=True))(params)

    _assert_same(run(CHUNK), run(0))
    logits = np.asarray(apply(params, tokens[:, :-1]), np.float64)
    lp = np.take_along_axis(_np_log_softmax(logits), np.asarray(tokens[:, 1:])[..., None], -1)
    m = np.asarray(mask[:, 1:], np.float64)
    answer = -(lp[..., 0] * m).sum() / m.sum()
    (_, metrics), _ = run(CHUNK)
    np.testing.assert_allclose(float(metrics["lm/answer"]), answer, rtol=1e-5)
    # the bound LM objective (bench, library use) takes the same path
    lm = lm_objective(apply, chunk=CHUNK).loss_fn(params, batch, {})[0]
    np.testing.assert_allclose(float(lm), answer, rtol=1e-5)


def test_packed_rows_chunked_equals_whole():
    apply, params = _model(2)
    tokens, mask = _rows(2)
    seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 21], B, 0), jnp.int32)
    pos = jnp.asarray(np.repeat([list(range(20)) + list(range(21))], B, 0), jnp.int32)
    batch = {"tokens": tokens, "loss_mask": mask, "segment_ids": seg, "positions": pos}

    def run(chunk):
        loss_fn = compose_objective(apply, [lm_term()], chunk=chunk).loss_fn
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, {}), has_aux=True))(params)

    _assert_same(run(CHUNK), run(0))


def _pairs(seed: int) -> dict:
    tc, mc = _rows(seed)
    tr, mr = _rows(seed + 100)
    return {"chosen_tokens": tc, "chosen_mask": mc, "rejected_tokens": tr, "rejected_mask": mr}


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_with_kl_and_distill_chunked_equals_whole(kind):
    apply, params = _model(3)
    _, ref = _model(4)
    _, prev = _model(5)
    batch = _pairs(3)
    frozen = {"reference": ref, "task_start": prev}
    terms = [
        dpo_term(beta=0.1, kind=kind),
        kl_term(0.5, direction="reverse"),
        distill_term(0.5, against="reference", temperature=2.0, top_k=7),
    ]

    def run(chunk):
        loss_fn = compose_objective(apply, terms, chunk=chunk).loss_fn
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, frozen), has_aux=True))(
            params
        )

    chunked, whole = run(CHUNK), run(0)
    _assert_same(chunked, whole)
    assert set(chunked[0][1]) == set(whole[0][1])  # the same metrics, logits/* included


def test_forward_kl_and_full_distill_chunked_equals_whole():
    apply, params = _model(6)
    _, prev = _model(7)
    tokens, mask = _rows(6)
    batch = {"tokens": tokens, "loss_mask": mask}
    terms = [lm_term(), kl_term(direction="forward"), distill_term(temperature=1.5)]

    def run(chunk):
        loss_fn = compose_objective(apply, terms, chunk=chunk).loss_fn
        fn = lambda p: loss_fn(p, batch, {"task_start": prev})  # noqa: E731
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    _assert_same(run(CHUNK), run(0))


def test_pair_logps_and_scorer_chunked_equal_whole():
    apply, params = _model(8)
    batch = _pairs(8)
    chunked = make_pair_logps_fn(apply, CHUNK)(params, batch)
    whole = make_pair_logps_fn(apply, 0)(params, batch)
    for a, b in zip(chunked, whole):
        assert _rel(a, b) < 1e-5
    tokens, mask = batch["chosen_tokens"], batch["chosen_mask"]
    s_c = make_batch_scorer(apply, CHUNK)(params, tokens, mask)
    s_w = make_batch_scorer(apply, 0)(params, tokens, mask)
    assert _rel(s_c[0], s_w[0]) < 1e-5
    np.testing.assert_array_equal(np.asarray(s_c[1]), np.asarray(s_w[1]))
    np.testing.assert_array_equal(np.asarray(s_c[2]), np.asarray(s_w[2]))
