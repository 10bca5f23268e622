"""The project's PGP key pair, against the real gpg binary in throw-away GnuPG homes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from statements.errors import KeyProblem, StatementsError
from statements.keys.pgp import (
    PgpKeyInfo,
    export_public_key,
    export_secret_keys,
    generate_pgp_key,
    open_gnupg,
    scan_public_key_file,
    secret_keys,
    stop_agent,
)

pytestmark = pytest.mark.integration

NAME = "Jane Doe"
EMAIL = "jane@example.com"
# Non-ASCII and spaces at both ends: gpg must see exactly these bytes (UTF-8), unchanged.
PASSPHRASE = " correct horse Ünïcode 42 "


def gpg(home: Path, *args: str, input: bytes | None = None) -> bytes:
    done = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
        input=input,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def colon_records(home: Path, *args: str) -> list[list[str]]:
    out = gpg(home, "--with-colons", "--fixed-list-mode", *args).decode()
    return [line.split(":") for line in out.splitlines()]


@pytest.fixture(scope="session")
def key_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, PgpKeyInfo]]:
    """One RSA-4096 key with a passphrase, made once: generation costs seconds."""
    home = tmp_path_factory.mktemp("pk") / "g"
    info = generate_pgp_key(home, name=NAME, email=EMAIL, passphrase=PASSPHRASE)
    yield home, info
    stop_agent(home)


@pytest.fixture
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """Short GnuPG home paths (agent sockets have a ~107-byte limit); agents stopped after."""
    made: list[Path] = []
    yield made
    for home in made:
        stop_agent(home)


def new_home(homes: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("h") / "g"
    homes.append(home)
    return home


def copy_home(src: Path, homes: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = new_home(homes, tmp_path_factory)
    # The sockets belong to the source's agent; the copy gets its own.
    shutil.copytree(src, home, ignore=shutil.ignore_patterns("S.*"))
    return home


def test_generated_key_is_rsa_sign_cert_with_encryption_subkey(
    key_home: tuple[Path, PgpKeyInfo],
) -> None:
    home, info = key_home
    assert info.algorithm == "RSA"
    assert info.bits == 4096
    assert info.has_encryption_subkey
    assert info.uids == (f"{NAME} <{EMAIL}>",)
    assert info.emails == (EMAIL,)
    assert info.expires is None
    assert abs(datetime.now(UTC) - info.created) < timedelta(hours=1)

    records = colon_records(home, "--list-secret-keys")
    fprs = [r[9] for r in records if r[0] == "fpr"]
    assert fprs[0] == info.fingerprint
    sec = next(r for r in records if r[0] == "sec")
    assert (sec[2], sec[3]) == ("4096", "1")  # bits, RSA
    assert set(sec[11]) & set("sce") == {"s", "c"}  # lower case: the primary key's own usage
    subs = [r for r in records if r[0] == "ssb"]
    assert len(subs) == 1
    assert (subs[0][2], subs[0][3], subs[0][11]) == ("4096", "1", "e")
    assert secret_keys(home) == [info]


def test_home_is_private_even_with_umask_000(
    homes: list[Path], tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing may depend on, or land in, the user's own ~/.gnupg.
    fake_home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.delenv("GNUPGHOME", raising=False)
    home = new_home(homes, tmp_path_factory)
    loose = new_home(homes, tmp_path_factory)
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    old = os.umask(0o000)
    try:
        open_gnupg(home)
        open_gnupg(loose)
        info = generate_pgp_key(
            home, name=NAME, email=EMAIL, bits=2048, passphrase=None, gpg_binary="gpg"
        )
    finally:
        os.umask(old)
    for folder in (home, loose):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "private-keys-v1.d").stat().st_mode) & 0o077 == 0
    conf = (home / "gpg-agent.conf").read_text().splitlines()
    assert "allow-loopback-pinentry" in conf
    assert not any("pinentry-program" in line for line in conf)
    assert list(fake_home.iterdir()) == []
    # passphrase=None asked for an unprotected key: it exports without any passphrase.
    assert "PRIVATE KEY BLOCK" in export_secret_keys(home, [info.fingerprint], None)


def test_agent_conf_keeps_other_settings(
    homes: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = new_home(homes, tmp_path_factory)
    home.mkdir(mode=0o700)
    (home / "gpg-agent.conf").write_text("default-cache-ttl 600\nenable-ssh-support\n")
    open_gnupg(home)
    lines = (home / "gpg-agent.conf").read_text().splitlines()
    assert "enable-ssh-support" in lines
    assert "default-cache-ttl 0" in lines
    assert "default-cache-ttl 600" not in lines


def test_second_key_for_same_email_needs_force(
    key_home: tuple[Path, PgpKeyInfo],
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = copy_home(key_home[0], homes, tmp_path_factory)
    old = key_home[1]
    with pytest.raises(KeyProblem) as refused:
        generate_pgp_key(home, name="Other", email="JANE@Example.COM", bits=2048, passphrase="x y")
    assert "--force" in (refused.value.hint or "")
    assert "the old one is kept" in (refused.value.hint or "")
    assert [k.fingerprint for k in secret_keys(home)] == [old.fingerprint]

    new = generate_pgp_key(
        home,
        name="Other",
        email="JANE@Example.COM",
        bits=2048,
        expire_days=30,
        passphrase="x y",
        force=True,
    )
    assert new.bits == 2048
    assert new.expires is not None
    assert timedelta(days=29) < new.expires - new.created <= timedelta(days=31)
    assert {k.fingerprint for k in secret_keys(home)} == {old.fingerprint, new.fingerprint}


@pytest.mark.parametrize("bits", [1024, 2047, 8192])
def test_unsupported_sizes_refused_before_touching_anything(
    bits: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("b") / "g"
    with pytest.raises(StatementsError, match=r"2048"):
        generate_pgp_key(home, name=NAME, email=EMAIL, bits=bits, passphrase=PASSPHRASE)
    assert not home.exists()


@pytest.mark.parametrize(
    ("name", "email", "passphrase"),
    [
        ("Jane\nPassphrase: x", EMAIL, "secret one"),
        (NAME, "jane@example.com\n%no-protection", "secret one"),
        (NAME, "not-an-email", "secret one"),
        ("", EMAIL, "secret one"),
        (NAME, EMAIL, "secret\none"),
        (NAME, EMAIL, ""),
    ],
)
def test_bad_input_refused_and_never_echoes_the_passphrase(
    name: str, email: str, passphrase: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("v") / "g"
    with pytest.raises(StatementsError) as refused:
        generate_pgp_key(home, name=name, email=email, bits=2048, passphrase=passphrase)
    if passphrase:
        assert passphrase not in str(refused.value)
    assert not home.exists()


def test_passphrase_never_stored_in_clear(
    key_home: tuple[Path, PgpKeyInfo], tmp_path_factory: pytest.TempPathFactory
) -> None:
    home, info = key_home
    public = tmp_path_factory.mktemp("pub") / "pgp-public.asc"
    export_public_key(home, info.fingerprint, public)
    needles = {PASSPHRASE.encode(), PASSPHRASE.strip().encode(), PASSPHRASE.encode("latin-1")}
    checked = 0
    for path in [public, *home.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            checked += 1
            for needle in needles:
                assert needle not in data, path
    assert checked >= 4


def test_public_key_round_trip_with_plain_gpg(
    key_home: tuple[Path, PgpKeyInfo],
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home, info = key_home
    work = tmp_path_factory.mktemp("rt")
    public = work / "pgp-public.asc"
    export_public_key(home, info.fingerprint, public)
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    text = public.read_text("ascii")
    assert "BEGIN PGP PUBLIC KEY BLOCK" in text
    assert "PRIVATE KEY" not in text
    assert [k.fingerprint for k in scan_public_key_file(home, public)] == [info.fingerprint]

    # IBKR's side: a separate gpg that knows only the public key.
    ibkr = new_home(homes, tmp_path_factory)
    ibkr.mkdir(mode=0o700)
    gpg(ibkr, "--import", str(public))
    plain = os.urandom(4096) + "Trade_History é\n".encode()
    (work / "report.xml").write_bytes(plain)
    gpg(
        ibkr,
        "--trust-model",
        "always",
        "--encrypt",
        "-r",
        info.fingerprint,
        "-o",
        str(work / "report.xml.pgp"),
        str(work / "report.xml"),
    )

    ours = open_gnupg(home)
    sealed = (work / "report.xml.pgp").read_bytes()
    result = ours.decrypt(sealed, passphrase=PASSPHRASE)
    assert result.ok, result.stderr
    assert result.data == plain
    # The agent caches nothing: a wrong or missing passphrase fails right after a good one.
    assert not ours.decrypt(sealed, passphrase=PASSPHRASE.strip()).ok
    assert not ours.decrypt(sealed).ok


def test_export_of_unknown_fingerprint_refused(
    key_home: tuple[Path, PgpKeyInfo], tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path_factory.mktemp("x") / "pgp-public.asc"
    with pytest.raises(KeyProblem, match="No PGP key"):
        export_public_key(key_home[0], "0" * 40, out)
    with pytest.raises(KeyProblem, match="fingerprint"):
        export_public_key(key_home[0], "not-hex", out)
    assert not out.exists()


def test_wrong_passphrase_cannot_export_secret_key(key_home: tuple[Path, PgpKeyInfo]) -> None:
    home, info = key_home
    for wrong in (None, "wrong"):
        with pytest.raises(KeyProblem, match="passphrase") as refused:
            export_secret_keys(home, [info.fingerprint], wrong)
        assert PASSPHRASE.strip() not in str(refused.value)
    assert "BEGIN PGP PRIVATE KEY BLOCK" in export_secret_keys(home, [info.fingerprint], PASSPHRASE)


def test_missing_gpg_binary(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("m") / "g"
    with pytest.raises(KeyProblem, match="gpg not found") as missing:
        open_gnupg(home, gpg_binary="/nonexistent/gpg")
    assert "apt-get install gnupg" in str(missing.value)
    assert missing.value.exit_code == 3
