"""The nightly schedule and the run lock: DST, catch-up, retries, signals, JSON logs."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from statements.config import Config, ScheduleConfig, from_mapping
from statements.errors import LockHeld
from statements.lock import run_lock
from statements.scheduler import (
    NightlyScheduler,
    RunResult,
    decide,
    latest_due,
    next_occurrence,
    occurrence_on,
)
from tests.clitools import CONSOLE_SCRIPT, PGP_PASSPHRASE, Project
from tests.harness import Sender, assert_consistent, make_sender, sshd_project
from tests.sshd import SshdServer

NEW_YORK = ZoneInfo("America/New_York")


def settings(**changes: object) -> ScheduleConfig:
    return ScheduleConfig.model_validate(changes, strict=False)


# --- occurrences across daylight-saving changes ----------------------------------------------


def test_a_time_that_does_not_exist_still_happens_once() -> None:
    # 2026-03-08 02:30 does not exist in New York: clocks jump from 02:00 to 03:00.
    at = datetime.strptime("02:30", "%H:%M").time()
    before = occurrence_on(date(2026, 3, 7), at, NEW_YORK)
    gap = occurrence_on(date(2026, 3, 8), at, NEW_YORK)
    after = occurrence_on(date(2026, 3, 9), at, NEW_YORK)
    assert before < gap < after
    assert gap.astimezone(NEW_YORK).date() == date(2026, 3, 8)


def test_a_time_that_happens_twice_is_taken_once() -> None:
    # 2026-11-01 01:30 happens twice in New York: the first one counts.
    at = datetime.strptime("01:30", "%H:%M").time()
    instant = occurrence_on(date(2026, 11, 1), at, NEW_YORK)
    assert instant == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)  # 01:30 EDT


def test_next_and_latest_follow_the_configured_days() -> None:
    s = settings(at="06:30", timezone="America/New_York", days=["tue", "sat"])
    monday_noon = datetime(2026, 11, 16, 17, 0, tzinfo=UTC)  # Monday 12:00 in New York
    upcoming = next_occurrence(monday_noon, s)
    assert upcoming.local_date == date(2026, 11, 17)  # Tuesday
    assert upcoming.instant == datetime(2026, 11, 17, 11, 30, tzinfo=UTC)
    latest = latest_due(monday_noon, s)
    assert latest is not None and latest.local_date == date(2026, 11, 14)  # the Saturday


class FakeRunner:
    def __init__(self, codes: list[int] | None = None) -> None:
        self.calls: list[datetime] = []
        self.codes = codes or []
        self.now: datetime | None = None

    def __call__(self, cfg: Config, stop: threading.Event) -> RunResult:
        assert self.now is not None
        self.calls.append(self.now)
        code = self.codes.pop(0) if self.codes else 0
        return RunResult(code, None, None)


def simulate(
    tmp_path: Path,
    start: datetime,
    end: datetime,
    *,
    at: str,
    step: timedelta = timedelta(minutes=7),
    codes: list[int] | None = None,
    restart_every: int = 0,
) -> list[datetime]:
    """Tick a scheduler on a fake clock; optionally restart it (a new process) now and then."""
    (tmp_path / "config").mkdir(exist_ok=True)
    cfg = from_mapping(
        {"schedule": {"at": at, "timezone": "America/New_York", "retry_after_min": 30}},
        tmp_path / "config" / "ibkr-statements.toml",
    )
    runner = FakeRunner(codes)
    now = start
    ticks = 0

    def clock() -> datetime:
        return now

    scheduler = NightlyScheduler(cfg, threading.Event(), clock=clock, runner=runner)
    while now < end:
        runner.now = now
        scheduler.tick()
        ticks += 1
        if restart_every and ticks % restart_every == 0:
            scheduler = NightlyScheduler(cfg, threading.Event(), clock=clock, runner=runner)
        now += step
    return runner.calls


@pytest.mark.parametrize(
    ("start", "at"),
    [
        (datetime(2026, 3, 1, tzinfo=UTC), "02:30"),  # spring forward: 02:30 does not exist
        (datetime(2026, 10, 25, tzinfo=UTC), "01:30"),  # fall back: 01:30 happens twice
        (datetime(2026, 10, 25, tzinfo=UTC), "06:30"),
    ],
)
def test_one_run_per_scheduled_day_across_dst_never_two_never_none(
    tmp_path: Path, start: datetime, at: str
) -> None:
    calls = simulate(tmp_path, start, start + timedelta(days=14), at=at, restart_every=50)
    # The first tick catches up the Saturday before the start; then one per Tue-Sat day.
    days = [c.astimezone(NEW_YORK).date() for c in calls]
    assert len(days) == len(set(days)), days
    expected = {
        (start + timedelta(days=i)).astimezone(NEW_YORK).date()
        for i in range(14)
        if (start + timedelta(days=i)).astimezone(NEW_YORK).weekday() in (1, 2, 3, 4, 5)
    }
    assert expected <= set(days)
    for call in calls[1:]:
        local = call.astimezone(NEW_YORK)
        assert local.weekday() in (1, 2, 3, 4, 5)
        wanted = occurrence_on(local.date(), datetime.strptime(at, "%H:%M").time(), NEW_YORK)
        assert wanted <= call < wanted + timedelta(minutes=7)  # at the next tick after the time


def test_missed_run_happens_once_at_startup_and_not_again_after_restart(tmp_path: Path) -> None:
    wednesday_ten = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)  # 10:00 New York, after 06:30
    calls = simulate(
        tmp_path, wednesday_ten, wednesday_ten + timedelta(hours=2), at="06:30", restart_every=3
    )
    assert calls == [wednesday_ten]


def test_a_failed_day_is_retried_after_the_interval_then_given_up(tmp_path: Path) -> None:
    start = datetime(2026, 11, 18, 11, 30, tzinfo=UTC)  # Wednesday 06:30 New York
    calls = simulate(
        tmp_path,
        start,
        start + timedelta(hours=5),
        at="06:30",
        step=timedelta(minutes=5),
        codes=[4, 4, 4, 4, 4, 4],
    )
    assert len(calls) == 4  # the first try and max_retries (3) retries
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(timedelta(minutes=30) <= g < timedelta(minutes=36) for g in gaps), gaps
    with sqlite3.connect(tmp_path / "archive" / "index.sqlite3") as db:
        assert db.execute("SELECT state, attempts FROM scheduled_days").fetchall() == [
            ("failed", 4)
        ]


def test_decide_reruns_an_interrupted_day_at_once() -> None:
    s = settings()
    now = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
    assert decide(now, s, None) == "run"
    assert decide(now, s, ("done", 1, now.isoformat())) == "wait"
    assert decide(now, s, ("pending", 1, now.isoformat())) == "run"
    assert decide(now, s, ("retrying", 1, now.isoformat())) == "wait"
    later = (now - timedelta(minutes=31)).isoformat()
    assert decide(now, s, ("retrying", 1, later)) == "run"


# --- the lock ------------------------------------------------------------------------------


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from statements.lock import run_lock\n"
            "with run_lock(Path(sys.argv[1]), 'run'):\n"
            "    print('held', flush=True); time.sleep(60)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as caught, run_lock(tmp_path, "run"):
            pass
        assert f"process {holder.pid}" in caught.value.message
        assert caught.value.exit_code == 5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with run_lock(tmp_path, "run"):  # a killed holder leaves a stale file, not a held lock
        pass


# --- real processes --------------------------------------------------------------------------


def encrypt_for(project: Project, data: bytes, tmp: Path) -> bytes:
    if not (tmp / "sender").exists():
        make_sender(tmp, project.keys / "pgp-public.asc")
    return Sender(tmp / "sender", "test@example.com").encrypt(data)


@pytest.mark.integration
def test_run_while_another_holds_the_lock_exits_5_naming_it(
    keyed_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> None:
    project = sshd_project(keyed_project, sshd, sftp_dir, tmp_path / "p")
    env = project.env(IBKR_SSH_PASSPHRASE=sshd.client_key_passphrase)
    with run_lock(project.root / "archive", "schedule"):
        result = project.run("run", env=env)
    assert result.returncode == 5
    assert f"process {os.getpid()}" in result.stderr


@pytest.mark.integration
def test_sigterm_stops_cleanly_and_the_next_run_completes(
    keyed_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> None:
    project = sshd_project(keyed_project, sshd, sftp_dir, tmp_path / "p")
    project.config.write_text(project.config.read_text().replace("workers = 4", "workers = 1"))
    env = project.env(IBKR_SSH_PASSPHRASE=sshd.client_key_passphrase)
    payload = os.urandom(400_000)
    ciphertext = encrypt_for(project, payload, tmp_path)
    for i in range(60):
        name = f"U1234567.Trade_History.202609{i % 28 + 1:02d}.202609{i % 28 + 1:02d}"
        (sftp_dir / f"{name}.{i}.xml.pgp").write_bytes(ciphertext)
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "run"],
        cwd=project.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Stop once the first file is committed: mid-run, however fast the fetch is.
    ledger = project.root / "archive" / "index.sqlite3"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if ledger.exists():
            with sqlite3.connect(ledger) as db:
                table = db.execute("SELECT name FROM sqlite_master WHERE name='fetched'")
                if table.fetchone() and db.execute("SELECT COUNT(*) FROM fetched").fetchone()[0]:
                    break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped on request" in stdout
    with sqlite3.connect(project.root / "archive" / "index.sqlite3") as db:
        fetched_first = db.execute("SELECT COUNT(*) FROM fetched").fetchone()[0]
        assert db.execute("SELECT result FROM runs").fetchall() == [("interrupted",)]
    assert fetched_first < 60
    project.ok("run", env=env)
    archived = list((project.root / "archive" / "U1234567").rglob("*.xml"))
    assert len(archived) == 60
    assert_consistent(project.root / "archive")


def _days_recorded(archive: Path) -> int:
    """How many scheduled days the ledger holds an outcome for (0 while it cannot be read)."""
    try:
        ledger = f"file:{archive / 'index.sqlite3'}?mode=ro"  # read-only: never creates it
        with contextlib.closing(sqlite3.connect(ledger, uri=True, timeout=1)) as db:
            return int(db.execute("SELECT count(*) FROM scheduled_days").fetchone()[0])
    except sqlite3.OperationalError:  # not made yet, or busy: ask again
        return 0


@pytest.mark.integration
def test_schedule_daemon_catches_up_logs_json_and_stops_on_sigterm(
    keyed_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> None:
    project = sshd_project(keyed_project, sshd, sftp_dir, tmp_path / "p")
    # Every day, a minute ago: the daemon must catch that run up at once, and only once.
    zone = ZoneInfo("America/New_York")
    at = (datetime.now(zone) - timedelta(minutes=1)).strftime("%H:%M")
    text = project.config.read_text().replace('at = "06:30"', f'at = "{at}"')
    text = text.replace(
        'days = ["tue", "wed", "thu", "fri", "sat"]',
        'days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]',
    )
    project.config.write_text(text)
    report = b"<FlexQueryResponse/>\n" * 50
    (sftp_dir / "U7777777.Trade_History.20260901.20260901.xml.pgp").write_bytes(
        encrypt_for(project, report, tmp_path)
    )
    env = project.env(IBKR_SSH_PASSPHRASE=sshd.client_key_passphrase)
    daemon = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "-v", "--log-format", "json", "schedule"],
        cwd=project.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    archived = project.root / "archive" / "U7777777" / "2026"
    # SIGTERM once the run has ended and its day is recorded: sooner, the run is interrupted
    # and the day rightly stays pending (on a loaded CI host, a second after the report was
    # archived was once not enough).
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not _days_recorded(project.root / "archive"):
        time.sleep(0.3)
    daemon.send_signal(signal.SIGTERM)
    _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, stderr
    assert [p.name for p in archived.glob("*.xml")] == [
        "U7777777.Trade_History.20260901.20260901.xml"
    ]
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert all({"time", "level", "message"} <= set(r) for r in records)
    events = [r.get("event") for r in records]
    assert events.count("next_run") >= 2  # at start and after the run
    assert "archived" in events and "fetched" in events
    archived_record = next(r for r in records if r.get("event") == "archived")
    assert archived_record["account"] == "U7777777" and archived_record["bytes"] == len(report)
    for secret in (sshd.client_key_passphrase, PGP_PASSPHRASE):
        assert secret not in stderr
    with sqlite3.connect(project.root / "archive" / "index.sqlite3") as db:
        assert db.execute("SELECT state, attempts FROM scheduled_days").fetchall() == [("done", 1)]
