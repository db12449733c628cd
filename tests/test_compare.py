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


@pytest.mark.slow
def test_a_variant_reuses_the_stages_it_shares_with_the_base(tmp_path):
    """Only the CIT stage differs: the variant links the base's CPT checkpoints instead of
    retraining, and ends bit-identical to the same recipe run on its own from scratch."""
    from jaxcl.compare import run_with_variants
    from jaxcl.recipe import load_recipe
    from jaxcl.train.runner import run_recipe

    quick = ROOT / "recipes/quickstart.yaml"
    common = [*MICRO, "probes=false"]
    recipe = load_recipe(
        quick, [*common, f"out_dir={tmp_path / 'run'}", "compare={plain: {stages.1.methods: []}}"]
    )
    variant = recipe.variant("plain")
    assert recipe.shared_stages(variant) == 1
    rows = run_with_variants(recipe)
    assert rows[1]["shared_stages"] == ["cpt"]
    base_cpt = tmp_path / "run/checkpoints/cpt"
    linked = [p for p in (tmp_path / "run/compare/plain/checkpoints/cpt").rglob("*") if p.is_file()]
    assert linked
    for p in linked:
        twin = base_cpt / p.relative_to(tmp_path / "run/compare/plain/checkpoints/cpt")
        assert p.stat().st_ino == twin.stat().st_ino  # a hard link: not retrained, not copied
    alone = run_recipe(
        load_recipe(quick, [*common, f"out_dir={tmp_path / 'alone'}", "stages.1.methods=[]"])
    )
    shared = json.loads((tmp_path / "run/compare/plain/results.json").read_text())
    for a, b in zip(alone["stages"], shared["stages"]):
        assert a["final_params_sha256"] == b["final_params_sha256"], a["name"]
        assert a["R"] == b["R"]
