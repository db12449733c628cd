"""Method sweeps: a recipe's ``compare:`` variants run one after another, then one table.

Each variant is the recipe with some fields overridden (``{stages.1.methods: []}`` is plain
fine-tuning of the second stage), run into ``OUT/compare/<name>``; the recipe itself is the
``base`` row. Leading stages a variant shares with the base (same recipe up to and including
them) are not rerun: the variant's folder starts with the base's checkpoints of those stages and
the run resumes after them, as an interrupted run would (bit-identical, see
tests/test_resume.py). The table has, per variant and stage, OP, BWT, FWT and forgetting, the
cross-stage probe deltas and the wall time; it is printed, written to ``OUT/comparison.json``
and added to the report.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jaxcl import checkpoint, parallel
from jaxcl.recipe import Recipe
from jaxcl.train.runner import claim_run_dir, run_recipe

METRICS = ("op", "bwt", "fwt", "forgetting")
DELTAS = ("delta_general", "delta_instruction", "delta_safety")


def summarize(name: str, results: dict[str, Any]) -> dict[str, Any]:
    """One comparison row from a run's ``results.json``."""
    probes = results.get("probes") or {}
    return {
        "variant": name,
        "seconds": results["seconds"],
        "compile_seconds": (results.get("compile") or {}).get("compile_seconds"),
        "stages": {s["name"]: {m: s["metrics"][m] for m in METRICS} for s in results["stages"]},
        **{k: probes.get(k) for k in DELTAS},
    }


def run_with_variants(
    recipe: Recipe, console: Console | None = None, *, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Run ``recipe`` and each of its ``compare:`` variants; returns the comparison rows. The
    sweep holds the recipe's run folder throughout, and each variant's while it runs."""
    console = console or Console(quiet=not parallel.is_primary())
    with claim_run_dir(Path(recipe.out_dir)):
        return _sweep(recipe, console, overwrite)


def _sweep(recipe: Recipe, console: Console, overwrite: bool) -> list[dict[str, Any]]:
    rows = [summarize("base", run_recipe(recipe, console, overwrite=overwrite))]
    for name in recipe.compare:
        console.rule(f"variant {name}")
        variant = recipe.variant(name)
        shared = recipe.stages[: recipe.shared_stages(variant)]
        with claim_run_dir(Path(variant.out_dir)):
            if shared and _fresh(variant, overwrite):
                names = ", ".join(s.name for s in shared)
                console.print(f"stages {names} are the base run's: their checkpoints are reused")
                if parallel.is_primary():
                    seed_from(Path(recipe.out_dir), variant, [s.name for s in shared])
                parallel.barrier(f"jaxcl: variant {name} seeded")
            row = summarize(name, run_recipe(variant, console))
        rows.append(dict(row, shared_stages=[s.name for s in shared]))
    if len(rows) > 1:
        print_comparison(console, rows)
        compile_s = sum(r.get("compile_seconds") or 0.0 for r in rows)
        total_s = sum(r["seconds"] for r in rows)
        console.print(f"all variants: {total_s:.0f}s, of which compilation {compile_s:.0f}s")
        if parallel.is_primary():
            path = Path(recipe.out_dir) / "comparison.json"
            path.write_text(json.dumps({"variants": rows}, indent=2))
    return rows


def _fresh(variant: Recipe, overwrite: bool) -> bool:
    """Whether the variant starts from nothing (then it may reuse the base's stages); an earlier
    run of the variant itself is resumed instead, unless ``overwrite``."""
    out = Path(variant.out_dir)
    if overwrite and parallel.is_primary():
        for name in ("checkpoints", *checkpoint.RUN_FILES):
            checkpoint.remove_run_data(out / name, out)
    return not (out / "checkpoints").exists()


def seed_from(base_dir: Path, variant: Recipe, stages: list[str]) -> None:
    """Start ``variant``'s run folder with the base run's checkpoints (hard links: no copy),
    log lines and manifest entries of ``stages``, stamped with the variant's fingerprint, so
    the variant resumes after them exactly as an interrupted run would."""
    out = Path(variant.out_dir)
    for stage in stages:
        shutil.copytree(
            base_dir / "checkpoints" / stage, out / "checkpoints" / stage, copy_function=_link
        )
    lines = (base_dir / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["stage"] in stages]
    (out / "metrics.jsonl").write_text("".join(f"{line}\n" for line in kept))
    entries = json.loads((base_dir / "manifest.json").read_text())["checkpoints"]
    moved = [
        dict(e, path=str(out / "checkpoints" / e["stage"] / str(e["step"])))
        for e in entries
        if e["stage"] in stages
    ]
    (out / "manifest.json").write_text(json.dumps({"checkpoints": moved}, indent=2))
    stamp = {"recipe": variant.name, "recipe_sha256": variant.fingerprint()}
    (out / "run.json").write_text(json.dumps(stamp))


def _link(src: str, dst: str) -> None:
    """Hard link where the file system allows it, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_comparison(console: Console, rows: list[dict[str, Any]]) -> None:
    """Two narrow tables: CL metrics per variant and stage, then deltas, time and reuse."""
    table = Table(title="comparison of variants: CL metrics per stage")
    for column in ("variant", "stage", *METRICS):
        table.add_column(column, justify="left" if column in ("variant", "stage") else "right")
    for row in rows:
        for stage, metrics in row["stages"].items():
            table.add_row(row["variant"], stage, *(_fmt(metrics[m]) for m in METRICS))
        table.add_section()
    console.print(table)
    overall = Table(title="comparison of variants: cross-stage deltas and wall time")
    for column in ("variant", *(k.replace("delta_", "Δ") for k in DELTAS), "seconds", "reused"):
        overall.add_column(column, justify="left" if column in ("variant", "reused") else "right")
    for row in rows:
        reused = ", ".join(row.get("shared_stages") or []) or "-"
        deltas = [_fmt(row[k]) for k in DELTAS]
        overall.add_row(row["variant"], *deltas, f"{row['seconds']:.0f}", reused)
    console.print(overall)
