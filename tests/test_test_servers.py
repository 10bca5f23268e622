"""The two test servers work, checked with a plain paramiko client.

`sshd` (tests/sshd.py) is a real OpenSSH; `SandboxServer` (statements/sandbox.py) is the
in-process paramiko server with faults on demand. Everything else's integration tests stand on
these, so each promise they make is proved here.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from statements.sandbox import Faults, SandboxServer, generate_ed25519_key
from tests.sshd import ClientKeys, SshdServer, fingerprint

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
# Generous bounds for "does not hang": far above what any of this takes, well below pytest's.
_HANG_GUARD_S = 20.0
_CLIENT_ERRORS = (paramiko.SSHException, EOFError, OSError)


def _payload(size: int) -> bytes:
    return os.urandom(size)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _strict_client(known_hosts: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


# --- sshd ------------------------------------------------------------------------------------


def _sshd_key(sshd: SshdServer, kind: str) -> paramiko.PKey:
    if kind == "rsa":
        return paramiko.RSAKey.from_private_key_file(
            str(sshd.client_key_path), password=sshd.client_key_passphrase
        )
    if kind == "ed25519":
        return paramiko.Ed25519Key.from_private_key_file(str(sshd.ed25519_key_path))
    return paramiko.ECDSAKey.from_private_key_file(str(sshd.ecdsa_key_path))


@pytest.mark.parametrize("kind", ["rsa", "ed25519", "ecdsa"])
def test_sshd_serves_files_to_each_client_key(
    sshd: SshdServer, sftp_dir: Path, tmp_path: Path, kind: str
) -> None:
    data = _payload(3 * MIB)
    (sftp_dir / "U1234567.Trade_History.20260901.20260901.xml.pgp").write_bytes(data)
    client = _strict_client(sshd.known_hosts_path)
    try:
        client.connect(
            sshd.host,
            sshd.port,
            username=sshd.username,
            pkey=_sshd_key(sshd, kind),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
        with client.open_sftp() as sftp:
            assert sftp.listdir(str(sftp_dir)) == [
                "U1234567.Trade_History.20260901.20260901.xml.pgp"
            ]
            local = tmp_path / "copy"
            sftp.get(f"{sftp_dir}/U1234567.Trade_History.20260901.20260901.xml.pgp", str(local))
    finally:
        client.close()
    assert _sha256(local.read_bytes()) == _sha256(data)


def test_sshd_rsa_key_file_loads_with_passphrase_through_sshclient(sshd: SshdServer) -> None:
    client = _strict_client(sshd.known_hosts_path)
    try:
        client.connect(
            sshd.host,
            sshd.port,
            username=sshd.username,
            key_filename=str(sshd.client_key_path),
            passphrase=sshd.client_key_passphrase,
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
        with client.open_sftp() as sftp:
            assert stat.S_ISDIR(sftp.stat(sshd.remote_dir).st_mode or 0)
    finally:
        client.close()
    key = paramiko.RSAKey.from_private_key_file(
        str(sshd.client_key_path), password=sshd.client_key_passphrase
    )
    assert key.get_bits() == 4096
    assert sshd.client_public_line.split()[1] == key.get_base64()


def test_sshd_refuses_an_unknown_key(sshd: SshdServer) -> None:
    client = _strict_client(sshd.known_hosts_path)
    try:
        with pytest.raises(paramiko.AuthenticationException):
            client.connect(
                sshd.host,
                sshd.port,
                username=sshd.username,
                pkey=generate_ed25519_key(),
                look_for_keys=False,
                allow_agent=False,
                timeout=10,
            )
    finally:
        client.close()


def test_sshd_known_hosts_pins_every_host_key(sshd: SshdServer) -> None:
    kinds = sorted(line.split()[1] for line in sshd.known_hosts_lines)
    assert kinds == ["ecdsa-sha2-nistp256", "ssh-ed25519", "ssh-rsa"]
    assert all(line.startswith(f"[127.0.0.1]:{sshd.port} ") for line in sshd.known_hosts_lines)
    for path, expected in zip(sshd.host_key_paths, sshd.host_key_fingerprints, strict=True):
        assert fingerprint(Path(f"{path}.pub").read_text()) == expected


def test_sftp_dir_is_fresh_and_named_after_the_test(sshd: SshdServer, sftp_dir: Path) -> None:
    assert sftp_dir.parent == sshd.root
    assert sftp_dir.name == "test_sftp_dir_is_fresh_and_named_after_the_test"
    assert list(sftp_dir.iterdir()) == []


# --- sandbox ---------------------------------------------------------------------------------


@pytest.fixture
def client_key() -> paramiko.PKey:
    return generate_ed25519_key()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


@pytest.fixture
def sandbox(root: Path, client_key: paramiko.PKey) -> Iterator[SandboxServer]:
    with SandboxServer(root, authorized_keys=[client_key]) as server:
        yield server


def _pin(server: SandboxServer, folder: Path) -> Path:
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(server.host_key_line() + "\n")
    return known_hosts


def _connect(
    server: SandboxServer,
    key: paramiko.PKey,
    known_hosts: Path,
    *,
    username: str = "demo",
    timeout: float = 10,
) -> paramiko.SSHClient:
    client = _strict_client(known_hosts)
    try:
        client.connect(
            server.host,
            server.port,
            username=username,
            pkey=key,
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
        )
    except BaseException:
        client.close()
        raise
    return client


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + _HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _close(client: paramiko.SSHClient) -> None:
    """Closes the client and waits for its transport thread, so thread checks see only ours."""
    transport = client.get_transport()
    client.close()
    if transport is not None:
        transport.join(_HANG_GUARD_S)


def test_sandbox_lists_and_serves_files(
    sandbox: SandboxServer, root: Path, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    data = _payload(3 * MIB)
    (root / "b.xml.pgp").write_bytes(data)
    (root / "a.xml.pgp").write_bytes(b"small")
    (root / "outgoing").mkdir()
    client = _connect(sandbox, client_key, _pin(sandbox, tmp_path))
    try:
        with client.open_sftp() as sftp:
            assert sftp.normalize(".") == "/"
            assert sftp.listdir(".") == ["a.xml.pgp", "b.xml.pgp", "outgoing"]
            assert sftp.listdir("/") == ["a.xml.pgp", "b.xml.pgp", "outgoing"]
            assert sftp.stat("b.xml.pgp").st_size == len(data)
            sftp.get("b.xml.pgp", str(tmp_path / "copy"))
            assert sftp.normalize("outgoing") == "/outgoing"
    finally:
        _close(client)
    assert _sha256((tmp_path / "copy").read_bytes()) == _sha256(data)
    assert sandbox.connections == 1


def test_sandbox_accepts_openssh_public_lines_and_an_encrypted_rsa_4096_key(
    root: Path, ssh_client_keys: ClientKeys, tmp_path: Path
) -> None:
    (root / "x.pgp").write_bytes(b"x")
    key = paramiko.RSAKey.from_private_key_file(
        str(ssh_client_keys.rsa_path), password=ssh_client_keys.passphrase
    )
    with SandboxServer(root, authorized_keys=[ssh_client_keys.rsa_public_line]) as server:
        client = _connect(server, key, _pin(server, tmp_path))
        try:
            with client.open_sftp() as sftp:
                assert sftp.listdir() == ["x.pgp"]
        finally:
            _close(client)


def test_sandbox_removes_and_renames_inside_root(
    sandbox: SandboxServer, root: Path, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    (root / "done.pgp").write_bytes(b"d")
    (root / "old.pgp").write_bytes(b"o")
    client = _connect(sandbox, client_key, _pin(sandbox, tmp_path))
    try:
        with client.open_sftp() as sftp:
            sftp.remove("done.pgp")
            sftp.rename("old.pgp", "new.pgp")
            assert sftp.listdir() == ["new.pgp"]
    finally:
        _close(client)
    assert sorted(p.name for p in root.iterdir()) == ["new.pgp"]


def test_sandbox_refuse_keys_fault(
    sandbox: SandboxServer, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    known_hosts = _pin(sandbox, tmp_path)
    sandbox.faults.refuse_keys = True
    with pytest.raises(paramiko.AuthenticationException):
        _connect(sandbox, client_key, known_hosts)
    sandbox.faults.refuse_keys = False
    _close(_connect(sandbox, client_key, known_hosts))
    assert sandbox.connections == 2


def test_sandbox_refuses_unknown_keys_and_other_users(
    sandbox: SandboxServer, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    known_hosts = _pin(sandbox, tmp_path)
    with pytest.raises(paramiko.AuthenticationException):
        _connect(sandbox, generate_ed25519_key(), known_hosts)
    with pytest.raises(paramiko.AuthenticationException):
        _connect(sandbox, client_key, known_hosts, username="root")


def test_sandbox_new_host_key_fails_the_pinned_check(
    sandbox: SandboxServer, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    known_hosts = _pin(sandbox, tmp_path)
    _close(_connect(sandbox, client_key, known_hosts))
    sandbox.set_host_key(generate_ed25519_key())
    with pytest.raises(paramiko.BadHostKeyException):
        _connect(sandbox, client_key, known_hosts)
    assert sandbox.host_key_line() != known_hosts.read_text().strip()


def _read_sequentially(sftp: paramiko.SFTPClient, path: str, into: io.BytesIO) -> None:
    """Reads one request at a time: no prefetch thread to die noisily when the link drops."""
    with sftp.open(path, "rb") as remote:
        while chunk := remote.read(32 * 1024):
            into.write(chunk)


def test_sandbox_drop_after_bytes_closes_the_connection_mid_file(
    sandbox: SandboxServer, root: Path, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    data = _payload(3 * MIB)
    (root / "big.pgp").write_bytes(data)
    sandbox.faults = Faults(drop_after_bytes=MIB)
    client = _connect(sandbox, client_key, _pin(sandbox, tmp_path))
    received = io.BytesIO()
    try:
        # Not `with`: closing an SFTPClient whose connection dropped raises EOFError.
        sftp = client.open_sftp()
        with pytest.raises(_CLIENT_ERRORS):
            _read_sequentially(sftp, "big.pgp", received)
        transport = client.get_transport()
        assert transport is not None
        transport.join(_HANG_GUARD_S)
        assert not transport.is_active()
    finally:
        _close(client)
    assert received.getvalue() == data[:MIB]


def test_sandbox_fail_read_on_fails_only_that_file(
    sandbox: SandboxServer, root: Path, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    (root / "bad.pgp").write_bytes(b"bad")
    (root / "good.pgp").write_bytes(b"good")
    sandbox.faults.fail_read_on = frozenset({"bad.pgp"})
    client = _connect(sandbox, client_key, _pin(sandbox, tmp_path))
    try:
        with client.open_sftp() as sftp:
            with pytest.raises(OSError):
                sftp.getfo("bad.pgp", io.BytesIO())
            good = io.BytesIO()
            sftp.getfo("good.pgp", good)
            assert good.getvalue() == b"good"
    finally:
        _close(client)


@pytest.mark.timeout(60)
def test_sandbox_stall_makes_a_client_with_a_short_timeout_give_up(
    sandbox: SandboxServer, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    known_hosts = _pin(sandbox, tmp_path)
    sandbox.faults.stall_seconds = 3600
    with pytest.raises(_CLIENT_ERRORS):
        _connect(sandbox, client_key, known_hosts, timeout=1)


@pytest.mark.timeout(60)
def test_sandbox_half_banner_makes_the_client_give_up(
    sandbox: SandboxServer, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    known_hosts = _pin(sandbox, tmp_path)
    sandbox.faults.half_banner = True
    with socket.create_connection((sandbox.host, sandbox.port), timeout=5) as raw:
        assert raw.recv(100) == b"SSH-2.0-Sand"
    with pytest.raises(paramiko.SSHException):
        _connect(sandbox, client_key, known_hosts, timeout=1)


@pytest.mark.timeout(60)
def test_sandbox_stop_is_prompt_and_leaves_no_threads_while_a_client_hangs(
    root: Path, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    (root / "big.pgp").write_bytes(_payload(MIB))
    before = set(threading.enumerate())
    server = SandboxServer(root, authorized_keys=[client_key], faults=Faults())
    server.start()
    try:
        hung = _connect(server, client_key, _pin(server, tmp_path))
        server.faults.stall_after_bytes = 64 * 1024
        sftp = hung.open_sftp()
        channel = sftp.get_channel()
        assert channel is not None
        channel.settimeout(1)
        received = io.BytesIO()
        with pytest.raises(TimeoutError):
            _read_sequentially(sftp, "big.pgp", received)
        assert len(received.getvalue()) == 64 * 1024
        # A second client stalled before the handshake, and a third on half a banner.
        server.faults = Faults(stall_seconds=3600)
        stalled = socket.create_connection((server.host, server.port), timeout=5)
        _wait_until(lambda: server.connections == 2)
        server.faults = Faults(half_banner=True)
        half = socket.create_connection((server.host, server.port), timeout=5)
        assert half.recv(100) == b"SSH-2.0-Sand"
    finally:
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        stopper.join(_HANG_GUARD_S)
        assert not stopper.is_alive(), "stop() hung"
    for sock in (stalled, half):
        sock.settimeout(5)
        assert sock.recv(100) == b""  # the server closed it
        sock.close()
    _close(hung)
    left = [thread.name for thread in threading.enumerate() if thread not in before]
    assert left == []
    assert server.connections == 3


def test_sandbox_refuses_paths_outside_root(
    sandbox: SandboxServer, root: Path, client_key: paramiko.PKey, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"SECRET-CONTENT"
    (outside / "secret.pgp").write_bytes(secret)
    (tmp_path / "secret.pgp").write_bytes(secret)
    (root / "inside.pgp").write_bytes(b"inside")
    (root / "link-out.pgp").symlink_to(outside / "secret.pgp")
    (root / "dir-out").symlink_to(outside)
    (root / "link-in.pgp").symlink_to("inside.pgp")
    client = _connect(sandbox, client_key, _pin(sandbox, tmp_path))
    try:
        with client.open_sftp() as sftp:
            for path in (
                "../secret.pgp",
                "../outside/secret.pgp",
                "/../secret.pgp",
                "outgoing/../../secret.pgp",
                str(outside / "secret.pgp"),
                "link-out.pgp",
                "dir-out/secret.pgp",
            ):
                got = io.BytesIO()
                with pytest.raises(OSError):
                    sftp.getfo(path, got)
                assert secret not in got.getvalue(), path
                with pytest.raises(OSError):
                    sftp.stat(path)
            for folder in ("..", "../outside", "dir-out", str(outside)):
                with pytest.raises(OSError):
                    sftp.listdir(folder)
            with pytest.raises(OSError):
                sftp.normalize("..")
            with pytest.raises(OSError):
                sftp.readlink("link-out.pgp")
            with pytest.raises(OSError):
                sftp.remove("../secret.pgp")
            with pytest.raises(OSError):
                sftp.rename("inside.pgp", "../moved.pgp")

            # Links inside the root are reported as links, never followed, in lstat and listings.
            listing = {attr.filename: attr.st_mode or 0 for attr in sftp.listdir_attr(".")}
            assert stat.S_ISLNK(listing["link-out.pgp"])
            assert stat.S_ISLNK(listing["dir-out"])
            assert stat.S_ISLNK(listing["link-in.pgp"])
            assert stat.S_ISLNK(sftp.lstat("link-out.pgp").st_mode or 0)
            assert stat.S_ISREG(sftp.stat("link-in.pgp").st_mode or 0)
            assert sftp.readlink("link-in.pgp") == "/inside.pgp"
    finally:
        _close(client)
    assert (outside / "secret.pgp").read_bytes() == secret
    assert (tmp_path / "secret.pgp").read_bytes() == secret
    assert (root / "inside.pgp").exists()


def test_sandbox_root_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        SandboxServer(tmp_path / "missing")


def test_sandbox_rejects_a_malformed_authorized_key_line(root: Path) -> None:
    with pytest.raises(ValueError, match="OpenSSH public key"):
        SandboxServer(root, authorized_keys=["ssh-ed25519"])
