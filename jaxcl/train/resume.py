"""Where a killed or damaged run resumes: read from its folder, every file checked first.

What a resume reads, and what it does when that is bad (the warning names the file):

- ``run.json`` (which recipe the folder holds): missing or unreadable, the recipe fingerprint is
  read from the checkpoints' own manifests instead (and ``run.json`` rewritten).
- each checkpoint's ``manifest/metadata``: missing, truncated or not that checkpoint's, the
  checkpoint is passed over, as if never written; a step folder that is a broken or looping
  link is passed over too (the run saves that step over it).
- ``manifest.json``: rebuilt from the checkpoints' own manifests, so a truncated one is replaced
  and it lists what exists.
- ``metrics.jsonl``: rewritten from the records of the checkpoints it resumes after (every
  logged line is in the record of the checkpoints after it); a torn or foreign line is dropped.
- the arrays of a checkpoint the run resumes from or starts a stage from: restored; one that
  does not restore is passed over for an older one.

The fallback order, stage by stage from the first (docs/failure-modes.md):

1. A stage whose final checkpoint's manifest reads is done (its results come from it).
2. The first stage that is not done resumes from its newest checkpoint that restores, else
   retrains from its start, from the previous stage's final checkpoint.
3. When that final checkpoint does not restore, the previous stage resumes from its newest
   older checkpoint that does (or retrains from its own start), and so on back.
4. The checkpoints of the stages after a retrained one are kept only when they were trained from
   what it ends with now (the start digest their records hold); else those stages retrain too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from jaxcl import checkpoint, parallel
from jaxcl.checkpoint import CheckpointError
from jaxcl.recipe import StageSpec
from jaxcl.train.stage import stage_result, warn_unreadable


def warn(console: Console, text: str) -> None:
    console.print("[yellow]warning[/]: " + escape(text))


@dataclass
class Found:
    """A checkpoint whose manifest reads and is that checkpoint's."""

    path: Path
    manifest: dict[str, Any]


@dataclass
class ResumePoint:
    stage: int  # index of the stage to run next
    candidates: list[Path]  # that stage's checkpoints to resume from, newest first ([]: its start)
    params: Any  # the parameters it starts from when none of them restores (None: read parent)
    parent: str | None  # the previous stage's final checkpoint
    finished: list[dict[str, Any]]  # results of the stages before ``stage``
    # checkpoints of the stages after ``stage`` (kept only if trained from what it ends with)
    later: dict[int, list[Found]] = field(default_factory=dict)
    found: list[list[Found]] = field(default_factory=list)  # every stage's, newest first


def is_final(manifest: dict[str, Any], stage: StageSpec) -> bool:
    return bool(manifest["task_done"]) and manifest["task_index"] == len(stage.tasks) - 1


def check_manifest(manifest: dict[str, Any], stage: StageSpec, path: Path) -> None:
    """A CheckpointError naming the manifest file unless it is a whole manifest of checkpoint
    ``path`` of ``stage`` (a final one with the results of the stage)."""
    where = path / "manifest" / "metadata"

    def bad(what: str):
        raise CheckpointError(f"{where}: {what}", path)

    for key, kind in (("stage", str), ("step", int), ("task_index", int), ("task_done", bool)):
        if not isinstance(manifest.get(key), kind):
            bad(f"it has no valid {key!r} entry")
    if manifest["stage"] != stage.name or manifest["step"] != int(path.name):
        bad(f"it is the manifest of stage {manifest['stage']!r}, step {manifest['step']}")
    if not 0 <= manifest["task_index"] < len(stage.tasks):
        bad(f"task {manifest['task_index']} is not a task of stage {stage.name!r}")
    record = manifest.get("record")
    if not isinstance(record, dict) or not all(
        isinstance(record.get(key), list) for key in ("R", "baseline", "losses")
    ):
        bad("its record (scores, losses) is missing or incomplete")
    if not all(isinstance(e, dict) for e in record["losses"]):
        bad("its record's losses are not log entries")
    if is_final(manifest, stage):
        try:
            stage_result(stage, record, str(path))
        except (KeyError, TypeError, ValueError) as err:
            bad(f"its record does not give the stage's results ({type(err).__name__}: {err})")


def scan_stage(ctx, stage: StageSpec, *, quiet: bool = False) -> list[Found]:
    """The checkpoints of ``stage`` whose manifests read, newest first; each one passed over
    (and each step entry that is no folder) is named in a warning unless ``quiet``."""
    stage_dir = ctx.out / "checkpoints" / stage.name
    say = (lambda text: None) if quiet else (lambda text: warn(ctx.console, text))
    for stray in checkpoint.stray_steps(stage_dir):
        say(
            f"{stray} is not a checkpoint folder (a broken or looping link, or a file): passed "
            f"over; the run saves step {stray.name} over it"
        )
    found = []
    for step in reversed(checkpoint.all_steps(stage_dir)):
        path = stage_dir / str(step)
        try:
            manifest = checkpoint.read_manifest(path)
            check_manifest(manifest, stage, path)
        except CheckpointError as err:
            say(f"checkpoint {path} cannot be restored ({err}); falling back to an older one")
            continue
        found.append(Found(path, manifest))
    return found


def fallback_text(stage: StageSpec, older: list[Path]) -> str:
    """What a stage falls back to: its newest older checkpoint, or its start."""
    return str(older[0]) if older else f"retraining stage {stage.name} from its start"


def find_resume_point(ctx) -> ResumePoint | None:
    """Where the run in ``ctx.out`` resumes (None: nothing to resume), stage by stage from the
    first: done stages (final manifest reads) give their results; the first stage that is not
    done resumes from its checkpoints. When the latest stage is done, its final checkpoint must
    restore (the next stage starts from it), else that stage resumes from an older one."""
    stages = ctx.recipe.stages
    found = [scan_stage(ctx, stage) for stage in stages]
    present = [index for index, mine in enumerate(found) if mine]
    if not present:
        return None
    last = present[-1]
    finished: list[dict[str, Any]] = []
    parent = None
    for index, stage in enumerate(stages[: last + 1]):
        mine = found[index]
        if mine and is_final(mine[0].manifest, stage):
            final = mine[0]
            if index == last:  # the next stage starts from it: it must restore
                try:
                    params = ctx.restore_model(final.path)
                except CheckpointError as err:
                    older = [f.path for f in mine[1:]]
                    warn_unreadable(ctx.console, final.path, err, fallback_text(stage, older))
                    return ResumePoint(index, older, None, parent, finished, found=found)
            finished.append(stage_result(stage, final.manifest["record"], str(final.path)))
            parent = str(final.path)
            if index == last:
                return ResumePoint(index + 1, [], params, parent, finished, found=found)
            continue
        if index < last:
            start = f"resuming it from {mine[0].path}" if mine else "retraining it from its start"
            warn(
                ctx.console,
                f"stage {stage.name} has no readable final checkpoint (in "
                f"{ctx.out / 'checkpoints' / stage.name}), though later stages have "
                f"checkpoints; {start}",
            )
        later = {j: found[j] for j in range(index + 1, last + 1) if found[j]}
        return ResumePoint(index, [f.path for f in mine], None, parent, finished, later, found)
    return None  # not reached: the latest stage with checkpoints returns


def descendants(ctx, stage: StageSpec, found: list[Found], digest: str) -> list[Path]:
    """Those of a stage's checkpoints ``found`` that were trained from parameters of digest
    ``digest`` (what the previous stage ends with now). The others are named in a warning and
    deleted: left on disk, a stale final checkpoint would pass for the stage's end at the next
    resume if this one were killed while the stage retrains."""
    keep = [f.path for f in found if f.manifest["record"].get("start_params_sha256") == digest]
    stale = [f.path for f in found if f.path not in keep]
    if stale:
        warn(
            ctx.console,
            f"stage {stage.name}: checkpoints {', '.join(map(str, stale))} were trained from "
            "other parameters than the previous stage ends with now: deleted; "
            + (f"resuming from {keep[0]}" if keep else f"retraining stage {stage.name}"),
        )
        if parallel.is_primary():
            stage_dir = stale[0].parent
            checkpoint.delete_steps(stage_dir, [int(p.name) for p in stale], run_dir=ctx.out)
        ctx.drop_checkpoints([str(p) for p in stale])
    return keep


def entry(found: Found) -> dict[str, Any]:
    """A checkpoint's entry of ``manifest.json``, from its own manifest."""
    skip = ("record", "replay", "data_state", "frozen", "frozen_layout")
    return {
        k: v
        for k, v in dict(found.manifest, path=str(found.path)).items()
        if k not in skip and (v is not None or k == "parent")
    }


def rebuild_manifest(ctx, found: list[list[Found]]) -> None:
    """``manifest.json`` (and ``ctx.checkpoints``) made anew from the checkpoints' own manifests;
    a truncated or corrupted one is named in a warning."""
    path = ctx.out / "manifest.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
                raise ValueError("no list of checkpoints in it")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            warn(
                ctx.console,
                f"{path} is truncated or corrupted ({type(err).__name__}: {err}); rebuilt "
                "from the checkpoints' own manifests",
            )
    ctx.checkpoints = [entry(f) for mine in found for f in reversed(mine)]
    ctx.write_manifest()


def _bad_lines(path: Path) -> list[int]:
    """Numbers of the lines of a metrics log that are not whole log entries."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    bad = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            item = json.loads(line)
            ok = isinstance(item, dict) and isinstance(item.get("stage"), str)
            ok = ok and isinstance(item.get("step"), int)
        except ValueError:
            ok = False
        if not ok:
            bad.append(number)
    return bad


def rewrite_metrics_log(ctx, finished: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` := the logged lines of the ``finished`` stages, from their records
    (atomically); the stage that resumes appends its own from the checkpoint it restores. A torn
    or foreign line of the old log is named in a warning."""
    path = ctx.out / "metrics.jsonl"
    if not parallel.is_primary():
        return
    bad = _bad_lines(path) if path.exists() else []
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warn(
            ctx.console,
            f"{path}: line {shown} is torn or not a log entry: dropped (the log is rewritten "
            "from the checkpoints' records)",
        )
    trim_metrics_log(ctx, finished)


def trim_metrics_log(ctx, stages: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` := the logged lines of ``stages`` (atomically): what a resume starts
    from, or what is left when a stage goes back to retrain."""
    if parallel.is_primary():
        tmp = ctx.out / "metrics.tmp"
        tmp.write_text("".join(json.dumps(e) + "\n" for r in stages for e in r["losses"]))
        tmp.replace(ctx.out / "metrics.jsonl")


def _fingerprints(out: Path) -> set[str]:
    """The recipe fingerprints the checkpoints' manifests in run folder ``out`` name."""
    names = set()
    for manifest_file in sorted((out / "checkpoints").glob("*/*/manifest/metadata")):
        try:
            value = checkpoint.read_manifest(manifest_file.parent.parent).get("recipe_sha256")
        except CheckpointError:
            continue
        if isinstance(value, str):
            names.add(value)
    return names


def recorded_fingerprint(out: Path, expected: str, console: Console) -> str | None:
    """The recipe fingerprint ``out/run.json`` records. Missing or unreadable, it is read from
    the checkpoints' manifests (``expected`` when any names it, as a compare variant's folder
    also holds the base run's checkpoints), with a warning naming ``run.json``; None when they
    name no recipe either."""
    stamp = out / "run.json"
    try:
        data = json.loads(stamp.read_text())
        value = data.get("recipe_sha256") if isinstance(data, dict) else None
        if isinstance(value, str):
            return value
        problem = "it records no recipe_sha256"
    except FileNotFoundError:
        problem = "it is missing"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = f"it is truncated or corrupted ({type(err).__name__}: {err})"
    names = _fingerprints(out)
    recovered = expected if expected in names else (names.pop() if len(names) == 1 else None)
    if recovered is None:
        warn(console, f"{stamp}: {problem}, and no checkpoint's manifest names one recipe")
    else:
        warn(
            console,
            f"{stamp}: {problem}; the recipe is read from the checkpoints' own manifests "
            f"instead (sha256 {recovered[:12]}...), and run.json rewritten",
        )
    return recovered
