"""Run a script in a fresh Python whose JAX sees ``devices`` fake CPU devices (XLA_FLAGS must be
set before jax is imported, hence the subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run_on_fake_devices(script: str, *args: str, devices: int = 8) -> str:
    """``python -c script *args`` on ``devices`` CPU devices, from the repository root; its
    stdout (the test fails with the tails of both streams if it exits non-zero)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout
