"""Writeback: early disk writes and page-cache drops behind big files (Linux sync_file_range)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from statements import fsutil
from statements.fsutil import Writeback
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
def test_a_big_file_leaves_about_two_steps_in_the_page_cache(disk_folder: Path) -> None:
    folder = disk_folder
    size = 8 * Writeback.STEP
    chunk = os.urandom(1 << 20)
    kept = folder / "kept.bin"
    written_through = folder / "written-through.bin"
    for path, use_writeback in ((kept, False), (written_through, True)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            writeback = Writeback(fd)
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
    # ... with it, only the last two steps and the bytes since: 24 of the 64 MiB at most.
    assert cached_bytes(written_through) <= 3 * Writeback.STEP
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


@pytest.fixture
def disk_folder(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, unless it is on tmpfs (whose pages cannot be dropped): then the project's."""
    if filesystem_type(tmp_path) != "tmpfs":
        yield tmp_path
        return
    folder = Path(__file__).resolve().parent / f".disk-{tmp_path.name}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder)
