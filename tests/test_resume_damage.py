"""Damage outside the latest checkpoint: every file a resume reads is checked and named when bad.

One finished micro run (the recipe of tests/test_resume.py, mid-task checkpoints every two steps)
is copied for each case; the copy is damaged on purpose (or cut back to what a killed run leaves)
and the same command is rerun. Each case checks the exit code, that no traceback reaches the
output ("Traceback", "Exception ignored"), that the warning or error names the damaged file, and
that the results are an undamaged run's (parameter digests and R matrices: a stage retrained from
an older checkpoint of its own is deterministic). docs/failure-modes.md describes the fallbacks.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_resume import MICRO, QUICKSTART, _cli, _digests

NOISE = ("Traceback", "Exception ignored", "Event loop is closed")
TIMING = ("tokens_per_s", "step_seconds")  # the only log fields a retrained step changes
ENV = dict(os.environ, COLUMNS="1000")  # one warning per line, whole paths in it


def _run(args, timeout=600):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)
    output = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in output, output[-4000:]
    return proc, output


def _rerun(out):
    proc, output = _run(_cli(out))
    assert proc.returncode == 0, output[-3000:]
    return output, json.loads((out / "results.json").read_text())


def _warnings(output):
    return [line for line in output.splitlines() if line.startswith("warning")]


def _log(out, timing=True):
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if timing or k not in TIMING} for e in entries]


def _relative(out, entries):
    """manifest.json entries with paths relative to the run folder (copies differ there)."""
    rel = lambda p: None if p is None else str(Path(p).relative_to(Path(p).parents[2]))  # noqa: E731
    return [dict(e, path=rel(e["path"]), parent=rel(e["parent"])) for e in entries]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    _rerun(out)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture
def damaged(tmp_path, finished):
    """A copy of the finished run to damage; and what the undamaged run gave."""
    source, expected = finished
    out = tmp_path / "run"
    shutil.copytree(source, out, symlinks=True)
    return out, source, expected


def _largest_array_file(step_dir: Path, item: str = "params") -> Path:
    files = [p for p in (step_dir / item).rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _stage_steps(out, stage):
    return sorted(int(p.name) for p in (out / "checkpoints" / stage).iterdir() if p.name.isdigit())


def _on_disk(out):
    """Every checkpoint folder of the run, in the order of the stages, then of the steps."""
    stages = ("cpt", "cit", "align")
    return [str(out / "checkpoints" / s / str(n)) for s in stages for n in _stage_steps(out, s)]


@pytest.mark.slow
def test_finished_run_lineage_names_only_existing_checkpoints(finished):
    out, _ = finished
    entries = json.loads((out / "manifest.json").read_text())["checkpoints"]
    # the mid-task checkpoints (every 2 steps) were deleted at each task's end: not listed
    assert [e["path"] for e in entries] == _on_disk(out)
    assert [e["step"] for e in entries] == [6, 12, 6, 12, 18, 4]
    assert entries[0]["parent"] is None
    for prev, cur in zip(entries, entries[1:]):
        assert cur["parent"] == prev["path"]  # the task-end checkpoint before, which exists
        own = json.loads((Path(cur["path"]) / "manifest" / "metadata").read_text())
        assert own["parent"] == cur["parent"]  # the checkpoint's own manifest agrees


@pytest.mark.slow
def test_missing_array_file_in_earlier_stage_final_after_a_kill(damaged):
    """Killed before the next stage's first checkpoint, with an array file of the previous
    stage's final checkpoint gone: that stage falls back to its newest older checkpoint."""
    out, source, expected = damaged
    shutil.rmtree(out / "checkpoints" / "align")  # what a kill early in align leaves
    (out / "results.json").unlink()
    _largest_array_file(out / "checkpoints/cit/18").unlink()
    output, results = _rerun(out)
    (warning,) = _warnings(output)
    assert f"checkpoint {out}/checkpoints/cit/18 cannot be restored" in warning
    assert f"{out}/checkpoints/cit/18/params/" in warning  # the item whose file is missing
    assert warning.endswith(f"falling back to {out}/checkpoints/cit/12")
    assert _digests(results) == _digests(expected)
    assert _log(out, timing=False) == _log(source, timing=False)


@pytest.mark.slow
def test_unrestorable_parent_sends_the_run_back_to_its_stage(damaged):
    """The latest checkpoint (align's final) and the final checkpoint of the stage before it
    (cit's) both damaged: align cannot start from cit's, so cit resumes from cit/12 first."""
    out, _, expected = damaged
    for item in (out / "checkpoints/align/4/params").rglob("*"):
        if item.is_file() and "/d/" in str(item):
            item.write_bytes(b"garbage")
    _largest_array_file(out / "checkpoints/cit/18").unlink()
    output, results = _rerun(out)
    first, second = _warnings(output)
    assert f"checkpoint {out}/checkpoints/align/4 cannot be restored" in first
    assert first.endswith("falling back to retraining stage align from its start")
    assert f"checkpoint {out}/checkpoints/cit/18 cannot be restored" in second
    assert second.endswith(f"falling back to {out}/checkpoints/cit/12")
    assert _digests(results) == _digests(expected)


@pytest.mark.slow
def test_removed_earlier_stage_checkpoint_retrains_from_the_stage_s_older_one(damaged):
    out, source, expected = damaged
    shutil.rmtree(out / "checkpoints/cpt/12")
    output, results = _rerun(out)
    (warning,) = _warnings(output)
    assert "stage cpt has no readable final checkpoint" in warning
    assert f"resuming it from {out}/checkpoints/cpt/6" in warning
    assert _digests(results) == _digests(expected)
    assert _stage_steps(out, "cpt") == [6, 12]  # retrained; its mid-task saves deleted again
    # the later stages were trained from what cpt ends with again: resumed, not retrained
    assert f"resuming from {out}/checkpoints/cpt/6" in output
    assert "trained from other parameters" not in output
    assert _log(out, timing=False) == _log(source, timing=False)
    manifest = json.loads((out / "manifest.json").read_text())["checkpoints"]
    assert [e["path"] for e in manifest] == _on_disk(out)


def test_a_later_stage_trained_from_other_parameters_is_deleted_and_retrained(damaged):
    """After cpt retrains, align's checkpoint says it started from other parameters (as on a
    backend whose retraining is not bit-exact): it is deleted, not only passed over, so a kill
    during align's retraining cannot leave it to pass for align's end; align retrains."""
    out, _, expected = damaged
    shutil.rmtree(out / "checkpoints/cpt/12")
    meta = out / "checkpoints/align/4/manifest/metadata"
    manifest = json.loads(meta.read_text())
    manifest["record"]["start_params_sha256"] = "0" * 64
    meta.write_text(json.dumps(manifest))
    output, results = _rerun(out)
    stale = [w for w in _warnings(output) if "trained from other parameters" in w]
    assert len(stale) == 1 and f"{out}/checkpoints/align/4" in stale[0]
    assert "deleted; retraining stage align" in stale[0]
    assert _digests(results) == _digests(expected)
    retrained = json.loads(meta.read_text())["record"]["start_params_sha256"]
    assert retrained == results["stages"][1]["final_params_sha256"] != "0" * 64


@pytest.mark.slow
def test_truncated_checkpoint_manifest_of_an_earlier_stage(damaged):
    out, _, expected = damaged
    metadata = out / "checkpoints/cit/18/manifest/metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    output, results = _rerun(out)
    passed_over, fallback = _warnings(output)
    assert f"{metadata}: truncated or corrupted (JSONDecodeError" in passed_over
    assert f"resuming it from {out}/checkpoints/cit/12" in fallback
    assert _digests(results) == _digests(expected)
    assert json.loads(metadata.read_text())["step"] == 18  # written anew by the retrained task


@pytest.fixture(scope="module")
def torn_run_files(tmp_path_factory, finished):
    """The finished run with ``run.json`` and ``manifest.json`` truncated and the last line of
    ``metrics.jsonl`` torn, rerun once."""
    source, expected = finished
    out = tmp_path_factory.mktemp("torn") / "run"
    shutil.copytree(source, out, symlinks=True)
    for name, keep in (("run.json", 10), ("manifest.json", 100)):
        (out / name).write_bytes((out / name).read_bytes()[:keep])
    log = (out / "metrics.jsonl").read_bytes()
    (out / "metrics.jsonl").write_bytes(log[:-50])
    output, results = _rerun(out)
    return out, source, expected, output, results


@pytest.mark.slow
def test_truncated_run_json_is_read_from_the_checkpoints(torn_run_files):
    out, source, expected, output, results = torn_run_files
    assert any(f"{out}/run.json: it is truncated or corrupted" in w for w in _warnings(output))
    stamp = json.loads((out / "run.json").read_text())
    assert stamp == json.loads((source / "run.json").read_text())
    assert _digests(results) == _digests(expected)


@pytest.mark.slow
def test_truncated_manifest_json_is_rebuilt(torn_run_files):
    out, source, _, output, _ = torn_run_files
    assert any(f"{out}/manifest.json is truncated or corrupted" in w for w in _warnings(output))
    rebuilt = json.loads((out / "manifest.json").read_text())["checkpoints"]
    original = json.loads((source / "manifest.json").read_text())["checkpoints"]
    assert _relative(out, rebuilt) == _relative(source, original)


@pytest.mark.slow
def test_torn_last_log_line_is_dropped_with_a_warning(torn_run_files):
    out, source, _, output, _ = torn_run_files
    lines = len((source / "metrics.jsonl").read_text().splitlines())
    assert any(f"{out}/metrics.jsonl: line {lines} is torn" in w for w in _warnings(output))
    # every line is in the record of a checkpoint: the log is whole again, byte for byte
    assert (out / "metrics.jsonl").read_bytes() == (source / "metrics.jsonl").read_bytes()


@pytest.mark.slow
def test_step_folder_that_is_a_symlink_loop(damaged):
    """Once retrained over, the loop is gone: the next rerun resumes, nothing is left behind."""
    out, _, expected = damaged
    align = out / "checkpoints/align"
    shutil.rmtree(align / "4")
    (align / "4").symlink_to("4")
    shutil.copytree(align.parent / "cit/18", align / "4.orbax-checkpoint-tmp")  # an old failure's
    output, results = _rerun(out)
    (warning,) = _warnings(output)
    assert f"{align / '4'} is not a checkpoint folder (a broken or looping link" in warning
    assert _digests(results) == _digests(expected)
    assert sorted(p.name for p in align.iterdir()) == ["4"] and not (align / "4").is_symlink()
    output, again = _rerun(out)
    assert not _warnings(output) and f"resuming from {align / '4'}" in output
    assert _digests(again) == _digests(expected)


def _eval(checkpoint_dir, *overrides):
    return _run(
        [sys.executable, "-m", "jaxcl.cli", "eval", str(checkpoint_dir), str(QUICKSTART)]
        + MICRO
        + list(overrides)
    )


def _error_line(proc):
    """The one message line of a rejected command (logging may add a line or two, no more)."""
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("jaxcl eval:")]
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    return line


@pytest.mark.slow
def test_eval_of_a_checkpoint_with_a_missing_array_file(damaged):
    out, _, _ = damaged
    _largest_array_file(out / "checkpoints/cit/18").unlink()
    proc, _ = _eval(out / "checkpoints/cit/18")
    assert proc.returncode == 2
    line = _error_line(proc)
    assert line.startswith(f"jaxcl eval: {out}/checkpoints/cit/18: its params cannot be read")
    assert f"{out}/checkpoints/cit/18/params/" in line  # TensorStore's reason names the folder


@pytest.mark.slow
def test_eval_with_a_mismatched_preset_names_the_first_difference(finished):
    out, _ = finished
    proc, _ = _eval(out / "checkpoints/cit/18", "model.preset=tiny")
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "does not hold parameters of the recipe's model (tiny)" in line
    assert "in the checkpoint" in line


RESTORE_DAMAGED = """
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxcl import checkpoint

step_dir = Path(sys.argv[1])
device = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def like(item):
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir / item)).tree
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


params, opt = like("params"), like("opt_state")
for _ in range(10):
    try:
        checkpoint.restore_checkpoint(step_dir.parent, int(step_dir.name), params, opt)
    except checkpoint.CheckpointError as err:
        print("CheckpointError", err.path)
"""


@pytest.mark.slow
def test_a_failed_restore_leaves_no_asynchronous_tracebacks(damaged):
    """Orbax closes a restore's event loop while the other reads are in flight; unsettled, they
    print dozens of "Event loop is closed" / "Exception ignored" tracebacks after the error."""
    out, _, _ = damaged
    step_dir = out / "checkpoints/cit/18"
    _largest_array_file(step_dir).unlink()
    proc, _ = _run([sys.executable, "-c", RESTORE_DAMAGED, str(step_dir)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [f"CheckpointError {step_dir}"] * 10
