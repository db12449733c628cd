"""Bad inputs are refused up front: exit code 2, one message naming the culprit, no traceback,
nothing outside the run folder touched and nothing inside it lost. The run folder is locked:
a second run into it is refused naming the holder, and a lock left by a killed run does not
block."""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxcl import checkpoint
from jaxcl.cli import main
from jaxcl.plan import ABSURD_STEPS, format_plan, given_steps, plan, step_warnings
from jaxcl.recipe import NAME_PATTERN, load_recipe
from jaxcl.train.lock import LOCK_NAME

ROOT = Path(__file__).parent.parent

# One pretraining stage of one task, two steps: the smallest run there is. Line numbers matter
# (the messages name them): `batch_size` is on line 11, `steps_per_task` on line 13.
MICRO = """\
name: micro
out_dir: __OUT__
model: {preset: test-micro}
probes: false
log_every: 1
optimizer: {lr: 1.0e-3, warmup_steps: 0, schedule: constant}
stages:
  - name: cpt
    kind: pretrain
    seq_len: 32
    batch_size: 4
    eval_batch_size: 8
    steps_per_task: 2
    tasks:
      - {name: recipes, data: {bundled: cpt/recipes, train_size: 16, eval_size: 8}}
"""


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's sha256, a folder, or a link's target."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _sandbox(tmp_path: Path, text: str = MICRO) -> tuple[Path, Path, Path]:
    """A recipe, its run folder (not created) and a user's folder beside it, with files in
    folders named like checkpoint steps (what a stage named by its path would delete)."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    for rel, content in [("10/keep.txt", "a"), ("15/notes.txt", "b"), ("data.txt", "c")]:
        (victim / rel).parent.mkdir(parents=True, exist_ok=True)
        (victim / rel).write_text(content)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("__OUT__", str(out)))
    return recipe, out, victim


def _previous_run(out: Path) -> None:
    """What an earlier run left in ``out`` (none of it may be lost)."""
    (out / "checkpoints/cpt/2/params").mkdir(parents=True)
    (out / "checkpoints/cpt/2/params/blob").write_bytes(b"weights")
    (out / "run.json").write_text(json.dumps({"recipe": "micro", "recipe_sha256": "x"}))
    (out / "metrics.jsonl").write_text('{"stage": "cpt", "step": 1}\n')
    (out / "manifest.json").write_text('{"checkpoints": []}')


def _cli(capfd, *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def _setup_file_out(out: Path) -> str:
    out.write_text("not a folder")
    return f"out_dir={out}"


def _setup_under_file(out: Path) -> str:
    out.write_text("a file")
    return f"out_dir={out / 'run'}"


def _setup_readonly(out: Path) -> str:
    out.mkdir()
    out.chmod(0o500)
    return f"out_dir={out}"


def _setup_previous(out: Path) -> str:
    _previous_run(out)
    return "--overwrite"


# (id, overrides ({victim} and {out} filled in), a change of the recipe's text, set-up of the
# run folder, what the message must say (regular expressions))
CASES = [
    (
        "stage-named-by-an-absolute-path",
        ["stages.0.name={victim}", "checkpoint_every=1"],
        None,
        None,
        [r"recipe\.yaml:8: stages\[0\]\.name: '[^']*victim' is not a usable name"],
    ),
    ("stage-name-with-a-slash", ["stages.0.name=a/b"], None, None, [r"stages\[0\]\.name: 'a/b'"]),
    ("stage-name-dot-dot", ["stages.0.name=.."], None, None, [r"stages\[0\]\.name: '\.\.'"]),
    ("stage-name-empty", ["stages.0.name=''"], None, None, [r"stages\[0\]\.name: '' is not"]),
    ("stage-name-hidden", ["stages.0.name=.cpt"], None, None, [r"stages\[0\]\.name: '\.cpt'"]),
    (
        "task-name-climbing-out",
        ["stages.0.tasks.0.name=../../victim"],
        None,
        None,
        [r"stages\[0\]\.tasks\[0\]\.name: '\.\./\.\./victim' is not a usable name"],
    ),
    ("run-name-with-a-slash", ["name=../victim"], None, None, [r"recipe\.yaml:1: name: '\.\./"]),
    (
        "variant-name-climbing-out",
        ["compare={../victim: {seed: 1}}"],
        None,
        None,
        [r"compare: '\.\./victim' is not a usable name"],
    ),
    (
        "bad-name-with-overwrite-of-a-previous-run",
        ["stages.0.name=.."],
        None,
        _setup_previous,
        [r"stages\[0\]\.name: '\.\.'"],
    ),
    (
        "duplicate-yaml-key",
        [],
        ("    steps_per_task: 2\n", "    steps_per_task: 2\n    batch_size: 8\n"),
        None,
        [
            r"recipe\.yaml:14: stages\[0\]\.batch_size: duplicate key 'batch_size' "
            r"\(first given on line 11\)"
        ],
    ),
    (
        "e-notation-integer-in-the-file",
        [],
        ("steps_per_task: 2", "steps_per_task: 1e12"),
        None,
        [r"recipe\.yaml:13: stages\[0\]\.steps_per_task: '1e12' is read as text", "1000000000000"],
    ),
    (
        "e-notation-integer-override",
        ["stages.0.batch_size=2e0"],
        None,
        None,
        [r"stages\[0\]\.batch_size: '2e0' is read as text.*write 2\b"],
    ),
    (
        "stage-optimizer-lr",
        ["stages.0.optimizer={lr: -1}"],
        None,
        None,
        [r"recipe\.yaml:8: stages\[0\]\.optimizer\.lr: Input should be greater than 0"],
    ),
    (
        "task-optimizer-lr",
        ["stages.0.tasks.0.optimizer={lr: fast}"],
        None,
        None,
        [r"stages\[0\]\.tasks\[0\]\.optimizer\.lr: Input should be a valid number"],
    ),
    ("out-dir-is-a-file", [], None, _setup_file_out, [r"out_dir \S*out is a file, not a folder"]),
    ("out-dir-under-a-file", [], None, _setup_under_file, [r"cannot create out_dir \S*out/run"]),
    pytest.param(
        "out-dir-not-writable",
        [],
        None,
        _setup_readonly,
        [r"out_dir \S*out is not writable"],
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere"),
        id="out-dir-not-writable",
    ),
]


@pytest.mark.parametrize(
    "case, overrides, edit, setup, culprits",
    CASES,
    ids=[c[0] if isinstance(c, tuple) else c.id for c in CASES],
)
def test_bad_input_exits_2_naming_the_culprit(
    tmp_path, capfd, monkeypatch, case, overrides, edit, setup, culprits
):
    text = MICRO if edit is None else MICRO.replace(*edit)
    recipe, out, victim = _sandbox(tmp_path, text)
    extra = [setup(out)] if setup else []
    monkeypatch.chdir(tmp_path)  # a relative path gone astray would land in the snapshot
    before = _snapshot(tmp_path)
    try:
        args = [o.replace("{victim}", str(victim)) for o in overrides]
        code, output = _cli(capfd, str(recipe), *args, *extra)
    finally:
        if out.is_dir():
            out.chmod(0o755)
    assert code == 2, output
    assert "Traceback" not in output
    for culprit in culprits:
        assert re.search(culprit, output), (culprit, output)
    assert _snapshot(tmp_path) == before  # nothing created, changed or lost, inside or out


def test_the_name_rule_keeps_every_shipped_recipe_valid():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())  # (some need data sets to validate whole)
        names = [raw["name"], *raw.get("compare", {})]
        for stage in raw["stages"]:
            names += [stage["name"], *(t["name"] for t in stage["tasks"])]
        assert all(NAME_PATTERN.fullmatch(str(n)) for n in names), (path, names)
    load_recipe(ROOT / "recipes/quickstart.yaml")
    for ok in ("cpt", "C-STANCE", "0809", "v1.2_x"):
        assert NAME_PATTERN.fullmatch(ok)


def test_an_absurd_budget_is_warned_about_in_the_plan(tmp_path, capfd):
    recipe, out, _ = _sandbox(tmp_path)
    steps = ["stages.0.steps_per_task=1000000000000"]
    p = plan(load_recipe(recipe, steps))
    assert p["warnings"] and "stage cpt trains 1,000,000,000,000 steps" in p["warnings"][0]
    assert f"{ABSURD_STEPS:,}" in format_plan(p)
    assert not plan(load_recipe(recipe))["warnings"]
    assert step_warnings(given_steps(load_recipe(recipe, steps))) == p["warnings"]  # the run's
    code, output = _cli(capfd, str(recipe), *steps, "--dry-run")
    assert code == 0 and "warning: stage cpt trains 1,000,000,000,000 steps" in output
    assert not out.exists()


# ----------------------------------------------------------------------------- deletions


def test_deletions_outside_the_run_folders_checkpoints_are_refused(tmp_path):
    _, out, victim = _sandbox(tmp_path)
    _previous_run(out)
    (out / "checkpoints/link").symlink_to(victim)
    (out / "results.json").write_text("{}")
    before = _snapshot(victim)
    for path in [victim, victim / "15", out / "checkpoints/../results.json", out, tmp_path]:
        with pytest.raises(checkpoint.UnsafeDeletion, match="refusing to delete"):
            checkpoint.remove_run_data(path, out)
    for stage_dir in [victim, out / "checkpoints/..", out / "checkpoints/cpt/.."]:
        with pytest.raises(checkpoint.UnsafeDeletion):
            checkpoint.delete_steps(stage_dir, [10, 15])
    with pytest.raises(checkpoint.UnsafeDeletion):  # explicit run folder: the same rule
        checkpoint.delete_steps(victim, [10, 15], run_dir=out)
    checkpoint.remove_run_data(out / "checkpoints/link", out)  # the link, not what it names
    assert _snapshot(victim) == before and not (out / "checkpoints/link").exists()
    checkpoint.remove_run_data(out / "checkpoints", out)
    checkpoint.remove_run_data(out / "manifest.json", out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "results.json", "run.json"]


def test_run_data_is_deleted_only_through_the_guard():
    """No module deletes files by itself: run data goes through checkpoint.guard_deletion."""
    deleting = re.compile(r"rmtree\(|\.unlink\(|os\.remove\(|\.rmdir\(|(?<!np)\.delete\(")
    # data/prepare.py replaces its own prepared shards beside the data, never run data;
    # merging.py replaces only an earlier merge's own output folder (one with jaxcl_merge.json)
    allowed = {"jaxcl/checkpoint.py", "jaxcl/data/prepare.py", "jaxcl/merging.py"}
    found = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "jaxcl").rglob("*.py")
        if deleting.search(path.read_text())
    }
    assert found <= allowed, found - allowed


# ----------------------------------------------------------------------------- the lock

HOLDER = """\
import sys, time
from pathlib import Path
from jaxcl.train.lock import hold
folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
with hold(folder):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite"])
def test_a_held_run_folder_refuses_a_second_run_naming_the_holder(
    tmp_path, capfd, monkeypatch, overwrite
):
    recipe, out, _ = _sandbox(tmp_path)
    _previous_run(out)
    holder = _holder(out)
    try:
        monkeypatch.chdir(tmp_path)
        before = _snapshot(tmp_path)
        code, output = _cli(capfd, str(recipe), *(["--overwrite"] if overwrite else []))
        assert code == 2, output
        assert "Traceback" not in output
        assert f"pid {holder.pid} on host {socket.gethostname()}" in output
        assert "in use by another jaxcl run" in output
        assert _snapshot(tmp_path) == before  # --overwrite deleted nothing either
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path, capfd):
    recipe, out, victim = _sandbox(tmp_path)
    holder = _holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
    before = _snapshot(victim)
    code, output = _cli(capfd, str(recipe))
    assert code == 0, output
    assert (out / "results.json").exists() and (out / "report.md").exists()
    assert (out / LOCK_NAME).read_text() == ""  # released, and says so
    assert _snapshot(victim) == before


def test_the_lock_is_reentrant_and_only_the_primary_takes_it(tmp_path, monkeypatch):
    from jaxcl.train import runner

    out = tmp_path / "out"
    with runner.claim_run_dir(out), runner.claim_run_dir(out):  # a sweep, then its base run
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    holder = _holder(out)  # released: another process takes it
    try:
        with pytest.raises(runner.RunDirError, match=f"pid {holder.pid}"):
            with runner.claim_run_dir(out):
                pass
        monkeypatch.setattr(runner.parallel, "is_primary", lambda: False)
        with runner.claim_run_dir(out):  # another process of a multi-process run: not refused
            pass
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_runs_started_together_one_runs_the_other_is_refused(tmp_path):
    recipe, out, _ = _sandbox(tmp_path)
    cmd = [sys.executable, "-m", "jaxcl.cli", "run", str(recipe), "checkpoint_every=1"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert "in use by another jaxcl run" in refused and "Traceback" not in refused
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 2  # log_every 1, two steps: no line twice
    leftovers = [p for p in (out / "checkpoints").rglob("*") if "tmp" in p.name]
    assert not leftovers


def test_a_held_folder_refuses_every_process_of_a_multi_process_run(tmp_path):
    """The primary alone takes the lock; when it cannot, every process exits 2 (none waits at
    a barrier for a primary that is not coming)."""
    recipe, out, _ = _sandbox(tmp_path)
    holder = _holder(out)
    try:
        before = _snapshot(tmp_path)
        with socket.socket() as sock:
            sock.bind(("localhost", 0))
            port = sock.getsockname()[1]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "jaxcl.cli", "run", str(recipe), "mesh.data=2"]
                + ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
                + ["--process-id", str(i)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for i in range(2)
        ]
        results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
        assert [code for code, _ in results] == [2, 2], results
        assert f"pid {holder.pid} on host {socket.gethostname()}" in results[0][1]
        assert "the primary process could not claim" in results[1][1]
        assert all("Traceback" not in err for _, err in results)
        assert _snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_without_flock_the_lock_file_alone_decides(tmp_path, monkeypatch):
    """On a file system without flock, a lock file naming a live process refuses the run, one
    naming a dead process is taken over."""
    import errno

    from jaxcl.train import lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    for pid, refused in [(os.getppid(), True), (int(dead.stdout), False)]:
        holder = {"host": socket.gethostname(), "pid": pid, "started": "then"}
        (out / LOCK_NAME).write_text(json.dumps(holder))
        if refused:
            with pytest.raises(lock.FolderLocked, match=f"pid {pid} .*delete"):
                with lock.hold(out):
                    pass
        else:
            with lock.hold(out):
                assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
