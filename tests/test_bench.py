"""``jaxcl bench`` runs every row in its own process, same batch and shape, fp32 and bf16 rows,
each with its own peak memory, and prints the ratios against plain AdamW and torch."""

import re

import pytest

from jaxcl.bench import Timing, bench, default_peak_flops, format_table
from jaxcl.cli import main


@pytest.mark.slow  # two processes importing jax / torch: 10-35 s on 2 shared cores
def test_jaxcl_and_torch_rows_run_in_their_own_processes():
    timings = bench("test-micro", batch_size=2, seq_len=16, compare_torch=True, warmup=1, steps=2)
    assert [t.name for t in timings] == ["jaxcl adamw", "transformers+torch adamw"]
    for t in timings:
        assert t.dtype == "fp32" and t.memory_kind == "peak RSS"
        assert t.step_seconds > 0 and t.tokens_per_s == pytest.approx(2 * 16 / t.step_seconds)
        assert 0.05 < t.peak_rss_gib < 8
    # two processes: each row's peak is its own (torch's process never imports jax)
    assert timings[0].peak_rss_gib != timings[1].peak_rss_gib


@pytest.mark.slow
def test_bf16_rows_with_a_method_and_mfu_against_a_stated_peak():
    timings = bench(
        "test-micro",
        batch_size=2,
        seq_len=16,
        methods=["ewc"],
        dtypes=("bf16",),
        warmup=1,
        steps=2,
        peak_flops=1e12,
    )
    assert [(t.name, t.dtype) for t in timings] == [
        ("jaxcl adamw", "bf16"),
        ("jaxcl adamw + ewc", "bf16"),
    ]
    assert all(t.mfu is not None and 0 < t.mfu < 1 for t in timings)


def test_the_table_gives_ratios_within_each_dtype_and_memory_on_request():
    def row(name, dtype, seconds, gib):
        return Timing(name, seconds, 1.0, 100 / seconds, gib, None, dtype)

    timings = [
        row("jaxcl adamw", "fp32", 1.0, 1.0),
        row("jaxcl adamw + ewc", "fp32", 1.25, 1.1),
        row("transformers+torch adamw", "fp32", 2.0, 1.5),
        row("jaxcl adamw", "bf16", 0.5, 0.9),
        row("transformers+torch adamw", "bf16", 0.25, 1.2),
    ]
    table = format_table(timings, "title", memory=True)
    lines = table.splitlines()
    assert len(lines) == len(timings) + 4  # title, blank, header, rule
    assert re.search(r"jaxcl adamw \+ ewc .*\| 0\.80x .*\| 1\.60x ", table)  # vs plain, vs torch
    assert re.search(r"jaxcl adamw +\| bf16 .*\| 0\.50x ", table)  # bf16 vs bf16 torch
    assert "1.50 (peak RSS)" in table
    assert "peak memory" not in format_table(timings, "title")


def test_default_peaks_are_known_for_accelerators_only():
    assert default_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert default_peak_flops("TPU v4") == 275e12
    assert default_peak_flops("cpu") is None


def test_bench_cli_rejects_an_unknown_method(capsys):
    assert main(["bench", "--preset", "test-micro", "--method", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_rows_run_in_groups_led_by_the_plain_row():
    """No more than MAX_ALIVE row processes at once, each group timing plain AdamW beside its
    other rows, every row in exactly one group."""
    from jaxcl import bench as B

    rows = [("plain", {})] + [(f"m{i}", {}) for i in range(7)]
    groups = B._groups(rows)
    assert all(len(g) <= B.MAX_ALIVE and g[0][0] == "plain" for g in groups)
    assert [r[0] for g in groups for r in g[1:]] == [f"m{i}" for i in range(7)]
    assert B._groups(rows[:1]) == [rows[:1]]
