"""scripts/device_check.sh: its CPU fallback at a tiny shape prints the one table with every row
measured; the per-row child process (the accelerator path) hands its row back as JSON."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcl import devcheck
from jaxcl.devcheck import LABELS, Row, format_table, peak_bf16

ROOT = Path(__file__).parent.parent


def test_peak_flops_by_device_kind():
    assert peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16("TPU v5 lite") == 197e12
    assert peak_bf16("TPU v5p") == 459e12
    assert peak_bf16("cpu") is None


def test_table_ratios_and_failed_rows():
    rows = [
        Row(LABELS["plain"], "cudnn", 100.0, 80_000.0, 0.42, 40.0, 30.0, memory_kind="device"),
        Row(LABELS["ewc"], "cudnn", 120.0, 66_000.0, 0.35, 60.0, 31.0, memory_kind="device"),
        Row(LABELS["agem"], compare="failed: XlaRuntimeError: RESOURCE_EXHAUSTED"),
        Row(LABELS["torch"], "torch sdpa", 150.0, 53_000.0, 0.28, 50.0, 5.0, memory_kind="device"),
    ]
    table = format_table(rows, "title")
    lines = table.splitlines()
    assert lines[0] == "title" and len(lines) == 2 + 2 + len(rows)
    assert "1.00× (baseline)" in lines[4] and "42.0%" in lines[4] and "40.00 (device)" in lines[4]
    assert "1.20× the plain step" in lines[5]
    assert "failed: XlaRuntimeError" in lines[6]
    assert "jaxcl 1.50× torch's tokens/s" in lines[7]
    assert all(line.count("|") == len(devcheck.HEADER) + 1 for line in lines[2:])


@pytest.mark.slow
def test_tiny_fallback_prints_the_whole_table():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "scripts/device_check.sh", "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(devcheck.ROWS), proc.stdout
    body = "\n".join(lines[2:])
    assert "failed" not in body and "skipped" not in body, proc.stdout
    for label in ("jaxcl adamw", "+ ewc", "+ agem", "transformers+torch", "attention splash"):
        assert label in body
    assert "× the plain step" in body and "× torch's tokens/s" in body
    gap = float(body.split("max abs diff: out ")[1].split()[0])
    assert gap < 0.05  # bf16 inputs: the kernels agree to bf16 rounding


@pytest.mark.slow
def test_a_row_comes_back_from_its_own_process():
    """The accelerator path: each row in a child process, returned as JSON."""
    row = devcheck._row_in_subprocess("attention", dict(devcheck.TINY), None, timeout=240)
    assert row.row.startswith("attention splash"), row
    assert "max abs diff" in row.compare, row
