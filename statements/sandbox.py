"""A loopback SFTP server on paramiko: the stand-in for IBKR in tests and in `demo`.

It serves one folder to one user who logs in with a public key, and it can misbehave on
demand (drop, stall, hang, refuse a key, fail a read, change its host key), which a real
sshd cannot. It binds 127.0.0.1 only and refuses any path that resolves outside its folder.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import errno
import io
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

__all__ = ["Faults", "SandboxServer", "generate_ed25519_key"]

HOST = "127.0.0.1"

# Every wait below wakes this often to notice stop() or a closed connection.
_POLL_S = 0.1
# stop() gives all threads together this long to end; they are daemons, so a straggler
# cannot keep the interpreter alive, but stop() must return promptly whatever a client does.
_JOIN_S = 5.0
# Upper bound on one connection's life, so no thread waits forever even if stop() is never called.
_MAX_CONNECTION_S = 3600.0
# Half an SSH identification line: a client reading the banner waits for a CRLF that never comes.
_HALF_BANNER = b"SSH-2.0-Sand"
# What a listing claims about a phantom name (Faults.phantom_names).
PHANTOM_SIZE = 4096
_PHANTOM_MTIME = 1_700_000_000

_log = logging.getLogger(__name__)


@dataclass
class Faults:
    """Misbehaviour on demand, read by the server as it goes, so tests may change it.

    stall_seconds and half_banner apply to connections accepted while they are set; the
    others are read on every operation, also on connections already open.
    """

    # Close the TCP connection once this many file bytes were served (counted per connection).
    drop_after_bytes: int | None = None
    # After accepting TCP, send nothing for this long (a stalled server).
    stall_seconds: float = 0.0
    # Serve this many file bytes, then stop answering (hang) until the connection is closed.
    stall_after_bytes: int | None = None
    # Reject every public key.
    refuse_keys: bool = False
    # File names (the last path component) whose reads return an SFTP failure.
    fail_read_on: frozenset[str] = frozenset()
    # Send half an SSH banner line, then stall.
    half_banner: bool = False
    # Names added to every folder listing, as a hostile server may send them: names no file
    # system holds ('/' or NUL inside, 4096 bytes), listed as regular files of PHANTOM_SIZE
    # bytes; a name of a file in the folder is listed a second time. A request by such a name
    # meets the usual path rules (outside the root or not on disk: an SFTP error);
    # SandboxServer.requests shows whether a client tried.
    phantom_names: tuple[str, ...] = ()


def generate_ed25519_key() -> paramiko.Ed25519Key:
    """A fresh Ed25519 key: paramiko cannot generate one, so cryptography makes it."""
    private = ed25519.Ed25519PrivateKey.generate()
    text = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")
    return paramiko.Ed25519Key.from_private_key(io.StringIO(text))


def _key_blob(key: paramiko.PKey | str) -> bytes:
    """The SSH wire blob of a key, from a PKey or an OpenSSH public line `type base64 [comment]`."""
    if isinstance(key, paramiko.PKey):
        return key.asbytes()
    fields = key.split()
    if len(fields) < 2:
        raise ValueError(f"not an OpenSSH public key line: {key[:40]!r}")
    try:
        return base64.b64decode(fields[1], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not an OpenSSH public key line: {key[:40]!r}") from exc


class _Connection:
    """One accepted TCP connection: its socket, transport, threads and byte count."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.closed = threading.Event()
        self.transport: paramiko.Transport | None = None
        self.threads: list[threading.Thread] = []
        self.bytes_served = 0
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + _MAX_CONNECTION_S

    def close(self) -> None:
        """Ends the connection from any thread; idempotent."""
        self.closed.set()
        # shutdown() tells the client at once and wakes any thread blocked in recv() on
        # this socket; close() alone may do neither while another thread holds the socket.
        with contextlib.suppress(OSError):  # already closed
            self.sock.shutdown(socket.SHUT_RDWR)
        transport = self.transport
        if transport is not None:
            transport.close()
        self.sock.close()

    def alive(self) -> bool:
        if self.closed.is_set() or time.monotonic() >= self.deadline:
            return False
        transport = self.transport
        return transport is None or transport.is_active()

    def hold(self, seconds: float) -> bool:
        """Sends nothing for `seconds`, reading and discarding what the client sends.

        True when the connection is still open afterwards; False when the client left or
        the server is stopping.
        """
        until = min(time.monotonic() + seconds, self.deadline)
        self.sock.settimeout(_POLL_S)
        while not self.closed.is_set() and time.monotonic() < until:
            try:
                if not self.sock.recv(4096):
                    return False
            except TimeoutError:
                continue
            except OSError:
                return False
        return not self.closed.is_set() and time.monotonic() < self.deadline

    def hang(self) -> None:
        """Blocks the calling SFTP thread until the connection ends; the client sees no answer."""
        while self.alive():
            self.closed.wait(_POLL_S)

    def threads_alive(self) -> list[threading.Thread]:
        with self.lock:
            threads = list(self.threads)
        return [thread for thread in threads if thread.is_alive()]


class _Handle(paramiko.SFTPHandle):
    """An open file; reads pass through the sandbox's faults."""

    def __init__(
        self, file: IO[bytes], name: str, flags: int, sandbox: SandboxServer, conn: _Connection
    ) -> None:
        super().__init__(flags)
        # SFTPHandle's default read/write/close look for these two attributes.
        self.readfile = file
        self.writefile = file
        self._file = file
        self._name = name
        self._sandbox = sandbox
        self._conn = conn

    def stat(self) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.fstat(self._file.fileno()))
        except OSError as exc:
            return _errno_to_sftp(exc)

    def read(self, offset: int, length: int) -> bytes | int:
        faults = self._sandbox.faults
        if self._name in faults.fail_read_on:
            return paramiko.sftp.SFTP_FAILURE
        with self._conn.lock:
            served = self._conn.bytes_served
        allowed = length
        if faults.drop_after_bytes is not None:
            if served >= faults.drop_after_bytes:
                _log.debug("connection %d: dropping after %d bytes", self._conn.number, served)
                self._conn.close()
                return paramiko.sftp.SFTP_CONNECTION_LOST
            allowed = min(allowed, faults.drop_after_bytes - served)
        if faults.stall_after_bytes is not None:
            if served >= faults.stall_after_bytes:
                _log.debug("connection %d: hanging after %d bytes", self._conn.number, served)
                self._conn.hang()
                return paramiko.sftp.SFTP_CONNECTION_LOST
            allowed = min(allowed, faults.stall_after_bytes - served)
        # A short read is legal SFTP: the client asks again for the rest, and that next
        # request is the one that meets the fault, so exactly the limit is delivered.
        data = super().read(offset, allowed)
        if isinstance(data, bytes):
            with self._conn.lock:
                self._conn.bytes_served += len(data)
        return data


def _phantom(folder: Path, name: str) -> paramiko.SFTPAttributes:
    """The listing entry for a phantom name; a name of a file in ``folder`` is listed again
    with that file's attributes (a duplicate entry), any other with made-up ones."""
    if name not in ("", ".", "..") and "/" not in name and "\x00" not in name:
        with contextlib.suppress(OSError):
            return paramiko.SFTPAttributes.from_stat((folder / name).lstat(), name)
    attrs = paramiko.SFTPAttributes()
    attrs.filename = name
    attrs.st_mode = stat.S_IFREG | 0o644
    attrs.st_size = PHANTOM_SIZE
    attrs.st_uid = attrs.st_gid = 0
    attrs.st_atime = attrs.st_mtime = _PHANTOM_MTIME
    return attrs


def _errno_to_sftp(exc: OSError) -> int:
    if exc.errno is None:
        return paramiko.sftp.SFTP_FAILURE
    return paramiko.SFTPServer.convert_errno(exc.errno)


class _RootedSFTP(paramiko.SFTPServerInterface):
    """The SFTP operations, confined to the sandbox root; client "/" is the root."""

    def __init__(
        self, server: paramiko.ServerInterface, sandbox: SandboxServer, conn: _Connection
    ) -> None:
        super().__init__(server)
        self._sandbox = sandbox
        self._conn = conn
        self._root = sandbox.root

    def _local(self, path: str, *, follow: bool = True) -> Path:
        """The local path for a client path; PermissionError when it resolves outside the root.

        With follow=False the last component is not followed (lstat, remove, readlink,
        listings), so a symlink inside the root is seen as a link, not as its target.
        """
        candidate = self._root / path.lstrip("/")
        if follow or candidate.name in ("", ".."):
            local = candidate.resolve()
        else:
            local = candidate.parent.resolve() / candidate.name
        if not local.is_relative_to(self._root):
            raise PermissionError(errno.EACCES, "outside the served folder", path)
        return local

    def _virtual(self, local: Path) -> str:
        relative = local.relative_to(self._root).as_posix()
        return "/" if relative == "." else "/" + relative

    def canonicalize(self, path: str) -> str:
        # paramiko cannot send an error code for REALPATH; an exception becomes SFTP_FAILURE.
        return self._virtual(self._local(path))

    def list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        try:
            folder = self._local(path)
            with os.scandir(folder) as entries:
                # lstat attributes, as OpenSSH lists them: a symlink shows as a link.
                listing = [
                    paramiko.SFTPAttributes.from_stat(entry.stat(follow_symlinks=False), entry.name)
                    for entry in entries
                ]
        except OSError as exc:
            return _errno_to_sftp(exc)
        except ValueError:
            return paramiko.sftp.SFTP_FAILURE
        listing += [_phantom(folder, name) for name in self._sandbox.faults.phantom_names]
        return sorted(listing, key=lambda attr: attr.filename)

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        self._sandbox.record("stat", path)
        try:
            return paramiko.SFTPAttributes.from_stat(self._local(path).stat())
        except OSError as exc:
            return _errno_to_sftp(exc)
        except ValueError:
            return paramiko.sftp.SFTP_FAILURE

    def lstat(self, path: str) -> paramiko.SFTPAttributes | int:
        self._sandbox.record("lstat", path)
        try:
            return paramiko.SFTPAttributes.from_stat(self._local(path, follow=False).lstat())
        except OSError as exc:
            return _errno_to_sftp(exc)
        except ValueError:
            return paramiko.sftp.SFTP_FAILURE

    def open(
        self, path: str, flags: int, attr: paramiko.SFTPAttributes
    ) -> paramiko.SFTPHandle | int:
        self._sandbox.record("open", path)
        try:
            local = self._local(path)
            # local has no symlinks left; O_NOFOLLOW stops one planted there since.
            fd = os.open(local, flags | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            return _errno_to_sftp(exc)
        except ValueError:
            return paramiko.sftp.SFTP_FAILURE
        access = flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR)
        if access == os.O_RDONLY:
            mode = "rb"
        elif flags & os.O_APPEND:
            mode = "ab" if access == os.O_WRONLY else "a+b"
        else:
            mode = "wb" if access == os.O_WRONLY else "r+b"
        return _Handle(os.fdopen(fd, mode), local.name, flags, self._sandbox, self._conn)

    def remove(self, path: str) -> int:
        try:
            self._local(path, follow=False).unlink()
        except OSError as exc:
            return _errno_to_sftp(exc)
        except ValueError:
            return paramiko.sftp.SFTP_FAILURE
        return paramiko.sftp.SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        try:
            target = self._local(newpath, follow=False)
            # SFTP v3 rename must not overwrite; posix-rename@openssh.com may.
            if target.exists() or target.is_symlink():
                return paramiko.sftp.SFTP_FAILURE
            self._local(oldpath, follow=False).rename(target)
        except OSError as exc:
            return _errno_to_sftp(exc)
        except ValueError:
            return paramiko.sftp.SFTP_FAILURE
        return paramiko.sftp.SFTP_OK

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        try:
            self._local(oldpath, follow=False).replace(self._local(newpath, follow=False))
        except OSError as exc:
            return _errno_to_sftp(exc)
        except ValueError:
            return paramiko.sftp.SFTP_FAILURE
        return paramiko.sftp.SFTP_OK

    def readlink(self, path: str) -> str | int:
        try:
            link = self._local(path, follow=False)
            target = (link.parent / link.readlink()).resolve()
        except OSError as exc:
            return _errno_to_sftp(exc)
        except ValueError:
            return paramiko.sftp.SFTP_FAILURE
        if not target.is_relative_to(self._root):
            return paramiko.sftp.SFTP_PERMISSION_DENIED
        return self._virtual(target)


class _SFTPSubsystem(paramiko.SFTPServer):
    """paramiko's SFTP server thread, registered with its connection so stop() can join it."""

    def __init__(
        self,
        channel: paramiko.Channel,
        name: str,
        server: paramiko.ServerInterface,
        sandbox: SandboxServer,
        conn: _Connection,
    ) -> None:
        super().__init__(channel, name, server, _RootedSFTP, sandbox, conn)
        self.daemon = True
        self.name = f"sandbox-sftp-{conn.number}"
        with conn.lock:
            conn.threads.append(self)


class _Gate(paramiko.ServerInterface):
    """Authentication (publickey only, one user) and channel policy (sessions only)."""

    def __init__(self, sandbox: SandboxServer) -> None:
        self._sandbox = sandbox

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if self._sandbox.faults.refuse_keys or username != self._sandbox.username:
            return AUTH_FAILED
        if key.asbytes() in self._sandbox.authorized_blobs:
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


class SandboxServer:
    """An SFTP server on 127.0.0.1 serving `root` to `username`, with faults on demand."""

    host: str
    port: int
    faults: Faults
    connections: int
    # Every (operation, path) a client opened, stat'ed or lstat'ed, in order: a test proves
    # with it that a name refused at listing was never requested.
    requests: list[tuple[str, str]]

    def __init__(
        self,
        root: Path,
        *,
        host_key: paramiko.PKey | None = None,
        authorized_keys: Sequence[paramiko.PKey | str] = (),
        username: str = "demo",
        faults: Faults | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"sandbox root is not a folder: {self.root}")
        self.username = username
        self.authorized_blobs = frozenset(_key_blob(key) for key in authorized_keys)
        self.faults = faults if faults is not None else Faults()
        self.host = HOST
        self.port = 0
        self.connections = 0
        self.requests = []
        self._host_key: paramiko.PKey = host_key if host_key is not None else generate_ed25519_key()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._live: list[tuple[_Connection, threading.Thread]] = []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host_key(self) -> paramiko.PKey:
        with self._lock:
            return self._host_key

    def record(self, operation: str, path: str) -> None:
        with self._lock:
            self.requests.append((operation, path))

    def set_host_key(self, key: paramiko.PKey) -> None:
        """Presents `key` to connections accepted from now on."""
        with self._lock:
            self._host_key = key

    def host_key_line(self) -> str:
        """The known_hosts line that pins the current host key."""
        key = self.host_key
        return f"[{self.host}]:{self.port} {key.get_name()} {key.get_base64()}"

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("sandbox server already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((HOST, 0))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        # A timeout lets the accept loop notice stop(): closing a socket does not wake accept().
        listener.settimeout(_POLL_S)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="sandbox-accept", daemon=True
        )
        self._accept_thread.start()

    def stop(self) -> None:
        """Closes the listener and every connection, then joins all threads (bounded)."""
        self._stopping.set()
        deadline = time.monotonic() + _JOIN_S
        if self._accept_thread is not None:
            self._accept_thread.join(_JOIN_S)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            live = list(self._live)
            self._live.clear()
        for conn, _ in live:
            conn.close()
        for conn, thread in live:
            threads: list[threading.Thread] = [thread, *conn.threads_alive()]
            if conn.transport is not None:
                threads.append(conn.transport)
            for each in threads:
                if each.ident is not None:
                    each.join(max(0.0, deadline - time.monotonic()))

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                sock, _address = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            # Taken at accept, so a test that changes faults after `connections` went up
            # knows which connection got which pre-handshake behaviour.
            faults = dataclasses.replace(self.faults)
            with self._lock:
                self.connections += 1
                conn = _Connection(sock, self.connections)
                if self._stopping.is_set():
                    conn.close()
                    return
                self._live = [(c, t) for c, t in self._live if t.is_alive() or c.threads_alive()]
                thread = threading.Thread(
                    target=self._serve,
                    args=(conn, faults),
                    name=f"sandbox-conn-{conn.number}",
                    daemon=True,
                )
                self._live.append((conn, thread))
                thread.start()

    def _serve(self, conn: _Connection, faults: Faults) -> None:
        try:
            self._serve_ssh(conn, faults)
        except Exception:
            # One client's trouble must not reach the others; the client sees the drop.
            _log.debug("connection %d failed", conn.number, exc_info=True)
        finally:
            conn.close()

    def _serve_ssh(self, conn: _Connection, faults: Faults) -> None:
        if faults.half_banner:
            conn.sock.sendall(_HALF_BANNER)
            conn.hold(_MAX_CONNECTION_S)
            return
        if faults.stall_seconds > 0 and not conn.hold(faults.stall_seconds):
            return
        transport = paramiko.Transport(conn.sock)
        transport.name = f"sandbox-transport-{conn.number}"
        transport.set_log_channel(f"{__name__}.transport")
        transport.add_server_key(self.host_key)
        transport.set_subsystem_handler("sftp", _SFTPSubsystem, self, conn)
        conn.transport = transport
        if conn.closed.is_set():
            return  # stop() ran before the transport was visible to it
        try:
            transport.start_server(server=_Gate(self))
        except (paramiko.SSHException, EOFError, OSError):
            return  # handshake failed; the client has its own error
        # The transport and SFTP threads do the work; this one waits for the end, bounded.
        # Accepted channels must stay referenced: paramiko closes a Channel when it is collected.
        channels: list[paramiko.Channel] = []
        while conn.alive():
            channel = transport.accept(_POLL_S)
            if channel is not None:
                channels.append(channel)
