"""Decrypting IBKR's files: the real gpg binary, throw-away GnuPG homes, files made as IBKR does.

Three parties, made once per session: "ours" (the project's key, with a passphrase, made by
``generate_pgp_key``), the "sender" (IBKR: holds our public key and signs with its own key) and a
"stranger" (a key pair that is neither). The sender's public key is in our home, as the user would
import IBKR's signing key; the stranger's is not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from statements.decrypt import (
    Decrypted,
    DecryptFailed,
    Decryptor,
    EarlyDecryption,
    _follow_plaintext,
    failure_kind,
    parse_status,
)
from statements.errors import ExitCode, KeyProblem
from statements.fsutil import Writeback
from statements.keys.pgp import generate_pgp_key, stop_agent
from tests.harness import cached_bytes, gpg_children

integration = pytest.mark.integration

# Non-ASCII and spaces at both ends: gpg must see exactly these bytes.
PASSPHRASE = " statement Ünïcode pass 7 "
PLAINTEXT = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<FlexQueryResponse queryName="Trade History">\n'
    + "".join(f'  <Trade id="{n}" symbol="ÄBC" qty="{n * 7}"/>\n' for n in range(2000))
    + "</FlexQueryResponse>\n"
).encode()


def gpg(home: Path, *args: str, input: bytes | None = None) -> bytes:
    done = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
        input=input,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def records(home: Path, *args: str) -> list[list[str]]:
    out = gpg(home, "--with-colons", "--fixed-list-mode", *args).decode()
    return [line.split(":") for line in out.splitlines()]


def fingerprint(home: Path, who: str) -> str:
    return next(r[9] for r in records(home, "--list-keys", who) if r[0] == "fpr")


def subkey_id(home: Path, who: str) -> str:
    return next(r[4] for r in records(home, "--list-keys", who) if r[0] == "sub")


def new_home(factory: pytest.TempPathFactory, made: list[Path]) -> Path:
    # Short paths: gpg-agent's socket lives in the home and a socket path has ~107 bytes.
    home = factory.mktemp("h") / "g"
    home.mkdir(mode=0o700)
    made.append(home)
    return home


def make_key(
    home: Path, uid: str, *, encrypt: bool, expire: str = "never", extra: tuple[str, ...] = ()
) -> str:
    """An RSA-2048 key pair without passphrase (the sender's and stranger's: speed, not secrecy)."""
    nopass = ["--pinentry-mode", "loopback", "--passphrase", "", *extra]
    gpg(home, *nopass, "--quick-gen-key", uid, "rsa2048", "cert,sign", expire)
    fpr = fingerprint(home, uid)
    if encrypt:
        gpg(home, *nopass, "--quick-add-key", fpr, "rsa2048", "encr", expire)
    return fpr


def copy_keys(src: Path, dst: Path, who: str) -> None:
    gpg(dst, "--import", input=gpg(src, "--armor", "--export", who))


@dataclass(frozen=True)
class World:
    ours: Path
    our_fpr: str
    our_subkey: str
    sender: Path
    sender_fpr: str
    stranger: Path
    stranger_fpr: str
    stranger_subkey: str
    plain: Path


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    made: list[Path] = []
    ours = tmp_path_factory.mktemp("h") / "g"
    made.append(ours)
    try:
        info = generate_pgp_key(
            ours, name="Our Firm", email="ours@example.com", bits=2048, passphrase=PASSPHRASE
        )
        sender = new_home(tmp_path_factory, made)
        sender_fpr = make_key(sender, "IBKR Sender <sender@example.com>", encrypt=False)
        stranger = new_home(tmp_path_factory, made)
        stranger_fpr = make_key(stranger, "Stranger <stranger@example.com>", encrypt=True)
        copy_keys(ours, sender, info.fingerprint)
        copy_keys(stranger, sender, stranger_fpr)
        copy_keys(ours, stranger, info.fingerprint)
        copy_keys(sender, ours, sender_fpr)  # the user imported IBKR's signing key
        plain = tmp_path_factory.mktemp("plain") / "U1234567.Trade_History.xml"
        plain.write_bytes(PLAINTEXT)
        yield World(
            ours=ours,
            our_fpr=info.fingerprint,
            our_subkey=subkey_id(ours, info.fingerprint),
            sender=sender,
            sender_fpr=sender_fpr,
            stranger=stranger,
            stranger_fpr=stranger_fpr,
            stranger_subkey=subkey_id(stranger, stranger_fpr),
            plain=plain,
        )
    finally:
        for home in made:
            stop_agent(home)


@pytest.fixture
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """Extra GnuPG homes for one test; their agents are stopped after it."""
    made: list[Path] = []
    yield made
    for home in made:
        stop_agent(home)


def encrypt(
    w: World, out: Path, *opts: str, home: Path | None = None, to: tuple[str, ...] = ()
) -> Path:
    """Encrypt the sample as a sender does: gpg --batch --trust-model always -r FPR --encrypt."""
    recipients = [arg for fpr in (to or (w.our_fpr,)) for arg in ("-r", fpr)]
    gpg(
        home or w.sender,
        "--trust-model",
        "always",
        *recipients,
        *opts,
        "-o",
        str(out),
        "--encrypt",
        str(w.plain),
    )
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def decryptor(
    w: World, *, passphrase: str | None = PASSPHRASE, signer_fingerprints: tuple[str, ...] = ()
) -> Decryptor:
    return Decryptor(w.ours, passphrase=passphrase, signer_fingerprints=signer_fingerprints)


def refused(
    dec: Decryptor, source: Path, out_dir: Path, kind: str | tuple[str, ...]
) -> DecryptFailed:
    """Decrypting must fail with ``kind`` and leave nothing in ``out_dir``."""
    with pytest.raises(DecryptFailed) as caught:
        dec.decrypt(source, out_dir / "plain.xml")
    exc = caught.value
    assert exc.kind in ((kind,) if isinstance(kind, str) else kind), (exc.kind, str(exc))
    assert exc.exit_code == ExitCode.PARTIAL
    assert list(out_dir.iterdir()) == []  # neither the output nor a temporary file
    assert exc.hint
    for text in (str(exc), *exc.status_lines):
        assert PASSPHRASE not in text
    return exc


# --- successful decryption -------------------------------------------------------------------


@integration
@pytest.mark.parametrize("armor", [False, True], ids=["binary", "armor"])
@pytest.mark.parametrize("compress", [True, False], ids=["zip", "nocompress"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_round_trip(
    world: World, tmp_path: Path, out_dir: Path, armor: bool, compress: bool, signed: bool
) -> None:
    opts = [
        *(["--armor"] if armor else []),
        *([] if compress else ["--compress-algo", "none"]),
        *(["--sign", "--local-user", world.sender_fpr] if signed else []),
    ]
    source = encrypt(world, tmp_path / "f.xml.pgp", *opts)
    assert (source.read_bytes()[:5] == b"-----") == armor

    result = decryptor(world).decrypt(source, out_dir / "plain.xml")

    assert isinstance(result, Decrypted)
    assert result.output == out_dir / "plain.xml"
    assert sha256(result.output) == sha256(world.plain)
    # The digest the archive records is of the bytes on disk, hashed as gpg wrote them.
    assert (result.sha256, result.size) == (sha256(world.plain), world.plain.stat().st_size)
    assert stat.S_IMODE(result.output.stat().st_mode) == 0o600  # a statement is private
    assert list(out_dir.iterdir()) == [result.output]  # no temporary file left
    assert result.integrity == "mdc"
    assert result.recipients == (world.our_subkey,)
    if signed:
        assert (result.signature, result.signer_fingerprint) == ("good", world.sender_fpr)
    else:
        assert (result.signature, result.signer_fingerprint) == ("none", None)
    assert "[GNUPG:] DECRYPTION_OKAY" in result.status_lines
    assert all(line.startswith("[GNUPG:] ") for line in result.status_lines)
    assert not any(PASSPHRASE in line for line in result.status_lines)


@integration
def test_replaces_existing_output(world: World, tmp_path: Path, out_dir: Path) -> None:
    source = encrypt(world, tmp_path / "f.pgp")
    (out_dir / "plain.xml").write_bytes(b"an older, half-written attempt")
    decryptor(world).decrypt(source, out_dir / "plain.xml")
    assert sha256(out_dir / "plain.xml") == sha256(world.plain)


@integration
@pytest.mark.parametrize("name", ["-&0", "-&1"])
def test_a_file_named_like_a_descriptor_is_read_as_that_file(
    world: World, tmp_path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # gpg runs with --enable-special-filenames (its plaintext goes to "-&1"), where "-&N" on
    # its own means descriptor N: a report must reach gpg by a path that can never read so.
    encrypt(world, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    result = decryptor(world).decrypt(Path(name), out_dir / "plain.xml")
    assert (result.sha256, sha256(result.output)) == (sha256(world.plain), sha256(world.plain))


@integration
def test_encrypted_to_stranger_and_us(world: World, tmp_path: Path, out_dir: Path) -> None:
    source = encrypt(world, tmp_path / "f.pgp", to=(world.stranger_fpr, world.our_fpr))
    result = decryptor(world).decrypt(source, out_dir / "plain.xml")
    assert sha256(result.output) == sha256(world.plain)
    assert set(result.recipients) == {world.stranger_subkey, world.our_subkey}
    assert f"[GNUPG:] NO_SECKEY {world.stranger_subkey}" in result.status_lines


@integration
def test_does_not_depend_on_home(
    world: World, tmp_path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = encrypt(world, tmp_path / "f.pgp")
    nohome = tmp_path / "nohome"
    monkeypatch.setenv("GNUPGHOME", str(tmp_path / "not-this-one"))
    for home in (str(nohome), None):
        if home is None:
            monkeypatch.delenv("HOME")
        else:
            monkeypatch.setenv("HOME", home)
        stop_agent(world.ours)  # the next gpg call starts an agent with this environment
        target = out_dir / f"plain-{home is None}.xml"
        result = decryptor(world).decrypt(source, target)
        assert sha256(result.output) == sha256(world.plain)
    stop_agent(world.ours)
    assert not nohome.exists()
    assert not (tmp_path / "not-this-one").exists()


@integration
@pytest.mark.parametrize("way", ["decrypt", "while-it-downloads"])
def test_large_file_streams_with_bounded_memory_and_leaves_the_page_cache(
    world: World, tmp_path: Path, disk_folder: Path, way: str
) -> None:
    plain = tmp_path / "big.csv"
    digest = hashlib.sha256()
    with plain.open("wb") as handle:
        for _ in range(50):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            handle.write(chunk)
    source = tmp_path / "big.csv.pgp"
    gpg(
        world.sender,
        "--trust-model",
        "always",
        "-r",
        world.our_fpr,
        "--compress-algo",
        "none",
        "-o",
        str(source),
        "--encrypt",
        str(plain),
    )
    plain.unlink()
    assert source.stat().st_size >= 4 * Writeback.STEP  # several steps of writeback
    dec = decryptor(world)
    dec.preflight()  # gpg handle and key listing made before measuring

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if way == "decrypt":
        result: Decrypted | None = dec.decrypt(source, disk_folder / "big.csv")
    else:
        early = dec.start_early("big.csv.pgp", disk_folder)
        assert early is not None
        with source.open("rb") as handle:
            while piece := handle.read(255 * 1024):  # SFTP replies' size
                early.feed(piece)
        result = early.finish(source)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024

    assert result is not None
    # Gone from the page cache once written (Writeback as it grows, all of it once fsynced),
    # so an archive written once and seldom read does not push out what the user reads.
    # (Asked before anything reads the file.)
    assert cached_bytes(result.output) == 0
    assert sha256(result.output) == digest.hexdigest() == result.sha256
    assert grown_mib < 30, f"peak RSS grew by {grown_mib:.0f} MiB for a 50 MiB file"


def test_the_follower_hashes_all_a_slow_writer_wrote_including_after_its_last_look(
    tmp_path: Path,
) -> None:
    """A writer (standing in for gpg) that writes in bursts, pauses and writes its last burst
    right before it exits: the hash covers every byte, none twice, whatever the timing."""
    writer = (
        "import os, sys, time\n"
        "for i in range(40):\n"
        "    os.write(1, bytes([i]) * (i * 40_000 + 1))\n"
        "    time.sleep(0.003 if i % 7 else 0.02)\n"
        "os.write(1, b'last' * 300_000)\n"
    )
    expected = b"".join(bytes([i]) * (i * 40_000 + 1) for i in range(40)) + b"last" * 300_000
    fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        process = subprocess.Popen([sys.executable, "-c", writer], stdout=fd)
        digest = hashlib.sha256()
        hashed = _follow_plaintext(fd, process, digest)
        assert process.returncode == 0
    finally:
        os.close(fd)
    assert hashed == len(expected) == (tmp_path / "plain").stat().st_size
    assert digest.hexdigest() == hashlib.sha256(expected).hexdigest()


# --- the four errors a user must be able to tell apart ------------------------------------


@integration
def test_missing_gpg_binary(world: World, tmp_path: Path) -> None:
    dec = Decryptor(world.ours, passphrase=PASSPHRASE, gpg_binary="/nonexistent/gpg")
    with pytest.raises(KeyProblem, match="install GnuPG") as caught:
        dec.preflight()
    assert caught.value.exit_code == ExitCode.CONFIG
    # Without a preflight, the first file stops the run the same way (not one file's failure).
    with pytest.raises(KeyProblem):
        dec.decrypt(world.plain, tmp_path / "out.xml")


@integration
def test_home_without_secret_key(
    homes: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("h") / "g"  # absent: created 0700
    homes.append(home)
    dec = Decryptor(home, passphrase=PASSPHRASE)
    with pytest.raises(KeyProblem, match="no PGP secret key") as caught:
        dec.preflight()
    assert "ibkr-statements keys pgp" in str(caught.value)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert dec.held_fingerprints() == ()


@integration
def test_wrong_passphrase(world: World, tmp_path: Path, out_dir: Path) -> None:
    source = encrypt(world, tmp_path / "f.pgp")
    exc = refused(
        decryptor(world, passphrase="not the passphrase"), source, out_dir, "bad_passphrase"
    )
    assert "passphrase is wrong" in exc.message
    assert "IBKR_PGP_PASSPHRASE" in str(exc.hint)


@integration
def test_no_passphrase(world: World, tmp_path: Path, out_dir: Path) -> None:
    source = encrypt(world, tmp_path / "f.pgp")
    exc = refused(decryptor(world, passphrase=None), source, out_dir, "no_passphrase")
    assert "IBKR_PGP_PASSPHRASE" in str(exc.hint)


@integration
def test_no_passphrase_large_file_keeps_gpg_status(
    world: World, tmp_path: Path, out_dir: Path
) -> None:
    # gpg stops reading at once; python-gnupg's writer then hits a broken pipe. The status lines
    # must survive that, or the reason would be lost.
    plain = tmp_path / "big"
    plain.write_bytes(os.urandom(8 << 20))
    source = tmp_path / "big.pgp"
    gpg(
        world.sender,
        "--trust-model",
        "always",
        "-r",
        world.our_fpr,
        "--compress-algo",
        "none",
        "-o",
        str(source),
        "--encrypt",
        str(plain),
    )
    refused(decryptor(world, passphrase=None), source, out_dir, "no_passphrase")


@integration
def test_file_for_another_key(world: World, tmp_path: Path, out_dir: Path) -> None:
    source = encrypt(world, tmp_path / "f.pgp", to=(world.stranger_fpr,))
    dec = decryptor(world)
    exc = refused(dec, source, out_dir, "no_secret_key")
    assert world.stranger_subkey in exc.message  # what the file needs
    assert world.our_fpr in exc.message and world.our_subkey in exc.message  # what we hold
    assert "pgp-public.asc" in str(exc.hint) and "--retry-quarantine" in str(exc.hint)
    assert dec.held_fingerprints() == (world.our_fpr,)


def test_empty_or_multiline_passphrase_is_a_key_problem(tmp_path: Path) -> None:
    for bad in ("", "two\nlines"):
        with pytest.raises(KeyProblem, match="passphrase"):
            Decryptor(tmp_path, passphrase=bad)


def test_malformed_signer_fingerprint(tmp_path: Path) -> None:
    with pytest.raises(KeyProblem, match="signer_fingerprints"):
        Decryptor(tmp_path, passphrase=None, signer_fingerprints=("ABCD",))


# --- damaged, unprotected and foreign files ----------------------------------------------------


@integration
@pytest.mark.parametrize("armor", [False, True], ids=["binary", "armor"])
def test_truncated_file(world: World, tmp_path: Path, out_dir: Path, armor: bool) -> None:
    full = encrypt(
        world, tmp_path / "f.pgp", "--compress-algo", "none", *(["--armor"] if armor else [])
    )
    data = full.read_bytes()
    cut = tmp_path / "cut.pgp"
    cut.write_bytes(data[: len(data) * 2 // 3] + (b"\n" if armor else b""))
    # gpg has written most of the plaintext by the time it notices: none of it may remain.
    refused(decryptor(world), cut, out_dir, ("corrupt", "no_integrity"))


@integration
@pytest.mark.parametrize(
    "content",
    [
        b"-----BEGIN PGP MESSAGE-----\n\nhQEMA5UpKKgNHqBUAQf/garbage+garbage/x\n=abcd\n"
        b"-----END PGP MESSAGE-----\n",
        b"",
        b"<html><body>Service unavailable</body></html>\n",
        bytes(range(256)) * 20,
    ],
    ids=["garbage-armor", "empty", "html", "binary-noise"],
)
def test_not_a_pgp_message(world: World, tmp_path: Path, out_dir: Path, content: bytes) -> None:
    source = tmp_path / "f.pgp"
    source.write_bytes(content)
    refused(decryptor(world), source, out_dir, "corrupt")


@integration
def test_signed_but_not_encrypted_is_refused(world: World, tmp_path: Path, out_dir: Path) -> None:
    # gpg exits 0 and writes the content: without DECRYPTION_OKAY it is still not a decryption.
    source = tmp_path / "f.pgp"
    gpg(world.sender, "--sign", "-o", str(source), str(world.plain))
    refused(decryptor(world), source, out_dir, "corrupt")


@integration
def test_symmetric_file_with_our_passphrase_is_refused(
    world: World, tmp_path: Path, out_dir: Path
) -> None:
    # gpg would happily decrypt it with our key's passphrase: it was not encrypted to our key.
    source = tmp_path / "f.pgp"
    gpg(
        world.sender,
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        PASSPHRASE,
        "--symmetric",
        "-o",
        str(source),
        str(world.plain),
    )
    exc = refused(decryptor(world), source, out_dir, "corrupt")
    assert "not encrypted to a public key" in exc.message


@integration
@pytest.mark.parametrize("armor", [False, True], ids=["binary", "armor"])
def test_without_mdc_is_refused(world: World, tmp_path: Path, out_dir: Path, armor: bool) -> None:
    # gpg 2.2.40 still makes a message without MDC with --rfc2440 (a SED packet, tag 9).
    source = encrypt(world, tmp_path / "f.pgp", "--rfc2440", *(["--armor"] if armor else []))
    listing = subprocess.run(
        ["gpg", "--homedir", str(world.sender), "--batch", "--list-packets", str(source)],
        capture_output=True,
        check=False,
    ).stdout.decode()
    assert ":encrypted data packet:" in listing and "mdc_method" not in listing
    exc = refused(decryptor(world), source, out_dir, "no_integrity")
    assert "[GNUPG:] DECRYPTION_INFO 0 9 0" in exc.status_lines  # gpg wrote it all, then failed


@integration
def test_without_mdc_is_refused_even_when_gpg_accepts_it(
    world: World,
    tmp_path: Path,
    out_dir: Path,
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # With ignore-mdc-error in gpg.conf, gpg exits 0 and says DECRYPTION_OKAY.
    home = tmp_path_factory.mktemp("h") / "g"
    shutil.copytree(world.ours, home, ignore=shutil.ignore_patterns("S.*"))
    homes.append(home)
    (home / "gpg.conf").write_text("ignore-mdc-error\n")
    source = encrypt(world, tmp_path / "f.pgp", "--rfc2440")
    exc = refused(Decryptor(home, passphrase=PASSPHRASE), source, out_dir, "no_integrity")
    assert "[GNUPG:] DECRYPTION_OKAY" in exc.status_lines


# --- signatures ------------------------------------------------------------------------------


@integration
def test_required_signature_present(world: World, tmp_path: Path, out_dir: Path) -> None:
    source = encrypt(world, tmp_path / "f.pgp", "--sign", "--local-user", world.sender_fpr)
    # Fingerprints as people paste them: groups of four, lower case.
    spaced = " ".join(world.sender_fpr[i : i + 4].lower() for i in range(0, 40, 4))
    dec = decryptor(world, signer_fingerprints=(spaced,))
    dec.preflight()
    result = dec.decrypt(source, out_dir / "plain.xml")
    assert (result.signature, result.signer_fingerprint) == ("good", world.sender_fpr)


@integration
def test_required_signature_missing(world: World, tmp_path: Path, out_dir: Path) -> None:
    source = encrypt(world, tmp_path / "f.pgp")
    dec = decryptor(world, signer_fingerprints=(world.sender_fpr,))
    exc = refused(dec, source, out_dir, "signature_required")
    assert "not signed" in exc.message and world.sender_fpr in exc.message


@integration
def test_required_signer_but_signed_by_stranger(
    world: World, tmp_path: Path, out_dir: Path
) -> None:
    source = encrypt(world, tmp_path / "f.pgp", "--sign", home=world.stranger)
    dec = decryptor(world, signer_fingerprints=(world.sender_fpr,))
    exc = refused(dec, source, out_dir, "signature_required")
    assert world.stranger_fpr in exc.message  # whom we saw (from ERRSIG: key unknown here)


@integration
def test_required_signer_but_signed_by_known_stranger(
    world: World,
    tmp_path: Path,
    out_dir: Path,
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = tmp_path_factory.mktemp("h") / "g"
    shutil.copytree(world.ours, home, ignore=shutil.ignore_patterns("S.*"))
    homes.append(home)
    copy_keys(world.stranger, home, world.stranger_fpr)  # a good signature, by someone else
    source = encrypt(world, tmp_path / "f.pgp", "--sign", home=world.stranger)
    dec = Decryptor(home, passphrase=PASSPHRASE, signer_fingerprints=(world.sender_fpr,))
    exc = refused(dec, source, out_dir, "signature_required")
    assert f"signed by {world.stranger_fpr}." in exc.message
    assert Decryptor(home, passphrase=PASSPHRASE).decrypt(source, out_dir / "p").signature == "good"


@integration
def test_unknown_signer_not_required(world: World, tmp_path: Path, out_dir: Path) -> None:
    # gpg exits 2 (ERRSIG, NO_PUBKEY) after DECRYPTION_OKAY: reported, not a failure.
    source = encrypt(world, tmp_path / "f.pgp", "--sign", home=world.stranger)
    result = decryptor(world).decrypt(source, out_dir / "plain.xml")
    assert sha256(result.output) == sha256(world.plain)
    assert (result.signature, result.signer_fingerprint) == ("unverifiable", None)


@integration
@pytest.mark.parametrize("required", [False, True], ids=["optional", "required"])
def test_bad_signature(world: World, tmp_path: Path, out_dir: Path, required: bool) -> None:
    # A signed message altered after signing, then encrypted as is (--no-literal): the MDC is
    # fine, the signature is not. gpg 2.2.40 stops at BADSIG, before DECRYPTION_OKAY.
    signed = tmp_path / "signed"
    gpg(world.sender, "--compress-algo", "none", "--sign", "-o", str(signed), str(world.plain))
    data = bytearray(signed.read_bytes())
    data[data.index(b"Trade History")] ^= 0x20
    signed.write_bytes(bytes(data))
    source = tmp_path / "f.pgp"
    gpg(
        world.sender,
        "--trust-model",
        "always",
        "-r",
        world.our_fpr,
        "--no-literal",
        "--compress-algo",
        "none",
        "-o",
        str(source),
        "--encrypt",
        str(signed),
    )
    signers = (world.sender_fpr,) if required else ()
    exc = refused(decryptor(world, signer_fingerprints=signers), source, out_dir, "bad_signature")
    assert "BAD" in exc.message


@integration
def test_preflight_wants_the_signer_key(world: World) -> None:
    dec = decryptor(world, signer_fingerprints=(world.stranger_fpr,))
    with pytest.raises(KeyProblem, match=world.stranger_fpr):
        dec.preflight()


# --- our own key expired or revoked: gpg 2.2.40 decrypts, the policy refuses ---------------


@integration
def test_expired_key_is_refused_though_gpg_decrypts(
    world: World,
    tmp_path: Path,
    out_dir: Path,
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A key made 60 days ago that expired 58 days ago; the sender encrypted while it was valid.
    home = new_home(tmp_path_factory, homes)
    then = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() - 60 * 86400))
    later = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() - 59 * 86400))
    fpr = make_key(
        home,
        "Expired <exp@example.com>",
        encrypt=True,
        expire="2d",
        extra=("--faked-system-time", then),
    )
    sender = new_home(tmp_path_factory, homes)
    copy_keys(home, sender, fpr)
    source = encrypt(
        world, tmp_path / "f.pgp", "--faked-system-time", later, home=sender, to=(fpr,)
    )

    exc = refused(Decryptor(home, passphrase=None), source, out_dir, "key_expired")

    assert "[GNUPG:] DECRYPTION_OKAY" in exc.status_lines  # gpg itself decrypted it
    assert any(line.startswith("[GNUPG:] KEYEXPIRED ") for line in exc.status_lines)
    assert f"--quick-set-expire {fpr} 2y" in str(exc.hint)


@integration
@pytest.mark.parametrize("which", ["primary", "subkey"])
def test_revoked_key_is_refused_though_gpg_decrypts(
    world: World,
    tmp_path: Path,
    out_dir: Path,
    homes: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
    which: str,
) -> None:
    home = new_home(tmp_path_factory, homes)
    fpr = make_key(home, "Revoked <rev@example.com>", encrypt=True)
    copy_keys(home, world.sender, fpr)
    source = encrypt(world, tmp_path / "f.pgp", to=(fpr,))
    if which == "primary":
        cert = (home / "openpgp-revocs.d" / f"{fpr}.rev").read_text()
        gpg(home, "--import", input=cert.replace(":-----BEGIN", "-----BEGIN").encode())
    else:
        script = b"key 1\nrevkey\ny\n0\n\ny\nsave\n"
        gpg(
            home,
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--command-fd",
            "0",
            "--edit-key",
            fpr,
            input=script,
        )
    sub_validity = next(r[1] for r in records(home, "--list-keys", fpr) if r[0] == "sub")
    assert sub_validity == "r"

    exc = refused(Decryptor(home, passphrase=None), source, out_dir, "key_revoked")

    assert "[GNUPG:] DECRYPTION_OKAY" in exc.status_lines  # gpg itself decrypted it
    assert not any("KEYREVOKED" in line for line in exc.status_lines)  # and said nothing


# --- the status-line rules, on lines recorded from gpg 2.2.40 ----------------------------------

OK_LINES = [
    "[GNUPG:] ENC_TO 952928A80D1EA054 1 0",
    "[GNUPG:] DECRYPTION_KEY 001A08639BE2E9F90FEA9C70952928A80D1EA054 "
    "0E0E4E72759EADB5AEE3A8209F3857D774F35E3B u",
    "[GNUPG:] BEGIN_DECRYPTION",
    "[GNUPG:] DECRYPTION_INFO 2 9 0",
    "[GNUPG:] PLAINTEXT 62 1795237974 plain.txt",
    "[GNUPG:] PLAINTEXT_LENGTH 22",
    "[GNUPG:] DECRYPTION_OKAY",
    "[GNUPG:] GOODMDC",
    "[GNUPG:] END_DECRYPTION",
]


def kind_of(lines: list[str], rc: int = 0, size: int | None = 22, pw: bool = True) -> str | None:
    return failure_kind(parse_status(lines), rc, passphrase_given=pw, output_size=size)


def test_rules_accept_a_proven_decryption() -> None:
    assert kind_of(OK_LINES) is None
    st = parse_status(OK_LINES)
    assert (st.integrity(), st.recipients, st.signature()) == (
        "mdc",
        ["952928A80D1EA054"],
        ("none", None),
    )


def test_rules_refuse_no_mdc_even_when_gpg_says_okay() -> None:
    # What gpg 2.2.40 prints with --ignore-mdc-error: exit 0, DECRYPTION_OKAY, mdc_method 0.
    lines = [line.replace("DECRYPTION_INFO 2 9 0", "DECRYPTION_INFO 0 9 0") for line in OK_LINES]
    assert kind_of([line for line in lines if "GOODMDC" not in line]) == "no_integrity"
    assert kind_of([line for line in OK_LINES if "DECRYPTION_INFO" not in line]) == "no_integrity"
    aead = [line.replace("DECRYPTION_INFO 2 9 0", "DECRYPTION_INFO 0 9 2") for line in OK_LINES]
    assert kind_of(aead) is None and parse_status(aead).integrity() == "aead"


def test_rules_trust_neither_ok_nor_exit_status_alone() -> None:
    assert kind_of(OK_LINES, rc=2) == "gpg_error"
    assert kind_of(OK_LINES, rc=None) == "gpg_error"  # type: ignore[arg-type]
    assert kind_of([line for line in OK_LINES if "OKAY" not in line]) == "gpg_error"
    assert kind_of([*OK_LINES, "[GNUPG:] BADMDC"]) == "corrupt"
    assert kind_of(OK_LINES, size=None) == "no_output"
    assert kind_of(OK_LINES, size=21) == "no_output"
    assert kind_of([line for line in OK_LINES if "ENC_TO" not in line]) == "corrupt"


def test_rules_passphrase_kinds() -> None:
    wrong = [
        OK_LINES[0],
        "[GNUPG:] ERROR pkdecrypt_failed 67108875",
        "[GNUPG:] BEGIN_DECRYPTION",
        "[GNUPG:] DECRYPTION_FAILED",
        "[GNUPG:] END_DECRYPTION",
    ]
    assert kind_of(wrong, rc=2) == "bad_passphrase"
    assert kind_of([OK_LINES[0], "[GNUPG:] BAD_PASSPHRASE 952928A80D1EA054"], rc=2) == (
        "bad_passphrase"
    )
    none = [
        OK_LINES[0],
        "[GNUPG:] NEED_PASSPHRASE 952928A80D1EA054 9F3857D774F35E3B 1 0",
        "[GNUPG:] INQUIRE_MAXLEN 100",
    ]
    assert kind_of(none, rc=2, pw=False) == "no_passphrase"
    assert kind_of([OK_LINES[0], "[GNUPG:] MISSING_PASSPHRASE"], rc=2) == "no_passphrase"


def test_rules_expired_or_revoked_only_when_gpg_refuses() -> None:
    refusal = [OK_LINES[0], "[GNUPG:] BEGIN_DECRYPTION", "[GNUPG:] DECRYPTION_FAILED"]
    assert kind_of([*refusal, "[GNUPG:] KEYEXPIRED 1790985600"], rc=2) == "key_expired"
    assert kind_of([*refusal, "[GNUPG:] KEYREVOKED"], rc=2) == "key_revoked"
    # gpg 2.2.40: KEYEXPIRED lines, and the decryption succeeds.
    assert kind_of(["[GNUPG:] KEYEXPIRED 1790985600", *OK_LINES]) is None
    # A damaged file for an expired key is damaged: the session key was recovered.
    damaged = [
        *OK_LINES[:4],
        "[GNUPG:] KEYEXPIRED 1790985600",
        "[GNUPG:] BADMDC",
        "[GNUPG:] DECRYPTION_FAILED",
    ]
    assert kind_of(damaged, rc=2) == "corrupt"


def test_rules_signatures() -> None:
    sig = OK_LINES[:6]
    tail = OK_LINES[6:]
    validsig = (
        "[GNUPG:] VALIDSIG AAAA000000000000000000000000000000000001 2026-11-21 1 0 4 0 1 "
        "10 00 BBBB000000000000000000000000000000000002"
    )
    good = [*sig, "[GNUPG:] NEWSIG", "[GNUPG:] GOODSIG 0000000000000001 S <s@x>", validsig, *tail]
    assert parse_status(good).signature() == ("good", "BBBB000000000000000000000000000000000002")
    short = [line if line != validsig else " ".join(validsig.split()[:4]) for line in good]
    assert parse_status(short).signature()[1] == "AAAA000000000000000000000000000000000001"
    errsig = [
        *sig,
        "[GNUPG:] NEWSIG",
        "[GNUPG:] ERRSIG AC2DC8C4D2473664 1 10 00 1795237983 9 "
        "8BDE4B1CC51B6BDD1C00B8BBAC2DC8C4D2473664",
        "[GNUPG:] NO_PUBKEY AC2DC8C4D2473664",
        *tail,
    ]
    assert kind_of(errsig, rc=2) is None  # exit 2 is explained by the signature
    assert parse_status(errsig).signature() == ("unverifiable", None)
    assert kind_of([*errsig[:-3], "[GNUPG:] ERROR some_failure 1", *errsig[-3:]], rc=2) == (
        "gpg_error"
    )
    expkey = [*sig, "[GNUPG:] NEWSIG", "[GNUPG:] EXPKEYSIG 0000000000000001 S", validsig, *tail]
    assert parse_status(expkey).signature() == ("unverifiable", None)
    # A bad signature after a confirmed decryption (not what gpg 2.2 does: it stops first).
    bad = [*sig, "[GNUPG:] NEWSIG", "[GNUPG:] BADSIG 0000000000000001 S", *tail]
    assert kind_of(bad, rc=1) is None and parse_status(bad).signature() == ("bad", None)
    aborted = [
        *sig,
        "[GNUPG:] NEWSIG",
        "[GNUPG:] BADSIG 0000000000000001 S",
        "[GNUPG:] FAILURE gpg-exit 33554433",
    ]
    assert kind_of(aborted, rc=1) == "bad_signature"


# --- lanes: several files at once, each lane with its own gpg-agent ------------------------


def agents_serving(folder: Path, *, wait_gone_s: float = 0.0) -> list[str]:
    """Command lines of running gpg-agents whose home is inside ``folder``.

    With ``wait_gone_s``, look again until there are none or the time is up: an agent told to
    stop by gpgconf exits a moment later.
    """
    deadline = time.monotonic() + wait_gone_s
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            line = " ".join(a.decode(errors="replace") for a in argv)
            if "gpg-agent" in line and str(folder) in line:
                found.append(f"{proc.name}: {line}")  # the pid tells a new agent from an old
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


@integration
def test_lanes_decrypt_at_once_share_the_keys_and_leave_nothing(
    world: World, tmp_path: Path, out_dir: Path
) -> None:
    lanes = tmp_path / "lanes"
    sources = [encrypt(world, tmp_path / f"f{i}.xml.pgp") for i in range(9)]
    dec = Decryptor(world.ours, passphrase=PASSPHRASE, lanes=3, lane_folder=lanes)
    dec.preflight()
    start = threading.Barrier(3)

    def one(source: Path) -> Decrypted:
        if source.name in {"f0.xml.pgp", "f1.xml.pgp", "f2.xml.pgp"}:
            start.wait(timeout=30)  # three at once: the home is busy, so lanes are made
        return dec.decrypt(source, out_dir / source.name.removesuffix(".pgp"))

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, sources))

    assert [sha256(r.output) for r in results] == [sha256(world.plain)] * 9
    made = sorted(p.name for p in lanes.iterdir())
    assert made and len(made) <= 2, made  # the home plus at most two lanes
    for name in made:
        lane = lanes / name
        assert stat.S_IMODE(lane.stat().st_mode) == 0o700
        # The secret keys exist once: the lane points at the home's, it holds no copy.
        keys = lane / "private-keys-v1.d"
        assert keys.is_symlink() and keys.resolve() == (world.ours / "private-keys-v1.d").resolve()
    assert agents_serving(lanes), "each lane has an agent of its own"

    dec.close()
    assert not any(lanes.iterdir())
    assert agents_serving(lanes, wait_gone_s=10) == []
    assert (world.ours / "private-keys-v1.d").is_dir() and any(
        (world.ours / "private-keys-v1.d").iterdir()
    ), "closing a lane must never touch the home's keys"
    # Still usable after close, on the home alone.
    assert sha256(dec.decrypt(sources[0], out_dir / "again.xml").output) == sha256(world.plain)


@integration
def test_a_file_a_lane_refuses_is_decided_by_the_home(
    world: World, tmp_path: Path, out_dir: Path
) -> None:
    lanes = tmp_path / "lanes"
    first, second = (encrypt(world, tmp_path / f"{n}.xml.pgp") for n in ("a", "b"))
    with Decryptor(world.ours, passphrase=PASSPHRASE, lanes=2, lane_folder=lanes) as dec:
        dec.preflight()
        # Keep the home busy, so the first file is decrypted in a new lane.
        home = dec._take(home_only=True)
        dec.decrypt(first, out_dir / "a.xml")
        (lane,) = lanes.iterdir()
        # Break the lane as a dying agent or a vanished key folder would.
        (lane / "private-keys-v1.d").unlink()
        stop_agent(lane)
        dec._give_back(*home)

        result = dec.decrypt(second, out_dir / "b.xml")  # tried in the lane first, then home

    assert sha256(result.output) == sha256(world.plain)
    assert not lanes.exists() or not any(lanes.iterdir())


@integration
def test_without_a_usable_lane_folder_files_still_decrypt(
    world: World, tmp_path: Path, out_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the lanes would go")
    sources = [encrypt(world, tmp_path / f"f{i}.xml.pgp") for i in range(4)]
    caplog.set_level(logging.INFO, logger="statements")
    dec = Decryptor(world.ours, passphrase=PASSPHRASE, lanes=4, lane_folder=blocked / "x")
    start = threading.Barrier(4)

    def one(source: Path) -> Path:
        start.wait(timeout=30)  # all at once: the home is busy, so a lane is asked for
        return dec.decrypt(source, out_dir / source.stem).output

    with dec, ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(one, sources))
    assert [sha256(o) for o in outputs] == [sha256(world.plain)] * 4
    assert "without an extra gpg-agent" in caplog.text
    assert blocked.read_text() == "a file where the lanes would go"


def decrypt_at_once(dec: Decryptor, sources: list[Path], out_dir: Path) -> list[Path]:
    """Decrypt ``sources`` on as many threads, all starting together (so lanes are made)."""
    start = threading.Barrier(len(sources))

    def one(source: Path) -> Path:
        start.wait(timeout=30)
        return dec.decrypt(source, out_dir / source.stem).output

    with ThreadPoolExecutor(len(sources)) as pool:
        return list(pool.map(one, sources))


@pytest.fixture
def temp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder the decryptor sees, empty; short, as a socket path must be."""
    folder = Path(tempfile.mkdtemp(prefix="t", dir=tmp_path_factory.getbasetemp()))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@integration
def test_lanes_default_to_a_private_folder_per_home_removed_at_close(
    world: World, tmp_path: Path, out_dir: Path, temp: Path
) -> None:
    sources = [encrypt(world, tmp_path / f"f{i}.xml.pgp") for i in range(2)]
    dec = Decryptor(world.ours, passphrase=PASSPHRASE, lanes=2)
    dec.preflight()
    outputs = decrypt_at_once(dec, sources, out_dir)
    assert [sha256(o) for o in outputs] == [sha256(world.plain)] * 2
    (base,) = temp.iterdir()
    assert base.name == f"ibkr-statements-gpg-{os.getuid()}"
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    (folder,) = base.iterdir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert (folder / "home").read_text() == str(world.ours)
    assert agents_serving(folder)
    dec.close()
    assert list(base.iterdir()) == []
    assert agents_serving(folder, wait_gone_s=10) == []


@integration
def test_the_next_run_stops_the_lanes_a_killed_run_left(
    world: World, tmp_path: Path, out_dir: Path, temp: Path, homes: list[Path]
) -> None:
    sources = [encrypt(world, tmp_path / f"f{i}.xml.pgp") for i in range(2)]
    killed = Decryptor(world.ours, passphrase=PASSPHRASE, lanes=2)
    decrypt_at_once(killed, sources, out_dir)  # and never closed, as after a SIGKILL
    (base,) = temp.iterdir()
    (left,) = base.iterdir()
    assert agents_serving(left)
    # A lane folder of a GnuPG home that was deleted since: its agent too.
    gone = tmp_path / "deleted-home"
    shutil.copytree(world.ours, gone, ignore=shutil.ignore_patterns("S.*"))
    homes.append(gone)
    other = Decryptor(gone, passphrase=PASSPHRASE, lanes=2)
    decrypt_at_once(other, sources, out_dir)
    orphan = next(f for f in base.iterdir() if f != left)
    shutil.rmtree(gone)

    again = Decryptor(world.ours, passphrase=PASSPHRASE, lanes=2)
    old_agents = set(agents_serving(left))
    with again:
        decrypt_at_once(again, sources, out_dir)
        assert not orphan.exists()
        assert agents_serving(orphan, wait_gone_s=10) == []
        deadline = time.monotonic() + 10
        while set(agents_serving(left)) & old_agents and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(agents_serving(left)) & old_agents, "the killed run's agent was stopped"
        assert agents_serving(left), "and the new run's lane has its own"
    assert agents_serving(left, wait_gone_s=10) == []


@integration
def test_a_lane_folder_that_is_not_private_is_not_used(
    world: World, tmp_path: Path, out_dir: Path, temp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = temp / f"ibkr-statements-gpg-{os.getuid()}"
    base.mkdir(mode=0o755)
    base.chmod(0o755)  # as if another program, or another user, made it open
    sources = [encrypt(world, tmp_path / f"f{i}.xml.pgp") for i in range(2)]
    with Decryptor(world.ours, passphrase=PASSPHRASE, lanes=2) as dec:
        outputs = decrypt_at_once(dec, sources, out_dir)
    assert [sha256(o) for o in outputs] == [sha256(world.plain)] * 2
    assert "is not a private folder" in caplog.text
    assert list(base.iterdir()) == []


@integration
def test_a_lane_folder_too_deep_for_a_socket_is_not_used(
    world: World, tmp_path: Path, out_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="statements")
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    sources = [encrypt(world, tmp_path / f"f{i}.xml.pgp") for i in range(2)]
    dec = Decryptor(world.ours, passphrase=PASSPHRASE, lanes=2, lane_folder=deep)
    start = threading.Barrier(2)

    def one(source: Path) -> Path:
        start.wait(timeout=30)
        return dec.decrypt(source, out_dir / source.stem).output

    with dec, ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(one, sources))
    assert [sha256(o) for o in outputs] == [sha256(world.plain)] * 2
    assert "too long for a socket" in caplog.text
    assert not deep.exists()


# --- decrypting while the file arrives (EarlyDecryption) -------------------------------------


def feed_in_pieces(dec: Decryptor, data: bytes, folder: Path) -> EarlyDecryption:
    early = dec.start_early("f.pgp", folder)
    assert early is not None
    rng = random.Random(len(data))
    at = 0
    while at < len(data):  # odd sizes, as SFTP replies come: 1 byte to 300 KiB
        size = rng.choice((1, 7, 4096, 32768, 300_000))
        early.feed(data[at : at + size])
        at += size
    return early


@integration
@pytest.mark.parametrize(
    "case", ["good", "signed-required", "stranger", "truncated", "no-mdc", "not-pgp"]
)
def test_early_decryption_gives_what_decrypt_gives_or_nothing(
    world: World, tmp_path: Path, out_dir: Path, case: str
) -> None:
    """Whatever the file, the early result is the usual one, or None where decrypt refuses."""
    opts: dict[str, tuple[str, ...]] = {"no-mdc": ("--rfc2440",), "signed-required": ("--sign",)}
    to = (world.stranger_fpr,) if case == "stranger" else ()
    source = encrypt(world, tmp_path / "f.pgp", *opts.get(case, ()), to=to)
    if case == "truncated":
        source.write_bytes(source.read_bytes()[:-200])
    elif case == "not-pgp":
        source.write_bytes(b"<html>Service unavailable</html>\n" * 1000)
    signers = (world.sender_fpr,) if case == "signed-required" else ()
    dec = decryptor(world, signer_fingerprints=signers)
    early_folder = tmp_path / "early"
    early_folder.mkdir()

    early = feed_in_pieces(dec, source.read_bytes(), early_folder).finish(source)
    try:
        usual: Decrypted | None = dec.decrypt(source, out_dir / "plain.xml")
    except DecryptFailed:
        usual = None

    assert (early is None) == (usual is None) == (case not in ("good", "signed-required"))
    if early is not None and usual is not None:
        assert early.output.read_bytes() == PLAINTEXT == usual.output.read_bytes()
        assert (early.sha256, early.size, early.signature, early.signer_fingerprint) == (
            usual.sha256,
            usual.size,
            usual.signature,
            usual.signer_fingerprint,
        )
        assert stat.S_IMODE(early.output.stat().st_mode) == 0o600
        early.output.unlink()
    assert list(early_folder.iterdir()) == []  # a refused early plaintext is deleted
    assert gpg_children() == []


@integration
def test_an_abandoned_early_decryption_leaves_no_gpg_and_no_file(
    world: World, tmp_path: Path
) -> None:
    data = encrypt(world, tmp_path / "f.pgp").read_bytes()
    early = feed_in_pieces(decryptor(world), data[: len(data) // 2], tmp_path)
    early.abandon()
    assert [p.name for p in tmp_path.iterdir()] == ["f.pgp"]
    assert gpg_children() == []


@integration
def test_a_gpg_that_stops_reading_never_stalls_the_download(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A gpg that answers --version (python-gnupg asks) but reads nothing when decrypting,
    # as one waiting forever on a stuck agent would.
    wrapper = tmp_path / "gpg"
    wrapper.write_text(
        '#!/bin/sh\ncase " $* " in *" --decrypt "*) exec sleep 60;; esac\nexec gpg "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setattr(EarlyDecryption, "FEED_STALL_S", 0.5)
    dec = Decryptor(world.ours, passphrase=PASSPHRASE, gpg_binary=str(wrapper))
    folder = tmp_path / "early"
    folder.mkdir()
    early = dec.start_early("f.pgp", folder)
    assert early is not None
    started = time.monotonic()
    for _ in range(64):  # 8 MiB, far more than a pipe holds
        early.feed(b"x" * (128 << 10))
    assert time.monotonic() - started < 5
    assert early.failed == "gpg read nothing for 0.5 s"
    assert early.finish(tmp_path / "f.pgp") is None
    assert list(folder.iterdir()) == []


@integration
def test_a_decryption_whose_stderr_reader_cannot_start_leaves_no_gpg_no_file_no_pipe(
    world: World, tmp_path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At a thread limit the decryption cannot go on; it must not leave a gpg waiting for its
    # passphrase, a temporary file, or a pipe behind.
    source = encrypt(world, tmp_path / "f.pgp")
    dec = decryptor(world)
    dec.preflight()
    start = threading.Thread.start

    def refusing(self: threading.Thread) -> None:
        if self.name == "gpg-stderr":
            raise RuntimeError("can't start new thread")
        start(self)

    fds = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(threading.Thread, "start", refusing)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        dec.decrypt(source, out_dir / "plain.xml")
    monkeypatch.undo()
    assert list(out_dir.iterdir()) == []
    assert gpg_children() == []
    assert set(os.listdir("/proc/self/fd")) == fds
