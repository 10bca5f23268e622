"""One child process, timed from spawn to exit, with its own peak RSS and CPU time.

Peak RSS comes from GNU time (`/usr/bin/time -f %M`), which forks the measured command from
its own small process. Reading ru_maxrss here instead would be wrong twice over:
`getrusage(RUSAGE_CHILDREN)` keeps the largest child so far, and even `os.wait4` on our own
child reports at least this benchmark's RSS, because Linux carries the high-water mark of the
address space a child had before exec (subprocess spawns with vfork, sharing ours) into its
ru_maxrss. GNU time waits for its child, so `sftp` is counted with the `ssh` it runs.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GNU_TIME = "/usr/bin/time"


@dataclass(frozen=True)
class Sample:
    seconds: float  # wall clock, spawn to exit
    cpu_seconds: float  # user + system of the child (and the descendants it waited for)
    max_rss_kib: int  # peak resident set size


class ProcessFailed(RuntimeError):
    pass


def run_measured(
    argv: Sequence[str], *, env: dict[str, str], cwd: Path, log_path: Path, timeout_s: float
) -> Sample:
    """Run ``argv`` to completion; raise ProcessFailed (with its log's tail) unless it exits 0."""
    if not Path(GNU_TIME).exists():
        raise ProcessFailed(f"{GNU_TIME} is missing; install it: apt-get install -y time")
    usage_path = log_path.with_suffix(".usage")
    command = [GNU_TIME, "-o", str(usage_path), "-f", "%M %U %S", *argv]
    with log_path.open("wb") as log:
        started = time.perf_counter()
        # A session of its own, so that a timeout ends the command and not only GNU time.
        process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        # wait() with a timeout polls in sleeps of up to 50 ms, which would round every time
        # up to the next 50 ms; a blocking wait() returns when the process ends, and a timer
        # ends a process that overruns.
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            code = process.wait()
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        if expired.is_set():
            raise ProcessFailed(f"{argv[0]} did not finish within {timeout_s:g} s")
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise ProcessFailed(f"{' '.join(argv[:4])} ... exited with {code}:\n{tail}")
    # GNU time writes "Command exited with ..." lines before the format on failures.
    rss, user, system = usage_path.read_text().split()[-3:]
    return Sample(seconds, float(user) + float(system), int(rss))


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))
