"""Back up and restore all keys of a project (IBKR KB4411 / KB4323), with the real gpg."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gnupg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from statements.config import Config, from_mapping
from statements.errors import KeyProblem
from statements.keys.backup import (
    TOP,
    BackupContents,
    create_backup,
    restore_backup,
    ssh_public_key_fingerprint,
)
from statements.keys.pgp import (
    PgpKeyInfo,
    export_public_key,
    generate_pgp_key,
    open_gnupg,
    secret_keys,
    stop_agent,
)

pytestmark = pytest.mark.integration

PGP_PASSPHRASE = "pgp pass phrase ü"
SSH_PASSPHRASE = "ssh pass phrase"
BACKUP_PASSPHRASE = "backup pass phrase 9"
KNOWN_HOSTS = b"[xfer.interactivebrokers.com]:32 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample\n"


def gpg(home: Path, *args: str, input: bytes | None = None) -> bytes:
    done = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
        input=input,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


@pytest.fixture(scope="module")
def pgp_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, PgpKeyInfo]]:
    """One protected RSA-2048 key for the module (the size does not matter here)."""
    home = tmp_path_factory.mktemp("bk") / "g"
    info = generate_pgp_key(
        home, name="Jane Doe", email="jane@example.com", bits=2048, passphrase=PGP_PASSPHRASE
    )
    yield home, info
    stop_agent(home)


@pytest.fixture
def homes() -> Iterator[list[Path]]:
    """GnuPG homes a test used; their agents are stopped afterwards."""
    used: list[Path] = []
    yield used
    for home in used:
        stop_agent(home)


@pytest.fixture
def new_project(
    tmp_path_factory: pytest.TempPathFactory, homes: list[Path]
) -> Callable[[], Config]:
    """An empty project folder with config/ (short path: agent sockets live in keys/gnupg)."""

    def make() -> Config:
        root = tmp_path_factory.mktemp("p")
        (root / "config").mkdir()
        cfg = from_mapping({}, root / "config" / "ibkr-statements.toml")
        homes.append(cfg.pgp.gnupg_home)
        return cfg

    return make


def write_ssh_key(cfg: Config) -> str:
    """An encrypted OpenSSH RSA key pair at the configured paths; returns its fingerprint."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.BestAvailableEncryption(SSH_PASSPHRASE.encode()),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    keys = cfg.sftp.key_file.parent
    keys.mkdir(mode=0o700, exist_ok=True)
    cfg.sftp.key_file.write_bytes(private)
    cfg.sftp.key_file.chmod(0o600)
    cfg.sftp.key_file.with_name(cfg.sftp.key_file.name + ".pub").write_bytes(
        public + b" ibkr-statements\n"
    )
    blob = base64.b64decode(public.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def fill_project(cfg: Config, pgp_source: tuple[Path, PgpKeyInfo]) -> str:
    """An SSH key, known_hosts, the PGP key and its exported public half; the SSH fingerprint."""
    ssh_fpr = write_ssh_key(cfg)
    cfg.sftp.known_hosts.write_bytes(KNOWN_HOSTS)
    shutil.copytree(pgp_source[0], cfg.pgp.gnupg_home, ignore=shutil.ignore_patterns("S.*"))
    export_public_key(cfg.pgp.gnupg_home, pgp_source[1].fingerprint, cfg.pgp.public_key_file)
    return ssh_fpr


@dataclass(frozen=True)
class Made:
    cfg: Config
    ssh_fpr: str
    backup: Path
    contents: BackupContents
    tar: bytes  # the backup decrypted by plain gpg


@pytest.fixture(scope="module")
def made(
    tmp_path_factory: pytest.TempPathFactory, pgp_source: tuple[Path, PgpKeyInfo]
) -> Iterator[Made]:
    """One full project and its backup for the module: exporting PGP keys takes a second."""
    root = tmp_path_factory.mktemp("src")
    (root / "config").mkdir()
    cfg = from_mapping({}, root / "config" / "ibkr-statements.toml")
    used: list[Path] = [cfg.pgp.gnupg_home]
    try:
        ssh_fpr = fill_project(cfg, pgp_source)
        out = tmp_path_factory.mktemp("out") / "keys-backup.gpg"
        contents = create_backup(
            cfg, out, backup_passphrase=BACKUP_PASSPHRASE, pgp_passphrase=PGP_PASSPHRASE
        )
        tar = plain_gpg_decrypt(out, used, tmp_path_factory.mktemp("pl"))
        yield Made(cfg, ssh_fpr, out, contents, tar)
    finally:
        for home in used:
            stop_agent(home)


def copy_of(made: Made, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("cp") / made.backup.name
    shutil.copyfile(made.backup, copy)
    return copy


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every regular file and folder under ``root`` with its bytes, for "nothing written"."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            found[rel] = None
        elif path.is_file() and not path.name.startswith("S.gpg-agent"):
            found[rel] = path.read_bytes()
    return found


def plain_gpg_decrypt(backup: Path, homes: list[Path], tmp: Path) -> bytes:
    """What a user without this tool runs: gpg -d, the passphrase from a file."""
    home = tmp / "plain"
    home.mkdir(mode=0o700)
    homes.append(home)
    pass_file = tmp / "pass"
    pass_file.write_text(BACKUP_PASSPHRASE + "\n")
    return gpg(
        home, "--pinentry-mode", "loopback", "--passphrase-file", str(pass_file), "-d", str(backup)
    )


def encrypt_to_project_and_decrypt(
    cfg: Config, homes: list[Path], tmp: Path, passphrase: str | None
) -> None:
    """IBKR encrypts to the exported public key; the project's GnuPG home decrypts it."""
    ibkr = tmp / "ibkr"
    ibkr.mkdir(mode=0o700)
    homes.append(ibkr)
    gpg(ibkr, "--import", str(cfg.pgp.public_key_file))
    fpr = secret_keys(cfg.pgp.gnupg_home)[0].fingerprint
    plain = os.urandom(2000)
    sealed = gpg(ibkr, "--trust-model", "always", "--encrypt", "-r", fpr, input=plain)
    result = open_gnupg(cfg.pgp.gnupg_home).decrypt(sealed, passphrase=passphrase)
    assert result.ok, result.stderr
    assert result.data == plain


def test_ssh_fingerprint_matches_ssh_keygen(
    new_project: Callable[[], Config],
) -> None:
    cfg = new_project()
    expected = write_ssh_key(cfg)
    pub = cfg.sftp.key_file.with_name(cfg.sftp.key_file.name + ".pub")
    assert ssh_public_key_fingerprint(pub.read_text()) == expected
    if shutil.which("ssh-keygen"):
        printed = subprocess.run(
            ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True
        ).stdout
        assert printed.split()[1] == expected
    for bad in ("", "ssh-rsa", "ssh-rsa !!!", "ssh-ed25519 " + pub.read_text().split()[1]):
        with pytest.raises(ValueError):
            ssh_public_key_fingerprint(bad)


def test_backup_and_restore_reproduce_every_key(
    made: Made,
    pgp_source: tuple[Path, PgpKeyInfo],
    new_project: Callable[[], Config],
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cfg = made.cfg
    assert made.contents.ssh_fingerprint == made.ssh_fpr
    assert made.contents.pgp_fingerprints == (pgp_source[1].fingerprint,)
    names = ("ibkr_rsa", "ibkr_rsa.pub", "known_hosts", "pgp-public.asc", "manifest.json")
    assert {f"{TOP}/{n}" for n in names} <= set(made.contents.files)
    assert stat.S_IMODE(made.backup.stat().st_mode) == 0o600

    target = new_project()
    # A host key pinned before the restore is kept beside the restored one, never lost.
    target.keys_dir.mkdir(mode=0o700)
    target.sftp.known_hosts.write_bytes(b"pinned earlier\n")
    restored = restore_backup(target, made.backup, backup_passphrase=BACKUP_PASSPHRASE)
    kept = list(target.keys_dir.glob("known_hosts.replaced-*"))
    assert [p.read_bytes() for p in kept] == [b"pinned earlier\n"]
    assert restored == BackupContents(
        made.ssh_fpr, made.contents.pgp_fingerprints, made.contents.files
    )

    pub_name = cfg.sftp.key_file.name + ".pub"
    for source, copy in [
        (cfg.sftp.key_file, target.sftp.key_file),
        (cfg.sftp.key_file.with_name(pub_name), target.sftp.key_file.with_name(pub_name)),
        (cfg.sftp.known_hosts, target.sftp.known_hosts),
        (cfg.pgp.public_key_file, target.pgp.public_key_file),
    ]:
        assert copy.read_bytes() == source.read_bytes(), copy
    modes = {
        target.sftp.key_file: 0o600,
        target.sftp.key_file.with_name(pub_name): 0o644,
        target.sftp.known_hosts: 0o644,
        target.pgp.public_key_file: 0o644,
        target.keys_dir: 0o700,
        target.pgp.gnupg_home: 0o700,
    }
    for path, mode in modes.items():
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    # The restored key is ultimately trusted again, as on the old computer.
    trust = gpg(target.pgp.gnupg_home, "--export-ownertrust").decode()
    assert f"{pgp_source[1].fingerprint}:6:" in trust

    encrypt_to_project_and_decrypt(
        target, homes, tmp_path_factory.mktemp("rt"), passphrase=PGP_PASSPHRASE
    )


def test_backup_is_a_tar_plain_gpg_can_open(made: Made) -> None:
    sealed = made.backup.read_bytes()
    for secret in (BACKUP_PASSPHRASE, PGP_PASSPHRASE, SSH_PASSPHRASE):
        assert secret.encode() not in sealed
    with tarfile.open(fileobj=io.BytesIO(made.tar)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members[TOP].isdir()
        assert all(m.isreg() for name, m in members.items() if name != TOP)
        assert set(members) == {TOP, *made.contents.files}
        key = tar.extractfile(members[f"{TOP}/ibkr_rsa"])
        assert key is not None
        assert key.read() == made.cfg.sftp.key_file.read_bytes()
        assert stat.S_IMODE(members[f"{TOP}/ibkr_rsa"].mode) == 0o600
        secret = tar.extractfile(members[f"{TOP}/pgp-secret-keys.asc"])
        assert secret is not None
        assert b"BEGIN PGP PRIVATE KEY BLOCK" in secret.read()
        manifest_file = tar.extractfile(members[f"{TOP}/manifest.json"])
        assert manifest_file is not None
        manifest = json.loads(manifest_file.read())
    assert manifest["format_version"] == 1
    assert manifest["ssh_fingerprint"] == made.ssh_fpr
    assert manifest["pgp_fingerprints"] == list(made.contents.pgp_fingerprints)
    # Inside, the keys are still protected by their own passphrases.
    for secret_text in (PGP_PASSPHRASE, SSH_PASSPHRASE, BACKUP_PASSPHRASE):
        assert secret_text.encode() not in made.tar


def test_backup_never_overwrites(made: Made, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("out") / "keys-backup.gpg"
    out.write_bytes(b"precious")
    with pytest.raises(KeyProblem, match="already exists"):
        create_backup(
            made.cfg, out, backup_passphrase=BACKUP_PASSPHRASE, pgp_passphrase=PGP_PASSPHRASE
        )
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("pgp_passphrase", [None, "wrong"])
def test_backup_needs_the_pgp_passphrase(
    pgp_passphrase: str | None, made: Made, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("out")
    with pytest.raises(KeyProblem, match="PGP passphrase") as refused:
        create_backup(
            made.cfg,
            folder / "b.gpg",
            backup_passphrase=BACKUP_PASSPHRASE,
            pgp_passphrase=pgp_passphrase,
        )
    assert BACKUP_PASSPHRASE not in str(refused.value)
    assert list(folder.iterdir()) == []


def test_unprotected_pgp_key_without_ssh_key(
    new_project: Callable[[], Config],
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cfg = new_project()
    info = generate_pgp_key(
        cfg.pgp.gnupg_home, name="Ann", email="ann@example.com", bits=2048, passphrase=None
    )
    export_public_key(cfg.pgp.gnupg_home, info.fingerprint, cfg.pgp.public_key_file)
    out = tmp_path_factory.mktemp("out") / "b.gpg"
    made = create_backup(cfg, out, backup_passphrase=BACKUP_PASSPHRASE, pgp_passphrase=None)
    assert made.ssh_fingerprint is None
    assert made.pgp_fingerprints == (info.fingerprint,)

    target = new_project()
    restored = restore_backup(target, out, backup_passphrase=BACKUP_PASSPHRASE)
    assert restored.pgp_fingerprints == (info.fingerprint,)
    assert restored.ssh_fingerprint is None
    assert not target.sftp.key_file.exists()
    encrypt_to_project_and_decrypt(target, homes, tmp_path_factory.mktemp("rt"), None)


def test_nothing_to_back_up(
    new_project: Callable[[], Config], tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path_factory.mktemp("out") / "b.gpg"
    with pytest.raises(KeyProblem, match="Nothing to back up"):
        create_backup(new_project(), out, backup_passphrase=BACKUP_PASSPHRASE, pgp_passphrase=None)
    assert not out.exists()


def test_restore_refuses_a_project_with_an_ssh_key(
    made: Made, new_project: Callable[[], Config]
) -> None:
    target = new_project()
    write_ssh_key(target)
    before = snapshot(target.home)
    with pytest.raises(KeyProblem, match="already has an SSH key") as refused:
        restore_backup(target, made.backup, backup_passphrase=BACKUP_PASSPHRASE)
    assert "nothing was written" in (refused.value.hint or "")
    assert snapshot(target.home) == before
    assert not target.pgp.gnupg_home.exists()


def test_restore_refuses_a_project_with_a_pgp_secret_key(
    made: Made, pgp_source: tuple[Path, PgpKeyInfo], new_project: Callable[[], Config]
) -> None:
    target = new_project()
    shutil.copytree(pgp_source[0], target.pgp.gnupg_home, ignore=shutil.ignore_patterns("S.*"))
    secret_keys(target.pgp.gnupg_home)  # first use writes our gpg-agent.conf; snapshot after
    before = snapshot(target.home)
    with pytest.raises(KeyProblem, match="already has PGP secret keys"):
        restore_backup(target, made.backup, backup_passphrase=BACKUP_PASSPHRASE)
    assert snapshot(target.home) == before
    assert not target.sftp.key_file.exists()


def test_wrong_backup_passphrase(made: Made, new_project: Callable[[], Config]) -> None:
    target = new_project()
    before = snapshot(target.home)
    with pytest.raises(KeyProblem, match="wrong backup passphrase") as refused:
        restore_backup(target, made.backup, backup_passphrase="not the passphrase")
    assert "not the passphrase" not in str(refused.value)
    assert snapshot(target.home) == before


@pytest.mark.parametrize(
    "damage",
    [
        "flip-middle",
        "flip-last",
        "truncate-half",
        "truncate-tail",
        "garbage",
        "empty",
        "plain-literal-latin1-name",
    ],
)
def test_damaged_backup_refused(
    damage: str,
    made: Made,
    new_project: Callable[[], Config],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    copy = copy_of(made, tmp_path_factory)
    data = bytearray(copy.read_bytes())
    if damage == "flip-middle":
        data[len(data) // 2] ^= 0x01
    elif damage == "flip-last":
        data[-1] ^= 0x80
    elif damage == "truncate-half":
        data = data[: len(data) // 2]
    elif damage == "truncate-tail":
        data = data[:-10]
    elif damage == "garbage":
        data = bytearray(random.Random(damage).randbytes(len(data)))
    elif damage == "plain-literal-latin1-name":
        # Not encrypted at all: an OpenPGP literal packet whose file name is Latin-1, which
        # gpg prints as it is. Random garbage starting with byte 0xAC is such a packet; it
        # once crashed python-gnupg's UTF-8 reader of gpg's messages mid-restore.
        body = b"b" + bytes([4]) + "r\xe9su".encode("latin-1") + bytes(4) + b"not a backup"
        data = bytearray(bytes([0xAC, len(body)]) + body)
    else:
        data = bytearray()
    copy.write_bytes(bytes(data))
    target = new_project()
    before = snapshot(target.home)
    with pytest.raises(KeyProblem):
        restore_backup(target, copy, backup_passphrase=BACKUP_PASSPHRASE)
    assert snapshot(target.home) == before


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, b""


Entries = list[tuple[tarfile.TarInfo, bytes]]


def reseal(made: Made, change: Callable[[Entries], None], homes: list[Path], work: Path) -> Path:
    """The genuine backup's members, changed, sealed again with the right passphrase."""
    with tarfile.open(fileobj=io.BytesIO(made.tar)) as tar:
        entries: Entries = []
        for info in tar.getmembers():
            handle = tar.extractfile(info)
            entries.append((info, handle.read() if handle else b""))
    change(entries)
    (work / "evil.tar").write_bytes(_tar(entries))
    (work / "pass").write_text(BACKUP_PASSPHRASE)
    sealer = work / "g"
    sealer.mkdir(mode=0o700)
    homes.append(sealer)
    gpg(
        sealer,
        "--pinentry-mode",
        "loopback",
        "--passphrase-file",
        str(work / "pass"),
        "--no-symkey-cache",
        "--s2k-count",  # else gpg starts an agent only to ask it for a calibrated count
        "65011712",
        "--symmetric",
        "--cipher-algo",
        "AES256",
        "-o",
        str(work / "evil.gpg"),
        str(work / "evil.tar"),
    )
    return work / "evil.gpg"


def assert_refused_and_nothing_written(target: Config, backup: Path, why: str) -> None:
    before = snapshot(target.home)
    with pytest.raises(KeyProblem, match=why):
        restore_backup(target, backup, backup_passphrase=BACKUP_PASSPHRASE)
    assert snapshot(target.home) == before
    assert not (target.home.parent / "evil").exists()


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (_file("../evil"), "unsafe member name"),
        (_file(f"{TOP}/../../evil"), "unsafe member name"),
        (_file("/tmp/evil"), "unsafe member name"),
        (_file(f"{TOP}/authorized_keys"), "unexpected member"),
        (_file("ibkr_rsa"), "unexpected member"),
        (_file(f"{TOP}/ibkr_rsa.pub"), "appears twice"),
        (_link(f"{TOP}/ibkr_rsa", "/etc/passwd"), "link or special file"),
        (_link(f"{TOP}/known_hosts", "../../.ssh/known_hosts"), "link or special file"),
    ],
)
def test_restore_refuses_unexpected_members(
    entry: tuple[tarfile.TarInfo, bytes],
    why: str,
    made: Made,
    new_project: Callable[[], Config],
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    evil = reseal(made, lambda entries: entries.append(entry), homes, tmp_path_factory.mktemp("ev"))
    assert_refused_and_nothing_written(new_project(), evil, why)


def _drop(name: str) -> Callable[[Entries], None]:
    def change(entries: Entries) -> None:
        entries[:] = [(i, d) for i, d in entries if i.name != f"{TOP}/{name}"]

    return change


def _replace(name: str, data: bytes) -> Callable[[Entries], None]:
    def change(entries: Entries) -> None:
        entries[:] = [(i, data if i.name == f"{TOP}/{name}" else d) for i, d in entries]

    return change


OTHER_PUB = (
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_drop("pgp-secret-keys.asc"), "pgp-secret-keys.asc is missing"),
        (_drop("manifest.json"), "manifest.json is missing"),
        (_replace("manifest.json", b"{not json"), "not JSON"),
        (_replace("manifest.json", b'{"format": "other"}'), "does not describe a key backup"),
        (_replace("ibkr_rsa.pub", OTHER_PUB), "SSH public key does not match"),
        (_replace("ibkr_rsa", b"hello"), "not a private key file"),
        (_replace("pgp-ownertrust.txt", b"trust me\n"), "FINGERPRINT:LEVEL:"),
    ],
)
def test_restore_checks_contents_against_manifest(
    change: Callable[[Entries], None],
    why: str,
    made: Made,
    new_project: Callable[[], Config],
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    evil = reseal(made, change, homes, tmp_path_factory.mktemp("ev"))
    assert_refused_and_nothing_written(new_project(), evil, why)


def test_no_passphrase_in_any_argument_list(
    made: Made,
    new_project: Callable[[], Config],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    argvs: list[list[str]] = []
    real_popen = subprocess.Popen

    def recording_popen(args: Any, *rest: Any, **kwargs: Any) -> Any:
        argvs.append([str(a) for a in args])
        return real_popen(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    monkeypatch.setattr(gnupg, "Popen", recording_popen)
    out = tmp_path_factory.mktemp("out") / "b.gpg"
    create_backup(made.cfg, out, backup_passphrase=BACKUP_PASSPHRASE, pgp_passphrase=PGP_PASSPHRASE)
    restore_backup(new_project(), out, backup_passphrase=BACKUP_PASSPHRASE)
    assert any("--export-secret-key" in argv for argv in argvs)
    assert any("--import" in argv for argv in argvs)
    for argv in argvs:
        joined = " ".join(argv)
        for secret in (BACKUP_PASSPHRASE, PGP_PASSPHRASE):
            assert secret not in joined, argv
