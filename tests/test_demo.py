"""`run_demo`: the whole cycle against its own loopback server, with real gpg and real keys."""

from __future__ import annotations

import hashlib
import io
import logging
import stat
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from statements import config as config_mod
from statements.demo import (
    SENDER_PREFIX,
    DemoResult,
    demo_reports,
    last_business_day,
    run_demo,
)
from statements.errors import ExitCode, UsageError

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_today() -> date:
    return datetime.now(UTC).date()


class _Records(logging.Handler):
    """Every log record of the run, as caplog would keep them, but for a module fixture."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass(frozen=True)
class DemoRun:
    result: DemoResult
    records: list[logging.LogRecord]
    progress: list[str]
    sandbox_threads: list[str]  # alive right after run_demo returned
    days: tuple[date, date]  # UTC date before and after the run
    sender_homes_left: list[Path]  # sender GnuPG homes that appeared during the run and stayed


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """One demo run shared by the tests below: it costs seconds, and they only read it."""
    folder = tmp_path_factory.mktemp("demo") / "d"
    handler = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    progress: list[str] = []
    senders = set(Path(tempfile.gettempdir()).glob(f"{SENDER_PREFIX}*"))
    try:
        before = utc_today()
        result = run_demo(folder, progress=progress.append)
        after = utc_today()
        alive = [t.name for t in threading.enumerate() if t.name.startswith("sandbox-")]
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    left = sorted(set(Path(tempfile.gettempdir()).glob(f"{SENDER_PREFIX}*")) - senders)
    yield DemoRun(result, handler.records, progress, alive, (before, after), left)


def expected_archive(today: date) -> dict[str, bytes]:
    """Archive path -> plaintext, as DESIGN.md's archive contract places each sample report."""
    day = last_business_day(today)
    stamp, year = day.strftime("%Y%m%d"), day.year
    reports = demo_reports(day)
    with zipfile.ZipFile(io.BytesIO(reports["Firm_2025_Q4_2025_Q4.zip.pgp"])) as bundle:
        members = {info.filename: bundle.read(info) for info in bundle.infolist()}
    jane = "Jane_Doe_U20343697_October_01_2025_December_31_2025.csv"
    richard = "Richard_Roe_U31415926_October_01_2025_December_31_2025.csv"
    assert set(members) == {f"Firm_2025_Q4_2025_Q4/{jane}", f"Firm_2025_Q4_2025_Q4/{richard}"}
    trade = f"Trade_History.{stamp}.{stamp}"
    equity = f"Equity_Summary_in_Base.{stamp}.{stamp}"
    return {
        f"U4698258/{year}/U4698258.{trade}.xml": reports[f"U4698258.{trade}.xml.pgp"],
        f"U4698258/{year}/U4698258.{equity}.xml": reports[f"U4698258.{equity}.xml.pgp"],
        f"U7654321/{year}/U7654321.{trade}.xml": reports[f"U7654321.{trade}.xml.asc"],
        f"U20343697/2025/{jane}": members[f"Firm_2025_Q4_2025_Q4/{jane}"],
        f"U31415926/2025/{richard}": members[f"Firm_2025_Q4_2025_Q4/{richard}"],
        f"_unsorted/{today.isoformat()}/statement_export": reports["statement_export.pgp"],
    }


def test_demo_archives_every_report_where_the_contract_says(demo: DemoRun) -> None:
    # A run that crosses midnight UTC may date its reports by either day; one must fit exactly.
    result = demo.result
    fits = [
        d
        for d in sorted(set(demo.days))
        if tuple(sorted(expected_archive(d))) == result.archive_files
    ]
    assert fits, result.archive_files
    before = fits[0]
    expected = expected_archive(before)
    root = result.folder / "archive"
    for relative, plaintext in expected.items():
        assert sha((root / relative).read_bytes()) == sha(plaintext), relative

    reports = demo_reports(last_business_day(before))
    assert result.encrypted_kept == tuple(sorted(reports))
    for name in reports:  # what the server held is ciphertext, kept as fetched
        served = (result.folder / "server" / "outgoing" / name).read_bytes()
        assert (root / ".encrypted" / name).read_bytes() == served
        assert served != reports[name]
    assert (
        (root / ".encrypted" / reports_name(reports, ".asc"))
        .read_bytes()
        .startswith(b"-----BEGIN PGP MESSAGE-----")
    )

    cycle = result.cycle
    assert cycle.exit_code == ExitCode.OK
    assert cycle.fetch.fetched == len(reports) and not cycle.fetch.failures
    assert cycle.archive.archived_files == len(expected) and not cycle.archive.failures


def reports_name(reports: dict[str, bytes], suffix: str) -> str:
    return next(name for name in reports if name.endswith(suffix))


def test_demo_status_shows_the_accounts_and_nothing_quarantined(demo: DemoRun) -> None:
    status = demo.result.status
    assert status.ledger_exists
    accounts = {account: files for account, _latest, files in status.accounts}
    assert accounts == {"U4698258": 2, "U7654321": 1, "U20343697": 1, "U31415926": 1}
    assert status.quarantine == ()
    assert status.inbox == ()
    assert [(run.command, run.result, run.exit_code) for run in status.runs] == [("run", "ok", 0)]
    assert not list((demo.result.folder / "archive" / ".quarantine").glob("*"))


def test_demo_builds_a_project_as_a_user_would(demo: DemoRun) -> None:
    result = demo.result
    folder = result.folder
    assert result.config_path == folder / "config" / "ibkr-statements.toml"
    cfg = config_mod.load(result.config_path)
    assert cfg.home == folder
    assert cfg.sftp.host == "127.0.0.1" and cfg.sftp.username == "demo"
    assert cfg.sftp.remote_dir == "outgoing"
    assert cfg.sftp.key_file == folder / "keys" / "ibkr_rsa"
    assert cfg.sftp.key_passphrase_file == folder / "keys" / "ssh-passphrase"
    assert cfg.pgp.passphrase_file == folder / "keys" / "pgp-passphrase"
    pinned = (folder / "keys" / "known_hosts").read_text().splitlines()
    assert len(pinned) == 1
    assert pinned[0].startswith(f"[127.0.0.1]:{cfg.sftp.port} ssh-ed25519 ")
    assert (folder / "keys" / "ibkr_rsa.pub").read_text().startswith("ssh-rsa ")
    assert "BEGIN PGP PUBLIC KEY BLOCK" in (folder / "keys" / "pgp-public.asc").read_text()

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(folder / "keys") == 0o700
    assert mode(folder / "keys" / "gnupg") == 0o700
    for secret in ("ibkr_rsa", "ssh-passphrase", "pgp-passphrase"):
        assert mode(folder / "keys" / secret) == 0o600, secret
    steps = "\n".join(demo.progress)
    assert "made an RSA-2048 SSH key pair" in steps
    assert f"started an SFTP server on 127.0.0.1:{cfg.sftp.port}" in steps
    assert "pinned its host key" in steps and "started that server itself" in steps


def test_demo_passphrases_appear_nowhere_but_their_files(demo: DemoRun) -> None:
    keys = demo.result.folder / "keys"
    passphrases = [(keys / name).read_text() for name in ("ssh-passphrase", "pgp-passphrase")]
    assert all(len(p) >= 20 for p in passphrases) and passphrases[0] != passphrases[1]
    assert len(demo.records) > 10  # the capture did see the run
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logged = "\n".join(formatter.format(record) + repr(record.__dict__) for record in demo.records)
    shown = [
        logged,
        repr(demo.result.status),
        repr(demo.result.cycle),
        "\n".join(demo.progress),
        demo.result.config_path.read_text(),
    ]
    for passphrase in passphrases:
        for text in shown:
            assert passphrase not in text


def test_demo_leaves_no_server_thread_and_no_gpg_agent(demo: DemoRun) -> None:
    assert demo.sandbox_threads == []
    folder = str(demo.result.folder)
    # gpgconf --kill asks the agent to exit; give it a moment to be gone.
    deadline = time.monotonic() + 5
    while True:
        listing = subprocess.run(
            ["pgrep", "-af", "gpg-agent"], capture_output=True, text=True, check=False
        ).stdout
        ours = [line for line in listing.splitlines() if folder in line or SENDER_PREFIX in line]
        if not ours or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ours == []
    assert demo.sender_homes_left == []  # the sender's throw-away GnuPG home is gone too


def test_demo_refuses_a_folder_that_is_not_empty(demo: DemoRun, tmp_path: Path) -> None:
    before = sorted(p.name for p in demo.result.folder.iterdir())
    with pytest.raises(UsageError) as again:
        run_demo(demo.result.folder)
    assert again.value.exit_code == ExitCode.USAGE
    assert "is not empty; the demo only writes into a fresh folder" in again.value.message
    assert sorted(p.name for p in demo.result.folder.iterdir()) == before

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(UsageError):
        run_demo(occupied)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    with pytest.raises(UsageError):
        run_demo(a_file)


def test_demo_refuses_a_folder_too_deep_for_gpg_sockets(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(UsageError) as refused:
        run_demo(deep)
    assert "too deep for gpg" in refused.value.message
    assert not deep.exists()


def test_sample_reports_are_deterministic_and_dated_on_the_last_business_day() -> None:
    assert last_business_day(date(2026, 9, 2)) == date(2026, 9, 1)  # Wednesday -> Tuesday
    assert last_business_day(date(2026, 9, 7)) == date(2026, 9, 4)  # Monday -> Friday
    assert last_business_day(date(2026, 9, 6)) == date(2026, 9, 4)  # Sunday -> Friday
    day = date(2026, 9, 1)
    reports = demo_reports(day)
    assert reports == demo_reports(day)
    assert "U4698258.Trade_History.20260901.20260901.xml.pgp" in reports
    assert "U4698258.Equity_Summary_in_Base.20260901.20260901.xml.pgp" in reports
    assert b"<FlexQueryResponse" in reports["U4698258.Trade_History.20260901.20260901.xml.pgp"]
