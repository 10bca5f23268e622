"""The nightly schedule, and one locked, notified run. The only module importing ``schedule``.

``schedule`` drives the loop (a tick every few seconds); whether a run is due is decided here
from wall-clock instants computed with zoneinfo, and each scheduled day's outcome is kept in the
ledger. So a daylight-saving change gives one run that day, never two and never none, and a
restart never runs a day twice. A day whose run fails is retried every ``retry_after_min`` up to
``max_retries`` times, then marked failed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import schedule

from statements.config import Config, ScheduleConfig
from statements.errors import ExitCode, StatementsError
from statements.ledger import Ledger
from statements.lock import run_lock
from statements.notify import RunOutcome, last_new_file_date, notices_for, send
from statements.pipeline import CycleSummary, FetchProgress, run_from_config

log = logging.getLogger(__name__)

DAY_NUMBERS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
TICK_SECONDS = 20
# Exit codes after which a retry can help: the network, the server, a lock held by a manual run.
RETRYABLE = {int(ExitCode.REMOTE), int(ExitCode.LOCKED), int(ExitCode.CONFIG)}


@dataclass(frozen=True)
class Occurrence:
    local_date: date
    instant: datetime  # aware, UTC


def occurrence_on(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The instant the schedule means on ``day``, in UTC.

    A time that happens twice (clocks go back) is its first occurrence (fold=0); a time that
    does not exist (clocks go forward) maps, through its pre-transition offset, to the same
    distance after the gap: one instant per day either way.
    """
    local = datetime.combine(day, at).replace(tzinfo=zone, fold=0)
    return local.astimezone(UTC)


def parse_at(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def _occurrences(around: datetime, settings: ScheduleConfig, days: range) -> list[Occurrence]:
    zone = ZoneInfo(settings.timezone)
    at = parse_at(settings.at)
    wanted = {DAY_NUMBERS[d] for d in settings.days}
    local_today = around.astimezone(zone).date()
    found = []
    for offset in days:
        day = local_today + timedelta(days=offset)
        if day.weekday() in wanted:
            found.append(Occurrence(day, occurrence_on(day, at, zone)))
    return found


def next_occurrence(now: datetime, settings: ScheduleConfig) -> Occurrence:
    """The first scheduled instant strictly after ``now``."""
    return next(o for o in _occurrences(now, settings, range(-1, 9)) if o.instant > now)


def latest_due(now: datetime, settings: ScheduleConfig) -> Occurrence | None:
    """The most recent scheduled instant at or before ``now``, within the last week."""
    due = [o for o in _occurrences(now, settings, range(-8, 2)) if o.instant <= now]
    return due[-1] if due else None


def decide(
    now: datetime,
    settings: ScheduleConfig,
    record: tuple[str, int, str | None] | None,
) -> str:
    """``"run"`` when the latest scheduled day needs a (re)try now, else ``"wait"``."""
    if record is None:
        return "run"
    state, attempts, last_attempt = record
    if state in ("done", "failed"):
        return "wait"
    if state == "pending":  # interrupted by a shutdown: finish it at once
        return "run"
    if attempts > settings.max_retries:
        return "wait"
    if last_attempt is None:
        return "run"
    retry_at = datetime.fromisoformat(last_attempt) + timedelta(minutes=settings.retry_after_min)
    return "run" if now >= retry_at else "wait"


# --- one run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    cycle: CycleSummary | None
    error: StatementsError | None


def run_once(
    cfg: Config,
    *,
    stop: threading.Event | None = None,
    progress: FetchProgress | None = None,
) -> RunResult:
    """`ibkr-statements run`: the lock, one cycle, and the notifications it calls for."""
    started = datetime.now(UTC)
    cycle: CycleSummary | None = None
    error: StatementsError | None = None
    try:
        with run_lock(cfg.archive.root, "run"):
            cycle = run_from_config(cfg, stop=stop, progress=progress)
        code = int(cycle.exit_code)
    except StatementsError as exc:
        error, code = exc, int(exc.exit_code)
    _notify(cfg, started, code, cycle, error)
    return RunResult(code, cycle, error)


def _notify(
    cfg: Config,
    started: datetime,
    code: int,
    cycle: CycleSummary | None,
    error: StatementsError | None,
) -> None:
    if code == int(ExitCode.LOCKED):
        return  # the run holding the lock reports for itself
    failures: tuple[str, ...] = ()
    if cycle is not None:
        failures = tuple(
            f"{f.name}: {f.reason}" for f in [*cycle.fetch.failures, *cycle.archive.failures]
        )
    outcome = RunOutcome(
        command="run",
        exit_code=code,
        started_at=started,
        ended_at=datetime.now(UTC),
        fetched=cycle.fetch.fetched if cycle else 0,
        archived=cycle.archive.archived_files if cycle else 0,
        failed=len(failures),
        message=error.message if error else "; ".join(failures),
        hint=error.hint if error else None,
        failures=failures,
    )
    last_new: date | None = None
    try:
        with Ledger.open(cfg.archive.root) as ledger:
            last_new = last_new_file_date(ledger)
    except StatementsError as exc:
        log.warning("could not read the ledger for notifications: %s", exc.message)
    notices = notices_for(
        cfg.notify, outcome, last_new_file=last_new, today=date.today(), host=_hostname()
    )
    for problem in send(cfg.notify, notices):
        log.warning("notification not delivered: %s", problem)


def _hostname() -> str:
    import socket

    return socket.gethostname()


# --- the daemon --------------------------------------------------------------------------------


class NightlyScheduler:
    """Runs `run` on the configured days at the configured time, until ``stop`` is set."""

    def __init__(
        self,
        cfg: Config,
        stop: threading.Event,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        runner: Callable[[Config, threading.Event], RunResult] | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop = stop
        self.clock = clock
        self.runner = runner or (lambda c, s: run_once(c, stop=s))

    def announce_next(self) -> Occurrence:
        upcoming = next_occurrence(self.clock(), self.cfg.schedule)
        log.info(
            "next run %s (%s %s)",
            upcoming.instant.astimezone(ZoneInfo(self.cfg.schedule.timezone)).isoformat(),
            upcoming.local_date.strftime("%A"),
            self.cfg.schedule.timezone,
            extra={"event": "next_run"},
        )
        return upcoming

    def tick(self) -> RunResult | None:
        """Run the latest scheduled day if it is due and not yet done; record the outcome."""
        now = self.clock()
        due = latest_due(now, self.cfg.schedule)
        if due is None or self.stop.is_set():
            return None
        key = due.local_date.isoformat()
        with Ledger.open(self.cfg.archive.root) as ledger:
            record = ledger.scheduled_day(key)
        if decide(now, self.cfg.schedule, record) != "run":
            return None
        attempt = (record[1] if record else 0) + 1
        log.info(
            "starting the run scheduled for %s (attempt %d)",
            key,
            attempt,
            extra={"event": "scheduled_run"},
        )
        result = self.runner(self.cfg, self.stop)
        if self.stop.is_set() and result.exit_code == 0:
            state = "pending"  # interrupted: the day is not done, the next start finishes it
        elif result.exit_code in RETRYABLE:
            state = "failed" if attempt > self.cfg.schedule.max_retries else "retrying"
        else:
            state = "done"
        with Ledger.open(self.cfg.archive.root) as ledger:
            ledger.record_attempt(key, state=state, exit_code=result.exit_code, at=self.clock())
        if state == "retrying":
            log.warning(
                "the run for %s failed (exit %d); retrying in %d min",
                key,
                result.exit_code,
                self.cfg.schedule.retry_after_min,
            )
        elif state == "failed":
            log.error("the run for %s failed %d times; giving up on that day", key, attempt)
        self.announce_next()
        return result

    def serve(self) -> None:
        """Tick until ``stop``: a missed run (machine off or asleep) happens at the first tick."""
        self.announce_next()
        driver = schedule.Scheduler()
        driver.every(TICK_SECONDS).seconds.do(self.tick)
        self.tick()
        while not self.stop.is_set():
            driver.run_pending()
            idle = driver.idle_seconds
            self.stop.wait(max(0.5, min(TICK_SECONDS, idle if idle is not None else 1.0)))
