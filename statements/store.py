"""The remote store as the pipeline sees it: files, listings, sessions, and a transient fault.

Without paramiko: `decrypt` and `status` import the pipeline, and importing paramiko costs
0.1 s of every start (0.2 s with invoke, which the console script keeps out: see
:mod:`statements.entry`). The SFTP implementation is :mod:`statements.remote`, imported only
by the commands that connect.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple, Protocol


class RemoteFile(NamedTuple):
    """One file of a listing. A named tuple, not a frozen dataclass: a listing makes 20,000 of
    them a night, and a frozen dataclass takes five times as long to build."""

    path: str  # as the server knows it: remote_dir joined with the relative name
    relative: str  # relative to remote_dir ("sub/x.pgp" when recursive)
    size: int
    mtime: int

    @property
    def name(self) -> str:
        return posixpath.basename(self.relative)


@dataclass(frozen=True)
class Refused:
    name: str  # printable (repr-escaped where needed)
    reason: str


# A file as fetched before: (remote path, size, mtime). Another size or mtime is a new version.
FileVersion = tuple[str, int, int]


@dataclass(frozen=True)
class Listing:
    files: tuple[RemoteFile, ...]  # sorted by relative name
    refused: tuple[Refused, ...]
    known: int = 0  # files left out of ``files`` as versions the caller said it already has


# The versions a listing leaves out, asked for once the first names have arrived: the caller may
# still be reading them (the ledger's history of 20,000 files takes 35-55 ms, less than the
# connect), and the READDIRs in flight are answered meanwhile.
KnownVersions = Callable[[], Container[FileVersion]]


def nothing_known() -> Container[FileVersion]:
    """For a listing of every file (as `doctor` shows it)."""
    return frozenset()


class Transient(Exception):
    """A fault worth another attempt: refused, reset, timeout, EOF during the handshake."""


class RemoteSession(Protocol):
    """What the pipeline needs of a connection (real: :class:`SftpSession`)."""

    def list_files(self, known: KnownVersions = nothing_known) -> Listing:
        """The folder's files, each name checked, without the versions ``known()`` holds."""
        ...

    def download(
        self, remote: RemoteFile, sink: BinaryIO, offset: int, progress: Callable[[int], None]
    ) -> None: ...

    def remove(self, remote: RemoteFile) -> None: ...

    def close(self) -> None: ...


class RemoteStore(Protocol):
    def connect(self) -> RemoteSession: ...
