"""scripts/bench_data.py: the streamed-data benchmark runs end to end at a tiny size, and its
parts (sizes, corpora, the table, the flatness check) agree with independent counts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_data.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_data"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


bd = _load()


def _table(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text`` as header -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}, lines[1]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]
    ]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("100MB", 10**8), ("1GB", 10**9), ("2.5mb", 2_500_000), ("4096", 4096), ("3KB", 3000)],
)
def test_sizes_are_decimal_units(text, expected):
    assert bd.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "1TB", "-1MB", "0.1B"])
def test_a_bad_size_names_itself(text):
    with pytest.raises(ValueError, match="--sizes"):
        bd.parse_sizes(text) if text == "" else bd.parse_size(text)


def test_the_corpus_has_the_size_and_lengths_asked_for(tmp_path):
    corpus = bd.write_corpus(tmp_path / "c.jsonl", 3_000_000, median_bytes=600, seed=1)
    lines = (tmp_path / "c.jsonl").read_bytes().splitlines()
    texts = [json.loads(line)["text"] for line in lines]  # every line is valid JSON
    assert corpus.documents == len(texts)
    assert corpus.bytes == (tmp_path / "c.jsonl").stat().st_size
    # it stops at the first line past the size: over by less than one (capped) document
    assert 3_000_000 <= corpus.bytes < 3_000_000 + 32 * 600 + 20
    lengths = np.array([len(t) for t in texts])
    assert abs(np.median(lengths) / 600 - 1) < 0.1
    assert lengths.std() / lengths.mean() > 0.4  # lengths vary (lognormal), not one length
    words = " ".join(texts[:200]).split()
    assert set("".join(words)) <= set("abcdefghijklmnopqrstuvwxyz")
    assert len(set(words)) > 200  # a vocabulary, not one repeated word


def test_the_same_seed_writes_the_same_corpus(tmp_path):
    a = bd.write_corpus(tmp_path / "a.jsonl", 200_000, 300, seed=3)
    b = bd.write_corpus(tmp_path / "b.jsonl", 200_000, 300, seed=3)
    c = bd.write_corpus(tmp_path / "c.jsonl", 200_000, 300, seed=4)
    assert a.path.read_bytes() == b.path.read_bytes() != c.path.read_bytes()


def test_the_bench_table_is_parsed_at_its_adamw_row():
    printed = (
        "jaxcl bench: preset tiny, batch 8x256, 1 x cpu (median of 3 steps)\n\n"
        "| step        | ms/step | tokens/s | first step s |\n"
        "|-------------|---------|----------|--------------|\n"
        "| jaxcl adamw | 390.6   | 5,244    | 3.8          |\n"
        "| + ewc       | 400.0   | 5,120    | 3.9          |\n"
    )
    assert bd.parse_bench(printed) == 5244.0
    with pytest.raises(ValueError, match="no adamw row"):
        bd.parse_bench("| + ewc | 1 | 2 |\n")


def _row(label: str, size: int, first: float, rss: float) -> object:
    corpus = bd.Corpus(Path("x"), size, 10, 100)
    run = bd.RunFigures(first, rss, 100.0, first + 1)
    return bd.Row("tiny", label, corpus, run, bd.PipelineFigures(5000.0, 4000.0, 3, 0.1, 0.1))


def test_flatness_compares_the_largest_corpus_with_the_smallest():
    rows = [_row("1GB", 10**9, 13.0, 1.0), _row("100MB", 10**8, 10.0, 1.1)]
    lines = bd.flatness(rows)
    assert lines[0] == "tiny: time to first step 1GB / 100MB = 1.30 (SCALES (> 1.20))"
    assert lines[1] == "tiny: peak RSS 1GB / 100MB = 0.91 (ok)"
    assert bd.headroom(rows[:1]) == ["tiny 1GB: pipeline / train tokens/s = 50.0x (ok)"]
    table = _table(bd.format_table(rows))
    assert [r["corpus size"] for r in table] == ["1GB", "100MB"]
    assert _number(table[0]["ratio"]) == 50.0


def test_a_preset_without_its_package_is_skipped_with_the_install_command(capsys):
    missing = bd.Preset({"source": "x"}, 4, "x", "X", needs="no_such_module_zz", install="pip x")
    assert not bd.available("x", missing)
    assert "no_such_module_zz module (pip x)" in capsys.readouterr().out
    assert bd.available("tiny", bd.PRESETS["tiny"])


def test_the_medians_of_repeated_runs():
    runs = [bd.RunFigures(a, b, c, d) for a, b, c, d in [(1, 5, 9, 3), (3, 4, 7, 2), (2, 6, 8, 1)]]
    assert bd.median_run(runs) == bd.RunFigures(2, 5, 8, 2)


@pytest.mark.slow
def test_the_script_runs_at_a_tiny_size_and_prints_positive_figures(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--sizes", "2MB", "--preset", "tiny", "--steps", "3"]
    cmd += ["--seq-len", "64", "--batch", "4", "--pipeline-seconds", "1", "--skip-bench-step"]
    cmd += ["--workdir", str(tmp_path), "--keep"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (row,) = _table(done.stdout)
    assert list(row) == list(bd.HEADER)
    assert (row["preset"], row["corpus size"]) == ("tiny", "2MB")
    corpus = tmp_path / "tiny-2MB" / "corpus.jsonl"  # kept: count its documents ourselves
    assert _number(row["documents"]) == len(corpus.read_bytes().splitlines())
    figures = {k: _number(row[k]) for k in bd.HEADER[3:]}
    assert all(v > 0 for v in figures.values()), figures
    ratio = figures["pipeline tokens/s"] / figures["train tokens/s"]
    assert figures["ratio"] == pytest.approx(ratio, rel=0.01, abs=0.1)
    # what the run logged is what the table shows: steps 2.. of metrics.jsonl
    metrics = tmp_path / "tiny-2MB" / "run" / "metrics.jsonl"
    speeds = [json.loads(line)["tokens_per_s"] for line in metrics.read_text().splitlines()]
    assert len(speeds) == 3
    assert figures["train tokens/s"] == pytest.approx(np.median(speeds[1:]), abs=1)
    assert 0.1 < figures["peak RSS (GiB)"] < 16
    assert "tiny 2MB: pipeline / train tokens/s" in done.stdout
