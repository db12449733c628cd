"""Two processes on localhost (jax.distributed, gloo CPU collectives), each reading only its
block of every batch, end with the same parameters as one process with two devices at the same
global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_resume import MICRO

ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(out, *extra):
    return [
        sys.executable,
        "-m",
        "jaxcl.cli",
        "run",
        str(ROOT / "recipes/quickstart.yaml"),
        f"out_dir={out}",
        "mesh.data=2",
        *MICRO,
        "probes=false",  # the same collectives run without them; saves still happen per task
        # rows independent of the process count (concat packs each process's documents apart)
        "stages.0.packing=none",
        *extra,
    ]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    single = subprocess.run(
        _cmd(tmp_path / "one"),
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
    )
    assert single.returncode == 0, single.stderr[-2000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(
                tmp_path / "two",
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    one = json.loads((tmp_path / "one/results.json").read_text())
    two = json.loads((tmp_path / "two/results.json").read_text())
    for a, b in zip(one["stages"], two["stages"]):
        assert a["final_params_sha256"] == b["final_params_sha256"]
        assert a["R"] == b["R"]
    # Only the primary process reports.
    assert "results:" in outputs[0][0] and "results:" not in outputs[1][0]
