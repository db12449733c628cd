"""The fused cross-entropy (``z_y − logsumexp z``, one-hot select) equals the log-softmax
formulation it replaced, against independent oracles: numpy in float64, and torch's
``cross_entropy`` for the loss and its gradient; and the train step's loss and gradients equal
those of the previous formulation within 1e-5 relative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.objectives.lm import causal_lm_loss, token_logps


def _logits(shape, seed=0, scale=4.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _numpy_token_logps(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def test_token_logps_match_a_float64_numpy_log_softmax():
    logits = _logits((3, 7, 384))
    targets = np.random.default_rng(1).integers(0, 384, (3, 7)).astype(np.int32)
    got = np.asarray(token_logps(jnp.asarray(logits), jnp.asarray(targets)))
    np.testing.assert_allclose(got, _numpy_token_logps(logits, targets), rtol=1e-5, atol=1e-6)


def test_loss_and_logit_gradient_match_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    logits = _logits((2, 9, 1000), seed=2)
    targets = np.random.default_rng(3).integers(0, 1000, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.float32)
    mask[0, :3] = 0.0  # prompt tokens carry no loss
    loss, grad = jax.value_and_grad(causal_lm_loss)(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)
    )
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    per_token = torch.nn.functional.cross_entropy(
        z.flatten(0, 1), torch.tensor(targets).long().flatten(), reduction="none"
    )
    m = torch.tensor(mask, dtype=torch.float64).flatten()
    ref = (per_token * m).sum() / m.sum()
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), z.grad.numpy(), rtol=1e-5, atol=1e-8)


def _previous_token_logps(logits, targets):
    """The formulation before the fused one: a materialised log-softmax and a gather."""
    logps = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logps, targets[..., None], axis=-1)[..., 0]


def test_train_step_loss_and_gradients_equal_the_previous_formulation():
    from jaxcl.models.config import preset
    from jaxcl.models.llama import Decoder
    from jaxcl.train.step import make_apply

    cfg = preset("test-micro")
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(state)
    apply = make_apply(graphdef)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (4, 33)).astype(np.int32))
    mask = jnp.asarray((rng.random((4, 32)) > 0.2).astype(np.float32))

    def loss(p, fn):
        logps = fn(apply(p, tokens[:, :-1]), tokens[:, 1:])
        return jnp.sum(-logps * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    new_loss, new_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, token_logps)))(params)
    old_loss, old_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, _previous_token_logps)))(
        params
    )
    np.testing.assert_allclose(float(new_loss), float(old_loss), rtol=1e-6)
    for new, old in zip(jax.tree.leaves(new_grads), jax.tree.leaves(old_grads)):
        scale = float(jnp.max(jnp.abs(old)))
        np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=1e-5, atol=1e-5 * scale)
