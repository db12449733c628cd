"""The recipe reference documents every field of the schema."""

from pathlib import Path

import pytest

from jaxcl.data.spec import DataSpec
from jaxcl.models.spec import ModelSpec
from jaxcl.objectives.spec import DpoSpec, ReferenceSpec
from jaxcl.recipe import MeshSpec, OptimizerSpec, Recipe, StageSpec, TaskSpec

REFERENCE = (Path(__file__).parent.parent / "docs" / "recipes.md").read_text()


@pytest.mark.parametrize(
    "spec", [Recipe, StageSpec, OptimizerSpec, MeshSpec, TaskSpec, ModelSpec, DataSpec]
)
def test_every_recipe_field_is_documented(spec):
    missing = [name for name in spec.model_fields if f"`{name}`" not in REFERENCE]
    assert not missing, f"docs/recipes.md lacks {spec.__name__} fields {missing}"


@pytest.mark.parametrize("spec", [ReferenceSpec, DpoSpec])
def test_objective_fields_are_documented(spec):
    assert all(name in REFERENCE for name in spec.model_fields)
