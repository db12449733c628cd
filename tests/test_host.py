"""jaxcl's host allocator settings: what the environment gets, the CLI's one re-execution, and
that glibc really keeps a freed large block for reuse (page faults counted by the kernel)."""

import os
import subprocess
import sys

import pytest

from jaxcl import host
from jaxcl.host import MALLOC_TUNABLES, allocator_env, reexec_with_allocator

glibc = pytest.mark.skipif(not host._glibc(), reason="glibc Linux only")

# A child that fills a 256 MiB block, frees it, fills a new one and prints the minor page faults
# the second fill took: about 65,536 (one per 4 KiB page) when the block was handed back to the
# kernel, near 0 when malloc kept it.
REFILL = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(ctypes.c_void_p(p))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
q = libc.malloc(n); ctypes.memset(q, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _refill_faults(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", REFILL], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@glibc
def test_a_freed_block_is_reused_without_page_faults_under_the_settings():
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXCL_HOST_MALLOC")}
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert _refill_faults(base) > pages // 2  # glibc's default: unmapped, faulted in again
    assert _refill_faults(allocator_env(base)) < pages // 20


@glibc
def test_environment_gets_the_tunables_and_keeps_the_users_own():
    env = allocator_env({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"].split(":") == [f"{k}={v}" for k, v in MALLOC_TUNABLES.items()]
    mine = allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.cpu.x86_ibt=on"})
    tunables = mine["GLIBC_TUNABLES"].split(":")
    assert tunables[:2] == ["glibc.malloc.arena_max=4", "glibc.cpu.x86_ibt=on"]
    assert "glibc.malloc.arena_max=1" not in tunables and len(tunables) == 4
    assert allocator_env({"JAXCL_HOST_MALLOC": "default"}) == {"JAXCL_HOST_MALLOC": "default"}


@glibc
def test_the_command_reexecutes_itself_once(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("JAXCL_HOST_MALLOC", raising=False)
    reexec_with_allocator(["run", "r.yaml", "--dry-run"])
    ((exe, argv, env),) = calls
    assert argv == [sys.executable, "-m", "jaxcl.cli", "run", "r.yaml", "--dry-run"]
    assert env["JAXCL_HOST_MALLOC"] == "applied" and "arena_max=1" in env["GLIBC_TUNABLES"]
    monkeypatch.setenv("JAXCL_HOST_MALLOC", "applied")  # the second pass
    reexec_with_allocator(["run", "r.yaml"])
    monkeypatch.setenv("JAXCL_HOST_MALLOC", "default")  # the user's opt-out
    reexec_with_allocator(["run", "r.yaml"])
    assert len(calls) == 1
