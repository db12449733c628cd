"""A method's declared ``buffer_dtype``: its buffers are stored rounded, its arithmetic is not.

The oracle is the method's paper formula in numpy with each stored buffer rounded to bfloat16
(``ml_dtypes``) where the library stores it: online EWC (Schwarz et al. 2018),
``F̃_t = bf16(γ F̃_{t−1} + F_t)``, ``θ̃*_t = bf16(θ*_t)``, added gradient ``λ F̃ (θ − θ̃*)`` in
float32.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pydantic
import pytest

from jaxcl import methods
from jaxcl.memplan import state_buffers
from jaxcl.methods.gpm import GpmSpec
from jaxcl.methods.memory import ReplaySpec
from jaxcl.methods.regularize import EwcSpec, EwcState, SiSpec
from jaxcl.methods.specs import compile_methods
from jaxcl.methods.storage import keep_dtypes, stored_as

BF16 = ml_dtypes.bfloat16


def _tree(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"w": rng.normal(size=(6, 5)), "b": rng.normal(size=5)}


def _f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _rounded(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.asarray(x, np.float32).astype(BF16), np.float32)


def _online_ewc_oracle(lam, gamma, anchors, fishers, theta, store):
    fisher = {k: np.zeros_like(v, np.float32) for k, v in theta.items()}
    for a, f in zip(anchors, fishers):
        fisher = {k: store(np.float32(gamma) * fisher[k] + np.float32(f[k])) for k in f}
        anchor = {k: store(a[k]) for k in a}
    return {k: np.float32(lam) * fisher[k] * (np.float32(theta[k]) - anchor[k]) for k in theta}


@pytest.mark.parametrize("stored", [None, "bfloat16"])
def test_online_ewc_with_stored_buffers_matches_the_rounded_formula(stored):
    lam, gamma = 3.0, 0.6
    rng = np.random.default_rng(0)
    anchors = [_tree(rng) for _ in range(3)]
    fishers = [{k: np.abs(v) for k, v in _tree(rng).items()} for _ in range(3)]
    theta = _tree(rng)
    tx = methods.ewc(lam, decay=gamma)
    if stored:
        tx = stored_as(tx, stored, "ewc")
    state = tx.init(_f32(theta))
    for a, f in zip(anchors, fishers):
        state = methods.consolidate(state, params=_f32(a), fisher=_f32(f))
    want_dtype = jnp.dtype(jnp.bfloat16 if stored else jnp.float32)
    assert {x.dtype for x in jax.tree.leaves((state.fisher, state.anchor))} == {want_dtype}
    got, state = tx.update(_f32(jax.tree.map(np.zeros_like, theta)), state, _f32(theta))
    store = _rounded if stored else np.float32
    want = _online_ewc_oracle(lam, gamma, anchors, fishers, theta, store)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6)
    # the rounding is visible: the float32 formula differs by more than the tolerance
    exact = _online_ewc_oracle(lam, gamma, anchors, fishers, theta, np.float32)
    gap = max(np.max(np.abs(want[k] - exact[k]) / (np.abs(exact[k]) + 1e-3)) for k in want)
    assert (gap > 1e-4) == bool(stored)
    assert {x.dtype for x in jax.tree.leaves((state.fisher, state.anchor))} == {want_dtype}


def test_si_keeps_its_arithmetic_and_rounds_only_what_it_stores():
    # SI (Zenke et al. 2017) accumulates ω += −g·Δθ every step: with bf16 storage each step's
    # running sum is rounded once, and the update itself is the float32 one.
    rng = np.random.default_rng(1)
    theta = _f32(_tree(rng))
    inner = methods.si(0.5, damping=0.1)
    plain, narrow = (optax.chain(t, optax.sgd(0.1)) for t in (inner, stored_as(inner, "bfloat16")))
    s_plain, s_narrow = plain.init(theta), narrow.init(theta)
    p_plain = p_narrow = theta
    for _ in range(4):
        g = _f32(_tree(rng))
        u_plain, s_plain = plain.update(g, s_plain, p_plain)
        # the oracle: the float32 step from the stored (rounded) state, then rounded again
        s_ref = jax.tree.map(
            lambda x: x.astype(jnp.bfloat16).astype(x.dtype) if jnp.ndim(x) else x, s_plain
        )
        u_narrow, s_narrow = narrow.update(g, s_narrow, p_narrow)
        for leaf_ref, leaf in zip(jax.tree.leaves(s_ref), jax.tree.leaves(s_narrow)):
            assert leaf.dtype == (jnp.bfloat16 if jnp.ndim(leaf) else leaf_ref.dtype)
            np.testing.assert_array_equal(np.asarray(leaf, np.float32), np.asarray(leaf_ref))
        s_plain = jax.tree.map(lambda r, x: r.astype(x.dtype), s_ref, s_plain)
        p_plain = p_narrow = optax.apply_updates(p_narrow, u_narrow)
    chex_scalars = [x for x in jax.tree.leaves(s_narrow) if jnp.ndim(x) == 0]
    assert all(x.dtype != jnp.bfloat16 for x in chex_scalars)


def test_the_plan_counts_stored_buffers_in_their_dtype():
    theta = _f32(_tree(np.random.default_rng(2)))
    n = sum(x.size for x in jax.tree.leaves(theta))
    for dtype, size in ((None, 4), ("bfloat16", 2)):
        compiled = compile_methods([EwcSpec(name="ewc", lam=1.0, buffer_dtype=dtype)])
        (tx,) = compiled.front
        rows = state_buffers(jax.eval_shape(tx.init, theta))
        ewc = {(r["buffer"], r["dtype"]): r["bytes"] for r in rows}
        name = "bfloat16" if dtype else "float32"
        buffers = {("EwcState.anchor", name): size * n, ("EwcState.fisher", name): size * n}
        assert ewc == {**buffers, ("EwcState.decay", "float32"): 4}  # a scalar: as it was


def test_keep_dtypes_casts_floats_back_and_leaves_the_rest():
    old = {"fisher": jnp.zeros((2,), jnp.bfloat16), "anchor": jnp.zeros((2,))}
    new = {"fisher": jnp.ones((3,)), "anchor": jnp.ones((2,), jnp.int32)}
    kept = keep_dtypes(new, old)
    assert kept["fisher"].dtype == jnp.bfloat16 and kept["fisher"].shape == (3,)
    assert kept["anchor"].dtype == jnp.int32  # not a float to float cast: untouched
    assert keep_dtypes({"other": 1.0}, old) == {"other": 1.0}  # another structure: as given


def test_refusals_name_the_method_and_the_reason():
    with pytest.raises(pydantic.ValidationError, match="orthonormal basis"):
        GpmSpec(name="gpm", buffer_dtype="bfloat16")
    with pytest.raises(pydantic.ValidationError, match="buffer_dtype"):
        EwcSpec(name="ewc", lam=1.0, buffer_dtype="float16")
    with pytest.raises(ValueError, match="'replay': buffer_dtype is set.*keeps no buffers"):
        compile_methods([ReplaySpec(name="replay", buffer_dtype="bfloat16")])
    assert SiSpec(name="si", buffer_dtype="float32").buffer_dtype == "float32"


@pytest.mark.slow
def test_a_stage_keeps_ewc_in_bf16_across_boundaries_and_compiles_its_step_once(
    tmp_path, monkeypatch, caplog
):
    from jaxcl.recipe import Recipe
    from jaxcl.train import stage as stage_module
    from jaxcl.train.runner import run_recipe

    seen = []
    end_task = stage_module.StageRun.end_task

    def recording(self, t, score):
        end_task(self, t, score)
        (ewc,) = [
            n
            for n in jax.tree.leaves(
                self.cursor.state.opt_state, is_leaf=lambda x: isinstance(x, EwcState)
            )
            if isinstance(n, EwcState)
        ]
        seen.append({x.dtype for x in jax.tree.leaves(ewc) if x.ndim})  # buffers, not decay

    monkeypatch.setattr(stage_module.StageRun, "end_task", recording)
    data = {"bundled": "cpt/recipes", "train_size": 32, "eval_size": 8}
    recipe = Recipe(
        name="stored",
        out_dir=str(tmp_path / "run"),
        model={"preset": "test-micro"},
        probes=False,
        stall_steps=0,
        compile_cache=False,
        stages=[
            {
                "name": "cpt",
                "kind": "pretrain",
                "seq_len": 32,
                "batch_size": 4,
                "steps_per_task": 2,
                "tasks": [{"name": n, "data": data} for n in ("a", "b", "c")],
                "methods": [{"name": "ewc", "lam": 1.0, "buffer_dtype": "bfloat16"}],
            }
        ],
    )
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        run_recipe(recipe)
    assert seen == [{jnp.dtype(jnp.bfloat16)}] * 3
    compiles = [r for r in caplog.records if "Compiling jit(step)" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]
