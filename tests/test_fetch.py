"""`ibkr-statements fetch` against a real OpenSSH sshd and the in-process sandbox server."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from statements.fsutil import DIRECT_WRITE_BYTES, DirectWriter
from statements.sandbox import SandboxServer, generate_ed25519_key
from tests.clitools import CONSOLE_SCRIPT, Project
from tests.harness import cached_bytes
from tests.sshd import SshdServer

pytestmark = pytest.mark.integration


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_project(
    root: Path,
    *,
    host: str,
    port: int,
    username: str,
    remote_dir: str,
    key_path: Path,
    known_hosts: str,
    extra: str = "",
    retries: int = 2,
) -> Project:
    (root / "config").mkdir(parents=True)
    keys = root / "keys"
    keys.mkdir(mode=0o700)
    shutil.copy(key_path, keys / "ibkr_rsa")
    (keys / "ibkr_rsa").chmod(0o600)
    (keys / "known_hosts").write_text(known_hosts)
    (root / "config" / "ibkr-statements.toml").write_text(
        f'[sftp]\nhost = "{host}"\nport = {port}\nusername = "{username}"\n'
        f'remote_dir = "{remote_dir}"\ntimeout_s = 5\nretries = {retries}\nretry_backoff_s = 0.1\n'
        f"{extra}"
    )
    return Project(root)


def sshd_project(root: Path, sshd: SshdServer, sftp_dir: Path) -> Project:
    return make_project(
        root,
        host=sshd.host,
        port=sshd.port,
        username=sshd.username,
        remote_dir=str(sftp_dir),
        key_path=sshd.client_key_path,
        known_hosts=sshd.known_hosts_path.read_text(),
    )


@pytest.fixture
def fetch_project(sshd: SshdServer, sftp_dir: Path, tmp_path: Path) -> Project:
    return sshd_project(tmp_path / "p", sshd, sftp_dir)


def env_for(project: Project, sshd: SshdServer) -> dict[str, str]:
    return project.env(IBKR_SSH_PASSPHRASE=sshd.client_key_passphrase)


def reports(folder: Path, count: int, size: int = 2000, prefix: str = "U1234567") -> dict[str, str]:
    made = {}
    for i in range(count):
        name = f"{prefix}.Trade_History.202609{i + 1:02d}.202609{i + 1:02d}.xml.pgp"
        (folder / name).write_bytes(os.urandom(size + i))
        made[name] = sha(folder / name)
    return made


def inbox(project: Project) -> Path:
    return project.root / "archive" / ".inbox"


def ledger_rows(project: Project) -> list[tuple[str, int, str, int, int]]:
    with sqlite3.connect(project.root / "archive" / "index.sqlite3") as db:
        return db.execute(
            "SELECT remote_path, version, inbox_name, size, mtime FROM fetched ORDER BY id"
        ).fetchall()


def assert_inbox_matches_ledger(project: Project) -> None:
    """No file in the inbox without its ledger row, no row without its file; each file has its
    row's size and is dated with its row's remote mtime, which is how a later run knows it."""
    files = {p.name for p in inbox(project).iterdir() if not p.name.endswith(".part")}
    rows = ledger_rows(project)
    assert files == {r[2] for r in rows}
    for _, _, name, size, mtime in rows:
        info = (inbox(project) / name).stat()
        assert (info.st_size, int(info.st_mtime)) == (size, mtime), name


# --- against OpenSSH -------------------------------------------------------------------------


def test_first_fetch_is_byte_identical_and_second_fetches_nothing(
    fetch_project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    expected = reports(sftp_dir, 12, size=150_000)
    (sftp_dir / "notes.txt").write_text("not a report")
    env = env_for(fetch_project, sshd)

    first = fetch_project.ok("fetch", env=env)
    assert "fetched 12 new, skipped 0" in first.stdout
    assert {p.name: sha(p) for p in inbox(fetch_project).iterdir()} == expected
    assert_inbox_matches_ledger(fetch_project)
    assert oct(inbox(fetch_project).stat().st_mode & 0o777) == "0o700"

    second = fetch_project.ok("fetch", env=env)
    assert "fetched 0 new, skipped 12" in second.stdout
    assert len(ledger_rows(fetch_project)) == 12


def test_new_and_changed_files_are_fetched_and_the_old_version_kept(
    fetch_project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    env = env_for(fetch_project, sshd)
    reports(sftp_dir, 3)
    fetch_project.ok("fetch", env=env)
    changed = sorted(sftp_dir.iterdir())[0]
    old_digest = sha(changed)
    changed.write_bytes(b"corrected report" * 100)
    new = reports(sftp_dir, 1, prefix="U7654321")

    result = fetch_project.ok("fetch", env=env)
    assert "fetched 2 new, skipped 2" in result.stdout
    assert sha(inbox(fetch_project) / changed.name) == old_digest
    assert sha(inbox(fetch_project) / f"{changed.name}.v2") == sha(changed)
    assert sha(inbox(fetch_project) / next(iter(new))) == next(iter(new.values()))
    assert_inbox_matches_ledger(fetch_project)


def test_dry_run_lists_and_changes_nothing(
    fetch_project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    names = reports(sftp_dir, 2)
    result = fetch_project.ok("fetch", "--dry-run", env=env_for(fetch_project, sshd))
    for name in names:
        assert f"would fetch {name}" in result.stdout
    assert not inbox(fetch_project).exists()


def test_hostile_names_are_refused_and_the_rest_land(
    fetch_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> None:
    good = reports(sftp_dir, 2)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret outside the folder")
    (sftp_dir / "link.pgp").symlink_to(outside)
    (sftp_dir / "dir.pgp").mkdir()
    (sftp_dir / ".hidden.pgp").write_text("x")
    (sftp_dir / "back\\slash.pgp").write_text("x")
    (sftp_dir / "new\nline.pgp").write_text("x")
    (sftp_dir / "a..b.pgp").write_text("x")

    result = fetch_project.ok("fetch", env=env_for(fetch_project, sshd))
    assert "fetched 2 new" in result.stdout and "refused 6" in result.stdout
    assert sorted(p.name for p in inbox(fetch_project).iterdir()) == sorted(good)
    with sqlite3.connect(fetch_project.root / "archive" / "index.sqlite3") as db:
        refused = dict(db.execute("SELECT remote_name, reason FROM refused").fetchall())
    assert refused["link.pgp"].startswith("is a symbolic link")
    assert refused["dir.pgp"] == "is not a regular file"
    assert refused[".hidden.pgp"] == "starts with '.'"
    assert refused["back\\slash.pgp"] == "contains a path separator"
    assert refused[repr("new\nline.pgp")] == "contains a line break"
    assert refused["a..b.pgp"] == "is or contains '..'"


def test_unknown_host_key_exits_4_and_writes_nothing(
    fetch_project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    reports(sftp_dir, 1)
    (fetch_project.keys / "known_hosts").write_text("")
    result = fetch_project.run("fetch", env=env_for(fetch_project, sshd))
    assert result.returncode == 4
    assert "not pinned" in result.stderr
    assert "ibkr-statements trust-host --fingerprint SHA256:" in result.stderr
    offered = result.stderr.split("--fingerprint ")[1].split()[0]
    assert offered in sshd.host_key_fingerprints
    assert not inbox(fetch_project).exists()


def test_changed_host_key_exits_4_with_both_fingerprints(
    fetch_project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    reports(sftp_dir, 1)
    impostor = generate_ed25519_key()
    (fetch_project.keys / "known_hosts").write_text(
        f"[{sshd.host}]:{sshd.port} ssh-ed25519 {impostor.get_base64()}\n"
    )
    result = fetch_project.run("fetch", env=env_for(fetch_project, sshd))
    assert result.returncode == 4
    assert "HOST KEY CHANGED" in result.stderr
    assert any(fp in result.stderr for fp in sshd.host_key_fingerprints)
    assert not inbox(fetch_project).exists()


def test_trust_host_pins_only_a_matching_fingerprint(
    fetch_project: Project, sshd: SshdServer
) -> None:
    known = fetch_project.keys / "known_hosts"
    known.write_text("")
    env = env_for(fetch_project, sshd)
    wrong = fetch_project.run("trust-host", "--fingerprint", "SHA256:" + "A" * 43, env=env)
    assert wrong.returncode == 4
    assert "Nothing was pinned" in wrong.stderr
    assert known.read_text() == ""
    no_terminal = fetch_project.run("trust-host", env=env)
    assert no_terminal.returncode == 2

    fingerprint = sshd.host_key_fingerprints[0]
    fetch_project.ok("trust-host", "--fingerprint", fingerprint, env=env)
    assert len(known.read_text().splitlines()) == 1
    fetch_project.ok("fetch", env=env)


def test_wrong_key_exits_4_naming_its_fingerprint(fetch_project: Project, sshd: SshdServer) -> None:
    env = fetch_project.env(IBKR_SSH_PASSPHRASE="")
    fetch_project.ok("keys", "ssh", "--bits", "2048", "--no-passphrase", "--force", env=env)
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", str(fetch_project.keys / "ibkr_rsa.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    result = fetch_project.run("fetch", env=env)
    assert result.returncode == 4
    assert "Server refused our key" in result.stderr
    assert fingerprint in result.stderr


def test_wrong_passphrase_or_unsafe_key_is_a_key_problem(
    fetch_project: Project, sshd: SshdServer
) -> None:
    result = fetch_project.run("fetch", env=fetch_project.env(IBKR_SSH_PASSPHRASE="wrong"))
    assert result.returncode == 3
    assert "Wrong passphrase" in result.stderr
    (fetch_project.keys / "ibkr_rsa").chmod(0o644)
    result = fetch_project.run("fetch", env=env_for(fetch_project, sshd))
    assert result.returncode == 3
    assert "chmod 600" in result.stderr


def test_many_files_in_parallel_workers(
    fetch_project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    expected = reports(sftp_dir, 60, size=20_000)
    fetch_project.ok("fetch", env=env_for(fetch_project, sshd))
    assert {p.name: sha(p) for p in inbox(fetch_project).iterdir()} == expected
    assert_inbox_matches_ledger(fetch_project)


def test_a_big_file_lands_past_the_page_cache(
    sshd: SshdServer, sftp_dir: Path, disk_folder: Path
) -> None:
    ((name, digest),) = reports(sftp_dir, 1, size=DIRECT_WRITE_BYTES + 12345).items()
    project = sshd_project(disk_folder / "p", sshd, sftp_dir)
    project.ok("fetch", env=env_for(project, sshd))
    landed = inbox(project) / name
    # Checked before anything reads it: only the last, partial buffer went through the cache.
    assert cached_bytes(landed) <= DirectWriter.CHUNK
    assert sha(landed) == digest
    assert_inbox_matches_ledger(project)


def test_killed_run_leaves_a_consistent_inbox_and_the_next_run_completes(
    fetch_project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    expected = reports(sftp_dir, 40, size=300_000)
    env = env_for(fetch_project, sshd)
    for delay in (0.4, 0.8, 1.2):
        process = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "fetch"],
            cwd=fetch_project.root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        if (
            inbox(fetch_project).exists()
            and (fetch_project.root / "archive/index.sqlite3").exists()
        ):
            names = {p.name for p in inbox(fetch_project).iterdir()}
            committed = {r[2] for r in ledger_rows(fetch_project)}
            # At most the files renamed in the instant before the kill lack their row.
            assert committed <= names
    fetch_project.ok("fetch", env=env)
    assert {p.name: sha(p) for p in inbox(fetch_project).iterdir()} == expected
    assert_inbox_matches_ledger(fetch_project)


# --- against the sandbox: faults sshd cannot do on demand ------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path, sshd: SshdServer) -> Iterator[SandboxServer]:
    root = tmp_path / "served"
    root.mkdir()
    public = sshd.client_public_line
    with SandboxServer(root, authorized_keys=[public], username="demo") as server:
        yield server


def _sandbox_project(
    sandbox: SandboxServer, sshd: SshdServer, disk_folder: Path, retries: int
) -> Project:
    return make_project(
        disk_folder / "sp",
        host=sandbox.host,
        port=sandbox.port,
        username="demo",
        remote_dir=".",
        key_path=sshd.client_key_path,
        known_hosts=sandbox.host_key_line() + "\n",
        retries=retries,
    )


@pytest.fixture
def sandbox_project(sandbox: SandboxServer, sshd: SshdServer, disk_folder: Path) -> Project:
    return _sandbox_project(sandbox, sshd, disk_folder, retries=2)


@pytest.fixture
def resuming_project(sandbox: SandboxServer, sshd: SshdServer, disk_folder: Path) -> Project:
    """For the drop tests. Their connections end with bytes still on the way, which the client
    never gets; on a loaded machine a whole connection can bring nothing, and three such in a
    row used up retries = 2 (seen once in CI). Counting fruitless attempts is the product's
    business; these tests are about resuming, so they allow more of them."""
    return _sandbox_project(sandbox, sshd, disk_folder, retries=8)


def test_dropped_connection_is_retried_and_resumed(
    sandbox: SandboxServer, resuming_project: Project, sshd: SshdServer
) -> None:
    expected = reports(sandbox.root, 1, size=3_000_000)
    sandbox.faults.drop_after_bytes = 1_000_000
    result = resuming_project.run("-v", "fetch", env=env_for(resuming_project, sshd))
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    assert {p.name: sha(p) for p in inbox(resuming_project).iterdir()} == expected
    assert sandbox.connections >= 3


def test_a_big_download_written_direct_resumes_after_a_drop(
    sandbox: SandboxServer, resuming_project: Project, sshd: SshdServer
) -> None:
    size = DIRECT_WRITE_BYTES + (4 << 20) + 12345
    ((name, digest),) = reports(sandbox.root, 1, size=size).items()
    # The server serves this much per connection, then drops it; the replies still on the way
    # are lost with it, so the client has received somewhat less. Written direct (the first
    # attempt) then resumed through the page cache from wherever that ended.
    limit = DIRECT_WRITE_BYTES + 4321
    sandbox.faults.drop_after_bytes = limit
    result = resuming_project.run("fetch", env=env_for(resuming_project, sshd))
    assert result.returncode == 0, result.stderr
    resumed = re.search(rf"resuming {re.escape(name)} at byte (\d+) of {size}\b", result.stderr)
    assert resumed is not None, result.stderr
    assert 0 < int(resumed[1]) <= limit
    assert sha(inbox(resuming_project) / name) == digest
    assert_inbox_matches_ledger(resuming_project)


def test_stalled_server_is_a_timeout_not_a_hang(
    sandbox: SandboxServer, sandbox_project: Project, sshd: SshdServer
) -> None:
    reports(sandbox.root, 1)
    sandbox.faults.stall_seconds = 60
    result = sandbox_project.run("fetch", env=env_for(sandbox_project, sshd))
    assert result.returncode == 4
    assert "timed out" in result.stderr or "Cannot reach" in result.stderr
    assert "firewall" in result.stderr or "TCP port" in result.stderr


def test_a_file_that_stalls_mid_transfer_fails_alone(
    sandbox: SandboxServer, sandbox_project: Project, sshd: SshdServer
) -> None:
    expected = reports(sandbox.root, 3)
    bad = sorted(expected)[1]
    sandbox.faults.fail_read_on = frozenset({bad})
    result = sandbox_project.run("fetch", env=env_for(sandbox_project, sshd))
    assert result.returncode == 1
    assert f"failed: {bad}" in result.stderr
    landed = {p.name for p in inbox(sandbox_project).iterdir() if not p.name.endswith(".part")}
    assert landed == set(expected) - {bad}
    assert_inbox_matches_ledger(sandbox_project)


def test_refused_key_on_sandbox_is_exit_4(
    sandbox: SandboxServer, sandbox_project: Project, sshd: SshdServer
) -> None:
    sandbox.faults.refuse_keys = True
    result = sandbox_project.run("fetch", env=env_for(sandbox_project, sshd))
    assert result.returncode == 4
    assert "Server refused our key" in result.stderr
    assert sandbox.connections == 1  # never retried


def test_ed25519_and_ecdsa_keys_log_in(
    fetch_project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    expected = reports(sftp_dir, 1)
    for path in (sshd.ed25519_key_path, sshd.ecdsa_key_path):
        shutil.copy(path, fetch_project.keys / "ibkr_rsa")
        shutil.rmtree(fetch_project.root / "archive", ignore_errors=True)
        fetch_project.ok("fetch", env=fetch_project.env(IBKR_SSH_PASSPHRASE=""))
        assert {p.name: sha(p) for p in inbox(fetch_project).iterdir()} == expected
