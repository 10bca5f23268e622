"""`ibkr-statements doctor`: every step a nightly run depends on, checked in order.

Each check ends as ok, warning, failed or skipped, with what was found and, when something is
wrong, what to do. A check that needs an earlier one that failed is skipped, never failed
again, so the first failure is the one to fix. Nothing is retried (doctor diagnoses, it does
not insist) and every network step is bounded by ``[sftp] timeout_s``.

This module returns data only; the command line prints it and exits with :func:`exit_code`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from statements import config as config_module
from statements.config import Config
from statements.decrypt import DecryptFailed, Decryptor
from statements.errors import ConfigError, ExitCode, KeyProblem, RemoteError, StatementsError
from statements.fsutil import PRIVATE_DIR, PRIVATE_FILE
from statements.keys.pgp import (
    MIN_GPG_VERSION,
    PgpKeyInfo,
    open_gnupg,
    scan_public_key_file,
    secret_keys,
    status_summary,
)
from statements.keys.ssh import fingerprint_of_line, openssh_header, public_path_for
from statements.ledger import LEDGER_NAME, Ledger
from statements.passphrase import PassphraseSource, read_passphrase
from statements.remote import (
    FolderProbe,
    LoginKey,
    SftpSettings,
    StepProbe,
    key_fingerprint,
    load_login_key,
    resolve_host,
)

OK = "ok"
WARNING = "warning"
FAILED = "failed"
SKIPPED = "skipped"

# Check names, in the order they run.
CONFIG = "config"
SSH_KEY = "ssh key"
GPG = "gpg"
GNUPG_HOME = "gnupg home"
PGP_SECRET_KEY = "pgp secret key"
PGP_PASSPHRASE = "pgp passphrase"
DNS = "dns"
TCP = "tcp"
SSH_HANDSHAKE = "ssh handshake"
HOST_KEY = "host key"
LOGIN = "login"
REMOTE_FOLDER = "remote folder"
ARCHIVE = "archive"
LEDGER = "ledger"
CHECK_NAMES = (
    CONFIG,
    SSH_KEY,
    GPG,
    GNUPG_HOME,
    PGP_SECRET_KEY,
    PGP_PASSPHRASE,
    DNS,
    TCP,
    SSH_HANDSHAKE,
    HOST_KEY,
    LOGIN,
    REMOTE_FOLDER,
    ARCHIVE,
    LEDGER,
)
_REMOTE_NAMES = (DNS, TCP, SSH_HANDSHAKE, HOST_KEY, LOGIN, REMOTE_FOLDER)

# A key that expires this soon gets a warning: time to extend it and send IBKR the update.
EXPIRY_WARNING = timedelta(days=30)
_GPG_VERSION_TIMEOUT_S = 30
_GPG_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_ROUND_TRIP_TEXT = b"ibkr-statements doctor: PGP passphrase round trip\n"


@dataclass(frozen=True)
class Check:
    name: str  # one of CHECK_NAMES
    state: str  # "ok" | "warning" | "failed" | "skipped"
    detail: str  # what was found
    fix: str | None  # what to do, for warning and failed
    exit_code: int  # DESIGN.md's exit code for a failed check (3 config/key, 4 remote); else 0


def exit_code(checks: Sequence[Check]) -> int:
    """0 when no check failed, else the exit code of the first failed check."""
    for check in checks:
        if check.state == FAILED:
            return check.exit_code
    return ExitCode.OK


class _Report:
    """The checks so far, in order; tells ``on_check`` about each as it is added."""

    def __init__(self, on_check: Callable[[Check], None] | None) -> None:
        self.checks: list[Check] = []
        self._on_check = on_check

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        if self._on_check is not None:
            self._on_check(check)
        return check

    def ok(self, name: str, detail: str) -> None:
        self.add(Check(name, OK, detail, None, ExitCode.OK))

    def warning(self, name: str, detail: str, fix: str | None) -> None:
        self.add(Check(name, WARNING, detail, fix, ExitCode.OK))

    def failed(self, name: str, detail: str, fix: str | None, code: int) -> None:
        self.add(Check(name, FAILED, detail, fix, code))

    def error(self, name: str, exc: StatementsError, code: int | None = None) -> None:
        self.failed(name, exc.message, exc.hint, exc.exit_code if code is None else code)

    def skipped(self, names: Sequence[str], needs: str) -> None:
        for name in names:
            self.add(Check(name, SKIPPED, f"needs {needs}", None, ExitCode.OK))


def run_checks(
    config_path: Path, *, on_check: Callable[[Check], None] | None = None
) -> list[Check]:
    """Run every check in CHECK_NAMES' order; ``on_check`` sees each one as it finishes."""
    report = _Report(on_check)
    try:
        cfg = config_module.load(config_path)
    except ConfigError as exc:
        report.error(CONFIG, exc)
        report.skipped(CHECK_NAMES[1:], "a valid configuration")
        return report.checks
    settings = _check_config(report, cfg, config_path)
    key = _check_ssh_key(report, cfg)
    gpg_ok = _check_gpg(report, cfg)
    home_ok = _check_gnupg_home(report, cfg, gpg_ok)
    usable = _check_pgp_secret_key(report, cfg) if home_ok else None
    if not home_ok:
        report.skipped([PGP_SECRET_KEY], "gpg and a usable GnuPG home")
    if usable:
        _check_pgp_passphrase(report, cfg, usable[0])
    else:
        report.skipped([PGP_PASSPHRASE], "a usable PGP secret key")
    if settings is None:
        report.skipped(_REMOTE_NAMES, "a complete [sftp] configuration")
    else:
        _check_remote(report, settings, key)
    _check_archive(report, cfg)
    return report.checks


# --- local checks --------------------------------------------------------------------------


def _check_config(report: _Report, cfg: Config, path: Path) -> SftpSettings | None:
    s = cfg.sftp
    try:
        settings = SftpSettings.from_config(cfg)
    except KeyProblem as exc:  # an empty username: the rest of the file is fine
        report.error(CONFIG, exc, ExitCode.CONFIG)
        return None
    except OSError as exc:
        report.failed(
            CONFIG,
            f"Cannot read [sftp] known_hosts {s.known_hosts}: {exc.strerror or exc}.",
            f"Check that the file belongs to you: ls -l {s.known_hosts}",
            ExitCode.CONFIG,
        )
        return None
    report.ok(
        CONFIG,
        f"{path} loaded: server {s.host}:{s.port}, user {s.username!r}, "
        f"folder {s.remote_dir!r}, patterns {', '.join(s.patterns)}, timeout {s.timeout_s:g} s",
    )
    return settings


def _check_ssh_key(report: _Report, cfg: Config) -> LoginKey | None:
    """The private key exists, only we can read it, and the configured passphrase opens it."""
    path = cfg.sftp.key_file
    try:
        info = path.stat()
    except FileNotFoundError:
        report.failed(
            SSH_KEY,
            f"No SSH private key at {path}.",
            "Create a pair with `ibkr-statements keys ssh` (and send IBKR the public half), "
            "convert a PuTTY key with `ibkr-statements keys import-ppk FILE`, or set "
            "[sftp] key_file.",
            ExitCode.CONFIG,
        )
        return None
    except OSError as exc:
        report.failed(
            SSH_KEY, f"Cannot read {path}: {exc.strerror}.", f"ls -l {path}", ExitCode.CONFIG
        )
        return None
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        report.failed(
            SSH_KEY,
            f"The SSH private key {path} is {mode:04o}: readable by other users. Like "
            "OpenSSH, fetch refuses to use a key others can read.",
            f"Run: chmod {PRIVATE_FILE:o} {path}",
            ExitCode.CONFIG,
        )
        return None

    source = PassphraseSource("SSH key", cfg.sftp.key_passphrase_env, cfg.sftp.key_passphrase_file)
    try:
        passphrase = read_passphrase(source)
    except KeyProblem as exc:  # a passphrase file that is missing, empty or readable by others
        report.error(SSH_KEY, exc)
        return None
    try:
        key = load_login_key(cfg)
    except KeyProblem as exc:
        if _is_encrypted(path):
            if passphrase is None:
                report.failed(
                    SSH_KEY,
                    f"The SSH private key {path} is protected by a passphrase, and none was given.",
                    f"Set the environment variable {source.env} to the key's passphrase "
                    f"(or name a file holding it, chmod {PRIVATE_FILE:o}, in [sftp] "
                    "key_passphrase_file).",
                    ExitCode.CONFIG,
                )
                return None
            if "Wrong passphrase" in exc.message:
                report.failed(
                    SSH_KEY,
                    exc.message,
                    f"Check the passphrase in {source.describe()}: it must be the one chosen "
                    "when the key was made.",
                    ExitCode.CONFIG,
                )
                return None
        report.error(SSH_KEY, exc, ExitCode.CONFIG)
        return None

    fingerprint = key_fingerprint(key)
    protection = (
        f"passphrase from {source.describe()}" if passphrase is not None else "no passphrase"
    )
    detail = (
        f"{path}: {key.get_name()} {key.get_bits()} bits, {fingerprint}, mode {mode:04o}, "
        f"{protection}"
    )
    warnings: list[tuple[str, str]] = []
    folder_mode = stat.S_IMODE(path.parent.stat().st_mode)
    if folder_mode & 0o077:
        warnings.append(
            (
                f"the keys folder {path.parent} is {folder_mode:04o}: others can look in",
                f"chmod {PRIVATE_DIR:o} {path.parent}",
            )
        )
    public = public_path_for(path)
    try:
        public_fingerprint: str | None = fingerprint_of_line(public.read_text("ascii"))
    except (OSError, UnicodeDecodeError, KeyProblem):
        public_fingerprint = None  # no .pub beside it: nothing to compare
    if public_fingerprint is not None and public_fingerprint != fingerprint:
        warnings.append(
            (
                f"{public} ({public_fingerprint}) is not the public half of {path}: if that is "
                "what IBKR received, the server will refuse our key",
                f"Send IBKR the public key that matches: `ssh-keygen -y -f {path}` prints it; "
                "or make and send a new pair (ibkr-statements keys ssh --force; keys export)",
            )
        )
    if warnings:
        report.warning(
            SSH_KEY,
            f"{detail}; but " + "; ".join(w for w, _ in warnings),
            "; ".join(f for _, f in warnings),
        )
    else:
        report.ok(SSH_KEY, detail)
    return key


def _is_encrypted(path: Path) -> bool:
    """Whether the key file needs a passphrase, read without one."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    header = openssh_header(data)
    if header is not None:
        return header[0] != "none"
    return b"ENCRYPTED" in data[:200]  # PEM: "Proc-Type: 4,ENCRYPTED" or "ENCRYPTED PRIVATE KEY"


def _check_gpg(report: _Report, cfg: Config) -> bool:
    binary = cfg.pgp.gpg_binary
    found = shutil.which(binary)
    if found is None:
        report.failed(
            GPG,
            f"gpg not found (looked for {binary!r}).",
            "Install GnuPG (apt-get install gnupg), or set [pgp] gpg_binary to the full path "
            "of the gpg program.",
            ExitCode.CONFIG,
        )
        return False
    try:
        result = subprocess.run(
            [found, "--version"],
            capture_output=True,
            text=True,
            timeout=_GPG_VERSION_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        report.failed(GPG, f"Cannot run {found} --version: {exc}.", None, ExitCode.CONFIG)
        return False
    first = (result.stdout.splitlines() or [""])[0].strip()
    match = _GPG_VERSION.search(first)
    version = tuple(int(part) for part in match.groups() if part) if match else ()
    if result.returncode != 0 or version < MIN_GPG_VERSION:
        minimum = ".".join(str(part) for part in MIN_GPG_VERSION)
        report.failed(
            GPG,
            f"{found} reports {first or 'no version'!r}; this tool needs GnuPG {minimum} or newer.",
            "Install a current GnuPG (apt-get install gnupg) or set [pgp] gpg_binary.",
            ExitCode.CONFIG,
        )
        return False
    report.ok(GPG, f"{first} at {found}")
    return True


def _check_gnupg_home(report: _Report, cfg: Config, gpg_ok: bool) -> bool:
    home = cfg.pgp.gnupg_home
    if not gpg_ok:
        report.skipped([GNUPG_HOME], "a working gpg")
        return False
    try:
        info = home.stat()
    except FileNotFoundError:
        report.failed(
            GNUPG_HOME,
            f"The GnuPG home {home} does not exist: no PGP key, so nothing can be decrypted.",
            "Create the key pair with `ibkr-statements keys pgp --name NAME --email EMAIL` "
            "(and send IBKR its public key), or restore a backup with "
            "`ibkr-statements keys restore FILE`.",
            ExitCode.CONFIG,
        )
        return False
    except OSError as exc:
        report.failed(
            GNUPG_HOME, f"Cannot look at {home}: {exc.strerror}.", f"ls -ld {home}", ExitCode.CONFIG
        )
        return False
    if not stat.S_ISDIR(info.st_mode):
        report.failed(
            GNUPG_HOME,
            f"The GnuPG home {home} is not a folder.",
            "Set [pgp] gnupg_home to the folder `keys pgp` made.",
            ExitCode.CONFIG,
        )
        return False
    if info.st_uid != os.geteuid() or not os.access(home, os.W_OK | os.X_OK):
        report.failed(
            GNUPG_HOME,
            f"The GnuPG home {home} belongs to user id {info.st_uid} or is not writable: gpg "
            "needs to own it and write its lock and trust files there.",
            f"Run this tool as the folder's owner, or: chown -R $(id -u) {home}",
            ExitCode.CONFIG,
        )
        return False
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        report.warning(
            GNUPG_HOME,
            f"{home} is {mode:04o}: other users can look at the PGP secret key files.",
            f"chmod {PRIVATE_DIR:o} {home} (every command that uses gpg also resets it)",
        )
    else:
        report.ok(GNUPG_HOME, f"{home}: mode {mode:04o}, yours")
    return True


def _check_pgp_secret_key(report: _Report, cfg: Config) -> tuple[str, ...] | None:
    """Our secret key is there and usable; returns the fingerprints a round trip can use."""
    home, binary = cfg.pgp.gnupg_home, cfg.pgp.gpg_binary
    try:
        # What `decrypt` checks before any file: a secret key, and the signers' public keys.
        Decryptor(
            home,
            passphrase=None,
            signer_fingerprints=cfg.pgp.signer_fingerprints,
            gpg_binary=binary,
        ).preflight()
        held = secret_keys(home, binary)
        exported = (
            scan_public_key_file(home, cfg.pgp.public_key_file, binary)
            if cfg.pgp.public_key_file.is_file()
            else []
        )
    except KeyProblem as exc:
        report.error(PGP_SECRET_KEY, exc)
        return None
    # "Ours" is the key whose public half we exported for IBKR; without that file, all of them.
    wanted = {key.fingerprint for key in exported}
    ours = [key for key in held if key.fingerprint in wanted] if wanted else held
    if wanted and not ours:
        report.failed(
            PGP_SECRET_KEY,
            f"{cfg.pgp.public_key_file} (the key sent to IBKR) holds "
            f"{', '.join(sorted(wanted))}, whose secret key is not in {home}: files encrypted "
            "to it cannot be decrypted here.",
            "Restore the key pair from a backup (`ibkr-statements keys restore FILE`), or make "
            "a new one with `ibkr-statements keys pgp --force` and send IBKR its public key "
            "(`ibkr-statements keys export`).",
            ExitCode.CONFIG,
        )
        return None
    now = datetime.now(UTC)
    usable = [k for k in ours if k.has_encryption_subkey and not _expired(k, now)]
    notes = [_describe_key(k, now) for k in ours]
    extend = (
        f"Extend it: gpg --homedir {home} --quick-set-expire FINGERPRINT 1y, and the same with "
        "'*' after 1y for its subkeys; then send IBKR the updated public key "
        "(`ibkr-statements keys export`). Or make a new pair with `keys pgp --force`."
    )
    if not usable:
        report.failed(
            PGP_SECRET_KEY, "; ".join(notes) + ": no usable key.", extend, ExitCode.CONFIG
        )
        return None
    soon = [k for k in usable if k.expires is not None and k.expires - now < EXPIRY_WARNING]
    if soon or len(usable) < len(ours):
        report.warning(PGP_SECRET_KEY, "; ".join(notes), extend)
    else:
        report.ok(PGP_SECRET_KEY, "; ".join(notes))
    return tuple(k.fingerprint for k in usable)


def _expired(key: PgpKeyInfo, now: datetime) -> bool:
    return key.expires is not None and key.expires <= now


def _describe_key(key: PgpKeyInfo, now: datetime) -> str:
    who = key.uids[0] if key.uids else "no user id"
    text = f"{key.fingerprint} ({key.algorithm} {key.bits}, {who}"
    if key.expires is None:
        text += ", does not expire"
    elif _expired(key, now):
        text += f", EXPIRED on {key.expires:%Y-%m-%d}"
    else:
        text += f", expires {key.expires:%Y-%m-%d}"
    if not key.has_encryption_subkey:
        text += ", NO usable encryption subkey"
    return text + ")"


def _check_pgp_passphrase(report: _Report, cfg: Config, fingerprint: str) -> None:
    """Encrypt a few bytes to our own key and decrypt them the way `decrypt` does."""
    home, binary = cfg.pgp.gnupg_home, cfg.pgp.gpg_binary
    source = PassphraseSource("PGP key", cfg.pgp.passphrase_env, cfg.pgp.passphrase_file)
    places = (
        f"the environment variable {source.env}"
        if source.file is None
        else f"the environment variable {source.env} or the file {source.file}"
    )
    try:
        passphrase = read_passphrase(source)
        decryptor = Decryptor(home, passphrase=passphrase, gpg_binary=binary)
        encrypted = open_gnupg(home, binary).encrypt(
            _ROUND_TRIP_TEXT, [fingerprint], always_trust=True, armor=False
        )
    except KeyProblem as exc:
        report.error(PGP_PASSPHRASE, exc)
        return
    if not encrypted.ok:
        report.failed(
            PGP_PASSPHRASE,
            f"gpg cannot encrypt to our own key {fingerprint}: {status_summary(encrypted.stderr)}.",
            f"Look at the key: gpg --homedir {home} --list-keys {fingerprint}",
            ExitCode.CONFIG,
        )
        return
    with tempfile.TemporaryDirectory(prefix="ibkr-doctor-") as scratch:
        ciphertext = Path(scratch) / "round-trip.pgp"
        ciphertext.write_bytes(encrypted.data)
        try:
            decryptor.decrypt(ciphertext, Path(scratch) / "round-trip.txt")
        except DecryptFailed as exc:
            if exc.kind == "no_passphrase":
                report.warning(
                    PGP_PASSPHRASE,
                    f"No PGP passphrase given, and the key {fingerprint} needs one. Fetching "
                    "works without it; decrypt and run do not.",
                    f"Set it in {places} where decrypt and run are started.",
                )
            elif exc.kind == "bad_passphrase":
                report.failed(
                    PGP_PASSPHRASE,
                    f"The PGP passphrase from {places} does not open the key {fingerprint}.",
                    "Give the passphrase chosen at `ibkr-statements keys pgp`.",
                    ExitCode.CONFIG,
                )
            else:
                report.error(PGP_PASSPHRASE, exc, ExitCode.CONFIG)
            return
    given = "no passphrase needed" if passphrase is None else f"passphrase from {places}"
    report.ok(PGP_PASSPHRASE, f"round trip through {fingerprint} decrypts ({given})")


# --- the server ----------------------------------------------------------------------------


def _check_remote(report: _Report, settings: SftpSettings, key: LoginKey | None) -> None:
    """DNS, TCP, handshake, host key, login, folder: one connection, each step once."""
    with StepProbe(settings) as probe:
        try:
            addresses = resolve_host(settings)
        except RemoteError as exc:
            report.error(DNS, exc)
            report.skipped(_REMOTE_NAMES[1:], f"{settings.host} to resolve")
            return
        report.ok(DNS, f"{settings.host} resolves to {', '.join(addresses)}")

        try:
            tcp = probe.tcp()
        except RemoteError as exc:
            report.error(TCP, exc)
            report.skipped(_REMOTE_NAMES[2:], "a TCP connection")
            return
        report.ok(
            TCP,
            f"connected to {tcp.remote} from {tcp.local} (this machine's view; behind NAT "
            "the server sees your public IP, the one IBKR must have whitelisted)",
        )

        try:
            handshake = probe.handshake()
        except RemoteError as exc:
            report.error(SSH_HANDSHAKE, exc)
            report.skipped(_REMOTE_NAMES[3:], "an SSH handshake")
            return
        report.ok(
            SSH_HANDSHAKE,
            f"{handshake.server_version}, cipher {handshake.cipher}, host key "
            f"{handshake.offered.describe()}",
        )

        try:
            probe.verify_host_key()
        except RemoteError as exc:
            report.error(HOST_KEY, exc)
            report.skipped(_REMOTE_NAMES[4:], "a verified host key")
            return
        report.ok(
            HOST_KEY,
            f"{handshake.offered.describe()} is pinned in {settings.known_hosts.path}",
        )

        if key is None:
            report.skipped(_REMOTE_NAMES[4:], "a usable SSH key (see 'ssh key')")
            return
        try:
            probe.login(key)
        except RemoteError as exc:
            report.error(LOGIN, exc)
            report.skipped(_REMOTE_NAMES[5:], "a login")
            return
        report.ok(LOGIN, f"logged in as {settings.username!r} with {key_fingerprint(key)}")

        try:
            folder = probe.list_folder()
        except RemoteError as exc:
            report.error(REMOTE_FOLDER, exc)
            return
        _report_folder(report, settings, folder)


def _report_folder(report: _Report, settings: SftpSettings, folder: FolderProbe) -> None:
    files = folder.listing.files
    where = f"{settings.remote_dir!r}"
    patterns = ", ".join(settings.patterns)
    refused = folder.listing.refused
    refused_note = (
        f"; {_count(len(refused), 'name')} refused as unsafe: "
        + ", ".join(f"{r.name} ({r.reason})" for r in refused[:5])
        if refused
        else ""
    )
    if files:
        detail = f"{where} lists {_count(len(files), 'file')} matching {patterns}{refused_note}"
        if refused:
            report.warning(
                REMOTE_FOLDER, detail, "Refused names are never fetched; ask IBKR about them."
            )
        else:
            report.ok(REMOTE_FOLDER, detail)
        return
    if folder.unmatched_total:
        shown = len(folder.unmatched)
        more = f", ... ({folder.unmatched_total} in all)" if folder.unmatched_total > shown else ""
        report.warning(
            REMOTE_FOLDER,
            f"{where} holds {_count(folder.unmatched_total, 'entry', 'entries')} but none "
            f"match {patterns}: " + ", ".join(folder.unmatched) + more + refused_note,
            "If these are IBKR's reports, add their ending to [sftp] patterns (IBKR's files "
            'end in .pgp, e.g. patterns = ["*.pgp", "*.gpg", "*.asc"]); if a folder is listed, '
            "point [sftp] remote_dir at it (IBKR often uses 'outgoing').",
        )
        return
    report.ok(
        REMOTE_FOLDER,
        f"{where} is empty{refused_note}: normal until IBKR's first delivery (evenings, "
        "US Eastern time, Monday to Friday)",
    )


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else (many or one + 's')}"


# --- the archive ---------------------------------------------------------------------------


def _check_archive(report: _Report, cfg: Config) -> None:
    root = cfg.archive.root
    if not root.exists():
        parent = next((p for p in root.parents if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK | os.X_OK):
            report.failed(
                ARCHIVE,
                f"The archive folder {root} does not exist, and {parent} is not writable.",
                "Create it, or set [archive] root to a folder you can write.",
                ExitCode.CONFIG,
            )
            report.skipped([LEDGER], "a writable archive folder")
            return
        report.ok(ARCHIVE, f"{root} does not exist yet; the first fetch creates it")
        report.ok(LEDGER, "none yet; the first fetch creates it")
        return
    try:
        # Writing a file is the only sure test: os.access ignores read-only mounts and ACLs.
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-", suffix=".tmp"):
            pass
    except OSError as exc:
        report.failed(
            ARCHIVE,
            f"Cannot write in the archive folder {root}: {exc.strerror or exc}.",
            f"Check its owner and permissions (ls -ld {root}), or set [archive] root.",
            ExitCode.CONFIG,
        )
        report.skipped([LEDGER], "a writable archive folder")
        return
    report.ok(ARCHIVE, f"{root} is writable")
    if not (root / LEDGER_NAME).exists():
        report.ok(LEDGER, f"no {LEDGER_NAME} yet; the first fetch creates it")
        return
    try:
        with Ledger.open(root) as ledger:
            version = ledger.schema_version
    except StatementsError as exc:
        report.error(LEDGER, exc, ExitCode.CONFIG)
        return
    report.ok(LEDGER, f"{ledger.path} opens (schema {version})")
