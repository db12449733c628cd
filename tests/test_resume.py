"""Durability: a run killed with SIGKILL (while training, or leaving a half-written save behind)
resumes to bit-identical parameters; a corrupted latest checkpoint falls back to the previous
one; a NaN stops the run naming the step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxcl.data.stream import TaskStream
from jaxcl.recipe import load_recipe
from jaxcl.train.runner import TrainingDiverged, run_recipe

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "recipes/quickstart.yaml"
MICRO = [
    "compare={}",  # the quickstart's variants are exercised in test_compare / test_spine
    "model.preset=test-micro",
    "log_every=1",
    "stages.0.steps_per_task=6",
    "stages.1.steps_per_task=6",
    "stages.2.steps_per_task=4",
    "stages.0.batch_size=8",
    "stages.1.batch_size=8",
    "stages.2.batch_size=8",
    "stages.0.eval_batch_size=16",
    "stages.1.eval_batch_size=16",
    "stages.2.eval_batch_size=16",
    "stages.0.methods.0.fisher_examples=16",
] + [
    f"stages.{s}.tasks.{t}.data.{field}={value}"
    for s, n in [(0, 2), (1, 3), (2, 1)]
    for t in range(n)
    for field, value in [("train_size", 64), ("eval_size", 16)]
]


def _cli(out, *extra):
    return [
        sys.executable,
        "-m",
        "jaxcl.cli",
        "run",
        str(QUICKSTART),
        f"out_dir={out}",
        *MICRO,
        "checkpoint_every=2",  # mid-task checkpoints: a kill loses at most two steps
        *extra,
    ]


def _finish(out):
    proc = subprocess.run(_cli(out), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, json.loads((out / "results.json").read_text())


def _digests(results):
    return [(s["name"], s["final_params_sha256"], s["R"]) for s in results["stages"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, _finish(out)[1]


def _kill_when(out, predicate, timeout=300, poll=0.05):
    proc = subprocess.Popen(_cli(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(poll)
    proc.kill()
    pytest.fail("the run ended before the kill point")


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_is_bit_identical(tmp_path, uninterrupted):
    _, expected = uninterrupted
    out = tmp_path / "run"
    # Kill inside the instruction stage, after its first interval checkpoint.
    _kill_when(out, lambda: (out / "checkpoints" / "cit" / "2").exists())
    assert not (out / "results.json").exists()
    stdout, results = _finish(out)
    assert "resuming from" in stdout
    assert _digests(results) == _digests(expected)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len([x for s in expected["stages"] for x in s["losses"]])


@pytest.mark.slow
def test_sigkill_during_a_save_then_resume_is_bit_identical(tmp_path, uninterrupted):
    _, expected = uninterrupted
    out = tmp_path / "run"
    cit = out / "checkpoints" / "cit"

    def saving() -> bool:  # Orbax writes into a temporary folder, renamed when complete
        return cit.exists() and any(".orbax-checkpoint-tmp" in p.name for p in cit.iterdir())

    _kill_when(out, saving, poll=0.002)
    assert saving()  # the killed save left its half-written folder behind
    stdout, results = _finish(out)
    assert "resuming from" in stdout
    assert _digests(results) == _digests(expected)


@pytest.mark.slow
def test_half_written_save_and_corrupted_latest_checkpoint(tmp_path, uninterrupted):
    full, expected = uninterrupted
    out = tmp_path / "run"
    _kill_when(out, lambda: (out / "checkpoints" / "cit" / "4").exists())
    cit = out / "checkpoints" / "cit"
    latest = max(int(p.name) for p in cit.iterdir() if p.name.isdigit())
    # A save killed half-way: Orbax's temporary folder for the next step, never committed.
    partial = cit / f"{latest + 2}.orbax-checkpoint-tmp-1234"
    shutil.copytree(cit / str(latest), partial)
    for item in partial.rglob("*"):
        if item.is_file() and item.stat().st_size > 0 and "params" in str(item):
            item.write_bytes(item.read_bytes()[: item.stat().st_size // 2])
    # And the latest committed checkpoint corrupted on disk.
    for item in (cit / str(latest) / "opt_state").rglob("*"):
        if item.is_file():
            item.write_bytes(b"garbage")
    stdout, results = _finish(out)
    assert "cannot be restored" in stdout and "falling back" in stdout
    assert _digests(results) == _digests(expected)


def test_nan_in_a_batch_stops_naming_the_step(tmp_path, monkeypatch):
    recipe = load_recipe(QUICKSTART, [f"out_dir={tmp_path / 'run'}", *MICRO, "checkpoint_every=2"])
    original = TaskStream.next_batch

    def poisoned(self):
        k = self.step
        batch = original(self)
        if k == 3:
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][0, 1] = np.nan
        return batch

    monkeypatch.setattr(TaskStream, "next_batch", poisoned)
    with pytest.raises(TrainingDiverged, match=r"stage 'cpt', task 'recipes', step 4 of the task"):
        run_recipe(recipe)
    # Nothing after the NaN was saved: the only checkpoint is the interval one at step 2.
    assert sorted(p.name for p in (tmp_path / "run/checkpoints/cpt").iterdir()) == ["2"]
