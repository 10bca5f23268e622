"""known_hosts in OpenSSH's format: read, match, pin. Pure logic, no network, no paramiko.

Supports plain and hashed (``|1|salt|hash``) host fields, ``[host]:port`` entries for ports other
than 22, comma-separated patterns with ``*``/``?`` wildcards and ``!`` negation, and skips
``@cert-authority`` lines; a ``@revoked`` key is never accepted. Lines that do not parse are
ignored, as OpenSSH does: a damaged line cannot make an unknown key trusted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

from statements.fsutil import PUBLIC_FILE, atomic_write, ensure_private_dir


@dataclass(frozen=True)
class HostKey:
    key_type: str  # "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", ...
    blob: bytes

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    def describe(self) -> str:
        return f"{self.key_type} {self.fingerprint}"


@dataclass(frozen=True)
class KnownHostsEntry:
    hosts: str
    key: HostKey
    revoked: bool = False


def host_field(host: str, port: int) -> str:
    """The name OpenSSH looks up: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def parse_known_hosts(text: str) -> list[KnownHostsEntry]:
    entries: list[KnownHostsEntry] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        revoked = False
        if fields[0].startswith("@"):
            if fields[0] == "@revoked":
                revoked = True
            elif fields[0] != "@cert-authority":
                continue
            else:
                continue  # certificates are not used with IBKR's server
            fields = fields[1:]
        if len(fields) < 3:
            continue
        hosts, key_type, encoded = fields[0], fields[1], fields[2]
        try:
            blob = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if _blob_type(blob) != key_type:
            continue
        entries.append(KnownHostsEntry(hosts, HostKey(key_type, blob), revoked))
    return entries


def _blob_type(blob: bytes) -> str | None:
    if len(blob) < 4:
        return None
    length = int.from_bytes(blob[:4], "big")
    if length > len(blob) - 4:
        return None
    try:
        return blob[4 : 4 + length].decode("ascii")
    except UnicodeDecodeError:
        return None


def _hashed_match(pattern: str, name: str) -> bool:
    parts = pattern.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt = base64.b64decode(parts[2], validate=True)
        expected = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return False
    digest = hmac.new(salt, name.encode("utf-8"), hashlib.sha1).digest()
    return hmac.compare_digest(digest, expected)


def _wildcard(pattern: str) -> re.Pattern[str]:
    """OpenSSH patterns know only ``*`` and ``?``; ``[`` is literal (``[host]:port``)."""
    escaped = re.escape(pattern.lower())
    return re.compile(escaped.replace(r"\*", ".*").replace(r"\?", "."))


def hosts_match(hosts: str, name: str) -> bool:
    """OpenSSH pattern-list semantics: any positive match and no negated match."""
    if hosts.startswith("|"):
        return _hashed_match(hosts, name)
    matched = False
    for pattern in hosts.split(","):
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        if _wildcard(pattern).fullmatch(name.lower()):
            if negated:
                return False
            matched = True
    return matched


@dataclass(frozen=True)
class KnownHosts:
    path: Path
    entries: tuple[KnownHostsEntry, ...]

    @classmethod
    def load(cls, path: Path) -> KnownHosts:
        try:
            text = path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        return cls(path, tuple(parse_known_hosts(text)))

    def keys_for(self, host: str, port: int) -> list[HostKey]:
        name = host_field(host, port)
        return [e.key for e in self.entries if not e.revoked and hosts_match(e.hosts, name)]

    def is_revoked(self, key: HostKey) -> bool:
        return any(e.revoked and e.key == key for e in self.entries)

    def check(self, host: str, port: int, offered: HostKey) -> str:
        """``"ok"``, ``"unknown"`` (nothing pinned for the host), or ``"changed"``."""
        if self.is_revoked(offered):
            return "changed"
        pinned = self.keys_for(host, port)
        if not pinned:
            return "unknown"
        return "ok" if offered in pinned else "changed"


def pin(path: Path, host: str, port: int, keys: list[HostKey]) -> None:
    """Add ``keys`` for the host, replacing what was pinned for it before; atomic, 0644."""
    name = host_field(host, port)
    try:
        kept = [
            line for line in path.read_text("utf-8").splitlines() if not _line_is_for(line, name)
        ]
    except FileNotFoundError:
        kept = []
    added = [f"{name} {k.key_type} {base64.b64encode(k.blob).decode('ascii')}" for k in keys]
    ensure_private_dir(path.parent)
    atomic_write(path, (os.linesep.join([*kept, *added]) + "\n").encode("utf-8"), PUBLIC_FILE)


def _line_is_for(line: str, name: str) -> bool:
    fields = line.split()
    if not fields or fields[0].startswith(("#", "@")):
        return False
    return hosts_match(fields[0], name)
