"""Published R matrices (issue 18): TRACE's own tables reproduce its printed OP and BWT with
jaxcl's ``bwt`` (GEM's T−1 denominator), and ``jaxcl report --published`` sets a run's R beside
a published one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcl.cli import main
from jaxcl.data.layouts import TRACE_ORDER
from jaxcl.eval import cl_metrics
from jaxcl.eval.published import PublishedError, load_published

ROOT = Path(__file__).parent.parent
FIXTURE = ROOT / "tests/fixtures/trace_published.yaml"
TRACE_TASKS = list(TRACE_ORDER)  # the paper's order, as the fixture's tables list it

# Worked by hand from the paper's tables (final column, diagonal), independent of cl_metrics:
# OP = sum(final) / 8; BWT = (sum(final[:7]) - sum(diag[:7])) / 7.
BY_HAND = {
    8: {  # SeqFT
        "op": (0.454 + 0.609 + 0.457 + 0.512 + 0.637 + 0.272 + 0.548 + 0.408) / 8,  # 0.487125
        "bwt": (
            (0.454 + 0.609 + 0.457 + 0.512 + 0.637 + 0.272 + 0.548)
            - (0.5 + 0.735 + 0.523 + 0.58 + 0.764 + 0.383 + 0.582)
        )
        / 7,  # -0.578 / 7 = -0.082571
    },
    13: {  # LoRA adapters
        "op": (0.277 + 0.24 + 0.121 + 0.004 + 0 + 0 + 0 + 0.37) / 8,  # 0.1265
        "bwt": (
            (0.277 + 0.24 + 0.121 + 0.004 + 0 + 0 + 0)
            - (0.511 + 0.713 + 0.51 + 0.578 + 0.68 + 0.37 + 0.486)
        )
        / 7,  # -3.206 / 7 = -0.458
    },
    18: {  # replay
        "op": (0.5 + 0.8 + 0.51 + 0.55 + 0.785 + 0.37 + 0.52 + 0.406) / 8,  # 0.555125
        "bwt": (
            (0.5 + 0.8 + 0.51 + 0.55 + 0.785 + 0.37 + 0.52)
            - (0.471 + 0.734 + 0.499 + 0.543 + 0.763 + 0.358 + 0.486)
        )
        / 7,  # 0.181 / 7 = 0.025857
    },
}


def trace_tables():
    return {t.source["table"]: t for t in load_published(FIXTURE)}


def test_the_fixture_holds_traces_three_llama_2_7b_chat_tables():
    tables = trace_tables()
    assert sorted(tables) == [8, 13, 18]
    for number, table in tables.items():
        assert table.source["arxiv"].startswith("2310.06762")
        assert table.source["model"] == "LLaMA-2-7B-Chat"
        assert table.source["caption"].startswith(f"Table {number}:")
        assert table.tasks == TRACE_TASKS
        assert len(table.R) == 8 and all(len(row) == 8 for row in table.R)
        # the paper prints "-" exactly where a task is not trained yet
        assert all(
            (v is None) == (i > t) for t, row in enumerate(table.R) for i, v in enumerate(row)
        )
        assert table.digits == 3 and set(table.printed) == {"op", "bwt"}
        # the appendix table's numbers are Table 1's, in percent: "48.7(-8.3%)"
        op, bwt = table.printed["op"] * 100, table.printed["bwt"] * 100
        assert f"{op:.1f}({bwt:+.1f}%)".replace("+", "") in table.source["main_table"]


@pytest.mark.parametrize("number", [8, 13, 18])
def test_trace_tables_reproduce_the_printed_op_and_bwt(number):
    """OP and BWT recomputed from the printed cells equal the printed OP and BWT to within what
    printing 3 decimals allows: each cell is off by at most h = 0.0005 from the value the
    authors averaged, so OP (a mean of 8 cells) by h and BWT (14 cells over 7) by 2h, and the
    printed metric itself by h."""
    table = trace_tables()[number]
    h = 0.5 * 10**-table.digits
    m = table.metrics()
    assert m["op"] == pytest.approx(BY_HAND[number]["op"], abs=1e-12)
    assert m["bwt"] == pytest.approx(BY_HAND[number]["bwt"], abs=1e-12)
    assert abs(m["op"] - table.printed["op"]) <= 2 * h + 1e-12
    assert abs(m["bwt"] - table.printed["bwt"]) <= 3 * h + 1e-12
    # TRACE's printed BWT is not the sum over T tasks divided by T (jaxcl's bwt_trace)
    assert abs(m["bwt_trace"] - table.printed["bwt"]) > 3 * h
    assert m["bwt_trace"] == pytest.approx(m["bwt"] * 7 / 8)


@pytest.mark.parametrize("number", [8, 18])
def test_tables_8_and_18_round_to_the_printed_digits(number):
    table = trace_tables()[number]
    m = table.metrics()
    assert round(m["op"], 3) == table.printed["op"]
    assert round(m["bwt"], 3) == table.printed["bwt"]


def test_table_13_is_one_in_the_last_digit_off():
    """OP 0.1265 prints 0.127 (half up), but the recomputed BWT -0.458 is printed -0.457 (and
    -45.7% in Table 1): the authors averaged unrounded scores."""
    m = trace_tables()[13].metrics()
    assert m["op"] == pytest.approx(0.1265) and m["bwt"] == pytest.approx(-0.458)


def test_unscored_cells_above_the_diagonal_by_hand():
    R = [[0.8, None, None], [0.6, 0.9, None], [0.5, 0.7, 0.95]]
    m = cl_metrics(R, baseline=[0.1, 0.1, 0.1])
    assert m["op"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert m["bwt_trace"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9) + 0) / 3)
    # task 0: max(0.8, 0.6) - 0.5; task 1: max over the scored cells (0.9) - 0.7
    assert m["forgetting"] == pytest.approx((0.3 + 0.2) / 2)
    assert m["fwt"] is None  # R[0][1], R[1][2] were not scored
    with pytest.raises(ValueError, match=r"R\[1\]\[0\] is missing"):
        cl_metrics([[0.8, None], [None, 0.9]])


# --- jaxcl report --published -----------------------------------------------------------------


def write_run(run_dir: Path, tasks, R, name="cit"):
    """A finished run's results.json, written by hand: write_report needs nothing else."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stage = {
        "name": name,
        "kind": "instruct",
        "metric": "exact_match",
        "task_metrics": ["exact_match"] * len(tasks),
        "tasks": list(tasks),
        "R": R,
        "baseline": [0.0] * len(tasks),
        "metrics": cl_metrics(R, [0.0] * len(tasks)),
        "metrics_scale": "linear",
        "losses": [{"step": k + 1, "loss": 1.0 / (k + 1), "task": t} for k, t in enumerate(tasks)],
        "seconds": 1.0,
    }
    results = {"recipe": "hand", "recipe_sha256": "0" * 64, "stages": [stage], "seconds": 1.0}
    (run_dir / "results.json").write_text(json.dumps(results))
    return stage


SMALL_TASKS = ["a", "b", "c"]
SMALL_RUN = [[0.8, 0.1, 0.0], [0.6, 0.9, 0.2], [0.5, 0.7, 0.95]]
SMALL_PUBLISHED = {
    "name": "paper-x",
    "source": {"paper": "A paper", "table": 2},
    "tasks": SMALL_TASKS,
    "R": [[0.7, None, None], [0.6, 0.8, None], [0.4, 0.6, 0.9]],
    "printed": {"op": 0.633, "bwt": -0.25},
}


def test_report_sets_the_run_beside_a_published_matrix(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, SMALL_TASKS, SMALL_RUN)
    published = tmp_path / "paper.json"
    published.write_text(json.dumps(SMALL_PUBLISHED))
    assert main(["report", str(run), "--published", str(published)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(run / "report.md")
    report = (run / "report.md").read_text()
    for text in (out, report):
        assert "Published against measured: `paper-x`" in text
        assert "paper: A paper; table: 2" in text
        # cell by cell: run / published (run - published), "–" where the paper has no score
        assert "| a | 0.800 / 0.700 (+0.100) | 0.100 / – | 0.000 / – |" in text
        assert (
            "| c | 0.500 / 0.400 (+0.100) | 0.700 / 0.600 (+0.100) | 0.950 / 0.900 (+0.050) |"
            in text
        )
        # OP and BWT of both, worked by hand
        run_op, run_bwt = (0.5 + 0.7 + 0.95) / 3, ((0.5 - 0.8) + (0.7 - 0.9)) / 2
        pub_op, pub_bwt = (0.4 + 0.6 + 0.9) / 3, ((0.4 - 0.7) + (0.6 - 0.8)) / 2
        assert f"| this run | {run_op:.3f} | {run_bwt:.3f} |" in text
        assert f"| published, from its R | {pub_op:.3f} | {pub_bwt:.3f} |" in text
        assert "| published, as printed | 0.633 | -0.250 |" in text
        assert f"| run − published | {run_op - pub_op:+.3f} | {run_bwt - pub_bwt:+.3f} |" in text


def test_report_of_a_trace_run_against_the_trace_fixture(tmp_path, capsys):
    run = tmp_path / "trace"
    seqft = trace_tables()[8]
    # a run that scores every task after every task, equal to Table 8 where the paper scored
    R = [[0.1 if v is None else v for v in row] for row in seqft.R]
    write_run(run, TRACE_TASKS, R, name="trace")
    assert main(["report", str(run), "--published", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    for name in ("seqft", "loraseqft", "replay"):
        assert f"Published against measured: `trace-llama-2-7b-chat-{name}`" in out
    assert "table: 8" in out and "table: 13" in out and "table: 18" in out
    assert "| 20Minuten | 0.454 / 0.454 (+0.000) | 0.609 / 0.609 (+0.000) |" in out
    assert "| this run | 0.487 | -0.083 |" in out
    assert "| published, from its R | 0.487 | -0.083 |" in out
    assert "| published, from its R | 0.127 | -0.458 |" in out  # Table 13
    assert "| published, as printed | 0.127 | -0.457 |" in out
    assert "| run − published | +0.000 | +0.000 |" in out
    assert out.count("## Published against measured") == 3
    assert (run / "report.md").read_text().count("## Published against measured") == 3


def bad(tmp_path, **changes):
    table = {**SMALL_PUBLISHED, **changes}
    table = {k: v for k, v in table.items() if v is not ...}
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(table))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": ["a", "b", "x"]}, "match no stage"),
        ({"tasks": ["b", "a", "c"]}, "match no stage"),
        ({"stage": "cit", "tasks": ["a", "c", "b"]}, "do not match the run's"),
        ({"stage": "cpt"}, "no stage 'cpt'"),
        ({"R": [[0.7, None, None], [0.6, 0.8, None]]}, "R must be 3×3"),
        ({"R": [[0.7, None], [0.6, 0.8], [0.4, 0.6]]}, "R must be 3×3: row 0 has 2 cells"),
        ({"R": [[0.7, None, None], [None, 0.8, None], [0.4, 0.6, 0.9]]}, "R[1][0] is null"),
        ({"R": [[0.7, None, None], [0.6, "x", None], [0.4, 0.6, 0.9]]}, "not a number"),
        ({"source": ...}, "missing ['source']"),
        ({"rows": []}, "unknown keys ['rows']"),
    ],
)
def test_bad_published_files_exit_2_naming_the_file(tmp_path, capsys, changes, message):
    run = tmp_path / "run"
    write_run(run, SMALL_TASKS, SMALL_RUN)
    path = bad(tmp_path, **changes)
    assert main(["report", str(run), "--published", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxcl report: {path}:") and message in err, err
    assert not (run / "report.md").exists()  # nothing written before every file is checked


def test_unreadable_published_files_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, SMALL_TASKS, SMALL_RUN)
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [a, b\n")
    for path, message in ((broken, "not valid YAML"), (tmp_path / "none.yaml", "cannot read")):
        assert main(["report", str(run), "--published", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: {message}" in err
    with pytest.raises(PublishedError, match="expected a mapping"):
        (tmp_path / "list.yaml").write_text("[1, 2]\n")
        load_published(tmp_path / "list.yaml")


def test_a_bad_published_file_gives_no_traceback(tmp_path):
    run = tmp_path / "run"
    write_run(run, SMALL_TASKS, SMALL_RUN)
    path = bad(tmp_path, tasks=["x", "y", "z"])
    proc = subprocess.run(
        [sys.executable, "-m", "jaxcl.cli", "report", str(run), "--published", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr
