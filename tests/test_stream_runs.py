"""Runs on a streamed corpus: budgets and per-task learning rates as planned, exact token
accounting in results.json, a SIGKILL mid-epoch resumed bit-identically, bad rows deep in the
file stopped (naming file and line, last checkpoint kept) or skipped and counted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxcl.plan import plan
from jaxcl.recipe import load_recipe
from jaxcl.report import write_report

ROOT = Path(__file__).parent.parent


def _corpus(path: Path, n: int, bad_line: int | None = None) -> int:
    """Documents of 20-200 bytes; returns the trained-token count of one concat epoch."""
    rng = np.random.default_rng(0)
    lines, tokens = [], 0
    for i in range(n):
        text = " ".join(rng.choice(["ab", "cde", "fg", "hij"], size=int(rng.integers(8, 30))))
        lines.append('{"text": oops' if i + 1 == bad_line else json.dumps({"text": text}))
        tokens += 0 if i + 1 == bad_line else len(text.encode()) + 1
    path.write_text("\n".join(lines) + "\n")
    return tokens


def _recipe(tmp_path: Path, corpus: Path, budget=None, **data) -> Path:
    evalset = tmp_path / "eval.jsonl"
    _corpus(evalset, 8)
    source = {"type": "jsonl", "kind": "text", "train": str(corpus), "eval": str(evalset)}
    recipe = {
        "name": "streamed",
        "out_dir": str(tmp_path / "run"),
        "model": {"preset": "test-micro"},
        "probes": False,
        "log_every": 1,
        "optimizer": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "stages": [
            {
                "name": "cpt",
                "kind": "pretrain",
                "seq_len": 32,
                "batch_size": 4,
                "eval_batch_size": 8,
                "steps_per_task": 3,
                "tasks": [
                    {
                        "name": "domain",
                        "data": {"source": source, **data},
                        **(budget or {"epochs": 1}),
                    },
                    {
                        "name": "more",
                        "data": {"source": source},
                        "tokens": 640,
                        "optimizer": {"lr": 1e-4},
                    },
                ],
            }
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(recipe: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jaxcl.cli", "run", str(recipe), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streamed")
    tokens = _corpus(tmp / "corpus.jsonl", 120)
    recipe = _recipe(tmp, tmp / "corpus.jsonl")
    proc = _run(recipe)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return tmp, recipe, tokens, json.loads((tmp / "run/results.json").read_text())


@pytest.mark.slow
def test_budgets_lr_and_tokens_are_what_the_plan_promised(finished):
    tmp, recipe, tokens, results = finished
    planned = {t["task"]: t for t in plan(load_recipe(recipe))["stages"][0]["task_budgets"]}
    lines = [json.loads(x) for x in (tmp / "run/metrics.jsonl").read_text().splitlines()]
    for task in ("domain", "more"):
        logged = [x for x in lines if x["task"] == task]
        assert len(logged) == planned[task]["steps"]
        assert all(x["lr"] == pytest.approx(planned[task]["lr"], rel=1e-6) for x in logged)
    assert planned["more"]["steps"] == -(-640 // (4 * 32)) and planned["more"]["lr"] == 1e-4
    # one epoch of concat rows: every token of the corpus plus one eos per document
    stage = results["stages"][0]
    assert stage["data"]["domain"]["tokens"] == tokens
    assert stage["data"]["domain"]["skipped"] == 0


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(finished, tmp_path):
    src, _, _, expected = finished
    recipe = _recipe(tmp_path, src / "corpus.jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxcl.cli", "run", str(recipe), "checkpoint_every=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints/cpt/4").exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert not (out / "results.json").exists(), "the run ended before the kill"
    resumed = _run(recipe, "checkpoint_every=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    results = json.loads((out / "results.json").read_text())
    want, got = expected["stages"][0], results["stages"][0]
    assert got["final_params_sha256"] == want["final_params_sha256"]
    assert got["R"] == want["R"] and got["data"] == want["data"]


@pytest.mark.slow
def test_a_bad_row_deep_in_the_file_stops_naming_it_or_is_skipped(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _corpus(corpus, 120, bad_line=100)
    # an epochs budget counts the documents' tokens before training: found then, nothing saved
    proc = _run(_recipe(tmp_path, corpus))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "task domain" in proc.stderr and "corpus.jsonl, line 100" in proc.stderr
    assert not (tmp_path / "run/checkpoints").exists()
    # a steps budget meets the row while training: the run stops there, its saves kept
    proc = _run(_recipe(tmp_path, corpus, budget={"steps": 80}), "checkpoint_every=2")
    assert proc.returncode == 2
    assert "corpus.jsonl, line 100" in proc.stderr and "Traceback" not in proc.stderr
    assert "last good checkpoint" in proc.stderr
    assert any((tmp_path / "run/checkpoints/cpt").iterdir())  # the saves before it are kept
    skipping = _recipe(tmp_path, corpus, on_bad_row="skip")
    proc = _run(skipping, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "run/results.json").read_text())["stages"][0]["data"]
    assert data["domain"]["skipped"] == 1 and "line 100" in data["domain"]["bad_rows"][0]
    report = write_report(tmp_path / "run").read_text()  # and the report lists it
    assert "| domain |" in report and "corpus.jsonl, line 100" in report
