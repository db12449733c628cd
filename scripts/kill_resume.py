"""SIGKILL a run at random moments and check that every resume ends bit-identical.

For each trial the script starts ``jaxcl run`` on the micro stand-in of the quickstart (three
stages, interval checkpoints every 2 steps) into a fresh folder, kills it with SIGKILL at a
moment drawn uniformly over the uninterrupted run's wall time (so kills fall in training,
saves, evaluation and probes of every stage in proportion to the time each takes), then, for
the first ``--resume-kills`` trials, kills the resumed run too, 0.5-6 s after its start (while
it restores), and finally runs the same command to the end. A trial passes when the final
parameter digest and R matrix of every stage equal those of the uninterrupted run, and
``metrics.jsonl`` holds each step once.

Each kill is described by what the run folder held at that moment: the last logged stage and
step, and whether a save was half-written (an Orbax temporary folder).

Usage::

    python scripts/kill_resume.py --trials 20 --resume-kills 5      # the figure in the docs
    python scripts/kill_resume.py --trials 2 --resume-kills 1       # what the test runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes/quickstart.yaml"
MICRO = [
    "compare={}",
    "model.preset=test-micro",
    "log_every=1",
    "checkpoint_every=2",
    *[f"stages.{s}.steps_per_task={n}" for s, n in [(0, 6), (1, 6), (2, 4)]],
    *[f"stages.{s}.batch_size=8" for s in range(3)],
    *[f"stages.{s}.eval_batch_size=16" for s in range(3)],
    "stages.0.methods.0.fisher_examples=16",
    *[
        f"stages.{s}.tasks.{t}.data.{field}={value}"
        for s, n in [(0, 2), (1, 3), (2, 1)]
        for t in range(n)
        for field, value in [("train_size", 64), ("eval_size", 16)]
    ],
]


FINISHED = "finished before the kill"


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "jaxcl.cli", "run", str(QUICKSTART), f"out_dir={out}", *MICRO]


def digests(out: Path) -> list:
    results = json.loads((out / "results.json").read_text())
    return [(s["name"], s["final_params_sha256"], s["R"]) for s in results["stages"]]


def finish(out: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command(out), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or "Traceback" in proc.stderr:
        raise RuntimeError(f"run into {out} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def where(out: Path) -> str:
    """What the folder shows of the moment of a kill."""
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    last = json.loads(lines[-1]) if lines and lines[-1].strip().endswith("}") else None
    at = f"{last['stage']} step {last['step']}" if last else "before the first step"
    ckpt = out / "checkpoints"
    saving = ckpt.exists() and any("orbax-checkpoint-tmp" in p.name for p in ckpt.rglob("*"))
    return at + (", mid-save" if saving else "")


def kill_after(out: Path, seconds: float) -> str:
    """Start the run, SIGKILL it after ``seconds``; what the folder showed (or ``finished``)."""
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
        return FINISHED
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return where(out)


def steps_logged_once(out: Path, expected: int) -> bool:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    keys = [(json.loads(x)["stage"], json.loads(x)["task"], json.loads(x)["step"]) for x in lines]
    return len(keys) == len(set(keys)) == expected


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--resume-kills", type=int, default=5, help="trials whose resume is killed too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jaxcl-kill-"))
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    wall = finish(reference)
    expected = digests(reference)
    steps = len((reference / "metrics.jsonl").read_text().splitlines())
    print(f"uninterrupted run: {wall:.1f} s, {steps} steps logged")
    failures = trial = 0
    while trial < args.trials:
        out = work / f"trial-{trial}"
        shutil.rmtree(out, ignore_errors=True)
        moment = kill_after(out, rng.uniform(1.0, wall))
        if moment == FINISHED:  # the run was faster than the moment drawn: draw again
            print(f"(the run finished before the kill; drawing trial {trial} again)")
            continue
        moments = [moment]
        if trial < args.resume_kills and (out / "run.json").exists():
            moments.append("resume " + kill_after(out, rng.uniform(0.5, 6.0)))
        finish(out)
        same = digests(out) == expected and steps_logged_once(out, steps)
        failures += not same
        verdict = "identical" if same else "DIFFERS"
        print(f"trial {trial:2d}: killed at {' / '.join(moments)}: {verdict}")
        shutil.rmtree(out, ignore_errors=True)
        trial += 1
    print(f"{args.trials - failures} of {args.trials} resumes identical to the uninterrupted run")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
