"""Writeback: the early disk writes behind decrypting big files (Linux sync_file_range)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from statements import fsutil
from statements.fsutil import Writeback


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


def test_writeback_on_a_closed_descriptor_is_harmless(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    Writeback(fd).written(Writeback.STEP * 2)  # best effort: the final fsync reports errors
