"""The dry-run memory plan against XLA's measured buffer assignment of the real train step
(within 25% on CPU, two shapes), every CL buffer by dtype, bf16 master weights, and the 128k
vocabulary shape with chunked losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pydantic
import pytest
from flax import nnx

from jaxcl.memplan import activation_bytes, measure_step
from jaxcl.models.config import preset
from jaxcl.models.llama import Decoder
from jaxcl.objectives.bound import lm_objective
from jaxcl.objectives.chunked import ModelApply
from jaxcl.plan import format_plan, plan
from jaxcl.recipe import Recipe
from jaxcl.train.step import TrainState, make_train_step


def _recipe(model: dict, batch: int, seq: int, chunk: int = 512, methods=()) -> Recipe:
    stage = {
        "name": "s",
        "kind": "pretrain",
        "seq_len": seq,
        "batch_size": batch,
        "steps_per_task": 1,
        "loss_chunk": chunk,
        "tasks": [{"name": "t", "data": {"bundled": "cpt/recipes"}}],
        "methods": list(methods),
    }
    return Recipe(name="m", out_dir="/tmp/jaxcl-memplan", model=model, stages=[stage])


@pytest.mark.parametrize(
    "model, batch, seq, chunk, methods",
    [
        ({"preset": "tiny"}, 8, 64, 512, [{"name": "ewc", "lam": 1.0}]),  # EWC's two buffers
        ({"preset": "tiny"}, 2, 512, 128, []),  # chunked: 4 chunks of 128
    ],
)
def test_plan_agrees_with_measured_peak(model, batch, seq, chunk, methods):
    recipe = _recipe(model, batch, seq, chunk, methods)
    estimate = plan(recipe, devices=1)["stages"][0]["memory"]["peak"]
    measured = measure_step(recipe)["peak"]
    assert abs(estimate / measured - 1) < 0.25, (estimate, measured)


def test_plan_lists_every_cl_buffer_by_dtype_and_the_unchunked_logits():
    recipe = _recipe({"preset": "tiny"}, 4, 1024, 256, [{"name": "ewc", "lam": 1.0}])
    p = plan(recipe, devices=1)
    mem = p["stages"][0]["memory"]
    names = {(r["buffer"], r["dtype"]) for r in mem["buffers"]}
    assert {("EwcState.anchor", "float32"), ("EwcState.fisher", "float32")} <= names
    assert {("ScaleByAdamState.mu", "float32"), ("ScaleByAdamState.nu", "float32")} <= names
    n = preset("tiny").num_params()
    assert sum(r["bytes"] for r in mem["buffers"] if r["buffer"].startswith("EwcState.")) == (
        2 * 4 * n + 4
    )
    cfg = preset("tiny")
    whole = 4 * 4 * 1024 * cfg.vocab_size * 4
    chunked = activation_bytes(cfg, 4, 1024, chunk=256)["logits"]
    assert mem["logits_unchunked_extra"] == whole - chunked > 0
    text = format_plan(p)
    assert "EwcState.fisher" in text and "without them (loss_chunk: 0)" in text


def test_bf16_master_weights_plan_and_step():
    recipe = _recipe({"preset": "test-micro", "precision": "bf16"}, 4, 32)
    mem = plan(recipe, devices=1)["stages"][0]["memory"]
    assert set(mem["parts"]["parameters"]) == {"float32"}
    assert set(mem["parts"]["compute copy"]) == {"bfloat16"}
    assert {r["dtype"] for r in mem["buffers"] if r["bytes"] > 8} == {"float32"}
    # the step: float32 master and optimizer state, bfloat16 compute, float32 loss
    cfg = preset("test-micro").replace(**recipe.model.overrides)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(1e-3)
    objective = lm_objective(ModelApply(graphdef))
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "loss_mask": jnp.ones_like(tokens)}
    # float32 compute on the same float32 weights (before the step donates them)
    loss32 = float(objective.loss_fn(params, batch, {})[0])
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    step = make_train_step(objective.loss_fn, tx, compute_dtype=recipe.model.compute_cast)
    new, metrics = step(state, batch, {}, None)
    assert metrics["loss"].dtype == jnp.float32
    for leaf in jax.tree.leaves((new.params, new.opt_state[0].mu, new.opt_state[0].nu)):
        assert leaf.dtype == jnp.float32
    np.testing.assert_allclose(float(metrics["loss"]), loss32, rtol=2e-2)  # bf16 rounding


def test_bf16_precision_refuses_contradictions():
    with pytest.raises(pydantic.ValidationError, match="param_dtype"):
        _recipe({"preset": "tiny", "precision": "bf16", "param_dtype": "bfloat16"}, 2, 32)
    with pytest.raises(pydantic.ValidationError, match="model.dtype"):
        _recipe({"preset": "tiny", "precision": "bf16", "dtype": "float32"}, 2, 32)


@pytest.mark.slow
def test_128k_vocabulary_train_step_with_chunked_losses():
    """Llama-3-8B's config (vocab 128256, rope, GQA 4:1) shrunk to 2 layers and hidden 64 trains
    a step on CPU at 1 × 2048 with chunked losses; the plan of the real 8B at that shape says
    what the whole logits would add."""
    cfg = preset("llama-3-8b").replace(
        num_layers=2, hidden_size=64, intermediate_size=224, num_heads=4, num_kv_heads=1
    )
    assert cfg.vocab_size == 128256
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(1e-3)
    step = make_train_step(lm_objective(ModelApply(graphdef), chunk=512).loss_fn, tx)
    tokens = jax.random.randint(jax.random.key(0), (1, 2049), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "loss_mask": jnp.ones_like(tokens)}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    state, metrics = step(state, batch, {}, None)
    loss = float(metrics["loss"])
    assert math.isfinite(loss) and abs(loss - math.log(cfg.vocab_size)) < 1.0
    assert int(state.step) == 1
    p = plan(_recipe({"preset": "llama-3-8b"}, 1, 2048, 512), devices=1)
    extra = p["stages"][0]["memory"]["logits_unchunked_extra"]
    # four whole [1, 2048, 128256] float32 buffers against three 512-position chunks
    assert extra > 3 * 2**30
    assert "logits would need" in format_plan(p)
