"""The two clients under test: our console script in a fresh project, and OpenSSH's `sftp -b`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.sshd import SshdServer

CONSOLE_SCRIPT = Path(sys.executable).with_name("ibkr-statements")
SFTP = "sftp"


@dataclass(frozen=True)
class Target:
    """Where the clients connect, what they log in with, and the cipher both use."""

    server: SshdServer
    key_path: Path  # unencrypted, so that neither client needs a passphrase
    cipher: str = ""  # what ours negotiates; sftp is made to use it too ("" = sftp's choice)
    mac: str = ""  # with a non-AEAD cipher only

    @property
    def known_hosts(self) -> Path:
        return self.server.known_hosts_path


def clean_env() -> dict[str, str]:
    """Our environment without any IBKR_* setting a user may have exported."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IBKR_")}


def make_project(root: Path, target: Target, remote_dir: Path, workers: int | None) -> Path:
    """A project folder as `ibkr-statements init` + `keys` + `trust-host` leave it; the config."""
    (root / "config").mkdir(parents=True)
    keys = root / "keys"
    keys.mkdir(mode=0o700)
    shutil.copy(target.key_path, keys / "ibkr_rsa")
    (keys / "ibkr_rsa").chmod(0o600)
    shutil.copy(target.known_hosts, keys / "known_hosts")
    server = target.server
    text = (
        f'[sftp]\nhost = "{server.host}"\nport = {server.port}\n'
        f'username = "{server.username}"\nremote_dir = "{remote_dir}"\n'
    )
    if workers is not None:
        text += f"workers = {workers}\n"
    config = root / "config" / "ibkr-statements.toml"
    config.write_text(text)
    return config


def ours_argv(config: Path) -> list[str]:
    return [str(CONSOLE_SCRIPT), "--config", str(config), "fetch"]


def inbox_of(config: Path) -> Path:
    return config.parent.parent / "archive" / ".inbox"


def sftp_argv(target: Target, batch: Path, *, verbose: bool = False) -> list[str]:
    server = target.server
    return [
        SFTP,
        *(["-v"] if verbose else []),
        "-b",
        str(batch),
        "-F",
        "/dev/null",
        "-P",
        str(server.port),
        *(["-c", target.cipher] if target.cipher else []),
        *(["-o", f"MACs={target.mac}"] if target.mac else []),
        "-i",
        str(target.key_path),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={target.known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        f"{server.username}@{server.host}",
    ]


def write_get_batch(path: Path, remote_dir: Path, local_dir: Path) -> Path:
    """A batch that lists the remote folder and gets every file in it, one after the other."""
    path.write_text(f'cd "{remote_dir}"\nlcd "{local_dir}"\nget *\n')
    return path


def sftp_cipher(target: Target, workdir: Path) -> str:
    """The cipher sftp negotiates, from its -v log (server to client: the direction we read)."""
    batch = workdir / "probe.batch"
    batch.write_text("pwd\n")
    result = subprocess.run(
        sftp_argv(target, batch, verbose=True),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", result.stderr)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"sftp probe failed ({result.returncode}):\n{result.stderr[-2000:]}")
    mac = match.group(2)
    return match.group(1) if mac == "<implicit>" else f"{match.group(1)} + {mac}"


@dataclass(frozen=True)
class Negotiated:
    cipher: str
    mac: str  # "" for an AEAD cipher (its own integrity check)
    banner: str  # the server's SSH version string


def ours_negotiates(config: Path) -> Negotiated:
    """What our code negotiates with the server (server to client: the direction we read)."""
    from statements import config as config_module
    from statements.remote import SftpSettings, SftpStore, load_login_key

    cfg = config_module.load(config)
    store = SftpStore(SftpSettings.from_config(cfg), load_login_key(cfg))
    session = store.connect()
    try:
        transport = session.transport
        # Set once keys are exchanged; not in paramiko's type stubs.
        cipher = str(getattr(transport, "remote_cipher", ""))
        mac = str(getattr(transport, "remote_mac", ""))
        aead = cipher.endswith("-gcm@openssh.com") or cipher.startswith("chacha20-poly1305")
        return Negotiated(cipher, "" if aead else mac, str(transport.remote_version))
    finally:
        session.close()


def openssh_version() -> str:
    result = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False, timeout=10)
    return (result.stderr or result.stdout).strip()


def statements_location(env: dict[str, str], cwd: Path) -> str:
    """Where the child processes import `statements` from (PYTHONPATH may point elsewhere)."""
    result = subprocess.run(
        [sys.executable, "-c", "import statements; print(statements.__file__)"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        return "(cannot import statements: " + result.stderr.strip().splitlines()[-1] + ")"
    return str(Path(result.stdout.strip()).parent)
