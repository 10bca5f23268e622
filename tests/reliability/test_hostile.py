"""Hostile input, end to end and fuzzed.

A server that sends names no file system holds, bundles built to escape or explode, configuration
files with every wrong type, host keys that are unknown, changed or of another type; and the
parsers of all that untrusted text fed generated input. The command line runs for real (the
console script in a subprocess) against the in-process sandbox server or the real sshd.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import io
import os
import re
import sqlite3
import stat
import tempfile
import types
import unicodedata
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import paramiko
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from statements.archive import (
    UnpackLimits,
    UnpackRefused,
    destination,
    parse_report_name,
    place,
    sha256_file,
    unpack,
)
from statements.config import Config
from statements.config import load as load_config
from statements.errors import ConfigError, ExitCode, KeyProblem
from statements.hostkeys import HostKey, KnownHosts, host_field, parse_known_hosts
from statements.keys.ppk import ppk_is_encrypted, read_ppk
from statements.pipeline import inbox_name_for
from statements.remote import RemoteFile, name_problem, printable
from statements.sandbox import SandboxServer, generate_ed25519_key
from tests.clitools import Project
from tests.harness import Sender, archive_tree, assert_consistent, make_sender, point_at, set_option
from tests.harness import sha as sha_of
from tests.harness import sshd_project as pointed_at_sshd
from tests.sshd import SshdServer

# Tests that run the console script, gpg or sshd; the fuzz and config-model tests are offline.
integration = pytest.mark.integration

USER = "ibkr"
_T = TypeVar("_T")
# pytest's record_property fixture: (name, value) into the report (tests/reliability/conftest.py).
RecordProperty = Callable[[str, object], None]
GOOD_REPORTS = {
    "U1234567.Trade_History.20260901.20260901.xml": b"<FlexQueryResponse/>\n" * 200,
    "U1234567.Activity.20260901.20260930.xml": b"<FlexQueryResponse queryName='A'/>\n" * 300,
}


# --- fixtures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """A copy of the keyed project pointed at a sandbox server that serves ``folder``."""

    project: Project
    server: SandboxServer
    folder: Path

    @property
    def archive(self) -> Path:
        return self.project.root / "archive"


@pytest.fixture
def served(keyed_project: Project, tmp_path: Path) -> Iterator[Served]:
    project = keyed_project.copy_to(tmp_path / "p")
    folder = tmp_path / "served"
    folder.mkdir()
    public = (project.keys / "ibkr_rsa.pub").read_text()
    with SandboxServer(folder, authorized_keys=[public], username=USER) as server:
        point_at(project, host=server.host, port=server.port, username=USER, remote_dir=".")
        # Short waits: a refusal must be immediate, and nothing here should need a retry.
        set_option(project, "timeout_s = 30 ", "timeout_s = 10 ")
        set_option(project, "retry_backoff_s = 2.0", "retry_backoff_s = 0.1")
        (project.keys / "known_hosts").write_text(server.host_key_line() + "\n")
        yield Served(project, server, folder)
    project.stop_agent()


@pytest.fixture
def sender(served: Served, tmp_path: Path) -> Iterator[Sender]:
    """Encrypts like IBKR, to the served project's public key."""
    made = make_sender(tmp_path, served.project.keys / "pgp-public.asc")
    yield made
    made.stop()


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` (links not followed): mode, and size and mtime for non-folders."""
    entries: dict[str, tuple[int, int, int]] = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder, name)
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode):
                entries[str(path)] = (info.st_mode, 0, 0)
            else:
                entries[str(path)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return entries


def written(
    before: dict[str, tuple[int, int, int]], after: dict[str, tuple[int, int, int]]
) -> set[str]:
    """Paths created, changed or removed between two snapshots."""
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def refused_rows(archive: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(archive / "index.sqlite3") as db:
        rows = db.execute("SELECT remote_name, reason, times FROM refused").fetchall()
    return {name: (reason, times) for name, reason, times in rows}


# --- remote names ------------------------------------------------------------------------------


@integration
def test_hostile_remote_names_are_refused_recorded_and_the_rest_land(
    served: Served, sender: Sender, tmp_path: Path, record_property: RecordProperty
) -> None:
    """Remote names: ../, /etc, NUL, line breaks, \\, 4096 bytes, a symlink out, a folder x.pgp"""
    token = f"ibkr-hostile-{os.getpid()}"
    for name, data in GOOD_REPORTS.items():
        (served.folder / f"{name}.pgp").write_bytes(sender.encrypt(data))
    outside = tmp_path / "outside" / "secret.pgp"
    outside.parent.mkdir()
    outside.write_text("a file outside the served folder")
    # What a real file system holds, on the server's disk:
    (served.folder / "link.pgp").symlink_to(outside)
    (served.folder / "x.pgp").mkdir()
    on_disk = {
        "back\\slash.pgp": "contains a path separator",
        "line\nbreak.pgp": "contains a line break",
        "carriage\rreturn.pgp": "contains a line break",
        ".hidden.pgp": "starts with '.'",
        "a..b.pgp": "is or contains '..'",
        "tab\there.pgp": "contains control characters",
        "rtl\u202egpj.pgp": "contains control characters",
        "link.pgp": "is a symbolic link; only regular files are fetched",
        "x.pgp": "is not a regular file",
    }
    for name in on_disk:
        if not (served.folder / name).exists() and not (served.folder / name).is_symlink():
            (served.folder / name).write_bytes(b"hostile")
    # What only a hostile server sends: names with "/" or NUL, and one of 4096 bytes.
    phantoms = {
        "../x.pgp": "contains a path separator",
        "/etc/passwd.pgp": "contains a path separator",
        f"/tmp/{token}.pgp": "contains a path separator",
        "../" * 12 + f"tmp/{token}.pgp": "contains a path separator",
        "..\\..\\up.pgp": "contains a path separator",
        "C:\\Windows\\evil.pgp": "contains a path separator",
        "sub/dir.pgp": "contains a path separator",
        "nul\x00.pgp": "contains NUL",
        "\x00.pgp": "contains NUL",
        "x" * 4092 + ".pgp": "longer than 255 bytes",
        "é" * 128 + ".pgp": "longer than 255 bytes",  # 128 characters, but 260 bytes
    }
    served.server.faults.phantom_names = tuple(phantoms)
    before = snapshot(tmp_path)
    project = served.project

    fetch = project.run("fetch")
    assert fetch.returncode == 0, fetch.stderr
    refused_count = len(on_disk) + len(phantoms)
    assert f"fetched 2 new, skipped 0, refused {refused_count}" in fetch.stdout
    run = project.run("run")
    assert run.returncode == 0, run.stderr
    assert f"fetched 0 new, skipped 2, refused {refused_count}" in run.stdout

    # Each one recorded in the ledger with its reason, once per listing that saw it.
    expected = {printable(name): reason for name, reason in {**on_disk, **phantoms}.items()}
    assert refused_rows(served.archive) == {name: (r, 2) for name, r in expected.items()}
    # The client never asked the server for any of them: refused at listing, not at open.
    asked = {path for _, path in served.server.requests}
    assert asked == {f"{name}.pgp" for name in GOOD_REPORTS}
    # Nothing written outside the archive (and gpg's own home), nothing followed out.
    changed = written(before, snapshot(tmp_path))
    allowed = (str(served.archive), str(project.keys / "gnupg"), str(sender.home))
    assert {p for p in changed if not p.startswith(allowed)} == set()
    assert not Path(f"/tmp/{token}.pgp").exists()
    assert not (served.archive / "x.pgp").exists() and not (project.root / "x.pgp").exists()
    assert outside.read_text() == "a file outside the served folder"
    # The good ones landed where the contract says, once.
    assert_consistent(served.archive)
    assert archive_tree(served.archive) == {
        f"U1234567/2026/{name}": sha_of(data) for name, data in GOOD_REPORTS.items()
    }
    record_property("tries", len(expected))
    record_property(
        "detail", f"{len(on_disk)} names on disk, {len(phantoms)} sent by a hostile server"
    )


@integration
def test_a_name_listed_twice_is_fetched_once(
    served: Served, sender: Sender, record_property: RecordProperty
) -> None:
    """Remote names: a hostile server lists a report's name twice"""
    for name, data in GOOD_REPORTS.items():
        (served.folder / f"{name}.pgp").write_bytes(sender.encrypt(data))
    twice = f"{next(iter(GOOD_REPORTS))}.pgp"
    served.server.faults.phantom_names = (twice,)

    result = served.project.run("run")
    assert result.returncode == 0, result.stderr
    assert "fetched 2 new, skipped 0, refused 1" in result.stdout
    assert refused_rows(served.archive) == {twice: ("listed more than once by the server", 1)}
    assert [path for _, path in served.server.requests].count(twice) == 1
    assert_consistent(served.archive)
    assert archive_tree(served.archive) == {
        f"U1234567/2026/{name}": sha_of(data) for name, data in GOOD_REPORTS.items()
    }
    record_property("detail", "before the fix: sqlite3.IntegrityError, traceback, run lost")


@pytest.fixture
def sshd_project(
    keyed_project: Project, sshd: SshdServer, sftp_dir: Path, tmp_path: Path
) -> Project:
    """A copy of the keyed project pointed at the real sshd, folder ``sftp_dir``."""
    return pointed_at_sshd(keyed_project, sshd, sftp_dir, tmp_path / "p")


@integration
def test_a_name_that_is_not_utf8_is_refused_and_the_rest_land(
    sshd_project: Project, sshd: SshdServer, sftp_dir: Path, record_property: RecordProperty
) -> None:
    """Remote names: OpenSSH lists a name whose bytes are not UTF-8 (Latin-1 from a Windows tool)"""
    good = "U1234567.Trade_History.20260901.20260901.xml.pgp"
    (sftp_dir / good).write_bytes(os.urandom(3000))
    raw_names = (b"Kontoauszug_M\xe4rz.pgp", b"\xff\xfe.pgp", b"ok\xc3.pgp")
    for raw in raw_names:
        with open(os.fsencode(sftp_dir) + b"/" + raw, "wb") as handle:
            handle.write(b"hostile")
    env = sshd_project.env(IBKR_SSH_PASSPHRASE=sshd.client_key_passphrase)

    result = sshd_project.run("fetch", env=env)
    assert result.returncode == 0, result.stderr
    assert f"fetched 1 new, skipped 0, refused {len(raw_names)}" in result.stdout
    archive = sshd_project.root / "archive"
    assert refused_rows(archive) == {
        printable(os.fsdecode(raw)): ("is not valid UTF-8", 1) for raw in raw_names
    }
    assert [p.name for p in (archive / ".inbox").iterdir()] == [good]
    record_property("tries", len(raw_names))
    record_property("detail", "before the fix: UnicodeDecodeError, traceback, nothing fetched")


# --- zip members -------------------------------------------------------------------------------

MiB = 1024 * 1024
BUNDLE_PERIOD = "20260101.20261231"


def zip_of(
    members: list[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_DEFLATED
) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # zipfile warns about the duplicate names made here on purpose.
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(buffer, "w", method) as archive:
            for name, data in members:
                archive.writestr(name, data)
    return buffer.getvalue()


def zeros_zip(name: str, size: int, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip with one member of ``size`` zero bytes, written in chunks, never held whole."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo(name)
        info.compress_type = method
        with archive.open(info, "w") as out:
            block = bytes(MiB)
            for _ in range(size // MiB):
                out.write(block)
    return buffer.getvalue()


def declaring(data: bytes, size: int) -> bytes:
    """``data`` (a zip with one member) whose headers declare ``size`` unpacked bytes: a lie."""
    patched = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = patched.index(signature) + offset
        patched[at : at + 4] = size.to_bytes(4, "little")
    return bytes(patched)


def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@integration
def test_hostile_bundles_are_quarantined_whole_and_the_rest_land(
    served: Served, sender: Sender, tmp_path: Path, record_property: RecordProperty
) -> None:
    """Zip members: absolute, .., symlink, duplicate, nested and 1000:1 and 10,000:1 bombs"""

    # Each hostile bundle also holds an innocent member, which must not be archived either.
    def innocent(tag: str) -> tuple[str, bytes]:
        return f"{tag}-innocent.csv", f"{tag},1,2,3\n".encode() * 50

    random_member = zip_of([("evil-lying.csv", os.urandom(1000))])
    with zipfile.ZipFile(io.BytesIO(random_member)) as archive:
        declared = 10_000 * archive.infolist()[0].compress_size
    # 42.zip's trick one level down: 16 zips, each holding 2 MiB of stored zeros, deflate
    # about 1000:1 in the outer zip.
    stored_zeros = zeros_zip("zeros.bin", 2 * MiB, zipfile.ZIP_STORED)
    Members = list[tuple[str | zipfile.ZipInfo, bytes]]
    hostile: dict[str, tuple[Members, str]] = {
        "Absolute": ([innocent("Absolute"), ("/etc/cron.d/evil-abs.csv", b"x")], "absolute path"),
        "DotDot": ([innocent("DotDot"), ("a/../../evil-dotdot.csv", b"x")], "outside the archive"),
        "BackDotDot": ([innocent("BackDotDot"), ("..\\evil-back.csv", b"x")], "outside"),
        "Symlink": (
            [innocent("Symlink"), (symlink_entry("evil-link.csv"), b"/etc/passwd")],
            "symbolic link",
        ),
        "Duplicate": (
            [innocent("Duplicate"), ("evil-dup.csv", b"1"), ("evil-dup.csv", b"2")],
            "appears twice",
        ),
        "NestedBomb": (
            [innocent("NestedBomb"), *((f"evil-{i}.zip", stored_zeros) for i in range(16))],
            "zip bombs",
        ),
    }
    bundles = {
        f"U1234567.{tag}.{BUNDLE_PERIOD}.zip": (zip_of(members), reason)
        for tag, (members, reason) in hostile.items()
    }
    bundles[f"U1234567.Ratio1000.{BUNDLE_PERIOD}.zip"] = (
        zeros_zip("evil-zeros.bin", 200 * MiB),
        "zip bombs",
    )
    bundles[f"U1234567.Ratio10000.{BUNDLE_PERIOD}.zip"] = (
        declaring(random_member, declared),
        "zip bombs",
    )
    # 42.zip itself: 16 x 16 x 10 MiB of zeros in zips of zips, under 100 KB. Its outer level
    # compresses little, so it is unpacked one level, as archive.unpack documents: the 16 inner
    # zips are archived as files and never opened.
    base = zeros_zip("evil-deep-zeros.bin", 10 * MiB)
    layer1 = zip_of([(f"evil-layer1-{i}.zip", base) for i in range(16)])
    nested = f"U1234567.Nested42.{BUNDLE_PERIOD}.zip"
    layer2 = zip_of([(f"layer2-{i}.zip", layer1) for i in range(16)])
    assert len(layer2) < 100_000
    remote = {f"{name}.pgp": sender.encrypt(data) for name, (data, _) in bundles.items()}
    remote[f"{nested}.pgp"] = sender.encrypt(layer2)
    for name, data in GOOD_REPORTS.items():
        remote[f"{name}.pgp"] = sender.encrypt(data)
    for name, data in remote.items():
        (served.folder / name).write_bytes(data)

    result = served.project.run("run")
    assert result.returncode == 1, result.stderr  # some failed, the rest archived

    quarantine = served.archive / ".quarantine"
    assert {p.name for p in quarantine.iterdir()} == {
        name for plain in bundles for name in (f"{plain}.pgp", f"{plain}.pgp.error.txt")
    }
    for plain, (_, reason) in bundles.items():
        report = (quarantine / f"{plain}.pgp.error.txt").read_text()
        assert reason in report, (plain, report)
        assert "Nothing from this bundle was archived" in report
        assert (quarantine / f"{plain}.pgp").read_bytes() == remote[f"{plain}.pgp"]
    # No member of a refused bundle anywhere, not even for a moment's worth of leftovers.
    leaked = [p for p in tmp_path.rglob("*") if "innocent" in p.name or "evil" in p.name]
    assert [p for p in leaked if not p.is_relative_to(served.folder)] == []
    assert [p for p in (served.archive / ".work").rglob("*") if not p.is_dir()] == []
    assert_consistent(served.archive)
    assert archive_tree(served.archive) == {
        **{f"U1234567/2026/{name}": sha_of(data) for name, data in GOOD_REPORTS.items()},
        **{f"U1234567/2026/layer2-{i}.zip": sha_of(layer1) for i in range(16)},
    }
    record_property("tries", len(bundles) + 1)
    record_property(
        "detail",
        f"{len(bundles)} bundles quarantined whole; 42.zip ({len(layer2)} bytes) opened one level",
    )


# --- host keys ---------------------------------------------------------------------------------


def fingerprint(key: paramiko.PKey) -> str:
    return HostKey(key.get_name(), key.asbytes()).fingerprint


def pin_line(server: SandboxServer, key: paramiko.PKey, marker: str = "") -> str:
    return f"{marker}[{server.host}]:{server.port} {key.get_name()} {key.get_base64()}".strip()


def pinned_for(case: str, server: SandboxServer) -> tuple[list[str], paramiko.PKey | None]:
    """The known_hosts lines for ``case``, and the other key they pin (None: no other key)."""
    if case == "unknown":
        return [], None
    if case == "revoked":  # pinned, and also revoked: revocation wins
        key = server.host_key
        return [pin_line(server, key), pin_line(server, key, "@revoked ")], None
    # The sandbox offers only its Ed25519 key: pin another one, or an RSA key instead.
    other = generate_ed25519_key() if case == "changed" else paramiko.RSAKey.generate(2048)
    return [pin_line(server, other)], other


@integration
@pytest.mark.parametrize("case", ["unknown", "changed", "other type only", "revoked"])
def test_host_key_problems_stop_before_login_and_write_nothing(
    served: Served, sender: Sender, case: str, record_property: RecordProperty
) -> None:
    """Host key: unknown, changed, only another key type offered, revoked: refused, exit 4"""
    server, project = served.server, served.project
    for name, data in GOOD_REPORTS.items():
        (served.folder / f"{name}.pgp").write_bytes(sender.encrypt(data))
    offered = fingerprint(server.host_key)
    lines, other = pinned_for(case, server)
    known_hosts = project.keys / "known_hosts"
    known_hosts.write_text("".join(f"{line}\n" for line in lines))
    pinned_before = known_hosts.read_bytes()

    for command in ("fetch", "run"):
        result = project.run(command)
        assert result.returncode == 4, (command, result.stderr)
        assert "Traceback" not in result.stderr
        assert offered in result.stderr
        if case == "unknown":
            assert "is not pinned" in result.stderr
            assert f"trust-host --fingerprint {offered}" in result.stderr
        elif case == "revoked":
            assert "HOST KEY REVOKED" in result.stderr and "@revoked" in result.stderr
        else:
            assert "HOST KEY CHANGED" in result.stderr
        if other is not None:  # both fingerprints and types, to compare with IBKR's
            assert fingerprint(other) in result.stderr
            assert f"offers ssh-ed25519 {offered}" in result.stderr
            assert f"pins {other.get_name()} {fingerprint(other)}" in result.stderr
    # Never retried, never logged in, nothing fetched, nothing pinned behind the user's back.
    assert server.connections == 2
    assert server.requests == []
    assert known_hosts.read_bytes() == pinned_before
    assert not (served.archive / ".inbox").exists()
    assert archive_tree(served.archive) == {}
    with sqlite3.connect(served.archive / "index.sqlite3") as db:
        runs = db.execute("SELECT command, result, exit_code FROM runs ORDER BY id").fetchall()
    assert runs == [("fetch", "failed", 4), ("run", "failed", 4)]
    record_property("tries", 2)
    record_property("detail", case)


# --- configuration -----------------------------------------------------------------------------

# One value of each TOML type, as written in a file.
TOML_VALUES = {
    "string": '"wrong"',
    "integer": "7",
    "float": "7.5",
    "boolean": "true",
    "array": '["a", "b"]',
    "table": "{ a = 1 }",
    "datetime": "1979-05-27T07:32:00Z",
    "date": "1979-05-27",
    "time": "07:32:00",
}
# Values a section needs besides the key under test, so that the key is the only problem.
REQUIRED: dict[tuple[str, ...], dict[str, str]] = {
    ("notify", "email"): {
        "smtp_host": '"smtp.example.com"',
        "from_address": '"me@example.com"',
        "to": '["me@example.com"]',
    },
    ("notify", "webhook"): {"url": '"https://hooks.example.com/x"'},
}


def right_kinds(annotation: Any) -> frozenset[str]:
    """The TOML types a value of a field with this annotation can have."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return right_kinds(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        kinds: frozenset[str] = frozenset()
        for arg in get_args(annotation):
            if arg is not type(None):  # TOML has no null
                kinds |= right_kinds(arg)
        return kinds
    simple = {
        Literal: {"string"},
        tuple: {"array"},
        dict: {"table"},
        bool: {"boolean"},
        int: {"integer"},
        float: {"integer", "float"},
        str: {"string"},
        Path: {"string"},
    }
    if origin in simple:
        return frozenset(simple[origin])
    if annotation in simple:
        return frozenset(simple[annotation])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return frozenset({"table"})
    raise AssertionError(f"a field type this test does not know yet: {annotation!r}")


def config_fields(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every key of the configuration file, as (section path + key, annotation), recursively."""
    for name, info in model.model_fields.items():
        if info.exclude:
            continue  # not a TOML key (Config.source)
        yield (*prefix, name), info.annotation
        inner = [info.annotation, *get_args(info.annotation)]
        for candidate in inner:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from config_fields(candidate, (*prefix, name))


def wrong_values(annotation: Any) -> dict[str, str]:
    """A value of every TOML type the field cannot take, plus wrongly typed contents."""
    right = right_kinds(annotation)
    wrong = {kind: text for kind, text in TOML_VALUES.items() if kind not in right}
    if get_origin(annotation) is tuple:
        wrong["array of numbers"] = "[1, 2]"
    if get_origin(annotation) is dict:
        wrong["table of numbers"] = "{ pubkeys = 1 }"
    return wrong


def toml_with(parts: tuple[str, ...], value: str) -> str:
    """A configuration file that sets only ``parts`` (section path + key) to ``value``."""
    *section, key = parts
    if not section:
        return f"{key} = {value}\n"
    lines = [f"[{'.'.join(section)}]"]
    lines += [f"{k} = {v}" for k, v in REQUIRED.get(tuple(section), {}).items() if k != key]
    lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def where(parts: tuple[str, ...]) -> str:
    """How a message names a key: ``[section] key``, or just ``key`` at the top level."""
    *section, key = parts
    return f"[{'.'.join(section)}] {key}" if section else key


def config_error(path: Path, text: str) -> ConfigError:
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.exit_code == ExitCode.CONFIG
    return caught.value


# How the messages say what is expected: pydantic's "Input should be a valid integer", ours
# "expected a path as a non-empty string".
EXPECTED_WORDS = re.compile(r"should be|should have|expected")


def test_every_field_with_every_wrong_type_is_refused_naming_file_key_and_expectation(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    """Config: every key (generated from the models) given every wrong TOML type"""
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "ibkr-statements.toml"
    fields = list(config_fields(Config))
    # The generator must see the whole model, nested notify sections included.
    assert {("sftp", "port"), ("notify", "email", "to"), ("notify", "webhook", "url")} <= {
        parts for parts, _ in fields
    }
    tried = 0
    for parts, annotation in fields:
        for kind, value in wrong_values(annotation).items():
            message = config_error(path, toml_with(parts, value)).message
            tried += 1
            context = (parts, kind, message)
            # A wrong value inside a table is named by its own key.
            named = (*parts, "pubkeys") if kind == "table of numbers" else parts
            assert str(path) in message, context
            assert where(named) in message, context
            assert EXPECTED_WORDS.search(message), context
    record_property("tries", tried)
    record_property("detail", f"{len(fields)} keys from the pydantic models, every wrong type")


def test_unknown_sections_and_keys_are_refused_by_name(tmp_path: Path) -> None:
    """Config: unknown sections and keys, at every level"""
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "ibkr-statements.toml"
    cases = {
        "[sftps]\nhost = 'x'\n": "[sftps]: unknown section",
        "[notify.sms]\nto = 'x'\n": "[notify.sms]: unknown section",
        "colour = 'blue'\n": "colour: unknown key",
        "[sftp]\nhots = 'x'\n": "[sftp] hots: unknown key",
        "[notify.webhook]\nurl = 'https://x'\nsign = 1\n": "[notify.webhook] sign: unknown key",
    }
    for text, expected in cases.items():
        message = config_error(path, text).message
        assert str(path) in message and expected in message, (text, message)


@pytest.mark.parametrize(
    "secret_key", ["passphrase", "password", "ssh_passphrase", "smtp_password", "secret"]
)
def test_a_secret_in_any_section_is_refused_saying_where_secrets_go(
    tmp_path: Path, secret_key: str
) -> None:
    """Config: a passphrase or password written into any section of the TOML"""
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "ibkr-statements.toml"
    sections = {parts[:-1] for parts, _ in config_fields(Config) if len(parts) > 1}
    for section in sorted(sections):
        error = config_error(path, toml_with((*section, secret_key), '"hunter2-do-not-echo"'))
        text = str(error)
        assert f"[{'.'.join(section)}] {secret_key}" in text
        assert "environment variable" in text and "_file" in text
        assert "hunter2" not in text


def problem_toml(project: Project, case: str) -> tuple[str, str, dict[str, str]]:
    """(command, what the message must say, extra env) after breaking the config for ``case``."""
    set_option(project, 'username = ""', 'username = "u"')  # fetch needs one before anything
    if case == "wrong type":
        set_option(project, "port = 32", 'port = "32"')
        return "status", "[sftp] port: Input should be a valid integer", {}
    if case == "date for a string":
        set_option(project, 'remote_dir = "."', "remote_dir = 2026-01-01")
        return "status", "[sftp] remote_dir: a TOML date or time", {}
    if case == "unknown section":
        project.config.write_text(project.config.read_text() + "\n[sftps]\nport = 22\n")
        return "status", "[sftps]: unknown section", {}
    if case == "passphrase in the TOML":
        set_option(project, "[pgp]\n", '[pgp]\npassphrase = "hunter2-do-not-echo"\n')
        return "status", "put the secret in an environment variable", {}
    if case == "home missing":
        set_option(project, 'home = ".."', 'home = "../no-such-folder"')
        return "status", "no-such-folder does not exist", {}
    if case == "key_passphrase_file missing":
        set_option(
            project,
            '# key_passphrase_file = "keys/ssh-passphrase"',
            'key_passphrase_file = "secrets/ssh-passphrase"',
        )
        return (
            "fetch",
            "secrets/ssh-passphrase named in the configuration does not exist",
            {"IBKR_SSH_PASSPHRASE": ""},
        )
    if case == "key_file in a missing folder":
        set_option(project, 'key_file = "keys/ibkr_rsa"', 'key_file = "nowhere/ibkr_rsa"')
        return "fetch", "nowhere/ibkr_rsa", {}
    if case == "gnupg_home missing":
        set_option(project, 'gnupg_home = "keys/gnupg"', 'gnupg_home = "nowhere/gnupg"')
        return "decrypt", "nowhere/gnupg named by [pgp] gnupg_home does not exist", {}
    if case == "pgp passphrase_file missing":
        set_option(
            project,
            '# passphrase_file = "keys/pgp-passphrase"',
            'passphrase_file = "secrets/pgp-passphrase"',
        )
        return (
            "decrypt",
            "secrets/pgp-passphrase named in the configuration does not exist",
            {"IBKR_PGP_PASSPHRASE": ""},
        )
    raise AssertionError(case)


@integration
@pytest.mark.parametrize(
    "case",
    [
        "wrong type",
        "date for a string",
        "unknown section",
        "passphrase in the TOML",
        "home missing",
        "key_passphrase_file missing",
        "key_file in a missing folder",
        "gnupg_home missing",
        "pgp passphrase_file missing",
    ],
)
def test_the_console_script_exits_3_with_a_clear_message(project: Project, case: str) -> None:
    """Config: the real command line on a broken configuration: exit 3, the message says what"""
    command, expected, env = problem_toml(project, case)
    result = project.run("--config", str(project.config), command, env=project.env(**env))
    assert result.returncode == 3, (case, result.stdout, result.stderr)
    assert expected in result.stderr, (case, result.stderr)
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert not (project.root / "archive" / ".inbox").exists()
    # A path to a folder that is not there is reported, not created.
    for missing in ("nowhere", "secrets", "no-such-folder"):
        assert not (project.root / missing).exists(), (case, missing)


# --- fuzzing: every parser of untrusted text ---------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Pieces hostile names are made of, beside arbitrary text.
_HOSTILE_PIECES = st.sampled_from(
    ["/", "\\", "..", ".", "", "\x00", "\n", "\r", "\t", "\u202e", "\u200b", "C:", "~",
     "é", "e\u0301", "U1234567", ".pgp", ".zip", "20260101", "x" * 120, "\udcff"]
)  # fmt: skip
_names = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(_HOSTILE_PIECES, st.text(max_size=5)), max_size=12).map("".join),
)


@FUZZ
@given(name=_names, version=st.integers(min_value=1, max_value=10**6))
def test_fuzz_an_accepted_remote_name_is_always_one_safe_component(name: str, version: int) -> None:
    """Fuzz: remote name check; a name it accepts stays one file inside the inbox, always"""
    shown = printable(name)
    # The form that goes into the log and the ledger is one line and valid UTF-8.
    assert "\n" not in shown and "\r" not in shown and "\x00" not in shown
    shown.encode("utf-8")
    if name_problem(name) is not None:
        return
    assert name not in ("", ".", "..") and not name.startswith(".")
    assert not {"/", "\\", "\x00"} & set(name)
    assert name.isprintable() and len(name.encode("utf-8")) <= 255
    inbox = Path("/archive/.inbox")
    assert (inbox / name).resolve().parent == inbox
    assert os.path.dirname(os.path.normpath(inbox / name)) == str(inbox)
    flat = inbox_name_for(RemoteFile(name, name, 1, 1), version)
    assert (inbox / flat).resolve().parent == inbox and not flat.startswith(".")


_accepted = st.one_of(
    st.text(min_size=1, max_size=30), st.sampled_from(["a.", "_", "b_", "x" * 255])
).filter(lambda name: name_problem(name) is None)


@FUZZ
@given(components=st.lists(_accepted, min_size=1, max_size=4))
def test_fuzz_recursive_names_flatten_into_one_inbox_component(components: list[str]) -> None:
    """Fuzz: names from sub-folders (recursive) flatten into one safe inbox name"""
    relative = "/".join(components)
    flat = inbox_name_for(RemoteFile(relative, relative, 1, 1), 1)
    assert "/" not in flat and not flat.startswith(".") and ".." not in flat.split("__")
    assert (Path("/archive/.inbox") / flat).resolve().parent == Path("/archive/.inbox")


# known_hosts: lines built from labelled parts, so the right verdict is known independently.
HOST, PORT = "xfer.example.com", 32
_NAME = f"[{HOST}]:{PORT}"


def _wire(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _ed25519_blob(seed: int) -> bytes:
    return _wire(b"ssh-ed25519", seed.to_bytes(32, "big"))


OFFERED = HostKey("ssh-ed25519", _ed25519_blob(1))
OTHER = HostKey("ssh-ed25519", _ed25519_blob(2))
CUT_SHORT = HostKey("ssh-ed25519", _ed25519_blob(1)[:48])


def _hashed(name: str, salt: bytes) -> str:
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


# (host field, whether it matches [xfer.example.com]:32)
_HOST_FIELDS = st.sampled_from(
    [
        (_NAME, True),
        (f"[{HOST.upper()}]:{PORT}", True),
        ("*", True),
        (f"[*.example.com]:{PORT}", True),
        (f"[{HOST}]:3?", True),
        (f"other.example.com,{_NAME}", True),
        (HOST, False),  # port 22 only
        (f"[{HOST}]:22", False),
        (f"[{HOST}]:320", False),
        (f"{HOST}:{PORT}", False),
        (f"!*,{_NAME}", False),
        (f"{_NAME},!{_NAME}", False),
        ("[other.example.com]:32", False),
        (_hashed(_NAME, b"salt-one"), True),
        (_hashed(HOST, b"salt-two"), False),
        ("|1|bad|hash", False),
        ("|2|c2FsdA==|aGFzaA==", False),
    ]
)
# (key field text, the key it pins or None when the line must be ignored)
_KEY_FIELDS = st.sampled_from(
    [
        (f"ssh-ed25519 {base64.b64encode(OFFERED.blob).decode()}", OFFERED),
        (f"ssh-ed25519 {base64.b64encode(OTHER.blob).decode()}", OTHER),
        (f"ssh-ed25519 {base64.b64encode(OFFERED.blob).decode()} a comment", OFFERED),
        (f"ssh-rsa {base64.b64encode(OFFERED.blob).decode()}", None),  # type and blob differ
        # Cut short: still a well-formed blob of the type, so it pins a key that is not ours.
        (f"ssh-ed25519 {base64.b64encode(OFFERED.blob).decode()[:-4]}", CUT_SHORT),
        (f"ssh-ed25519 {base64.b64encode(OFFERED.blob).decode()}!", None),  # not base64
        ("ssh-ed25519", None),  # no key at all
        (f"ssh-ed25519 {base64.b64encode(b'x').decode()}", None),
    ]
)
_MARKERS = st.sampled_from(["", "", "", "@revoked", "@cert-authority", "@other"])


@dataclass(frozen=True)
class _Line:
    text: str
    matches: bool
    key: HostKey | None
    marker: str
    commented: bool


_lines = st.builds(
    lambda host, key, marker, commented, indent: _Line(
        ("#" if commented else "")
        + indent
        + " ".join(part for part in (marker, host[0], key[0]) if part),
        host[1],
        key[1],
        marker,
        commented,
    ),
    _HOST_FIELDS,
    _KEY_FIELDS,
    _MARKERS,
    st.sampled_from([False, False, False, True]),
    st.sampled_from(["", " ", "\t"]),
)


def expected_verdict(lines: list[_Line]) -> str:
    live = [line for line in lines if not line.commented and line.key is not None]
    if any(line.marker == "@revoked" and line.key == OFFERED for line in live):
        return "changed"  # a revoked key is never accepted, whoever it was pinned for
    pinned = [line.key for line in live if line.marker == "" and line.matches]
    if not pinned:
        return "unknown"
    return "ok" if OFFERED in pinned else "changed"


@FUZZ
@given(lines=st.lists(_lines, max_size=8), ending=st.sampled_from(["\n", "\r\n"]))
def test_fuzz_known_hosts_a_key_is_ok_only_when_pinned_for_this_host(
    lines: list[_Line], ending: str
) -> None:
    """Fuzz: known_hosts reader; a key is "ok" only if that key is pinned for that host"""
    text = ending.join(line.text for line in lines)
    known = KnownHosts(Path("known_hosts"), tuple(parse_known_hosts(text)))
    assert known.check(HOST, PORT, OFFERED) == expected_verdict(lines), text


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=400),
        st.lists(
            st.one_of(_HOSTILE_PIECES, st.sampled_from(["@revoked ", "|1|", "[", "]:", " ", ",",
                                                       "!", "*", "?", "ssh-ed25519 ", "AAAA"])),
            max_size=40,
        ).map("".join),
    ),
    host=st.sampled_from([HOST, "[", "*", "a\\", "(.*)", "é"]),
    port=st.sampled_from([22, 32, 0, 65535]),
)  # fmt: skip
def test_fuzz_known_hosts_never_raises_and_never_trusts_an_unknown_key(
    text: str, host: str, port: int
) -> None:
    """Fuzz: known_hosts reader on arbitrary text never raises and never trusts a key not in it"""
    known = KnownHosts(Path("known_hosts"), tuple(parse_known_hosts(text)))
    fresh = HostKey("ssh-ed25519", _ed25519_blob(3))  # its base64 is in no generated text
    assert known.check(host, port, fresh) in ("unknown", "changed")
    known.keys_for(host, port)
    # Whatever precedes it, a line that pins the key makes it trusted (nothing revokes it).
    line = f"{host_field(host, port)} ssh-ed25519 {base64.b64encode(fresh.blob).decode()}"
    pinned = KnownHosts(Path("known_hosts"), tuple(parse_known_hosts(f"{text}\n{line}")))
    assert pinned.check(host, port, fresh) == "ok"


# zip structures: entries built from hostile parts; the rules that must refuse are known.
_BENIGN_PARTS = st.one_of(
    st.sampled_from(
        [
            "a",
            "b.csv",
            "U1234567",
            "é",
            "e\u0301",
            "~",
            "C",
            "report.xml",
            "a b",
            "Jane_Doe_U20343697_October_01_2025_December_31_2025.csv",
            "x" * 255,
        ]
    ),
    st.text(
        st.characters(categories=("L", "N", "P", "Zs"), exclude_characters="/\\:"),
        min_size=1,
        max_size=6,
    ),
)
_HOSTILE_PARTS = st.sampled_from(["..", ".", "", "C:", "c:x", "x" * 256, "\x00", "\n", "\x7f"])
_KINDS = {
    "file": stat.S_IFREG | 0o644,
    "dir": stat.S_IFDIR | 0o755,
    "symlink": stat.S_IFLNK | 0o777,
    "fifo": stat.S_IFIFO | 0o644,
    "unset": 0,
}
FUZZ_LIMITS = UnpackLimits(max_members=6, max_unpacked_bytes=20_000, max_ratio=200)


@dataclass(frozen=True)
class _Entry:
    name: str  # as given to zipfile, which cuts it at a NUL
    kind: str
    method: int
    data: bytes

    @property
    def stored_name(self) -> str:
        return self.name.split("\x00")[0]

    @property
    def parts(self) -> list[str]:
        return [p for p in self.stored_name.replace("\\", "/").split("/") if p not in ("", ".")]

    def must_be_refused(self) -> bool:
        """Absolute, '..', a link or a special file, control characters, or no name at all."""
        normal = self.stored_name.replace("\\", "/")
        return (
            not self.parts
            or normal.startswith("/")
            or re.match(r"[A-Za-z]:", normal) is not None
            or ".." in normal.split("/")
            or self.kind in ("symlink", "fifo")
            or any(unicodedata.category(ch) == "Cc" for ch in self.stored_name)
        )

    @property
    def is_file(self) -> bool:
        return not self.stored_name.replace("\\", "/").endswith("/")


def _entry_strategy(parts: st.SearchStrategy[str], hostile: bool) -> st.SearchStrategy[_Entry]:
    return st.builds(
        _Entry,
        st.tuples(
            st.sampled_from(["", "", "/", "\\"] if hostile else [""]),
            st.lists(parts, min_size=1, max_size=3),
            st.sampled_from(["/", "\\"] if hostile else ["/"]),
            st.sampled_from(["", "", "/"]),
        ).map(lambda t: t[0] + t[2].join(t[1]) + t[3]),
        st.sampled_from(list(_KINDS) if hostile else ["file", "file", "unset", "dir"]),
        st.sampled_from(
            [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]
            + ([zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA] if hostile else [])
        ),
        st.one_of(st.binary(max_size=40), st.just(b" " * 3000)),
    )


_benign = _entry_strategy(_BENIGN_PARTS, hostile=False)
_hostile = _entry_strategy(st.one_of(_BENIGN_PARTS, _HOSTILE_PARTS), hostile=True)


@st.composite
def _entries(draw: st.DrawFn) -> list[_Entry]:
    """Mostly benign entries with a hostile one now and then, so both outcomes are explored."""
    entries = []
    for index in range(draw(st.integers(min_value=0, max_value=5))):
        # Not 0: hypothesis favours the smallest value, and hostile entries are to be rare.
        if draw(st.integers(min_value=0, max_value=4)) == 3:
            entries.append(draw(_hostile))
        else:  # benign names are made distinct; duplicates are added on purpose below
            entry = draw(_benign)
            entries.append(dataclasses.replace(entry, name=f"{index}-{entry.name}"))
    return entries


def _zip_from(entries: list[_Entry]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are part of the test
        with zipfile.ZipFile(buffer, "w") as archive:
            for entry in entries:
                info = zipfile.ZipInfo(entry.name)
                info.external_attr = _KINDS[entry.kind] << 16
                info.compress_type = entry.method
                archive.writestr(info, entry.data)
    return buffer.getvalue()


@FUZZ
@given(entries=_entries(), repeat=st.integers(min_value=0, max_value=11))
def test_fuzz_zip_structures_are_refused_whole_or_mapped_inside_the_archive(
    entries: list[_Entry], repeat: int
) -> None:
    """Fuzz: zip member mapper; a bundle is refused whole, or every member lands inside the root"""
    if repeat == 0 and entries:
        entries = [*entries, entries[0]]  # a duplicate name now and then
    if repeat == 1 and entries:  # the same name in another Unicode normal form
        nfd = unicodedata.normalize("NFD", entries[0].name)
        entries = [*entries, dataclasses.replace(entries[0], name=nfd)]
    keys = [unicodedata.normalize("NFC", "/".join(e.parts)) for e in entries]
    must_refuse = any(e.must_be_refused() for e in entries) or len(set(keys)) < len(keys)
    bundle = "U1234567.Fuzz.20260101.20261231.zip"
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        source = base / bundle
        source.write_bytes(_zip_from(entries))
        workdir, root = base / "work" / "members", base / "archive"
        try:
            produced = unpack(source, bundle, workdir, FUZZ_LIMITS)
        except UnpackRefused as refusal:
            assert not workdir.exists()
            reason = refusal.message.rsplit("' ", 1)[-1] if "' " in refusal.message else "bundle"
            event(f"refused: {re.sub(r'[0-9]+', 'N', reason)[:50]}")
            return
        event("unpacked")
        assert not must_refuse, entries
        files = [(i, e) for i, e in enumerate(entries) if e.is_file]
        assert len(produced) == len(files)
        for item, (index, entry) in zip(produced, files, strict=True):
            assert item.path == workdir / str(index) / entry.parts[-1]
            assert item.path.is_file() and not item.path.is_symlink()
            assert item.path.read_bytes() == entry.data
            relative = destination(
                item, bundle=parse_report_name(bundle), fetched_on=date(2026, 1, 2)
            )
            placed = place(item.path, root, relative, sha256_file(item.path))
            assert (root / placed.relative).resolve().is_relative_to(root)
        assert {p.name for p in base.iterdir()} <= {bundle, "work", "archive"}
        for path in root.rglob("*"):
            assert path.resolve().is_relative_to(root) and not path.is_symlink()


# PPK files built from their grammar (PuTTY manual, appendix C), each part valid or hostile.
def _mpint(value: int) -> bytes:
    if value < 0:  # an mpint with its sign bit set: a negative number
        return _wire(b"\x80" + (-value).to_bytes(max(1, (-value).bit_length() // 8 + 1), "big"))
    return _wire(value.to_bytes(value.bit_length() // 8 + 1, "big"))


@functools.cache
def _real_blobs() -> dict[bytes, tuple[bytes, bytes]]:
    """(public blob, private blob) of a real key of each supported type, made once."""
    ed = Ed25519PrivateKey.generate()
    ed_blobs = (
        _wire(b"ssh-ed25519", ed.public_key().public_bytes_raw()),
        _wire(ed.private_bytes_raw()),
    )
    # Small and quick to make: it only feeds the parser, it never protects anything.
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    numbers = small.private_numbers()
    rsa_blobs = (
        _wire(b"ssh-rsa") + _mpint(numbers.public_numbers.e) + _mpint(numbers.public_numbers.n),
        b"".join(_mpint(v) for v in (numbers.d, numbers.p, numbers.q, numbers.iqmp)),
    )
    p256 = ec.generate_private_key(ec.SECP256R1())
    point = p256.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    ec_blobs = (
        _wire(b"ecdsa-sha2-nistp256", b"nistp256", point),
        _mpint(p256.private_numbers().private_value),
    )
    return {b"ssh-ed25519": ed_blobs, b"ssh-rsa": rsa_blobs, b"ecdsa-sha2-nistp256": ec_blobs}


_INTEGERS = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, 3, 65537, 2**1024 - 1, 2**16400]),
)
_BLOB_FIELDS = st.one_of(
    _INTEGERS.map(_mpint),
    st.binary(max_size=40).map(_wire),
    st.sampled_from([b"ssh-rsa", b"ssh-ed25519", b"nistp256", b"nistp384"]).map(_wire),
    st.binary(min_size=32, max_size=32).map(_wire),
    st.binary(max_size=6),  # a cut-off or raw field
)


def _mostly(draw: st.DrawFn, valid: _T, *hostile: _T) -> _T:
    """``valid`` seven times in eight, else one of ``hostile``: so the deep parts of the
    reader are reached too, not only its first checks."""
    if not hostile or draw(st.integers(min_value=0, max_value=7)) > 0:
        return valid
    return draw(st.sampled_from(hostile))


def _b64_lines(blob: bytes) -> list[bytes]:
    text = base64.b64encode(blob)
    return [text[i : i + 64] for i in range(0, len(text), 64)] or [b""]


@st.composite
def _blobs(draw: st.DrawFn, algorithm: bytes) -> tuple[bytes, bytes]:
    """A real key's blobs, one of them damaged or exchanged, or blobs made of random fields."""
    real = _real_blobs()
    public, private = real.get(algorithm, real[b"ssh-rsa"])
    how = draw(st.sampled_from(["real", "damage public", "damage private", "swap", "random"]))
    if how in ("damage public", "damage private"):
        blob = public if how == "damage public" else private
        at = draw(st.integers(min_value=0, max_value=len(blob)))
        cut = draw(st.booleans())
        blob = blob[:at] if cut else blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1 :]
        public, private = (blob, private) if how == "damage public" else (public, blob)
    elif how == "swap":
        private = real[draw(st.sampled_from(sorted(real)))][1]
    elif how == "random":
        public = _wire(algorithm) + b"".join(draw(st.lists(_BLOB_FIELDS, max_size=4)))
        private = b"".join(draw(st.lists(_BLOB_FIELDS, max_size=5)))
    return public, private


@st.composite
def ppk_files(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([b"2", b"3"]))
    version = _mostly(draw, version, b"1", b"4", b"03", b"x", b"")
    algorithm = draw(st.sampled_from([b"ssh-rsa", b"ssh-ed25519", b"ecdsa-sha2-nistp256"]))
    public, private = draw(_blobs(algorithm))
    algorithm = _mostly(draw, algorithm, b"ssh-dss", b"ssh-ed448", b"", b"ecdsa-sha2-nistp521")
    encryption = _mostly(draw, b"none", b"aes256-cbc", b"aes128-cbc", b"")
    comment = _mostly(draw, b"rsa-key-20260101", b"", b"\xff\xfe", b"a: b")
    if encryption != b"none" and draw(st.booleans()):
        private = private.ljust(-(-len(private) // 16) * 16 or 16, b"\0")  # whole AES blocks
    header = [b"PuTTY-User-Key-File-" + version + b": " + algorithm]
    header.append(b"Encryption: " + encryption)
    header.append(b"Comment: " + comment)

    def lines(name: bytes, blob: bytes) -> list[bytes]:
        body = _b64_lines(blob)
        count = _mostly(draw, str(len(body)).encode(), b"0", b"-1", b"99999999999", b"x")
        body = _mostly(draw, body, body[:-1], [*body, b"AAAA"], [line + b"!" for line in body])
        return [name + b": " + count, *body]

    header += lines(b"Public-Lines", public)
    if (version == b"3" and encryption != b"none") or draw(st.integers(0, 9)) == 0:
        header += [
            b"Key-Derivation: " + _mostly(draw, b"Argon2id", b"Argon2i", b"scrypt"),
            # Small or beyond the limits: never an expensive derivation in a test example.
            b"Argon2-Memory: " + _mostly(draw, b"8", b"64", b"7", b"1048577", b"x"),
            b"Argon2-Passes: " + _mostly(draw, b"1", b"2", b"0", b"1001"),
            b"Argon2-Parallelism: " + _mostly(draw, b"1", b"2", b"0", b"65"),
            b"Argon2-Salt: " + _mostly(draw, b"00" * 16, b"zz", b"abc", b"00"),
        ]
    header += lines(b"Private-Lines", private)
    size = 20 if version == b"2" else 32
    mac_input = b"".join(_wire(p) for p in (algorithm, encryption, comment, public, private))
    if version == b"2":
        # Version 2's MAC key for an unencrypted file, SHA-1 as the format prescribes.
        key = hashlib.sha1(b"putty-private-key-file-mac-key").digest()  # noqa: S324
        right = hmac.new(key, mac_input, hashlib.sha1).hexdigest().encode()
    else:
        right = hmac.new(b"", mac_input, hashlib.sha256).hexdigest().encode()
    mac = _mostly(draw, right, b"00" * size, b"00" * (size + 1), b"zz" * size, right.upper())
    header.append(b"Private-MAC: " + mac)
    if draw(st.integers(0, 15)) == 0:
        header = draw(st.permutations(header))
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    bom = _mostly(draw, b"", b"\xef\xbb\xbf")
    return bom + ending.join(header) + ending + _mostly(draw, b"", b"trailing junk\n")


@FUZZ
@given(data=ppk_files(), passphrase=st.sampled_from([None, "", "pw", "pässwörd"]))
def test_fuzz_ppk_files_built_from_the_grammar_raise_only_key_problems(
    data: bytes, passphrase: str | None
) -> None:
    """Fuzz: PPK reader on files built from the format's grammar; only KeyProblem, ever"""
    with contextlib.suppress(KeyProblem):
        ppk_is_encrypted(data)
    try:
        key = read_ppk(data, passphrase)
    except KeyProblem as error:
        assert not passphrase or passphrase not in str(error)
        event(re.sub(r"[0-9]+", "N", error.message)[:70])
    else:
        event(f"read a {key.algorithm} key")
