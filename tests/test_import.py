"""`import jaxcl` reaches every public subpackage, lazily (issue 12): each check runs in a fresh
interpreter, so no earlier import in the test session can make it pass."""

import json
import subprocess
import sys

PUBLIC = ("data", "eval", "methods", "models", "objectives", "train")


def _python(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bare_import_loads_no_subpackage_and_no_jax():
    got = _python(
        "import json, sys, jaxcl\n"
        "heavy = ('jax', 'optax', 'flax', 'grain', 'orbax')\n"
        "loaded = [m for m in sys.modules if m.startswith('jaxcl.') or m.split('.')[0] in heavy]\n"
        # the lm-eval start-up hook (jaxcl-lm-eval.pth) imports only the standard library
        "loaded = [m for m in loaded if m != 'jaxcl._lm_eval_hook']\n"
        "print(json.dumps({'loaded': sorted(loaded), 'dir': dir(jaxcl)}))"
    )
    assert got["loaded"] == []  # lazy: the CLI's start-up pays for nothing
    assert set(PUBLIC) | {"generate", "recipe", "checkpoint"} <= set(got["dir"])


def test_attribute_access_imports_each_subpackage_on_demand():
    code = """
import json, sys, optax, jaxcl
tx = jaxcl.methods.ewc(lam=1.0)
out = {"ewc": isinstance(tx, optax.GradientTransformationExtraArgs)}
out["not_yet"] = [m for m in ("jaxcl.recipe", "jaxcl.train") if m in sys.modules]
out["models"] = callable(jaxcl.models.from_pretrained)
out["objectives"] = callable(jaxcl.objectives.dpo_loss)
out["data"] = callable(jaxcl.data.encode_all)
out["eval"] = callable(jaxcl.eval.cl_metrics)
out["train"] = jaxcl.train.__name__
out["generate"] = jaxcl.generate is jaxcl.models.generate
out["recipe"] = callable(jaxcl.recipe.load_recipe)
try:
    jaxcl.no_such_thing
    out["missing"] = "no error"
except AttributeError as err:
    out["missing"] = str(err)
print(json.dumps(out))
"""
    got = _python(code)
    assert got["ewc"] is True
    assert got["not_yet"] == []  # reaching jaxcl.methods imported only what it needs
    assert got["models"] and got["objectives"] and got["data"] and got["eval"]
    assert got["train"] == "jaxcl.train" and got["generate"] and got["recipe"]
    assert "no attribute 'no_such_thing'" in got["missing"]
