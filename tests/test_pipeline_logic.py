"""The pipeline's logic with small fakes for the server and gpg; real SQLite and real files."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

from statements import pipeline
from statements.archive import UnpackLimits
from statements.errors import ExitCode, StatementsError, ThreadLimit
from statements.fsutil import DirectWriter
from statements.ledger import Ledger, ServerId
from statements.pipeline import (
    ArchiveJob,
    archive_inbox,
    fetch_new,
    repair_archive_state,
)
from statements.store import (
    KnownVersions,
    Listing,
    Refused,
    RemoteFile,
    Transient,
    nothing_known,
)

SERVER = ServerId("h", 32, "u")
LIMITS = UnpackLimits(max_members=100, max_unpacked_bytes=10**8, max_ratio=200)


@dataclass
class FakeServer:
    files: dict[str, tuple[bytes, int]]  # name -> (content, mtime)
    drop_after: int | None = None  # bytes served per connection before a Transient
    explode_on: str | None = None  # a name whose download raises an unexpected error
    stop_after: tuple[int, threading.Event] | None = None  # set the event after N bytes
    downloads: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each download started
    connections: int = 0
    chunk_pause: float = 0.0  # seconds per 1000 bytes served, so that downloads overlap
    running: list[str] = field(default_factory=list)  # the downloads in progress
    most_at_once: list[list[str]] = field(default_factory=list)  # running, at each start
    lock: threading.Lock = field(default_factory=threading.Lock)
    max_connections: int | None = None  # more: ThreadLimit, as paramiko's thread cannot start

    def connect(self) -> FakeSession:
        with self.lock:
            self.connections += 1
            if self.max_connections is not None and self.connections > self.max_connections:
                raise ThreadLimit.reached(
                    "SSH connection's thread", RuntimeError("can't start new thread")
                )
        return FakeSession(self)


@dataclass
class FakeSession:
    server: FakeServer
    served: int = 0

    def list_files(self, known: KnownVersions = nothing_known) -> Listing:
        versions = known()
        files = [
            RemoteFile(name, name, len(data), mtime)
            for name, (data, mtime) in sorted(self.server.files.items())
        ]
        return Listing(
            tuple(f for f in files if (f.path, f.size, f.mtime) not in versions),
            (Refused("../x.pgp", "contains a path separator"),),
            sum((f.path, f.size, f.mtime) in versions for f in files),
        )

    def download(
        self, remote: RemoteFile, sink: BinaryIO, offset: int, progress: Callable[[int], None]
    ) -> None:
        with self.server.lock:
            self.server.running.append(remote.path)
            self.server.most_at_once.append(list(self.server.running))
        try:
            self._download(remote, sink, offset, progress)
        finally:
            with self.server.lock:
                self.server.running.remove(remote.path)

    def _download(
        self, remote: RemoteFile, sink: BinaryIO, offset: int, progress: Callable[[int], None]
    ) -> None:
        self.server.downloads.append(remote.path)
        self.server.offsets.append(offset)
        if remote.path == self.server.explode_on:
            raise RuntimeError("a bug in the transfer code")
        data = self.server.files[remote.path][0]
        for start in range(offset, len(data), 1000):
            chunk = data[start : start + 1000]
            if self.server.drop_after is not None and self.served >= self.server.drop_after:
                raise Transient("connection dropped")
            sink.write(chunk)
            self.served += len(chunk)
            time.sleep(self.server.chunk_pause)
            if self.server.stop_after and self.served >= self.server.stop_after[0]:
                self.server.stop_after[1].set()  # as SIGTERM would, from another thread
            progress(len(chunk))

    def remove(self, remote: RemoteFile) -> None:
        del self.server.files[remote.path]

    def close(self) -> None:
        pass


def fetch(server: FakeServer, root: Path, ledger: Ledger, **kwargs: object):  # type: ignore[no-untyped-def]
    return fetch_new(server, ledger, SERVER, root, workers=3, retries=2, **kwargs)  # type: ignore[arg-type]


def inbox(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / ".inbox").iterdir()}


@pytest.fixture(params=["in the reader", "on a writer thread", "past the page cache"])
def each_sink(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run a download test with the .part written by the SFTP reader (small files), by a
    _BackgroundSink's thread (files of BACKGROUND_WRITE_BYTES and more) and by that thread with
    O_DIRECT writes (DIRECT_WRITE_BYTES and more, from the first byte): same outcome. The test
    must write on disk_folder, where direct writes are possible."""
    if request.param != "in the reader":
        monkeypatch.setattr(pipeline, "BACKGROUND_WRITE_BYTES", 1)
    if request.param != "past the page cache":
        yield
        return
    monkeypatch.setattr(pipeline, "DIRECT_WRITE_BYTES", 1)
    monkeypatch.setattr(DirectWriter, "CHUNK", 4096)  # these files are a few KiB
    attached: list[bool] = []
    attach = DirectWriter.attach

    def spying(fd: int) -> DirectWriter | None:
        writer = attach(fd)
        attached.append(writer is not None)
        return writer

    monkeypatch.setattr(DirectWriter, "attach", spying)
    yield
    assert attached, "no download was written direct"
    assert all(attached), "direct writes were refused: the disk must be ext4, XFS or Btrfs"


def test_fetch_plans_downloads_commits_and_then_skips(disk_folder: Path, each_sink: None) -> None:
    server = FakeServer({f"f{i}.pgp": (bytes([i]) * (5000 + i), 100) for i in range(7)})
    with Ledger.open(disk_folder) as ledger:
        first = fetch(server, disk_folder, ledger)
        assert (first.fetched, first.skipped, first.refused, first.failures) == (7, 0, 1, [])
        assert inbox(disk_folder) == {n: d for n, (d, _) in server.files.items()}
        assert ledger.refused_names(SERVER) == {"../x.pgp": "contains a path separator"}
        second = fetch(server, disk_folder, ledger)
        assert (second.fetched, second.skipped) == (0, 7)
    assert len(server.downloads) == 7


@pytest.mark.parametrize("small_files", [0, 6])
def test_at_most_two_big_downloads_run_at_once_while_small_ones_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_files: int
) -> None:
    # Each big download holds megabytes of buffers: with four workers on eight big reports,
    # peak memory went over 100 MiB. The small files keep the other workers busy meanwhile.
    monkeypatch.setattr(pipeline, "BACKGROUND_WRITE_BYTES", 20_000)
    files = {f"big{i}.pgp": (bytes([i]) * 20_000, 100) for i in range(5)}
    files |= {f"small{i}.pgp": (bytes([i]) * 5_000, 100) for i in range(small_files)}
    server = FakeServer(files, chunk_pause=0.005)
    with Ledger.open(tmp_path) as ledger:
        summary = fetch_new(server, ledger, SERVER, tmp_path, workers=4, retries=2)  # type: ignore[arg-type]
    assert (summary.fetched, summary.failures) == (len(files), [])
    assert inbox(tmp_path) == {n: d for n, (d, _) in files.items()}
    bigs_at_once = [sum(n.startswith("big") for n in running) for running in server.most_at_once]
    assert max(bigs_at_once) == pipeline.BIG_DOWNLOADS_AT_ONCE == 2
    if small_files:  # the other two workers were not left idle
        assert max(map(len, server.most_at_once)) == 4


def test_a_dropped_transfer_resumes_from_the_bytes_on_disk(
    disk_folder: Path, each_sink: None
) -> None:
    data = bytes(range(256)) * 100
    server = FakeServer({"big.pgp": (data, 5)}, drop_after=9000)
    with Ledger.open(disk_folder) as ledger:
        summary = fetch(server, disk_folder, ledger)
        rows = ledger.fetched_rows()
    assert summary.failures == []
    assert inbox(disk_folder) == {"big.pgp": data}
    assert [(r.size, r.mtime) for r in rows] == [(len(data), 5)]
    assert int((disk_folder / ".inbox" / "big.pgp").stat().st_mtime) == 5
    # Each drop costs a connection, not the file, nor a byte received: every resume starts
    # where the bytes received before the drop end (9000 is not a multiple of a direct
    # writer's 4096-byte buffer: its partial buffer was written too).
    assert server.offsets == [0, 9000, 18000]


def test_no_progress_exhausts_retries_and_the_file_fails_alone(tmp_path: Path) -> None:
    server = FakeServer({"a.pgp": (b"a" * 3000, 1), "b.pgp": (b"b" * 10, 1)}, drop_after=0)
    with Ledger.open(tmp_path) as ledger:
        summary = fetch(server, tmp_path, ledger)
        assert sorted(f.name for f in summary.failures) == ["a.pgp", "b.pgp"]
        assert ledger.fetched_rows() == []
    # What was not fetched is not in the inbox as a finished file.
    assert not [n for n in inbox(tmp_path) if not n.endswith(".part")]


def test_an_unexpected_error_costs_one_file_and_is_reported(tmp_path: Path) -> None:
    server = FakeServer({"a.pgp": (b"a" * 10, 1), "b.pgp": (b"b" * 10, 1)}, explode_on="a.pgp")
    with Ledger.open(tmp_path) as ledger:
        summary = fetch(server, tmp_path, ledger)
    assert [f.name for f in summary.failures] == ["a.pgp"]
    assert "a bug in the transfer code" in summary.failures[0].reason
    assert inbox(tmp_path) == {"b.pgp": b"b" * 10}


def test_a_file_renamed_but_not_committed_is_adopted_not_downloaded(tmp_path: Path) -> None:
    server = FakeServer({"a.pgp": (b"payload" * 50, 1)})
    (tmp_path / ".inbox").mkdir()
    left = tmp_path / ".inbox" / "a.pgp"
    left.write_bytes(b"payload" * 50)  # the crash left it here, dated as downloads are
    os.utime(left, (1, 1))
    with Ledger.open(tmp_path) as ledger:
        summary = fetch(server, tmp_path, ledger)
        assert summary.fetched == 1 and server.downloads == []
        assert [(r.inbox_name, r.size, r.mtime) for r in ledger.fetched_rows()] == [
            ("a.pgp", 350, 1)
        ]


@pytest.mark.parametrize("mtime", [2, None])  # another date; written by hand just now
def test_a_file_in_the_inbox_not_dated_as_the_download_is_downloaded_over(
    tmp_path: Path, mtime: int | None
) -> None:
    server = FakeServer({"a.pgp": (b"payload" * 50, 1)})
    (tmp_path / ".inbox").mkdir()
    dropped = tmp_path / ".inbox" / "a.pgp"
    dropped.write_bytes(b"PAYLOAD" * 50)  # the same size
    if mtime is not None:
        os.utime(dropped, (mtime, mtime))
    with Ledger.open(tmp_path) as ledger:
        summary = fetch(server, tmp_path, ledger)
        assert summary.fetched == 1 and server.downloads == ["a.pgp"]
        assert [r.inbox_name for r in ledger.fetched_rows()] == ["a.pgp"]
    assert inbox(tmp_path) == {"a.pgp": b"payload" * 50}


def test_a_part_of_another_version_is_discarded(tmp_path: Path) -> None:
    server = FakeServer({"a.pgp": (b"new content!" * 100, 200)})
    (tmp_path / ".inbox").mkdir()
    stale = tmp_path / ".inbox" / "a.pgp.part"
    stale.write_bytes(b"old" * 10)  # its mtime is now, not the remote file's 200
    with Ledger.open(tmp_path) as ledger:
        fetch(server, tmp_path, ledger)
    assert inbox(tmp_path) == {"a.pgp": b"new content!" * 100}


def test_stop_means_no_new_file_is_started(tmp_path: Path) -> None:
    server = FakeServer({f"f{i}.pgp": (b"x" * 10, 1) for i in range(20)})
    stop = threading.Event()
    stop.set()
    with Ledger.open(tmp_path) as ledger:
        summary = fetch(server, tmp_path, ledger, stop=stop)
    assert summary.fetched == 0 and server.downloads == []


def test_a_stop_mid_file_abandons_it_resumably_and_is_no_failure(
    tmp_path: Path, each_sink: None
) -> None:
    data = bytes(range(256)) * 200
    stop = threading.Event()
    server = FakeServer({"big.pgp": (data, 7), "next.pgp": (b"n" * 100, 7)})
    server.stop_after = (12_000, stop)
    with Ledger.open(tmp_path) as ledger:
        summary = fetch(server, tmp_path, ledger, stop=stop)
        # next.pgp runs on another worker: it may land, be abandoned too, or never start,
        # depending on when the stop comes; nothing fails and nothing is lost either way.
        assert summary.failures == [] and 1 <= summary.abandoned <= 2
        part = tmp_path / ".inbox" / "big.pgp.part"
        assert 12_000 <= part.stat().st_size < len(data)
        assert "big.pgp" not in {row.inbox_name for row in ledger.fetched_rows()}
        server.stop_after = None
        again = fetch(server, tmp_path, ledger)  # the next run resumes from the .part
    assert summary.fetched + again.fetched == 2 and inbox(tmp_path)["big.pgp"] == data


def test_the_writer_thread_writes_every_reply_in_order(tmp_path: Path) -> None:
    replies = [
        random.Random(i).randbytes(random.Random(-i).randrange(1, 300_000)) for i in range(300)
    ]
    part = tmp_path / "f.part"
    with part.open("w+b", buffering=0) as handle:
        handle.write(b"head")  # a resumed download: the sink appends after the offset
        sink = pipeline._BackgroundSink(handle, 4, None)
        for reply in replies:  # far more than the queue holds: the reader waits for the writer
            assert sink.write(reply) == len(reply)
        sink.drain()
        sink.stop()  # a second stop is harmless
    whole = b"head" + b"".join(replies)
    assert part.read_bytes() == whole
    assert sink.written == len(whole) - 4


def test_a_download_whose_writer_thread_cannot_start_leaves_no_thread_and_no_part(
    disk_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At a thread limit (ulimit -u, a container's pids.max) the part-writer cannot start: the
    # download fails, the direct writer's thread, started just before it, stops, and no empty
    # .part is left behind.
    monkeypatch.setattr(pipeline, "BACKGROUND_WRITE_BYTES", 1)
    monkeypatch.setattr(pipeline, "DIRECT_WRITE_BYTES", 1)
    monkeypatch.setattr(DirectWriter, "CHUNK", 4096)
    attached: list[DirectWriter | None] = []
    attach = DirectWriter.attach

    def spying(fd: int) -> DirectWriter | None:
        attached.append(attach(fd))
        return attached[-1]

    monkeypatch.setattr(DirectWriter, "attach", spying)

    def no_thread(*args: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(pipeline._BackgroundSink, "__init__", no_thread)
    server = FakeServer({"f.pgp": (b"x" * 5000, 100)})
    planned = pipeline.PlannedFetch(RemoteFile("f.pgp", "f.pgp", 5000, 100), 1, "f.pgp")
    inbox_folder = disk_folder / ".inbox"
    inbox_folder.mkdir()
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="can't start new thread"):
        pipeline.download_one(server.connect(), planned, inbox_folder, lambda _count: None)  # type: ignore[arg-type]
    assert attached and attached[0] is not None, "the .part was not opened for direct writes"
    assert [t.name for t in threading.enumerate() if t not in before] == []
    assert list(inbox_folder.iterdir()) == [] and server.downloads == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_write_error_on_the_writer_thread_reaches_the_reader_and_never_blocks_it() -> None:
    with open("/dev/full", "r+b", buffering=0) as handle:
        sink = pipeline._BackgroundSink(handle, 0, None)
        with pytest.raises(OSError) as raised:
            # The disk-full error comes back at a later write, or at the latest from drain();
            # writes after it never wait on a queue that nobody empties.
            for _ in range(10 * sink.QUEUE_REPLIES):
                sink.write(b"x" * 4096)
            sink.drain()
        sink.stop()
    assert raised.value.errno == errno.ENOSPC


class FakeDecryptor:
    """'Decrypts' by copying; a file whose content starts with BAD fails like gpg would."""

    @dataclass(frozen=True)
    class Result:
        sha256: str
        signature: str = "none"
        signer_fingerprint: str | None = None

    def decrypt(self, source: Path, output: Path) -> FakeDecryptor.Result:
        if source.read_bytes().startswith(b"BAD"):
            raise StatementsError(
                "not encrypted to a key we hold", "import it", exit_code=ExitCode.PARTIAL
            )
        shutil.copyfile(source, output)
        return FakeDecryptor.Result(hashlib.sha256(output.read_bytes()).hexdigest())


def archived(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file()
        and not p.relative_to(root).parts[0].startswith(".")
        and not p.name.startswith("index.sqlite3")
    }


def fetched_ledger(tmp_path: Path, files: dict[str, bytes]) -> FakeServer:
    server = FakeServer({name: (data, 1) for name, data in files.items()})
    with Ledger.open(tmp_path) as ledger:
        fetch(server, tmp_path, ledger)
    return server


def test_archive_files_quarantines_failures_and_keeps_ciphertexts(tmp_path: Path) -> None:
    fetched_ledger(
        tmp_path,
        {
            "U1234567.Trade_History.20260901.20260901.xml.pgp": b"<trades/>",
            "odd name.pgp": b"odd",
            "broken.pgp": b"BAD bytes",
        },
    )
    with Ledger.open(tmp_path) as ledger:
        job = ArchiveJob(tmp_path, FakeDecryptor(), LIMITS, True, None)
        summary = archive_inbox(ledger, job)
    assert summary.processed == 2 and [f.name for f in summary.failures] == ["broken.pgp"]
    tree = archived(tmp_path)
    assert tree["U1234567/2026/U1234567.Trade_History.20260901.20260901.xml"] == b"<trades/>"
    assert next(k for k in tree if k.startswith("_unsorted/")).endswith("/odd name")
    error = (tmp_path / ".quarantine" / "broken.pgp.error.txt").read_text()
    assert "not encrypted to a key we hold" in error and "import it" in error
    assert f"(9 bytes, sha256 {hashlib.sha256(b'BAD bytes').hexdigest()})" in error
    assert (tmp_path / ".quarantine" / "broken.pgp").read_bytes() == b"BAD bytes"
    assert sorted(p.name for p in (tmp_path / ".encrypted").iterdir()) == [
        "U1234567.Trade_History.20260901.20260901.xml.pgp",
        "odd name.pgp",
    ]
    assert list((tmp_path / ".inbox").iterdir()) == []


def test_a_crash_after_placing_before_committing_is_repaired_without_a_copy(
    tmp_path: Path,
) -> None:
    name = "U1234567.Trade_History.20260901.20260901.xml"
    fetched_ledger(tmp_path, {f"{name}.pgp": b"<trades/>"})
    # The killed run had already linked the plaintext into place, and left its work folder.
    target = tmp_path / "U1234567" / "2026" / name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"<trades/>")
    (tmp_path / ".work" / "1").mkdir(parents=True)
    with Ledger.open(tmp_path) as ledger:
        repair_archive_state(ledger, tmp_path, keep_encrypted=True)
        assert not (tmp_path / ".work").exists()
        archive_inbox(ledger, ArchiveJob(tmp_path, FakeDecryptor(), LIMITS, True, None))
        assert ledger.archived_for(1) == [f"U1234567/2026/{name}"]
    assert archived(tmp_path) == {f"U1234567/2026/{name}": b"<trades/>"}


def test_a_ciphertext_left_in_the_inbox_after_commit_is_retired(tmp_path: Path) -> None:
    fetched_ledger(tmp_path, {"x.pgp": b"content"})
    with Ledger.open(tmp_path) as ledger:
        archive_inbox(ledger, ArchiveJob(tmp_path, FakeDecryptor(), LIMITS, True, None))
        # As if the run died between the commit and moving the ciphertext away:
        (tmp_path / ".encrypted" / "x.pgp").replace(tmp_path / ".inbox" / "x.pgp")
        repair_archive_state(ledger, tmp_path, keep_encrypted=True)
    assert list((tmp_path / ".inbox").iterdir()) == []
    assert (tmp_path / ".encrypted" / "x.pgp").read_bytes() == b"content"


@pytest.mark.parametrize("keep", [True, False])
def test_a_foreign_file_in_the_inbox_under_an_archived_name_is_left_alone(
    tmp_path: Path, keep: bool, caplog: pytest.LogCaptureFixture
) -> None:
    fetched_ledger(tmp_path, {"x.pgp": b"content"})
    with Ledger.open(tmp_path) as ledger:
        archive_inbox(ledger, ArchiveJob(tmp_path, FakeDecryptor(), LIMITS, keep, None))
        dropped = tmp_path / ".inbox" / "x.pgp"
        for other in (b"CONTENT", b"other bytes"):  # the same size, then another size
            dropped.write_bytes(other)
            repair_archive_state(ledger, tmp_path, keep_encrypted=keep)
            assert dropped.read_bytes() == other
        # A link to the very bytes fetched: moved over .encrypted/x.pgp it could point at itself.
        dropped.unlink()
        elsewhere = tmp_path / ".elsewhere.pgp"
        elsewhere.write_bytes(b"content")
        dropped.symlink_to(tmp_path / ".encrypted" / "x.pgp" if keep else elsewhere)
        repair_archive_state(ledger, tmp_path, keep_encrypted=keep)
        assert dropped.is_symlink()
    encrypted = tmp_path / ".encrypted"
    kept = {p.name: p.read_bytes() for p in encrypted.iterdir()} if encrypted.exists() else {}
    assert kept == ({"x.pgp": b"content"} if keep else {})
    assert caplog.text.count("is not the file fetched under that name") == 3
    assert list(archived(tmp_path).values()) == [b"content"]


@pytest.mark.parametrize("keep", [True, False])
def test_keep_encrypted_off_deletes_the_ciphertext_only_after_archiving(
    tmp_path: Path, keep: bool
) -> None:
    fetched_ledger(tmp_path, {"x.pgp": b"content"})
    with Ledger.open(tmp_path) as ledger:
        archive_inbox(ledger, ArchiveJob(tmp_path, FakeDecryptor(), LIMITS, keep, None))
    assert (tmp_path / ".encrypted" / "x.pgp").exists() is keep
    assert len(archived(tmp_path)) == 1


def test_archiving_on_several_threads_files_each_once(tmp_path: Path) -> None:
    files = {
        f"U{1000000 + i}.Trade_History.20260901.20260901.xml.pgp": f"<t{i}/>".encode()
        for i in range(40)
    }
    files["broken.pgp"] = b"BAD bytes"
    # Two versions of one report, landing in the same run: one is v2, neither is lost.
    files["same.xml.pgp"] = b"first"
    # And one report delivered twice with the same content: archived once.
    files["twin.xml.pgp"] = b"twin"
    fetched_ledger(tmp_path, files)
    server = FakeServer({"same.xml.pgp": (b"second", 2), "twin.xml.pgp": (b"twin", 2)})
    with Ledger.open(tmp_path) as ledger:
        fetch(server, tmp_path, ledger)
        job = ArchiveJob(tmp_path, FakeDecryptor(), LIMITS, True, None, workers=4)
        summary = archive_inbox(ledger, job)
        assert ledger.fetched_rows(("fetched",)) == []
    assert summary.processed == 44 and [f.name for f in summary.failures] == ["broken.pgp"]
    assert sorted(summary.archived_ids) == sorted(set(summary.archived_ids))
    tree = archived(tmp_path)
    for name, data in files.items():
        if name.startswith("U"):
            account = name.split(".")[0]
            assert tree[f"{account}/2026/{name.removesuffix('.pgp')}"] == data
    unsorted = sorted(v for k, v in tree.items() if k.startswith("_unsorted/"))
    assert unsorted == [b"first", b"second", b"twin"]
    assert len(tree) == 43


def test_a_stop_lets_parallel_archiving_finish_its_files_and_start_no_other(
    tmp_path: Path,
) -> None:
    fetched_ledger(tmp_path, {f"f{i}.pgp": b"x" * i for i in range(30)})
    stop = threading.Event()

    class StoppingDecryptor(FakeDecryptor):
        def decrypt(self, source: Path, output: Path) -> FakeDecryptor.Result:
            stop.set()  # as SIGTERM would, during the first files
            return super().decrypt(source, output)

    with Ledger.open(tmp_path) as ledger:
        job = ArchiveJob(tmp_path, StoppingDecryptor(), LIMITS, True, None, workers=3)
        summary = archive_inbox(ledger, job, stop=stop)
        waiting = ledger.fetched_rows(("fetched",))
    assert 1 <= summary.processed <= 3 and summary.failures == []
    assert len(waiting) == 30 - summary.processed  # the rest waits for the next run, untouched
    assert {row.inbox_name for row in waiting} == {p.name for p in (tmp_path / ".inbox").iterdir()}
    assert not (tmp_path / ".work").exists() or not any((tmp_path / ".work").iterdir())


@pytest.fixture
def thread_limit(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list[str]]:
    """refuse(prefix): threads whose name starts with ``prefix`` cannot start, as at a thread
    limit (ulimit -u, a container's pids.max); returns the names refused so far."""
    refused: list[str] = []
    start = threading.Thread.start

    def refuse(prefix: str) -> list[str]:
        def limited(thread: threading.Thread) -> None:
            if thread.name.startswith(prefix):
                refused.append(thread.name)
                raise RuntimeError("can't start new thread")
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", limited)
        return refused

    return refuse


def test_a_fetch_whose_pool_gets_fewer_threads_fetches_everything_with_them(
    tmp_path: Path,
    thread_limit: Callable[[str], list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = FakeServer({f"f{i}.pgp": (bytes([i]) * (5000 + i), 100) for i in range(9)})
    refused = thread_limit("fetch-2")
    before = set(threading.enumerate())
    with Ledger.open(tmp_path) as ledger:
        summary = fetch(server, tmp_path, ledger)  # three workers asked for
        assert len(ledger.fetched_rows()) == 9
    assert (summary.fetched, summary.failures) == (9, [])
    assert inbox(tmp_path) == {n: d for n, (d, _) in server.files.items()}
    assert refused == ["fetch-2"]
    assert "only 2 of 3 fetch threads could start" in caplog.text
    assert [t.name for t in threading.enumerate() if t not in before] == []


def test_a_fetch_whose_history_loader_cannot_start_loads_it_in_line_and_skips_known_files(
    tmp_path: Path, thread_limit: Callable[[str], list[str]]
) -> None:
    server = FakeServer({f"f{i}.pgp": (bytes([i]) * 5000, 100) for i in range(4)})
    with Ledger.open(tmp_path) as ledger:
        assert fetch(server, tmp_path, ledger).fetched == 4
        refused = thread_limit("ledger-history")
        server.files["new.pgp"] = (b"new" * 2000, 100)
        again = fetch(server, tmp_path, ledger)
    assert refused == ["ledger-history"]
    assert (again.fetched, again.skipped, again.failures) == (1, 4, [])
    assert server.downloads.count("f0.pgp") == 1 and server.downloads[-1] == "new.pgp"


def test_a_fetch_that_gets_no_thread_fails_and_downloads_nothing(
    tmp_path: Path, thread_limit: Callable[[str], list[str]]
) -> None:
    server = FakeServer({f"f{i}.pgp": (b"x" * 5000, 100) for i in range(4)})
    thread_limit("fetch-")
    before = set(threading.enumerate())
    with Ledger.open(tmp_path) as ledger, pytest.raises(StatementsError) as raised:
        fetch(server, tmp_path, ledger)
    assert "Cannot start the fetch threads" in raised.value.message
    assert raised.value.hint is not None and "ulimit -u" in raised.value.hint
    assert raised.value.exit_code == ExitCode.CONFIG
    assert server.downloads == [] and inbox(tmp_path) == {}
    assert [t.name for t in threading.enumerate() if t not in before] == []


def test_workers_that_cannot_connect_leave_their_files_to_the_connected_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # At a thread limit a second connection cannot start (paramiko runs a thread for each):
    # its worker gives its file back and leaves, and the first connection fetches them all.
    files = {f"f{i}.pgp": (bytes([i]) * (5000 + i), 100) for i in range(9)}
    files["big.pgp"] = (b"b" * pipeline.BACKGROUND_WRITE_BYTES, 100)
    server = FakeServer(files, max_connections=1, chunk_pause=0.0001)
    with Ledger.open(tmp_path) as ledger:
        summary = fetch(server, tmp_path, ledger)  # three workers asked for
        assert len(ledger.fetched_rows()) == 10
    assert (summary.fetched, summary.failures) == (10, [])
    assert inbox(tmp_path) == {n: d for n, (d, _) in server.files.items()}
    assert sorted(server.downloads) == sorted(files)  # each once: nothing fetched twice
    assert server.connections == 3  # the first, and one failed try by each other worker
    assert caplog.text.count("leaves its files to the other connections: Cannot start") == 2


def test_a_file_is_never_given_back_to_a_worker_that_has_found_the_line_empty() -> None:
    # Two workers: one finds nothing left and goes; the other, unable to reconnect, must keep
    # its file (and fail it) rather than hand it to the one that is gone.
    def planned(name: str) -> pipeline.PlannedFetch:
        return pipeline.PlannedFetch(RemoteFile(name, name, 5000, 100), 1, name)

    work = pipeline._Downloads([planned("a.pgp"), planned("b.pgp")], 2, workers=2)
    first, second = work.take(), work.take()
    assert first is not None and second is not None
    assert work.take() is None  # the first worker's next look: it leaves
    assert not work.give_back(second, "at the thread limit")
    assert work.left_over() == []


def test_when_no_worker_can_connect_every_file_fails_once_and_waits_for_the_next_run(
    tmp_path: Path,
) -> None:
    # The only connection drops at once and none can be opened again: the last worker left
    # fails each file with the reason; none is lost or counted twice.
    server = FakeServer(
        {f"f{i}.pgp": (b"x" * 5000, 100) for i in range(6)}, max_connections=1, drop_after=0
    )
    with Ledger.open(tmp_path) as ledger:
        summary = fetch(server, tmp_path, ledger)
        assert ledger.fetched_rows() == []
    assert summary.fetched == 0
    assert sorted(f.name for f in summary.failures) == sorted(server.files)
    assert all("thread limit" in f.reason and "ulimit -u" in f.reason for f in summary.failures)


def test_archiving_whose_pool_gets_fewer_threads_files_everything_once(
    tmp_path: Path,
    thread_limit: Callable[[str], list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = {f"U{1000000 + i}.Activity.20260901.20260901.xml.pgp": b"<a/>%d" % i for i in range(12)}
    fetched_ledger(tmp_path, files)
    refused = thread_limit("archive-1")
    with Ledger.open(tmp_path) as ledger:
        job = ArchiveJob(tmp_path, FakeDecryptor(), LIMITS, True, None, workers=4)
        summary = archive_inbox(ledger, job)
        assert ledger.fetched_rows(("fetched",)) == []
    assert (summary.processed, summary.failures) == (12, [])
    assert refused == ["archive-1"]  # archive-2 and -3 were never tried
    assert "only 1 of 4 archive threads could start" in caplog.text
    tree = archived(tmp_path)
    assert tree == {
        f"{name.split('.')[0]}/2026/{name.removesuffix('.pgp')}": data
        for name, data in files.items()
    }


def test_repair_looks_only_at_what_waits_in_the_inbox(tmp_path: Path) -> None:
    fetched_ledger(tmp_path, {f"old{i}.pgp": b"old" for i in range(600)})
    with Ledger.open(tmp_path) as ledger:
        archive_inbox(ledger, ArchiveJob(tmp_path, FakeDecryptor(), LIMITS, True, None))
    fetched_ledger(tmp_path, {"new.pgp": b"new"})
    inbox = tmp_path / ".inbox"
    (tmp_path / ".encrypted" / "old7.pgp").replace(inbox / "old7.pgp")  # a killed run's leftover
    (inbox / "next.pgp.part").write_bytes(b"half")
    with Ledger.open(tmp_path) as ledger:
        repair_archive_state(ledger, tmp_path, keep_encrypted=True)
    assert sorted(p.name for p in inbox.iterdir()) == ["new.pgp", "next.pgp.part"]
    assert (tmp_path / ".encrypted" / "old7.pgp").read_bytes() == b"old"


def test_decrypt_and_status_start_without_paramiko() -> None:
    # paramiko and what it imports cost 0.12 s and 16 MB of every start; only the commands
    # that connect may pay them (statements.store is the pipeline's paramiko-free view).
    code = (
        "import sys, statements.cli, statements.pipeline, statements.status; "
        "sys.exit('paramiko' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
