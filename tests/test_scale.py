"""Sharded CL state on an 8-device CPU mesh: a train step with EWC and A-GEM equals the
single-device step, CL state follows the parameters' shardings, and checkpoints move between
meshes."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, tempfile
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxcl import checkpoint, parallel
from jaxcl.bench import method_specs, random_batch
from jaxcl.methods import consolidate
from jaxcl.models.config import preset
from jaxcl.models.llama import Decoder
from jaxcl.objectives.bound import lm_objective
from jaxcl.recipe import OptimizerSpec
from jaxcl.train.optim import build_chain
from jaxcl.train.step import TrainState, make_apply, make_train_step, state_shardings_for

cfg = preset("test-micro")
model = Decoder(cfg, rngs=nnx.Rngs(0))
graphdef, state = nnx.split(model, nnx.Param)
host_params = jax.device_get(nnx.to_pure_dict(state))
names = parallel.param_logical_names(model)
objective = lm_objective(make_apply(graphdef))
spec = OptimizerSpec(lr=1e-2, warmup_steps=0, schedule="constant", clip_norm=1.0)
batch, memory = random_batch(cfg, 8, 16, seed=1), random_batch(cfg, 8, 16, seed=2)

def one_step(mesh):
    rules = parallel.DEFAULT_RULES
    shardings = parallel.tree_shardings(names, host_params, mesh, rules)
    params = jax.device_put(host_params, shardings)
    tx, compiled = build_chain(spec, 100, method_specs(["ewc", "agem"]))
    state_sh = state_shardings_for(tx, params, shardings, parallel.replicated(mesh))
    init = jax.jit(lambda p: TrainState(jnp.int32(0), p, tx.init(p)), out_shardings=state_sh)
    st = init(params)
    # A task boundary first: anchor = params, Fisher = a nonzero importance.
    fisher = jax.tree.map(lambda p: jnp.abs(p) * 3.0, st.params)
    st = st._replace(opt_state=consolidate(st.opt_state, params=st.params, fisher=fisher))
    st = jax.device_put(st, state_sh)
    step = make_train_step(objective.loss_fn, tx, state_shardings=state_sh,
                           batch_sharding=parallel.batch_sharding(mesh, rules),
                           frozen_shardings={}, memory_grads=True)
    put = lambda b: jax.device_put(b, parallel.batch_sharding(mesh, rules))
    st, metrics = step(st, put(batch), {}, put(memory))
    return st, shardings

single, _ = one_step(parallel.make_mesh({"data": 1}, jax.devices()[:1]))
multi, shardings = one_step(parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}))
errors = [float(np.linalg.norm(a - b) / np.linalg.norm(a))
          for a, b in zip(jax.tree.leaves(jax.device_get(single.params)),
                          jax.tree.leaves(jax.device_get(multi.params)))]
ewc_state = multi.opt_state[0]
follow = all(
    f.sharding == s and a.sharding == s
    for f, a, s in zip(jax.tree.leaves(ewc_state.fisher), jax.tree.leaves(ewc_state.anchor),
                       jax.tree.leaves(shardings)))
gate = multi.params["layers"][0]["mlp"]["gate"]

# A checkpoint saved on (fsdp=4, tensor=2) restores on (data=8) and on one device.
folder = Path(tempfile.mkdtemp()) / "stage"
checkpoint.save_checkpoint(folder, 2, multi.params, multi.opt_state, {"x": 1})
restored = {}
for label, mesh in [("data8", parallel.make_mesh({"data": 8})),
                    ("one", parallel.make_mesh({"data": 1}, jax.devices()[:1]))]:
    like = jax.device_put(host_params, parallel.tree_shardings(names, host_params, mesh,
                                                               parallel.DEFAULT_RULES))
    back = checkpoint.restore_params(folder, like, 2)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(back)),
                                                    jax.tree.leaves(jax.device_get(multi.params))))
    same_digest = checkpoint.params_digest(back) == checkpoint.params_digest(multi.params)
    restored[label] = [same and same_digest, len(back["embed"].sharding.device_set)]
print("RESULT" + json.dumps({"max_rel_error": max(errors), "cl_state_follows": follow,
                              "gate_spec": str(gate.sharding.spec), "restored": restored}))
"""


@pytest.mark.slow
def test_sharded_step_with_ewc_and_agem_matches_one_device_and_checkpoints_move():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT")[-1])
    assert result["max_rel_error"] < 1e-5
    assert result["cl_state_follows"]  # EWC's anchor and Fisher carry the params' shardings
    assert result["gate_spec"] == "P('fsdp', 'tensor')"
    assert result["restored"] == {"data8": [True, 8], "one": [True, 1]}
