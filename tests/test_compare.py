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
    """One table compares the base with a variant without replay; the variant reuses the CPT
    stage it shares with the base (hard links, no retraining) and ends bit-identical to the same
    recipe run on its own from scratch."""
    from jaxcl.recipe import load_recipe
    from jaxcl.train.runner import run_recipe

    out = tmp_path / "run"
    quick = ROOT / "recipes/quickstart.yaml"
    common = [*MICRO, "probes=false"]
    variants = "compare={seqft: {stages.1.methods: []}}"
    assert (
        load_recipe(quick, [*common, variants]).shared_stages(
            load_recipe(quick, [*common, "stages.1.methods=[]"])
        )
        == 1
    )
    assert main(["run", str(quick), f"out_dir={out}", *common, variants]) == 0
    rows = json.loads((out / "comparison.json").read_text())["variants"]
    assert [r["variant"] for r in rows] == ["base", "seqft"]
    assert rows[1]["shared_stages"] == ["cpt"]
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

    linked = [p for p in (out / "compare/seqft/checkpoints/cpt").rglob("*") if p.is_file()]
    assert linked
    for p in linked:
        twin = out / "checkpoints/cpt" / p.relative_to(out / "compare/seqft/checkpoints/cpt")
        assert p.stat().st_ino == twin.stat().st_ino  # a hard link: not retrained, not copied
    alone = run_recipe(
        load_recipe(quick, [*common, f"out_dir={tmp_path / 'alone'}", "stages.1.methods=[]"])
    )
    for a, b in zip(alone["stages"], seqft["stages"]):
        assert a["final_params_sha256"] == b["final_params_sha256"], a["name"]
        assert a["R"] == b["R"]
