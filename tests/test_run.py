"""`ibkr-statements run`, `decrypt` and `status` end to end: real sshd, real gpg, real zips."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import sqlite3
import subprocess
import threading
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import paramiko
import pytest

from statements import config, pipeline
from statements.errors import ExitCode, StatementsError
from statements.ledger import Ledger
from tests import harness
from tests.clitools import PGP_PASSPHRASE, Project
from tests.harness import make_sender, sha, sshd_project, stranger_key
from tests.sshd import SshdServer

pytestmark = pytest.mark.integration


def utc_day() -> str:
    return datetime.now(UTC).date().isoformat()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def run_project(
    keyed_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> Project:
    return sshd_project(keyed_project, sshd, sftp_dir, tmp_path / "p")


def env_for(project: Project, sshd: SshdServer) -> dict[str, str]:
    return project.env(IBKR_SSH_PASSPHRASE=sshd.client_key_passphrase)


def archive_tree(project: Project) -> dict[str, str]:
    tree = harness.archive_tree(project.root / "archive")
    harness.assert_consistent(project.root / "archive")
    return tree


def fetched_day(project: Project, remote_name: str, *, between: tuple[str, str]) -> str:
    """The UTC day the ledger says ``remote_name`` was fetched: _unsorted/ files by it.

    Read rather than assumed, so a run that crosses midnight UTC is judged by its own record;
    checked to lie within ``between`` (the days before and after the fetching run).
    """
    with contextlib.closing(sqlite3.connect(project.root / "archive" / "index.sqlite3")) as db:
        rows = db.execute(
            "SELECT fetched_at FROM fetched WHERE remote_path LIKE ?", (f"%/{remote_name}",)
        ).fetchall()
    assert len(rows) == 1, rows
    day = str(rows[0][0])[:10]
    assert between[0] <= day <= between[1], (day, between)
    return day


def test_run_archives_every_report_once_where_the_contract_says(
    run_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> None:
    sender = make_sender(tmp_path, run_project.keys / "pgp-public.asc")
    _, stranger = stranger_key(tmp_path)
    sender.import_key(tmp_path / "stranger-public.asc")
    trade = b"<FlexQueryResponse queryName='Trade History'/>\n" * 500
    equity = b"<FlexQueryResponse queryName='Equity Summary'/>\n" * 300
    activity = b"<FlexQueryResponse queryName='Activity'/>\n" * 4000
    jane = b"account,U20343697\n" + b"1,2,3\n" * 1000
    john = b"account,U1111111\n" + b"4,5,6\n" * 1000
    firm = b"firm summary without an account\n"
    bundle = zip_bytes(
        {
            "Firm_2025_Q4_2025_Q4/Jane_Doe_U20343697_October_01_2025_December_31_2025.csv": jane,
            "Firm_2025_Q4_2025_Q4/John_Roe_U1111111_October_01_2025_December_31_2025.csv": john,
        }
    )
    unsorted = b"a report with a name nobody parses\n"
    remote = {
        "U4698258.Trade_History.20260901.20260901.xml.pgp": sender.encrypt(trade),
        "U4698258.Equity_Summary_in_Base.20260901.20260901.xml.asc": sender.encrypt(
            equity, armor=True
        ),
        "U4698258.Activity.20260901.20260930.xml.gz.gpg": sender.encrypt(gzip.compress(activity)),
        "F9999999.Firm_Bundle.20251001.20251231.zip.pgp": sender.encrypt(
            zip_bytes({"Firm_Summary.txt": firm})
        ),
        "Firm_2025_Q4_2025_Q4.zip.pgp": sender.encrypt(bundle),
        "statement export.pgp": sender.encrypt(unsorted),
        # Failures, each quarantined with its reason while the rest are archived:
        "corrupt.pgp": os.urandom(4000),
        "for-someone-else.pgp": sender.encrypt(b"not ours", recipient=stranger),
        "truncated.pgp": sender.encrypt(trade)[:-200],
        "zipslip.zip.pgp": sender.encrypt(zip_bytes({"../../evil.csv": b"x"})),
    }
    sender.stop()
    for name, data in remote.items():
        (sftp_dir / name).write_bytes(data)

    env = env_for(run_project, sshd)
    before = utc_day()
    result = run_project.run("run", env=env)
    assert result.returncode == 1, result.stderr  # some failed, the rest archived
    day = fetched_day(run_project, "statement export.pgp", between=(before, utc_day()))
    expected = {
        "U4698258/2026/U4698258.Trade_History.20260901.20260901.xml": sha(trade),
        "U4698258/2026/U4698258.Equity_Summary_in_Base.20260901.20260901.xml": sha(equity),
        "U4698258/2026/U4698258.Activity.20260901.20260930.xml": sha(activity),
        "F9999999/2025/Firm_Summary.txt": sha(firm),
        "U20343697/2025/Jane_Doe_U20343697_October_01_2025_December_31_2025.csv": sha(jane),
        "U1111111/2025/John_Roe_U1111111_October_01_2025_December_31_2025.csv": sha(john),
        f"_unsorted/{day}/statement export": sha(unsorted),
    }
    assert archive_tree(run_project) == expected

    root = run_project.root / "archive"
    quarantined = {p.name for p in (root / ".quarantine").iterdir()}
    for name in ("corrupt.pgp", "for-someone-else.pgp", "truncated.pgp", "zipslip.zip.pgp"):
        assert name in quarantined and f"{name}.error.txt" in quarantined
        report = (root / ".quarantine" / f"{name}.error.txt").read_text()
        assert "what failed:" in report and "what to do:" in report
        assert PGP_PASSPHRASE not in report
        assert (root / ".quarantine" / name).read_bytes() == remote[name]
    assert stranger[-16:] in (root / ".quarantine" / "for-someone-else.pgp.error.txt").read_text()
    assert not list(run_project.root.rglob("evil.csv"))
    # The ciphertext of every archived file is kept as fetched; the inbox is empty.
    kept = {p.name: p.read_bytes() for p in (root / ".encrypted").iterdir()}
    assert kept == {n: d for n, d in remote.items() if n not in quarantined}
    assert [p.name for p in (root / ".inbox").iterdir()] == []

    status = run_project.ok("status", env=env)
    assert "U20343697" in status.stdout and "2025-12-31" in status.stdout
    assert "U4698258" in status.stdout and "2026-09-30" in status.stdout
    assert "In quarantine: 4" in status.stdout
    assert "for-someone-else.pgp:" in status.stdout

    # A second run changes nothing: no new file, no second copy.
    with sqlite3.connect(root / "index.sqlite3") as db:
        archived_before = db.execute("SELECT COUNT(*) FROM archived").fetchone()[0]
    again = run_project.run("run", env=env)
    assert again.returncode == 0, again.stderr
    assert "fetched 0 new" in again.stdout
    assert archive_tree(run_project) == expected
    with sqlite3.connect(root / "index.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM archived").fetchone()[0] == archived_before


def test_changed_content_is_kept_beside_and_same_content_never_twice(
    run_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> None:
    sender = make_sender(tmp_path, run_project.keys / "pgp-public.asc")
    name = "U4698258.Trade_History.20260901.20260901.xml"
    first, corrected = b"<first/>\n" * 100, b"<corrected/>\n" * 100
    env = env_for(run_project, sshd)
    (sftp_dir / f"{name}.pgp").write_bytes(sender.encrypt(first))
    run_project.ok("run", env=env)
    # IBKR re-issues the report with other content: kept beside, as NAME.v2.EXT.
    (sftp_dir / f"{name}.pgp").write_bytes(sender.encrypt(corrected))
    run_project.ok("run", env=env)
    # The same content encrypted again (a different ciphertext): recognised, not copied.
    (sftp_dir / f"{name}.pgp").write_bytes(sender.encrypt(corrected))
    run_project.ok("run", env=env)
    sender.stop()
    assert archive_tree(run_project) == {
        f"U4698258/2026/{name}": sha(first),
        "U4698258/2026/U4698258.Trade_History.20260901.20260901.v2.xml": sha(corrected),
    }


def test_retry_quarantine_after_the_missing_key_is_imported(
    run_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> None:
    stranger_home, stranger = stranger_key(tmp_path)
    sender = make_sender(tmp_path, tmp_path / "stranger-public.asc")
    (sftp_dir / "late.pgp").write_bytes(sender.encrypt(b"late report", recipient=stranger))
    sender.stop()
    env = env_for(run_project, sshd)
    before = utc_day()
    assert run_project.run("run", env=env).returncode == 1
    day = fetched_day(run_project, "late.pgp", between=(before, utc_day()))
    # The user imports the other secret key (say, from an old machine) and retries.
    secret = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(stranger_home),
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--armor",
            "--export-secret-keys",
        ],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(
        ["gpg", "--homedir", str(run_project.keys / "gnupg"), "--batch", "--import"],
        input=secret,
        capture_output=True,
        check=True,
    )
    subprocess.run(["gpgconf", "--homedir", str(stranger_home), "--kill", "gpg-agent"], check=False)
    result = run_project.run("decrypt", "--retry-quarantine", env=env)
    assert result.returncode == 0, result.stderr
    assert archive_tree(run_project) == {f"_unsorted/{day}/late": sha(b"late report")}
    assert list((run_project.root / "archive" / ".quarantine").iterdir()) == []


def test_fetch_then_decrypt_separately_and_delete_after_archive(
    run_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> None:
    sender = make_sender(tmp_path, run_project.keys / "pgp-public.asc")
    good = "U4698258.Trade_History.20260902.20260902.xml.pgp"
    (sftp_dir / good).write_bytes(sender.encrypt(b"<ok/>"))
    (sftp_dir / "bad.pgp").write_bytes(b"not pgp at all" * 100)
    sender.stop()
    env = env_for(run_project, sshd)
    run_project.ok("fetch", env=env)
    assert run_project.run("decrypt", env=env).returncode == 1
    assert archive_tree(run_project) == {
        "U4698258/2026/U4698258.Trade_History.20260902.20260902.xml": sha(b"<ok/>")
    }
    run_project.config.write_text(
        run_project.config.read_text().replace(
            "delete_after_archive = false", "delete_after_archive = true"
        )
    )
    result = run_project.ok("run", env=env)
    assert "deleted 1 archived file(s) on the server" in result.stdout
    assert not (sftp_dir / good).exists()
    assert (sftp_dir / "bad.pgp").exists()  # never deleted: its content is not archived


def test_decrypt_without_a_secret_key_is_a_key_problem(
    run_project: Project, sshd: SshdServer
) -> None:
    shutil.rmtree(run_project.keys / "gnupg")
    result = run_project.run("run", env=env_for(run_project, sshd))
    assert result.returncode == 3
    assert "keys pgp" in result.stderr


@pytest.mark.parametrize(
    ("refused", "what"),
    [("archiver", "the archive threads"), ("transport", "the SSH connection's thread")],
)
def test_a_run_at_a_thread_limit_fails_with_the_limit_and_records_it(
    run_project: Project,
    sshd: SshdServer,
    sftp_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    refused: str,
    what: str,
) -> None:
    # At a thread limit (ulimit -u, a container's pids.max): a clear error and a failed run in
    # the ledger, not a traceback and a run left "started" for ever; nothing is downloaded.
    # The archiver is the run's first thread; paramiko's transport thread is the connection's.
    (sftp_dir / "U1234567.Trade_History.20260901.20260901.xml.pgp").write_bytes(b"ciphertext")
    monkeypatch.setenv("IBKR_SSH_PASSPHRASE", sshd.client_key_passphrase or "")
    monkeypatch.setenv("IBKR_PGP_PASSPHRASE", PGP_PASSPHRASE)
    start = threading.Thread.start

    def limited(thread: threading.Thread) -> None:
        if refused == "archiver" and thread.name == "archiver":
            raise RuntimeError("can't start new thread")
        if refused == "transport" and isinstance(thread, paramiko.Transport):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", limited)
    before = set(threading.enumerate())
    with pytest.raises(StatementsError) as raised:
        pipeline.run_from_config(config.load(run_project.config))
    assert f"Cannot start {what}" in raised.value.message
    assert "can't start new thread" in raised.value.message
    hint = raised.value.hint or ""
    assert "ulimit -u" in hint and "workers" not in hint  # neither follows [sftp] workers
    assert raised.value.exit_code == ExitCode.CONFIG
    with Ledger.open(run_project.root / "archive") as ledger:
        (last,) = ledger.recent_runs()
        assert (last.result, last.exit_code) == ("failed", int(ExitCode.CONFIG))
        assert last.message is not None and "thread limit" in last.message
        assert ledger.fetched_rows() == []
    inbox = run_project.root / "archive" / ".inbox"
    assert not inbox.exists() or list(inbox.iterdir()) == []
    assert [t.name for t in threading.enumerate() if t not in before] == []


def test_a_run_whose_extra_connections_meet_a_thread_limit_fetches_everything_over_one(
    run_project: Project,
    sshd: SshdServer,
    sftp_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # paramiko runs a thread per connection: at a thread limit the listing's connection is
    # the only one. The workers that cannot connect leave their files to it; none fails.
    sender = make_sender(tmp_path, run_project.keys / "pgp-public.asc")
    plain = {
        f"U1234567.Trade_History.2026090{day}.2026090{day}.xml": b"<Trade day='%d'/>\n" % day * 300
        for day in range(1, 8)
    }
    for name, data in plain.items():
        (sftp_dir / f"{name}.pgp").write_bytes(sender.encrypt(data))
    harness.set_option(run_project, "workers = 4 ", "workers = 3 ")
    monkeypatch.setenv("IBKR_SSH_PASSPHRASE", sshd.client_key_passphrase or "")
    monkeypatch.setenv("IBKR_PGP_PASSPHRASE", PGP_PASSPHRASE)
    start = threading.Thread.start
    transports: list[str] = []

    def limited(thread: threading.Thread) -> None:
        if isinstance(thread, paramiko.Transport):
            transports.append(thread.name)
            if len(transports) > 1:
                raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", limited)
    cycle = pipeline.run_from_config(config.load(run_project.config))
    assert (cycle.fetch.fetched, cycle.fetch.failures) == (7, [])
    assert (cycle.archive.archived_files, cycle.archive.failures) == (7, [])
    assert len(transports) == 3  # the first connection, and one refused try by each other worker
    assert caplog.text.count("leaves its files to the other connections: Cannot start") == 2
    tree = archive_tree(run_project)
    assert tree == {f"U1234567/2026/{n}": sha(d) for n, d in plain.items()}
