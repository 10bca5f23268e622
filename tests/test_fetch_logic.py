"""Pure logic of the fetcher: remote names, planning, known_hosts, the ledger. No network."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from paramiko.buffered_pipe import PipeTimeout

from statements.hostkeys import HostKey, KnownHosts, hosts_match, parse_known_hosts, pin
from statements.ledger import Ledger, RunCounts, ServerId
from statements.pipeline import _InBackground, inbox_name_for, plan
from statements.remote import (
    _PLAIN_NAME,
    PacketPipe,
    ReadAheadSocket,
    RemoteFile,
    _host_key_types,
    _name_problem_by_rules,
    matches,
    name_problem,
)

SERVER = ServerId("xfer.interactivebrokers.com", 32, "jdoe")


def key(kind: str, payload: bytes = b"k") -> HostKey:
    name = kind.encode()
    return HostKey(kind, len(name).to_bytes(4, "big") + name + payload)


def line(hosts: str, k: HostKey) -> str:
    return f"{hosts} {k.key_type} {base64.b64encode(k.blob).decode()}"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("U4698258.Trade_History.20260901.20260901.xml.pgp", None),
        ("Firm_2025_Q4.zip.pgp", None),
        ("../x.pgp", "contains a path separator"),
        ("x..pgp", "is or contains '..'"),
        ("/etc/passwd.pgp", "contains a path separator"),
        ("a/b.pgp", "contains a path separator"),
        ("a\\b.pgp", "contains a path separator"),
        ("nul\x00.pgp", "contains NUL"),
        ("line\nbreak.pgp", "contains a line break"),
        ("cr\rx.pgp", "contains a line break"),
        (".hidden.pgp", "starts with '.'"),
        ("..", "is or contains '..'"),
        ("x" * 252 + ".pgp", "longer than 255 bytes"),
        ("é" * 126 + ".pgp", "longer than 255 bytes"),  # 256 bytes in UTF-8
        ("bell\x07.pgp", "contains control characters"),
        ("", "empty name"),
    ],
)
def test_remote_names_are_untrusted(name: str, problem: str | None) -> None:
    assert name_problem(name) == problem


def test_the_quick_check_of_plain_names_agrees_with_every_rule() -> None:
    # name_problem passes printable ASCII names with one regex; the rules decide the rest.
    # Names near every rule's edge: dots, separators, controls, DEL, non-ASCII, escaped bytes,
    # lengths around 255.
    rng = random.Random(7)
    alphabet = ["a", "Z", "0", ".", "..", " ", "~", "-", "/", "\\", "\x00", "\n", "\x7f", "\x1b"]
    alphabet += ["é", "\udce9", "\u2028", "[", "]"]
    names = ["x" * n for n in (254, 255, 256)] + ["." + "x" * 254, "x" * 253 + ".."]
    names += ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(20_000)]
    quick = 0
    for name in names:
        assert name_problem(name) == _name_problem_by_rules(name), repr(name)
        quick += _PLAIN_NAME.fullmatch(name) is not None
    assert 1_000 < quick < len(names)  # both paths were taken, many times


def test_patterns_match_case_insensitively() -> None:
    patterns = ("*.pgp", "*.gpg", "*.asc")
    assert matches("U1.xml.PGP", patterns)
    assert matches("x.asc", patterns)
    assert not matches("x.pgp.part", patterns)
    assert not matches("readme.txt", patterns)


def remote(name: str, size: int = 10, mtime: int = 100) -> RemoteFile:
    return RemoteFile(path=f"outgoing/{name}", relative=name, size=size, mtime=mtime)


def test_plan_fetches_new_and_changed_versions_only() -> None:
    history = {("outgoing/old.pgp", 10, 100), ("outgoing/changed.pgp", 10, 100)}
    files = (remote("old.pgp"), remote("changed.pgp", size=11), remote("new.pgp"))
    planned, skipped = plan(files, history)
    assert skipped == 1
    assert [(p.remote.relative, p.version, p.inbox_name) for p in planned] == [
        ("changed.pgp", 2, "changed.pgp.v2"),
        ("new.pgp", 1, "new.pgp"),
    ]


def test_plan_numbers_a_third_version_after_two() -> None:
    history = {("outgoing/x.pgp", 10, 100), ("outgoing/x.pgp", 11, 200), ("outgoing/y.pgp", 1, 1)}
    planned, skipped = plan((remote("x.pgp", size=12, mtime=300), remote("y.pgp", 1, 1)), history)
    assert skipped == 1
    assert [(p.remote.relative, p.version, p.inbox_name) for p in planned] == [
        ("x.pgp", 3, "x.pgp.v3")
    ]


def test_inbox_names_are_flat_and_deterministic() -> None:
    nested = RemoteFile(path="outgoing/2026/x.pgp", relative="2026/x.pgp", size=1, mtime=1)
    assert inbox_name_for(nested, 1) == "2026__x.pgp"
    assert inbox_name_for(nested, 3) == "2026__x.pgp.v3"


# --- known_hosts ---------------------------------------------------------------------------


def test_known_hosts_port_entries_and_plain_hosts() -> None:
    k = key("ssh-ed25519")
    hosts = KnownHosts(Path("x"), tuple(parse_known_hosts(line("[h.example]:32", k))))
    assert hosts.check("h.example", 32, k) == "ok"
    assert hosts.check("h.example", 22, k) == "unknown"
    assert hosts.check("h.example", 32, key("ssh-ed25519", b"other")) == "changed"
    plain = KnownHosts(Path("x"), tuple(parse_known_hosts(line("h.example,10.0.0.1", k))))
    assert plain.check("h.example", 22, k) == "ok"
    assert plain.check("10.0.0.1", 22, k) == "ok"


def test_known_hosts_hashed_negated_wildcard_and_revoked() -> None:
    k = key("ssh-rsa")
    salt = b"0123456789abcdef0123"
    digest = hmac.new(salt, b"[xfer.example]:32", hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    entries = parse_known_hosts(line(hashed, k))
    assert KnownHosts(Path("x"), tuple(entries)).check("xfer.example", 32, k) == "ok"
    assert hosts_match("*.example,!bad.example", "good.example")
    assert not hosts_match("*.example,!bad.example", "bad.example")
    assert hosts_match("[h?.example]:32", "[h1.example]:32")
    revoked = parse_known_hosts(line("h", k) + "\n@revoked * " + line("", k).strip())
    assert KnownHosts(Path("x"), tuple(revoked)).check("h", 22, k) == "changed"


def test_known_hosts_ignores_damaged_lines() -> None:
    k = key("ssh-ed25519")
    text = "\n".join(
        [
            "# comment",
            "h ssh-ed25519",  # too short
            "h ssh-ed25519 !!!notbase64",
            line("h", key("ssh-rsa")).replace("ssh-rsa AAAA", "ssh-ed25519 AAAA"),  # type lies
            "@cert-authority " + line("h", k),
            line("h", k),
        ]
    )
    assert [e.key for e in parse_known_hosts(text)] == [k]


def test_pin_replaces_the_hosts_old_keys_and_keeps_others(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "known_hosts"
    other = key("ssh-ed25519", b"other-host")
    path.parent.mkdir()
    path.write_text(line("other.example", other) + "\n" + line("[h]:32", key("ssh-rsa")) + "\n")
    new = key("ssh-ed25519", b"new")
    pin(path, "h", 32, [new])
    loaded = KnownHosts.load(path)
    assert loaded.keys_for("h", 32) == [new]
    assert loaded.keys_for("other.example", 22) == [other]
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"


def test_pinned_key_types_are_offered_first() -> None:
    available = ("ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256")
    assert _host_key_types([key("ssh-rsa")], available)[:2] == ["rsa-sha2-512", "rsa-sha2-256"]
    assert _host_key_types([], available) == list(available)


# --- ledger --------------------------------------------------------------------------------


def test_ledger_migrates_once_and_uses_wal(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        assert ledger.schema_version >= 1
    with Ledger.open(tmp_path) as ledger:
        assert ledger.schema_version >= 1
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [r[0] for r in db.execute("SELECT version FROM schema_migrations")]
    assert versions == sorted(set(versions))


def test_ledger_refuses_a_newer_schema(tmp_path: Path) -> None:
    Ledger.open(tmp_path).close()
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'future', 'now')")
    with pytest.raises(Exception, match="newer version"):
        Ledger.open(tmp_path)


@pytest.mark.parametrize("folder", ["archive", "a b#c?d%e&f"])
def test_history_is_one_indexed_query_per_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    # history() opens the ledger by URI: odd names and a relative root must survive it.
    monkeypatch.chdir(tmp_path)
    root = Path(folder)
    with Ledger.open(root) as ledger:
        run = ledger.start_run("fetch")
        for i in range(300):
            ledger.record_fetched(
                SERVER,
                remote_path=f"f{i}.pgp",
                size=i,
                mtime=1,
                version=1,
                inbox_name=f"f{i}.pgp",
                run_id=run,
            )
        ledger.record_fetched(
            ServerId("other", 22, "x"),
            remote_path="f1.pgp",
            size=5,
            mtime=5,
            version=1,
            inbox_name="other-f1.pgp",
            run_id=run,
        )
        read: list[set[tuple[str, int, int]]] = []  # on another thread, as the fetch does
        reader = threading.Thread(target=lambda: read.append(ledger.history(SERVER)))
        reader.start()
        reader.join()
        ledger.finish_run(run, result="ok", exit_code=0, counts=RunCounts(fetched=301))
    assert len(read) == 1
    history = read[0]
    assert len(history) == 300 and {h for h in history if h[0] == "f1.pgp"} == {("f1.pgp", 1, 1)}
    with sqlite3.connect(root / "index.sqlite3") as db:
        query_plan = " ".join(
            str(r[3])
            for r in db.execute(
                "EXPLAIN QUERY PLAN SELECT remote_path, size, mtime FROM fetched "
                "WHERE host=? AND port=? AND username=?",
                ("h", 1, "u"),
            )
        )
    assert query_plan.startswith("SEARCH fetched USING COVERING INDEX"), query_plan


def test_a_background_read_hands_back_its_result_or_its_error() -> None:
    assert _InBackground(lambda: {("f.pgp", 1, 1)}, "test").result() == {("f.pgp", 1, 1)}

    def fails() -> set[tuple[str, int, int]]:
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        _InBackground(fails, "test").result()


def test_refused_names_are_recorded_once_with_a_count(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        ledger.record_refused(SERVER, [("../x.pgp", "is or contains '..'")])
        ledger.record_refused(SERVER, [("../x.pgp", "is or contains '..'")])
        assert ledger.refused_names(SERVER) == {"../x.pgp": "is or contains '..'"}
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        assert db.execute("SELECT times FROM refused").fetchone()[0] == 2


# --- the channel buffer and the socket paramiko reads through ---------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_packet_pipe_reads_the_bytes_fed_in_order_whatever_the_sizes(seed: int) -> None:
    rng = random.Random(seed)
    pipe = PacketPipe()
    fed = bytearray()
    for _ in range(200):
        packet = rng.randbytes(rng.choice((1, 4, 100, 32768)))
        pipe.feed(packet)
        fed += packet
    assert len(pipe) == len(fed)
    got = bytearray()
    while len(got) < len(fed):
        got += pipe.read(rng.choice((1, 4, 13, 4096, 70000)))  # SFTP: a length, then the rest
        assert len(pipe) == len(fed) - len(got)
    assert got == fed
    assert not pipe.read_ready()


def test_packet_pipe_waits_times_out_and_ends_as_bufferedpipe() -> None:
    pipe = PacketPipe()
    event = threading.Event()
    pipe.set_event(event)
    assert not event.is_set()
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.0)
    started = time.monotonic()
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.2)
    assert 0.15 < time.monotonic() - started < 5
    threading.Timer(0.1, pipe.feed, args=(b"late",)).start()
    assert pipe.read(10, timeout=5) == b"late"  # a waiting read wakes when a packet comes
    pipe.feed(b"abcdef")
    assert event.is_set()
    assert pipe.read(3) == b"abc" and pipe.empty() == b"def"
    assert not event.is_set()
    pipe.feed(b"rest")
    pipe.close()
    assert pipe.read(100) == b"rest"  # what came before the close is still read
    assert pipe.read(100) == b""  # then the end, at once
    assert event.is_set()


def test_packet_pipe_wait_for_sleeps_until_all_of_a_reply_has_come() -> None:
    pipe = PacketPipe()
    waiter = threading.Thread(target=pipe.wait_for, args=(100, 5.0))
    waiter.start()
    for _ in range(9):  # 90 bytes of the 100: the waiter must still be waiting
        pipe.feed(b"x" * 10)
        time.sleep(0.01)
    assert waiter.is_alive()
    pipe.feed(b"y" * 10)
    waiter.join(5)
    assert not waiter.is_alive()
    assert pipe.read(100) == b"x" * 90 + b"y" * 10


def test_packet_pipe_wait_for_times_out_only_when_nothing_comes() -> None:
    pipe = PacketPipe()

    def drip() -> None:
        for _ in range(20):
            time.sleep(0.05)
            pipe.feed(b"d")

    dripping = threading.Thread(target=drip)
    started = time.monotonic()
    dripping.start()
    pipe.wait_for(20, timeout=0.3)  # a slow server that keeps sending: 1 s, no timeout
    dripping.join()
    assert time.monotonic() - started > 0.5 and len(pipe) == 20
    with pytest.raises(PipeTimeout):
        pipe.wait_for(21, timeout=0.2)  # nothing more comes
    with pytest.raises(PipeTimeout):
        pipe.wait_for(21, timeout=0.0)
    pipe.close()
    pipe.wait_for(21, timeout=5)  # closed: returns with what there is
    assert pipe.read(100) == b"d" * 20


def test_packet_pipe_wait_for_times_out_counting_from_the_last_byte() -> None:
    # The waiter is not woken by a packet that leaves it short, yet a stall must still be
    # timeout seconds after the last byte: here 2.2 s, not the 4 s of a timer restarted late.
    pipe = PacketPipe()
    threading.Timer(0.2, pipe.feed, args=(b"part",)).start()
    started = time.monotonic()
    with pytest.raises(PipeTimeout):
        pipe.wait_for(100, timeout=2.0)
    assert 2.0 < time.monotonic() - started < 3.5


def test_packet_pipe_wakes_a_plain_read_while_another_waits_for_more() -> None:
    pipe = PacketPipe()
    big = threading.Thread(target=pipe.wait_for, args=(1000, 5.0))
    big.start()
    time.sleep(0.05)
    got: list[bytes] = []
    small = threading.Thread(target=lambda: got.append(pipe.read(10, timeout=5)))
    small.start()
    time.sleep(0.05)
    pipe.feed(b"first")
    small.join(5)
    assert got == [b"first"] and big.is_alive()
    pipe.close()
    big.join(5)
    assert not big.is_alive()


def test_read_ahead_socket_serves_small_reads_from_one_large_one() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(10)  # a bug here fails the test instead of hanging it
        wrapped = ReadAheadSocket(ours)
        data = random.Random(1).randbytes(300_000)
        sender = threading.Thread(target=theirs.sendall, args=(data,))
        sender.start()
        got = bytearray()
        sizes = iter([4, 16, 32768, 1, 100_000] * 100)
        while len(got) < len(data):
            got += wrapped.recv(next(sizes))
        sender.join()
        assert got == data
        wrapped.settimeout(0.1)  # everything else is the socket's own
        with pytest.raises(TimeoutError):
            wrapped.recv(4)
        theirs.close()
        assert wrapped.recv(4) == b""  # the end of the connection, as a socket says it
