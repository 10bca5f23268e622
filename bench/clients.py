"""The clients under test: our console script in a project folder, OpenSSH's `sftp -b`, the
reference script (bench/reference.sh) and the gpg binary."""

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
REFERENCE_SCRIPT = Path(__file__).with_name("reference.sh")
SFTP = "sftp"
# What our tool would read from [sftp] key_passphrase_env for the encrypted RSA-4096 key.
SSH_PASSPHRASE_ENV = "IBKR_SSH_PASSPHRASE"
PGP_PASSPHRASE_ENV = "IBKR_PGP_PASSPHRASE"


@dataclass(frozen=True)
class Target:
    """Where the clients connect, what they log in with, and the cipher both use."""

    server: SshdServer
    key_path: Path  # unencrypted ed25519, so that neither client needs a passphrase
    cipher: str = ""  # what ours negotiates; sftp is made to use it too ("" = sftp's choice)
    mac: str = ""  # with a non-AEAD cipher only

    @property
    def known_hosts(self) -> Path:
        return self.server.known_hosts_path


@dataclass(frozen=True)
class Login:
    """The SSH key ours logs in with: the ed25519 both tools use, or an encrypted RSA-4096."""

    key_path: Path
    passphrase: str | None = None


def clean_env(pycache: Path) -> dict[str, str]:
    """Our environment without any IBKR_* or GnuPG setting a user may have exported.

    Bytecode is cached under ``pycache`` (PYTHONPYCACHEPREFIX), never beside the sources: an
    installed tool runs from cached bytecode, and compiling the package from source (as with
    PYTHONDONTWRITEBYTECODE) would add 0.1-0.2 s to every run of ours.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IBKR_", "GNUPGHOME", "GPG_AGENT_INFO", "SSH_AUTH_SOCK"))
        and k != "PYTHONDONTWRITEBYTECODE"
    }
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def compile_package(env: dict[str, str], cwd: Path) -> None:
    """Cache the bytecode of everything a run imports, as an installation would have it."""
    code = (
        "import compileall, statements, statements.cli, statements.scheduler, "
        "statements.pipeline, statements.doctor, sys; "
        "sys.exit(not compileall.compile_dir(statements.__path__[0], quiet=1))"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, check=True, timeout=300)


def make_project(
    root: Path,
    target: Target,
    remote_dir: Path,
    *,
    gnupg_home: Path,
    login: Login | None = None,
    workers: int | None = None,
) -> Path:
    """A project folder as `init` + `keys` + `trust-host` leave it; returns the config file.

    The GnuPG home is shared by every project and by the reference script: the same key.
    """
    (root / "config").mkdir(parents=True)
    (root / "keys").mkdir(mode=0o700)
    shutil.copy(target.known_hosts, root / "keys" / "known_hosts")
    install_login(root, login or Login(target.key_path))
    return write_config(root, target, remote_dir, gnupg_home=gnupg_home, workers=workers)


def install_login(root: Path, login: Login) -> None:
    """The SSH private key at the config's default place, keys/ibkr_rsa (0600)."""
    key = root / "keys" / "ibkr_rsa"
    key.unlink(missing_ok=True)  # a copy of a project holds a hard link: never write through it
    shutil.copy(login.key_path, key)
    key.chmod(0o600)


def write_config(
    root: Path, target: Target, remote_dir: Path, *, gnupg_home: Path, workers: int | None
) -> Path:
    server = target.server
    text = (
        f'[sftp]\nhost = "{server.host}"\nport = {server.port}\n'
        f'username = "{server.username}"\nremote_dir = "{remote_dir}"\n'
    )
    if workers is not None:
        text += f"workers = {workers}\n"
    text += f'\n[pgp]\ngnupg_home = "{gnupg_home}"\n'
    config = root / "config" / "ibkr-statements.toml"
    config.unlink(missing_ok=True)
    config.write_text(text)
    return config


def ours_env(base: dict[str, str], passphrase: str, login: Login | None = None) -> dict[str, str]:
    env = {**base, PGP_PASSPHRASE_ENV: passphrase}
    if login is not None and login.passphrase is not None:
        env[SSH_PASSPHRASE_ENV] = login.passphrase
    return env


def ours_argv(config: Path, command: str) -> list[str]:
    return [str(CONSOLE_SCRIPT), "--config", str(config), command]


def archive_of(config: Path) -> Path:
    return config.parent.parent / "archive"


def inbox_of(config: Path) -> Path:
    return archive_of(config) / ".inbox"


def ssh_options(target: Target) -> list[str]:
    """The options both `sftp -b` and the reference script pass: same key, host key, cipher."""
    server = target.server
    return [
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
    ]


def sftp_argv(target: Target, batch: Path, *, verbose: bool = False) -> list[str]:
    server = target.server
    return [
        SFTP,
        *(["-v"] if verbose else []),
        "-b",
        str(batch),
        *ssh_options(target),
        f"{server.username}@{server.host}",
    ]


def write_get_batch(path: Path, remote_dir: Path, local_dir: Path) -> Path:
    """A batch that lists the remote folder and gets every file in it, one after the other."""
    path.write_text(f'cd "{remote_dir}"\nlcd "{local_dir}"\nget *\n')
    return path


def reference_env(
    base: dict[str, str], target: Target, remote_dir: Path, gnupg_home: Path, passphrase: Path
) -> dict[str, str]:
    server = target.server
    return {
        **base,
        "REF_REMOTE": f"{server.username}@{server.host}",
        "REF_SSH_OPTIONS": "\n".join(ssh_options(target)),
        "REF_REMOTE_DIR": str(remote_dir),
        "REF_GNUPGHOME": str(gnupg_home),
        "REF_PASSPHRASE_FILE": str(passphrase),
    }


def reference_argv(state: Path) -> list[str]:
    return ["bash", str(REFERENCE_SCRIPT), str(state)]


def remote_names(target: Target, remote_dir: Path, workdir: Path) -> list[str]:
    """The names in a remote folder as `sftp -b` lists them: how the reference script starts."""
    batch = workdir / "list.batch"
    batch.write_text(f'cd "{remote_dir}"\nls -1\n')
    done = subprocess.run(
        sftp_argv(target, batch), capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"sftp listing failed:\n{done.stderr[-2000:]}")
    return sorted(line for line in done.stdout.splitlines() if not line.startswith("sftp> "))


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


def version_of(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    return ((result.stderr or "") + (result.stdout or "")).strip().splitlines()[0]


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
