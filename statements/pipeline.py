"""The nightly cycle's logic, with its collaborators passed in (a remote store, a ledger).

Fetch: one listing, one ledger query, then the new files downloaded by parallel workers into
``.inbox/NAME.part``, size-checked, fsynced and renamed to ``.inbox/NAME``; only then is the
ledger row committed. A crash at any point leaves either the old state or the new one, and the
next run repairs the gap between rename and commit without downloading again.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import io
import logging
import operator
import os
import posixpath
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from statements.archive import (
    Produced,
    ReportName,
    UnpackLimits,
    destination,
    parse_report_name,
    place,
    plaintext_name,
    sha256_file,
    unpack,
)
from statements.config import Config
from statements.decrypt import Decrypted, Decryptor, EarlyDecryption
from statements.errors import (
    DiskFull,
    ExitCode,
    KeyProblem,
    RemoteError,
    StatementsError,
    ThreadLimit,
)
from statements.fsutil import (
    DIRECT_WRITE_BYTES,
    PRIVATE_DIR,
    PRIVATE_FILE,
    DirectWriter,
    Writeback,
    atomic_write,
    fsync_dir,
)
from statements.ledger import ArchivedFile, FetchedRow, Ledger, RunCounts, ServerId
from statements.passphrase import PassphraseSource, read_passphrase
from statements.store import (
    FileVersion,
    KnownVersions,
    Listing,
    RemoteFile,
    RemoteSession,
    RemoteStore,
    Transient,
)

_T = TypeVar("_T")

log = logging.getLogger(__name__)

INBOX = ".inbox"
PART_SUFFIX = ".part"
# Even a connection that drops every few seconds while making progress gives up eventually.
MAX_ATTEMPTS = 200
# Files committed to the ledger in one transaction, at most.
_COMMIT_BATCH = 256
# `run` decrypts files at least this big while they download (EarlyDecryptions); smaller ones
# overlap well enough file by file, and each early decryption costs a gpg held for a download.
EARLY_DECRYPT_BYTES = 16 << 20
# Files at least this big are written, hashed and fed to gpg on a thread of their own
# (_BackgroundSink) while the SFTP reader goes on; below it a thread costs more than it saves.
BACKGROUND_WRITE_BYTES = 4 << 20
# Downloads of BACKGROUND_WRITE_BYTES or more that run at once (see _Downloads).
BIG_DOWNLOADS_AT_ONCE = 2


class FetchProgress(Protocol):
    """How the command line shows a fetch; the pipeline calls it from worker threads."""

    def started(self, files: int, total_bytes: int) -> None: ...

    def advanced(self, nbytes: int) -> None: ...

    def finished_file(self, remote: RemoteFile, seconds: float) -> None: ...

    def failed_file(self, remote: RemoteFile, reason: str) -> None: ...


class NoProgress:
    def started(self, files: int, total_bytes: int) -> None:
        pass

    def advanced(self, nbytes: int) -> None:
        pass

    def finished_file(self, remote: RemoteFile, seconds: float) -> None:
        log.info(
            "fetched %s (%d bytes, %.2f s)",
            remote.relative,
            remote.size,
            seconds,
            extra={
                "event": "fetched",
                "file": remote.relative,
                "bytes": remote.size,
                "duration": round(seconds, 3),
            },
        )

    def failed_file(self, remote: RemoteFile, reason: str) -> None:
        log.error(
            "failed %s: %s",
            remote.relative,
            reason,
            extra={"event": "fetch_failed", "file": remote.relative},
        )


@dataclass(frozen=True)
class PlannedFetch:
    remote: RemoteFile
    version: int
    inbox_name: str


@dataclass(frozen=True)
class FileFailure:
    """One file that failed to fetch or to archive, and why; the others went on."""

    name: str
    reason: str


@dataclass
class FetchSummary:
    new: list[PlannedFetch] = field(default_factory=list)
    fetched: int = 0
    skipped: int = 0
    refused: int = 0
    abandoned: int = 0  # left half-fetched by a stop request; the next run resumes them
    failures: list[FileFailure] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0


def inbox_dir(archive_root: Path) -> Path:
    path = archive_root / INBOX
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    return path


def inbox_name_for(remote: RemoteFile, version: int) -> str:
    """A flat, deterministic inbox name: the same plan after a crash finds the same file."""
    flat = remote.relative.replace("/", "__")
    return flat if version == 1 else f"{flat}.v{version}"


def plan(
    listing_files: tuple[RemoteFile, ...], history: set[FileVersion]
) -> tuple[list[PlannedFetch], int]:
    """The files to fetch (never fetched, or fetched with another size/mtime) and the skip count.

    ``history`` holds each (remote path, size, mtime) fetched before; a file fetched before with
    another size or mtime is fetched again as its next version.
    """
    new = [f for f in listing_files if (f.path, f.size, f.mtime) not in history]
    if not new:
        return [], len(listing_files)
    versions = collections.Counter(map(operator.itemgetter(0), history))
    planned = [
        PlannedFetch(f, versions[f.path] + 1, inbox_name_for(f, versions[f.path] + 1)) for f in new
    ]
    return planned, len(listing_files) - len(new)


class _PartSink:
    """Writes through to the .part file and feeds an early decryption.

    The .part is unbuffered: each SFTP read goes straight to the file, so the writeback below
    always knows how many bytes the file holds. With a ``direct`` writer (see download_one) the
    bytes go to the disk past the page cache instead: half the system time of writing them
    through the cache, which `run` needs for gpg and the SSH transport on a two-core machine.
    """

    def __init__(
        self,
        handle: io.FileIO,
        offset: int,
        early: EarlyDecryption | None,
        direct: DirectWriter | None = None,
    ) -> None:
        self.handle = handle
        self.early = early
        self.written = 0
        self._offset = offset
        self._writeback = Writeback(handle.fileno(), offset)
        self._direct = direct

    def write(self, data: bytes) -> int:
        if self._direct is not None:
            self._direct.write(data)
        else:
            view = memoryview(data)
            while view:
                view = view[self.handle.write(view) or 0 :]
        if self.early is not None:
            self.early.feed(data)
        self.written += len(data)
        if self._direct is None:
            self._writeback.written(self._offset + self.written)
        return len(data)

    def drain(self) -> None:
        """Everything given to :meth:`write` is in the file; raise what writing it raised."""
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()

    def stop(self) -> None:
        """Like :meth:`drain`, but raises nothing: for the way out after another error.

        What was received still goes to the file, for the resume: the .part must hold every
        byte before its end, and as many as could be written.
        """
        direct, self._direct = self._direct, None
        if direct is not None:
            with contextlib.suppress(OSError):
                direct.close()


class _BackgroundSink(_PartSink):
    """A _PartSink whose writing and gpg feed run on a thread of their own.

    Profiled on 1 GiB, the SFTP reader spent two thirds of its time writing, hashing (as it then
    also did) and feeding gpg, with no read request sent meanwhile: the server went quiet while
    the file was written. Here the reader only queues each reply (at most QUEUE_REPLIES, 4 MiB
    of 256 KiB reads) and goes on. File and pipe writes release the GIL, so the thread runs on
    the other core.
    """

    QUEUE_REPLIES = 16  # 32 held 4 MiB more per big download: 94 -> 88 MiB peak (bench 5)

    def __init__(
        self,
        handle: io.FileIO,
        offset: int,
        early: EarlyDecryption | None,
        direct: DirectWriter | None = None,
    ) -> None:
        super().__init__(handle, offset, early, direct)
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.QUEUE_REPLIES)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._write_queued, name="part-writer", daemon=True
        )
        self._thread.start()

    def write(self, data: bytes) -> int:
        if self._error is not None:
            raise self._error
        self._queue.put(data)
        return len(data)

    def _write_queued(self) -> None:
        # After an error, replies are still taken (the reader must never block on a full
        # queue) but no longer written: the .part ends at the last byte written in order.
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    super().write(data)
                except BaseException as exc:  # re-raised in the reader's thread
                    self._error = exc

    def drain(self) -> None:
        self._join()
        if self._error is not None:
            raise self._error
        super().drain()

    def stop(self) -> None:
        self._join()
        super().stop()

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class EarlyDecryptions:
    """`run` decrypts a big file while it downloads, instead of after: fetch and gpg overlap.

    A fetch worker starts one for each file of at least ``min_bytes`` that it downloads from
    the start, feeds it the bytes it writes to the .part, and once the file has landed in the
    inbox leaves the verified plaintext here; the archiver takes it instead of decrypting the
    inbox file. Whatever goes wrong with one only means that file is decrypted the usual way.
    """

    def __init__(
        self, decryptor: Decryptor, folder: Path, min_bytes: int = EARLY_DECRYPT_BYTES
    ) -> None:
        self.decryptor = decryptor
        self.folder = folder
        self.min_bytes = min_bytes
        self._ready: dict[str, Decrypted] = {}
        self._lock = threading.Lock()

    def start(self, remote: RemoteFile, inbox_name: str) -> EarlyDecryption | None:
        if remote.size < self.min_bytes:
            return None
        log.debug("decrypting %s while it downloads", remote.relative)
        _private_dir(self.folder.parent)  # mkdir's parents get 0777-umask: make each one
        return self.decryptor.start_early(inbox_name, _private_dir(self.folder))

    def landed(self, inbox_name: str, decrypted: Decrypted) -> None:
        with self._lock:
            self._ready[inbox_name] = decrypted

    def take(self, inbox_name: str) -> Decrypted | None:
        with self._lock:
            return self._ready.pop(inbox_name, None)

    def discard(self) -> None:
        """Delete the plaintexts nobody took (the run stopped before archiving them), and
        the folder once empty."""
        with self._lock:
            ready, self._ready = self._ready, {}
        for decrypted in ready.values():
            decrypted.output.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not there, or a worker's file still in it
            self.folder.rmdir()


class _Stopped(Exception):
    """Raised from the progress callback when a stop was requested mid-file."""


@dataclass(frozen=True)
class _Abandoned:
    planned: PlannedFetch


@dataclass(frozen=True)
class _NoConnection:
    """A worker could not open its own connection: the process is at its thread limit."""

    planned: PlannedFetch
    reason: str


@dataclass(frozen=True)
class _Done:
    planned: PlannedFetch
    transferred: int


def download_one(
    session: RemoteSession,
    planned: PlannedFetch,
    inbox: Path,
    progress: Callable[[int], None],
    early: EarlyDecryptions | None = None,
) -> _Done:
    """Download into NAME.part (resuming), verify the size, fsync, rename to NAME.

    With ``early``, a file downloaded from its first byte may be decrypted on the way.
    """
    remote = planned.remote
    final = inbox / planned.inbox_name
    part = inbox / (planned.inbox_name + PART_SUFFIX)
    offset = _resumable_offset(part, remote)
    if offset:
        log.info("resuming %s at byte %d of %d", remote.relative, offset, remote.size)
    stream = early.start(remote, planned.inbox_name) if early and not offset else None
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b", buffering=0) as handle:
            handle.seek(offset)
            handle.truncate()
            sink: _PartSink | None = None
            try:
                sink = _open_sink(handle, offset, stream, remote.size)
                session.download(remote, sink, offset, progress)  # type: ignore[arg-type]
                sink.drain()
                os.fsync(handle.fileno())
            finally:
                if sink is not None:
                    sink.stop()  # a failed download keeps what was received, for the resume
                # The .part's mtime records which remote version its bytes belong to.
                os.utime(part, (remote.mtime, remote.mtime))
                if handle.tell() == 0 and remote.size:
                    part.unlink()  # nothing to resume from: leave no clutter
        size = part.stat().st_size
        if size != remote.size:
            if size > remote.size:
                part.unlink()
            raise Transient(f"{remote.relative}: got {size} bytes, the server said {remote.size}")
        part.replace(final)
    except BaseException:
        if stream is not None:
            stream.abandon()
        raise
    # The rename becomes durable with the fsync of the inbox that precedes the file's ledger row.
    if stream is not None and early is not None:
        decrypted = stream.finish(final)
        if decrypted is not None:
            early.landed(planned.inbox_name, decrypted)
    return _Done(planned, size - offset)


def _open_sink(
    handle: io.FileIO,
    offset: int,
    stream: EarlyDecryption | None,
    size: int,
) -> _PartSink:
    """The sink for a .part at ``offset`` of a remote file of ``size`` bytes."""
    # O_DIRECT writes must start on a block: only a big .part written from byte 0.
    direct = (
        DirectWriter.attach(handle.fileno()) if not offset and size >= DIRECT_WRITE_BYTES else None
    )
    kind = _BackgroundSink if size - offset >= BACKGROUND_WRITE_BYTES else _PartSink
    try:
        return kind(handle, offset, stream, direct)
    except BaseException:  # no thread can be started, say: the direct writer's must stop too
        if direct is not None:
            direct.abort()
        raise


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _resumable_offset(part: Path, remote: RemoteFile) -> int:
    try:
        info = part.stat()
    except FileNotFoundError:
        return 0
    if int(info.st_mtime) != remote.mtime or info.st_size > remote.size:
        # Bytes of another version of the file, or of a crash before the mtime was set.
        part.unlink()
        return 0
    return info.st_size


def fetch_new(
    store: RemoteStore,
    ledger: Ledger,
    server: ServerId,
    archive_root: Path,
    *,
    workers: int,
    retries: int,
    run_id: int | None = None,
    progress: FetchProgress | None = None,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    on_landed: Callable[[], None] | None = None,
    early: EarlyDecryptions | None = None,
) -> FetchSummary:
    """Fetch every new remote file into the inbox; the ledger knows each one afterwards.

    ``on_landed`` is called after each file is committed (the archiver waits on it); with
    ``early``, big files are decrypted as they download.
    """
    started = time.monotonic()
    progress = progress or NoProgress()
    stop = stop or threading.Event()
    summary = FetchSummary()
    # Read beside the connect and the listing's first round trip, which wait for the server;
    # the listing then leaves out (and counts) every file fetched before as the names arrive.
    history = _InBackground(functools.partial(ledger.history, server), "ledger-history")
    first = store.connect()
    try:
        listing, first = _retrying_listing(store, first, retries, history.result)
        files, refused = listing.files, listing.refused
        for item in refused:
            log.warning(
                "refused remote file %s: %s",
                item.name,
                item.reason,
                extra={"event": "refused", "file": item.name},
            )
        summary.refused = len(refused)
        if not dry_run and refused:
            ledger.record_refused(server, [(r.name, r.reason) for r in refused])
        planned, skipped = plan(files, history.result())
        # Not held through the downloads: 350 bytes per version ever fetched (35 MiB at
        # 100,000), which the downloads' buffers and gpg's pipes can reuse.
        del history
        summary.skipped = listing.known + skipped
        summary.new = planned
        if dry_run or not planned:
            return summary
        inbox = inbox_dir(archive_root)
        pending = _adopt_completed(planned, inbox, ledger, server, run_id, summary)
        if on_landed is not None and len(pending) < len(planned):
            on_landed()
        if pending:
            progress.started(len(pending), sum(p.remote.size for p in pending))
            _download_all(
                store,
                first,
                pending,
                inbox,
                ledger,
                server,
                run_id,
                summary,
                workers=workers,
                retries=retries,
                progress=progress,
                stop=stop,
                on_landed=on_landed or (lambda: None),
                early=early,
            )
    finally:
        first.close()
        summary.seconds = time.monotonic() - started
    return summary


class _InBackground(Generic[_T]):
    """``call()`` on a thread of its own; result() waits for it, and returns or raises."""

    def __init__(self, call: Callable[[], _T], name: str) -> None:
        self._outcome: tuple[_T] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        try:
            self._thread.start()
        except RuntimeError:  # at a thread limit: run it here, before the connection, not beside it
            self._run(call)

    def _run(self, call: Callable[[], _T]) -> None:
        try:
            self._outcome = (call(),)
        except BaseException as exc:  # handed to result(), on the thread that waits for it
            self._outcome = exc

    def result(self) -> _T:
        if self._thread.ident is not None:  # None: it never started, and the call is done
            self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome[0]


def _retrying_listing(
    store: RemoteStore, session: RemoteSession, retries: int, known: KnownVersions
) -> tuple[Listing, RemoteSession]:
    """The listing without the ``known()`` versions (counted in Listing.known)."""
    for attempt in range(retries + 1):
        try:
            return session.list_files(known), session
        except Transient as exc:
            session.close()
            if attempt == retries:
                raise RemoteError(f"Listing the remote folder failed: {exc}.") from None
            session = store.connect()
    raise AssertionError("unreachable")


def _adopt_completed(
    planned: list[PlannedFetch],
    inbox: Path,
    ledger: Ledger,
    server: ServerId,
    run_id: int | None,
    summary: FetchSummary,
) -> list[PlannedFetch]:
    """Files already renamed into the inbox by a run that died before committing them."""
    pending = []
    for item in planned:
        if _holds_download(inbox / item.inbox_name, item.remote.size, item.remote.mtime):
            log.info(
                "%s is already in the inbox from an interrupted run; recording it",
                item.remote.relative,
            )
            _commit(ledger, server, item, run_id)
            summary.fetched += 1
        else:
            pending.append(item)
    return pending


def _holds_download(path: Path, size: int, mtime: int) -> bool:
    """Whether ``path`` is a download of a remote file of this size and mtime: a regular file
    (a link is nobody's download) of that size, which download_one dates with the remote mtime.

    The same identity that tells a new remote file from one fetched before, here for a file
    in the inbox; the bytes themselves are verified by gpg's integrity check when decrypted.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size and int(info.st_mtime) == mtime


def _commit(ledger: Ledger, server: ServerId, item: PlannedFetch, run_id: int | None) -> None:
    ledger.record_fetched(
        server,
        remote_path=item.remote.path,
        size=item.remote.size,
        mtime=item.remote.mtime,
        version=item.version,
        inbox_name=item.inbox_name,
        run_id=run_id,
    )


def _ledger_row(done: _Done) -> tuple[str, int, int, int, str]:
    item = done.planned
    r = item.remote
    return (r.path, r.size, r.mtime, item.version, item.inbox_name)


class _Downloads:
    """The files still to download, handed out to the fetch workers one at a time.

    At most ``big_at_once`` of them are big (BACKGROUND_WRITE_BYTES or more): each of those
    holds up to 13 MiB while it runs (read replies in flight and queued, the aligned buffers of
    its .part, the buffer its early plaintext is hashed through), so with them all at once peak
    memory grew with ``workers`` (when each held 12 MiB): 113-129 MiB for eight 48 MiB reports
    with four workers, 153 MiB with eight. Two at once were faster there too (2.6 s against 2.9
    and 3.3): on the GIL, more big downloads only take turns. A worker that finds only big files
    waiting, all slots taken, stops: the workers holding the slots go on with them.

    A worker that cannot open a connection of its own (at a thread limit: paramiko runs one
    thread per connection) gives its file back and leaves, and the others share its files: the
    run is slower, not failed. Only the last worker fails files for it.
    """

    def __init__(self, pending: list[PlannedFetch], big_at_once: int, workers: int) -> None:
        self._big = collections.deque(p for p in pending if _is_big(p))
        self._small = collections.deque(p for p in pending if not _is_big(p))
        self._big_slots = big_at_once
        self._workers = workers
        self._lock = threading.Lock()
        self.given_back_for = ""  # why the last file given back was

    def take(self) -> PlannedFetch | None:
        """The next file for a worker (a big one first, while a slot is free), or None: then
        the worker leaves, counted out at once, so that no file is given back to it."""
        with self._lock:
            if self._big and self._big_slots:
                self._big_slots -= 1
                return self._big.popleft()
            if self._small:
                return self._small.popleft()
            self._workers -= 1
            return None

    def finished(self, item: PlannedFetch) -> None:
        if _is_big(item):
            with self._lock:
                self._big_slots += 1

    def give_back(self, item: PlannedFetch, reason: str) -> bool:
        """Put ``item`` first in line again for the other workers, as its worker leaves; False
        (and nothing done) when no other worker is left to take it."""
        with self._lock:
            if self._workers <= 1:
                return False
            self._workers -= 1
            self.given_back_for = reason
            if _is_big(item):
                self._big.appendleft(item)
                self._big_slots += 1
            else:
                self._small.appendleft(item)
            return True

    def leave(self, count: int = 1) -> None:
        """``count`` workers are gone (stopped, failed, or never started)."""
        with self._lock:
            self._workers -= count

    def left_over(self) -> list[PlannedFetch]:
        """What no worker took."""
        with self._lock:
            return [*self._big, *self._small]


def _is_big(item: PlannedFetch) -> bool:
    return item.remote.size >= BACKGROUND_WRITE_BYTES


def _download_all(
    store: RemoteStore,
    first: RemoteSession,
    pending: list[PlannedFetch],
    inbox: Path,
    ledger: Ledger,
    server: ServerId,
    run_id: int | None,
    summary: FetchSummary,
    *,
    workers: int,
    retries: int,
    progress: FetchProgress,
    stop: threading.Event,
    on_landed: Callable[[], None],
    early: EarlyDecryptions | None,
) -> None:
    """Worker threads download; this thread alone commits to the ledger, as each file lands."""
    results: queue.Queue[_Done | _Abandoned | tuple[PlannedFetch, str] | None] = queue.Queue()
    count = max(1, min(workers, len(pending)))
    work = _Downloads(pending, BIG_DOWNLOADS_AT_ONCE, count)
    sessions: list[RemoteSession | None] = [first] + [None] * (count - 1)

    def worker(index: int) -> None:
        gone = False  # counted out by take() or give_back(), which also took back the file
        try:
            while not stop.is_set():
                if (item := work.take()) is None:
                    gone = True
                    break
                try:
                    result = _fetch_with_retries(
                        store, sessions, index, item, inbox, retries, progress, stop, early
                    )
                    if isinstance(result, _NoConnection):
                        gone = work.give_back(item, result.reason)
                        if gone:
                            log.warning(
                                "fetch-%d leaves its files to the other connections: %s",
                                index,
                                result.reason,
                            )
                            return
                        progress.failed_file(item.remote, result.reason)
                        result = (item, result.reason)
                    results.put(result)
                finally:
                    if not gone:
                        work.finished(item)
        finally:
            if not gone:
                work.leave()
            results.put(None)

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"fetch-{i}", daemon=True)
        for i in range(count)
    ]
    started = running = _start_pool(threads)
    work.leave(count - started)
    while running:
        # What landed since the last commit is committed together: one fsync of the inbox
        # (making the renames durable) and one ledger transaction per batch, not per file.
        landed = [results.get()]
        while len(landed) < _COMMIT_BATCH:
            try:
                landed.append(results.get_nowait())
            except queue.Empty:
                break
        done = [r for r in landed if isinstance(r, _Done)]
        if done:
            fsync_dir(inbox)
            ledger.record_fetched_many(server, [_ledger_row(d) for d in done], run_id)
        for result in landed:
            if result is None:
                running -= 1
            elif isinstance(result, _Done):
                summary.fetched += 1
                summary.bytes += result.transferred
                on_landed()
            elif isinstance(result, _Abandoned):
                summary.abandoned += 1
            else:
                summary.failures.append(FileFailure(result[0].remote.relative, result[1]))
    for thread in threads[:started]:
        thread.join()
    if not stop.is_set():
        # Files given back to workers that never started (counted until _start_pool said
        # so), when every started one had gone too: failed, not forgotten.
        for item in work.left_over():
            progress.failed_file(item.remote, work.given_back_for)
            summary.failures.append(FileFailure(item.remote.relative, work.given_back_for))
    for session in sessions:
        if session is not None and session is not first:
            session.close()


def _fetch_with_retries(
    store: RemoteStore,
    sessions: list[RemoteSession | None],
    index: int,
    item: PlannedFetch,
    inbox: Path,
    retries: int,
    progress: FetchProgress,
    stop: threading.Event,
    early: EarlyDecryptions | None = None,
) -> _Done | _Abandoned | _NoConnection | tuple[PlannedFetch, str]:
    """Attempts that move the file forward are free; ``retries`` bounds those that do not.

    A stop request abandons the file at the next chunk: its .part stays for the next run.
    """
    started = time.monotonic()
    reason = ""
    fruitless = 0
    part = inbox / (item.inbox_name + PART_SUFFIX)

    def advanced(nbytes: int) -> None:
        progress.advanced(nbytes)
        if stop.is_set():
            raise _Stopped

    for _ in range(MAX_ATTEMPTS):
        if stop.is_set():
            return _Abandoned(item)
        before = _size_or_zero(part)
        try:
            session = sessions[index]
            if session is None:
                try:
                    session = sessions[index] = store.connect()
                except ThreadLimit as exc:
                    return _NoConnection(item, _reason_with_hint(exc))
            done = download_one(session, item, inbox, advanced, early)
            progress.finished_file(item.remote, time.monotonic() - started)
            return done
        except _Stopped:
            # The session has reads in flight for the abandoned file: not reusable.
            broken, sessions[index] = sessions[index], None
            if broken is not None:
                broken.close()
            log.info("stopped during %s; its partial download is kept", item.remote.relative)
            return _Abandoned(item)
        except Transient as exc:
            reason = str(exc)
            log.warning("transfer of %s interrupted: %s", item.remote.relative, exc)
            broken, sessions[index] = sessions[index], None
            if broken is not None:
                broken.close()
            if _size_or_zero(part) <= before:
                fruitless += 1
                if fruitless > retries:
                    break
        except StatementsError as exc:
            reason = _reason_with_hint(exc)
            break
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                reason = f"{DiskFull.at(inbox).message} The partial download is kept to resume."
            else:
                reason = f"local file error: {exc.strerror or exc} ({exc.filename or inbox})"
            break
        except Exception as exc:  # a bug must cost one file, never the run or the file's record
            log.exception("unexpected error fetching %s", item.remote.relative)
            reason = f"unexpected error: {exc!r}"
            break
    progress.failed_file(item.remote, reason)
    return item, reason


def _reason_with_hint(exc: StatementsError) -> str:
    """Why a file failed, as the run's summary lists it: the message and, where the error
    knows one, what to do (the limit to raise for a thread limit, say)."""
    return f"{exc.message} {exc.hint}" if exc.hint else exc.message


# --- wiring to the real collaborators --------------------------------------------------------


def fetch_from_config(
    cfg: Config,
    *,
    dry_run: bool = False,
    progress: FetchProgress | None = None,
    stop: threading.Event | None = None,
) -> FetchSummary:
    """`ibkr-statements fetch`: the key loaded once, the ledger opened, the run recorded."""
    from statements.remote import SftpSettings, SftpStore, load_login_key  # see statements.store

    settings = SftpSettings.from_config(cfg)
    store = SftpStore(settings, load_login_key(cfg))
    server = ServerId(settings.host, settings.port, settings.username)
    with Ledger.open(cfg.archive.root) as ledger:
        run_id = None if dry_run else ledger.start_run("fetch")
        try:
            summary = fetch_new(
                store,
                ledger,
                server,
                cfg.archive.root,
                workers=cfg.sftp.workers,
                retries=cfg.sftp.retries,
                run_id=run_id,
                progress=progress,
                dry_run=dry_run,
                stop=stop,
            )
        except StatementsError as exc:
            if run_id is not None:
                _failed(ledger, run_id, exc, RunCounts())
            raise
        if run_id is not None:
            _finish(ledger, run_id, summary, ArchiveSummary())
    return summary


# --- decrypt and archive -------------------------------------------------------------------

ENCRYPTED = ".encrypted"
QUARANTINE = ".quarantine"
WORK = ".work"
MAX_GPG_LANES = 4


class DecryptResult(Protocol):
    @property
    def signature(self) -> str: ...

    @property
    def signer_fingerprint(self) -> str | None: ...

    @property
    def sha256(self) -> str: ...  # of the plaintext written


class Decrypting(Protocol):
    """What the pipeline needs of a decryptor (real: :class:`statements.decrypt.Decryptor`)."""

    def decrypt(self, source: Path, output: Path) -> DecryptResult: ...


@dataclass
class ArchiveSummary:
    archived_files: int = 0  # files written into the archive (zip members count one each)
    processed: int = 0  # fetched files completed
    already: int = 0  # contents found already archived (nothing written)
    failures: list[FileFailure] = field(default_factory=list)
    archived_ids: list[int] = field(default_factory=list)

    def add(self, other: ArchiveSummary) -> None:
        self.archived_files += other.archived_files
        self.processed += other.processed
        self.already += other.already
        self.failures.extend(other.failures)
        self.archived_ids.extend(other.archived_ids)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    return path


def repair_archive_state(ledger: Ledger, root: Path, *, keep_encrypted: bool) -> None:
    """Finish what a killed run left half done: ciphertexts of archived files, work folders."""
    inbox = root / INBOX
    # Only a file still in the inbox can be half done: look up those few names, not every
    # file ever archived (the history grows by thousands of rows a year).
    waiting = [entry.name for entry in os.scandir(inbox)] if inbox.is_dir() else []
    for row in ledger.fetched_rows_named(waiting, ("archived",)):
        source = inbox / row.inbox_name
        if not _holds_download(source, row.size, row.mtime):
            # Retiring it would put it over the ciphertext kept for that row, or delete it.
            log.warning(
                "%s is not the file fetched under that name (its size or date differs) and "
                "is left where it is; move it out of %s, which only ibkr-statements should write",
                source,
                inbox,
            )
            continue
        _retire_ciphertext(source, root, keep_encrypted=keep_encrypted)
    work = root / WORK
    if work.exists():
        shutil.rmtree(work)


def _retire_ciphertext(source: Path, root: Path, *, keep_encrypted: bool) -> None:
    if keep_encrypted:
        target = _private_dir(root / ENCRYPTED) / source.name
        source.replace(target)
        fsync_dir(target.parent)
    else:
        source.unlink()
    fsync_dir(source.parent)


@dataclass(frozen=True)
class ArchiveJob:
    """Everything archiving one file needs besides the file and the ledger."""

    root: Path
    decryptor: Decrypting
    limits: UnpackLimits
    keep_encrypted: bool
    run_id: int | None
    workers: int = 1  # files archived at once (the decryptor must be thread-safe for > 1)
    early: EarlyDecryptions | None = None  # plaintexts decrypted while they downloaded


def archive_inbox(
    ledger: Ledger,
    job: ArchiveJob,
    *,
    only: Callable[[FetchedRow], bool] | None = None,
    summary: ArchiveSummary | None = None,
    stop: threading.Event | None = None,
) -> ArchiveSummary:
    """Decrypt, unpack and file every fetched file waiting in the inbox; quarantine failures.

    A stop request lets the files being archived finish and starts no other.
    """
    summary = summary if summary is not None else ArchiveSummary()
    stop = stop or threading.Event()
    rows = [row for row in ledger.fetched_rows(("fetched",)) if only is None or only(row)]
    workers = min(job.workers, len(rows))
    if workers <= 1:
        for row in rows:
            if stop.is_set():
                break
            archive_one(row, ledger, job, summary)
    else:
        _archive_in_parallel(rows, job, summary, stop, workers)
    return summary


def _archive_in_parallel(
    rows: list[FetchedRow],
    job: ArchiveJob,
    summary: ArchiveSummary,
    stop: threading.Event,
    workers: int,
) -> None:
    """``archive_one`` on ``workers`` threads, each with its own ledger connection.

    Files are independent (each has its own work folder, inbox name and archive paths; place()
    settles two versions of one name landing at once), so the only shared things are the
    summary, merged under a lock, and the first run-level error, which stops the others.
    """
    todo: queue.SimpleQueue[FetchedRow] = queue.SimpleQueue()
    for row in rows:
        todo.put(row)
    merge = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with Ledger.open(job.root) as ledger:
                while not errors and not stop.is_set():
                    try:
                        row = todo.get_nowait()
                    except queue.Empty:
                        return
                    mine = ArchiveSummary()
                    try:
                        archive_one(row, ledger, job, mine)
                    finally:
                        with merge:
                            summary.add(mine)
        except BaseException as exc:  # handed to the calling thread, never lost with this one
            errors.append(exc)

    threads = [
        threading.Thread(target=work, name=f"archive-{i}", daemon=True) for i in range(workers)
    ]
    for thread in threads[: _start_pool(threads)]:
        thread.join()
    if errors:
        raise errors[0]


def _start_pool(threads: list[threading.Thread]) -> int:
    """Start ``threads`` in order; how many started.

    At a thread limit (ulimit -u, a container's pids.max) a pool goes on with the threads it
    got: the run is slower, not failed, and no started worker is left running with nobody to
    collect its results. Only a pool that gets no thread at all fails the run.
    """
    for count, thread in enumerate(threads):
        try:
            thread.start()
        except RuntimeError as exc:
            kind = thread.name.rsplit("-", 1)[0]
            if count == 0:
                raise _thread_limit(kind, exc) from None
            log.warning(
                "only %d of %d %s threads could start (%s); going on with them",
                count,
                len(threads),
                kind,
                exc,
            )
            return count
    return len(threads)


def _thread_limit(kind: str, exc: RuntimeError) -> ThreadLimit:
    # Only the fetch's threads follow a setting; the archive's follow the cores (gpg_lanes).
    fewer = "; fewer [sftp] workers need fewer threads" if kind == "fetch" else ""
    return ThreadLimit.reached(f"{kind} threads", exc, fewer=fewer)


def archive_one(row: FetchedRow, ledger: Ledger, job: ArchiveJob, summary: ArchiveSummary) -> None:
    root = job.root
    source = root / INBOX / row.inbox_name
    remote_name = posixpath.basename(row.remote_path)
    if not source.exists():
        log.error("%s is recorded as fetched but missing from the inbox", row.inbox_name)
        ledger.quarantine(row.id, "the fetched file vanished from the inbox before decryption")
        summary.failures.append(FileFailure(remote_name, "missing from the inbox"))
        return
    work = _private_dir(_private_dir(root / WORK) / str(row.id))  # mkdir's parents get 0777-umask
    started = time.monotonic()
    try:
        plain_name = plaintext_name(remote_name)
        plaintext = work / plain_name
        early = job.early.take(row.inbox_name) if job.early is not None else None
        decrypted: DecryptResult
        if early is not None:
            early.output.replace(plaintext)  # same file system: both in the work folder
            decrypted = early
        else:
            decrypted = job.decryptor.decrypt(source, plaintext)
        produced = unpack(plaintext, plain_name, work / "members", job.limits)
        bundle = parse_report_name(plain_name)
        fetched_on = date.fromisoformat(ledger.fetched_at(row.id)[:10])
        known = {plaintext: decrypted.sha256}  # hashed as gpg wrote it: not read again
        files = [_file_one(item, root, bundle, fetched_on, known) for item in produced]
        ledger.complete(
            row.id,
            files,
            signature=decrypted.signature,
            signer=decrypted.signer_fingerprint,
            run_id=job.run_id,
        )
        _retire_ciphertext(source, root, keep_encrypted=job.keep_encrypted)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull.at(root) from None
        raise
    except StatementsError as exc:
        if isinstance(exc, DiskFull) or exc.exit_code != ExitCode.PARTIAL:
            raise  # a run-level problem (no gpg, no key): stop, leave the inbox as it is
        _quarantine(row, source, root, ledger, exc)
        summary.failures.append(FileFailure(remote_name, exc.message))
        log.error(
            "quarantined %s: %s",
            remote_name,
            exc.message,
            extra={"event": "quarantined", "file": remote_name},
        )
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary.processed += 1
    summary.archived_ids.append(row.id)
    for f in files:
        log.info(
            "archived %s",
            f.path,
            extra={
                "event": "archived",
                "file": f.path,
                "account": f.account,
                "bytes": f.size,
                "duration": round(time.monotonic() - started, 3),
            },
        )
    summary.archived_files += len(files)


def _file_one(
    item: Produced,
    root: Path,
    bundle: ReportName | None,
    fetched_on: date,
    known: Mapping[Path, str],
) -> ArchivedFile:
    digest = known.get(item.path) or sha256_file(item.path)
    size = item.path.stat().st_size
    relative = destination(item, bundle=bundle, fetched_on=fetched_on)
    placement = place(item.path, root, relative, digest)
    parsed = parse_report_name(item.name)
    return ArchivedFile(
        path=placement.relative.as_posix(),
        name=item.name,
        member_of=item.member_of,
        sha256=digest,
        size=size,
        account=relative.parts[0] if not relative.parts[0].startswith("_") else None,
        query=parsed.query if parsed else None,
        period_from=parsed.period_from.isoformat() if parsed and parsed.period_from else None,
        period_to=parsed.period_to.isoformat() if parsed and parsed.period_to else None,
        version=placement.version,
    )


def _quarantine(
    row: FetchedRow,
    source: Path,
    root: Path,
    ledger: Ledger,
    exc: StatementsError,
) -> None:
    folder = _private_dir(root / QUARANTINE)
    target = folder / row.inbox_name
    status = getattr(exc, "status_lines", ())
    report = "\n".join(
        [
            f"ibkr-statements could not archive {posixpath.basename(row.remote_path)}",
            f"time: {datetime.now(UTC).isoformat(timespec='seconds')}",
            f"remote file: {row.remote_path} ({row.size} bytes, sha256 {sha256_file(source)})",
            f"what failed: {exc.message}",
            f"what to do: {_with_retry(exc.hint)}",
            *(["gpg status:", *(f"  {line}" for line in status)] if status else []),
            "",
        ]
    )
    atomic_write(folder / f"{row.inbox_name}.error.txt", report.encode("utf-8"), PRIVATE_FILE)
    source.replace(target)
    fsync_dir(folder)
    fsync_dir(source.parent)
    ledger.quarantine(row.id, exc.message)


def _with_retry(hint: str | None) -> str:
    retry = "`ibkr-statements decrypt --retry-quarantine`"
    if hint and "--retry-quarantine" in hint:
        return hint
    return f"{hint or 'see the reason above'}; then run {retry}"


def requeue_quarantined(ledger: Ledger, root: Path) -> int:
    """Move every quarantined ciphertext back to the inbox for another try."""
    moved = 0
    inbox = inbox_dir(root)
    for row, _reason in ledger.quarantined():
        held = root / QUARANTINE / row.inbox_name
        if held.exists():
            held.replace(inbox / row.inbox_name)
            (root / QUARANTINE / f"{row.inbox_name}.error.txt").unlink(missing_ok=True)
        if (inbox / row.inbox_name).exists():
            ledger.requeue(row.id)
            moved += 1
    return moved


# --- decrypt and run, wired to the real collaborators ------------------------------------------


def gpg_lanes() -> int:
    """Files decrypted at once: one per core (each with its own gpg-agent), at most four."""
    return max(1, min(os.cpu_count() or 1, MAX_GPG_LANES))


def archive_workers(lanes: int) -> int:
    """Files archived at once: two per lane, so that one file's fsyncs, unpacking and ledger
    commit overlap the next file's decryption and no agent waits for them."""
    return 2 * lanes


def make_decryptor(cfg: Config, *, lanes: int = 1) -> Decryptor:
    """The run's decryptor; ``lanes`` > 1 lets it decrypt that many files at once (close it)."""
    home = cfg.pgp.gnupg_home
    if not home.is_dir():
        # Opening a GnuPG home creates it: a mistyped path must be reported, not made.
        raise KeyProblem(
            f"The GnuPG home {home} named by [pgp] gnupg_home does not exist: "
            "no file can be decrypted.",
            "Correct [pgp] gnupg_home, restore the keys with `ibkr-statements keys restore`, "
            "or make a new pair with `ibkr-statements keys pgp` (and send IBKR its public key).",
        )
    source = PassphraseSource("PGP key", cfg.pgp.passphrase_env, cfg.pgp.passphrase_file)
    decryptor = Decryptor(
        cfg.pgp.gnupg_home,
        passphrase=read_passphrase(source),
        signer_fingerprints=cfg.pgp.signer_fingerprints,
        gpg_binary=cfg.pgp.gpg_binary,
        lanes=lanes,
    )
    decryptor.preflight()
    return decryptor


def decrypt_from_config(cfg: Config, *, retry_quarantine: bool = False) -> ArchiveSummary:
    """`ibkr-statements decrypt`: everything waiting in the inbox, recorded as a run."""
    lanes = gpg_lanes()
    decryptor = make_decryptor(cfg, lanes=lanes)
    root = cfg.archive.root
    with decryptor, Ledger.open(root) as ledger:
        run_id = ledger.start_run("decrypt")
        repair_archive_state(ledger, root, keep_encrypted=cfg.archive.keep_encrypted)
        if retry_quarantine:
            log.info(
                "moved %d quarantined file(s) back to the inbox", requeue_quarantined(ledger, root)
            )
        job = ArchiveJob(
            root,
            decryptor,
            UnpackLimits.from_config(cfg.archive),
            cfg.archive.keep_encrypted,
            run_id,
            archive_workers(lanes),
        )
        try:
            summary = archive_inbox(ledger, job)
        except StatementsError as exc:
            _failed(ledger, run_id, exc, RunCounts())
            raise
        _finish(ledger, run_id, None, summary)
    return summary


@dataclass
class CycleSummary:
    fetch: FetchSummary
    archive: ArchiveSummary
    deleted_remote: int = 0

    @property
    def exit_code(self) -> ExitCode:
        failed = self.fetch.failures or self.archive.failures
        return ExitCode.PARTIAL if failed else ExitCode.OK


def _failed(ledger: Ledger, run_id: int, exc: StatementsError, counts: RunCounts) -> None:
    ledger.finish_run(
        run_id, result="failed", exit_code=int(exc.exit_code), counts=counts, message=exc.message
    )


def _finish(
    ledger: Ledger,
    run_id: int,
    fetch: FetchSummary | None,
    archive: ArchiveSummary,
    *,
    interrupted: bool = False,
) -> None:
    failed = len(archive.failures) + (len(fetch.failures) if fetch else 0)
    counts = RunCounts(
        fetched=fetch.fetched if fetch else 0,
        skipped=fetch.skipped if fetch else 0,
        refused=fetch.refused if fetch else 0,
        failed=failed,
        archived=archive.archived_files,
        bytes=fetch.bytes if fetch else 0,
    )
    code = ExitCode.PARTIAL if failed else ExitCode.OK
    problems = [*(fetch.failures if fetch else []), *archive.failures]
    message = "; ".join(f"{f.name}: {f.reason}" for f in problems)[:2000]
    result = "interrupted" if interrupted else "partial" if failed else "ok"
    ledger.finish_run(
        run_id,
        result=result,
        exit_code=int(code),
        counts=counts,
        message=message,
    )


def run_from_config(
    cfg: Config,
    *,
    progress: FetchProgress | None = None,
    stop: threading.Event | None = None,
) -> CycleSummary:
    """`ibkr-statements run`: fetch, and archive each file as soon as it has landed.

    Decryption runs on its own thread with its own ledger connection while the fetch goes on,
    so a night costs about the longer of the two, not their sum.
    """
    from statements.remote import SftpSettings, SftpStore, load_login_key  # see statements.store

    lanes = gpg_lanes()
    # A key problem stops the run before any network traffic.
    decryptor = make_decryptor(cfg, lanes=lanes)
    settings = SftpSettings.from_config(cfg)
    store = SftpStore(settings, load_login_key(cfg))
    server = ServerId(settings.host, settings.port, settings.username)
    root = cfg.archive.root
    with decryptor, Ledger.open(root) as ledger:
        run_id = ledger.start_run("run")
        repair_archive_state(ledger, root, keep_encrypted=cfg.archive.keep_encrypted)
        early = EarlyDecryptions(decryptor, root / WORK / "early", EARLY_DECRYPT_BYTES)
        job = ArchiveJob(
            root,
            decryptor,
            UnpackLimits.from_config(cfg.archive),
            cfg.archive.keep_encrypted,
            run_id,
            archive_workers(lanes),
            early,
        )
        landed = threading.Event()
        stop = stop or threading.Event()
        archiver = _Archiver(job, landed, stop)
        try:
            archiver.start()
        except RuntimeError as exc:
            no_thread = _thread_limit("archive", exc)
            _failed(ledger, run_id, no_thread, RunCounts())
            raise no_thread from None
        failure: StatementsError | None = None
        try:
            fetch = fetch_new(
                store,
                ledger,
                server,
                root,
                workers=cfg.sftp.workers,
                retries=cfg.sftp.retries,
                run_id=run_id,
                progress=progress,
                stop=stop,
                on_landed=landed.set,
                early=early,
            )
        except StatementsError as exc:
            failure = exc
        # What landed before a stop or a failure is archived all the same; what a stop left
        # untaken is dropped here, and what a crash left, by the next run's repair.
        archiver.finish()
        early.discard()
        if failure is not None:
            counts = RunCounts(archived=archiver.summary.archived_files)
            _failed(ledger, run_id, failure, counts)
            raise failure
        if archiver.error is not None:
            _failed(ledger, run_id, archiver.error, RunCounts(fetched=fetch.fetched))
            raise archiver.error
        cycle = CycleSummary(fetch, archiver.summary)
        if cfg.sftp.delete_after_archive and not stop.is_set():
            cycle.deleted_remote = _delete_archived_remotes(store, ledger, server)
        _finish(ledger, run_id, fetch, archiver.summary, interrupted=stop.is_set())
    return cycle


class _Archiver(threading.Thread):
    """Archives whatever lands in the inbox until the fetch is over and the inbox is done."""

    def __init__(self, job: ArchiveJob, landed: threading.Event, stop: threading.Event) -> None:
        super().__init__(name="archiver", daemon=True)
        self.job = job
        self.landed = landed
        self.stop = stop
        self.fetch_over = threading.Event()
        self.summary = ArchiveSummary()
        self.error: StatementsError | None = None

    def finish(self) -> None:
        """Tell it the fetch is over; wait until it has archived what landed."""
        self.fetch_over.set()
        self.landed.set()
        self.join()

    def run(self) -> None:
        tried: set[int] = set()
        try:
            with Ledger.open(self.job.root) as ledger:
                while True:
                    # Read the flag before looking: a file landing after the look still
                    # gets one more pass.
                    over = self.fetch_over.is_set()
                    self.landed.clear()
                    before = len(tried)
                    archive_inbox(
                        ledger,
                        self.job,
                        only=lambda row: _first_try(row, tried),
                        summary=self.summary,
                        stop=self.stop,
                    )
                    if self.stop.is_set() or (over and len(tried) == before):
                        return
                    if len(tried) == before:
                        self.landed.wait(0.5)
        except StatementsError as exc:
            self.error = exc
        except Exception as exc:  # reported by the main thread, never lost with the thread
            log.exception("archiving failed")
            self.error = StatementsError(f"Archiving stopped on an unexpected error: {exc!r}")


def _first_try(row: FetchedRow, tried: set[int]) -> bool:
    if row.id in tried:
        return False
    tried.add(row.id)
    return True


def _delete_archived_remotes(store: RemoteStore, ledger: Ledger, server: ServerId) -> int:
    """delete_after_archive: only files whose whole content is archived and committed."""
    rows = ledger.to_delete_remotely(server)
    if not rows:
        return 0
    session = store.connect()
    deleted = 0
    try:
        for row in rows:
            remote = RemoteFile(row.remote_path, row.remote_path, row.size, row.mtime)
            try:
                session.remove(remote)
            except StatementsError as exc:
                log.warning("could not delete %s on the server: %s", row.remote_path, exc.message)
                continue
            ledger.mark_remote_deleted(row.id)
            deleted += 1
    finally:
        session.close()
    return deleted
