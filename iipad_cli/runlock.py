"""One writer per run directory: an advisory lock on `RUN/.iipad.lock`.

Two `iipad extract` into one run directory used to destroy each other's work: the second took
the first's `features.h5.partial` for a crash leftover and deleted it. Every stage that writes a
run directory now holds this lock for its whole run; a second writer stops at once with
"RUN is in use by pid N on HOST" (exit 1) and touches nothing.

Why `flock` on a file that is never deleted: the kernel releases the lock when its holder dies,
however it dies (SIGKILL, OOM), so a dead holder's lock is taken over by the next writer without
any guessing from pids or ages; and because the file is never removed, two processes can never
lock two different inodes of the same name. The pid, host, command and start time written into
the file are only for the message. On Linux NFS, `flock` is carried by POSIX byte-range locks,
so the lock also holds between hosts.

The lock is re-entrant within one process: `iipad run` holds it while it calls each stage, and
each stage takes it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from iipad_cli.errors import IipadError
from iipad_cli.hints import extract_command
from iipad_cli.writes import check_writable, reporting_write_errors

LOCK_FILE = ".iipad.lock"


@dataclass
class _Held:
    fd: int
    depth: int


# Locks this process holds, by resolved run directory (flock would refuse the process itself).
_held: dict[Path, _Held] = {}


def _holder(fd: int) -> str:
    """"pid N on HOST (`iipad CMD` since T)" from the lock file, or a neutral phrase while it is being written."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
    return f"pid {pid} on {host} (`iipad {info.get('command', '?')}` since {info.get('since', '?')})"


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str, *, create: bool = True) -> Iterator[Path]:
    """Hold the run directory's lock for the duration of the block.

    Raises IipadError when another process holds it, and, before any work starts, when the
    directory cannot be written (read-only file system, permissions, full disk). `create` makes
    a missing directory (extract, predict's output); the later stages need an existing run.
    """
    run_dir = Path(run_dir)
    if not create and not run_dir.is_dir():
        raise IipadError(f"{run_dir}: no such run directory; make it with {extract_command(run_dir, force=False)}")
    with reporting_write_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    held = _held.get(key)
    if held is not None:
        held.depth += 1
        try:
            yield run_dir
        finally:
            held.depth -= 1
        return
    lock_path = run_dir / LOCK_FILE
    with reporting_write_errors(lock_path):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IipadError(
                f"{run_dir} is in use by {_holder(fd)}; wait for it to finish or write to another run directory"
            ) from None
        check_writable(run_dir)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with reporting_write_errors(lock_path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        _held[key] = _Held(fd, 1)
        try:
            yield run_dir
        finally:
            del _held[key]
            # Emptied so that a stale record never names a finished process; the lock itself
            # goes with the close.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)

