"""Published R matrices, to set a run's numbers beside a paper's (``jaxcl report --published``).

A published file is YAML or JSON (docs/metrics.md#published-numbers): either one table, or
``tables:`` a list of them. A table is a mapping with

* ``tasks``: the task names in training order (they must be a run stage's tasks, same order);
* ``R``: ``T`` rows of ``T`` cells, ``R[t][i]`` the score on task ``i`` after training through
  task ``t`` (jaxcl's convention: papers that print one row per task need transposing), ``null``
  where the paper has no score, which may only be above the diagonal (a task not trained yet);
* ``source``: where the numbers come from (a string, or a mapping: paper, table, model, method);
* optional ``name``, ``printed`` (the paper's own ``op`` / ``bwt``, to show beside the ones
  recomputed from ``R``), ``digits`` (decimals printed), ``higher_is_better`` (default true),
  ``stage`` (the run's stage to compare with, when several have these tasks) and ``metric``
  (a description of the scores).

Every problem is a :class:`PublishedError` (a ``ValueError``: ``jaxcl report`` exits 2) whose
message starts with the file's path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxcl.eval.metrics import cl_metrics

__all__ = ["PublishedError", "PublishedTable", "load_published", "match_stage"]

_KEYS = {"name", "source", "tasks", "R", "printed", "digits", "higher_is_better", "stage", "metric"}
_PRINTED = {"op", "bwt", "bwt_trace", "fwt", "forgetting"}


class PublishedError(ValueError):
    """A published file that cannot be read or does not fit the run; names the file."""


@dataclass(frozen=True)
class PublishedTable:
    """One published R matrix with its source."""

    name: str
    tasks: list[str]
    R: list[list[float | None]]
    source: str | dict[str, Any]
    path: str
    printed: dict[str, float] = field(default_factory=dict)
    digits: int | None = None
    higher_is_better: bool = True
    stage: str | None = None
    metric: str | None = None

    def metrics(self) -> dict[str, float | None]:
        """``cl_metrics`` of the published ``R`` (``op``, ``bwt``, ``bwt_trace``...)."""
        return cl_metrics(self.R, higher_is_better=self.higher_is_better)

    def source_line(self) -> str:
        """The source in one line: ``key: value`` pairs of a mapping, or the string."""
        if isinstance(self.source, dict):
            return "; ".join(f"{k}: {v}" for k, v in self.source.items())
        return str(self.source)


def load_published(path: str | Path) -> list[PublishedTable]:
    """The tables of the published file ``path``, each checked (square, tasks, source...)."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise PublishedError(f"{where}: cannot read the published file: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PublishedError(f"{where}: not valid YAML or JSON: {err}") from None
    if isinstance(data, dict) and "tables" in data:
        if set(data) != {"tables"}:
            extra = sorted(set(data) - {"tables"})
            raise PublishedError(f"{where}: unknown top-level keys {extra} beside `tables`")
        entries = data["tables"]
        if not isinstance(entries, list) or not entries:
            raise PublishedError(f"{where}: `tables` must be a non-empty list of tables")
        labels = [f"tables[{k}]" for k in range(len(entries))]
    elif isinstance(data, dict):
        entries, labels = [data], ["the table"]
    else:
        raise PublishedError(
            f"{where}: expected a mapping (one table with `tasks`, `R`, `source`) or `tables:` "
            f"a list of them, got {type(data).__name__}"
        )
    tables = [_table(entry, where, label) for entry, label in zip(entries, labels)]
    names = [t.name for t in tables]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PublishedError(f"{where}: table names must be unique, repeated: {dup}")
    return tables


def _table(entry: Any, where: str, label: str) -> PublishedTable:
    def fail(problem: str) -> PublishedError:
        return PublishedError(f"{where}: {label}: {problem}")

    if not isinstance(entry, dict):
        raise fail(f"a table is a mapping, got {type(entry).__name__}")
    if "name" in entry:
        label = f"{label} ({entry['name']})"
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise fail(f"unknown keys {unknown} (known: {sorted(_KEYS)})")
    missing = [k for k in ("tasks", "R", "source") if k not in entry]
    if missing:
        raise fail(f"missing {missing}")
    tasks = entry["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise fail("`tasks` must be a non-empty list of task names")
    if len(set(tasks)) != len(tasks):
        raise fail(f"`tasks` repeats a name: {tasks}")
    source = entry["source"]
    if not source or not isinstance(source, (str, dict)):
        raise fail("`source` must say where the numbers come from (a string or a mapping)")
    T = len(tasks)
    rows = entry["R"]
    if not isinstance(rows, list) or len(rows) != T:
        got = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise fail(f"R must be {T}×{T} (one row per task), got {got} rows")
    R: list[list[float | None]] = []
    for t, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != T:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise fail(f"R must be {T}×{T}: row {t} has {got} cells")
        cells: list[float | None] = []
        for i, cell in enumerate(row):
            if cell is None:
                if i <= t:
                    raise fail(
                        f"R[{t}][{i}] is null: only cells above the diagonal (a task not "
                        "trained yet) may be missing"
                    )
                cells.append(None)
            elif isinstance(cell, bool) or not isinstance(cell, (int, float)):
                raise fail(f"R[{t}][{i}] is {cell!r}, not a number or null")
            elif not math.isfinite(cell):
                raise fail(f"R[{t}][{i}] is {cell}, not a finite number")
            else:
                cells.append(float(cell))
        R.append(cells)
    printed = entry.get("printed") or {}
    if not isinstance(printed, dict) or not set(printed) <= _PRINTED:
        raise fail(f"`printed` must map some of {sorted(_PRINTED)} to numbers")
    for key, value in printed.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"printed.{key} is {value!r}, not a number")
    digits = entry.get("digits")
    if digits is not None and (isinstance(digits, bool) or not isinstance(digits, int)):
        raise fail(f"`digits` must be an integer, got {digits!r}")
    higher = entry.get("higher_is_better", True)
    if not isinstance(higher, bool):
        raise fail(f"`higher_is_better` must be true or false, got {higher!r}")
    return PublishedTable(
        name=str(entry.get("name", label)),
        tasks=list(tasks),
        R=R,
        source=source,
        path=where,
        printed={k: float(v) for k, v in printed.items()},
        digits=digits,
        higher_is_better=higher,
        stage=entry.get("stage"),
        metric=entry.get("metric"),
    )


def match_stage(table: PublishedTable, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The run stage (an entry of ``results.json``'s ``stages``) that ``table`` compares with:
    the one named by its ``stage``, else the one with its tasks in its order. A mismatch raises
    :class:`PublishedError` naming the file, the table and both task lists."""

    def fail(problem: str) -> PublishedError:
        return PublishedError(f"{table.path}: table {table.name}: {problem}")

    def tasks_of(stage: dict[str, Any]) -> str:
        return f"stage {stage['name']!r} has tasks {stage['tasks']}"

    if table.stage is not None:
        named = [s for s in stages if s["name"] == table.stage]
        if not named:
            raise fail(
                f"the run has no stage {table.stage!r} (stages: {[s['name'] for s in stages]})"
            )
        candidates = named
    else:
        candidates = [s for s in stages if list(s["tasks"]) == table.tasks]
        if len(candidates) > 1:
            names = [s["name"] for s in candidates]
            raise fail(f"stages {names} all have its tasks: say which with `stage:`")
        if not candidates:
            listed = "; ".join(tasks_of(s) for s in stages)
            raise fail(f"its tasks {table.tasks} match no stage of the run ({listed})")
    stage = candidates[0]
    if list(stage["tasks"]) != table.tasks:
        raise fail(f"its tasks {table.tasks} do not match the run's: {tasks_of(stage)}")
    T = len(table.tasks)
    R = stage["R"]
    if len(R) != T or any(len(row) != T for row in R):
        raise fail(f"the run's stage {stage['name']!r} has no {T}×{T} R matrix (unfinished?)")
    return stage
