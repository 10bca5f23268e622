"""What `ibkr-statements status` reports, read from the ledger and the archive folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from statements.config import Config
from statements.ledger import LEDGER_NAME, Ledger, RunRow


@dataclass(frozen=True)
class QuarantinedFile:
    name: str
    reason: str  # the first line of its error file, else the ledger's reason


@dataclass(frozen=True)
class StatusReport:
    runs: tuple[RunRow, ...]
    inbox: tuple[str, ...]
    quarantine: tuple[QuarantinedFile, ...]
    accounts: tuple[tuple[str, str, int], ...]  # account, latest period end, files
    totals: dict[str, int]
    ledger_exists: bool


def _first_line(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("what failed:"):
                    return line.removeprefix("what failed:").strip()
    except FileNotFoundError:
        return None
    return None


def status_report(cfg: Config, *, runs: int = 10) -> StatusReport:
    root = cfg.archive.root
    if not (root / LEDGER_NAME).exists():
        return StatusReport((), (), (), (), {}, ledger_exists=False)
    with Ledger.open(root) as ledger:
        waiting = tuple(row.inbox_name for row in ledger.fetched_rows(("fetched",)))
        quarantine = tuple(
            QuarantinedFile(
                row.inbox_name,
                _first_line(root / ".quarantine" / f"{row.inbox_name}.error.txt") or reason,
            )
            for row, reason in ledger.quarantined()
        )
        return StatusReport(
            runs=tuple(ledger.recent_runs(runs)),
            inbox=waiting,
            quarantine=quarantine,
            accounts=tuple(ledger.latest_by_account()),
            totals=ledger.totals(),
            ledger_exists=True,
        )
