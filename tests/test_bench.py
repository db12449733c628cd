"""``jaxcl bench`` measures every variant in one process and prints the ratios."""

import re

import pytest

from jaxcl.bench import bench, format_table
from jaxcl.cli import main


def test_bench_times_methods_and_torch_side_by_side():
    timings = bench(
        "test-micro",
        batch_size=4,
        seq_len=32,
        methods=["ewc", "agem"],
        compare_torch=True,
        warmup=1,
        steps=2,
    )
    names = [t.name for t in timings]
    assert names == [
        "jaxcl adamw",
        "jaxcl adamw + ewc",
        "jaxcl adamw + agem",
        "transformers+torch adamw",
    ]
    for t in timings:
        assert t.step_seconds > 0 and t.tokens_per_s == pytest.approx(4 * 32 / t.step_seconds)
    table = format_table(timings, "title")
    assert table.count("\n") == len(timings) + 3
    assert len(re.findall(r"\d+\.\d\dx\s+\|", table)) == len(timings) - 1  # ratios vs plain


def test_bench_cli_rejects_an_unknown_method(capsys):
    assert main(["bench", "--preset", "test-micro", "--method", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
