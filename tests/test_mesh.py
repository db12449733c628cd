"""One code path from 1 device to a mesh: the same recipe on 1 CPU and on 8 fake CPU devices
(data=2, fsdp=2, tensor=2) gives the same results, with parameters sharded by logical names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxcl.parallel import DEFAULT_RULES, logical_to_spec, resolve_mesh_shape
from tests.test_resume import MICRO

ROOT = Path(__file__).parent.parent

SCRIPT = """
import json, sys
import jax
from jaxcl.recipe import load_recipe
from jaxcl.train import runner
recipe = load_recipe(sys.argv[1], sys.argv[2:])
seen = {}
original = runner.run_stage
def spy(ctx, stage, params, parent, cursor=None):
    gate = params["layers"][0]["mlp"]["gate"]
    seen[stage.name] = [str(gate.sharding.spec), len(gate.sharding.device_set)]
    return original(ctx, stage, params, parent, cursor)
runner.run_stage = spy
from jaxcl.models import attention
describe = attention.describe
calls = set()
def spy_attention(*args, **kwargs):
    call = describe(*args, **kwargs)
    calls.add((call.mesh, call.devices))
    return call
attention.describe = spy_attention
results = runner.run_recipe(recipe)
seen["attention"] = sorted(calls)
print("SHARDING" + json.dumps(seen))
"""


def _run(tmp_path, devices, mesh):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = tmp_path / f"run{devices}"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(ROOT / "recipes/quickstart.yaml"),
            f"out_dir={out}",
            *mesh,
            *MICRO,
            "probes=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sharding = json.loads(proc.stdout.split("SHARDING")[-1])
    return json.loads((out / "results.json").read_text()), sharding


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device(tmp_path):
    single, _ = _run(tmp_path, 1, ["mesh.data=1"])
    multi, sharding = _run(tmp_path, 8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    # embed -> fsdp, mlp -> tensor: the gate kernel is split 2×2 over the 8-device mesh.
    assert sharding["cpt"] == ["P('fsdp', 'tensor')", 8]
    assert sharding["cit"] == sharding["align"] == sharding["cpt"]  # restored onto the mesh
    # the train step's attention is traced with the mesh in context (splash's shard_map needs
    # it); evaluation passes are traced without it
    assert sharding["attention"] == [[False, 8], [True, 8]]
    for a, b in zip(single["stages"], multi["stages"]):
        np.testing.assert_allclose(a["baseline"], b["baseline"], rtol=1e-3)
        np.testing.assert_allclose(a["R"], b["R"], rtol=2e-2, atol=2e-2)
        la = [x["loss"] for x in a["losses"]]
        lb = [x["loss"] for x in b["losses"]]
        np.testing.assert_allclose(la, lb, rtol=1e-2)


def test_mesh_shape_and_rules():
    assert resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2)
    with pytest.raises(ValueError, match="use 6 devices, but 8"):
        resolve_mesh_shape({"data": 3, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    assert tuple(logical_to_spec(("embed", "mlp"), DEFAULT_RULES)) == ("fsdp", "tensor")
    # A mesh axis is used once per array: batch takes data+fsdp, so embed falls back to None.
    assert tuple(logical_to_spec(("batch", "embed"), DEFAULT_RULES)) == (("data", "fsdp"), None)
