"""The nightly cycle's logic, with its collaborators passed in (a remote store, a ledger).

Fetch: one listing, one ledger query, then the new files downloaded by parallel workers into
``.inbox/NAME.part``, size-checked, fsynced and renamed to ``.inbox/NAME``; only then is the
ledger row committed. A crash at any point leaves either the old state or the new one, and the
next run repairs the gap between rename and commit without downloading again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from statements.config import Config
from statements.errors import ExitCode, RemoteError, StatementsError
from statements.fsutil import PRIVATE_DIR, fsync_dir
from statements.ledger import Ledger, RunCounts, ServerId
from statements.remote import (
    Listing,
    RemoteFile,
    RemoteSession,
    RemoteStore,
    SftpSettings,
    SftpStore,
    Transient,
    load_login_key,
)

log = logging.getLogger(__name__)

INBOX = ".inbox"
PART_SUFFIX = ".part"
_HASH_CHUNK = 1024 * 1024
# Even a connection that drops every few seconds while making progress gives up eventually.
MAX_ATTEMPTS = 200


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
class FetchFailure:
    name: str
    reason: str


@dataclass
class FetchSummary:
    new: list[PlannedFetch] = field(default_factory=list)
    fetched: int = 0
    skipped: int = 0
    refused: int = 0
    failures: list[FetchFailure] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def counts(self) -> RunCounts:
        return RunCounts(
            fetched=self.fetched,
            skipped=self.skipped,
            refused=self.refused,
            failed=len(self.failures),
            bytes=self.bytes,
        )


def inbox_dir(archive_root: Path) -> Path:
    path = archive_root / INBOX
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    return path


def inbox_name_for(remote: RemoteFile, version: int) -> str:
    """A flat, deterministic inbox name: the same plan after a crash finds the same file."""
    flat = remote.relative.replace("/", "__")
    return flat if version == 1 else f"{flat}.v{version}"


def plan(
    listing_files: tuple[RemoteFile, ...], history: dict[str, set[tuple[int, int]]]
) -> tuple[list[PlannedFetch], int]:
    """The files to fetch (never fetched, or fetched with another size/mtime) and the skip count."""
    planned: list[PlannedFetch] = []
    skipped = 0
    for remote in listing_files:
        seen = history.get(remote.path, set())
        if (remote.size, remote.mtime) in seen:
            skipped += 1
            continue
        version = len(seen) + 1
        planned.append(PlannedFetch(remote, version, inbox_name_for(remote, version)))
    return planned, skipped


def sha256_of(path: Path, limit: int | None = None) -> hashlib._Hash:
    digest = hashlib.sha256()
    remaining = limit if limit is not None else -1
    with path.open("rb") as handle:
        while remaining != 0:
            chunk = handle.read(_HASH_CHUNK if remaining < 0 else min(_HASH_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining > 0:
                remaining -= len(chunk)
    return digest


class _HashingSink:
    """Writes through to the .part file and hashes what it writes."""

    def __init__(self, handle: BinaryIO, digest: hashlib._Hash) -> None:
        self.handle = handle
        self.digest = digest
        self.written = 0

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.digest.update(data)
        self.written += len(data)
        return len(data)


@dataclass(frozen=True)
class _Done:
    planned: PlannedFetch
    sha256: str
    transferred: int


def download_one(
    session: RemoteSession,
    planned: PlannedFetch,
    inbox: Path,
    progress: Callable[[int], None],
) -> _Done:
    """Download into NAME.part (resuming), verify the size, fsync, rename to NAME."""
    remote = planned.remote
    final = inbox / planned.inbox_name
    part = inbox / (planned.inbox_name + PART_SUFFIX)
    offset = _resumable_offset(part, remote)
    digest = sha256_of(part, offset) if offset else hashlib.sha256()
    if offset:
        log.info("resuming %s at byte %d of %d", remote.relative, offset, remote.size)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as handle:
        handle.seek(offset)
        handle.truncate()
        sink = _HashingSink(handle, digest)
        try:
            session.download(remote, sink, offset, progress)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            handle.flush()
            # The .part's mtime records which remote version its bytes belong to.
            os.utime(part, (remote.mtime, remote.mtime))
    size = part.stat().st_size
    if size != remote.size:
        if size > remote.size:
            part.unlink()
        raise Transient(f"{remote.relative}: got {size} bytes, the server said {remote.size}")
    part.replace(final)
    fsync_dir(inbox)
    return _Done(planned, digest.hexdigest(), sink.written)


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
) -> FetchSummary:
    """Fetch every new remote file into the inbox; the ledger knows each one afterwards."""
    started = time.monotonic()
    progress = progress or NoProgress()
    stop = stop or threading.Event()
    summary = FetchSummary()
    first = store.connect()
    try:
        listing = _retrying_listing(store, first, retries)
        first = listing[1]
        files, refused = listing[0].files, listing[0].refused
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
        planned, summary.skipped = plan(files, ledger.history(server))
        summary.new = planned
        if dry_run or not planned:
            return summary
        inbox = inbox_dir(archive_root)
        pending = _adopt_completed(planned, inbox, ledger, server, run_id, summary)
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
            )
    finally:
        first.close()
        summary.seconds = time.monotonic() - started
    return summary


def _retrying_listing(
    store: RemoteStore, session: RemoteSession, retries: int
) -> tuple[Listing, RemoteSession]:
    for attempt in range(retries + 1):
        try:
            return session.list_files(), session
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
        final = inbox / item.inbox_name
        if final.is_file() and final.stat().st_size == item.remote.size:
            log.info(
                "%s is already in the inbox from an interrupted run; recording it",
                item.remote.relative,
            )
            _commit(ledger, server, item, sha256_of(final).hexdigest(), run_id)
            summary.fetched += 1
        else:
            pending.append(item)
    return pending


def _commit(
    ledger: Ledger, server: ServerId, item: PlannedFetch, sha256: str, run_id: int | None
) -> None:
    ledger.record_fetched(
        server,
        remote_path=item.remote.path,
        size=item.remote.size,
        mtime=item.remote.mtime,
        version=item.version,
        inbox_name=item.inbox_name,
        sha256=sha256,
        run_id=run_id,
    )


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
) -> None:
    """Worker threads download; this thread alone commits to the ledger, as each file lands."""
    work: queue.Queue[PlannedFetch] = queue.Queue()
    for item in pending:
        work.put(item)
    results: queue.Queue[_Done | tuple[PlannedFetch, str] | None] = queue.Queue()
    count = max(1, min(workers, len(pending)))
    sessions: list[RemoteSession | None] = [first] + [None] * (count - 1)

    def worker(index: int) -> None:
        try:
            while not stop.is_set():
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    return
                results.put(
                    _fetch_with_retries(store, sessions, index, item, inbox, retries, progress)
                )
        finally:
            results.put(None)

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"fetch-{i}", daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    running = count
    while running:
        result = results.get()
        if result is None:
            running -= 1
        elif isinstance(result, _Done):
            _commit(ledger, server, result.planned, result.sha256, run_id)
            summary.fetched += 1
            summary.bytes += result.transferred
        else:
            summary.failures.append(FetchFailure(result[0].remote.relative, result[1]))
    for thread in threads:
        thread.join()
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
) -> _Done | tuple[PlannedFetch, str]:
    """Attempts that move the file forward are free; ``retries`` bounds those that do not."""
    started = time.monotonic()
    reason = ""
    fruitless = 0
    part = inbox / (item.inbox_name + PART_SUFFIX)
    for _ in range(MAX_ATTEMPTS):
        before = _size_or_zero(part)
        try:
            session = sessions[index]
            if session is None:
                session = sessions[index] = store.connect()
            done = download_one(session, item, inbox, progress.advanced)
            progress.finished_file(item.remote, time.monotonic() - started)
            return done
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
            reason = exc.message
            break
        except OSError as exc:
            reason = f"local file error: {exc.strerror or exc} ({exc.filename or inbox})"
            break
        except Exception as exc:  # a bug must cost one file, never the run or the file's record
            log.exception("unexpected error fetching %s", item.remote.relative)
            reason = f"unexpected error: {exc!r}"
            break
    progress.failed_file(item.remote, reason)
    return item, reason


# --- wiring to the real collaborators --------------------------------------------------------


def fetch_from_config(
    cfg: Config,
    *,
    dry_run: bool = False,
    progress: FetchProgress | None = None,
    stop: threading.Event | None = None,
) -> FetchSummary:
    """`ibkr-statements fetch`: the key loaded once, the ledger opened, the run recorded."""
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
                ledger.finish_run(
                    run_id,
                    result="failed",
                    exit_code=int(exc.exit_code),
                    counts=RunCounts(),
                    message=exc.message,
                )
            raise
        if run_id is not None:
            code = ExitCode.PARTIAL if summary.failures else ExitCode.OK
            ledger.finish_run(
                run_id,
                result="partial" if summary.failures else "ok",
                exit_code=int(code),
                counts=summary.counts,
            )
    return summary
