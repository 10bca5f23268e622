"""The sFTP side, and the only module that imports paramiko (client side).

Connects with a key file and a pinned host key, lists the remote folder with untrusted names
refused, and streams files with pipelined reads. Every paramiko, socket and OS error is
translated here into a :class:`RemoteError` (exit 4) that names IBKR's known causes.
"""

from __future__ import annotations

import collections
import fnmatch
import functools
import io
import logging
import operator
import posixpath
import random
import re
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeAlias, TypeVar, cast

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from paramiko.buffered_pipe import PipeTimeout
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_HANDLE,
    CMD_NAME,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_STATUS,
)

from statements.config import Config
from statements.errors import KeyProblem, RemoteError, ThreadLimit, UsageError
from statements.hostkeys import HostKey, KnownHosts, pin
from statements.keys.ssh import SshPrivateKey, fingerprint_of_blob, load_private_key
from statements.passphrase import PassphraseSource, read_passphrase
from statements.store import FileVersion as FileVersion
from statements.store import KnownVersions as KnownVersions
from statements.store import Listing as Listing
from statements.store import Refused as Refused
from statements.store import RemoteFile as RemoteFile
from statements.store import RemoteSession as RemoteSession
from statements.store import RemoteStore as RemoteStore
from statements.store import Transient as Transient
from statements.store import nothing_known

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_NAME_BYTES = 255
# A byte that is not UTF-8, as surrogateescape decoding leaves it in a name.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# aes-gcm first: authenticated encryption in one pass is the cheapest paramiko offers.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
    "aes192-ctr",
)
# Large SSH windows keep many 32 KiB read replies in flight on long-latency links.
WINDOW_SIZE = 16 * 1024 * 1024
# Reads: 32 KiB is what every SFTP server serves; a server that announces larger reads
# (limits@openssh.com) is asked for up to MAX_READ_CHUNK. A file has up to READ_AHEAD_BYTES in
# flight, in at most MAX_READS_AHEAD requests, as many as OpenSSH's sftp keeps (64): a server
# that serves a few bytes per read must not make it millions. So 32 KiB reads keep 2 MiB in
# flight, as sftp does, and 256 KiB reads 4 MiB: in `run` of a 1 GiB report, where gpg drains
# the download in bursts, 4 MiB took 4.61 s against 4.84 s for 2 MiB and 5.02 s for 8 MiB
# (the fetch and its early decryption in one process, medians of 5 interleaved), and bench/
# big's `run` 5.58 against 5.81 s. On a long line it is also the bound on throughput: 4 MiB
# per round trip.
READ_CHUNK = 32 * 1024
MAX_READ_CHUNK = 256 * 1024
READ_AHEAD_BYTES = 4 * 1024 * 1024
MAX_READS_AHEAD = 64
READ_BATCHES = 4  # reads go out a quarter of the read-ahead at a time, in one SSH packet
# A whole read reply in one SSH packet (paramiko's default, 32 KiB, splits even a 32 KiB one).
MAX_PACKET_SIZE = MAX_READ_CHUNK + 1024
# What one read from the connection's socket may take (ReadAheadSocket).
READ_AHEAD_SOCKET_BYTES = 128 << 10
# Listing: READDIR requests kept in flight on one folder handle (OpenSSH answers each with
# up to 100 names; 32 in flight list 20,000 files in 7 round trips), and how much of a
# folder is believed before the listing is refused.
READDIR_AHEAD = 32
MAX_FOLDER_ENTRIES = 1_000_000
MAX_READDIR_REQUESTS = MAX_FOLDER_ENTRIES  # a server that answers with names gives >= 1 each
_FLAG_SIZE = paramiko.SFTPAttributes.FLAG_SIZE
_FLAG_UIDGID = paramiko.SFTPAttributes.FLAG_UIDGID
_FLAG_PERMISSIONS = paramiko.SFTPAttributes.FLAG_PERMISSIONS
_FLAG_AMTIME = paramiko.SFTPAttributes.FLAG_AMTIME
_FLAG_EXTENDED = paramiko.SFTPAttributes.FLAG_EXTENDED
ALTERNATIVE_ENDPOINT = "ftp2.interactivebrokers.com port 22, folder outgoing"


def printable(name: str) -> str:
    return name if name.isprintable() else repr(name)


# Printable ASCII without "/", "\\" or "..", not starting with ".", at most MAX_NAME_BYTES: safe
# by every rule of name_problem, and what nearly every name is (checked 20,000 times a night).
_PLAIN_NAME = re.compile(rf"(?!\.)(?!.*\.\.)[ -.0-\[\]-~]{{1,{MAX_NAME_BYTES}}}")


def name_problem(name: str) -> str | None:
    """Why a remote name cannot become a local file name, or None when it is safe."""
    if _PLAIN_NAME.fullmatch(name):
        return None
    return _name_problem_by_rules(name)


def _name_problem_by_rules(name: str) -> str | None:
    if not name:
        return "empty name"
    if "\x00" in name:
        return "contains NUL"
    if "\n" in name or "\r" in name:
        return "contains a line break"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if ".." in name:
        return "is or contains '..'"
    if name.startswith("."):
        return "starts with '.'"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    if _ESCAPED_BYTE.search(name):  # see list_folder_entries
        return "is not valid UTF-8"
    if not name.isprintable():
        return "contains control characters"
    return None


class FolderEntry(NamedTuple):
    """One name of a folder listing, with the attributes paramiko's SFTPAttributes would hold
    (same field names; None where the server sent none). A tuple, not SFTPAttributes: an
    __init__ and a dict for each of 20,000 names cost more than reading their bytes."""

    filename: str  # surrogate-escaped where the server's bytes are not UTF-8
    st_size: int | None
    st_uid: int | None
    st_gid: int | None
    st_mode: int | None
    st_atime: int | None
    st_mtime: int | None
    extended: tuple[tuple[bytes, bytes], ...]  # (name, value); OpenSSH sends none


# What scan_folder does with each READDIR answer's entries, as it arrives.
Scan: TypeAlias = Callable[[list[FolderEntry]], _T]


def list_folder_entries(sftp: paramiko.SFTPClient, folder: str) -> list[FolderEntry]:
    """``sftp.listdir_attr(folder)``, pipelined, and keeping names that are not UTF-8."""
    return [entry for batch in scan_folder(sftp, folder, lambda: list) for entry in batch]


def scan_folder(
    sftp: paramiko.SFTPClient, folder: str, start_scan: Callable[[], Scan[_T]]
) -> list[_T]:
    """A scan (``start_scan()``) of each READDIR answer's entries, in the server's order.

    Like ``sftp.listdir_attr(folder)``, but pipelined, keeping names that are not UTF-8, and
    scanning each answer while the server reads the next.

    OpenSSH sends each name as the bytes on its disk, and paramiko decodes them strictly: one
    such name would fail the whole listing with UnicodeDecodeError, every night. Here it
    arrives surrogate-escaped, and name_problem refuses it like any other unsafe name.

    listdir_attr also waits for each READDIR answer (up to 100 names from OpenSSH) before it
    asks for the next: 200 round trips for 20,000 files. Here READDIR_AHEAD requests on the
    handle are in flight; the server answers them in order, each with the next batch, then EOF.
    ``scan`` runs as each answer arrives, while the next ones are on their way: what it does
    for 20,000 names then costs little more than the listing itself.
    """
    # paramiko has no hook for that decoding: this is its listdir_attr, rewritten around it.
    request = sftp._request  # type: ignore[attr-defined]
    path = sftp._adjust_cwd(folder)  # type: ignore[attr-defined]
    # A server that answers one handle's requests out of order shows it by names after an
    # EOF; the folder is then listed again with one request at a time, as listdir_attr does,
    # by a new scan.
    for ahead in (READDIR_AHEAD, 1):
        kind, msg = request(CMD_OPENDIR, path)
        if kind != CMD_HANDLE:
            raise paramiko.SFTPError("Expected handle")
        handle = msg.get_binary()
        scanned = _read_folder(sftp, handle, ahead, start_scan())
        # Nothing was written through the handle: no need to wait a round trip for the answer.
        sftp._async_request(type(None), CMD_CLOSE, handle)  # type: ignore[attr-defined]
        if scanned is not None:
            return scanned
        log.info("%s: READDIR answers came out of order; listing it again, unpipelined", folder)
    raise AssertionError("unreachable: one READDIR in flight leaves nothing after the end")


def _read_folder(
    sftp: paramiko.SFTPClient, handle: bytes, ahead: int, scan: Scan[_T]
) -> list[_T] | None:
    """``scan`` of each answer on an open folder handle, with ``ahead`` READDIRs in flight.

    None when a name arrives after the server said EOF. Once at EOF, the requests still in
    flight are drained (their answers are EOF) so that the handle can be closed cleanly.
    """
    replies = _Replies()
    pending: collections.deque[int] = collections.deque()
    scanned: list[_T] = []
    listed = 0
    for _ in range(MAX_READDIR_REQUESTS):
        # Topped up in batches, each in one SSH packet: a send per request cost a third of
        # the listing's own CPU time (a loopback send runs the receiver's TCP work too).
        if len(pending) <= ahead // 2:
            more = ahead - len(pending)
            pending.extend(_send_readdirs(sftp, replies, handle, more))
        try:
            kind, msg = _reply(sftp, replies, pending.popleft())
        except EOFError:
            break  # paramiko's way of saying the folder has no more entries
        if kind != CMD_NAME:
            raise paramiko.SFTPError("Expected name response")
        entries: list[FolderEntry] = []
        _add_names(msg.get_remainder(), entries)
        listed += len(entries)
        if listed > MAX_FOLDER_ENTRIES:
            raise OSError(f"the server lists more than {MAX_FOLDER_ENTRIES} entries")
        scanned.append(scan(entries))
    else:
        raise OSError(f"the server sent no end after {MAX_READDIR_REQUESTS} READDIR answers")
    in_order = True
    while pending:
        try:
            kind, _msg = _reply(sftp, replies, pending.popleft())
        except EOFError:
            continue
        except TimeoutError:
            raise  # a stalled server: fail now, not after each request in flight
        except OSError:
            continue  # an error status past the end: listdir_attr would never have asked
        if kind == CMD_NAME:
            in_order = False
    return scanned if in_order else None


_HEAD_WITH_ID = struct.Struct(">IBI")  # an SFTP packet's length, type and request id
_U32 = struct.Struct(">I")
_U32_PAIR = struct.Struct(">II")
_U64 = struct.Struct(">Q")
_ENTRY_MIN_BYTES = 12  # name length, longname length, attribute flags


def _send_readdirs(
    sftp: paramiko.SFTPClient, replies: _Replies, handle: bytes, count: int
) -> list[int]:
    """``count`` READDIRs on ``handle`` in one write to the channel, numbered and awaited as
    paramiko's ``_async_request(replies, CMD_READDIR, handle)`` would; their numbers."""
    numbers = _number_requests(sftp, replies, count)
    size = 9 + len(handle)  # type, id, the handle's length, the handle
    tail = _U32.pack(len(handle)) + handle
    packets = b"".join(_HEAD_WITH_ID.pack(size, CMD_READDIR, number) + tail for number in numbers)
    sftp._write_all(packets)  # type: ignore[attr-defined]
    return numbers


def _number_requests(sftp: paramiko.SFTPClient, replies: _Replies, count: int) -> list[int]:
    """Numbers for ``count`` requests whose answers go to ``replies``, as paramiko's
    ``_async_request`` gives them: for requests written to the channel in one go."""
    with sftp._lock:  # type: ignore[attr-defined]  # the numbering is paramiko's
        first = sftp.request_number
        sftp.request_number = first + count
        numbers = list(range(first, first + count))
        for number in numbers:
            sftp._expecting[number] = replies  # type: ignore[attr-defined]
    return numbers


def _add_names(data: bytes, entries: list[FolderEntry]) -> None:
    """Append the entries of a NAME reply (``data``: what follows its request id) but . and ..

    Each holds what paramiko's ``SFTPAttributes._from_msg`` reads, field for field, except
    that the name is decoded with surrogateescape and the long name (``ls -l`` text that
    nothing here reads) is skipped. paramiko reads field by field through a BytesIO; struct on
    the bytes, inline, takes a fraction of that. Unlike paramiko, a reply that ends early is
    refused: paramiko pads it with zero bytes, and a count of 2**32 names in a short reply
    would keep it looping.
    """
    u32 = _U32.unpack_from
    pair = _U32_PAIR.unpack_from
    u64 = _U64.unpack_from
    end = len(data)
    append = entries.append
    try:
        (count,) = u32(data, 0)
        if count > (end - 4) // _ENTRY_MIN_BYTES:
            raise _malformed()
        at = 4
        for _ in range(count):
            (length,) = u32(data, at)
            name = data[at + 4 : at + 4 + length]
            at += 4 + length
            (length,) = u32(data, at)  # the long name, skipped
            at += 4 + length
            (flags,) = u32(data, at)
            at += 4
            size = uid = gid = mode = atime = mtime = None
            extended: tuple[tuple[bytes, bytes], ...] = ()
            if flags & _FLAG_SIZE:
                (size,) = u64(data, at)
                at += 8
            if flags & _FLAG_UIDGID:
                uid, gid = pair(data, at)
                at += 8
            if flags & _FLAG_PERMISSIONS:
                (mode,) = u32(data, at)
                at += 4
            if flags & _FLAG_AMTIME:
                atime, mtime = pair(data, at)
                at += 8
            if flags & _FLAG_EXTENDED:
                extended, at = _extended(data, at)
            if at > end:  # a name ran past the end: slicing does not say so, the offset does
                raise _malformed()
            if name in (b".", b".."):
                continue
            append(
                FolderEntry(
                    name.decode("utf-8", "surrogateescape"),
                    size,
                    uid,
                    gid,
                    mode,
                    atime,
                    mtime,
                    extended,
                )
            )
    except struct.error:
        raise _malformed() from None


def _extended(data: bytes, at: int) -> tuple[tuple[tuple[bytes, bytes], ...], int]:
    """The extended attributes at ``at`` (count, then name and value strings), and the offset
    after them; struct.error or the caller's end check when they run past the reply."""
    (pairs,) = _U32.unpack_from(data, at)
    at += 4
    if pairs > (len(data) - at) // 8:
        raise _malformed()
    found = []
    for _ in range(pairs):
        name, at = _string(data, at)
        value, at = _string(data, at)
        found.append((name, value))
    return tuple(found), at


def _string(data: bytes, at: int) -> tuple[bytes, int]:
    """The SFTP string (u32 length, then bytes) at ``at``, and the offset after it."""
    (length,) = _U32.unpack_from(data, at)
    return data[at + 4 : at + 4 + length], at + 4 + length


def _malformed() -> OSError:
    return OSError("the server sent a malformed folder listing (a READDIR answer ends early)")


def _reply(sftp: paramiko.SFTPClient, replies: _Replies, num: int) -> tuple[int, paramiko.Message]:
    """The answer to request ``num``; a status raises (EOFError at the end) as paramiko's do."""
    if num in replies.replies:
        kind, msg = replies.replies.pop(num)
        if kind == CMD_STATUS:
            sftp._convert_status(msg)  # type: ignore[attr-defined]  # raises unless OK
        return kind, msg
    kind, msg = sftp._read_response(num)  # type: ignore[attr-defined]
    return cast(int, kind), cast(paramiko.Message, msg)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Does ``name`` match one of the glob ``patterns``, ignoring case."""
    return _pattern_regex(tuple(patterns)).match(name) is not None


@functools.lru_cache(maxsize=8)
def _pattern_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    # One compiled alternation for all patterns: the listing tests 20,000 names a night.
    either = "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns) or "(?!)"
    return re.compile(either, re.IGNORECASE | re.DOTALL)


# --- settings and key ----------------------------------------------------------------------


@dataclass(frozen=True)
class SftpSettings:
    host: str
    port: int
    username: str
    known_hosts: KnownHosts
    remote_dir: str = "."
    patterns: tuple[str, ...] = ("*.pgp", "*.gpg", "*.asc")
    recursive: bool = False
    timeout_s: float = 30.0
    keepalive_s: float = 15.0
    retries: int = 3
    retry_backoff_s: float = 1.0
    disabled_algorithms: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config) -> SftpSettings:
        s = cfg.sftp
        if not s.username:
            raise KeyProblem(
                f"{cfg.source}: [sftp] username is empty.",
                "Set it to the username from IBKR's confirmation email.",
            )
        return cls(
            host=s.host,
            port=s.port,
            username=s.username,
            known_hosts=KnownHosts.load(s.known_hosts),
            remote_dir=s.remote_dir,
            patterns=s.patterns,
            recursive=s.recursive,
            timeout_s=s.timeout_s,
            keepalive_s=s.keepalive_s,
            retries=s.retries,
            retry_backoff_s=s.retry_backoff_s,
            disabled_algorithms={k: list(v) for k, v in s.disabled_algorithms.items()},
        )


def to_paramiko_key(key: SshPrivateKey) -> paramiko.PKey:
    if isinstance(key, rsa.RSAPrivateKey):
        return paramiko.RSAKey(key=key)
    # paramiko builds Ed25519 and ECDSA keys from their serialized form only.
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return paramiko.Ed25519Key(file_obj=io.StringIO(pem))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return paramiko.ECDSAKey.from_private_key(io.StringIO(pem))


def load_login_key(cfg: Config) -> paramiko.PKey:
    """The SSH key from ``[sftp] key_file``, once per run; refuses a key others can read."""
    path = cfg.sftp.key_file
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = 0
    if mode & 0o077:
        raise KeyProblem(
            f"The SSH private key {path} is readable by other users "
            f"(mode {stat.S_IMODE(mode):04o}); like OpenSSH, this tool refuses to use it.",
            f"Run: chmod 600 {path}",
        )
    source = PassphraseSource("SSH key", cfg.sftp.key_passphrase_env, cfg.sftp.key_passphrase_file)
    return to_paramiko_key(load_private_key(path, read_passphrase(source)))


def key_fingerprint(key: paramiko.PKey) -> str:
    return fingerprint_of_blob(key.asbytes())


# --- connecting ----------------------------------------------------------------------------


class HostKeyUnknown(RemoteError):
    def __init__(self, message: str, hint: str, offered: HostKey) -> None:
        super().__init__(message, hint)
        self.offered = offered


def _host_key_types(pinned: Sequence[HostKey], available: Sequence[str]) -> list[str]:
    """Offer the key types pinned for this host first, so the server shows us one we know."""
    wanted: list[str] = []
    for key in pinned:
        if key.key_type == "ssh-rsa":
            wanted += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
        else:
            wanted.append(key.key_type)
    first = [t for t in dict.fromkeys(wanted) if t in available]
    return first + [t for t in available if t not in first]


_RELATIVE = operator.attrgetter("relative")


class _ScannedBatch(NamedTuple):
    files: list[RemoteFile]
    refused: list[Refused]
    subfolders: list[str]  # names to walk into (recursive listings)
    known: int  # files left out as versions the caller has


_LISTED_TWICE = "listed more than once by the server"


class _FolderScan:
    """Sorts one folder's entries, a READDIR answer at a time, into files to fetch, refused
    names and subfolders to walk.

    A file whose version is ``known`` is only counted: on a night with nothing new that is
    every file, and the 20,000 RemoteFiles a listing would make, sort and compare with the
    history afterwards cost more than the lookup here, while the server reads the next names.
    """

    def __init__(
        self,
        folder: str,
        prefix: str,
        patterns: re.Pattern[str],
        descend: bool,
        known: KnownVersions,
    ):
        # posixpath.join(folder, name) for a name without "/", once per folder, not per name.
        self.joined = (
            ""
            if folder == "."
            else folder
            if folder in ("", "/") or folder.endswith("/")
            else f"{folder}/"
        )
        self.prefix = prefix
        self.matches = patterns.match
        self.descend = descend
        self.known_versions = known
        self.known: Container[FileVersion] | None = None  # known(), once names have arrived
        self.seen: set[str] = set()  # the names of this folder to fetch or walk, so far

    def __call__(self, entries: list[FolderEntry]) -> _ScannedBatch:
        joined, prefix, matches = self.joined, self.prefix, self.matches
        known, seen = self.known, self.seen
        if known is None:
            known = self.known = self.known_versions()
        files: list[RemoteFile] = []
        refused: list[Refused] = []
        subfolders: list[str] = []
        skipped = 0
        for entry in entries:
            name = entry.filename
            kind = stat.S_IFMT(entry.st_mode or 0)
            if kind == stat.S_IFDIR and self.descend:
                if name in seen:
                    refused.append(Refused(printable(prefix + name), _LISTED_TWICE))
                elif name_problem(name) is None:
                    seen.add(name)
                    subfolders.append(name)
                continue
            if matches(name) is None:
                continue
            problem = name_problem(name)
            if problem is None and kind == stat.S_IFLNK:
                problem = "is a symbolic link; only regular files are fetched"
            elif problem is None and kind != stat.S_IFREG:
                problem = "is not a regular file"
            relative = prefix + name
            if problem is not None:
                refused.append(Refused(printable(relative), problem))
                continue
            path, size, mtime = joined + name, entry.st_size or 0, entry.st_mtime or 0
            if (path, size, mtime) in known:
                skipped += 1
            # A hostile or broken server may list a name twice; fetching both entries at once
            # would race on one inbox file. The first entry to fetch counts, the others are
            # refused. Only names to fetch are kept for this: a version fetched before is not
            # fetched again however often it is listed, and keeping every name of a folder
            # that IBKR never empties cost 140 bytes per report (14 MiB at 100,000).
            elif name in seen:
                refused.append(Refused(printable(relative), _LISTED_TWICE))
            else:
                seen.add(name)
                files.append(RemoteFile(path, relative, size, mtime))
        return _ScannedBatch(files, refused, subfolders, skipped)


class SftpSession:
    """One authenticated connection with an SFTP channel."""

    def __init__(self, settings: SftpSettings, transport: paramiko.Transport) -> None:
        self.settings = settings
        self.transport = transport
        # As paramiko's SFTPClient.from_transport, with the channel's buffer swapped first.
        channel = transport.open_session()
        channel.in_buffer = PacketPipe()  # type: ignore[assignment]
        channel.invoke_subsystem("sftp")
        client = paramiko.SFTPClient(channel)
        self.sftp = client
        # Every SFTP call waits at most timeout_s for an answer: a stalled server is an error.
        channel.settimeout(settings.timeout_s)
        self.read_chunk = _read_chunk(client)

    def close(self) -> None:
        # After a dropped connection paramiko's close raises EOFError; closing must not.
        try:
            self.sftp.close()
        except (EOFError, OSError, paramiko.SSHException):
            pass
        finally:
            self.transport.close()

    def _line_lost(self) -> bool:
        """The SFTP channel or the whole connection is gone (a cut line, a dead server)."""
        channel = self.sftp.get_channel()
        return channel is None or channel.closed or not self.transport.is_active()

    def list_files(self, known: KnownVersions = nothing_known) -> Listing:
        files: list[RemoteFile] = []
        refused: list[Refused] = []
        left_out = self._walk(self.settings.remote_dir, "", files, refused, known, depth=0)
        return Listing(tuple(sorted(files, key=_RELATIVE)), tuple(refused), left_out)

    def _walk(
        self,
        folder: str,
        prefix: str,
        files: list[RemoteFile],
        refused: list[Refused],
        known: KnownVersions,
        depth: int,
    ) -> int:
        """Adds ``folder``'s files and refusals (and its subfolders', when recursive); returns
        how many known files it left out."""
        patterns = _pattern_regex(tuple(self.settings.patterns))
        descend = self.settings.recursive and depth < 16
        try:
            scanned = scan_folder(
                self.sftp, folder, lambda: _FolderScan(folder, prefix, patterns, descend, known)
            )
        # TimeoutError is an OSError too: a server gone quiet must be retried, not taken for a
        # folder that cannot be listed.
        except (TimeoutError, EOFError, paramiko.SSHException) as exc:
            raise Transient(f"listing {folder}: {exc or type(exc).__name__}") from exc
        except OSError as exc:
            if self._line_lost():  # paramiko's "Socket is closed": the line, not the folder
                raise Transient(f"listing {folder}: {exc}") from exc
            raise _remote_folder_error(self.settings, folder, exc) from None
        subfolders: list[str] = []
        left_out = 0
        for batch in scanned:
            files += batch.files
            refused += batch.refused
            subfolders += batch.subfolders
            left_out += batch.known
        for name in subfolders:
            left_out += self._walk(
                posixpath.join(folder, name), f"{prefix}{name}/", files, refused, known, depth + 1
            )
        return left_out

    def download(
        self,
        remote: RemoteFile,
        sink: BinaryIO,
        offset: int,
        progress: Callable[[int], None],
    ) -> None:
        """Write ``remote``'s bytes from ``offset`` to its end into ``sink``, pipelined."""
        try:
            handle = self.sftp.open(remote.path, "rb")
            try:
                _read_pipelined(
                    self.sftp,
                    cast(bytes, handle.handle),  # the raw handle; the stubs say otherwise
                    offset,
                    remote.size,
                    self.read_chunk,
                    sink,
                    progress,
                )
            finally:
                # Read-only: nothing to wait for, so no round trip per file for the answer.
                handle._close(async_=True)  # type: ignore[attr-defined]
        except FileNotFoundError:
            raise RemoteError(f"{remote.path} disappeared from the server.") from None
        except PermissionError:
            raise RemoteError(f"The server refuses to let us read {remote.path}.") from None
        except (TimeoutError, EOFError, paramiko.SSHException, ConnectionError) as exc:
            raise Transient(f"reading {remote.path}: {exc or type(exc).__name__}") from exc
        except OSError as exc:
            if exc.errno is None:  # paramiko reports a dropped channel as a bare OSError
                raise Transient(f"reading {remote.path}: {exc}") from exc
            raise

    def remove(self, remote: RemoteFile) -> None:
        try:
            self.sftp.remove(remote.path)
        except OSError as exc:
            raise RemoteError(f"Cannot delete {remote.path} on the server: {exc}.") from None


def _read_chunk(sftp: paramiko.SFTPClient) -> int:
    """The read size to ask for: more than 32 KiB only when the server says it serves more."""
    try:
        kind, msg = sftp._request(CMD_EXTENDED, "limits@openssh.com")  # type: ignore[attr-defined]
    except (OSError, EOFError):  # SSH_FX_OP_UNSUPPORTED and the like: nothing announced
        return READ_CHUNK
    if kind != CMD_EXTENDED_REPLY:
        return READ_CHUNK
    msg.get_int64()  # max packet length
    max_read = msg.get_int64()
    return max(READ_CHUNK, min(MAX_READ_CHUNK, max_read)) if max_read else READ_CHUNK


class _Replies:
    """Read replies that arrive out of order, kept until their turn (paramiko calls this)."""

    def __init__(self) -> None:
        self.replies: dict[int, tuple[int, paramiko.Message]] = {}
        self.data: dict[int, bytes] = {}  # DATA replies, by request (_read_data)

    def _async_response(self, kind: int, msg: paramiko.Message, num: int) -> None:
        self.replies[num] = (kind, msg)


def _read_pipelined(
    sftp: paramiko.SFTPClient,
    handle: bytes,
    start: int,
    end: int,
    chunk: int,
    sink: BinaryIO,
    progress: Callable[[int], None],
) -> None:
    """Bytes start..end of an open remote file into ``sink``, in order, with reads in flight.

    paramiko's SFTPFile.prefetch starts a thread per file that polls every 10 ms, and once
    the reader catches up with it, falls back to one round trip per 32 KiB while it keeps
    buffering the rest of the file in memory (paramiko PR #2519). This is the pipeline OpenSSH's
    sftp runs, on paramiko's request layer. A short reply is completed by asking for the rest
    first, and later requests are no larger than what the server served.
    """
    replies = _Replies()
    pending: collections.deque[tuple[int, int, int]] = collections.deque()
    ahead = _reads_ahead(chunk)
    next_offset = start
    while True:
        if len(pending) <= ahead - max(1, ahead // READ_BATCHES) and next_offset < end:
            ranges: list[tuple[int, int]] = []
            while len(pending) + len(ranges) < ahead and next_offset < end:
                length = min(chunk, end - next_offset)
                ranges.append((next_offset, length))
                next_offset += length
            numbers = _send_reads(sftp, replies, handle, ranges)
            for num, (at, length) in zip(numbers, ranges, strict=True):
                pending.append((num, at, length))
        if not pending:
            return
        num, at, length = pending.popleft()
        data = _read_data(sftp, replies, num)
        if not data:
            return  # the file ends early; the caller's size check tells
        sink.write(data)
        progress(len(data))
        if len(data) < length:
            chunk = min(chunk, len(data))
            ahead = _reads_ahead(chunk)
            rest = _send_reads(sftp, replies, handle, [(at + len(data), length - len(data))])
            pending.appendleft((rest[0], at + len(data), length - len(data)))


def _reads_ahead(chunk: int) -> int:
    return max(1, min(MAX_READS_AHEAD, READ_AHEAD_BYTES // chunk))


def _send_reads(
    sftp: paramiko.SFTPClient, replies: _Replies, handle: bytes, ranges: Sequence[tuple[int, int]]
) -> list[int]:
    """A READ of each (offset, length) of ``handle`` in one write to the channel, numbered and
    awaited as paramiko's ``_async_request(replies, CMD_READ, ...)`` would; their numbers.

    One SSH packet, encrypted and sent once, for several reads: each send on loopback also runs
    the server's TCP receive in this process.
    """
    numbers = _number_requests(sftp, replies, len(ranges))
    named = _U32.pack(len(handle)) + handle
    size = 1 + 4 + len(named) + 8 + 4  # type, id, handle, offset, length
    packets = b"".join(
        _HEAD_WITH_ID.pack(size, CMD_READ, number) + named + _U64.pack(at) + _U32.pack(length)
        for number, (at, length) in zip(numbers, ranges, strict=True)
    )
    sftp._write_all(packets)  # type: ignore[attr-defined]
    return numbers


def _read_data(sftp: paramiko.SFTPClient, replies: _Replies, num: int) -> bytes:
    """The bytes that read request ``num`` brought; a status raises (EOFError at the end of the
    file) as paramiko's do, and so does a dropped channel (SSHException).

    paramiko's reply path copies a reply's bytes three times (joining the channel's packets,
    cutting the type off, reading them out of a Message); here they are joined once. Replies
    to other requests (a close sent earlier without waiting, a read answered out of order) are
    handed on or kept as paramiko would.
    """
    channel = sftp.sock
    while True:
        if num in replies.data:
            return replies.data.pop(num)
        if num in replies.replies:
            kind, msg = replies.replies.pop(num)
            if kind == CMD_STATUS:
                sftp._convert_status(msg)  # type: ignore[attr-defined]  # raises unless OK
            raise paramiko.SSHException(f"unexpected SFTP reply type {kind} to a read")
        try:
            size, kind, got = _HEAD_WITH_ID.unpack(_recv_exactly(channel, _HEAD_WITH_ID.size))
            if size >> 24 or size < 5:  # as paramiko: no server sends 16 MiB in one reply
                raise paramiko.SFTPError("Garbage packet received")
            with sftp._lock:  # type: ignore[attr-defined]
                owner = sftp._expecting.pop(got, None)  # type: ignore[attr-defined]
            if kind == CMD_DATA and owner is replies:
                (length,) = _U32.unpack(_recv_exactly(channel, 4))
                if length != size - 9:  # type, id and the data's length come first
                    raise paramiko.SFTPError("Garbage packet received")
                replies.data[got] = _recv_exactly(channel, length)
                continue
            msg = paramiko.Message(_recv_exactly(channel, size - 5))  # what follows the id
        except EOFError as exc:
            raise paramiko.SSHException(f"Server connection dropped: {exc}") from None
        if owner is None:
            log.debug("SFTP reply to no request: #%d", got)
        elif owner is replies:
            replies.replies[got] = (kind, msg)
        elif owner is not type(None):  # None: a close sent without waiting for its answer
            owner._async_response(kind, msg, got)


def _recv_exactly(channel: paramiko.Channel, size: int) -> bytes:
    """``size`` bytes from the channel; EOFError if it closes first."""
    pipe = channel.in_buffer
    if isinstance(pipe, PacketPipe):  # every SftpSession's: wake once, when all of it is here
        try:
            pipe.wait_for(size, channel.gettimeout())
        except PipeTimeout:
            raise TimeoutError() from None  # as Channel.recv raises (socket.timeout)
    parts = []
    while size:  # a read of nothing would wait for a packet: never asked
        part = channel.recv(size)
        if not part:
            raise EOFError("the SFTP channel closed")
        parts.append(part)
        size -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _remote_folder_error(settings: SftpSettings, folder: str, exc: OSError) -> RemoteError:
    return RemoteError(
        f"Cannot list the remote folder {folder!r} on {settings.host}: {exc.strerror or exc}.",
        "Set [sftp] remote_dir to the folder IBKR's confirmation names (often '.' or 'outgoing').",
    )


class PacketPipe:
    """A paramiko Channel's incoming buffer (BufferedPipe's interface) that keeps each packet's
    bytes as they came.

    BufferedPipe copies every packet into an array and out again, and a read that takes only
    the front of it moves everything behind it: with 2 MiB of read replies waiting (the reader
    busy writing and hashing), reading one 4-byte SFTP length moved 2 MiB. Here a read joins
    whole packets and slices only the last one it takes. A 1 GiB download into a file, hashed:
    4.0-4.8 s -> 2.9-3.5 s, a third less CPU. Reads wait and time out as BufferedPipe's do.

    :meth:`wait_for` lets a reader that knows how much it needs (an SFTP reply's length) sleep
    until all of it has come, instead of waking for each 32 KiB packet of a 256 KiB reply.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._packets: collections.deque[bytes] = collections.deque()
        self._size = 0  # bytes buffered
        self._at = 0  # bytes of the first packet already read
        self._closed = False
        self._event: threading.Event | None = None
        self._wants: list[int] = []  # what each waiting reader waits for, in bytes buffered
        self._fed_at = 0.0  # time.monotonic() of the last packet

    def set_event(self, event: threading.Event) -> None:
        with self._lock:
            self._event = event
            if self._closed or self._size:
                event.set()
            else:
                event.clear()

    def feed(self, data: bytes) -> None:
        with self._lock:
            if self._event is not None:
                self._event.set()
            if data:
                self._packets.append(bytes(data))
                self._size += len(data)
                self._fed_at = time.monotonic()
            # Each wake-up of a reader is a switch of threads (and of the GIL). A 1 GiB
            # download woken per reply, not per packet: 41% fewer futex calls, 8% less CPU
            # and 9% less time (8 interleaved pairs, medians).
            if not self._wants or self._size >= min(self._wants):
                self._ready.notify_all()

    def wait_for(self, nbytes: int, timeout: float | None = None) -> None:
        """Return once ``nbytes`` are buffered or the pipe is closed; raise PipeTimeout when
        no byte came for ``timeout`` seconds (a slow server that keeps sending is not stalled)."""
        with self._lock:
            self._wait(nbytes, timeout)

    def _wait(self, nbytes: int, timeout: float | None) -> None:
        if self._size >= nbytes or self._closed:
            return
        if timeout == 0.0:
            raise PipeTimeout()
        self._wants.append(nbytes)
        try:
            started = time.monotonic()
            while self._size < nbytes and not self._closed:
                # A reader woken only for all it needs still times out from the last byte.
                quiet_since = max(started, self._fed_at)
                left = None if timeout is None else quiet_since + timeout - time.monotonic()
                if left is not None and left <= 0:
                    raise PipeTimeout()
                self._ready.wait(left)
        finally:
            self._wants.remove(nbytes)

    def read_ready(self) -> bool:
        with self._lock:
            return self._size > 0

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        with self._lock:
            self._wait(1, timeout)
            if not self._size:
                return b""  # closed
            out = self._take(nbytes)
            if not self._size and self._event is not None and not self._closed:
                self._event.clear()
            return out

    def empty(self) -> bytes:
        with self._lock:
            out = self._take(self._size)
            if self._event is not None and not self._closed:
                self._event.clear()
            return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            if self._event is not None:
                self._event.set()

    def __len__(self) -> int:
        with self._lock:
            return self._size

    def _take(self, nbytes: int) -> bytes:
        parts = []
        want = nbytes
        while want and self._packets:
            first = self._packets[0]
            available = len(first) - self._at
            if available <= want:
                parts.append(first[self._at :] if self._at else first)
                self._packets.popleft()
                self._at = 0
                want -= available
            else:
                parts.append(first[self._at : self._at + want])
                self._at += want
                want = 0
        self._size -= nbytes - want
        return parts[0] if len(parts) == 1 else b"".join(parts)


class ReadAheadSocket:
    """A connected socket whose small reads are served from one large one.

    paramiko reads each SSH packet with two ``recv`` calls, and as the socket has a timeout,
    Python polls before each: four system calls per packet of at most 32 KiB (OpenSSH's sshd
    sends no larger ones), more than half of a big download's CPU here. Reading whatever has
    arrived, up to READ_AHEAD_SOCKET_BYTES, and serving paramiko's calls from it measured
    1 GiB in 2.0 s instead of 2.8 s, with a quarter less CPU. Everything else (timeouts,
    ``send``, ``close``) is the socket's own, so paramiko's timeout handling is unchanged.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._data = b""
        self._at = 0

    def recv(self, size: int) -> bytes:
        if self._at >= len(self._data):
            data = self._sock.recv(max(size, READ_AHEAD_SOCKET_BYTES))
            if len(data) <= size:  # all of it asked for: no copy, nothing kept
                return data
            self._data, self._at = data, 0
        out = self._data[self._at : self._at + size]
        self._at += len(out)
        return out

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


class SftpStore:
    """Opens sessions to one server with one loaded key; retries transient faults."""

    def __init__(self, settings: SftpSettings, key: paramiko.PKey) -> None:
        self.settings = settings
        self.key = key
        self.connections = 0

    def connect(self) -> SftpSession:
        return retry(self.settings, self._connect_once, what=f"connecting to {self._target()}")

    def _target(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _connect_once(self) -> SftpSession:
        s = self.settings
        self.connections += 1
        try:
            sock = socket.create_connection((s.host, s.port), timeout=s.timeout_s)
        except socket.gaierror as exc:
            raise RemoteError(
                f"Cannot resolve {s.host}: {exc.strerror}.",
                "Check [sftp] host against IBKR's email and this machine's DNS "
                f"(`getent hosts {s.host}`). Newer set-ups were given {ALTERNATIVE_ENDPOINT}.",
            ) from None
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise Transient(f"TCP connect: {exc.strerror or exc}") from exc
        # Read requests are small packets sent while replies stream in: without this, Nagle's
        # algorithm holds each one back until the server acknowledges the one before.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(
            ReadAheadSocket(sock),  # type: ignore[arg-type]  # paramiko takes socket-likes
            default_window_size=WINDOW_SIZE,
            default_max_packet_size=MAX_PACKET_SIZE,
            disabled_algorithms=dict(s.disabled_algorithms) or None,
        )
        try:
            return self._handshake(transport)
        except BaseException:
            transport.close()
            raise

    def _handshake(self, transport: paramiko.Transport) -> SftpSession:
        # Each step is a function of its own, so `doctor`'s step probes run this very code.
        s = self.settings
        offered, pinned = _negotiate(s, transport)
        _verify_host_key(s, offered, pinned)
        if s.keepalive_s:
            transport.set_keepalive(int(max(1, s.keepalive_s)))
        _authenticate(s, transport, self.key)
        return _open_session(s, transport)


def _target(settings: SftpSettings) -> str:
    return f"{settings.host}:{settings.port}"


def _negotiate(s: SftpSettings, transport: paramiko.Transport) -> tuple[HostKey, list[HostKey]]:
    """Key exchange on a connected transport: (the host key offered, the keys pinned)."""
    transport.banner_timeout = s.timeout_s
    transport.handshake_timeout = s.timeout_s
    transport.auth_timeout = s.timeout_s
    options = transport.get_security_options()
    options.ciphers = tuple(
        [c for c in PREFERRED_CIPHERS if c in options.ciphers]
        + [c for c in options.ciphers if c not in PREFERRED_CIPHERS]
    )
    pinned = s.known_hosts.keys_for(s.host, s.port)
    options.key_types = tuple(_host_key_types(pinned, options.key_types))
    try:
        _start_client(transport, s.timeout_s)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if "no acceptable host key" in str(exc).lower():
            raise RemoteError(
                f"{_target(s)} offers no host key of the types pinned in "
                f"{s.known_hosts.path} ({', '.join(k.key_type for k in pinned)}).",
                "If IBKR announced a new server key, check its fingerprint with them, "
                "then run: ibkr-statements trust-host",
            ) from None
        raise Transient(f"SSH handshake: {exc or type(exc).__name__}") from exc
    return _server_key(transport, s.timeout_s), pinned


def _start_client(transport: paramiko.Transport, timeout_s: float) -> None:
    """paramiko's key exchange, which runs on a thread of its own: none at a thread limit."""
    try:
        transport.start_client(timeout=timeout_s)
    except RuntimeError as exc:
        if transport.ident is None:  # the thread never started; else a failure inside it
            raise ThreadLimit.reached("SSH connection's thread", exc) from None
        raise


def _verify_host_key(s: SftpSettings, offered: HostKey, pinned: Sequence[HostKey]) -> None:
    verdict = s.known_hosts.check(s.host, s.port, offered)
    if verdict == "ok":
        return
    if verdict == "unknown":
        raise HostKeyUnknown(
            f"The host key of {_target(s)} is not pinned in {s.known_hosts.path}: "
            f"the server offers {offered.describe()}.",
            "Check that fingerprint with IBKR, then pin it: ibkr-statements trust-host "
            f"--fingerprint {offered.fingerprint}",
            offered,
        )
    if s.known_hosts.is_revoked(offered):
        # Else the message below would read "offers K, but pins K" when K is also pinned.
        raise RemoteError(
            f"HOST KEY REVOKED: {_target(s)} offers {offered.describe()}, which "
            f"{s.known_hosts.path} marks @revoked: it must not be trusted.",
            "Do not connect; ask IBKR for the server's current host key fingerprint.",
        )
    raise RemoteError(
        f"HOST KEY CHANGED: {_target(s)} offers {offered.describe()}, but "
        f"{s.known_hosts.path} pins "
        + ", ".join(k.describe() for k in pinned)
        + ". Someone may be intercepting the connection, or IBKR replaced its key.",
        "Do not connect until IBKR confirms the new fingerprint; then run "
        f"ibkr-statements trust-host --fingerprint {offered.fingerprint}",
    )


def _authenticate(s: SftpSettings, transport: paramiko.Transport, key: paramiko.PKey) -> None:
    try:
        transport.auth_publickey(s.username, key)
    except paramiko.BadAuthenticationType as exc:
        raise RemoteError(
            f"{_target(s)} does not accept key login for {s.username!r} "
            f"(it allows: {', '.join(exc.allowed_types) or 'nothing'}).",
            "Check [sftp] username against IBKR's confirmation email.",
        ) from None
    except paramiko.AuthenticationException as exc:
        # paramiko raises this also when the line drops or goes quiet during login: that is a
        # network fault to retry, not the server refusing the key.
        if not transport.is_active():
            raise Transient(f"authentication: connection lost ({exc})") from exc
        if "timeout" in str(exc).lower():
            raise Transient(
                f"authentication: no answer within {s.timeout_s:g} s"
            ) from TimeoutError()
        raise RemoteError(
            f"Server refused our key: {_target(s)} did not accept user "
            f"{s.username!r} with the key {key_fingerprint(key)}.",
            "IBKR's known causes: the username is not the one in their confirmation; or the "
            "key is not the one whose public half you sent them (compare the fingerprint "
            "above with `ibkr-statements keys show` and with what you sent). If unsure, "
            "make and send a new pair: ibkr-statements keys ssh --force; keys export.",
        ) from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise Transient(f"authentication: {exc or type(exc).__name__}") from exc


class _Deadline:
    """Closes ``transport`` after ``seconds`` unless disarmed first.

    paramiko opens the channel (1 h), starts the subsystem and reads the SFTP version (no
    limit) with waits of its own; closing the transport is what ends them.
    """

    def __init__(self, transport: paramiko.Transport, seconds: float) -> None:
        self._lock = threading.Lock()
        self._disarmed = False
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire, args=(transport,))
        self._timer.daemon = True
        self._timer.start()

    def _expire(self, transport: paramiko.Transport) -> None:
        with self._lock:
            if self._disarmed:
                return
            self._expired = True
        transport.close()

    def disarm(self) -> bool:
        """Stops the timer; True when it had expired (the transport is closed)."""
        with self._lock:
            self._disarmed = True
        self._timer.cancel()
        return self._expired


def _open_session(s: SftpSettings, transport: paramiko.Transport) -> SftpSession:
    deadline = _Deadline(transport, s.timeout_s)
    try:
        session = SftpSession(s, transport)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if not deadline.disarm():
            raise Transient(f"starting SFTP: {exc or type(exc).__name__}") from exc
    else:
        if not deadline.disarm():
            return session
        # Expired just as the session came up: its transport is closed, so it is no use.
    finally:
        deadline.disarm()  # also when SftpSession raised anything else
    raise Transient(f"starting SFTP: no answer within {s.timeout_s:g} s") from TimeoutError()


def _server_key(transport: paramiko.Transport, timeout_s: float) -> HostKey:
    # start_client(timeout=...) returns silently when the timeout passes mid-negotiation;
    # the missing session is how a stalled server shows.
    try:
        key = transport.get_remote_server_key()
    except paramiko.SSHException:
        raise Transient(f"SSH handshake timed out after {timeout_s:g} s") from TimeoutError()
    return HostKey(key.get_name(), key.asbytes())


def retry(settings: SftpSettings, attempt: Callable[[], _T], *, what: str) -> _T:
    """Run ``attempt``; on :class:`Transient`, wait with exponential backoff and jitter."""
    for number in range(settings.retries + 1):
        try:
            return attempt()
        except Transient as exc:
            if number == settings.retries:
                raise _unreachable(settings, exc) from None
            delay = min(60.0, settings.retry_backoff_s * 2**number) * random.uniform(0.5, 1.5)
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _resolved(host: str, port: int) -> str:
    """How this machine sees the target: the addresses the name resolves to here."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return "does not resolve here"
    return "resolves here to " + ", ".join(sorted({str(info[4][0]) for info in infos}))


def _unreachable(settings: SftpSettings, exc: Transient) -> RemoteError:
    target = f"{settings.host}:{settings.port} ({_resolved(settings.host, settings.port)})"
    cause = exc.__cause__
    attempts = settings.retries + 1
    if isinstance(cause, TimeoutError | socket.timeout):
        return RemoteError(
            f"Connection to {target} timed out ({exc}; {attempts} attempt(s), "
            f"{settings.timeout_s:g} s each).",
            f"IBKR's known causes: a firewall or antivirus blocks outgoing TCP port "
            f"{settings.port}; or this machine's public IP is not the one IBKR whitelisted "
            "(send them the new one). Newer set-ups were given "
            f"{ALTERNATIVE_ENDPOINT}. `ibkr-statements doctor` checks each step.",
        )
    return RemoteError(
        f"Cannot reach {target}: {exc} ({attempts} attempt(s)).",
        "Check [sftp] host and port against IBKR's email, and that outgoing TCP port "
        f"{settings.port} is open. Newer set-ups were given {ALTERNATIVE_ENDPOINT}.",
    )


def scan_host_keys(host: str, port: int, timeout_s: float) -> list[HostKey]:
    """Every host key the server offers, one handshake per key type, for `trust-host`.

    Nothing is authenticated here: the caller shows the fingerprints to a person or compares
    them with one given on the command line before anything is pinned.
    """
    found: list[HostKey] = []
    for key_type in (
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "rsa-sha2-512",
    ):
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except socket.gaierror as exc:
            raise RemoteError(f"Cannot resolve {host}: {exc.strerror}.") from None
        except OSError as exc:
            raise RemoteError(
                f"Cannot connect to {host}:{port}: {exc.strerror or exc}.",
                "Check [sftp] host and port, and that outgoing TCP port is open.",
            ) from None
        transport = paramiko.Transport(sock)
        try:
            transport.banner_timeout = timeout_s
            transport.handshake_timeout = timeout_s
            options = transport.get_security_options()
            if key_type not in options.key_types:
                continue
            options.key_types = (key_type,)
            try:
                _start_client(transport, timeout_s)
            except (paramiko.SSHException, EOFError, OSError):
                continue  # the server does not offer this type
            try:
                offered = _server_key(transport, timeout_s)
            except Transient as exc:
                raise RemoteError(f"{host}:{port}: {exc}.") from None
            if offered not in found:
                found.append(offered)
        finally:
            transport.close()
    if not found:
        raise RemoteError(f"{host}:{port} completed no SSH handshake; is it an SSH server?")
    return found


def trust_host(
    host: str,
    port: int,
    known_hosts_path: Path,
    *,
    timeout_s: float,
    fingerprint: str | None,
    confirm: Callable[[list[HostKey]], bool] | None,
) -> list[HostKey]:
    """Pin the server's host keys: only one matching ``fingerprint``, or all after ``confirm``.

    Without a fingerprint and without a way to ask a person, nothing is pinned.
    """
    offered = scan_host_keys(host, port, timeout_s)
    if fingerprint is not None:
        wanted = fingerprint if fingerprint.startswith("SHA256:") else f"SHA256:{fingerprint}"
        chosen = [k for k in offered if k.fingerprint == wanted.rstrip("=")]
        if not chosen:
            raise RemoteError(
                f"{host}:{port} offers no key with the fingerprint {wanted}; it offers: "
                + "; ".join(k.describe() for k in offered)
                + ". Nothing was pinned.",
                "Check the fingerprint with IBKR. A mismatch can mean the connection is "
                "intercepted.",
            )
    elif confirm is not None:
        if not confirm(offered):
            raise UsageError("Nothing was pinned.")
        chosen = offered
    else:
        raise UsageError(
            "trust-host needs a person to confirm the fingerprint, or --fingerprint.",
            "Run it on a terminal, or pass --fingerprint SHA256:... as IBKR gave it to you.",
        )
    pin(known_hosts_path, host, port, chosen)
    return chosen


# --- step probes, for `doctor` -------------------------------------------------------------
#
# The same steps as SftpStore.connect, taken one at a time on one connection, each once and
# without retries, so a failure names the step it happened in. They share _negotiate,
# _verify_host_key, _authenticate and _open_session with the real connect.

# What `doctor` holds between the key check and the login step, without importing paramiko.
LoginKey: TypeAlias = paramiko.PKey

ALTERNATIVE_HOST = "ftp2.interactivebrokers.com"
ALTERNATIVE_PORT = 22
ALTERNATIVE_DIR = "outgoing"
# How many names a probe quotes from a folder listing.
_QUOTED_NAMES = 8


def alternative_advice(settings: SftpSettings) -> str:
    """IBKR's other endpoint, as a sentence; empty when it is the one configured already."""
    if settings.host.lower() == ALTERNATIVE_HOST and settings.port == ALTERNATIVE_PORT:
        return ""
    return (
        f" Clients set up recently were given {ALTERNATIVE_HOST}:{ALTERNATIVE_PORT} instead: "
        f'[sftp] host = "{ALTERNATIVE_HOST}", port = {ALTERNATIVE_PORT}, '
        f'remote_dir = "{ALTERNATIVE_DIR}" (use what IBKR\'s confirmation email says).'
    )


def _unreachable_advice(settings: SftpSettings) -> str:
    return (
        "IBKR's known causes: a firewall or antivirus blocks outgoing TCP port "
        f"{settings.port}; or this machine's public IP is not the one IBKR whitelisted (send "
        "IBKR the new one). Check [sftp] host and port against IBKR's confirmation email."
        + alternative_advice(settings)
    )


def resolve_host(settings: SftpSettings) -> tuple[str, ...]:
    """The addresses ``[sftp] host`` resolves to here, within ``timeout_s``."""
    host, port = settings.host, settings.port
    answer: list[tuple[str, ...] | OSError] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            answer.append(exc)
        else:
            answer.append(tuple(dict.fromkeys(str(info[4][0]) for info in infos)))

    # getaddrinfo takes no timeout; a daemon thread bounds the wait without blocking exit.
    worker = threading.Thread(target=lookup, name="dns-probe", daemon=True)
    worker.start()
    worker.join(settings.timeout_s)
    hint = (
        f"Check [sftp] host against IBKR's confirmation email, and this machine's DNS: "
        f"getent hosts {host}." + alternative_advice(settings)
    )
    if not answer:
        raise RemoteError(f"DNS gave no answer for {host} within {settings.timeout_s:g} s.", hint)
    result = answer[0]
    if isinstance(result, OSError):
        reason = result.strerror if isinstance(result, socket.gaierror) else str(result)
        raise RemoteError(f"{host} does not resolve here: {reason}.", hint)
    return result


@dataclass(frozen=True)
class TcpProbe:
    local: str  # "address:port" this machine connected from (its own view, before any NAT)
    remote: str  # "address:port" it connected to


@dataclass(frozen=True)
class HandshakeProbe:
    offered: HostKey
    pinned: tuple[HostKey, ...]
    verdict: str  # KnownHosts.check: "ok", "unknown" or "changed"
    server_version: str  # the server's SSH banner, e.g. "SSH-2.0-OpenSSH_9.2p1"
    cipher: str


@dataclass(frozen=True)
class FolderProbe:
    listing: Listing  # what fetch would see: matching files and refused names
    # Entries that match no pattern (folders with a trailing "/"); looked at only when no
    # file matched, to show what the folder holds instead.
    unmatched: tuple[str, ...]
    unmatched_total: int


def _address(sockname: tuple[object, ...]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class StepProbe:
    """One connection to ``settings``' server, taken step by step: tcp, handshake,
    verify_host_key, login, list_folder. Each step needs the previous one; close() always."""

    def __init__(self, settings: SftpSettings) -> None:
        self.settings = settings
        self._sock: socket.socket | None = None
        self._transport: paramiko.Transport | None = None
        self._handshake: HandshakeProbe | None = None
        self._session: SftpSession | None = None

    def __enter__(self) -> StepProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        if self._transport is not None:
            self._transport.close()
        if self._sock is not None:
            self._sock.close()

    def tcp(self) -> TcpProbe:
        s = self.settings
        try:
            sock = socket.create_connection((s.host, s.port), timeout=s.timeout_s)
        except socket.gaierror as exc:
            raise RemoteError(f"Cannot resolve {s.host}: {exc.strerror}.") from None
        except TimeoutError:
            raise RemoteError(
                f"TCP connect to {_target(s)} timed out after {s.timeout_s:g} s: packets go "
                "unanswered, as when a firewall drops them.",
                _unreachable_advice(s),
            ) from None
        except ConnectionRefusedError:
            raise RemoteError(
                f"TCP connect to {_target(s)} was refused: nothing listens on port {s.port} "
                "there, or a firewall rejects the connection.",
                _unreachable_advice(s),
            ) from None
        except OSError as exc:
            raise RemoteError(
                f"TCP connect to {_target(s)} failed: {exc.strerror or exc}.",
                _unreachable_advice(s),
            ) from None
        self._sock = sock
        return TcpProbe(local=_address(sock.getsockname()), remote=_address(sock.getpeername()))

    def handshake(self) -> HandshakeProbe:
        s = self.settings
        if self._sock is None:
            raise RemoteError("No TCP connection to take the SSH handshake on.")
        transport = paramiko.Transport(
            self._sock,
            default_window_size=WINDOW_SIZE,
            disabled_algorithms=dict(s.disabled_algorithms) or None,
        )
        self._transport = transport
        try:
            offered, pinned = _negotiate(s, transport)
        except Transient as exc:
            raise RemoteError(
                f"{_target(s)} accepts TCP but completed no SSH handshake within "
                f"{s.timeout_s:g} s ({exc}).",
                f"Check [sftp] port against IBKR's confirmation email: port {s.port} may "
                "not be their SSH server. A proxy or an antivirus that inspects connections "
                "can also cut the handshake." + alternative_advice(s),
            ) from None
        self._handshake = HandshakeProbe(
            offered=offered,
            pinned=tuple(pinned),
            verdict=s.known_hosts.check(s.host, s.port, offered),
            server_version=str(transport.remote_version),
            # Set by the key exchange; types-paramiko does not declare it.
            cipher=str(getattr(transport, "remote_cipher", "")),
        )
        return self._handshake

    def verify_host_key(self) -> HandshakeProbe:
        """Raise what fetch raises for the offered key: HostKeyUnknown, or HOST KEY CHANGED."""
        if self._handshake is None:
            raise RemoteError("No SSH handshake to check the host key of.")
        _verify_host_key(self.settings, self._handshake.offered, self._handshake.pinned)
        return self._handshake

    def login(self, key: LoginKey) -> None:
        s = self.settings
        if self._transport is None or self._handshake is None or self._handshake.verdict != "ok":
            raise RemoteError("No SSH connection with a verified host key to log in on.")
        try:
            _authenticate(s, self._transport, key)
        except Transient as exc:
            raise RemoteError(
                f"Login to {_target(s)} did not complete: {exc}.",
                "The connection broke during authentication; run doctor again, and if it "
                "stays so, ask IBKR whether the account's sFTP access is active.",
            ) from None
        if not self._transport.is_authenticated():
            raise RemoteError(
                f"{_target(s)} wants more than our key to log in {s.username!r}.",
                "IBKR's server takes a key alone: check [sftp] host and username against "
                "IBKR's confirmation email.",
            )

    def list_folder(self) -> FolderProbe:
        s = self.settings
        if self._transport is None or not self._transport.is_authenticated():
            raise RemoteError("Not logged in: no folder to list.")
        try:
            self._session = session = _open_session(s, self._transport)
            listing = session.list_files()
        except RemoteError as exc:
            raise RemoteError(exc.message + self._login_folder(), exc.hint) from None
        except Transient as exc:
            raise RemoteError(
                f"Listing {s.remote_dir!r} on {_target(s)} did not complete: {exc}."
            ) from None
        if listing.files:
            return FolderProbe(listing, (), 0)
        try:
            entries = list_folder_entries(session.sftp, s.remote_dir)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"Listing {s.remote_dir!r} again failed: {exc}.") from None
        names = [name for name in _entry_names(entries) if not matches(name, s.patterns)]
        return FolderProbe(listing, tuple(names[:_QUOTED_NAMES]), len(names))

    def _login_folder(self) -> str:
        """What the login folder holds, for a remote_dir that does not exist; best effort."""
        if self._session is None:
            return ""
        try:
            entries = list_folder_entries(self._session.sftp, ".")
        except (OSError, EOFError, paramiko.SSHException):
            return ""
        names = _entry_names(entries)
        if not names:
            return " The login folder is empty."
        more = f", ... ({len(names)} in all)" if len(names) > _QUOTED_NAMES else ""
        return " The login folder holds: " + ", ".join(names[:_QUOTED_NAMES]) + more + "."


def _entry_names(entries: Sequence[FolderEntry]) -> list[str]:
    """Sorted printable names, folders with a trailing "/"; hidden names (which fetch never
    takes) are left out, so a home folder's dotfiles do not bury what matters."""
    return sorted(
        printable(e.filename) + ("/" if stat.S_ISDIR(e.st_mode or 0) else "")
        for e in entries
        if not e.filename.startswith(".")
    )
