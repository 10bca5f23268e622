"""The sFTP side, and the only module that imports paramiko (client side).

Connects with a key file and a pinned host key, lists the remote folder with untrusted names
refused, and streams files with pipelined reads. Every paramiko, socket and OS error is
translated here into a :class:`RemoteError` (exit 4) that names IBKR's known causes.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import posixpath
import random
import socket
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from statements.config import Config
from statements.errors import KeyProblem, RemoteError, UsageError
from statements.hostkeys import HostKey, KnownHosts, pin
from statements.keys.ssh import SshPrivateKey, fingerprint_of_blob, load_private_key
from statements.passphrase import PassphraseSource, read_passphrase

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_NAME_BYTES = 255
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
PREFETCH_REQUESTS = 128
# What one read hands to the sink: small enough that a dropped connection loses little.
READ_SIZE = 256 * 1024
ALTERNATIVE_ENDPOINT = "ftp2.interactivebrokers.com port 22, folder outgoing"


@dataclass(frozen=True)
class RemoteFile:
    path: str  # as the server knows it: remote_dir joined with the relative name
    relative: str  # relative to remote_dir ("sub/x.pgp" when recursive)
    size: int
    mtime: int

    @property
    def name(self) -> str:
        return posixpath.basename(self.relative)


@dataclass(frozen=True)
class Refused:
    name: str  # printable (repr-escaped where needed)
    reason: str


@dataclass(frozen=True)
class Listing:
    files: tuple[RemoteFile, ...]
    refused: tuple[Refused, ...]


def printable(name: str) -> str:
    return name if name.isprintable() else repr(name)


def name_problem(name: str) -> str | None:
    """Why a remote name cannot become a local file name, or None when it is safe."""
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
    if not name.isprintable():
        return "contains control characters"
    return None


def matches(name: str, patterns: Sequence[str]) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, p.lower()) for p in patterns)


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


class Transient(Exception):
    """A fault worth another attempt: refused, reset, timeout, EOF during the handshake."""


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


class SftpSession:
    """One authenticated connection with an SFTP channel."""

    def __init__(self, settings: SftpSettings, transport: paramiko.Transport) -> None:
        self.settings = settings
        self.transport = transport
        client = paramiko.SFTPClient.from_transport(transport)
        if client is None:
            raise RemoteError("The server did not start the SFTP subsystem.")
        self.sftp = client
        # Every SFTP call waits at most timeout_s for an answer: a stalled server is an error.
        channel = client.get_channel()
        if channel is not None:
            channel.settimeout(settings.timeout_s)

    def close(self) -> None:
        # After a dropped connection paramiko's close raises EOFError; closing must not.
        try:
            self.sftp.close()
        except (EOFError, OSError, paramiko.SSHException):
            pass
        finally:
            self.transport.close()

    def list_files(self) -> Listing:
        files: list[RemoteFile] = []
        refused: list[Refused] = []
        self._walk(self.settings.remote_dir, "", files, refused, depth=0)
        files.sort(key=lambda f: f.relative)
        return Listing(tuple(files), tuple(refused))

    def _walk(
        self,
        folder: str,
        prefix: str,
        files: list[RemoteFile],
        refused: list[Refused],
        depth: int,
    ) -> None:
        try:
            entries = self.sftp.listdir_attr(folder)
        except OSError as exc:
            raise _remote_folder_error(self.settings, folder, exc) from None
        except (TimeoutError, EOFError, paramiko.SSHException) as exc:
            raise Transient(f"listing {folder}: {exc}") from exc
        for attrs in entries:
            name = attrs.filename
            mode = attrs.st_mode or 0
            if stat.S_ISDIR(mode) and self.settings.recursive and depth < 16:
                if name_problem(name) is None:
                    self._walk(
                        posixpath.join(folder, name), f"{prefix}{name}/", files, refused, depth + 1
                    )
                continue
            if not matches(name, self.settings.patterns):
                continue
            problem = name_problem(name)
            if problem is None and stat.S_ISLNK(mode):
                problem = "is a symbolic link; only regular files are fetched"
            elif problem is None and not stat.S_ISREG(mode):
                problem = "is not a regular file"
            if problem is not None:
                refused.append(Refused(printable(prefix + name), problem))
                continue
            files.append(
                RemoteFile(
                    path=posixpath.join(folder, name) if folder != "." else name,
                    relative=prefix + name,
                    size=int(attrs.st_size or 0),
                    mtime=int(attrs.st_mtime or 0),
                )
            )

    def download(
        self,
        remote: RemoteFile,
        sink: BinaryIO,
        offset: int,
        progress: Callable[[int], None],
    ) -> None:
        """Write ``remote``'s bytes from ``offset`` to its end into ``sink``, pipelined."""
        try:
            with self.sftp.open(remote.path, "rb") as handle:
                handle.seek(offset)
                if offset < remote.size:
                    handle.prefetch(remote.size, max_concurrent_requests=PREFETCH_REQUESTS)
                remaining = remote.size - offset
                while remaining > 0:
                    data = handle.read(min(remaining, READ_SIZE))
                    if not data:
                        break
                    sink.write(data)
                    remaining -= len(data)
                    progress(len(data))
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


def _remote_folder_error(settings: SftpSettings, folder: str, exc: OSError) -> RemoteError:
    return RemoteError(
        f"Cannot list the remote folder {folder!r} on {settings.host}: {exc.strerror or exc}.",
        "Set [sftp] remote_dir to the folder IBKR's confirmation names (often '.' or 'outgoing').",
    )


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
        transport = paramiko.Transport(
            sock,
            default_window_size=WINDOW_SIZE,
            disabled_algorithms=dict(s.disabled_algorithms) or None,
        )
        try:
            return self._handshake(transport)
        except BaseException:
            transport.close()
            raise

    def _handshake(self, transport: paramiko.Transport) -> SftpSession:
        s = self.settings
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
            transport.start_client(timeout=s.timeout_s)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if "no acceptable host key" in str(exc).lower():
                raise RemoteError(
                    f"{self._target()} offers no host key of the types pinned in "
                    f"{s.known_hosts.path} ({', '.join(k.key_type for k in pinned)}).",
                    "If IBKR announced a new server key, check its fingerprint with them, "
                    "then run: ibkr-statements trust-host",
                ) from None
            raise Transient(f"SSH handshake: {exc or type(exc).__name__}") from exc
        offered = _server_key(transport, s.timeout_s)
        self._verify_host_key(offered, pinned)
        if s.keepalive_s:
            transport.set_keepalive(int(max(1, s.keepalive_s)))
        try:
            transport.auth_publickey(s.username, self.key)
        except paramiko.BadAuthenticationType as exc:
            raise RemoteError(
                f"{self._target()} does not accept key login for {s.username!r} "
                f"(it allows: {', '.join(exc.allowed_types) or 'nothing'}).",
                "Check [sftp] username against IBKR's confirmation email.",
            ) from None
        except paramiko.AuthenticationException:
            raise RemoteError(
                f"Server refused our key: {self._target()} did not accept user "
                f"{s.username!r} with the key {key_fingerprint(self.key)}.",
                "IBKR's known causes: the username is not the one in their confirmation; or the "
                "key is not the one whose public half you sent them (compare the fingerprint "
                "above with `ibkr-statements keys show` and with what you sent). If unsure, "
                "make and send a new pair: ibkr-statements keys ssh --force; keys export.",
            ) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise Transient(f"authentication: {exc or type(exc).__name__}") from exc
        try:
            return SftpSession(s, transport)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise Transient(f"starting SFTP: {exc or type(exc).__name__}") from exc

    def _verify_host_key(self, offered: HostKey, pinned: Sequence[HostKey]) -> None:
        s = self.settings
        verdict = s.known_hosts.check(s.host, s.port, offered)
        if verdict == "ok":
            return
        if verdict == "unknown":
            raise HostKeyUnknown(
                f"The host key of {self._target()} is not pinned in {s.known_hosts.path}: "
                f"the server offers {offered.describe()}.",
                "Check that fingerprint with IBKR, then pin it: ibkr-statements trust-host "
                f"--fingerprint {offered.fingerprint}",
                offered,
            )
        raise RemoteError(
            f"HOST KEY CHANGED: {self._target()} offers {offered.describe()}, but "
            f"{s.known_hosts.path} pins "
            + ", ".join(k.describe() for k in pinned)
            + ". Someone may be intercepting the connection, or IBKR replaced its key.",
            "Do not connect until IBKR confirms the new fingerprint; then run "
            f"ibkr-statements trust-host --fingerprint {offered.fingerprint}",
        )


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


class RemoteSession(Protocol):
    """What the pipeline needs of a connection (real: :class:`SftpSession`)."""

    def list_files(self) -> Listing: ...

    def download(
        self, remote: RemoteFile, sink: BinaryIO, offset: int, progress: Callable[[int], None]
    ) -> None: ...

    def remove(self, remote: RemoteFile) -> None: ...

    def close(self) -> None: ...


class RemoteStore(Protocol):
    def connect(self) -> RemoteSession: ...


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
                transport.start_client(timeout=timeout_s)
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
