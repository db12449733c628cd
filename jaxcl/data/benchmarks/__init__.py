"""Offline benchmark generators (deterministic, no downloads).

``GENERATORS`` is the quickstart set (unchanged names and outputs); ``BUNDLED`` is every dataset a
recipe may name with ``bundled:``: the quickstart set, the CKL-style knowledge stream
(``ckl/...``), the TRACE-style task sequence (``trace/...``) and the preference stream
(``pref/...``). See docs/benchmarks.md.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from jaxcl.data.benchmarks import ckl, preferences, trace
from jaxcl.data.benchmarks.quickstart import GENERATORS
from jaxcl.data.benchmarks.scoring import exact_match, rouge_l

Generator = tuple[str, Callable[[random.Random], dict[str, str]]]


BUNDLED: dict[str, Generator] = {
    **GENERATORS,
    **ckl.GENERATORS,
    **trace.GENERATORS,
    **preferences.GENERATORS,
}

_SPLIT_SEED = {"train": 0, "eval": 1}


def generate(name: str, split: str, size: int, seed: int = 0) -> list[dict[str, str]]:
    """``size`` examples of bundled dataset ``name`` for ``split`` (``train`` or ``eval``)."""
    if name not in BUNDLED:
        raise ValueError(
            f"unknown bundled dataset {name!r}; valid names: {', '.join(sorted(BUNDLED))}"
        )
    if split not in _SPLIT_SEED:
        raise ValueError(f"unknown split {split!r}; valid splits: train, eval")
    rng = random.Random(f"{name}/{split}/{seed + _SPLIT_SEED[split]}")
    _, make = BUNDLED[name]
    return [make(rng) for _ in range(size)]


def kind_of(name: str) -> str:
    """``text``, ``instruction`` or ``preference``."""
    generate(name, "eval", 0)  # validates the name
    return BUNDLED[name][0]


__all__ = ["BUNDLED", "GENERATORS", "exact_match", "generate", "kind_of", "rouge_l"]
