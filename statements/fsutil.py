"""Atomic, permission-exact file writes.

Modes are set with ``fchmod``/``chmod`` after creation, never left to the umask: a user running
with ``umask 000`` still gets 0600 keys in a 0700 folder.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import queue
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644
PRIVATE_DIR = 0o700
# From this size on, a download's new .part is written past the page cache (DirectWriter) where
# the file system allows. Below it, the four 1 MiB buffers and the writer thread cost more than
# the cache does. (gpg writes a plaintext into its file itself: see decrypt._follow_plaintext.)
DIRECT_WRITE_BYTES = 16 << 20


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    path.chmod(PRIVATE_DIR)
    return path


class Writeback:
    """Writes a growing file to disk as it grows and lets the page cache forget what is written.

    Without it a big file sits dirty in the page cache until ``fsync``, which then writes it all
    at once (0.55 s of a 2.4 s gpg decryption of 1 GiB here), and every written page stays
    cached: a 1 GiB report took 1 GiB of fresh page cache, and fresh pages are dear (on the
    VMs measured, 1.6-2.1 s of system time per GiB, against 0.3 s when the same pages are
    reused). Every STEP this queues the new bytes for writeback
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, no waiting), waits for the writeback of the step
    ``behind`` steps earlier and drops those now clean pages (``POSIX_FADV_DONTNEED``), so a file
    of any size holds about ``behind + 1`` steps of cache and the next step reuses the pages
    just freed. The archive is written once and seldom read: keeping it cached would only evict
    what the user reads.

    None of this promises durability; the caller still fsyncs at the end. Elsewhere than Linux
    (or if the call is missing) this does nothing and the fsync does all the work, as before.
    """

    STEP = 8 << 20  # bytes written between two writeback requests

    def __init__(self, fd: int, offset: int = 0, *, behind: int = 1) -> None:
        self.fd = fd
        self.started = offset  # bytes whose writeback was requested
        self.dropped = offset  # bytes written to disk and dropped from the page cache
        self.behind = behind  # steps left in flight before the oldest is waited for
        self._in_flight: collections.deque[tuple[int, int]] = collections.deque()

    def written(self, total: int) -> None:
        """``total`` bytes of the file are written: queue what is new once a step is reached.

        Raises OSError if the disk reported an error writing an earlier step: the wait below
        consumes that error, so the final fsync would no longer see it.
        """
        if total - self.started < self.STEP or _sync_file_range is None:
            return
        _checked(_sync_file_range(self.fd, self.started, total - self.started, _WRITE))
        self._in_flight.append((self.started, total))
        self.started = total
        while len(self._in_flight) > self.behind:
            begin, end = self._in_flight.popleft()
            _checked(_sync_file_range(self.fd, begin, end - begin, _WAIT_AND_WRITE))
            # The kernel keeps a partly covered last page, so appending to it never re-reads.
            os.posix_fadvise(self.fd, begin, end - begin, os.POSIX_FADV_DONTNEED)
            self.dropped = end


def _checked(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _load_sync_file_range() -> ctypes._NamedFuncPointer | None:
    if not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        return None
    try:
        # The process's own symbols, libc's among them: find_library("c") would run
        # `ldconfig -p`, 12-35 ms of every command's start.
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


# sync_file_range(2) flags
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_WAIT_AND_WRITE = _WAIT_BEFORE | _WRITE | _WAIT_AFTER
_sync_file_range = _load_sync_file_range()


# File systems where an O_DIRECT write is a plain local block write. Elsewhere (NFS and SMB,
# where each direct write is a round trip and a commit; FUSE; tmpfs) writes stay buffered.
_DIRECT_FILESYSTEMS = frozenset({"ext4", "xfs", "btrfs"})


def filesystem_type(fd: int) -> str | None:
    """The type of the file system the open file ``fd`` is on ("ext4"), or None if unknown."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                # ID PARENT MAJOR:MINOR ROOT MOUNT-POINT OPTIONS [TAGS...] - TYPE SOURCE OPTIONS
                fields = line.split()
                if len(fields) > 3 and fields[2] == device and "-" in fields[3:]:
                    at = fields.index("-", 3) + 1
                    return fields[at] if at < len(fields) else None
    except OSError:
        return None
    return None


class DirectWriter:
    """Writes a big new file from this process's buffers straight to the disk (``O_DIRECT``).

    Through the page cache every page of the file is copied, allocated, written back and then
    dropped (see :class:`Writeback`): 1.07 s of this process's system time for 1 GiB (the
    plaintext of bench/'s big report, when this process copied it from gpg), against 0.57 s
    direct; that decrypt went from 2.86 to 2.41 s and from 4.4 to 3.4 CPU-seconds (medians of
    5, interleaved), because gpg, on the other core, no longer competed with that work.

    :meth:`write` copies bytes already in memory into the buffers (a download's replies); a
    caller that reads from a file descriptor can read into :meth:`space` and report the count
    with :meth:`filled` instead, with no copy. A thread writes each full buffer while the next
    one fills, at most BUFFERS - 1 behind. The last, partial buffer goes through the page cache
    at :meth:`close`, and so does every write from the first one the file system refuses direct
    (EINVAL: it wants a larger alignment) or writes short, so the file is always whole. The
    caller still fsyncs it.
    """

    CHUNK = 1 << 20  # a multiple of every common device's logical block size
    BUFFERS = 4

    @classmethod
    def attach(cls, fd: int) -> DirectWriter | None:
        """A writer for the new, empty file ``fd``; None where direct writes are not tried."""
        if not hasattr(os, "O_DIRECT") or filesystem_type(fd) not in _DIRECT_FILESYSTEMS:
            return None
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError:
            return None
        return cls(fd, flags & ~os.O_DIRECT)

    def __init__(self, fd: int, buffered_flags: int) -> None:
        self._fd = fd
        self._buffered_flags = buffered_flags
        self._direct = True  # the thread's, until it is joined
        self._error: BaseException | None = None
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        for _ in range(self.BUFFERS - 1):
            self._free.put(self._new_buffer())
        self._buffer = self._new_buffer()
        self._used = 0
        self._thread: threading.Thread | None = threading.Thread(
            target=self._write_queued, name="direct-writer", daemon=True
        )
        self._thread.start()

    def _new_buffer(self) -> memoryview:
        # An anonymous map starts on a page: the address alignment O_DIRECT asks for.
        return memoryview(mmap.mmap(-1, self.CHUNK))

    def space(self) -> memoryview:
        """Where the next bytes go (the free end of the current buffer, never empty)."""
        return self._buffer[self._used :]

    def filled(self, count: int) -> None:
        """``count`` bytes were put at the start of :meth:`space`; raises what writing raised."""
        self._used += count
        if self._used < self.CHUNK:
            return
        if self._error is not None:
            raise self._error
        self._full.put((self._buffer, self._used))
        self._buffer = self._free.get()
        self._used = 0

    def write(self, data: bytes | memoryview) -> None:
        """Copy ``data`` into the buffers: for a caller whose bytes are already in memory."""
        view = memoryview(data)
        while view:
            space = self.space()
            count = min(len(space), len(view))
            space[:count] = view[:count]
            self.filled(count)
            view = view[count:]

    def close(self) -> None:
        """Write what is left and wait for it; raise the first error writing met."""
        self._stop()
        if self._error is not None:
            raise self._error
        self._write(self._buffer[: self._used])
        self._used = 0

    def abort(self) -> None:
        """Stop writing, raise nothing: for the way out after another error."""
        with contextlib.suppress(OSError):
            self._stop()

    def _stop(self) -> None:
        if self._thread is not None:
            self._full.put(None)
            self._thread.join()
            self._thread = None
        if self._direct:
            self._buffered()

    def _write_queued(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, count = item
            if self._error is None:
                try:
                    self._write(buffer[:count])
                except BaseException as exc:  # the caller raises it; this thread must go on
                    self._error = exc
            self._free.put(buffer)

    def _write(self, view: memoryview) -> None:
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                self._buffered()
                continue
            view = view[written:]
            if view and self._direct:
                self._buffered()  # the rest would start off the alignment

    def _buffered(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, self._buffered_flags)
        self._direct = False


def forget_cached(fd: int) -> None:
    """Let the page cache forget a file just fsynced (every page of it clean, so all go): an
    archived file is written once and seldom read. Best effort; elsewhere than POSIX nothing."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = PRIVATE_FILE) -> Iterator[BinaryIO]:
    """Yield a file in ``path``'s folder; on success it is fsynced and renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    with atomic_writer(path, mode) as handle:
        handle.write(data)


def loose_permissions(path: Path) -> bool:
    """True when group or others may read, write or enter ``path``."""
    return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def mode_string(path: Path) -> str:
    return f"{stat.S_IMODE(path.stat().st_mode):04o}"


def utc_stamp(now: datetime | None = None) -> str:
    """A timestamp that sorts and is safe in file names: 20261121T045800Z."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def keep_copy_aside(path: Path, stamp: str) -> Path:
    """Keep the current ``path`` as ``path.replaced-STAMP`` (a hard link) and return that name.

    ``path`` itself stays in place, so an atomic write over it afterwards leaves, at every
    moment, either the old or the new file there, and the old one beside it.
    """
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    for counter in range(2, 1000):
        try:
            os.link(path, target)
        except FileExistsError:
            target = path.with_name(f"{path.name}.replaced-{stamp}-{counter}")
            continue
        fsync_dir(path.parent)
        return target
    raise FileExistsError(f"too many replaced copies of {path}")
