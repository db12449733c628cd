"""``report.md`` from a run's ``results.json``: per-stage R matrices and CL metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.3f}"


def stage_markdown(stage: dict[str, Any]) -> str:
    metric, tasks = stage["metric"], stage["tasks"]
    lines = [
        f"## Stage `{stage['name']}` ({stage['kind']})",
        "",
        f"R[t][i] = {metric} on task i (column) after training through task t (row).",
        "",
        "| after | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
        "| baseline | " + " | ".join(_fmt(v, metric) for v in stage["baseline"]) + " |",
    ]
    for name, row in zip(tasks, stage["R"]):
        lines.append(f"| {name} | " + " | ".join(_fmt(v, metric) for v in row) + " |")
    lines += ["", "| " + " | ".join(stage["metrics"]) + " | seconds |"]
    lines.append("|---" * (len(stage["metrics"]) + 1) + "|")
    values = [_fmt(v, "") for v in stage["metrics"].values()]
    lines.append("| " + " | ".join(values) + f" | {stage['seconds']} |")
    return "\n".join(lines) + "\n"


def probes_markdown(probes: dict[str, Any]) -> str:
    """The cross-stage probe table and the survey's deltas ΔR^G, ΔR^I, ΔR^S."""
    lines = [
        "## Cross-stage forgetting",
        "",
        "Probe suites scored before the first stage and after each stage.",
        "",
        "| after | R^G (general) | R^I (instruction) | R^S (safety) |",
        "|---|---|---|---|",
    ]
    for i, row in enumerate(probes["scores"]):
        label = "start" if i == 0 else f"stage {i}"
        values = " | ".join(f"{row[k]:.3f}" for k in ("general", "instruction", "safety"))
        lines.append(f"| {label} | {values} |")
    deltas = ", ".join(
        f"{name} = {probes[key]:+.3f}"
        for name, key in (
            ("ΔR^G", "delta_general"),
            ("ΔR^I", "delta_instruction"),
            ("ΔR^S", "delta_safety"),
        )
    )
    lines += ["", f"Deltas after the last stage: {deltas}.", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.md`` from ``RUN_DIR/results.json``; returns its path."""
    run_dir = Path(run_dir)
    source = run_dir / "results.json"
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: is {run_dir} a finished jaxcl run?")
    results = json.loads(source.read_text())
    parts = [
        f"# Run `{results['recipe']}`",
        "",
        f"Recipe sha256 `{results['recipe_sha256']}`, {results['seconds']} s in all.",
        "",
    ]
    parts += [stage_markdown(stage) for stage in results["stages"]]
    if results.get("probes"):
        parts.append(probes_markdown(results["probes"]))
    out = run_dir / "report.md"
    out.write_text("\n".join(parts))
    return out
