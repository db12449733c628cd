"""Generation: the KV-cache path equals the full forward pass, ragged batches equal single
prompts, stop tokens, and the sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcl
from jaxcl.models.config import preset
from jaxcl.models.generate import sample_logits
from jaxcl.models.llama import Decoder


@pytest.fixture(scope="module")
def model():
    return Decoder(preset("test-mistral").replace(num_kv_heads=1), rngs=nnx.Rngs(0))


def test_cached_decode_equals_full_forward(model):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 300, size=(2, 12)))
    full = model(ids)
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda s, *args: nnx.merge(graphdef, s).decode(*args))
    cache = model.init_cache(2, 16)
    valid = jnp.zeros((2, 16), bool).at[:, :5].set(True)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    logits, cache = decode(state, ids[:, :5], pos[:, :5], cache, valid, 0)
    steps = [logits]
    for i in range(5, 12):  # one token at a time; the window (8) slides past the start
        valid = valid.at[:, i].set(True)
        logits, cache = decode(state, ids[:, i : i + 1], pos[:, i : i + 1], cache, valid, i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=2e-5)


def test_ragged_batch_equals_each_prompt_alone(model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 300, size=n).tolist() for n in (3, 17, 9)]
    batched = np.asarray(jaxcl.generate(model, prompts, max_new_tokens=12, stop_tokens=()))
    for row, prompt in zip(batched, prompts):
        alone = np.asarray(jaxcl.generate(model, [prompt], max_new_tokens=12, stop_tokens=()))
        np.testing.assert_array_equal(row, alone[0])
    # The same batch as a right-padded array with an attention mask.
    ids = np.zeros((3, 17), np.int32)
    mask = np.zeros((3, 17), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, 1
    masked = jaxcl.generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(masked), batched)


@pytest.mark.slow
def test_greedy_follows_the_argmax_of_the_forward_pass(model):
    prompt = [5, 77, 123, 9]
    out = np.asarray(jaxcl.generate(model, [prompt], max_new_tokens=6, stop_tokens=()))[0]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    seq = list(prompt)
    for _ in range(6):  # right padding cannot change earlier (causal) positions
        padded = jnp.asarray([seq + [0] * (10 - len(seq))])
        seq.append(int(jnp.argmax(forward(state, padded)[0, len(seq) - 1])))
    assert out.tolist() == seq[len(prompt) :]


def test_stop_tokens_pad_the_rest(model):
    prompt = [5, 77, 123, 9]
    free = np.asarray(jaxcl.generate(model, [prompt], max_new_tokens=10, stop_tokens=()))[0]
    stop = int(free[3])
    first = free.tolist().index(stop)
    out = np.asarray(
        jaxcl.generate(model, [prompt], max_new_tokens=10, stop_tokens=[stop], pad_token_id=-1)
    )[0]
    assert out[: first + 1].tolist() == free[: first + 1].tolist()
    assert (out[first + 1 :] == -1).all()


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompt = [[5, 77, 123, 9]]
    greedy = jaxcl.generate(model, prompt, max_new_tokens=8, stop_tokens=())
    k1 = jaxcl.generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=1, stop_tokens=())
    np.testing.assert_array_equal(k1, greedy)
    hot = dict(max_new_tokens=8, temperature=2.0, stop_tokens=())
    a = jaxcl.generate(model, prompt, seed=0, **hot)
    np.testing.assert_array_equal(a, jaxcl.generate(model, prompt, seed=0, **hot))
    assert not np.array_equal(a, jaxcl.generate(model, prompt, seed=1, **hot))


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    keys = jax.random.split(jax.random.key(0), 2000)

    def support(**kw):
        samples = jax.vmap(lambda k: sample_logits(logits, k, **kw)[0])(keys)
        return set(np.asarray(samples).tolist()), np.asarray(samples)

    assert support(temperature=1.0, top_k=2, top_p=1.0)[0] == {0, 1}
    # Nucleus 0.8: tokens 0, 1 (0.75) are not enough, token 2 brings it to 0.9.
    assert support(temperature=1.0, top_k=0, top_p=0.8)[0] == {0, 1, 2}
    everything, samples = support(temperature=1.0, top_k=0, top_p=1.0)
    assert everything == {0, 1, 2, 3, 4}
    assert abs((samples == 0).mean() - 0.5) < 0.05


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        jaxcl.generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        jaxcl.generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jaxcl.generate(model, [[1, 2]], max_new_tokens=1000)
