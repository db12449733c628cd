"""The command line: help, the catalog, and exit codes scripts can trust."""

import subprocess
import sys
from pathlib import Path

import pytest

from jaxcl.cli import main
from jaxcl.methods import CATALOG

ROOT = Path(__file__).parent.parent


def test_methods_lists_the_catalog(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in CATALOG:
        assert name in out
    from jaxcl.methods.specs import method_names

    assert list(CATALOG) == method_names()  # one line per recipe method, none missing


@pytest.mark.parametrize(
    "command", ["run", "eval", "methods", "report", "bench", "convert", "merge"]
)
def test_every_subcommand_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_bad_recipe_exits_2_with_a_message_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxcl.cli",
            "run",
            str(ROOT / "recipes/quickstart.yaml"),
            "stages.0.methods.0.name=nope",
            f"out_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "stages[0].methods[0].name: unknown method nope" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_report_of_a_missing_run_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json" in capsys.readouterr().err


def test_another_recipes_run_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "run.json").write_text('{"recipe_sha256": "something else"}')
    code = main(["run", str(ROOT / "recipes/quickstart.yaml"), f"out_dir={tmp_path}"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "checkpoints").exists()


def test_output_piped_into_a_reader_that_stops_early_is_no_error():
    """``jaxcl methods | head -1``: the reader closes the pipe after one line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxcl.cli", "methods"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    first = proc.stdout.read(64)
    proc.stdout.close()  # the reader leaves; the catalog is longer than the pipe buffer wants
    assert proc.wait(timeout=120) == 0
    stderr = proc.stderr.read().decode()
    assert first and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
