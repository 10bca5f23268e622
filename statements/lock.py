"""One run at a time across processes: a lock file naming its holder.

The file holds the holder's pid and start time, so a second run can say who holds it. The lock
itself is an ``fcntl.flock`` on that file: the kernel drops it when the holder dies, however it
dies, so a stale file (a dead pid, a SIGKILL) is taken over without guessing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from statements.errors import LockHeld

LOCK_NAME = ".lock"


# The loser of a race may read the file between the winner's flock and its record.
_RECORD_WAIT_S = 1.0


def _describe_holder(path: Path) -> str:
    deadline = time.monotonic() + _RECORD_WAIT_S
    while True:
        try:
            holder = json.loads(path.read_text("utf-8") or "{}")
        except (OSError, ValueError):
            holder = {}
        if "pid" in holder or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if not holder:
        return "another process"
    return (
        f"process {holder.get('pid', '?')} ({holder.get('command', '?')}, "
        f"started {holder.get('started', '?')})"
    )


@contextlib.contextmanager
def run_lock(archive_root: Path, command: str) -> Iterator[None]:
    """Hold the archive's lock for the block, or raise :class:`LockHeld` (exit 5) at once."""
    archive_root.mkdir(parents=True, exist_ok=True, mode=0o700)  # statements are private
    path = archive_root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(
                f"Another run holds the lock on {archive_root}: {_describe_holder(path)}.",
                "Wait for it to finish (`ibkr-statements status` shows runs); a run that died "
                "releases the lock by itself.",
            ) from None
        record = {
            "pid": os.getpid(),
            "command": command,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
