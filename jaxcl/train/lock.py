"""An exclusive lock on a run folder, so that one run at a time writes it.

The lock is an ``fcntl.flock`` on ``OUT/.jaxcl.lock``, held by the run's primary process for the
whole run. The operating system releases it when that process ends, however it ends, so a lock
file left behind by a killed run blocks nothing (a stale lock cannot exist). While held, the
file names the holder (host, pid, start time, command) for the message that refuses a second
run; it is emptied when the holder releases it.

The lock is re-entrant within a process: a ``compare:`` sweep holds its folder while the base
run inside it takes the same lock again.

On a file system without ``flock`` (some network and FUSE mounts), the lock file alone decides:
one naming a live process (on this host; on another host, any) refuses the run, one naming a
process that is gone is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".jaxcl.lock"

_held: dict[str, list[int]] = {}  # lock file -> [file descriptor, depth], this process's
#: what ``flock`` says on a file system that does not support it
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


class FolderLocked(Exception):
    """The run folder is locked by another live process; ``holder`` is what its lock file says."""

    def __init__(self, folder: Path, holder: dict[str, Any], advisory: bool = False) -> None:
        self.folder, self.holder = folder, holder
        who = (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')}"
            if holder
            else "a process that has not written its name yet"
        )
        command = f" ({holder['command']})" if holder.get("command") else ""
        released = (
            f"if that process is gone, delete {folder / LOCK_NAME} (this file system has no "
            "flock, so its lock outlives a killed run on another host)"
            if advisory
            else f"the lock ({folder / LOCK_NAME}) is released when that process ends"
        )
        super().__init__(
            f"{folder} is in use by another jaxcl run: {who}{command}. Wait for it to end (or "
            f"stop it), or choose another out_dir; {released}"
        )


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process a lock file names may still run (on another host: assumed so)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def holder_of(folder: Path, tries: int = 20) -> dict[str, Any]:
    """What the lock file of ``folder`` says about its holder ({} when empty: a holder that has
    just taken the lock writes its name a moment later, so this waits a little for it)."""
    path = Path(folder) / LOCK_NAME
    for attempt in range(tries):
        try:
            text = path.read_text()
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):
            pass
        if attempt < tries - 1:
            time.sleep(0.05)
    return {}


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs (``folder`` must exist). Raises
    :class:`FolderLocked` naming the holder when another process holds it, OSError when the
    lock file cannot be opened (an unwritable folder)."""
    path = Path(folder) / LOCK_NAME
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # the holder's file is left as it is
        raise FolderLocked(Path(folder), holder_of(folder)) from None
    except OSError as err:
        holder = holder_of(folder, tries=1) if err.errno in _NO_FLOCK else None
        if err.errno not in _NO_FLOCK or (holder and _alive(holder)):
            os.close(fd)
            if holder:
                raise FolderLocked(Path(folder), holder, advisory=True) from None
            raise
    except BaseException:
        os.close(fd)
        raise
    try:
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _held[key] = [fd, 1]
        yield
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # still held: nobody reads a half-emptied file as a holder
        os.close(fd)  # releases the lock
