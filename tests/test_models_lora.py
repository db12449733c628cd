"""LoRA adapters: zero-init identity, merge equivalence, frozen base, per-task bank."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcl.models import lora
from jaxcl.models.config import preset
from jaxcl.models.llama import Decoder

IDS = jnp.asarray(np.random.default_rng(0).integers(3, 300, size=(2, 7)))


@nnx.jit
def _fwd(model, ids=IDS, dropout_rng=None):
    return model(ids, dropout_rng=dropout_rng)


def _model(scan: bool = False) -> Decoder:
    return Decoder(preset("test-micro").replace(scan_layers=scan), rngs=nnx.Rngs(0))


def _train_adapters(model, steps=3, lr=1e-2):
    """A few Adam steps on the current task's adapters only."""
    graphdef, trainable, rest = lora.split(model)
    apply = lora.make_apply(graphdef)
    tx = optax.adam(lr)
    opt = tx.init(trainable)

    def loss(trainable, rest):
        logits = apply(trainable, rest, IDS[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, IDS[:, 1:]).mean()

    @jax.jit
    def step(trainable, opt, rest):
        grads = jax.grad(loss)(trainable, rest)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(trainable, updates), opt

    for _ in range(steps):
        trainable, opt = step(trainable, opt, rest)
    return nnx.merge(graphdef, trainable, rest), loss, trainable, rest


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_zero_initialised_adapter_leaves_logits_unchanged(scan):
    model = _model(scan)
    before = _fwd(model)
    paths = lora.add_adapter(model, "t0", lora.LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    assert len(paths) == (2 if scan else 4) and all(p.endswith(("q", "v")) for p in paths)
    np.testing.assert_array_equal(_fwd(model), before)
    # The adapter is live: a non-zero B changes the output.
    graphdef, trainable, rest = lora.split(model)
    bumped = jax.tree.map(lambda x: x + 0.05, trainable)
    assert float(jnp.abs(_fwd(nnx.merge(graphdef, bumped, rest)) - before).max()) > 1e-3


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_lora_only_step_keeps_base_weights_bit_identical_and_merge_matches(scan):
    model = _model(scan)
    base = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    cfg = lora.LoRAConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"))
    lora.add_adapter(model, "t0", cfg, rngs=nnx.Rngs(1))
    trained, _, _, _ = _train_adapters(model)
    after = nnx.to_pure_dict(nnx.state(trained, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, after, base)
    unmerged = _fwd(trained)
    assert float(jnp.abs(unmerged - _fwd(_model(scan))).max()) > 1e-3  # training did something
    merged = lora.merge(nnx.clone(trained))
    assert lora.adapter_tasks(merged) == []
    np.testing.assert_allclose(_fwd(merged), unmerged, atol=2e-5, rtol=2e-5)


def test_lora_gradients_never_form_a_base_weight_gradient():
    """No dot product in the backward pass outputs a [in, out] matrix of a frozen kernel."""
    model = _model()
    lora.add_adapter(model, "t0", lora.LoRAConfig(rank=4, targets=("q", "up")), rngs=nnx.Rngs(1))
    _, loss, trainable, rest = _train_adapters(model, steps=0)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable, rest)
    kernel_shapes = {x.shape for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim == 2}

    def dot_shapes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn.outvars[0].aval.shape
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    yield from dot_shapes(getattr(inner, "jaxpr", inner))

    shapes = list(dot_shapes(jaxpr.jaxpr))
    # The adapters' own gradients (up's B gradient comes out transposed).
    assert (64, 4) in shapes and {(4, 128), (128, 4)} & set(shapes)
    assert not kernel_shapes & set(shapes), kernel_shapes & set(shapes)
    # Control: differentiating the base weights does form them.
    full = jax.make_jaxpr(jax.grad(lambda r: loss(trainable, r)))(rest)
    assert kernel_shapes & set(dot_shapes(full.jaxpr))


def test_bank_of_task_adapters():
    model = _model()
    lora.add_adapter(model, "task0", lora.LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    model, _, _, _ = _train_adapters(model)
    after_task0 = _fwd(model)
    frozen0 = jax.tree.map(np.array, lora.adapter_state(model))
    lora.add_adapter(model, "task1", lora.LoRAConfig(rank=2, targets="mlp/up$"), rngs=nnx.Rngs(2))
    assert lora.adapter_tasks(model) == ["task0", "task1"]
    np.testing.assert_array_equal(_fwd(model), after_task0)  # new pair starts at zero
    _, trainable, _ = lora.split(model)
    trainable_paths = {
        "/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)
    }
    assert trainable_paths and all("task1" in p for p in trainable_paths)
    model, _, _, _ = _train_adapters(model)
    kept = lora.adapter_state(model)
    # task0's pairs are frozen: bit-identical after training task1.
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.map(np.asarray, kept["layers"][0]["attn"]["lora"]["q"]),
        frozen0["layers"][0]["attn"]["lora"]["q"],
    )
    with pytest.raises(ValueError, match="already has adapters"):
        lora.add_adapter(model, "task1", lora.LoRAConfig(), rngs=nnx.Rngs(3))
    with pytest.raises(ValueError, match="match no projection"):
        lora.add_adapter(model, "task2", lora.LoRAConfig(targets="nope"), rngs=nnx.Rngs(3))


@pytest.mark.slow
def test_lora_dropout_is_random_only_with_a_key():
    model = _model()
    lora.add_adapter(model, "t0", lora.LoRAConfig(rank=4, dropout=0.5), rngs=nnx.Rngs(1))
    graphdef, trainable, rest = lora.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x + 0.1, trainable), rest)
    a = _fwd(model, IDS, jax.random.key(0))
    b = _fwd(model, IDS, jax.random.key(1))
    assert float(jnp.abs(a - b).max()) > 1e-4
    np.testing.assert_array_equal(_fwd(model), _fwd(model))


@pytest.mark.slow
def test_save_pretrained_exports_merged_weights(tmp_path):
    from jaxcl.models import from_pretrained, save_pretrained

    model = _model()
    lora.add_adapter(model, "t0", lora.LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    model, _, _, _ = _train_adapters(model)
    save_pretrained(model, tmp_path)
    assert lora.adapter_tasks(model) == ["t0"]  # the model itself keeps its adapters
    np.testing.assert_allclose(_fwd(from_pretrained(tmp_path)), _fwd(model), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("targets", [["q", "zz"], "(unclosed"])
def test_adapter_targets_are_checked_alike(targets):
    """LoRA, MoE-LoRA and SAPT specs share one targets check: unknown projections and a bad
    regular expression are refused naming the value, at validation."""
    import pydantic

    from jaxcl.models.experts import MoELoraGrowth
    from jaxcl.models.sapt import SaptModelSpec
    from jaxcl.models.spec import LoraSpec

    for spec, extra in (
        (LoraSpec, {}),
        (MoELoraGrowth, {"experts": 2}),
        (SaptModelSpec, {"tasks": 2}),
    ):
        with pytest.raises(pydantic.ValidationError, match="zz|not a regular expression"):
            spec(targets=targets, **extra)
