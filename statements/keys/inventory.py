"""What keys the project holds, where, with which permissions: the data behind `keys show`."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from statements.config import Config
from statements.errors import KeyProblem
from statements.fsutil import PRIVATE_DIR, PRIVATE_FILE, PUBLIC_FILE
from statements.keys.pgp import PgpKeyInfo, scan_public_key_file, secret_keys
from statements.keys.ssh import (
    fingerprint_of_blob,
    fingerprint_of_line,
    openssh_header,
    public_path_for,
)


@dataclass(frozen=True)
class FileStatus:
    role: str
    path: Path
    mode: int | None  # None: missing
    wanted: int
    secret: bool

    @property
    def exists(self) -> bool:
        return self.mode is not None

    @property
    def unsafe(self) -> bool:
        """A secret readable, writable or enterable by group or others."""
        return self.secret and self.mode is not None and bool(self.mode & 0o077)


@dataclass(frozen=True)
class KeyInventory:
    files: tuple[FileStatus, ...]
    ssh_fingerprint: str | None
    ssh_public_line: str | None
    ssh_pair_matches: bool | None  # None: cannot tell without decrypting (PEM files)
    ssh_encrypted: bool | None
    pgp_keys: tuple[PgpKeyInfo, ...]
    exported_pgp_fingerprint: str | None
    problems: tuple[str, ...]


def _status(role: str, path: Path, wanted: int, secret: bool) -> FileStatus:
    try:
        mode: int | None = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = None
    return FileStatus(role, path, mode, wanted, secret)


def inventory(cfg: Config) -> KeyInventory:
    private = cfg.sftp.key_file
    public = public_path_for(private)
    home = cfg.pgp.gnupg_home
    files = (
        _status("keys folder", private.parent, PRIVATE_DIR, True),
        _status("SSH private key", private, PRIVATE_FILE, True),
        _status("SSH public key", public, PUBLIC_FILE, False),
        _status("known hosts", cfg.sftp.known_hosts, PUBLIC_FILE, False),
        _status("GnuPG home", home, PRIVATE_DIR, True),
        _status("PGP public key", cfg.pgp.public_key_file, PUBLIC_FILE, False),
    )
    problems = [
        f"{f.role} {f.path} is {f.mode:04o}: readable by other users. Run: chmod "
        f"{f.wanted:o} {f.path}"
        for f in files
        if f.unsafe and f.mode is not None
    ]

    ssh_line = public.read_text("ascii").strip() if public.is_file() else None
    ssh_fpr = fingerprint_of_line(ssh_line) if ssh_line else None
    matches: bool | None = None
    encrypted: bool | None = None
    if private.is_file():
        header = openssh_header(private.read_bytes())
        if header is not None:
            encrypted = header[0] != "none"
            if ssh_fpr is not None:
                matches = fingerprint_of_blob(header[1]) == ssh_fpr
                if not matches:
                    problems.append(
                        f"{public} is not the public half of {private}: "
                        "IBKR would refuse the key. Run `ibkr-statements keys ssh --force`."
                    )
        if encrypted is False:
            problems.append(f"{private} has no passphrase: anyone who copies it can log in.")

    pgp_keys: tuple[PgpKeyInfo, ...] = ()
    exported: str | None = None
    if home.is_dir():
        pgp_keys = tuple(secret_keys(home, cfg.pgp.gpg_binary))
        if cfg.pgp.public_key_file.is_file():
            try:
                scanned = scan_public_key_file(home, cfg.pgp.public_key_file, cfg.pgp.gpg_binary)
            except KeyProblem as exc:
                problems.append(exc.message)
                scanned = []
            exported = scanned[0].fingerprint if len(scanned) == 1 else None
            if exported and exported not in {k.fingerprint for k in pgp_keys}:
                problems.append(
                    f"{cfg.pgp.public_key_file} holds {exported}, which has no secret key in "
                    f"{home}: files encrypted to it cannot be decrypted here."
                )
    return KeyInventory(
        files=files,
        ssh_fingerprint=ssh_fpr,
        ssh_public_line=ssh_line,
        ssh_pair_matches=matches,
        ssh_encrypted=encrypted,
        pgp_keys=pgp_keys,
        exported_pgp_fingerprint=exported,
        problems=tuple(problems),
    )
