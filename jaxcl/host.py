"""The host allocator jaxcl's processes run with.

XLA:CPU allocates each step's temporary buffers afresh. glibc's default ``malloc`` serves large
blocks from fresh ``mmap`` pages (or per-thread arenas it trims back to the OS), so every step
page-faults and zeroes its whole working set again: on 2 CPU cores about 90 ms of kernel time in
a 330 ms step of the ``tiny`` model and 1.0–1.4 s in a 9 s SmolLM2-135M step
(docs/performance.md). With one arena and high ``mmap`` and trim thresholds, freed blocks stay
in the process and the next step reuses them (kernel time 3 ms and 0.03 s per step). Freed
memory is kept for reuse instead of returned, which moves the peak RSS a little either way
(measured: SmolLM2 3.62 → 3.53 GiB, the quickstart 1.38 → 1.28, tiny 0.53 → 0.60).

glibc reads these settings once, when a process starts, so they are passed in the environment
of a process jaxcl starts (bench rows) or of the ``jaxcl`` command itself, which re-executes
itself once with them. ``JAXCL_HOST_MALLOC=default`` keeps glibc's defaults; tunables a user
set in ``GLIBC_TUNABLES`` are kept and win.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping, Sequence

MALLOC_TUNABLES = {
    "glibc.malloc.arena_max": "1",
    # 64 GiB: blocks are never mapped afresh nor handed back between steps
    "glibc.malloc.mmap_threshold": str(1 << 36),
    "glibc.malloc.trim_threshold": str(1 << 36),
}
_OPT_OUT = "JAXCL_HOST_MALLOC"


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


def allocator_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with :data:`MALLOC_TUNABLES` added to ``GLIBC_TUNABLES`` (``a=1:b=2``), unless
    the host is not glibc Linux or ``JAXCL_HOST_MALLOC=default``; a tunable already named in
    ``GLIBC_TUNABLES`` keeps the user's value."""
    out = dict(env)
    if out.get(_OPT_OUT) == "default" or not _glibc():
        return out
    given = [t for t in out.get("GLIBC_TUNABLES", "").split(":") if t]
    named = {t.split("=", 1)[0] for t in given}
    added = [f"{k}={v}" for k, v in MALLOC_TUNABLES.items() if k not in named]
    if added:
        out["GLIBC_TUNABLES"] = ":".join(given + added)
    return out


def release_heap() -> None:
    """Return the C heap's free pages to the system now (glibc ``malloc_trim``, which the trim
    threshold above does not limit; elsewhere a no-op): memory the XLA compiler freed then does
    not stay in the resident set."""
    if _glibc():
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reexec_with_allocator(argv: Sequence[str]) -> None:
    """Replace this process by ``python -m jaxcl.cli ARGV`` under :func:`allocator_env`, once
    (a marker in the environment stops the second pass); returns when nothing would change."""
    env = allocator_env(os.environ)
    if env == dict(os.environ) or os.environ.get(_OPT_OUT) == "applied":
        return
    env[_OPT_OUT] = "applied"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "jaxcl.cli", *argv], env)
