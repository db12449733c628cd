"""``report.md`` from a run's ``results.json``: per-stage R matrices and CL metrics, cross-stage
probes, PNG plots (an R-matrix heat map per stage, the loss curves), and, when asked, a stage's R
beside a published one (``jaxcl report RUN --published FILE``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jaxcl.eval.published import PublishedTable


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
    if stage.get("metrics_scale") == "log":
        lines += [
            "",
            "CL metrics of perplexity tasks on ln(perplexity): BWT and forgetting in nats.",
        ]
    lines += ["", "| " + " | ".join(stage["metrics"]) + " | seconds |"]
    lines.append("|---" * (len(stage["metrics"]) + 1) + "|")
    values = [_fmt(v, "") for v in stage["metrics"].values()]
    lines.append("| " + " | ".join(values) + f" | {stage['seconds']} |")
    return "\n".join(lines) + "\n"


def data_markdown(stage: dict[str, Any]) -> str:
    """What each task of a stage read: rows, tokens, replayed rows, truncated documents, and
    the bad rows skipped (``on_bad_row: skip``) with the first places they were found."""
    data = stage.get("data") or {}
    if not data:
        return ""
    lines = [
        f"### Data read in `{stage['name']}`",
        "",
        "| task | rows | tokens | replayed rows | truncated rows (share) | skipped bad rows |",
        "|---|---|---|---|---|---|",
    ]
    places = []
    for task, read in data.items():
        rows, cut = int(read.get("rows", 0)), int(read.get("truncated", 0))
        cells = [f"{int(read.get(k, 0)):,}" for k in ("rows", "tokens", "replayed")]
        cells.append(f"{cut:,} ({cut / rows:.1%})" if rows else f"{cut:,}")
        cells.append(f"{int(read.get('skipped', 0)):,}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
        places += [f"- {task}: {where}" for where in read.get("bad_rows") or []]
    if places:
        lines += ["", "Skipped bad rows (the first of each task):", "", *places]
    return "\n".join(lines) + "\n"


def probes_markdown(probes: dict[str, Any]) -> str:
    """The cross-stage probe table, the survey's deltas ΔR^G, ΔR^I, ΔR^S (of the suites the
    recipe scores), and each lm-eval task's score when lm-eval scored a suite."""
    suites = ("general", "instruction", "safety")
    score = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "## Cross-stage forgetting",
        "",
        "Probe suites scored before the first stage and after each stage.",
        "",
        "| after | R^G (general) | R^I (instruction) | R^S (safety) |",
        "|---|---|---|---|",
    ]
    labels = ["start"] + [f"stage {i}" for i in range(1, len(probes["scores"]))]
    for label, row in zip(labels, probes["scores"]):
        lines.append(f"| {label} | " + " | ".join(score(row.get(k)) for k in suites) + " |")
    names = (("ΔR^G", "delta_general"), ("ΔR^I", "delta_instruction"), ("ΔR^S", "delta_safety"))
    deltas = ", ".join(f"{name} = {probes[key]:+.3f}" for name, key in names if key in probes)
    lines += ["", f"Deltas after the last stage: {deltas}.", ""]
    harness = sorted(k for k in probes["scores"][0].get("tasks", {}) if k.startswith("lm_eval/"))
    if harness:
        lines += ["| after | " + " | ".join(h.removeprefix("lm_eval/") for h in harness) + " |"]
        lines.append("|---" * (len(harness) + 1) + "|")
        for label, row in zip(labels, probes["scores"]):
            cells = [score(row.get("tasks", {}).get(h)) for h in harness]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_r_matrix(stage: dict[str, Any], path: Path) -> Path:
    """Heat map of ``[baseline; R]`` with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [stage["baseline"], *stage["R"]]
    labels = ["baseline", *stage["tasks"][: len(stage["R"])]]
    values = np.asarray(rows, dtype=float)
    shown = np.log10(values) if stage["metric"] == "perplexity" else values
    cmap = "viridis_r" if stage["metric"] == "perplexity" else "viridis"
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(stage["tasks"]), 1.0 + 0.55 * len(rows)))
    ax.imshow(shown, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(stage["tasks"])), stage["tasks"], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [f"after {x}" if i else x for i, x in enumerate(labels)])
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, _fmt(float(v), stage["metric"]), ha="center", va="center", color="w")
    ax.set_title(
        f"{stage['name']}: {stage['metric']}" + (" (log color)" if cmap.endswith("_r") else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(results: dict[str, Any], path: Path) -> Path:
    """Training loss against the step, one panel per stage, task boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = results["stages"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for task in stage["tasks"]:
            points = [(e["step"], e["loss"]) for e in stage["losses"] if e["task"] == task]
            if points:
                ax.plot(*zip(*points), marker=".", label=task)
        ax.set_title(stage["name"])
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """The ``compare:`` variants side by side: OP, BWT, FWT, forgetting per stage."""
    stages = list(rows[0]["stages"])
    metrics = ("op", "bwt", "fwt", "forgetting")
    header = [f"{s} {m}" for s in stages for m in metrics]
    lines = ["## Comparison of variants", "", "| variant | " + " | ".join(header) + " | seconds |"]
    lines.append("|---" * (len(header) + 2) + "|")
    for row in rows:
        cells = [_fmt(row["stages"][s][m], "") for s in stages for m in metrics]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> Path:
    """Bars of each stage's BWT, one group per stage, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(rows[0]["stages"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.8 * len(stages), 3))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [row["stages"][s]["bwt"] or 0.0 for s in stages]
        ax.bar(np.arange(len(stages)) + i * width, values, width, label=row["variant"])
    ax.set_xticks(np.arange(len(stages)) + 0.4 - width / 2, stages)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("BWT")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def published_markdown(stage: dict[str, Any], table: PublishedTable) -> str:
    """A run stage's R beside a published one, cell by cell (``run / published (run −
    published)``), and OP and BWT of both: the run's as its ``results.json`` has them, the
    published ones recomputed from its R by :func:`jaxcl.eval.cl_metrics`, and those the paper
    prints when the table gives them."""
    metric, tasks = stage["metric"], table.tasks
    digits = 3 if table.digits is None else table.digits

    def pub(value: float | None) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        f"## Published against measured: `{table.name}`",
        "",
        f"Stage `{stage['name']}` of this run beside `{table.name}` of `{table.path}`.",
        f"Source: {table.source_line()}.",
        "",
        f"Cell: run / published (run − published); R[t][i] = {metric} on task i (column) after "
        "training through task t (row); – where the published table has no score.",
        "",
        "| after | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for name, ours, theirs in zip(tasks, stage["R"], table.R):
        cells = []
        for a, b in zip(ours, theirs):
            delta = "" if b is None else f" ({float(a) - b:+.{digits}f})"
            cells.append(f"{_fmt(a, metric)} / {pub(b)}{delta}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ours_m, theirs_m = stage["metrics"], table.metrics()
    rows = [("this run", ours_m), ("published, from its R", theirs_m)]
    if table.printed:
        rows.append(("published, as printed", table.printed))
    lines += ["", "| | OP | BWT |", "|---|---|---|"]
    for label, values in rows:
        lines.append(f"| {label} | {pub(values.get('op'))} | {pub(values.get('bwt'))} |")
    diffs = []
    for key in ("op", "bwt"):
        a, b = ours_m.get(key), theirs_m.get(key)
        diffs.append("–" if a is None or b is None else f"{a - b:+.{digits}f}")
    lines.append("| run − published | " + " | ".join(diffs) + " |")
    lines += [
        "",
        "OP = mean_i R[T-1][i]; BWT = mean_{i<T-1} (R[T-1][i] − R[i][i]), jaxcl's `bwt` (GEM's "
        "definition, and the denominator T−1 of TRACE's published BWT).",
    ]
    if stage.get("metrics_scale") == "log":
        lines.append("The run's OP and BWT of perplexity tasks are on ln(perplexity).")
    return "\n".join(lines) + "\n"


def published_comparisons(
    results: dict[str, Any], files: Sequence[str | Path]
) -> list[tuple[PublishedTable, str]]:
    """Each table of each published file with its markdown beside the run stage it matches;
    raises :class:`jaxcl.eval.published.PublishedError` (naming the file) on the first table
    that cannot be read or fits no stage."""
    from jaxcl.eval.published import load_published, match_stage

    out = []
    for path in files:
        for table in load_published(path):
            out.append((table, published_markdown(match_stage(table, results["stages"]), table)))
    return out


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/results.json``; a missing one is a ``FileNotFoundError`` that says so."""
    run_dir = Path(run_dir)
    source = run_dir / "results.json"
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: is {run_dir} a finished jaxcl run?")
    return json.loads(source.read_text())


def write_report(run_dir: str | Path, published: Sequence[str | Path] | None = None) -> Path:
    """Write ``RUN_DIR/report.md`` from ``RUN_DIR/results.json``; returns its path.

    ``published``: files of published R matrices (:mod:`jaxcl.eval.published`); each table is
    set beside the run stage with its tasks (:func:`published_markdown`). They are all read and
    checked before anything is written."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    compared = published_comparisons(results, published or ())
    parts = [
        f"# Run `{results['recipe']}`",
        "",
        f"Recipe sha256 `{results['recipe_sha256']}`, {results['seconds']} s in all.",
        "",
    ]
    for stage in results["stages"]:
        image = plot_r_matrix(stage, run_dir / f"r_{stage['name']}.png")
        parts += [stage_markdown(stage), f"![R matrix of {stage['name']}]({image.name})", ""]
        if stage.get("data"):
            parts.append(data_markdown(stage))
    parts += [markdown for _, markdown in compared]
    parts += [
        "## Loss",
        "",
        f"![loss curves]({plot_losses(results, run_dir / 'losses.png').name})",
        "",
    ]
    if results.get("probes"):
        parts.append(probes_markdown(results["probes"]))
    if (run_dir / "comparison.json").exists():
        rows = json.loads((run_dir / "comparison.json").read_text())["variants"]
        image = plot_comparison(rows, run_dir / "comparison.png")
        parts += [comparison_markdown(rows), f"![BWT per variant]({image.name})", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(parts))
    return out
