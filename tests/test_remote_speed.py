"""The speed-ups of issue 7 change nothing else: the pipelined folder listing lists what
paramiko's listdir_attr and the folder itself hold, the pipelined reads bring a file in order
whatever order and size the server answers in, and an RSA key loaded without OpenSSL's
primality proof still logs in, while a damaged one is refused.

Timing is bench/'s business; nothing here is timed except guards against a hang.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_HANDLE,
    CMD_NAME,
    CMD_OPENDIR,
    CMD_READDIR,
    CMD_STATUS,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_NO_SUCH_FILE,
)

from statements import remote
from statements.config import Config, from_mapping
from statements.errors import KeyProblem
from statements.hostkeys import KnownHosts
from statements.keys.ssh import load_private_key, rsa_numbers_fit
from statements.remote import (
    FolderEntry,
    SftpSession,
    SftpSettings,
    SftpStore,
    list_folder_entries,
)
from statements.store import Refused
from tests.sshd import ClientKeys, SshdServer, fingerprint

# Far above what anything here takes, well below pytest's patience.
_HANG_GUARD_S = 20.0


def _config(sshd: SshdServer, folder: Path, **sftp: object) -> Config:
    """A configuration for the sshd, logging in with its encrypted RSA-4096 key."""
    (folder / "config").mkdir(parents=True, exist_ok=True)
    passphrase = folder / "ssh-passphrase"
    passphrase.write_text(sshd.client_key_passphrase + "\n")
    passphrase.chmod(0o600)
    section = {
        "host": sshd.host,
        "port": sshd.port,
        "username": sshd.username,
        "key_file": str(sshd.client_key_path),
        # A variable nobody sets: the passphrase comes from the file.
        "key_passphrase_env": "IBKR_STATEMENTS_TEST_UNSET_PASSPHRASE",
        "key_passphrase_file": str(passphrase),
        "known_hosts": str(sshd.known_hosts_path),
        "timeout_s": 5,
        "retries": 0,
        **sftp,
    }
    return from_mapping({"sftp": section}, folder / "config" / "ibkr-statements.toml")


@pytest.fixture(scope="module")
def login_key(sshd: SshdServer, tmp_path_factory: pytest.TempPathFactory) -> paramiko.PKey:
    """The sshd's RSA-4096 client key as the nightly loads it, once for this module."""
    return remote.load_login_key(_config(sshd, tmp_path_factory.mktemp("login")))


@pytest.fixture
def session(sshd: SshdServer, login_key: paramiko.PKey, tmp_path: Path) -> Iterator[SftpSession]:
    connected = SftpStore(SftpSettings.from_config(_config(sshd, tmp_path)), login_key).connect()
    yield connected
    connected.close()


def _served(folder: Path) -> list[tuple[str, int, int, int]]:
    """(name, size, mtime, mode) of each entry, as the local file system has them."""
    entries = []
    for raw in os.listdir(os.fsencode(folder)):
        st = os.lstat(os.fsencode(folder) + b"/" + raw)
        name = raw.decode("utf-8", "surrogateescape")
        entries.append((name, st.st_size, int(st.st_mtime), st.st_mode))
    return sorted(entries)


def _listed(entries: list[FolderEntry]) -> list[tuple[str, int, int, int]]:
    return sorted((a.filename, a.st_size or 0, a.st_mtime or 0, a.st_mode or 0) for a in entries)


def _fields(entries: Sequence[paramiko.SFTPAttributes | FolderEntry]) -> list[dict[str, object]]:
    """The fields of each entry that FolderEntry and paramiko's SFTPAttributes share (all
    but paramiko's long name and flags), extended attributes as {name: value}, in name order."""
    return [
        {
            "filename": a.filename,
            **{name: getattr(a, name) for name in _STAT_FIELDS},
            "extended": _extended_of(a),
        }
        for a in sorted(entries, key=lambda a: a.filename)
    ]


_STAT_FIELDS = ("st_size", "st_uid", "st_gid", "st_mode", "st_atime", "st_mtime")


def _extended_of(entry: paramiko.SFTPAttributes | FolderEntry) -> dict[bytes, bytes]:
    if isinstance(entry, FolderEntry):
        return dict(entry.extended)
    # paramiko's `attr[get_string()] = get_string()` reads the value first: its extended
    # attributes come out as {value: name}.
    return {name: value for value, name in entry.attr.items()}  # type: ignore[misc]


# --- the listing against OpenSSH -------------------------------------------------------------


@pytest.mark.integration
def test_a_big_folder_lists_as_listdir_attr_and_the_disk_have_it(
    session: SftpSession, sftp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3000):
        path = sftp_dir / f"U1234567.Activity.{20250101 + i}.xml.pgp"
        path.write_bytes(b"x" * (i % 97))
        os.utime(path, (1_600_000_000 + i, 1_700_000_000 + 7 * i))
    (sftp_dir / "sub").mkdir()
    (sftp_dir / "link.pgp").symlink_to(sftp_dir / "sub")
    (sftp_dir / ".hidden.pgp").write_bytes(b"h")
    folder = str(sftp_dir)
    # paramiko's own listing fails on a name that is not UTF-8: compare before adding one.
    expected = _fields(session.sftp.listdir_attr(folder))
    assert len(expected) == 3003
    for ahead in (1, 7, remote.READDIR_AHEAD, 64):
        monkeypatch.setattr(remote, "READDIR_AHEAD", ahead)
        assert _fields(list_folder_entries(session.sftp, folder)) == expected, ahead

    fd = os.open(os.fsencode(sftp_dir) + b"/caf\xe9.pgp", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    for ahead in (1, remote.READDIR_AHEAD):
        monkeypatch.setattr(remote, "READDIR_AHEAD", ahead)
        listed = list_folder_entries(session.sftp, folder)
        assert _listed(listed) == _served(sftp_dir)
        assert "caf\udce9.pgp" in {a.filename for a in listed}
    # The same session goes on working: nothing of the listing is left to read.
    assert session.sftp.stat(folder + "/sub").st_mode == (sftp_dir / "sub").stat().st_mode


@pytest.mark.integration
def test_an_empty_folder_lists_nothing(session: SftpSession, sftp_dir: Path) -> None:
    assert list_folder_entries(session.sftp, str(sftp_dir)) == []
    assert session.sftp.listdir_attr(str(sftp_dir)) == []


@pytest.mark.integration
@pytest.mark.parametrize(
    ("files", "replies"),
    # OpenSSH answers a READDIR with up to 100 entries, "." and ".." among them.
    [(1, 1), (98, 1), (99, 2), (198, 2), (199, 3)],
)
def test_folders_at_the_edge_of_one_readdir_answer(
    session: SftpSession,
    sftp_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    files: int,
    replies: int,
) -> None:
    for i in range(files):
        (sftp_dir / f"f{i:04d}.pgp").write_bytes(b"x" * i)
    answers: list[int] = []
    add_names = remote._add_names

    def counting(data: bytes, entries: list[FolderEntry]) -> None:
        before = len(entries)
        add_names(data, entries)
        answers.append(len(entries) - before)

    monkeypatch.setattr(remote, "_add_names", counting)
    listed = list_folder_entries(session.sftp, str(sftp_dir))
    assert _listed(listed) == _served(sftp_dir)
    assert len(answers) == replies
    assert sum(answers) == files


class _Relay:
    """A TCP relay to the sshd whose server-to-client direction can be frozen: a server that
    stops answering, as a dead link or a hung server looks to the client."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._lock = threading.Lock()
        self._budget: int | None = None  # bytes still forwarded to the client; None: all
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._target = target
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        server = socket.create_connection(self._target)
        self._sockets += [client, server]
        threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def freeze_after(self, size: int) -> None:
        """Forward ``size`` more bytes to the client, then nothing."""
        with self._lock:
            self._budget = size

    def _pump(self, source: socket.socket, sink: socket.socket, freezable: bool) -> None:
        try:
            while data := source.recv(65536):
                if freezable:
                    with self._lock:
                        if self._budget is not None:
                            data = data[: self._budget]
                            self._budget -= len(data)
                if data:
                    sink.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


def _guarded(call: Callable[[], object]) -> BaseException | None:
    """What ``call`` raised, or None; fails the test if it is still running after the guard."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(_HANG_GUARD_S)
    assert outcome, f"still waiting after {_HANG_GUARD_S:g} s: a stalled server hangs the listing"
    return outcome[0]


@pytest.mark.integration
def test_a_server_that_stops_answering_mid_listing_is_a_transient_fault(
    sshd: SshdServer, login_key: paramiko.PKey, sftp_dir: Path, tmp_path: Path
) -> None:
    for i in range(2000):
        (sftp_dir / f"f{i:04d}.pgp").write_bytes(b"x")
    relay = _Relay((sshd.host, sshd.port))
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        "".join(
            line.replace(f"]:{sshd.port} ", f"]:{relay.port} ") + "\n"
            for line in sshd.known_hosts_lines
        )
    )
    cfg = _config(
        sshd,
        tmp_path,
        port=relay.port,
        known_hosts=str(known_hosts),
        remote_dir=str(sftp_dir),
        keepalive_s=0,
    )
    connected = SftpStore(SftpSettings.from_config(cfg), login_key).connect()
    try:
        # What timeout_s = 1 sets, after the handshake, which a loaded CI host once took more
        # than a second for: the listing's wait for an answer.
        channel = connected.sftp.get_channel()
        assert channel is not None and channel.gettimeout() == cfg.sftp.timeout_s
        channel.settimeout(1.0)
        assert len(connected.list_files().files) == 2000  # through the relay, before the stall
        # The listing is some 300 KB: the server goes quiet a few READDIR answers into it.
        relay.freeze_after(40_000)
        raised = _guarded(connected.list_files)
        assert isinstance(raised, remote.Transient), raised
        assert isinstance(raised.__cause__, TimeoutError)
    finally:
        relay.close()
        connected.close()


@pytest.mark.integration
def test_a_channel_closed_under_the_listing_is_a_transient_fault(session: SftpSession) -> None:
    # A line cut mid-listing can close the channel before the listing reads an answer; its next
    # request then fails with paramiko's bare OSError("Socket is closed"). That is a lost line,
    # retried, not a folder that cannot be listed (CI's listing-cut fault test once got the
    # latter: "Cannot list the remote folder ...: Socket is closed").
    channel = session.sftp.get_channel()
    assert channel is not None
    channel.close()
    with pytest.raises(remote.Transient, match="listing") as raised:
        session.list_files()
    assert "Socket is closed" in str(raised.value.__cause__)


# --- the listing's logic, against a scripted server ------------------------------------------


def _status(code: int, text: str) -> paramiko.Message:
    msg = paramiko.Message()
    msg.add_int(code)
    msg.add_string(text)
    msg.add_string("")
    return paramiko.Message(msg.asbytes())


def _names(names: list[str]) -> paramiko.Message:
    msg = paramiko.Message()
    msg.add_int(len(names))
    for name in names:
        attrs = paramiko.SFTPAttributes()
        attrs.st_size, attrs.st_mode = len(name), 0o100644
        attrs.st_uid = attrs.st_gid = 0
        attrs.st_atime = attrs.st_mtime = 1_700_000_000
        msg.add_string(name)
        msg.add_string(f"-rw-r--r-- 1 0 0 {len(name)} Nov 14 2023 {name}")
        attrs._pack(msg)  # type: ignore[attr-defined]
    return paramiko.Message(msg.asbytes())


Answer = tuple[int, paramiko.Message]


class _ScriptedSftp:
    """paramiko's request layer (the part list_folder_entries uses) with a scripted server
    that answers in the order asked: READDIR number i on a handle gets ``readdir(i)``.

    Requests come through paramiko's ``_async_request`` or as SFTP packets written to the
    channel (``_write_all``), numbered from paramiko's ``request_number``."""

    # raises EOFError or IOError
    _convert_status = paramiko.SFTPClient._convert_status  # type: ignore[attr-defined]

    def __init__(self, readdir: Callable[[int], Answer]) -> None:
        self.readdir = readdir
        self.log: list[int] = []  # request types, in the order sent
        self.writes: list[list[int]] = []  # the request types of each write to the channel
        self.unread: dict[int, Answer] = {}
        self.unread_at_close: list[int] = []
        self._served = 0
        self._lock = threading.Lock()
        self._expecting: dict[int, object] = {}
        self.request_number = 0
        self.opened = b""  # the folder of the last OPENDIR

    def _adjust_cwd(self, path: str) -> bytes:
        return path.encode()

    def _async_request(self, fileobj: object, kind: int, *args: object) -> int:
        if kind == CMD_OPENDIR:
            self.opened = cast(bytes, args[0])
        num = self.request_number
        self.request_number += 1
        self.writes.append([kind])
        self._serve(num, kind)
        return num

    def _write_all(self, data: bytes) -> None:
        kinds = []
        at = 0
        while at < len(data):
            length, kind, num = struct.unpack_from(">IBI", data, at)
            assert self._expecting.pop(num) is not None and num < self.request_number
            self._serve(num, kind)
            kinds.append(kind)
            at += 4 + length
        self.writes.append(kinds)

    def _serve(self, num: int, kind: int) -> None:
        self.log.append(kind)
        if kind == CMD_OPENDIR:
            self._served = 0
            msg = paramiko.Message()
            msg.add_string(b"handle")
            self.unread[num] = (CMD_HANDLE, paramiko.Message(msg.asbytes()))
        elif kind == CMD_READDIR:
            self.unread[num] = self.readdir(self._served)
            self._served += 1
        elif kind == CMD_CLOSE:
            self.unread_at_close.append(len(self.unread))

    def _read_response(self, num: int) -> Answer:
        kind, msg = self.unread.pop(num)
        if kind == CMD_STATUS:
            self._convert_status(msg)
        return kind, msg

    def _request(self, kind: int, *args: object) -> Answer:
        return self._read_response(self._async_request(None, kind, *args))


def _batches(*batches: list[str]) -> Callable[[int], Answer]:
    def answer(i: int) -> Answer:
        if i < len(batches):
            return CMD_NAME, _names(batches[i])
        return CMD_STATUS, _status(SFTP_EOF, "End of file")

    return answer


def _sftp(fake: _ScriptedSftp) -> paramiko.SFTPClient:
    return fake  # type: ignore[return-value]  # it has what list_folder_entries uses


def test_every_request_past_the_end_is_answered_before_the_close() -> None:
    fake = _ScriptedSftp(_batches(["a", ".", "b"], ["..", "c"]))
    listed = list_folder_entries(_sftp(fake), "f")
    assert sorted(a.filename for a in listed) == ["a", "b", "c"]
    # The window is topped up once half of it is answered: not after these three answers.
    assert fake.log.count(CMD_READDIR) == remote.READDIR_AHEAD
    assert fake.log[-1] == CMD_CLOSE and fake.unread_at_close == [0]


def test_the_listing_tops_up_its_requests_in_batches_and_reads_every_answer() -> None:
    ahead = remote.READDIR_AHEAD
    answers = 3 * ahead  # with names; then the end
    fake = _ScriptedSftp(_batches(*([f"n{i}.pgp"] for i in range(answers))))
    listed = list_folder_entries(_sftp(fake), "f")
    assert [a.filename for a in listed] == [f"n{i}.pgp" for i in range(answers)]
    readdirs = [w for w in fake.writes if CMD_READDIR in w]
    # One write for the first window, then one per half window answered, until the end.
    assert readdirs[0] == [CMD_READDIR] * ahead
    assert readdirs[1:] and all(w == [CMD_READDIR] * (ahead // 2) for w in readdirs[1:])
    # Every answer up to the end was asked for, and no more than a window past it.
    assert answers + 1 <= fake.log.count(CMD_READDIR) <= answers + 1 + ahead
    assert fake.log[-1] == CMD_CLOSE and fake.unread_at_close == [0]


def test_errors_past_the_end_are_ignored_and_an_error_before_it_raises() -> None:
    def after_end_fails(i: int) -> Answer:
        if i == 0:
            return CMD_NAME, _names(["a"])
        if i == 1:
            return CMD_STATUS, _status(SFTP_EOF, "End of file")
        return CMD_STATUS, _status(SFTP_FAILURE, "handle exhausted")

    listed = list_folder_entries(_sftp(_ScriptedSftp(after_end_fails)), "f")
    assert [a.filename for a in listed] == ["a"]

    def vanishes(i: int) -> Answer:
        if i == 0:
            return CMD_NAME, _names(["a"])
        return CMD_STATUS, _status(SFTP_NO_SUCH_FILE, "No such file")

    with pytest.raises(FileNotFoundError) as caught:
        list_folder_entries(_sftp(_ScriptedSftp(vanishes)), "f")
    assert caught.value.errno == errno.ENOENT


def test_names_after_the_end_make_the_listing_start_again_unpipelined() -> None:
    # A server that starts the folder over after its EOF, or answers out of order.
    def rewinds(i: int) -> Answer:
        if i == 2:
            return CMD_STATUS, _status(SFTP_EOF, "End of file")
        return CMD_NAME, _names(["a", "b"] if i % 3 == 0 else ["c"])

    fake = _ScriptedSftp(rewinds)
    listed = list_folder_entries(_sftp(fake), "f")
    assert sorted(a.filename for a in listed) == ["a", "b", "c"]
    assert fake.log.count(CMD_OPENDIR) == 2 and fake.log.count(CMD_CLOSE) == 2
    assert fake.log[-4:] == [CMD_READDIR, CMD_READDIR, CMD_READDIR, CMD_CLOSE]  # one at a time

    # list_files scans the second listing afresh: nothing in it was listed twice.
    listing = _session_on(_ScriptedSftp(rewinds)).list_files()
    assert [f.relative for f in listing.files] == ["a", "b", "c"] and not listing.refused


MTIME = 1_700_000_000


def _session_on(fake: _ScriptedSftp, *, recursive: bool = False) -> remote.SftpSession:
    """An SftpSession whose SFTP client is ``fake`` (no connection), listing folder "f"."""
    session = object.__new__(remote.SftpSession)
    known_hosts = KnownHosts(Path("known_hosts"), ())
    session.settings = SftpSettings(
        "h", 22, "u", known_hosts, remote_dir="f", patterns=("*",), recursive=recursive
    )
    session.sftp = _sftp(fake)
    return session


def _entries(entries: list[tuple[str, int, int]]) -> Answer:
    """A NAME answer with (name, mode, size) entries."""
    msg = paramiko.Message()
    msg.add_int(len(entries))
    for name, mode, size in entries:
        attrs = paramiko.SFTPAttributes()
        attrs.st_size, attrs.st_mode, attrs.st_uid, attrs.st_gid = size, mode, 0, 0
        attrs.st_atime = attrs.st_mtime = MTIME
        msg.add_string(name)
        msg.add_string(name)
        attrs._pack(msg)  # type: ignore[attr-defined]
    return CMD_NAME, paramiko.Message(msg.asbytes())


def test_a_listing_leaves_out_known_versions_and_refuses_a_name_to_fetch_listed_twice() -> None:
    file, folder = 0o100644, 0o040755
    answers = {
        b"f": [
            [("a.pgp", file, 1), ("b.pgp", file, 2), ("new-b.pgp", file, 7)],
            [("a.pgp", file, 5), ("sub", folder, 0), ("sub", folder, 0), ("b.pgp", file, 9)],
        ],
        b"f/sub": [[("c.pgp", file, 3), ("d.pgp", file, 4), ("c.pgp", file, 3)]],
    }

    def answer(i: int) -> Answer:
        batches = answers[fake.opened]
        return _entries(batches[i]) if i < len(batches) else (CMD_STATUS, _status(SFTP_EOF, ""))

    fake = _ScriptedSftp(answer)
    known = {("f/b.pgp", 2, MTIME), ("f/sub/c.pgp", 3, MTIME), ("f/new-b.pgp", 6, MTIME)}
    asked: list[bytes] = []  # the folder being listed when the known versions were asked for

    def known_versions() -> set[tuple[str, int, int]]:
        asked.append(fake.opened)
        return known

    listing = _session_on(fake, recursive=True).list_files(known_versions)
    # Once per folder, and only when its names had arrived: the caller may still be reading them.
    assert asked == [b"f", b"f/sub"]

    # Left out: b.pgp and sub/c.pgp (twice) as they were; new-b.pgp changed size, so it is
    # listed, and so is b.pgp's second entry, a size never fetched: one entry to fetch each.
    assert listing.known == 3
    assert [(f.path, f.relative, f.size) for f in listing.files] == [
        ("f/a.pgp", "a.pgp", 1),  # the first of its two entries
        ("f/b.pgp", "b.pgp", 9),
        ("f/new-b.pgp", "new-b.pgp", 7),
        ("f/sub/d.pgp", "sub/d.pgp", 4),
    ]
    twice = "listed more than once by the server"
    assert listing.refused == (Refused("a.pgp", twice), Refused("sub", twice))
    assert fake.log.count(CMD_OPENDIR) == 2  # f, and f/sub once

    # Without known versions, the same listing has every file once.
    fake = _ScriptedSftp(answer)
    everything = _session_on(fake, recursive=True).list_files()
    assert everything.known == 0
    assert [f.relative for f in everything.files] == [
        "a.pgp",
        "b.pgp",
        "new-b.pgp",
        "sub/c.pgp",
        "sub/d.pgp",
    ]
    assert [r.name for r in everything.refused] == ["a.pgp", "sub", "b.pgp", "sub/c.pgp"]


def test_a_listing_without_end_is_refused_after_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(remote, "MAX_READDIR_REQUESTS", 50)
    fake = _ScriptedSftp(lambda i: (CMD_NAME, _names([])))
    with pytest.raises(OSError, match="no end after 50"):
        list_folder_entries(_sftp(fake), "f")
    assert fake.log.count(CMD_READDIR) <= 50 + remote.READDIR_AHEAD
    monkeypatch.setattr(remote, "MAX_FOLDER_ENTRIES", 7)
    fake = _ScriptedSftp(lambda i: (CMD_NAME, _names([f"n{i}.{k}" for k in range(3)])))
    with pytest.raises(OSError, match="more than 7 entries"):
        list_folder_entries(_sftp(fake), "f")


def test_a_name_reply_is_parsed_as_paramiko_parses_it() -> None:
    msg = paramiko.Message()
    msg.add_int(3)
    for name, flags_set in ((b"caf\xe9.pgp", True), (b"plain.pgp", False), (b"..", True)):
        msg.add_string(name)
        msg.add_string(b"-rw-r--r-- " + name)
        attrs = paramiko.SFTPAttributes()
        if flags_set:
            attrs.st_size, attrs.st_uid, attrs.st_gid = 2**40, 1000, 1001
            attrs.st_mode, attrs.st_atime, attrs.st_mtime = 0o100600, 1, 2**32 - 1
            attrs.attr = {"x@example.com": "value"}
        attrs._pack(msg)  # type: ignore[attr-defined]
    data = msg.asbytes()
    entries: list[FolderEntry] = []
    remote._add_names(data, entries)

    reference = paramiko.Message(data)
    reference.get_int()
    expected = []
    for _ in range(2):
        name_text = reference.get_string().decode("utf-8", "surrogateescape")
        longname = reference.get_string().decode("utf-8", "replace")
        parsed = paramiko.SFTPAttributes._from_msg(reference, name_text, longname)  # type: ignore[attr-defined]
        expected.append(parsed)
    assert _fields(entries) == _fields(expected)
    assert [e.filename for e in entries] == ["caf\udce9.pgp", "plain.pgp"]
    assert entries[0].st_size == 2**40 and entries[0].st_mtime == 2**32 - 1
    assert entries[0].extended == ((b"x@example.com", b"value"),)
    assert entries[1] == ("plain.pgp", None, None, None, None, None, None, ())


@pytest.mark.parametrize("cut", [1, 4, 9, 30, -1])
def test_a_name_reply_that_ends_early_is_refused(cut: int) -> None:
    data = _names(["one.pgp", "two.pgp"]).asbytes()
    with pytest.raises(OSError, match="malformed"):
        remote._add_names(data[:cut], [])


def test_a_count_larger_than_the_reply_is_refused_at_once() -> None:
    with pytest.raises(OSError, match="malformed"):
        remote._add_names(b"\xff\xff\xff\xff" + b"\x00" * 64, [])


# --- RSA keys without the primality proof ----------------------------------------------------


@pytest.mark.integration
def test_an_encrypted_rsa_4096_key_loaded_this_way_logs_in(
    session: SftpSession, sshd: SshdServer, login_key: paramiko.PKey
) -> None:
    assert isinstance(login_key, paramiko.RSAKey)
    assert login_key.get_bits() == 4096
    assert remote.key_fingerprint(login_key) == fingerprint(sshd.client_public_line)
    assert session.transport.is_authenticated()
    assert session.transport.get_username() == sshd.username


@pytest.mark.integration
def test_ssh_keygen_rsa_keys_load_in_both_formats(tmp_path: Path) -> None:
    pem = tmp_path / "pem_rsa"
    secret = "test passphrase"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", secret, "-f", str(pem)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    openssh = tmp_path / "openssh_rsa"
    openssh.write_bytes(pem.read_bytes())
    openssh.chmod(0o600)
    # Rewriting the passphrase rewrites the file in OpenSSH's own format.
    subprocess.run(
        ["ssh-keygen", "-q", "-p", "-P", secret, "-N", secret, "-f", str(openssh)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert b"BEGIN RSA PRIVATE KEY" in pem.read_bytes()
    assert b"BEGIN OPENSSH PRIVATE KEY" in openssh.read_bytes()
    public = paramiko.RSAKey(
        data=base64.b64decode((tmp_path / "pem_rsa.pub").read_text().split()[1])
    )
    for path in (pem, openssh):
        key = load_private_key(path, secret)
        assert isinstance(key, rsa.RSAPrivateKey) and rsa_numbers_fit(key)
        loaded = remote.to_paramiko_key(key)
        assert loaded.asbytes() == public.asbytes()
        signature = loaded.sign_ssh_data(b"data", "rsa-sha2-256")
        assert public.verify_ssh_sig(b"data", paramiko.Message(signature.asbytes()))


@pytest.mark.parametrize("damage", ["d", "iqmp"])
def test_a_damaged_rsa_key_is_refused(
    ssh_client_keys: ClientKeys, tmp_path: Path, damage: str
) -> None:
    key = load_private_key(ssh_client_keys.rsa_path, ssh_client_keys.passphrase)
    assert isinstance(key, rsa.RSAPrivateKey) and rsa_numbers_fit(key)
    numbers = key.private_numbers()
    fields = {
        "p": numbers.p,
        "q": numbers.q,
        "d": numbers.d,
        "dmp1": numbers.dmp1,
        "dmq1": numbers.dmq1,
        "iqmp": numbers.iqmp,
    }
    fields[damage] += 2
    if damage == "d":  # the OpenSSH format stores d and derives dmp1, dmq1 from it
        fields["dmp1"] = fields["d"] % (numbers.p - 1)
        fields["dmq1"] = fields["d"] % (numbers.q - 1)
    damaged = rsa.RSAPrivateNumbers(**fields, public_numbers=numbers.public_numbers).private_key(
        unsafe_skip_rsa_key_validation=True
    )
    path = tmp_path / "damaged_rsa"
    path.write_bytes(
        damaged.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyProblem, match="damaged"):
        load_private_key(path, None)


# -- pipelined reads: the reply reader of _read_pipelined against a scripted server ----------


class _Channel:
    """The byte stream paramiko's Channel gives the SFTP client: recv takes what has arrived."""

    def __init__(self) -> None:
        self.stream = bytearray()
        self.closed_after: int | None = None  # bytes it delivers before it closes
        self.delivered = 0
        self.in_buffer = None  # not a PacketPipe: _recv_exactly reads without waiting first

    def recv(self, size: int) -> bytes:
        assert size > 0, "a read of nothing waits for a packet"
        limit = len(self.stream)
        if self.closed_after is not None:
            limit = min(limit, self.closed_after - self.delivered)
        if limit <= 0:
            assert self.closed_after is not None, "the reader would wait for an answer"
            return b""
        # At most 32 KiB at a time, as SSH packets bring them.
        out = bytes(self.stream[: min(size, limit, 32 * 1024)])
        del self.stream[: len(out)]
        self.delivered += len(out)
        return out


class _ScriptedReads:
    """paramiko's request layer as _read_pipelined uses it, with a server that answers each
    write of READs through ``answer`` (which may reorder, cut short or interleave)."""

    _convert_status = paramiko.SFTPClient._convert_status  # type: ignore[attr-defined]

    def __init__(
        self,
        content: bytes,
        answer: Callable[[list[tuple[int, int, int]]], list[bytes]] | None = None,
        serve_at_most: int | None = None,
    ) -> None:
        self.content = content
        self.sock = _Channel()
        self._lock = threading.Lock()
        self._expecting: dict[int, object] = {}
        self.request_number = 100
        self.writes: list[list[tuple[int, int, int]]] = []  # (number, offset, length) each
        self.serve_at_most = serve_at_most
        self.most_in_flight = 0  # requests asked and not yet answered, at most
        self.answer = answer or (lambda reads: [self.data(*r) for r in reads])

    def data(self, num: int, offset: int, length: int) -> bytes:
        served = self.content[offset : offset + min(length, self.serve_at_most or length)]
        return _reply(remote.CMD_DATA, num, struct.pack(">I", len(served)) + served)

    def _write_all(self, data: bytes) -> None:
        reads = []
        at = 0
        while at < len(data):
            length, kind, num = struct.unpack_from(">IBI", data, at)
            assert kind == remote.CMD_READ and num in self._expecting
            (handle_length,) = struct.unpack_from(">I", data, at + 9)
            assert data[at + 13 : at + 13 + handle_length] == b"handle"
            offset, size = struct.unpack_from(">QI", data, at + 13 + handle_length)
            reads.append((num, offset, size))
            at += 4 + length
        assert at == len(data)
        self.writes.append(reads)
        self.most_in_flight = max(self.most_in_flight, len(self._expecting))
        for packet in self.answer(reads):
            self.sock.stream += packet


def _reply(kind: int, num: int, body: bytes) -> bytes:
    return struct.pack(">IBI", 5 + len(body), kind, num) + body


def _status_reply(num: int, code: int, text: str) -> bytes:
    return _reply(CMD_STATUS, num, _status(code, text).asbytes())


def _read_all(fake: _ScriptedReads, chunk: int = 1024, *, to_the_end: bool = True) -> bytes:
    written: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> int:
            written.append(data)
            return len(data)

    remote._read_pipelined(
        fake,  # type: ignore[arg-type]  # it has what _read_pipelined uses
        b"handle",
        0,
        len(fake.content),
        chunk,
        Sink(),  # type: ignore[arg-type]
        lambda _count: None,
    )
    if to_the_end:
        assert not fake._expecting, "every request was answered and accounted for"
    return b"".join(written)


_CONTENT = bytes(range(256)) * 1000  # 256,000 bytes: 250 reads of 1 KiB


def test_reads_go_out_in_batches_and_bring_the_file_in_order() -> None:
    chunk = remote.READ_AHEAD_BYTES // 16
    content = os.urandom(40 * chunk + 1000)  # 41 reads, the last one short
    fake = _ScriptedReads(content)
    assert _read_all(fake, chunk) == content
    batch = 16 // remote.READ_BATCHES
    # The whole read-ahead first, then a batch whenever that many are answered: one write
    # (one SSH packet) per batch, not one per read.
    assert [len(w) for w in fake.writes] == [16, *([batch] * 6), 1]
    offsets = [offset for w in fake.writes for _, offset, _ in w]
    assert offsets == list(range(0, len(content), chunk))
    assert fake.writes[-1][0][2] == 1000


def test_replies_out_of_order_and_to_other_requests_still_give_the_file_in_order() -> None:
    def scrambled(reads: list[tuple[int, int, int]]) -> list[bytes]:
        # The answer to a close sent without waiting (paramiko registers it as NoneType), one
        # to a request nobody made, then this write's reads answered last first.
        closed = fake.request_number
        fake.request_number += 1
        fake._expecting[closed] = type(None)
        return [
            _status_reply(closed, 0, "Success"),
            _status_reply(7, 0, "Success"),
            *(fake.data(*r) for r in reversed(reads)),
        ]

    fake = _ScriptedReads(_CONTENT, scrambled)
    assert _read_all(fake) == _CONTENT


def test_short_reads_ask_for_the_rest_first_and_then_no_more_than_served() -> None:
    fake = _ScriptedReads(_CONTENT, serve_at_most=600)
    assert _read_all(fake) == _CONTENT
    first_short = fake.writes[1]
    assert first_short[0][1:] == (600, 1024 - 600)  # the rest of the first read, asked first
    assert max(size for w in fake.writes[2:] for _, _, size in w) <= 600


def test_a_server_that_serves_a_few_bytes_a_read_gets_no_more_reads_in_flight() -> None:
    fake = _ScriptedReads(_CONTENT[:100_000], serve_at_most=10)
    assert _read_all(fake) == _CONTENT[:100_000]
    # 4 MiB of 10-byte reads would be 419,430 requests in flight; OpenSSH's sftp keeps 64.
    assert remote.MAX_READS_AHEAD == 64
    assert fake.most_in_flight <= 64 + 1  # and the rest of a short read, asked first


def test_an_empty_data_reply_ends_the_read_early() -> None:
    def empties(reads: list[tuple[int, int, int]]) -> list[bytes]:
        return [_reply(remote.CMD_DATA, num, struct.pack(">I", 0)) for num, _, _ in reads]

    fake = _ScriptedReads(_CONTENT, empties)
    assert _read_all(fake, to_the_end=False) == b""  # the caller's size check tells
    assert len(fake.writes) == 1


@pytest.mark.parametrize(
    ("code", "error"), [(SFTP_EOF, EOFError), (SFTP_NO_SUCH_FILE, FileNotFoundError)]
)
def test_a_status_for_a_read_raises_as_paramiko_does(code: int, error: type[Exception]) -> None:
    def fails_third(reads: list[tuple[int, int, int]]) -> list[bytes]:
        return [
            _status_reply(num, code, "no") if offset == 2048 else fake.data(num, offset, size)
            for num, offset, size in reads
        ]

    fake = _ScriptedReads(_CONTENT, fails_third)
    with pytest.raises(error):
        _read_all(fake)


@pytest.mark.parametrize("cut", [3, 9, 11, 500])
def test_a_channel_that_closes_inside_a_reply_is_a_dropped_connection(cut: int) -> None:
    fake = _ScriptedReads(_CONTENT)
    fake.sock.closed_after = 2 * (13 + 1024) + cut  # two whole replies, then part of one
    with pytest.raises(paramiko.SSHException, match="Server connection dropped"):
        _read_all(fake)


@pytest.mark.parametrize("lie", ["data longer than the reply", "reply shorter than its head"])
def test_a_reply_whose_lengths_disagree_is_refused(lie: str) -> None:
    def lies(reads: list[tuple[int, int, int]]) -> list[bytes]:
        num, offset, size = reads[0]
        if lie == "reply shorter than its head":
            return [struct.pack(">IBI", 4, remote.CMD_DATA, num) + bytes(100)]
        body = struct.pack(">I", size + 1) + _CONTENT[offset : offset + size]
        return [_reply(remote.CMD_DATA, num, body)]

    with pytest.raises(paramiko.SFTPError, match="Garbage"):
        _read_all(_ScriptedReads(_CONTENT, lies))
