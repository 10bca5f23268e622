"""The PGP key pair IBKR encrypts to, in the project's own GnuPG home (``[pgp] gnupg_home``).

Everything goes through python-gnupg with ``--homedir`` on every call, so nothing depends on
``~/.gnupg``. Passphrases travel to gpg over stdin (python-gnupg's ``--passphrase-fd 0`` or the
batch key-generation script), never in an argument list, and never appear in a message.
"""

from __future__ import annotations

import codecs
import contextlib
import encodings.utf_8
import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gnupg

from statements.errors import KeyProblem, UsageError
from statements.fsutil import PUBLIC_FILE, atomic_write, ensure_private_dir

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MIN_BITS = 2048
MAX_BITS = 4096  # the largest RSA size gpg makes without --expert
MIN_GPG_VERSION = (2, 2)

AGENT_CONF = "gpg-agent.conf"
# Loopback: the passphrase comes from this tool over stdin, never from a pinentry window.
# No caching: after one good passphrase the agent would otherwise accept any passphrase (or
# none) for ten minutes, hiding a wrong IBKR_PGP_PASSPHRASE until the next run.
AGENT_SETTINGS = ("allow-loopback-pinentry", "default-cache-ttl 0", "max-cache-ttl 0")
# Every call: loopback pinentry, so a missing passphrase fails at once instead of prompting.
_GPG_OPTIONS = ["--pinentry-mode", "loopback"]
# What python-gnupg encodes and decodes with (see _lenient_utf8): UTF-8 out, UTF-8 in.
GPG_ENCODING = "ibkr-statements-utf-8"
_GPG_TIMEOUT_S = 120

_FINGERPRINT = re.compile(r"[0-9A-F]{40}")
_EMAIL = re.compile(r"[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+\.[^@\s<>()\[\],;:\"]+")
_UID_EMAIL = re.compile(r"<([^<>]*)>\s*$")
# RFC 4880 public-key algorithm ids.
_ALGORITHMS = {
    "1": "RSA",
    "2": "RSA",
    "3": "RSA",
    "16": "ELG",
    "17": "DSA",
    "18": "ECDH",
    "19": "ECDSA",
    "22": "EdDSA",
}
# Validity letters of a (sub)key that can no longer be used.
_UNUSABLE = {"i", "d", "r", "e"}
# gpg's progress notes, which would bury the reason for a failure.
_CHATTER = re.compile(r"created$|revocation certificate stored")
# Status words worth showing when gpg fails; the rest is chatter.
_PROBLEM_STATUS = (
    "ERROR",
    "FAILURE",
    "KEY_NOT_CREATED",
    "BAD_PASSPHRASE",
    "MISSING_PASSPHRASE",
    "NO_SECKEY",
    "INV_RECP",
    "INV_SGNR",
    "NODATA",
    "DECRYPTION_FAILED",
    "IMPORT_PROBLEM",
    "PINENTRY_LAUNCHED",
)


@dataclass(frozen=True)
class PgpKeyInfo:
    fingerprint: str  # 40 hex, upper case
    uids: tuple[str, ...]
    algorithm: str  # e.g. "RSA"
    bits: int
    created: datetime
    expires: datetime | None
    has_encryption_subkey: bool

    @property
    def emails(self) -> tuple[str, ...]:
        return tuple(e for e in (_uid_email(uid) for uid in self.uids) if e)


class _ReplacingUtf8Reader(encodings.utf_8.StreamReader):
    def __init__(self, stream: Any, errors: str = "strict") -> None:
        super().__init__(stream, "replace")


def _lenient_utf8(name: str) -> codecs.CodecInfo | None:
    """UTF-8 that encodes strictly and decodes anything, for python-gnupg.

    gpg reads passphrases and user ids as UTF-8, so python-gnupg must encode with it; but it
    also decodes gpg's messages with the same codec, strictly, on a thread of its own, and gpg
    prints some bytes as it finds them (the file name inside an OpenPGP packet, say). One
    Latin-1 byte there killed that thread: the result lost its status lines and the caller
    got an AttributeError instead of gpg's verdict. python-gnupg's own default, Latin-1,
    never fails to decode but would send "é" in a passphrase as a byte gpg does not expect.
    """
    if name != GPG_ENCODING.replace("-", "_"):
        return None
    utf8 = codecs.lookup("utf-8")

    def decode(data: ReadableBuffer, errors: str = "strict", /) -> tuple[str, int]:
        return codecs.utf_8_decode(data, "replace", True)

    return codecs.CodecInfo(
        utf8.encode,
        decode,
        streamreader=_ReplacingUtf8Reader,
        streamwriter=utf8.streamwriter,
        name=GPG_ENCODING,
    )


codecs.register(_lenient_utf8)


def open_gnupg(home: Path, gpg_binary: str = "gpg") -> gnupg.GPG:
    """A python-gnupg handle on ``home``, created 0700 with an agent that never prompts."""
    if shutil.which(gpg_binary) is None:
        raise KeyProblem(
            "gpg not found: install GnuPG (apt-get install gnupg).",
            f"Or set [pgp] gpg_binary to the full path of the gpg program (now {gpg_binary!r}).",
        )
    home = ensure_private_dir(home.absolute())
    _write_agent_conf(home, gpg_binary)
    try:
        gpg = gnupg.GPG(
            gpgbinary=gpg_binary,
            gnupghome=str(home),
            options=list(_GPG_OPTIONS),
            env=_gpg_env(home),
            # gpg itself reads passphrases and user ids as UTF-8; python-gnupg's default of
            # Latin-1 would turn "é" into another passphrase than the one typed in a terminal.
            encoding=GPG_ENCODING,
        )
    except (OSError, ValueError) as exc:
        raise KeyProblem(
            f"Cannot run {gpg_binary} with the GnuPG home {home}: {exc}.",
            "Check that GnuPG works (gpg --version) and that the folder belongs to you.",
        ) from None
    version = tuple(gpg.version or ())
    if version < MIN_GPG_VERSION:
        found = ".".join(str(part) for part in version) or "unknown"
        raise KeyProblem(
            f"{gpg_binary} is GnuPG {found}; this tool needs GnuPG 2.2 or newer.",
            "Install a current GnuPG (apt-get install gnupg) or set [pgp] gpg_binary.",
        )
    return gpg


def generate_pgp_key(
    home: Path,
    *,
    name: str,
    email: str,
    bits: int = 4096,
    expire_days: int = 0,
    passphrase: str | None,
    force: bool = False,
    gpg_binary: str = "gpg",
) -> PgpKeyInfo:
    """An RSA sign+cert primary key with an RSA encryption subkey of the same size.

    ``passphrase=None`` makes an unprotected key; callers pass it only when the user asked.
    """
    _check_key_request(name, email, bits, expire_days)
    if passphrase is not None:
        check_passphrase(passphrase, "PGP key")
    gpg = open_gnupg(home, gpg_binary)
    if not force:
        _refuse_existing_email(_secret_keys(gpg, home), home, email)
    params: dict[str, Any] = {
        "key_type": "RSA",
        "key_length": bits,
        "key_usage": "sign,cert",
        "subkey_type": "RSA",
        "subkey_length": bits,
        "subkey_usage": "encrypt",
        "name_real": name.strip(),
        "name_email": email.strip(),
        "expire_date": f"{expire_days}d" if expire_days else "0",
    }
    if passphrase is None:
        result = gpg.gen_key(gpg.gen_key_input(no_protection=True, **params))
    else:
        # Not gen_key() with a "Passphrase:" line: the agent caches nothing (AGENT_SETTINGS),
        # so gpg must unlock the new key again to sign its user id and subkey, and the batch
        # script would strip leading and trailing spaces. Instead the passphrase goes first on
        # stdin (--passphrase-fd 0, loopback), as in every other passphrase operation.
        result = gpg.result_map["generate"](gpg)
        script = io.BytesIO(gpg.gen_key_input(**params).encode("utf-8"))
        gpg._handle_io(["--gen-key"], script, result, passphrase=passphrase, binary=True)
    made = str(result.fingerprint or "").upper()
    for key in _secret_keys(gpg, home):
        if made and key.fingerprint == made:
            return key
    raise KeyProblem(
        f"gpg could not create the PGP key in {home}: {status_summary(result.stderr, passphrase)}.",
        "Check that the folder is writable and not on a full disk; run "
        f"`gpg --homedir {home} --list-secret-keys` to see what it holds.",
    )


def refuse_existing_email(home: Path, email: str, gpg_binary: str = "gpg") -> None:
    """Raise when ``home`` already holds a secret key for ``email`` (before asking anything)."""
    _refuse_existing_email(secret_keys(home, gpg_binary), home, email)


def _refuse_existing_email(keys: list[PgpKeyInfo], home: Path, email: str) -> None:
    wanted = email.strip().casefold()
    for key in keys:
        if wanted in (e.casefold() for e in key.emails):
            raise KeyProblem(
                f"{home} already holds a PGP secret key for {email}: {key.fingerprint}.",
                "Keep using it, or pass --force to add another key; the old one is kept.",
            )


def secret_keys(home: Path, gpg_binary: str = "gpg") -> list[PgpKeyInfo]:
    """The secret keys in ``home``; an absent home holds none (and is not created)."""
    if not home.is_dir():
        return []
    return _secret_keys(open_gnupg(home, gpg_binary), home)


def scan_public_key_file(home: Path, path: Path, gpg_binary: str = "gpg") -> list[PgpKeyInfo]:
    """The keys in an exported key file, read without importing them into ``home``."""
    if not path.is_file():
        raise KeyProblem(f"No PGP key file at {path}.")
    result = open_gnupg(home, gpg_binary).scan_keys(str(path))
    keys = [_key_info(raw) for raw in result]
    if not keys:
        raise KeyProblem(
            f"{path} holds no PGP key gpg can read.",
            "Export it again: ibkr-statements keys pgp writes it, or "
            f"`gpg --homedir {home} --armor --export FINGERPRINT > {path}`.",
        )
    return keys


def export_public_key(home: Path, fingerprint: str, path: Path, gpg_binary: str = "gpg") -> None:
    """Write the ASCII-armored public key (0644, atomically); never any secret material."""
    fingerprint = _check_fingerprint(fingerprint)
    armored = str(open_gnupg(home, gpg_binary).export_keys(fingerprint, armor=True))
    if "BEGIN PGP PUBLIC KEY BLOCK" not in armored:
        raise KeyProblem(
            f"No PGP key {fingerprint} in {home}.",
            "List the keys with `ibkr-statements keys show`, or create one with "
            "`ibkr-statements keys pgp --name NAME --email EMAIL`.",
        )
    if "PRIVATE KEY" in armored:
        raise KeyProblem(f"gpg exported secret material for {fingerprint}; nothing was written.")
    if not path.parent.is_dir():
        ensure_private_dir(path.parent)
    atomic_write(path, armored.encode("ascii"), PUBLIC_FILE)


def export_secret_keys(
    home: Path, fingerprints: list[str], passphrase: str | None, gpg_binary: str = "gpg"
) -> str:
    """The armored secret keys, still protected by their own passphrase.

    gpg 2.2 asks for the key's passphrase to export it; an unprotected key needs none.
    """
    wanted = [_check_fingerprint(f) for f in fingerprints]
    if passphrase is not None:
        check_passphrase(passphrase, "PGP key")
    armored = str(
        open_gnupg(home, gpg_binary).export_keys(
            wanted,
            secret=True,
            armor=True,
            passphrase=passphrase,
            expect_passphrase=passphrase is not None,
        )
    )
    if "BEGIN PGP PRIVATE KEY BLOCK" not in armored:
        raise KeyProblem(
            f"Cannot export the PGP secret key(s) from {home}: the PGP passphrase is missing "
            "or wrong.",
            "Give the passphrase of the PGP key (the one `keys pgp` asked for), e.g. in "
            "IBKR_PGP_PASSPHRASE or the file named by [pgp] passphrase_file.",
        )
    return armored


def import_keys(home: Path, armored: str, gpg_binary: str = "gpg") -> tuple[str, ...]:
    """Import keys (public or secret) into ``home``; returns the fingerprints gpg reports.

    gpg 2.2 in batch mode stores a protected secret key as it is, without its passphrase.
    """
    result = open_gnupg(home, gpg_binary).import_keys(armored)
    found = tuple(dict.fromkeys(str(f).upper() for f in result.fingerprints if f))
    if result.returncode != 0 or not found:
        raise KeyProblem(
            f"gpg could not import the PGP keys into {home}: {status_summary(result.stderr)}.",
            "Check that the folder is writable and that the key file is complete.",
        )
    return found


def export_ownertrust(home: Path, gpg_binary: str = "gpg") -> str:
    """gpg's owner-trust table as ``FINGERPRINT:LEVEL:`` lines (python-gnupg has no call).

    gpg's comment lines are dropped: they carry a date in the user's locale, not ASCII.
    """
    table = _run_gpg(home, gpg_binary, ["--export-ownertrust"]).decode("utf-8", "replace")
    return "".join(f"{line}\n" for line in table.splitlines() if line and line[0] != "#")


def import_ownertrust(home: Path, table: str, gpg_binary: str = "gpg") -> None:
    _run_gpg(home, gpg_binary, ["--import-ownertrust"], table.encode("ascii"))


def stop_agent(home: Path, gpg_binary: str = "gpg") -> None:
    """Stop the gpg-agent serving ``home``, if any; a missing gpgconf is not an error."""
    gpgconf = _gpgconf(gpg_binary)
    if gpgconf is None:
        return
    # Best effort, often in a finally: a failure here must not hide the error being raised.
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [gpgconf, "--homedir", str(home.absolute()), "--kill", "all"],
            env=_gpg_env(home.absolute()),
            capture_output=True,
            timeout=_GPG_TIMEOUT_S,
            check=False,
        )


def check_passphrase(passphrase: str, what: str) -> None:
    """Refuse passphrases gpg cannot take over a pipe; the message never contains it."""
    if not passphrase:
        raise KeyProblem(
            f"The {what} passphrase is empty.",
            "Give a non-empty passphrase.",
        )
    if any(ch in passphrase for ch in "\r\n\0"):
        raise KeyProblem(
            f"The {what} passphrase contains a line break or NUL character.",
            "gpg reads passphrases one line at a time: choose one on a single line.",
        )


def _check_key_request(name: str, email: str, bits: int, expire_days: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(
            f"A PGP key of {bits} bits is not supported: RSA keys must have "
            f"{MIN_BITS} to {MAX_BITS} bits.",
            "Use --bits 4096 (the default), 3072 or 2048.",
        )
    if expire_days < 0:
        raise UsageError(
            f"--expire {expire_days} is negative.", "Give a number of days, or 0 for never."
        )
    # Each value is one line of gpg's batch script: a line break would inject parameters.
    clean_name = name.strip()
    if not clean_name or any(ch in clean_name for ch in "<>") or not clean_name.isprintable():
        raise UsageError(
            f"{name!r} is not usable as the name on a PGP key.",
            'Give your or your firm\'s name, e.g. --name "Jane Doe", without <, > or line breaks.',
        )
    if not _EMAIL.fullmatch(email.strip()):
        raise UsageError(
            f"{email!r} is not an email address.", "Give one like --email jane@example.com."
        )


def _check_fingerprint(fingerprint: str) -> str:
    cleaned = fingerprint.replace(" ", "").upper()
    if not _FINGERPRINT.fullmatch(cleaned):
        raise KeyProblem(f"{fingerprint!r} is not a 40-hex-digit PGP fingerprint.")
    return cleaned


def _secret_keys(gpg: Any, home: Path) -> list[PgpKeyInfo]:
    listing = gpg.list_keys(secret=True)
    if listing.returncode not in (0, None):
        raise KeyProblem(
            f"gpg cannot list the secret keys in {home}: {status_summary(listing.stderr)}.",
            f"Check the folder and its permissions: ls -la {home}",
        )
    return [_key_info(raw) for raw in listing]


def _key_info(raw: dict[str, Any]) -> PgpKeyInfo:
    # python-gnupg leaves the capability of secret subkeys ("ssb") as None in ``subkeys``;
    # the full colon record, with "cap", is in ``subkey_info``.
    subkeys = raw.get("subkey_info", {}).values()
    return PgpKeyInfo(
        fingerprint=str(raw["fingerprint"]).upper(),
        uids=tuple(str(uid) for uid in raw.get("uids", ())),
        algorithm=_ALGORITHMS.get(str(raw.get("algo")), f"algorithm {raw.get('algo')}"),
        bits=int(raw.get("length") or 0),
        created=gpg_time(str(raw.get("date", ""))) or datetime.fromtimestamp(0, UTC),
        expires=gpg_time(str(raw.get("expires", ""))),
        has_encryption_subkey=any(
            "e" in str(sub.get("cap", "")) and str(sub.get("trust", "")) not in _UNUSABLE
            for sub in subkeys
        ),
    )


def gpg_time(value: str) -> datetime | None:
    """gpg's colon listings give seconds since the epoch, or ISO 8601 basic with some options."""
    if not value:
        return None
    if value.isdigit():
        return datetime.fromtimestamp(int(value), UTC)
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _uid_email(uid: str) -> str | None:
    match = _UID_EMAIL.search(uid)
    if match:
        return match.group(1).strip() or None
    return uid.strip() if _EMAIL.fullmatch(uid.strip()) else None


def status_summary(stderr: str | None, *secrets: str | None) -> str:
    """gpg's own words about a failure, short enough for one message and with no secret."""
    lines: list[str] = []
    for raw in (stderr or "").splitlines():
        line = raw.strip()
        if line.startswith("[GNUPG:] "):
            status = line.removeprefix("[GNUPG:] ")
            if status.split(" ", 1)[0] in _PROBLEM_STATUS:
                lines.append(status)
        elif line.startswith(("gpg: ", "gpgconf: ")) and not _CHATTER.search(line):
            lines.append(line.split(": ", 1)[1])
    text = "; ".join(dict.fromkeys(lines)) or "gpg gave no reason"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text if len(text) <= 600 else text[:597] + "..."


def _write_agent_conf(home: Path, gpg_binary: str) -> None:
    conf = home / AGENT_CONF
    try:
        current = conf.read_text("utf-8")
    except FileNotFoundError:
        current = ""
    present = {line.strip() for line in current.splitlines()}
    missing = [setting for setting in AGENT_SETTINGS if setting not in present]
    if not missing:
        return
    # Replace our settings' older values (a cache TTL someone raised) and keep everything else.
    ours = {setting.split()[0] for setting in AGENT_SETTINGS}
    kept = [line for line in current.splitlines() if line.strip().split(" ", 1)[0] not in ours]
    atomic_write(conf, ("\n".join([*kept, *AGENT_SETTINGS]) + "\n").encode("utf-8"), 0o600)
    # A running agent read the old file at start; the next gpg call starts one that reads this.
    stop_agent(home, gpg_binary)


def _gpg_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["GNUPGHOME"] = str(home)
    # gpg's own messages in English: the decryptor reads a few of them (a full disk).
    env["LC_MESSAGES"] = "C"
    env.pop("LANGUAGE", None)
    return env


def _gpgconf(gpg_binary: str) -> str | None:
    found = shutil.which(gpg_binary)
    if found:
        beside = Path(found).resolve().with_name("gpgconf")
        if beside.is_file():
            return str(beside)
    return shutil.which("gpgconf")


def _run_gpg(home: Path, gpg_binary: str, args: list[str], stdin: bytes = b"") -> bytes:
    """Run gpg for what python-gnupg has no method for; never with a passphrase."""
    gpg = open_gnupg(home, gpg_binary)
    cmd = [gpg.gpgbinary, "--homedir", str(home.absolute()), "--batch", "--no-tty", *args]
    try:
        done = subprocess.run(
            cmd,
            input=stdin,
            env=_gpg_env(home.absolute()),
            capture_output=True,
            timeout=_GPG_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeyProblem(f"Running gpg {args[0]} in {home} failed: {exc}.") from None
    if done.returncode != 0:
        reason = status_summary(done.stderr.decode("utf-8", "replace"))
        raise KeyProblem(
            f"gpg {args[0]} failed in {home}: {reason}.",
            f"Check the folder and its permissions: ls -la {home}",
        )
    return done.stdout
