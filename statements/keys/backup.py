"""Back up every key of a project into one file, and restore it on another computer.

IBKR's knowledge base tells users to back up the key pair (KB4411) and to move it to another
computer (KB4323). The backup is a tar, encrypted symmetrically by gpg (AES256), so a user can
always get the keys back without this tool: ``gpg -d BACKUP | tar x``. Inside, the SSH private
key and the PGP secret keys stay protected by their own passphrases as well.

The symmetric step runs in a throw-away GnuPG home, so the backup passphrase is never cached by
the project's agent; every passphrase goes to gpg over stdin.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import re
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from statements import __version__
from statements.config import Config
from statements.errors import KeyProblem
from statements.fsutil import (
    PRIVATE_FILE,
    PUBLIC_FILE,
    atomic_write,
    ensure_private_dir,
    keep_copy_aside,
    utc_stamp,
)
from statements.keys.pgp import (
    check_passphrase,
    export_ownertrust,
    export_secret_keys,
    import_keys,
    import_ownertrust,
    open_gnupg,
    secret_keys,
    status_summary,
    stop_agent,
)

FORMAT = "ibkr-statements key backup"
FORMAT_VERSION = 1
# Everything sits in one folder, so `tar x` by hand does not spill files into the current one.
TOP = "ibkr-statements-backup"
MANIFEST = "manifest.json"
README = "README.txt"
SSH_KEY = "ibkr_rsa"
SSH_PUB = "ibkr_rsa.pub"
KNOWN_HOSTS = "known_hosts"
PGP_PUBLIC = "pgp-public.asc"
PGP_SECRET = "pgp-secret-keys.asc"
OWNERTRUST = "pgp-ownertrust.txt"
# The only members a backup may hold, with the modes `tar x` gives them.
MEMBER_MODES = {
    MANIFEST: PUBLIC_FILE,
    README: PUBLIC_FILE,
    SSH_KEY: PRIVATE_FILE,
    SSH_PUB: PUBLIC_FILE,
    KNOWN_HOSTS: PUBLIC_FILE,
    PGP_PUBLIC: PUBLIC_FILE,
    PGP_SECRET: PRIVATE_FILE,
    OWNERTRUST: PUBLIC_FILE,
}
# Keys are a few kilobytes; these bounds keep a hostile file from filling memory.
MAX_BACKUP_BYTES = 16 * 1024 * 1024
MAX_MEMBER_BYTES = 4 * 1024 * 1024

# Strong key derivation for a file that may sit on a USB stick for years.
_SYMMETRIC_ARGS = ["--s2k-mode", "3", "--s2k-digest-algo", "SHA512", "--s2k-count", "65011712"]
_NO_SYMKEY_CACHE_SINCE = (2, 2, 7)
_OWNERTRUST_LINE = re.compile(r"[0-9A-F]{40}:\d+:")
_FINGERPRINT = re.compile(r"[0-9A-F]{40}")
_RESTORE_HINT = (
    "Use the file exactly as `ibkr-statements keys backup` wrote it; nothing was written."
)


@dataclass(frozen=True)
class BackupContents:
    ssh_fingerprint: str | None  # "SHA256:..." of the SSH public key, or None if absent
    pgp_fingerprints: tuple[str, ...]
    files: tuple[str, ...]  # member names in the backup


def create_backup(
    cfg: Config, out: Path, *, backup_passphrase: str, pgp_passphrase: str | None
) -> BackupContents:
    """Write all keys of the project into ``out`` (0600), encrypted with ``backup_passphrase``.

    ``pgp_passphrase`` unlocks the PGP secret keys for export (gpg 2.2 requires it); they stay
    protected by it inside the backup. An unprotected key needs none.
    """
    check_passphrase(backup_passphrase, "backup")
    _refuse_existing_output(out)
    gpg_binary = cfg.pgp.gpg_binary
    key_file = cfg.sftp.key_file
    members: dict[str, bytes] = {}
    ssh_fpr: str | None = None
    if key_file.is_file():
        members[SSH_KEY] = _read(key_file)
        if _pub_path(key_file).is_file():
            members[SSH_PUB] = _read(_pub_path(key_file))
            ssh_fpr = _ssh_fingerprint_or_problem(members[SSH_PUB], _pub_path(key_file))
    if cfg.sftp.known_hosts.is_file():
        members[KNOWN_HOSTS] = _read(cfg.sftp.known_hosts)
    home = cfg.pgp.gnupg_home
    pgp_fprs = tuple(k.fingerprint for k in secret_keys(home, gpg_binary))
    if pgp_fprs:
        armored = export_secret_keys(home, list(pgp_fprs), pgp_passphrase, gpg_binary)
        members[PGP_SECRET] = armored.encode("ascii")
        members[OWNERTRUST] = export_ownertrust(home, gpg_binary).encode("ascii")
    if cfg.pgp.public_key_file.is_file():
        members[PGP_PUBLIC] = _read(cfg.pgp.public_key_file)
    if SSH_KEY not in members and not pgp_fprs:
        raise KeyProblem(
            f"Nothing to back up: no SSH key at {key_file} and no PGP secret key in {home}.",
            "Create the keys first: ibkr-statements keys ssh, ibkr-statements keys pgp.",
        )
    created = datetime.now(UTC).replace(microsecond=0)
    names = [*members, README, MANIFEST]
    members[README] = _readme(created).encode("utf-8")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "created": created.isoformat(),
        "ssh_fingerprint": ssh_fpr,
        "pgp_fingerprints": list(pgp_fprs),
        "files": names,
    }
    members[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    with _scratch_gnupg(gpg_binary) as (_, gpg):
        sealed = _encrypt(gpg, _pack(members, created), backup_passphrase)
    _refuse_existing_output(out)
    atomic_write(out, sealed, PRIVATE_FILE)
    return BackupContents(ssh_fpr, pgp_fprs, tuple(f"{TOP}/{name}" for name in names))


def restore_backup(cfg: Config, src: Path, *, backup_passphrase: str) -> BackupContents:
    """Put the keys from ``src`` into a project that has none yet.

    Everything is decrypted and checked (the PGP keys by a trial import into a throw-away
    home) before the first file of the project is written.
    """
    check_passphrase(backup_passphrase, "backup")
    gpg_binary = cfg.pgp.gpg_binary
    key_file = cfg.sftp.key_file
    home = cfg.pgp.gnupg_home
    _refuse_existing_keys(cfg)
    sealed = _read_backup(src)
    with _scratch_gnupg(gpg_binary) as (scratch, gpg):
        members = _unpack(_decrypt(gpg, sealed, backup_passphrase, src), src)
        manifest = _check_manifest(members, src)
        _check_ssh(members, manifest, src)
        ownertrust = _check_ownertrust(members, src)
        secret = members.get(PGP_SECRET)
        expected = tuple(manifest["pgp_fingerprints"])
        if secret is not None:
            import_keys(scratch, _ascii(secret, PGP_SECRET, src), gpg_binary)
            trial = {k.fingerprint for k in secret_keys(scratch, gpg_binary)}
            if not set(expected) <= trial:
                raise _damaged(src, "the PGP secret keys do not match its manifest")
        elif expected:
            raise _damaged(src, f"{PGP_SECRET} is missing")

    if secret is not None:
        import_keys(home, _ascii(secret, PGP_SECRET, src), gpg_binary)
        if ownertrust:
            import_ownertrust(home, ownertrust, gpg_binary)
    if PGP_PUBLIC in members:
        _write_public(cfg.pgp.public_key_file, members[PGP_PUBLIC])
    if SSH_KEY in members:
        ensure_private_dir(key_file.parent)
        atomic_write(key_file, members[SSH_KEY], PRIVATE_FILE)
    if SSH_PUB in members:
        ensure_private_dir(key_file.parent)
        atomic_write(_pub_path(key_file), members[SSH_PUB], PUBLIC_FILE)
    if KNOWN_HOSTS in members:
        _write_public(cfg.sftp.known_hosts, members[KNOWN_HOSTS])

    # Report what is there now, read back from disk and from gpg, not what the manifest claims.
    pub = _pub_path(key_file)
    ssh_fpr = _ssh_fingerprint_or_problem(_read(pub), pub) if pub.is_file() else None
    pgp_fprs = tuple(k.fingerprint for k in secret_keys(home, gpg_binary))
    return BackupContents(ssh_fpr, pgp_fprs, tuple(f"{TOP}/{name}" for name in members))


def ssh_public_key_fingerprint(line: str) -> str:
    """``SHA256:...`` of an OpenSSH one-line public key, exactly as ``ssh-keygen -lf`` prints.

    Raises ValueError for anything that is not ``TYPE BASE64 [COMMENT]``.
    """
    parts = line.strip().split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line (TYPE BASE64 [COMMENT])")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise ValueError("the key data is not base64") from None
    # The blob starts with its own type name; a mismatch means a mangled line.
    if len(blob) < 4:
        raise ValueError("the key data is too short")
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + length] != parts[0].encode("ascii", "replace"):
        raise ValueError(f"the key data does not hold a {parts[0]} key")
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _pub_path(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".pub")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyProblem(f"Cannot read {path}: {exc.strerror}.") from None


def _ssh_fingerprint_or_problem(data: bytes, where: Path | str) -> str:
    try:
        return ssh_public_key_fingerprint(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeyProblem(f"{where} is not an OpenSSH public key: {exc}.") from None


def _refuse_existing_output(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise KeyProblem(
            f"{out} already exists; a backup is never written over another file.",
            "Choose another file name, or move the old file away first.",
        )
    if not out.parent.is_dir():
        raise KeyProblem(
            f"The folder {out.parent} for the backup does not exist.",
            "Create it, or choose another place for the backup.",
        )


def _refuse_existing_keys(cfg: Config) -> None:
    hint = (
        "Restore only into a project without keys: move keys/ aside, or restore into a fresh "
        "project folder (ibkr-statements init); nothing was written."
    )
    key_file = cfg.sftp.key_file
    for path in (key_file, _pub_path(key_file)):
        if path.exists() or path.is_symlink():
            raise KeyProblem(f"This project already has an SSH key: {path}.", hint)
    held = secret_keys(cfg.pgp.gnupg_home, cfg.pgp.gpg_binary)
    if held:
        listed = ", ".join(k.fingerprint for k in held)
        raise KeyProblem(
            f"This project already has PGP secret keys in {cfg.pgp.gnupg_home}: {listed}.", hint
        )


def _read_backup(src: Path) -> bytes:
    try:
        size = src.stat().st_size
    except FileNotFoundError:
        raise KeyProblem(f"No backup file at {src}.") from None
    if not src.is_file() or size > MAX_BACKUP_BYTES:
        raise KeyProblem(f"{src} is not a backup made by ibkr-statements.", _RESTORE_HINT)
    return _read(src)


@contextlib.contextmanager
def _scratch_gnupg(gpg_binary: str) -> Iterator[tuple[Path, Any]]:
    """A GnuPG home that lives for one operation; its agent is stopped before it goes."""
    with tempfile.TemporaryDirectory(prefix="ibkr-gpg-", ignore_cleanup_errors=True) as tmp:
        home = ensure_private_dir(Path(tmp))
        try:
            yield home, open_gnupg(home, gpg_binary)
        finally:
            stop_agent(home, gpg_binary)


def _symmetric_args(gpg: Any) -> list[str]:
    if tuple(gpg.version or ()) >= _NO_SYMKEY_CACHE_SINCE:
        return [*_SYMMETRIC_ARGS, "--no-symkey-cache"]
    return list(_SYMMETRIC_ARGS)


def _encrypt(gpg: Any, plain: bytes, passphrase: str) -> bytes:
    result = gpg.encrypt(
        plain,
        None,
        symmetric="AES256",
        passphrase=passphrase,
        armor=False,
        extra_args=_symmetric_args(gpg),
    )
    data = bytes(result.data or b"")
    if not result.ok or result.returncode != 0 or not data:
        raise KeyProblem(
            f"gpg could not encrypt the backup: {status_summary(result.stderr, passphrase)}.",
            "Check that GnuPG works: gpg --version",
        )
    return data


def _decrypt(gpg: Any, sealed: bytes, passphrase: str, src: Path) -> bytes:
    result = gpg.decrypt(sealed, passphrase=passphrase, extra_args=_symmetric_args(gpg))
    stderr = str(result.stderr or "")
    # python-gnupg sets ok on DECRYPTION_OKAY and never clears it; a modified or cut-off file
    # shows only in the exit status and the later status lines.
    failed = "DECRYPTION_FAILED" in stderr or "BADMDC" in stderr
    if not result.ok or result.returncode != 0 or failed:
        raise KeyProblem(
            f"Cannot open {src}: wrong backup passphrase or not a backup made by "
            f"ibkr-statements (gpg: {status_summary(stderr, passphrase)}).",
            "Give the passphrase chosen when the backup was made; nothing was written.",
        )
    return bytes(result.data)


def _pack(members: dict[str, bytes], created: datetime) -> bytes:
    buffer = io.BytesIO()
    stamp = int(created.timestamp())
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo(TOP)
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o700
        folder.mtime = stamp
        tar.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.size = len(data)
            info.mode = MEMBER_MODES[name]
            info.mtime = stamp
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _unpack(data: bytes, src: Path) -> dict[str, bytes]:
    """The members by base name; anything but the expected regular files is refused."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                members.update(_member(tar, info, members, src))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _damaged(src, f"the archive inside cannot be read ({exc})") from None
    return members


def _member(
    tar: tarfile.TarFile, info: tarfile.TarInfo, seen: dict[str, bytes], src: Path
) -> dict[str, bytes]:
    name = info.name
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise _damaged(src, f"unsafe member name {name!r}")
    if path.parts == (TOP,):
        if not info.isdir():
            raise _damaged(src, f"{name!r} is not a folder")
        return {}
    if len(path.parts) != 2 or path.parts[0] != TOP or path.name not in MEMBER_MODES:
        raise _damaged(src, f"unexpected member {name!r}")
    if not info.isreg():
        raise _damaged(src, f"{name!r} is a link or special file, not a regular file")
    if path.name in seen:
        raise _damaged(src, f"{name!r} appears twice")
    if info.size > MAX_MEMBER_BYTES:
        raise _damaged(src, f"{name!r} is too large for a key file")
    handle = tar.extractfile(info)
    if handle is None:
        raise _damaged(src, f"{name!r} cannot be read")
    return {path.name: handle.read()}


def _check_manifest(members: dict[str, bytes], src: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(members[MANIFEST])
    except KeyError:
        raise _damaged(src, f"{MANIFEST} is missing") from None
    except ValueError:
        raise _damaged(src, f"{MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _damaged(src, f"{MANIFEST} does not describe a key backup")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise KeyProblem(
            f"{src} has backup format {manifest.get('format_version')!r}; this version of "
            f"ibkr-statements reads format {FORMAT_VERSION}.",
            "Restore it with the version of ibkr-statements that made it, or a newer one.",
        )
    fprs = manifest.get("pgp_fingerprints")
    if not isinstance(fprs, list) or not all(
        isinstance(f, str) and _FINGERPRINT.fullmatch(f) for f in fprs
    ):
        raise _damaged(src, f"{MANIFEST} lists malformed PGP fingerprints")
    if not isinstance(manifest.get("ssh_fingerprint"), str | None):
        raise _damaged(src, f"{MANIFEST} has a malformed SSH fingerprint")
    return manifest


def _check_ssh(members: dict[str, bytes], manifest: dict[str, Any], src: Path) -> None:
    private = members.get(SSH_KEY)
    if private is not None and not (
        private.startswith(b"-----BEGIN ") and b"PRIVATE KEY-----" in private
    ):
        raise _damaged(src, f"{SSH_KEY} is not a private key file")
    public = members.get(SSH_PUB)
    found = None
    if public is not None:
        found = _ssh_fingerprint_or_problem(public, f"{SSH_PUB} in {src}")
    if found != manifest.get("ssh_fingerprint"):
        raise _damaged(src, "the SSH public key does not match its manifest")


def _check_ownertrust(members: dict[str, bytes], src: Path) -> str:
    table = _ascii(members.get(OWNERTRUST, b""), OWNERTRUST, src)
    for line in table.splitlines():
        if line.strip() and not line.startswith("#") and not _OWNERTRUST_LINE.fullmatch(line):
            raise _damaged(src, f"{OWNERTRUST} holds a line that is not FINGERPRINT:LEVEL:")
    return table


def _ascii(data: bytes, name: str, src: Path) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise _damaged(src, f"{name} is not text") from None


def _write_public(path: Path, data: bytes) -> None:
    """Write a public file; a different one already there is kept beside it, never lost."""
    if path.is_file():
        if path.read_bytes() == data:
            return
        keep_copy_aside(path, utc_stamp())
    if not path.parent.is_dir():
        ensure_private_dir(path.parent)
    atomic_write(path, data, PUBLIC_FILE)


def _damaged(src: Path, why: str) -> KeyProblem:
    return KeyProblem(
        f"{src} is damaged or not a backup made by ibkr-statements: {why}.", _RESTORE_HINT
    )


def _readme(created: datetime) -> str:
    return f"""\
Keys of ibkr-statements {__version__}, backed up {created.isoformat()}.

Restore with the tool, in a project folder without keys (ibkr-statements init):
    ibkr-statements keys restore BACKUP-FILE

Or by hand, with GnuPG alone:
    gpg -d BACKUP-FILE | tar x
    mkdir -m 700 -p keys
    cp -p {TOP}/{SSH_KEY} {TOP}/{SSH_PUB} {TOP}/{KNOWN_HOSTS} {TOP}/{PGP_PUBLIC} keys/
    gpg --homedir keys/gnupg --import {TOP}/{PGP_SECRET}
    gpg --homedir keys/gnupg --import-ownertrust {TOP}/{OWNERTRUST}

{SSH_KEY} and {PGP_SECRET} are still protected by their own passphrases.
"""
