"""End to end: the quickstart recipe through all three stages, as the README runs it."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxcl import checkpoint
from jaxcl.data import encode_all, eval_batches
from jaxcl.data.benchmarks import generate, kind_of
from jaxcl.eval import make_batch_scorer, score_task
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.recipe import load_recipe
from jaxcl.train.step import make_apply

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def _scalar_tags(path: Path) -> set[str]:
    """Scalar tags in a TFRecord file of TensorBoard ``Event`` protos."""
    from tensorboardX.proto import event_pb2

    data, tags, offset = path.read_bytes(), set(), 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        tags.update(v.tag for v in event.summary.value)
        offset += 12 + length + 4
    return tags


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxcl.cli",
            "run",
            str(ROOT / "recipes/quickstart.yaml"),
            f"out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_run_folder_holds_results_checkpoints_and_manifest(quickstart):
    out, results, stdout = quickstart
    assert [s["name"] for s in results["stages"]] == ["cpt", "cit", "align"]
    for stage in results["stages"]:
        steps = sorted(int(p.name) for p in (out / "checkpoints" / stage["name"]).iterdir())
        assert len(steps) == len(stage["tasks"])  # one checkpoint per task, the last = stage end
        assert set(stage["metrics"]) == {"op", "bwt", "bwt_trace", "fwt", "forgetting"}
        assert len(stage["R"]) == len(stage["tasks"]) and stage["losses"]
    manifest = json.loads((out / "manifest.json").read_text())["checkpoints"]
    assert len(manifest) == sum(len(s["tasks"]) for s in results["stages"])
    assert manifest[0]["parent"] is None
    for prev, cur in zip(manifest, manifest[1:]):
        assert cur["parent"] == prev["path"]  # lineage chains tasks and stages
        assert cur["recipe_sha256"] == results["recipe_sha256"]
    assert checkpoint.read_manifest(Path(manifest[-1]["path"]))["stage"] == "align"
    report = (out / "report.md").read_text()
    for image in [f"r_{s['name']}.png" for s in results["stages"]] + ["losses.png"]:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image in report
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) > 10 and all(e["tokens_per_s"] > 0 and "grad_norm" in e for e in logged)
    assert "stage cit" in stdout and "bwt" in stdout
    # TensorBoard event files beside metrics.jsonl, with the logged scalars.
    (events,) = (out / "tensorboard" / "cit").glob("events.out.tfevents.*")
    tags = _scalar_tags(events)
    assert {"cit/loss", "cit/grad_norm", "cit/tokens_per_s"} <= tags


def test_cit_learns_and_cpt_reports_per_domain_perplexity(quickstart):
    _, results, _ = quickstart
    cpt, cit, align = results["stages"]
    assert cpt["metric"] == "perplexity"
    # Each domain's perplexity falls far below its starting value once trained on ...
    for i in range(2):
        assert cpt["R"][i][i] < 0.05 * cpt["baseline"][i]
    # ... and the first domain is forgotten (perplexity rises) after training on the second.
    assert cpt["R"][1][0] > 2 * cpt["R"][0][0]
    assert cit["metric"] == "exact_match"
    for i in range(3):
        assert cit["R"][i][i] >= cit["baseline"][i] + 0.5
    # DPO starts at ln 2 (the policy is its reference) and learns the preferences
    assert align["R"][0][0] >= align["baseline"][0]
    assert align["losses"][-1]["loss"] < 0.5 * np.log(2)


def test_each_stage_starts_from_the_previous_stage_checkpoint(quickstart):
    """Stage k's baseline row is recomputed from stage k-1's final checkpoint, bit for bit."""
    out, results, _ = quickstart
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", [f"out_dir={out}"])
    graphdef, init_params, _, _ = recipe.model.build(recipe.seed)
    scorer = make_batch_scorer(make_apply(graphdef))
    for prev, stage_spec, stage in zip(results["stages"], recipe.stages[1:], results["stages"][1:]):
        ckpt = Path(prev["checkpoint"])
        params = checkpoint.restore_params(ckpt.parent, init_params, int(ckpt.name))
        digest = checkpoint.params_digest(params)
        assert digest == prev["final_params_sha256"] == stage["start_params_sha256"]
        assert digest != checkpoint.params_digest(init_params)
        scores = []
        for task in stage_spec.tasks:
            examples = generate(task.data.bundled, "eval", task.data.eval_size)
            kind = kind_of(task.data.bundled)
            enc = encode_all(examples, kind, ByteTokenizer(), stage_spec.seq_len)
            batches = eval_batches(enc, stage_spec.eval_batch_size)
            scores.append(score_task(scorer, params, batches, stage_spec.metric))
        assert scores == stage["baseline"]


def test_eval_scores_a_checkpoint_like_the_run_did(quickstart, tmp_path):
    from jaxcl.cli import main

    out, results, _ = quickstart
    for stage in results["stages"][:2]:
        scores = tmp_path / f"{stage['name']}.json"
        code = main(
            [
                "eval",
                stage["checkpoint"],
                str(ROOT / "recipes/quickstart.yaml"),
                f"out_dir={out}",
                "--json",
                str(scores),
            ]
        )
        assert code == 0
        got = json.loads(scores.read_text())["stages"][stage["name"]]["scores"]
        assert [got[t] for t in stage["tasks"]] == stage["R"][-1]
    assert main(["eval", str(tmp_path), str(ROOT / "recipes/quickstart.yaml")]) == 2


@pytest.mark.slow
def test_the_quickstart_compares_replay_with_plain_fine_tuning(quickstart):
    """The quickstart's `compare:` reruns every stage with plain fine-tuning: EWC's forgetting of
    the first domain (nats of log-perplexity) is far below plain fine-tuning's, and replay's BWT
    on the instruction stage is the higher."""
    out, results, stdout = quickstart
    rows = {r["variant"]: r for r in json.loads((out / "comparison.json").read_text())["variants"]}
    assert set(rows) == {"base", "plain"}
    ewc, plain_cpt = rows["base"]["stages"]["cpt"], rows["plain"]["stages"]["cpt"]
    variant = json.loads((out / "compare/plain/results.json").read_text())
    r_ewc, r_plain = np.log(results["stages"][0]["R"]), np.log(variant["stages"][0]["R"])
    # forgetting is the rise of the first domain's log-perplexity, in nats
    assert ewc["forgetting"] == pytest.approx(r_ewc[1][0] - r_ewc[0][0])
    assert plain_cpt["forgetting"] == pytest.approx(r_plain[1][0] - r_plain[0][0])
    print(
        f"\nCPT forgetting (nats): EWC {ewc['forgetting']:.3f}, plain {plain_cpt['forgetting']:.3f}"
    )
    assert ewc["forgetting"] < 0.5 * plain_cpt["forgetting"]
    assert r_ewc[1][1] < r_ewc[0][1] - 1.0  # ... and the second domain was still learned
    replay, plain = rows["base"]["stages"]["cit"]["bwt"], rows["plain"]["stages"]["cit"]["bwt"]
    print(f"CIT BWT: replay {replay:.3f}, plain fine-tuning {plain:.3f}")
    assert replay > plain
    assert rows["plain"]["shared_stages"] == []  # its cpt differs: nothing to reuse
    assert "nats" in (out / "report.md").read_text()
    assert "comparison of variants" in stdout
    assert "## Comparison of variants" in (out / "report.md").read_text()
