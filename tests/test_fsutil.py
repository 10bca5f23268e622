"""Big files on disk: Writeback (early disk writes and page-cache drops, Linux sync_file_range)
and DirectWriter (O_DIRECT, past the page cache)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from statements import fsutil
from statements.fsutil import DirectWriter, Writeback
from tests.harness import cached_bytes, filesystem_type


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_sync_file_range_is_found_on_linux() -> None:
    # If the ctypes lookup broke, big decryptions would silently pay their whole fsync at the end.
    assert fsutil._sync_file_range is not None


def test_writeback_requests_each_step_and_leaves_the_content_exact(tmp_path: Path) -> None:
    path = tmp_path / "plain.bin"
    chunks = [os.urandom(1 << 20) for _ in range(3 * Writeback.STEP // (1 << 20) + 1)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writeback = Writeback(fd)
        total = 0
        for chunk in chunks:
            total += os.write(fd, chunk)
            writeback.written(total)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(chunks)
    if fsutil._sync_file_range is not None:
        assert writeback.started == 3 * Writeback.STEP  # requested at each 8 MiB, not per chunk


def test_writeback_on_a_closed_descriptor_reports_the_error(tmp_path: Path) -> None:
    # The wait for an earlier step consumes a write error that the final fsync would otherwise
    # report: it must surface here, never be dropped.
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    if fsutil._sync_file_range is None:
        Writeback(fd).written(Writeback.STEP * 2)  # nothing is called: nothing to report
        return
    with pytest.raises(OSError) as raised:
        Writeback(fd).written(Writeback.STEP * 2)
    assert raised.value.errno == errno.EBADF


LINUX_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="sync_file_range and mincore are Linux's"
)


@LINUX_ONLY
@pytest.mark.parametrize("behind", [1, 4])
def test_a_big_file_leaves_about_behind_plus_one_steps_in_the_page_cache(
    disk_folder: Path, behind: int
) -> None:
    folder = disk_folder
    size = 12 * Writeback.STEP
    chunk = os.urandom(1 << 20)
    kept = folder / "kept.bin"
    written_through = folder / "written-through.bin"
    for path, use_writeback in ((kept, False), (written_through, True)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            writeback = Writeback(fd, behind=behind)
            total = 0
            while total < size:
                total += os.write(fd, chunk)
                if use_writeback:
                    writeback.written(total)
            os.fsync(fd)
        finally:
            os.close(fd)
    # Without Writeback the whole file stays cached (so the measure below can see pages)...
    assert cached_bytes(kept) > size - Writeback.STEP
    # ... with it, only the steps in flight and the bytes since: 24 or 48 of the 96 MiB at most.
    assert cached_bytes(written_through) <= (behind + 2) * Writeback.STEP
    assert writeback.dropped == size - behind * Writeback.STEP
    assert (
        hashlib.sha256(written_through.read_bytes()).digest()
        == hashlib.sha256(kept.read_bytes()).digest()
    )


@LINUX_ONLY
def test_writeback_of_a_resumed_file_counts_from_its_offset(disk_folder: Path) -> None:
    folder = disk_folder
    path = folder / "resumed.part"
    head = os.urandom(5 * Writeback.STEP)
    path.write_bytes(head)
    tail = os.urandom(4 * Writeback.STEP)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        writeback = Writeback(fd, offset=len(head))
        total = len(head)
        for start in range(0, len(tail), 1 << 20):
            total += os.write(fd, tail[start : start + (1 << 20)])
            writeback.written(total)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert writeback.started == len(head) + 4 * Writeback.STEP
    assert writeback.dropped == len(head) + 3 * Writeback.STEP  # never before the offset
    assert path.read_bytes() == head + tail


# --- DirectWriter: big files straight to the disk ---------------------------------------------


def _direct_writer(path: Path) -> tuple[int, DirectWriter]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    writer = DirectWriter.attach(fd)
    assert writer is not None, (
        f"{path.parent} is on {filesystem_type(path.parent)}: these tests need one of "
        f"{', '.join(sorted(fsutil._DIRECT_FILESYSTEMS))} (disk_folder picks the project's disk "
        "over tmpfs)"
    )
    return fd, writer


def _fill(writer: DirectWriter, data: bytes, seed: int) -> None:
    """Hand ``data`` over in odd pieces, as a pipe gives them: 1 byte to a whole buffer."""
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        space = writer.space()
        count = min(len(space), len(data) - at, rng.choice((1, 4095, 65536, 300_000, 1 << 20)))
        space[:count] = data[at : at + count]
        writer.filled(count)
        at += count


@LINUX_ONLY
def test_filesystem_type_agrees_with_the_mount_table(disk_folder: Path) -> None:
    for folder in (disk_folder, Path("/dev/shm")):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert fsutil.filesystem_type(fd) == filesystem_type(folder)
        finally:
            os.close(fd)


@LINUX_ONLY
def test_tmpfs_is_written_through_the_cache() -> None:
    # tmpfs is memory: there is no disk to go to, so no direct writer is made there.
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as handle:
        assert filesystem_type(Path("/dev/shm")) == "tmpfs"
        assert DirectWriter.attach(handle.fileno()) is None
        assert not fcntl.fcntl(handle.fileno(), fcntl.F_GETFL) & os.O_DIRECT


@LINUX_ONLY
@pytest.mark.parametrize("size", [0, 1, DirectWriter.CHUNK, 3 * DirectWriter.CHUNK + 12345])
def test_direct_writer_writes_every_byte_in_order_past_the_page_cache(
    disk_folder: Path, size: int
) -> None:
    path = disk_folder / "plain.bin"
    data = random.Random(size).randbytes(size)
    fd, writer = _direct_writer(path)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        _fill(writer, data, seed=size)
        writer.close()
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT  # the caller's fsync is plain
        os.fsync(fd)
    finally:
        os.close(fd)
    # Only the last, partial buffer went through the page cache.
    assert cached_bytes(path) <= size % DirectWriter.CHUNK + 4096
    assert path.read_bytes() == data


class _UnalignedWriter(DirectWriter):
    CHUNK = (1 << 20) + 100  # no device takes a direct write of this length


@LINUX_ONLY
def test_a_write_the_disk_will_not_take_direct_still_lands_whole(disk_folder: Path) -> None:
    # XFS refuses such a write (EINVAL) and the writer goes on through the cache; ext4 takes
    # it through its own cache. Either way the file must hold every byte, in order.
    path = disk_folder / "plain.bin"
    data = random.Random(7).randbytes(3 * _UnalignedWriter.CHUNK + 5)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = _UnalignedWriter.attach(fd)
        assert writer is not None
        _fill(writer, data, seed=7)
        writer.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


_WRITE_PAST_A_LIMIT = """
import os, resource, signal, sys
from statements.fsutil import DirectWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit fails: EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (3 * DirectWriter.CHUNK, 3 * DirectWriter.CHUNK))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
writer = DirectWriter.attach(fd)
assert writer is not None
try:
    for _ in range(8):
        space = writer.space()
        space[:] = b"x" * len(space)
        writer.filled(len(space))
    writer.close()
except OSError as exc:
    writer.abort()
    print(exc.errno)
"""


@LINUX_ONLY
def test_a_failed_direct_write_is_raised_to_the_caller(disk_folder: Path) -> None:
    # A real write error (the file size limit, as a full disk would) comes back from the
    # writer's thread to the caller, which stops; nothing hangs.
    path = disk_folder / "limited.bin"
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_PAST_A_LIMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(errno.EFBIG)
    assert path.stat().st_size == 3 * DirectWriter.CHUNK
