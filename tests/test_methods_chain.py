"""Every transform in one chain: jitted, consolidated, Orbax round trip, 8-device sharding."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxcl import methods
from jaxcl.methods.specs import compile_methods, validate_methods
from jaxcl.recipe import StageSpec

ROOT = Path(__file__).parent.parent


def params_like(key, dtype=jnp.float32):
    k = jax.random.split(key, 4)
    return {
        "embed": jax.random.normal(k[0], (16, 8)).astype(dtype),
        "mlp": {"w": jax.random.normal(k[1], (8, 8)).astype(dtype), "scale": jnp.ones(8, dtype)},
        "lora": {"a": jax.random.normal(k[2], (8, 4)).astype(dtype)},
        "head": jax.random.normal(k[3], (8, 16)).astype(dtype),
    }


def everything():
    """All gradient-side methods in one chain, each on its side of AdamW."""
    return methods.chain(
        methods.si(0.1),
        methods.ewc(1.0, decay=0.9),
        methods.mas(1.0),
        methods.l2_anchor(0.01),
        methods.o_lora(0.1, max_tasks=2),
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-2, weight_decay=0.1),
        methods.gpm(0.9, select=lambda path, x: x.ndim == 2 and "embed" not in path),
        methods.agem(),  # A-GEM and OGD project the final update (their default)
        methods.ogd(3),
        methods.freeze("embed"),
        methods.packnet(0.5),
        methods.soft_mask(),
        methods.recadam(1e-2, 10.0),
    )


def estimates(params):
    ones = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.float32), params)
    cov = {k: jnp.eye(8) for k in ("mlp/w", "lora/a", "head")}
    return dict(
        fisher=ones,
        mas_importance=ones,
        soft_mask_importance=jax.tree.map(lambda x: 0.5 * x, ones),  # a mask in [0, 1]
        ogd_grads=[ones],
        gpm_covariance=cov,
    )


def test_all_transforms_compose_in_one_jitted_chain_and_survive_orbax(tmp_path):
    params = params_like(jax.random.key(0))
    tx = everything()
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(p))  # noqa: E731

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        upd, s = tx.update(g, s, p, memory_grads=jax.tree.map(lambda x: -x, g))
        return optax.apply_updates(p, upd), s

    for _ in range(2):
        params, state = step(params, state)
    state = jax.jit(lambda s, p: methods.consolidate(s, params=p, **estimates(p)))(state, params)
    frozen_embed = params["embed"]
    for _ in range(2):
        params, state = step(params, state)
    np.testing.assert_array_equal(params["embed"], frozen_embed)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, state)))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    with ocp.StandardCheckpointer() as ckpt:
        like = jax.eval_shape(lambda: {"params": params, "opt_state": state})
        restored = ckpt.restore(tmp_path / "ckpt", like)
    p2, s2 = restored["params"], restored["opt_state"]
    assert jax.tree.structure(s2) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s2)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    # the restored state keeps training identically
    np.testing.assert_array_equal(step(params, state)[0]["mlp"]["w"], step(p2, s2)[0]["mlp"]["w"])


def test_chain_refuses_misplaced_methods():
    with pytest.raises(ValueError, match="must stand behind the base optimizer"):
        methods.chain(methods.packnet(), optax.adamw(1e-3))
    with pytest.raises(ValueError, match="must stand in front of the base optimizer"):
        methods.chain(optax.adamw(1e-3), methods.ewc(1.0))
    methods.chain(methods.ewc(1.0), optax.adamw(1e-3), methods.freeze("x"))


def _methods(*entries):
    stage = StageSpec.model_validate(
        dict(
            name="s",
            kind="pretrain",
            tasks=[{"name": "t", "data": {"bundled": "cpt/recipes"}}],
            steps_per_task=1,
            batch_size=1,
            seq_len=8,
            methods=list(entries),
        )
    )
    return stage.methods


def test_recipe_methods_compile_to_the_right_sides():
    specs = _methods(
        {"name": "packnet"},
        {"name": "ewc"},
        {"name": "si"},
        {"name": "recadam"},
        {"name": "agem", "per_task": 7},
    )
    compiled = compile_methods(specs, learning_rate=1e-3)
    assert [methods.position(t) for t in compiled.front] == ["front"] * 2
    assert [methods.position(t) for t in compiled.behind] == ["behind"] * 3  # agem: the update
    assert compiled.needs_memory_grads
    (agem_spec,) = [m for m in specs if m.name == "agem"]
    assert agem_spec.new_memory(seed=0, n_tasks=3).capacity == 21  # per_task × tasks
    # PackNet prunes at a step of each task, A-GEM remembers each task at its end
    assert sorted(h.phase for h in compiled.hooks) == ["memory", "step"]
    # masks stand last behind AdamW (after A-GEM's projection of the update)
    assert type(compiled.behind[-1].init(params_like(jax.random.key(0)))).__name__ == (
        "PackNetState"
    )
    # SI sees the raw gradient: compiled first whatever the recipe order.
    assert type(compiled.front[0].init(params_like(jax.random.key(0)))).__name__ == "SiState"
    with pytest.raises(ValueError, match="'l2_anchor' and 'recadam' conflict: both pull"):
        validate_methods(_methods({"name": "recadam"}, {"name": "l2_anchor"}))
    with pytest.raises(ValueError, match="needs the base learning rate"):
        compile_methods(_methods({"name": "recadam"}))


MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import tests.test_methods_chain as t
from jaxcl import methods
explicit = (jax.sharding.AxisType.Auto,) * 3  # as jaxcl.parallel.make_mesh
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=explicit)
params = t.params_like(jax.random.key(0), jnp.bfloat16)
spec = {"embed": P("tensor", "fsdp"), "mlp": {"w": P("fsdp", "tensor"), "scale": P("tensor")},
        "lora": {"a": P("fsdp", "tensor")}, "head": P("fsdp", "tensor")}
shard = jax.tree.map(lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda x: isinstance(x, P))
params = jax.device_put(params, shard)
tx = t.everything()
opt_sh = methods.state_shardings(tx, params, shard, NamedSharding(mesh, P()))
state = jax.jit(tx.init, out_shardings=opt_sh)(params)
def check(state, when):
    n = 0
    for x, want in zip(jax.tree.leaves(state), jax.tree.leaves(opt_sh)):
        assert x.sharding.is_equivalent_to(want, x.ndim), (when, x.shape, x.sharding, want)
        n += 1
    return n
check(state, "init")
# every parameter-shaped leaf follows its parameter's sharding; importances and path integrals
# accumulate in float32 whatever the parameters' dtype
for name, leaf in [("ewc", state[1].fisher), ("si", state[0].path)]:
    for x, p in zip(jax.tree.leaves(leaf), jax.tree.leaves(params)):
        assert x.shape == p.shape and x.dtype == jnp.float32, (name, x.shape, x.dtype)
        assert x.sharding.spec == p.sharding.spec, (name, x.shape, x.sharding.spec)
# OGD's basis: a float32 [k, *shape] stack per leaf, sharded as its parameter on the trailing axes
ogd_state = next(s for s in state if type(s).__name__ == "OgdState")
for x, p in zip(jax.tree.leaves(ogd_state.basis), jax.tree.leaves(params)):
    assert x.dtype == jnp.float32 and x.shape == (3, *p.shape), (x.shape, x.dtype)
    assert tuple(x.sharding.spec) == (None, *p.sharding.spec), (x.shape, x.sharding.spec)
gpm_state = next(s for s in state if type(s).__name__ == "GpmState")
basis = gpm_state.basis["head"]  # GPM [in=8, rank=8] of a [8, 16] kernel: sharded over in
assert basis.dtype == jnp.float32 and basis.sharding.spec == P("fsdp", None), basis.sharding.spec
assert methods.skipped(gpm_state.basis["embed"])
loss = lambda p: sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(p))
@jax.jit
def step(p, s):
    g = jax.grad(loss)(p)
    upd, s = tx.update(g, s, p, memory_grads=g)
    return jax.tree.map(lambda a, b: (a + b).astype(a.dtype), p, upd), s
step = jax.jit(step, in_shardings=(shard, opt_sh), out_shardings=(shard, opt_sh))
params, state = step(params, state)
state = methods.consolidate(state, params=params, **t.estimates(params))  # eager, as the trainer
n = check(state, "consolidate")
params, state = step(params, state)
print("OK", n)
"""


@pytest.mark.slow
def test_state_dtype_and_sharding_on_an_8_device_mesh():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT)
    )
    proc = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout
