"""Checkpoints: the parameter digest tells bits apart, frozen trees restore as saved."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.checkpoint import params_digest


def test_digest_sees_one_ulp_swaps_and_reshapes_but_not_copies():
    p = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(5, jnp.bfloat16)}
    d = params_digest(p)
    assert params_digest({k: jnp.array(v) for k, v in p.items()}) == d
    one_ulp = np.nextafter(np.float32(6.0), np.float32(7.0))
    assert params_digest({**p, "a": p["a"].at[1, 2].set(one_ulp)}) != d
    assert params_digest({**p, "a": p["a"].at[0, 1].set(2.0).at[0, 2].set(1.0)}) != d  # swap
    assert params_digest({**p, "a": p["a"].reshape(4, 3)}) != d
    assert params_digest({**p, "b": p["b"].at[4].set(-1.0)}) != d


def test_frozen_trees_of_any_shape_and_dtype_restore_as_saved(tmp_path):
    """A method's frozen trees need not be shaped like the parameters (a float32 EMA of bf16
    weights, an adapter-only copy, a scalar count, a vector of ratios): each restores in the
    shape and dtype it was saved with."""
    from jaxcl import checkpoint

    params = {"w": jnp.ones((3, 4), jnp.bfloat16), "layer": {0: {"b": jnp.zeros(4, jnp.bfloat16)}}}
    frozen = {
        "ema": {"w": jnp.full((3, 4), 0.5), "layer": {0: {"b": jnp.ones(4, jnp.float32)}}},
        "part": {"layer": {0: {"b": jnp.arange(4.0, dtype=jnp.bfloat16)}}},
        "count": jnp.asarray(7, jnp.int32),
        "ratios": jnp.asarray([0.1, 0.2, 0.7], jnp.float32),
    }
    opt = {"mu": jnp.zeros((3, 4))}
    checkpoint.save_checkpoint(tmp_path, 5, params, opt, {"step": 5}, frozen)
    _, _, back, _, manifest = checkpoint.restore_checkpoint(
        tmp_path, 5, checkpoint.abstract(params), checkpoint.abstract(opt)
    )
    assert sorted(back) == sorted(frozen) == manifest["frozen"]
    for name, tree in frozen.items():
        got_leaves, want_leaves = jax.tree.leaves(back[name]), jax.tree.leaves(tree)
        assert len(got_leaves) == len(want_leaves)
        for got, want in zip(got_leaves, want_leaves):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_running_out_of_memory_in_a_restore_is_not_taken_for_damage(tmp_path, monkeypatch):
    """A restore that fails for lack of memory raises as such (no CheckpointError: a resume
    would fall back and overwrite the good checkpoint); a failure of the files is damage."""
    import pytest

    from jaxcl import checkpoint

    params, opt = {"w": jnp.ones((2, 2))}, {"mu": jnp.zeros((2, 2))}
    checkpoint.save_checkpoint(tmp_path, 1, params, opt, {"step": 1})
    like = checkpoint.abstract(params), checkpoint.abstract(opt)

    def failing(error):
        def restore(self, *args, **kwargs):
            raise error

        return restore

    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager
    monkeypatch.setattr(manager, "restore", failing(RuntimeError("RESOURCE_EXHAUSTED: OOM")))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        checkpoint.restore_checkpoint(tmp_path, 1, *like)
    monkeypatch.setattr(manager, "restore", failing(ValueError("array file missing")))
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.restore_checkpoint(tmp_path, 1, *like)


def test_a_step_that_links_to_a_folder_elsewhere_goes_as_a_link(tmp_path):
    """Saving over, or deleting, a step folder that is a link to a real checkpoint outside the
    run removes the link only: the folder it points to keeps every file."""
    from jaxcl import checkpoint

    params, opt = {"w": jnp.ones((2, 2))}, {"mu": jnp.zeros((2, 2))}
    elsewhere = tmp_path / "user/checkpoints/kept"
    target = checkpoint.save_checkpoint(elsewhere, 3, params, opt, {"step": 3})
    files = sorted(p.relative_to(target) for p in target.rglob("*"))
    stage = tmp_path / "run/checkpoints/s"
    stage.mkdir(parents=True)
    (stage / "3").symlink_to(target)
    checkpoint.save_checkpoint(stage, 3, params, opt, {"step": 3})
    assert (stage / "3").is_dir() and not (stage / "3").is_symlink()
    (stage / "5").symlink_to(target)
    checkpoint.delete_steps(stage, [5])
    assert not os.path.lexists(stage / "5")
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == files
