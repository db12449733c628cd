"""Recipe entry for a task's data, and loading it as a list of examples."""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import Field

from jaxcl.data.benchmarks import GENERATORS, generate, kind_of
from jaxcl.spec import Strict


class DataSpec(Strict):
    """A bundled, generated dataset (``cpt/recipes``, ``cit/capitals``...)."""

    bundled: str
    train_size: int = Field(512, ge=1)
    eval_size: int = Field(64, ge=1)
    seed: int = 0

    @pydantic.field_validator("bundled")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in GENERATORS:
            raise ValueError(
                f"unknown bundled dataset {value!r}; valid choices: {', '.join(GENERATORS)}"
            )
        return value

    @property
    def kind(self) -> str:
        """``text``, ``instruction`` or ``preference``."""
        return kind_of(self.bundled)

    def load(self, split: str) -> list[dict[str, Any]]:
        """The examples of ``split`` (``train`` or ``eval``)."""
        size = self.train_size if split == "train" else self.eval_size
        return generate(self.bundled, split, size, seed=self.seed)
