"""The key commands as a user runs them: the console script, real gpg, ssh-keygen, paramiko."""

from __future__ import annotations

import email
import email.policy
import os
import re
import stat
import subprocess
from email.message import EmailMessage
from pathlib import Path

import paramiko
import pytest

from tests.clitools import (
    CONSOLE_SCRIPT,
    PGP_PASSPHRASE,
    SSH_PASSPHRASE,
    Project,
    run_on_terminal,
)

pytestmark = pytest.mark.integration


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ssh_keygen_fingerprint(public: Path) -> tuple[int, str]:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), out[1]


def gpg_colons(home: Path, *args: str) -> list[list[str]]:
    out = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--with-colons", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split(":") for line in out.splitlines()]


def printed(result: subprocess.CompletedProcess[str], label: str) -> str:
    match = re.search(rf"^{label}:\s*(\S+)", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return match.group(1)


# --- keys ssh ------------------------------------------------------------------------------


def test_ssh_key_files_permissions_and_fingerprint(keyed_project: Project) -> None:
    keys = keyed_project.keys
    assert mode(keys) == 0o700
    assert mode(keys / "ibkr_rsa") == 0o600
    assert mode(keys / "ibkr_rsa.pub") == 0o644
    line = (keys / "ibkr_rsa.pub").read_text()
    assert line.count("\n") == 1 and line.startswith("ssh-rsa AAAA")
    assert (keys / "ibkr_rsa").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    bits, fingerprint = ssh_keygen_fingerprint(keys / "ibkr_rsa.pub")
    assert bits == 4096
    shown = keyed_project.ok("keys", "show").stdout
    assert f"SSH key fingerprint: {fingerprint}" in shown


def test_ssh_private_key_loads_in_paramiko_only_with_its_passphrase(
    keyed_project: Project,
) -> None:
    private = str(keyed_project.keys / "ibkr_rsa")
    key = paramiko.RSAKey.from_private_key_file(private, password=SSH_PASSPHRASE)
    public_blob = (keyed_project.keys / "ibkr_rsa.pub").read_text().split()[1]
    assert key.get_base64() == public_blob
    with pytest.raises(paramiko.SSHException):
        paramiko.RSAKey.from_private_key_file(private, password="wrong")
    # And the passphrase is nowhere in clear in the key folder.
    for path in keyed_project.keys.rglob("*"):
        if path.is_file():
            assert SSH_PASSPHRASE.encode() not in path.read_bytes(), path


def test_ssh_refuses_to_overwrite_and_force_keeps_the_old_pair(project: Project) -> None:
    keys = project.keys
    old_private = (keys / "ibkr_rsa").read_bytes()
    old_public = (keys / "ibkr_rsa.pub").read_bytes()
    refused = project.run("keys", "ssh", "--bits", "2048")
    assert refused.returncode == 3
    assert "already exists" in refused.stderr and "--force" in refused.stderr
    assert (keys / "ibkr_rsa").read_bytes() == old_private

    forced = project.ok("keys", "ssh", "--bits", "2048", "--force")
    kept = sorted(p.name for p in keys.glob("ibkr_rsa*.replaced-*"))
    assert len(kept) == 2, kept
    aside_private = next(keys.glob("ibkr_rsa.replaced-*"))
    aside_public = next(keys.glob("ibkr_rsa.pub.replaced-*"))
    assert aside_private.read_bytes() == old_private
    assert aside_public.read_bytes() == old_public
    assert mode(aside_private) == 0o600
    assert (keys / "ibkr_rsa.pub").read_bytes() != old_public
    assert ssh_keygen_fingerprint(keys / "ibkr_rsa.pub") == (
        2048,
        printed(forced, "Fingerprint"),
    )


def test_ssh_modes_are_exact_whatever_the_umask(empty_project: Project) -> None:
    old = os.umask(0)
    try:
        empty_project.keys.rmdir()
        empty_project.ok("keys", "ssh", "--bits", "2048")
    finally:
        os.umask(old)
    assert mode(empty_project.keys) == 0o700
    assert mode(empty_project.keys / "ibkr_rsa") == 0o600
    assert mode(empty_project.keys / "ibkr_rsa.pub") == 0o644


def test_ssh_without_passphrase_source_fails_clearly_unless_asked(empty_project: Project) -> None:
    env = empty_project.env(IBKR_SSH_PASSPHRASE="")
    result = empty_project.run("keys", "ssh", "--bits", "2048", env=env)
    assert result.returncode == 3
    assert "IBKR_SSH_PASSPHRASE" in result.stderr and "--no-passphrase" in result.stderr
    assert not (empty_project.keys / "ibkr_rsa").exists()

    empty_project.ok("keys", "ssh", "--bits", "2048", "--no-passphrase", env=env)
    key = paramiko.RSAKey.from_private_key_file(str(empty_project.keys / "ibkr_rsa"))
    assert key.get_bits() == 2048
    warning = empty_project.run("keys", "show", env=env).stderr
    assert "has no passphrase" in warning


def test_ssh_prompts_for_a_hidden_confirmed_passphrase_on_a_terminal(
    empty_project: Project,
) -> None:
    env = empty_project.env(IBKR_SSH_PASSPHRASE="")
    code, screen = run_on_terminal(
        [str(CONSOLE_SCRIPT), "keys", "ssh", "--bits", "2048"],
        empty_project.root,
        env,
        [
            ("Passphrase for the new SSH key:", "typed passphrase"),
            ("Repeat for confirmation:", "typed passphrase"),
        ],
    )
    assert code == 0, screen
    assert "<Repeat for confirmation:>" in screen  # asked twice
    assert "typed passphrase" not in screen  # never echoed
    paramiko.RSAKey.from_private_key_file(
        str(empty_project.keys / "ibkr_rsa"), password="typed passphrase"
    )


def test_ssh_rejects_small_keys(empty_project: Project) -> None:
    result = empty_project.run("keys", "ssh", "--bits", "1024")
    assert result.returncode == 2
    assert "2048" in result.stderr


# --- keys pgp ------------------------------------------------------------------------------


def test_pgp_key_as_gpg_makes_them(keyed_project: Project) -> None:
    home = keyed_project.keys / "gnupg"
    assert mode(home) == 0o700
    rows = gpg_colons(home, "--list-secret-keys", "--with-fingerprint")
    primary = next(r for r in rows if r[0] == "sec")
    sub = next(r for r in rows if r[0] == "ssb")
    fingerprint = next(r for r in rows if r[0] == "fpr")[9]
    assert (primary[2], primary[3]) == ("4096", "1")  # RSA-4096
    assert "s" in primary[11] and "c" in primary[11]  # sign + certify
    assert sub[2] == "4096" and "e" in sub[11]  # encryption subkey
    shown = keyed_project.ok("keys", "show").stdout
    assert f"PGP key fingerprint: {fingerprint} (in pgp-public.asc)" in shown
    armored = (keyed_project.keys / "pgp-public.asc").read_text()
    assert armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert "PRIVATE" not in armored


def test_pgp_round_trip_through_the_exported_public_key(
    keyed_project: Project, tmp_path: Path
) -> None:
    sender = tmp_path / "sender"
    sender.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(sender), "--batch", "--quiet"]
    subprocess.run([*gpg, "--import", str(keyed_project.keys / "pgp-public.asc")], check=True)
    fingerprint = next(
        r[9] for r in gpg_colons(sender, "--list-keys", "--with-fingerprint") if r[0] == "fpr"
    )
    report = tmp_path / "U1234567.Trade_History.20260901.20260901.xml"
    report.write_text("<FlexQueryResponse/>\n" * 1000)
    subprocess.run(
        [
            *gpg,
            "--trust-model",
            "always",
            "-r",
            fingerprint,
            "-o",
            f"{report}.pgp",
            "-e",
            str(report),
        ],
        check=True,
    )
    subprocess.run(["gpgconf", "--homedir", str(sender), "--kill", "gpg-agent"], check=False)
    decrypted = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(keyed_project.keys / "gnupg"),
            "--batch",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            "0",
            "-d",
            f"{report}.pgp",
        ],
        input=PGP_PASSPHRASE.encode(),
        capture_output=True,
        check=True,
    ).stdout
    assert decrypted == report.read_bytes()
    keyed_project.stop_agent()


def test_pgp_refuses_a_second_key_for_the_same_email(project: Project) -> None:
    before = (project.keys / "pgp-public.asc").read_bytes()
    result = project.run(
        "keys", "pgp", "--name", "Other", "--email", "TEST@example.com", "--bits", "2048"
    )
    assert result.returncode == 3
    assert "--force" in result.stderr
    assert (project.keys / "pgp-public.asc").read_bytes() == before
    forced = project.ok(
        "keys",
        "pgp",
        "--name",
        "Other",
        "--email",
        "test@example.com",
        "--bits",
        "2048",
        "--force",
    )
    secret = [r for r in gpg_colons(project.keys / "gnupg", "--list-secret-keys") if r[0] == "sec"]
    assert len(secret) == 2  # the old key is kept
    assert printed(forced, "Fingerprint") in project.ok("keys", "show").stdout


# --- keys show -----------------------------------------------------------------------------


def test_show_warns_loudly_about_a_readable_private_key(project: Project) -> None:
    (project.keys / "ibkr_rsa").chmod(0o644)
    result = project.run("keys", "show")
    assert result.returncode == 0
    assert "WARNING" in result.stderr and "readable by other users" in result.stderr
    assert f"chmod 600 {project.keys / 'ibkr_rsa'}" in result.stderr
    assert "UNSAFE" in result.stdout


# --- keys export ---------------------------------------------------------------------------


def test_export_bundle_is_a_complete_draft_with_public_keys_only(project: Project) -> None:
    text = project.config.read_text().replace('username = ""', 'username = "jdoe_sftp"')
    project.config.write_text(text)
    result = project.ok("keys", "export", "--account-last4", "1234", "--ip", "8.8.4.4")
    outbox = project.keys / "outbox"
    assert sorted(p.name for p in outbox.iterdir()) == [
        "ibkr_rsa.pub",
        "pgp-public.asc",
        "request.eml",
    ]
    assert (outbox / "ibkr_rsa.pub").read_bytes() == (project.keys / "ibkr_rsa.pub").read_bytes()
    assert (outbox / "pgp-public.asc").read_bytes() == (
        project.keys / "pgp-public.asc"
    ).read_bytes()

    message = email.message_from_bytes(
        (outbox / "request.eml").read_bytes(), policy=email.policy.default
    )
    assert isinstance(message, EmailMessage)
    assert message["To"] == "filedelivery@interactivebrokers.com"
    assert message["Subject"] == "1234"
    assert message["X-Unsent"] == "1"
    body = message.get_body(("plain",))
    assert body is not None
    text_body = body.get_content()
    _, ssh_fpr = ssh_keygen_fingerprint(project.keys / "ibkr_rsa.pub")
    pgp_fpr = next(
        r[9] for r in gpg_colons(project.keys / "gnupg", "--list-secret-keys") if r[0] == "fpr"
    )
    for expected in ("IB-hosted sFTP", "8.8.4.4", "jdoe_sftp", ssh_fpr, "PGP-encrypted"):
        assert expected in text_body, expected
    assert pgp_fpr in text_body.replace(" ", "")
    attachments = {part.get_filename(): part.get_content() for part in message.iter_attachments()}
    assert set(attachments) == {"ibkr_rsa.pub", "pgp-public.asc"}
    assert (
        attachments["ibkr_rsa.pub"].strip() == (project.keys / "ibkr_rsa.pub").read_text().strip()
    )
    assert "BEGIN PGP PUBLIC KEY BLOCK" in str(attachments["pgp-public.asc"])
    assert ssh_fpr in result.stdout

    for path in outbox.iterdir():
        data = path.read_bytes()
        for marker in (
            b"PRIVATE",
            b"OPENSSH PRIVATE",
            SSH_PASSPHRASE.encode(),
            PGP_PASSPHRASE.encode(),
        ):
            assert marker not in data, (path, marker)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ip", "8.8.4.4"], "last four digits"),
        (["--account-last4", "12a4", "--ip", "8.8.4.4"], "last four digits"),
        (["--account-last4", "1234"], "IPv4"),
        (["--account-last4", "1234", "--ip", "192.168.1.10"], "private"),
    ],
)
def test_export_refuses_incomplete_requests(
    keyed_project: Project, tmp_path: Path, args: list[str], expected: str
) -> None:
    result = keyed_project.run("keys", "export", "--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert not (tmp_path / "out").exists()


def test_export_without_keys_says_which_command_makes_them(empty_project: Project) -> None:
    result = empty_project.run("keys", "export", "--account-last4", "1234", "--ip", "8.8.4.4")
    assert result.returncode == 3
    assert "keys ssh" in result.stderr


# --- keys backup / restore ------------------------------------------------------------------


def test_backup_and_restore_into_an_empty_project(project: Project, empty_project: Project) -> None:
    backup = project.root.parent / "keys.backup"
    env = project.env(IBKR_BACKUP_PASSPHRASE="backup secret")
    project.ok("keys", "backup", str(backup), env=env)
    assert mode(backup) == 0o600
    data = backup.read_bytes()
    for secret in (b"PRIVATE KEY", SSH_PASSPHRASE.encode(), PGP_PASSPHRASE.encode()):
        assert secret not in data

    restore_env = empty_project.env(IBKR_BACKUP_PASSPHRASE="backup secret")
    empty_project.ok("keys", "restore", str(backup), env=restore_env)
    original = project.ok("keys", "show")
    restored = empty_project.ok("keys", "show")
    for label in ("SSH key fingerprint", "PGP key fingerprint"):
        assert printed(restored, label) == printed(original, label)
    assert mode(empty_project.keys / "ibkr_rsa") == 0o600
    assert mode(empty_project.keys / "gnupg") == 0o700

    again = empty_project.run("keys", "restore", str(backup), env=restore_env)
    assert again.returncode == 3
    assert "already" in again.stderr


def test_restore_with_the_wrong_passphrase_writes_nothing(
    project: Project, empty_project: Project
) -> None:
    backup = project.root.parent / "keys.backup"
    project.ok("keys", "backup", str(backup), env=project.env(IBKR_BACKUP_PASSPHRASE="right"))
    result = empty_project.run(
        "keys", "restore", str(backup), env=empty_project.env(IBKR_BACKUP_PASSPHRASE="wrong")
    )
    assert result.returncode == 3
    assert "passphrase" in result.stderr
    assert not (empty_project.keys / "ibkr_rsa").exists()
