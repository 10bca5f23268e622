"""Secrets, key trust and a full disk, end to end: the real CLI, a real sshd, the real gpg.

- PGP failures: each file that cannot be accepted ends in quarantine with its own reason while
  the others are archived, and the run exits 1. That includes files that gpg itself decrypts
  with an expired or revoked key of ours: the decrypt policy refuses those on purpose.
- A full disk (a small tmpfs mounted as the archive root) during the download and during the
  decryption: a clear message, nothing corrupt, and the next run after space is freed completes.
- No passphrase or private-key material in any log line, error file, ledger, config, status
  output or process argument list, at debug level, for a good run and a failing one.
- Permissions stay private under ``umask 000``, and a key readable by others is refused.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shlex
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from statements.decrypt import DecryptFailed, Decryptor, parse_status, unusable_key
from tests.clitools import CONSOLE_SCRIPT, PGP_PASSPHRASE, SSH_PASSPHRASE, Project
from tests.harness import (
    archive_tree,
    assert_consistent,
    fingerprints,
    point_at,
    set_option,
    sha,
    sshd_project,
    stop_agent,
)
from tests.sshd import SshdServer

pytestmark = pytest.mark.integration

WRONG_PGP_PASSPHRASE = "wrong horse pgp battery"
PPK_PASSPHRASE = "ppk horse battery"
BACKUP_PASSPHRASE = "backup horse battery"
PRIVATE_MARKERS = ("PRIVATE KEY", "PuTTY-User-Key-File", "-----BEGIN PGP PRIVATE")
NO_SPACE = "No space left on the disk"
TRADE = "U1234567.Trade_History.20260105.20260105.xml"


# --- helpers -----------------------------------------------------------------------------------


def gpg(home: Path, *args: str, data: bytes = b"") -> bytes:
    """The gpg binary in batch mode; fails the test with gpg's own words."""
    done = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
        input=data,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, (args, done.stderr.decode(errors="replace"))
    return done.stdout


def gpg_with_passphrase(home: Path, passphrase: str, *args: str) -> None:
    """A gpg operation on a protected key: the passphrase on stdin, never in argv."""
    gpg(
        home, "--pinentry-mode", "loopback", "--passphrase-fd", "0", *args, data=passphrase.encode()
    )


def gpg_time(days_ago: int) -> str:
    """A --faked-system-time value: gpg makes and uses keys as if it were then."""
    return (datetime.now(UTC) - timedelta(days=days_ago)).strftime("%Y%m%dT%H%M%S")


@dataclass
class Homes:
    """Scratch GnuPG homes of one test; every agent they started is stopped afterwards."""

    base: Path
    made: list[Path] = field(default_factory=list)

    def new(self, name: str) -> Path:
        # Short paths: gpg-agent's socket lives in the home and a socket path holds ~107 bytes.
        home = self.base / name
        home.mkdir(mode=0o700)
        self.made.append(home)
        return home


@pytest.fixture
def homes(tmp_path: Path) -> Iterator[Homes]:
    made = Homes(tmp_path)
    yield made
    for home in made.made:
        stop_agent(home)


def make_key(
    home: Path, uid: str, *, encrypt: bool = True, expire: str = "never", when: str | None = None
) -> str:
    """An unprotected ed25519/cv25519 key pair (fast to make; secrecy is not the point)."""
    fake = ["--faked-system-time", when] if when else []
    nopass = ["--pinentry-mode", "loopback", "--passphrase", "", *fake]
    gpg(home, *nopass, "--quick-gen-key", uid, "ed25519", "cert,sign", expire)
    rows = gpg(home, "--with-colons", "--list-keys", uid).decode().splitlines()
    fpr = next(row.split(":")[9] for row in rows if row.startswith("fpr"))  # the primary's
    if encrypt:
        gpg(home, *nopass, "--quick-add-key", fpr, "cv25519", "encr", expire)
    return fpr


def copy_key(src: Path, dst: Path, fpr: str, *, secret: bool) -> None:
    export = "--export-secret-keys" if secret else "--export"
    key = gpg(src, "--pinentry-mode", "loopback", "--passphrase", "", "--armor", export, fpr)
    gpg(dst, "--import", data=key)


def revoke(home: Path, fpr: str) -> None:
    """Import the revocation certificate gpg made with the key (what a user would do)."""
    cert = (home / "openpgp-revocs.d" / f"{fpr}.rev").read_text()
    # gpg prefixes the armor line with ':' so that an accidental import does nothing.
    gpg(home, "--import", data=cert.replace(":-----BEGIN", "-----BEGIN").encode())


def encrypt(
    sender: Path,
    data: bytes,
    to: str,
    *,
    signer: str | None = None,
    when: str | None = None,
    armor: bool = False,
) -> bytes:
    """Encrypt (and sign) as IBKR does: gpg --trust-model always -r FPR [-u SIGNER --sign]."""
    args = ["--trust-model", "always", "-r", to]
    if signer:
        args += ["-u", signer, "--sign"]
    if when:
        args += ["--faked-system-time", when]
    if armor:
        args.append("--armor")
    return gpg(sender, *args, "--encrypt", data=data)


def own_fingerprint(project: Project) -> str:
    return fingerprints(project.keys / "gnupg")[0]


def sshd_env(project: Project, sshd: SshdServer, **extra: str) -> dict[str, str]:
    return project.env(IBKR_SSH_PASSPHRASE=sshd.client_key_passphrase, **extra)


@pytest.fixture
def run_project(
    keyed_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> Iterator[Project]:
    project = sshd_project(keyed_project, sshd, sftp_dir, tmp_path / "p")
    yield project
    project.stop_agent()


def what_failed(root: Path, name: str) -> str:
    """The "what failed:" line of a quarantined file's error report."""
    report = (root / ".quarantine" / f"{name}.error.txt").read_text()
    return next(line for line in report.splitlines() if line.startswith("what failed:"))


def quarantined(root: Path) -> set[str]:
    folder = root / ".quarantine"
    if not folder.exists():
        return set()
    return {p.name for p in folder.iterdir() if not p.name.endswith(".error.txt")}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- the expired/revoked policy on its own (no server) ------------------------------------------


def _record(
    trust: str = "u", expires: str = "", sub_trust: str = "u", sub_expires: str = ""
) -> dict[str, Any]:
    return {
        "fingerprint": "A" * 40,
        "trust": trust,
        "expires": expires,
        "subkey_info": {
            "B" * 16: {"fingerprint": "B" * 40, "trust": sub_trust, "expires": sub_expires}
        },
    }


def test_policy_judges_the_key_that_decrypted() -> None:
    """Policy rules: revoked beats expired; the primary key or the subkey that decrypted counts."""
    now = datetime(2026, 11, 21, tzinfo=UTC)
    past, future = "1790000000", "1900000000"  # 2026-09-21 and 2030-03-17
    assert unusable_key(_record(), "B" * 40, now) is None
    assert unusable_key(_record(expires=future, sub_expires=future), "B" * 40, now) is None
    expired = unusable_key(_record(trust="e", expires=past), "B" * 40, now)
    assert expired is not None and expired.kind == "key_expired" and expired.subkey is None
    assert expired.since == datetime.fromtimestamp(int(past), UTC)
    # A listing cached before the key expired still says "u": the date decides.
    stale = unusable_key(_record(sub_expires=past), "B" * 40, now)
    assert stale is not None and stale.kind == "key_expired" and stale.subkey == "B" * 40
    assert "subkey " + "B" * 40 in stale.describe()
    revoked = unusable_key(_record(trust="e", expires=past, sub_trust="r"), "B" * 40, now)
    assert revoked is not None and revoked.kind == "key_revoked"
    # Another subkey's state does not matter when it did not decrypt.
    assert unusable_key(_record(sub_trust="r"), "C" * 40, now) is None
    assert unusable_key(_record(trust="r"), "A" * 40, now) is not None

    lines = [
        "[GNUPG:] ENC_TO 952928A80D1EA054 1 0",
        "[GNUPG:] DECRYPTION_KEY 001a08639be2e9f90fea9c70952928a80d1ea054 "
        "0E0E4E72759EADB5AEE3A8209F3857D774F35E3B u",
    ]
    assert parse_status(lines).decryption_key == (
        "001A08639BE2E9F90FEA9C70952928A80D1EA054",
        "0E0E4E72759EADB5AEE3A8209F3857D774F35E3B",
    )
    assert parse_status(lines[:1]).decryption_key is None


def test_policy_refuses_expired_and_revoked_keys_and_writes_nothing(
    homes: Homes, tmp_path: Path
) -> None:
    """Decryptor: files for our expired or revoked key are refused and leave no output."""
    ours, sender = homes.new("o"), homes.new("s")
    then, later = gpg_time(60), gpg_time(59)
    good = make_key(ours, "Good <good@example.com>", when=then)
    old = make_key(ours, "Old <old@example.com>", expire="2d", when=then)
    for fpr in (good, old):
        copy_key(ours, sender, fpr, secret=False)
    plain = b"<FlexQueryResponse/>\n" * 100
    files = tmp_path / "in"
    files.mkdir()
    (files / "good.pgp").write_bytes(encrypt(sender, plain, good))
    (files / "old.pgp").write_bytes(encrypt(sender, plain, old, when=later))
    out = tmp_path / "out"
    out.mkdir()
    decryptor = Decryptor(ours, passphrase=None)
    decryptor.preflight()  # lists the keys once: the revoked key below comes after the listing

    assert decryptor.decrypt(files / "good.pgp", out / "good.xml").output.read_bytes() == plain
    with pytest.raises(DecryptFailed) as caught:
        decryptor.decrypt(files / "old.pgp", out / "old.xml")
    assert caught.value.kind == "key_expired", str(caught.value)
    assert f"PGP key {old}" in caught.value.message and "expired on" in caught.value.message
    old_subkey = fingerprints(ours)[-1]  # the subkey made last, with the key
    assert f"--quick-set-expire {old} 2y {old_subkey};" in str(caught.value.hint)
    assert "KEYEXPIRED" in "\n".join(caught.value.status_lines)

    # A key revoked and imported while the Decryptor runs: a new fingerprint, listed again.
    other = homes.new("r")
    revoked = make_key(other, "Revoked <rev@example.com>")
    copy_key(other, sender, revoked, secret=False)
    (files / "rev.pgp").write_bytes(encrypt(sender, plain, revoked))
    revoke(other, revoked)
    copy_key(other, ours, revoked, secret=True)
    with pytest.raises(DecryptFailed) as caught:
        decryptor.decrypt(files / "rev.pgp", out / "rev.xml")
    assert caught.value.kind == "key_revoked", str(caught.value)
    assert "keys pgp --force" in str(caught.value.hint)
    assert sorted(p.name for p in out.iterdir()) == ["good.xml"]  # no plaintext, no temp file


# --- PGP failures end to end -------------------------------------------------------------------


def test_pgp_failure_matrix_quarantines_each_with_its_reason(
    run_project: Project,
    sshd: SshdServer,
    sftp_dir: Path,
    homes: Homes,
    record_property: Any,
) -> None:
    """One run with a good file and seven bad ones: each bad one quarantined with its reason."""
    root = run_project.root / "archive"
    ours = run_project.keys / "gnupg"
    sender = homes.new("s")
    then, later = gpg_time(60), gpg_time(59)
    # IBKR's signing key, required by [pgp] signer_fingerprints; its public key is in our home.
    ibkr = make_key(sender, "IBKR Reports <reports@ibkr.example>", encrypt=False, when=then)
    impostor = make_key(sender, "Impostor <impostor@example.com>", encrypt=False, when=then)
    unknown = make_key(sender, "Unknown <unknown@example.com>", encrypt=False, when=then)
    for fpr in (ibkr, impostor):
        copy_key(sender, ours, fpr, secret=False)
    set_option(run_project, "signer_fingerprints = []", f'signer_fingerprints = ["{ibkr}"]')
    # Keys of ours that can no longer be used, kept in the home (an old key the user still has),
    # and a stranger's key that is not ours at all.
    scratch = homes.new("k")
    expired = make_key(scratch, "Old <old@example.com>", expire="2d", when=then)
    revoked = make_key(scratch, "Revoked <revoked@example.com>", when=then)
    stranger = make_key(scratch, "Stranger <stranger@example.com>", when=then)
    for fpr in (expired, revoked, stranger):
        copy_key(scratch, sender, fpr, secret=False)
    gpg(sender, "--import", str(run_project.keys / "pgp-public.asc"))
    own = own_fingerprint(run_project)
    revoke(scratch, revoked)
    for fpr in (expired, revoked):
        copy_key(scratch, ours, fpr, secret=True)

    plain = b"<FlexQueryResponse queryName='Trade History'/>\n" * 400
    good = encrypt(sender, plain, own, signer=ibkr)
    garbage = (
        b"-----BEGIN PGP MESSAGE-----\n\n"
        + b"hQIMA8gYpl1N0pRBAQ/+Kq0xGarbageGarbageGarbage0123456789abcdefABCDEF\n" * 20
        + b"=Zm9v\n-----END PGP MESSAGE-----\n"
    )
    files = {
        f"{TRADE}.pgp": good,
        "for-another-key.pgp": encrypt(sender, plain, stranger, signer=ibkr),
        "truncated.pgp": good[: len(good) // 2],
        "armored-garbage.asc": garbage,
        "unknown-signer.pgp": encrypt(sender, plain, own, signer=unknown),
        "other-signer.pgp": encrypt(sender, plain, own, signer=impostor),
        "expired-key.pgp": encrypt(sender, plain, expired, signer=ibkr, when=later),
        "revoked-key.pgp": encrypt(sender, plain, revoked, signer=ibkr, when=later),
    }
    expected = {
        "for-another-key.pgp": "which this project does not hold",
        "truncated.pgp": "is damaged or not a PGP message",
        "armored-garbage.asc": "is damaged or not a PGP message",
        "unknown-signer.pgp": f"has no good signature from the required signer {ibkr}: it is "
        f"signed by {unknown}, and that signature could not be checked",
        "other-signer.pgp": f"has no good signature from the required signer {ibkr}: it is "
        f"signed by {impostor}.",
        "expired-key.pgp": f"is encrypted to the PGP key {expired}, which expired on",
        "revoked-key.pgp": f"is encrypted to the PGP key {revoked}, which is revoked",
    }
    for name, data in files.items():
        (sftp_dir / name).write_bytes(data)

    result = run_project.run("-v", "run", env=sshd_env(run_project, sshd))

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "archived 1 file(s), quarantined 7" in result.stdout, result.stdout
    assert archive_tree(root) == {f"U1234567/2026/{TRADE}": sha(plain)}
    assert quarantined(root) == set(expected)
    for name, reason in expected.items():
        line = what_failed(root, name)
        assert reason in line, (name, line)
        assert (root / ".quarantine" / name).read_bytes() == files[name]  # the ciphertext, kept
        assert f"quarantined: {name}:" in result.stderr
    hint = (root / ".quarantine" / "expired-key.pgp.error.txt").read_text()
    assert f"--quick-set-expire {expired} 2y " in hint and "keys export" in hint
    assert "keys pgp --force" in (root / ".quarantine" / "revoked-key.pgp.error.txt").read_text()
    with contextlib.closing(sqlite3.connect(root / "index.sqlite3")) as db:
        failures = dict(
            db.execute("SELECT inbox_name, failure FROM fetched WHERE failure IS NOT NULL")
        )
    assert {name: what_failed(root, name) for name in failures} == {
        name: f"what failed: {failure}" for name, failure in failures.items()
    }
    assert set(failures) == set(expected)
    assert_consistent(root)
    record_property("tries", len(expected))
    record_property(
        "detail",
        "stranger, truncated, armored garbage, 2 untrusted signers, expired and revoked own keys",
    )


def serve_for(project: Project, sftp_dir: Path, homes: Homes, reports: dict[str, bytes]) -> None:
    """Put ``reports`` on the server, encrypted to the project's key as IBKR would."""
    sender = homes.new("s")
    gpg(sender, "--import", str(project.keys / "pgp-public.asc"))
    own = own_fingerprint(project)
    for name, data in reports.items():
        (sftp_dir / f"{name}.pgp").write_bytes(encrypt(sender, data, own))


def test_wrong_pgp_passphrase_quarantines_all_then_retry_archives(
    run_project: Project, sshd: SshdServer, sftp_dir: Path, homes: Homes
) -> None:
    """Wrong PGP passphrase: every file quarantined as such; a retry with the right one archives."""
    root = run_project.root / "archive"
    reports = {
        TRADE: b"<Trade/>\n" * 300,
        "U1234567.Equity_Summary.20260105.20260105.xml": b"<Equity/>\n" * 300,
    }
    serve_for(run_project, sftp_dir, homes, reports)

    wrong = sshd_env(run_project, sshd, IBKR_PGP_PASSPHRASE=WRONG_PGP_PASSPHRASE)
    result = run_project.run("run", env=wrong)

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert quarantined(root) == {f"{name}.pgp" for name in reports}
    for name in reports:
        assert "The PGP passphrase is wrong" in what_failed(root, f"{name}.pgp")
    assert archive_tree(root) == {}
    assert_consistent(root)

    retry = run_project.run("decrypt", "--retry-quarantine", env=sshd_env(run_project, sshd))

    assert retry.returncode == 0, (retry.stdout, retry.stderr)
    assert archive_tree(root) == {f"U1234567/2026/{n}": sha(d) for n, d in reports.items()}
    assert quarantined(root) == set() and not list((root / ".quarantine").iterdir())
    assert_consistent(root)


def test_own_key_expired_is_quarantined_and_the_hint_fixes_it(
    run_project: Project, sshd: SshdServer, sftp_dir: Path, homes: Homes
) -> None:
    """Our own PGP key expired: quarantined as such; the hint's commands renew it; retry works."""
    root = run_project.root / "archive"
    home = run_project.keys / "gnupg"
    own = own_fingerprint(run_project)
    report = b"<Trade/>\n" * 300
    serve_for(run_project, sftp_dir, homes, {TRADE: report})  # IBKR holds the key from before
    # The key and its subkey expire one second from now (gpg refuses a date in the past).
    for extra in ((), ("*",)):
        gpg_with_passphrase(home, PGP_PASSPHRASE, "--quick-set-expire", own, "seconds=1", *extra)
    time.sleep(2.5)
    env = sshd_env(run_project, sshd)

    result = run_project.run("run", env=env)

    assert result.returncode == 1, (result.stdout, result.stderr)
    line = what_failed(root, f"{TRADE}.pgp")
    assert f"is encrypted to the PGP key {own}, which expired on" in line, line
    assert "IBKR can no longer encrypt new reports" in line
    assert archive_tree(root) == {}

    # Follow the hint to the letter; gpg asks for the passphrase, given here on stdin.
    report_text = (root / ".quarantine" / f"{TRADE}.pgp.error.txt").read_text()
    hint = next(h for h in report_text.splitlines() if h.startswith("what to do:"))
    commands = re.findall(
        r"gpg --homedir \S+ --quick-set-expire [0-9A-F]{40} 2y(?: [0-9A-F]{40})?", hint
    )
    assert len(commands) == 2, hint
    for command in commands:
        argv = shlex.split(command)
        gpg_with_passphrase(Path(argv[2]), PGP_PASSPHRASE, *argv[3:])
    assert "`ibkr-statements keys export`" in hint
    run_project.ok("keys", "export", "--out", "out", "--account-last4", "1234", "--ip", "8.8.8.8")
    for sent in (run_project.keys / "pgp-public.asc", run_project.root / "out" / "pgp-public.asc"):
        shown = gpg(home, "--with-colons", "--show-keys", str(sent))
        assert all(
            row.split(":")[1] != "e"
            for row in shown.decode().splitlines()
            if row[:3] in ("pub", "sub")
        ), shown  # what `keys export` sends IBKR is no longer expired

    retry = run_project.run("decrypt", "--retry-quarantine", env=env)

    assert retry.returncode == 0, (retry.stdout, retry.stderr)
    assert archive_tree(root) == {f"U1234567/2026/{TRADE}": sha(report)}
    assert_consistent(root)


def test_own_key_revoked_is_quarantined_and_readable_by_hand(
    run_project: Project, sshd: SshdServer, sftp_dir: Path, homes: Homes
) -> None:
    """Our own PGP key revoked: quarantined as such; README's manual gpg command still reads it."""
    root = run_project.root / "archive"
    home = run_project.keys / "gnupg"
    own = own_fingerprint(run_project)
    report = b"<Trade/>\n" * 300
    serve_for(run_project, sftp_dir, homes, {TRADE: report})
    revoke(home, own)

    result = run_project.run("run", env=sshd_env(run_project, sshd))

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"PGP key {own}, which is revoked" in what_failed(root, f"{TRADE}.pgp")
    report_text = (root / ".quarantine" / f"{TRADE}.pgp.error.txt").read_text()
    assert "keys pgp --force" in report_text and "README" in report_text
    assert archive_tree(root) == {}
    assert_consistent(root)
    # README: "decrypt it by hand: gpg --homedir keys/gnupg --output FILE --decrypt ..."
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    manual = "gpg --homedir keys/gnupg --output FILE --decrypt archive/.quarantine/NAME"
    assert manual in readme
    argv = shlex.split(manual.replace("FILE", "read.xml").replace("NAME", f"{TRADE}.pgp"))
    subprocess.run(
        [argv[0], "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0", *argv[1:]],
        cwd=run_project.root,
        input=PGP_PASSPHRASE.encode(),
        capture_output=True,
        check=True,
    )
    assert (run_project.root / "read.xml").read_bytes() == report


# --- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, unmounted afterwards whatever happened; remount it bigger to free space."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"Cannot mount a tmpfs at {mount_point} ({done.stderr.strip()}): the disk-full tests "
            "need root (CI runs as root); run them as root.",
            pytrace=False,
        )
    try:
        yield mount_point
    finally:
        # sqlite3 connections (harness.assert_consistent's too) sit in reference cycles until
        # collected, and an open ledger file would keep the file system busy.
        gc.collect()
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def grow(mount_point: Path) -> None:
    """Free space the way a user would: here, by giving the file system more room."""
    subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)


def test_disk_full_during_download_then_completes_after_space_is_freed(
    run_project: Project,
    sshd: SshdServer,
    sftp_dir: Path,
    homes: Homes,
    small_disk: Path,
    record_property: Any,
) -> None:
    """Disk full while downloading a 5 MiB file: clear error, only a .part; completes after."""
    root = small_disk / "archive"
    set_option(run_project, 'root = "archive"', f'root = "{root}"')
    report = os.urandom(5 * 1024 * 1024)  # incompressible: the ciphertext is as big
    serve_for(run_project, sftp_dir, homes, {TRADE: report})
    env = sshd_env(run_project, sshd)

    result = run_project.run("run", env=env)

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert NO_SPACE in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    inbox = sorted(p.name for p in (root / ".inbox").iterdir())
    assert inbox == [f"{TRADE}.pgp.part"], inbox
    stopped_at = (root / ".inbox" / f"{TRADE}.pgp.part").stat().st_size
    assert archive_tree(root) == {} and quarantined(root) == set()
    assert_consistent(root)

    grow(small_disk)
    again = run_project.run("run", env=env)

    assert again.returncode == 0, (again.stdout, again.stderr)
    assert archive_tree(root) == {f"U1234567/2026/{TRADE}": sha(report)}
    assert list((root / ".inbox").iterdir()) == []
    assert_consistent(root)
    record_property(
        "detail",
        f"3 MiB tmpfs: the 5 MiB download stopped at {stopped_at} bytes, resumed at 64 MiB",
    )


def test_disk_full_during_decrypt_keeps_the_file_waiting_then_completes(
    run_project: Project,
    sshd: SshdServer,
    sftp_dir: Path,
    homes: Homes,
    small_disk: Path,
    record_property: Any,
) -> None:
    """Disk full while decrypting (small ciphertext, 10 MiB plaintext): waits in the inbox."""
    root = small_disk / "archive"
    set_option(run_project, 'root = "archive"', f'root = "{root}"')
    line = b'<Trade accountId="U1234567" symbol="AAPL" quantity="25" tradePrice="228.15"/>\n'
    report = line * (10 * 1024 * 1024 // len(line))
    serve_for(run_project, sftp_dir, homes, {TRADE: report})
    ciphertext = (sftp_dir / f"{TRADE}.pgp").stat().st_size
    assert ciphertext < 200_000  # gpg compressed it
    env = sshd_env(run_project, sshd)

    result = run_project.run("run", env=env)

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert NO_SPACE in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert [p.name for p in (root / ".inbox").iterdir()] == [f"{TRADE}.pgp"]  # waits, whole
    assert quarantined(root) == set()
    assert archive_tree(root) == {}
    partial = [
        p
        for p in root.rglob("*")
        if p.is_file() and (".work" in p.parts or p.name.endswith((".tmp", ".part")))
    ]
    assert partial == []
    with contextlib.closing(sqlite3.connect(root / "index.sqlite3")) as db:
        last_run = db.execute("SELECT result, message FROM runs ORDER BY id DESC").fetchone()
    assert last_run[0] == "failed" and NO_SPACE in last_run[1], last_run
    assert_consistent(root)

    grow(small_disk)
    again = run_project.run("decrypt", env=env)

    assert again.returncode == 0, (again.stdout, again.stderr)
    assert archive_tree(root) == {f"U1234567/2026/{TRADE}": sha(report)}
    assert_consistent(root)
    record_property(
        "detail", f"3 MiB tmpfs: {ciphertext} bytes of ciphertext, {len(report)} of plaintext"
    )


# --- no secret anywhere it could leak ----------------------------------------------------------


class ArgvSampler(threading.Thread):
    """Every 50 ms, the argument lists (``ps -ww``) of a process, its descendants, and any
    process naming ``folder`` (gpg-agent leaves the tree when it daemonizes)."""

    def __init__(self, pid: int, folder: Path) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.folder = str(folder)
        self.seen: set[str] = set()
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            listing = subprocess.run(
                ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True
            ).stdout
            parents: dict[int, int] = {}
            args: dict[int, str] = {}
            for row in listing.splitlines():
                pid, ppid, *rest = row.split(None, 2)
                parents[int(pid)], args[int(pid)] = int(ppid), rest[0] if rest else ""
            ours = {self.pid}
            while True:
                more = {pid for pid, ppid in parents.items() if ppid in ours} - ours
                if not more:
                    break
                ours |= more
            self.seen |= {args[p] for p in ours if p in args}
            self.seen |= {a for a in args.values() if self.folder in a}
            self.samples += 1
            self.done.wait(0.05)


@dataclass
class Watched:
    returncode: int
    stdout: str
    stderr: str
    argv_seen: set[str]
    samples: int


def run_watched(cwd: Path, env: dict[str, str], *args: str) -> Watched:
    """Run the real console script while sampling every process argument list it makes."""
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = ArgvSampler(process.pid, cwd)
    sampler.start()
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        sampler.done.set()
        sampler.join()
    return Watched(process.returncode, stdout, stderr, sampler.seen, sampler.samples)


def ledger_dump(root: Path) -> str:
    """Every table of the ledger as SQL text, as the sqlite3 shell writes it."""
    return subprocess.run(
        ["sqlite3", str(root / "index.sqlite3"), ".dump"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def key_body_lines(private_key: Path) -> list[str]:
    """The base64 lines of a PEM-style private key file: any one of them is a leak."""
    return [
        line
        for line in private_key.read_text().splitlines()
        if line and not line.startswith("-----") and len(line) >= 40
    ]


def leaks(texts: dict[str, str], secrets: list[str]) -> list[str]:
    return [
        f"{where}: {secret[:12]}..."
        for where, text in texts.items()
        for secret in secrets
        if secret in text
    ]


def test_no_passphrase_or_private_key_in_logs_errors_ledger_or_argv(
    run_project: Project,
    sshd: SshdServer,
    sftp_dir: Path,
    homes: Homes,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """Demo and a failing run at debug level: no passphrase or private key in any output or argv."""
    texts: dict[str, str] = {}
    argv: set[str] = set()
    samples = 0
    clean = {k: v for k, v in run_project.env().items() if not k.startswith("IBKR_")}

    # 1. The demo, through the real command line, at debug level.
    demo_dir = tmp_path / "d"
    homes.made.append(demo_dir / "keys" / "gnupg")  # its agent is stopped after the test
    demo = run_watched(tmp_path, clean, "-v", "demo", "--dir", str(demo_dir))
    assert demo.returncode == 0, (demo.stdout, demo.stderr)
    assert any(a.split()[0].endswith("gpg") for a in demo.argv_seen if a), demo.argv_seen
    demo_config = demo_dir / "config" / "ibkr-statements.toml"
    demo_status = run_watched(tmp_path, clean, "-v", "--config", str(demo_config), "status")
    assert demo_status.returncode == 0, demo_status.stderr
    for label, done in (("demo", demo), ("demo status", demo_status)):
        texts[f"{label} stdout"], texts[f"{label} stderr"] = done.stdout, done.stderr
        argv |= done.argv_seen
        samples += done.samples
    texts["demo config"] = demo_config.read_text()
    texts["demo ledger"] = ledger_dump(demo_dir / "archive")
    demo_secrets = [
        (demo_dir / "keys" / "ssh-passphrase").read_text().strip(),
        (demo_dir / "keys" / "pgp-passphrase").read_text().strip(),
        *key_body_lines(demo_dir / "keys" / "ibkr_rsa"),
    ]

    # 2. A failing run: the wrong PGP passphrase and a corrupt file, JSON logs at debug level;
    #    then the retry with the right passphrase, the status and the doctor.
    root = run_project.root / "archive"
    serve_for(run_project, sftp_dir, homes, {TRADE: b"<Trade/>\n" * 300})
    (sftp_dir / "corrupt.pgp").write_bytes(os.urandom(3000))
    wrong = sshd_env(run_project, sshd, IBKR_PGP_PASSPHRASE=WRONG_PGP_PASSPHRASE)
    right = sshd_env(run_project, sshd)
    steps = (
        ("failing run", wrong, ("-v", "--log-format", "json", "run"), 1),
        ("retry", right, ("-v", "decrypt", "--retry-quarantine"), 1),
        ("status", right, ("-v", "status"), 0),
        ("doctor", right, ("-v", "doctor"), 0),
    )
    for label, env, args, code in steps:
        done = run_watched(run_project.root, env, *args)
        assert done.returncode == code, (label, done.stdout, done.stderr)
        texts[f"{label} stdout"], texts[f"{label} stderr"] = done.stdout, done.stderr
        argv |= done.argv_seen
        samples += done.samples
    assert "The PGP passphrase is wrong" in texts["failing run stderr"]
    assert quarantined(root) == {"corrupt.pgp"}  # the good file was archived by the retry
    texts["config"] = run_project.config.read_text()
    texts["ledger"] = ledger_dump(root)
    for path in sorted((root / ".quarantine").glob("*.error.txt")):
        texts[f"error file {path.name}"] = path.read_text()
    texts["argv"] = "\n".join(sorted(argv))

    secrets = [
        *demo_secrets,
        SSH_PASSPHRASE,
        PGP_PASSPHRASE,
        WRONG_PGP_PASSPHRASE,
        sshd.client_key_passphrase,
        *PRIVATE_MARKERS,
        *key_body_lines(run_project.keys / "ibkr_rsa"),
    ]
    assert all(len(s) >= 8 for s in secrets)  # long enough not to match by chance
    assert leaks(texts, secrets) == []
    scanned = sum(len(t) for t in texts.values())
    record_property("tries", len(texts))
    record_property(
        "detail",
        f"{len(secrets)} secrets and markers in {scanned} characters of logs, error files, "
        f"ledgers, configs, status and {len(argv)} argument lists from {samples} ps samples",
    )


# --- permissions under umask 000 ---------------------------------------------------------------


def private_problems(project: Project) -> list[str]:
    """Where a project's secrets or archive could be read (or its config changed) by others.

    The promises: keys/ and the GnuPG home 0700, private key files and backups 0600 (fsutil:
    "never left to the umask"); every archive folder 0700 and every file in it 0600 (archive.py:
    "statements are private"); the config folder not writable by others (a config names the gpg
    binary that runs); an export folder outside keys/ not writable by others (the public keys in
    it go to IBKR).
    """
    problems: list[str] = []

    def want(path: Path, expected: int) -> None:
        if path.exists() and mode(path) != expected:
            problems.append(
                f"{path.relative_to(project.root)} is {mode(path):04o}, not {expected:04o}"
            )

    keys, home = project.keys, project.keys / "gnupg"
    want(keys, 0o700)
    for path in keys.glob("ibkr_rsa*"):
        if ".pub" not in path.name:
            want(path, 0o600)  # the key, and every older key kept aside by --force
    for path in keys.glob("*-passphrase"):
        want(path, 0o600)
    want(home, 0o700)
    for folder in ("private-keys-v1.d", "openpgp-revocs.d"):
        want(home / folder, 0o700)
        for path in (home / folder).glob("*"):
            want(path, 0o600)
    for path in project.root.glob("*.backup"):
        want(path, 0o600)
    archive = project.root / "archive"
    if archive.exists():
        for path in [archive, *archive.rglob("*")]:
            want(path, 0o700 if path.is_dir() else 0o600)
    config, request = project.config.parent, project.root / "request"
    if config.exists() and mode(config) & 0o022:
        problems.append(f"config/ is {mode(config):04o}: others may replace the configuration")
    if request.exists() and mode(request) & 0o022:
        problems.append(f"request/ is {mode(request):04o}: others may swap the keys sent to IBKR")
    return problems


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)  # inherited by every command the test runs
    try:
        yield
    finally:
        os.umask(old)


def test_permissions_stay_private_under_umask_000_and_loose_key_is_refused(
    umask_000: None,
    sshd: SshdServer,
    sftp_dir: Path,
    homes: Homes,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """umask 000: every command writing keys or archive leaves them private; a 0644 key refused."""
    project = Project(tmp_path / "u")
    project.root.mkdir()
    restored = Project(tmp_path / "r")
    restored.root.mkdir()
    homes.made += [project.keys / "gnupg", restored.keys / "gnupg"]
    extra = {"IBKR_PPK_PASSPHRASE": PPK_PASSPHRASE, "IBKR_BACKUP_PASSPHRASE": BACKUP_PASSPHRASE}
    # The sshd's client key as a passphrase-protected PuTTY file, as a Windows user would bring.
    secret_file = tmp_path / "ppk-passphrase"
    secret_file.write_text(PPK_PASSPHRASE)
    old_secret = tmp_path / "old-passphrase"
    old_secret.write_text(sshd.client_key_passphrase)
    ppk = tmp_path / "login.ppk"
    subprocess.run(
        ["puttygen", str(sshd.client_key_path), "--old-passphrase", str(old_secret), "-O",
         "private", "-o", str(ppk), "--new-passphrase", str(secret_file)],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    sender = homes.new("s")
    checked: list[str] = []

    def step(who: Project, *args: str) -> None:
        who.ok(*args, env=who.env(**extra))
        assert private_problems(who) == [], (args, private_problems(who))
        checked.append(" ".join(args[:2]))

    step(project, "init")
    step(project, "keys", "ssh", "--bits", "2048")
    step(
        project, "keys", "pgp", "--name", "Umask Zero", "--email", "u@example.com", "--bits", "2048"
    )
    point_at(
        project, host=sshd.host, port=sshd.port, username=sshd.username, remote_dir=str(sftp_dir)
    )
    step(project, "trust-host", "--fingerprint", sshd.host_key_fingerprints[0])
    step(project, "keys", "import-ppk", str(ppk), "--force")
    assert list(project.keys.glob("ibkr_rsa.replaced-*"))  # the old pair, kept aside, still 0600
    step(project, "keys", "export", "--account-last4", "1234", "--ip", "8.8.8.8")
    step(
        project, "keys", "export", "--out", "request", "--account-last4", "1234", "--ip", "8.8.8.8"
    )
    step(project, "keys", "backup", str(project.root / "keys.backup"))
    step(restored, "init")
    step(restored, "keys", "restore", str(project.root / "keys.backup"))

    gpg(sender, "--import", str(project.keys / "pgp-public.asc"))
    own = own_fingerprint(project)
    first, second = b"<First/>\n" * 200, b"<Second/>\n" * 200
    (sftp_dir / f"{TRADE}.pgp").write_bytes(encrypt(sender, first, own))
    step(project, "fetch")
    step(project, "decrypt")
    later = "U1234567.Trade_History.20260106.20260106.xml"
    (sftp_dir / f"{later}.pgp").write_bytes(encrypt(sender, second, own))
    step(project, "run")
    root = project.root / "archive"
    assert archive_tree(root) == {
        f"U1234567/2026/{TRADE}": sha(first),
        f"U1234567/2026/{later}": sha(second),
    }

    # A private key others can read: refused like OpenSSH does, and doctor says how to fix it.
    key = project.keys / "ibkr_rsa"
    key.chmod(0o644)
    refused = project.run("fetch", env=project.env())
    assert refused.returncode == 3, (refused.stdout, refused.stderr)
    assert f"chmod 600 {key}" in refused.stderr, refused.stderr
    doctor = project.run("doctor", env=project.env())
    assert doctor.returncode != 0
    failed = [line for line in doctor.stdout.splitlines() if line.strip().startswith("FAILED")]
    assert any("readable by other users" in line for line in failed), doctor.stdout
    assert f"fix: Run: chmod 600 {key}" in doctor.stdout, doctor.stdout
    record_property("tries", len(checked) + 2)
    record_property("detail", "checked after: " + ", ".join(checked))
