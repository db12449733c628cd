"""Method sweeps: a recipe's ``compare:`` variants run one after another, then one table.

Each variant is the recipe with some fields overridden (``{stages.1.methods: []}`` is plain
fine-tuning of the second stage), run into ``OUT/compare/<name>``; the recipe itself is the
``base`` row. The table has, per variant and stage, OP, BWT, FWT and forgetting, the cross-stage
probe deltas and the wall time; it is printed, written to ``OUT/comparison.json`` and added to the
report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jaxcl import parallel
from jaxcl.recipe import Recipe
from jaxcl.train.runner import run_recipe

METRICS = ("op", "bwt", "fwt", "forgetting")
DELTAS = ("delta_general", "delta_instruction", "delta_safety")


def summarize(name: str, results: dict[str, Any]) -> dict[str, Any]:
    """One comparison row from a run's ``results.json``."""
    probes = results.get("probes") or {}
    return {
        "variant": name,
        "seconds": results["seconds"],
        "stages": {s["name"]: {m: s["metrics"][m] for m in METRICS} for s in results["stages"]},
        **{k: probes.get(k) for k in DELTAS},
    }


def run_with_variants(
    recipe: Recipe, console: Console | None = None, *, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Run ``recipe`` and each of its ``compare:`` variants; returns the comparison rows."""
    console = console or Console(quiet=not parallel.is_primary())
    rows = [summarize("base", run_recipe(recipe, console, overwrite=overwrite))]
    for name in recipe.compare:
        console.rule(f"variant {name}")
        rows.append(summarize(name, run_recipe(recipe.variant(name), console, overwrite=overwrite)))
    if len(rows) > 1:
        print_comparison(console, rows)
        if parallel.is_primary():
            path = Path(recipe.out_dir) / "comparison.json"
            path.write_text(json.dumps({"variants": rows}, indent=2))
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_comparison(console: Console, rows: list[dict[str, Any]]) -> None:
    stages = list(rows[0]["stages"])
    table = Table(title="comparison of variants")
    table.add_column("variant")
    for stage in stages:
        for metric in METRICS:
            table.add_column(f"{stage} {metric}", justify="right")
    for key in DELTAS:
        table.add_column(key.replace("delta_", "Δ"), justify="right")
    table.add_column("seconds", justify="right")
    for row in rows:
        cells = [_fmt(row["stages"][s][m]) for s in stages for m in METRICS]
        deltas = [_fmt(row[k]) for k in DELTAS]
        table.add_row(row["variant"], *cells, *deltas, f"{row['seconds']:.0f}")
    console.print(table)
