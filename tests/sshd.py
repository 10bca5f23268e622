"""A real OpenSSH sshd on 127.0.0.1, as pytest fixtures (listed in conftest's pytest_plugins).

`ssh_client_keys` makes the client keys once per session (RSA-4096 is the slow part);
`sshd` starts one sshd per session with its own config, host keys and authorized_keys;
`sftp_dir` gives each test a fresh empty folder on that server.

sshd must be installed (Debian: openssh-server). When it is missing and we are root, the
fixture installs it; otherwise the tests fail with the command to run. They never skip.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

SSHD = "/usr/sbin/sshd"  # sshd refuses to run unless exec'd by absolute path
SSH_KEYGEN = "/usr/bin/ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")
HOST = "127.0.0.1"
CLIENT_PASSPHRASE = "client_passphrase"

_READY_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 5.0
_INSTALL_TIMEOUT_S = 600.0
# An RSA-3072 host key takes ssh-keygen about a second; a fresh CI machine whose hypervisor
# held back most of its CPU took over 60 s (2026-11-22), which failed every sshd test at once.
_KEYGEN_TIMEOUT_S = 240.0
_PORT_ATTEMPTS = 5


@dataclass(frozen=True)
class ClientKeys:
    """Client key pairs, all authorized on the sshd."""

    rsa_path: Path  # RSA-4096, OpenSSH format, encrypted with `passphrase`
    rsa_public_line: str
    passphrase: str
    ed25519_path: Path  # OpenSSH format, no passphrase
    ed25519_public_line: str
    ecdsa_path: Path  # PEM ("BEGIN EC PRIVATE KEY"), no passphrase
    ecdsa_public_line: str

    @property
    def public_lines(self) -> tuple[str, ...]:
        return (self.rsa_public_line, self.ed25519_public_line, self.ecdsa_public_line)


@dataclass(frozen=True)
class SshdServer:
    """A running sshd. The SFTP user sees the whole file system; `root` is its test folder."""

    host: str
    port: int
    username: str
    root: Path  # local folder holding the test files; remote_dir is the same path
    remote_dir: str
    host_key_paths: tuple[Path, ...]  # private halves; each has a .pub beside it
    known_hosts_lines: tuple[str, ...]  # "[127.0.0.1]:PORT type base64", one per host key
    known_hosts_path: Path
    host_key_fingerprints: tuple[str, ...]  # "SHA256:...", as ssh-keygen -l prints them
    client_key_path: Path  # RSA-4096, OpenSSH format, encrypted
    client_key_passphrase: str
    client_public_line: str
    ed25519_key_path: Path
    ed25519_public_line: str
    ecdsa_key_path: Path
    ecdsa_public_line: str
    config_path: Path
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def fingerprint(public_line: str) -> str:
    """The SHA256 fingerprint of an OpenSSH public key line, as `ssh-keygen -l` prints it."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_client_keys(folder: Path) -> ClientKeys:
    """Writes the client key pairs into `folder` (0600 private files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    rsa_path = _write_key(
        folder / "client_rsa",
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.BestAvailableEncryption(CLIENT_PASSPHRASE.encode()),
        ),
    )
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_path = _write_key(
        folder / "client_ed25519",
        ed_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_path = _write_key(
        folder / "client_ecdsa",
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )
    return ClientKeys(
        rsa_path=rsa_path,
        rsa_public_line=_public_line(rsa_key.public_key(), "client-rsa"),
        passphrase=CLIENT_PASSPHRASE,
        ed25519_path=ed_path,
        ed25519_public_line=_public_line(ed_key.public_key(), "client-ed25519"),
        ecdsa_path=ec_path,
        ecdsa_public_line=_public_line(ec_key.public_key(), "client-ecdsa"),
    )


def _write_key(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return path


def _public_line(
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey, comment: str
) -> str:
    text = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{text.decode()} {comment}"


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def ensure_sshd() -> None:
    """Installs openssh-server when sshd is missing and we may; else fails with the fix."""
    if Path(SSHD).exists() and Path(SSH_KEYGEN).exists():
        return
    if os.geteuid() != 0:
        pytest.fail(
            f"{SSHD} is missing; install it: sudo apt-get install -y openssh-server",
            pytrace=False,
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server"],
    ):
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S
        )
        if result.returncode != 0:
            pytest.fail(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}",
                pytrace=False,
            )
    if not Path(SSHD).exists():
        pytest.fail(f"openssh-server installed but {SSHD} is still missing", pytrace=False)


def _ensure_privsep_dir() -> None:
    # sshd refuses to start (even sshd -t) without its privilege-separation folder.
    if PRIVSEP_DIR.is_dir():
        return
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
    except OSError as exc:
        pytest.fail(
            f"sshd needs {PRIVSEP_DIR}; create it: sudo mkdir -p {PRIVSEP_DIR} ({exc})",
            pytrace=False,
        )


def _free_port() -> int:
    # The port may be taken again before sshd binds it; start_sshd retries on that.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _make_host_keys(folder: Path) -> tuple[Path, ...]:
    paths = []
    for kind, bits in (("ed25519", None), ("ecdsa", "256"), ("rsa", "3072")):
        path = folder / f"ssh_host_{kind}_key"
        command = [SSH_KEYGEN, "-q", "-N", "", "-C", "", "-t", kind, "-f", str(path)]
        if bits is not None:
            command[1:1] = ["-b", bits]
        subprocess.run(command, check=True, capture_output=True, timeout=_KEYGEN_TIMEOUT_S)
        paths.append(path)
    return tuple(paths)


def _config(
    workdir: Path, port: int, username: str, host_keys: tuple[Path, ...], authorized: Path
) -> str:
    lines = [
        f"ListenAddress {HOST}",
        f"Port {port}",
        *(f"HostKey {path}" for path in host_keys),
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitEmptyPasswords no",
        "UsePAM no",
        # Our files live in a pytest temp folder whose parents sshd would judge too open.
        "StrictModes no",
        # Tests run as root here and in CI; keys only, never a password.
        "PermitRootLogin prohibit-password",
        f"AllowUsers {username}",
        "LogLevel VERBOSE",
        "LoginGraceTime 30",
        "MaxStartups 100",
        "MaxSessions 50",
        "MaxAuthTries 10",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTTY no",
        "Subsystem sftp internal-sftp",
        # Like IBKR's server: SFTP and nothing else.
        "ForceCommand internal-sftp",
    ]
    return "\n".join(lines) + "\n"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ends the sshd listener.

    Its per-connection children run in sessions of their own (sshd calls setsid) and end
    when their client disconnects, which every test does.
    """
    process.terminate()
    try:
        process.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=_STOP_TIMEOUT_S)


def _wait_ready(process: subprocess.Popen[bytes], port: int) -> str | None:
    """None once our sshd answers on `port` with an SSH banner; otherwise why not."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"sshd exited with code {process.returncode}"
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as probe:
                # Whoever took the port when sshd could not bind also accepts TCP; only an
                # SSH server greets first, and it is ours if our process is still running.
                probe.settimeout(1.0)
                if probe.recv(4).startswith(b"SSH-") and process.poll() is None:
                    return None
        except OSError:
            pass
        time.sleep(0.05)
    return f"sshd did not answer on port {port} within {_READY_TIMEOUT_S:.0f} s"


def _check_login(server: SshdServer) -> None:
    """A full SSH handshake: the host key must match known_hosts and the RSA key must log in."""
    host_keys = paramiko.HostKeys(str(server.known_hosts_path))
    key = paramiko.RSAKey.from_private_key_file(
        str(server.client_key_path), password=server.client_key_passphrase
    )
    with socket.create_connection((server.host, server.port), timeout=_READY_TIMEOUT_S) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=_READY_TIMEOUT_S)
            host_key = transport.get_remote_server_key()
            if not host_keys.check(f"[{server.host}]:{server.port}", host_key):
                raise RuntimeError(f"sshd presented an unexpected host key {host_key.get_name()}")
            transport.auth_publickey(server.username, key)
            if not transport.is_authenticated():
                raise RuntimeError("the RSA client key was not accepted")
        finally:
            transport.close()


@contextlib.contextmanager
def running_sshd(workdir: Path, keys: ClientKeys) -> Iterator[SshdServer]:
    """Starts sshd with its config, keys and SFTP root under `workdir`; stops it on exit."""
    ensure_sshd()
    _ensure_privsep_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "sftp"
    root.mkdir(exist_ok=True)
    # The account sshd will authenticate, whatever $USER says (getpass reads the environment).
    username = pwd.getpwuid(os.geteuid()).pw_name
    host_keys = _make_host_keys(workdir)
    host_public = tuple(" ".join(Path(f"{path}.pub").read_text().split()[:2]) for path in host_keys)
    authorized = workdir / "authorized_keys"
    authorized.write_text("\n".join(keys.public_lines) + "\n")
    config_path = workdir / "sshd_config"
    log_path = workdir / "sshd.log"

    failures = []
    for _attempt in range(_PORT_ATTEMPTS):
        port = _free_port()
        config_path.write_text(_config(workdir, port, username, host_keys, authorized))
        test = subprocess.run(
            [SSHD, "-t", "-f", str(config_path)], capture_output=True, text=True, timeout=30
        )
        if test.returncode != 0:
            pytest.fail(f"sshd -t rejected {config_path}:\n{test.stderr}", pytrace=False)
        log_path.write_text("")
        # -E sends sshd's log to the file; stderr too, for anything before logging starts.
        with log_path.open("ab") as early_log:
            process = subprocess.Popen(
                [SSHD, "-D", "-f", str(config_path), "-E", str(log_path)],
                stdin=subprocess.DEVNULL,
                stdout=early_log,
                stderr=early_log,
            )
        try:
            problem = _wait_ready(process, port)
            if problem is not None:
                log = _tail(log_path, 40)
                failures.append(f"{problem}; sshd log:\n{log}")
                if "Address already in use" in log:
                    continue  # another process took the port before sshd: try another
                break
            known_lines = tuple(f"[{HOST}]:{port} {line}" for line in host_public)
            known_hosts = workdir / "known_hosts"
            known_hosts.write_text("\n".join(known_lines) + "\n")
            server = SshdServer(
                host=HOST,
                port=port,
                username=username,
                root=root,
                remote_dir=str(root),
                host_key_paths=host_keys,
                known_hosts_lines=known_lines,
                known_hosts_path=known_hosts,
                host_key_fingerprints=tuple(fingerprint(line) for line in host_public),
                client_key_path=keys.rsa_path,
                client_key_passphrase=keys.passphrase,
                client_public_line=keys.rsa_public_line,
                ed25519_key_path=keys.ed25519_path,
                ed25519_public_line=keys.ed25519_public_line,
                ecdsa_key_path=keys.ecdsa_path,
                ecdsa_public_line=keys.ecdsa_public_line,
                config_path=config_path,
                log_path=log_path,
            )
            try:
                _check_login(server)
            except (OSError, paramiko.SSHException, RuntimeError) as exc:
                failures.append(
                    f"SSH login check failed: {exc!r}; sshd log:\n{_tail(log_path, 40)}"
                )
                break
            yield server
            return
        finally:
            _stop(process)
    pytest.fail("could not start sshd:\n" + "\n\n".join(failures), pytrace=False)


@pytest.fixture(scope="session")
def ssh_client_keys(tmp_path_factory: pytest.TempPathFactory) -> ClientKeys:
    return make_client_keys(tmp_path_factory.mktemp("client-keys"))


@pytest.fixture(scope="session")
def sshd(
    tmp_path_factory: pytest.TempPathFactory, ssh_client_keys: ClientKeys
) -> Iterator[SshdServer]:
    with running_sshd(tmp_path_factory.mktemp("sshd"), ssh_client_keys) as server:
        yield server


@pytest.fixture
def sftp_dir(sshd: SshdServer, request: pytest.FixtureRequest) -> Path:
    """A fresh empty folder on the sshd, named after the test; its path is also the remote path."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80] or "test"
    for suffix in range(1000):
        folder = sshd.root / (base if suffix == 0 else f"{base}-{suffix}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise RuntimeError(f"no free folder name for {base} under {sshd.root}")
