"""``--dry-run`` plans from shapes only: memory per device against closed forms."""

from pathlib import Path

import pytest

from jaxcl.cli import main
from jaxcl.models.config import preset
from jaxcl.plan import plan
from jaxcl.recipe import load_recipe

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_llama3_8b_plan_matches_closed_forms():
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", ["model.preset=llama-3-8b"])
    p = plan(recipe)
    n = preset("llama-3-8b").num_params()
    assert p["parameters"] == n
    cpt, cit, align = p["stages"]
    assert cpt["params_bytes_per_device"] == 4 * n  # fp32, one device
    # AdamW keeps two moments; EWC adds an anchor and a Fisher (+ a few scalars).
    assert cit["opt_state_bytes_per_device"] == pytest.approx(2 * 4 * n, abs=64)
    assert cpt["opt_state_bytes_per_device"] == pytest.approx(4 * 4 * n, abs=64)
    assert align["frozen_bytes_per_device"] == 4 * n  # DPO's reference copy
    assert cit["steps"] == 3 * recipe.stages[1].steps_per_task


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_validates_and_dry_runs(recipe, tmp_path, capsys):
    assert main(["run", str(recipe), "--dry-run", f"out_dir={tmp_path / 'run'}"]) == 0
    assert "| stage |" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained
