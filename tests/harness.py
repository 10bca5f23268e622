"""Shared test helpers: a sender that encrypts like IBKR, projects pointed at a server, and
the end-state check every reliability test ends with, and how much of a file is cached."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import re
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.clitools import Project
from tests.sshd import SshdServer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gpg(home: Path, *args: str, data: bytes = b"") -> bytes:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--quiet", "--trust-model", "always", *args],
        input=data,
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout


def fingerprints(home: Path) -> list[str]:
    listing = _gpg(home, "--with-colons", "--list-keys").decode()
    return [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr")]


def stop_agent(home: Path) -> None:
    subprocess.run(
        ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
        check=False,
        capture_output=True,
        timeout=30,
    )


@dataclass
class Sender:
    """A GnuPG home that encrypts the way IBKR would: to the public key it was given."""

    home: Path
    recipient: str

    def import_key(self, public_key: Path) -> None:
        _gpg(self.home, "--import", str(public_key))

    def encrypt(self, data: bytes, *, armor: bool = False, recipient: str | None = None) -> bytes:
        extra = ["--armor"] if armor else []
        return _gpg(self.home, *extra, "-r", recipient or self.recipient, "--encrypt", data=data)

    def stop(self) -> None:
        stop_agent(self.home)


def make_sender(folder: Path, public_key: Path) -> Sender:
    home = folder / "sender"
    home.mkdir(mode=0o700)
    _gpg(home, "--import", str(public_key))
    return Sender(home, fingerprints(home)[0])


def stranger_key(folder: Path) -> tuple[Path, str]:
    """Another person's unprotected key pair; its public key is written to stranger-public.asc."""
    home = folder / "stranger"
    home.mkdir(mode=0o700)
    _gpg(
        home,
        "--passphrase",
        "",
        "--quick-gen-key",
        "Stranger <s@example.com>",
        "rsa2048",
        "cert,sign,encr",
        "0",
    )
    (folder / "stranger-public.asc").write_bytes(_gpg(home, "--armor", "--export"))
    stop_agent(home)
    return home, fingerprints(home)[0]


def point_at(project: Project, *, host: str, port: int, username: str, remote_dir: str) -> None:
    """Edit [sftp] of a project made by `init` as a user would after IBKR's email."""
    text = project.config.read_text()
    for old, new in (
        ('host = "xfer.interactivebrokers.com"', f'host = "{host}"'),
        ("port = 32", f"port = {port}"),
        ('username = ""', f'username = "{username}"'),
        ('remote_dir = "."', f'remote_dir = "{remote_dir}"'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    project.config.write_text(text)


def sshd_project(keyed: Project, sshd: SshdServer, sftp_dir: Path, target: Path) -> Project:
    """A copy of ``keyed`` at ``target`` that logs in to the test sshd (its client key, its
    host keys pinned) and fetches from ``sftp_dir``."""
    project = keyed.copy_to(target)
    shutil.copy(sshd.client_key_path, project.keys / "ibkr_rsa")
    (project.keys / "ibkr_rsa").chmod(0o600)
    (project.keys / "known_hosts").write_text(sshd.known_hosts_path.read_text())
    point_at(
        project, host=sshd.host, port=sshd.port, username=sshd.username, remote_dir=str(sftp_dir)
    )
    return project


def set_option(project: Project, old: str, new: str) -> None:
    text = project.config.read_text()
    assert old in text, old
    project.config.write_text(text.replace(old, new))


def archive_tree(root: Path) -> dict[str, str]:
    """Every archived plaintext under ``root`` (not the hidden folders), with its sha256."""
    return {
        p.relative_to(root).as_posix(): sha(p.read_bytes())
        for p in root.rglob("*")
        if p.is_file()
        and not p.relative_to(root).parts[0].startswith(".")
        and not p.name.startswith("index.sqlite3")
    }


def gpg_children() -> list[int]:
    """Process ids of the gpg processes this process started that still exist (zombies too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        command = stat[stat.index("(") + 1 : stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        if parent == os.getpid() and command == "gpg":
            found.append(int(entry.name))
    return found


def assert_consistent(root: Path) -> None:
    """The archive's promise, checked from the outside after any fault.

    No .part outside the inbox; no ledger row without its file and no file without its row;
    every archived file has the content the ledger recorded; no file is archived twice.
    """
    parts = [p for p in root.rglob("*.part") if p.parent != root / ".inbox"]
    assert parts == [], parts
    # closing(): sqlite3's own context manager commits but leaves the file open.
    with contextlib.closing(sqlite3.connect(root / "index.sqlite3")) as db:
        fetched = db.execute("SELECT inbox_name, size, mtime, state FROM fetched").fetchall()
        archived = db.execute("SELECT path, sha256 FROM archived").fetchall()
    inbox = root / ".inbox"
    in_inbox = set()
    if inbox.exists():
        in_inbox = {p.name for p in inbox.iterdir() if not p.name.endswith(".part")}
    waiting = {name for name, _, _, state in fetched if state == "fetched"}
    assert in_inbox == waiting, (in_inbox, waiting)
    for name, size, mtime, state in fetched:
        where = {"fetched": inbox, "quarantined": root / ".quarantine"}.get(state)
        if where is not None:  # as the ledger knows it: its size, dated with the remote mtime
            info = (where / name).stat()
            assert (info.st_size, int(info.st_mtime)) == (size, mtime), name
    quarantine = root / ".quarantine"
    held = set()
    if quarantine.exists():
        held = {p.name for p in quarantine.iterdir() if not p.name.endswith(".error.txt")}
    assert held == {name for name, _, _, state in fetched if state == "quarantined"}
    tree = archive_tree(root)
    assert tree == dict(archived), set(tree) ^ {p for p, _ in archived}
    for path, digest in tree.items():
        # NAME.v2.EXT exists only for content that differs from NAME.EXT's: never a second copy.
        base = re.sub(r"\.v\d+(?=(\.[^./]*)?$)", "", path)
        if base != path:
            assert tree.get(base) != digest, f"{path} repeats {base}"


def filesystem_type(path: Path) -> str:
    """The type of the file system ``path`` is on ("ext4", "tmpfs"...), from /proc/self/mounts."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1]
        inside = str(path).startswith(mount.rstrip("/") + "/") or str(path) == mount
        if inside and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind


def cached_bytes(path: Path) -> int:
    """How many bytes of ``path`` are in the page cache now, by mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    if size == 0:
        return 0  # nothing to map
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = ctypes.create_string_buffer(pages)
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
            resident = sum(byte & 1 for byte in vector.raw)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return resident * mmap.PAGESIZE
