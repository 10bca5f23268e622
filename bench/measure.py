"""One child process, timed from spawn to exit, with its own peak RSS and CPU time.

Peak RSS comes from GNU time (`/usr/bin/time -f %M`), which forks the measured command from
its own small process. Reading ru_maxrss here instead would be wrong twice over:
`getrusage(RUSAGE_CHILDREN)` keeps the largest child so far, and even `os.wait4` on our own
child reports at least this benchmark's RSS, because Linux carries the high-water mark of the
address space a child had before exec (subprocess spawns with vfork, sharing ours) into its
ru_maxrss. GNU time waits for its child, so `sftp` is counted with the `ssh` it runs.

Each sample also keeps the share of the machine's CPU time that the hypervisor gave to others
while the run lasted ("steal" in /proc/stat): on a shared VM it is the noise no interleaving
removes, and in the runs measured here ours, which keeps both cores busy, lost more to it than
the references did.

It also keeps the CPU time of the whole machine while the run lasted ("machine CPU s": every
process and the kernel, from /proc/stat): the sshd and gpg-agent sides, which GNU time does not
see, are in it. On a machine of N cores, a tool cannot take less wall time than its machine CPU
seconds / N, however well it overlaps its work; report.py shows the best ratio that floor allows
beside each missed target.
"""

from __future__ import annotations

import contextlib
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
STOP_GRACE_S = 10.0  # an interrupted command's time to stop on SIGTERM


@dataclass(frozen=True)
class Sample:
    seconds: float  # wall clock, spawn to exit
    cpu_seconds: float  # user + system of the child (and the descendants it waited for)
    max_rss_kib: int  # peak resident set size
    steal: float | None = None  # the host's share of all cores' time during the run; None: unknown
    # CPU seconds the whole machine (every process, the kernel) spent while the run lasted.
    machine_cpu_seconds: float | None = None


class ProcessFailed(RuntimeError):
    pass


_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Jiffies:
    """Clock ticks of all CPUs since boot, from /proc/stat."""

    stolen: int  # given by the hypervisor to other guests
    busy: int  # user, nice, system, irq and softirq: working, not idle, waiting for I/O or stolen
    total: int


def cpu_jiffies() -> Jiffies | None:
    """The machine's clock ticks so far; None off Linux."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice: counted in user]
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    ticks = [int(f) for f in fields[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return Jiffies(steal, user + nice + system + irq + softirq, sum(ticks))


def steal_between(before: Jiffies | None, after: Jiffies | None) -> float | None:
    if before is None or after is None or after.total <= before.total:
        return None
    return (after.stolen - before.stolen) / (after.total - before.total)


def busy_seconds_between(before: Jiffies | None, after: Jiffies | None) -> float | None:
    """CPU seconds the whole machine worked between two readings; None when unknown."""
    if before is None or after is None:
        return None
    return (after.busy - before.busy) / _TICKS_PER_S


def run_measured(
    argv: Sequence[str], *, env: dict[str, str], cwd: Path, log_path: Path, timeout_s: float
) -> Sample:
    """Run ``argv`` to completion; raise ProcessFailed (with its log's tail) unless it exits 0."""
    if not Path(GNU_TIME).exists():
        raise ProcessFailed(f"{GNU_TIME} is missing; install it: apt-get install -y time")
    usage_path = log_path.with_suffix(".usage")
    command = [GNU_TIME, "-o", str(usage_path), "-f", "%M %U %S", *argv]
    with log_path.open("wb") as log:
        jiffies = cpu_jiffies()
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
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): the command must not run on
            _stop(process)
            raise
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        ended = cpu_jiffies()
        steal = steal_between(jiffies, ended)
        machine = busy_seconds_between(jiffies, ended)
        if expired.is_set():
            raise ProcessFailed(f"{argv[0]} did not finish within {timeout_s:g} s")
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise ProcessFailed(f"{' '.join(argv[:4])} ... exited with {code}:\n{tail}")
    # GNU time writes "Command exited with ..." lines before the format on failures.
    rss, user, system = usage_path.read_text().split()[-3:]
    return Sample(seconds, float(user) + float(system), int(rss), steal, machine)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's process group, SIGKILL to what is left of it after
    STOP_GRACE_S: our `run` stops its gpg-agents on SIGTERM, and a SIGKILL would leave them
    running. The group is waited for, not only GNU time, which dies first."""
    with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        process.poll()  # reaps GNU time; the group lives on while any member does
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))
