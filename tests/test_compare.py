"""``compare:`` sweeps: every variant runs, one table compares them, the report shows it."""

import json
from pathlib import Path

import pytest

from jaxcl.checkpoint import read_manifest
from jaxcl.cli import main
from tests.test_resume import MICRO

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_a_sweep_of_replay_against_plain_fine_tuning(tmp_path, capsys):
    out = tmp_path / "run"
    variants = "compare={seqft: {stages.0.methods: [], stages.1.methods: []}}"
    code = main(
        [
            "run",
            str(ROOT / "recipes/quickstart.yaml"),
            f"out_dir={out}",
            *MICRO,
            "probes=false",
            variants,
        ]
    )
    assert code == 0
    rows = json.loads((out / "comparison.json").read_text())["variants"]
    assert [r["variant"] for r in rows] == ["base", "seqft"]
    base = json.loads((out / "results.json").read_text())
    seqft = json.loads((out / "compare/seqft/results.json").read_text())
    for row, results in zip(rows, (base, seqft)):
        assert row["stages"]["cit"]["bwt"] == results["stages"][1]["metrics"]["bwt"]
    # The variant really dropped the methods: its CIT checkpoints hold no replay buffer.
    assert read_manifest(Path(base["stages"][1]["checkpoint"]))["replay"] is not None
    assert read_manifest(Path(seqft["stages"][1]["checkpoint"]))["replay"] is None
    assert "comparison of variants" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "## Comparison of variants" in report and (out / "comparison.png").exists()
