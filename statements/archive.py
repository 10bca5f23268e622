"""Pure file logic of the archive: report names, unpacking bundles, placing files exactly once.

No SQLite and no gpg here: the pipeline decrypts, asks :func:`unpack` for the files a plaintext
yields, asks :func:`destination` where each belongs (DESIGN.md, "Archive (contract)") and moves it
there with :func:`place`, which never overwrites and never makes a second copy of the same bytes.

Bundles are untrusted input. A zip is validated as a whole before anything is written, then each
member is streamed on its own with its actual size counted, because declared sizes lie in bombs.
Every problem with a bundle is an :class:`UnpackRefused` and leaves nothing behind in the workdir.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from statements.config import ArchiveConfig
from statements.errors import ExitCode, StatementsError
from statements.fsutil import PRIVATE_DIR, PRIVATE_FILE, fsync_dir

CHUNK = 1024 * 1024
UNSORTED = "_unsorted"
# Room is left below NAME_MAX (255 bytes) for the ".v10000" a later version may insert.
MAX_NAME_BYTES = 240
MAX_VERSIONS = 10_000
# Ratios are only judged above this size: a few KiB of blanks legitimately compress far beyond
# any sane bomb threshold, and a small member cannot hurt however well it compresses.
RATIO_FLOOR_BYTES = 1024 * 1024
# Names longer than this are not parsed (they still get archived, under _unsorted).
_MAX_PARSE_LEN = 1024

# IBKR account ids: U (client), F (advisor master) or I (broker master) and digits. Five or more
# digits, so a token like "Q4" or "F1" in a free-form name is not taken for an account.
ACCOUNT_RE = re.compile(r"[UFI][0-9]{5,12}", re.ASCII)

_FLEX_RE = re.compile(
    r"(?P<account>[UFI][0-9]{5,12})"
    r"\.(?P<query>[^/\\\x00-\x1f\x7f]+?)"
    r"\.(?P<from>[0-9]{8})\.(?P<to>[0-9]{8})"
    r"\.(?P<ext>[A-Za-z0-9]+(?:\.[A-Za-z0-9]+)*)",
    re.ASCII,
)
_ACCOUNT_TOKEN_RE = re.compile(r"(?<![A-Za-z0-9])([UFI][0-9]{5,12})(?![A-Za-z0-9])", re.ASCII)

_MONTHS = {
    name: number
    for number, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sept", "sep"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ],
        start=1,
    )
    for name in names
}
# Longest first, so "September" is not read as "Sep" followed by garbage.
_MONTH = "|".join(sorted(_MONTHS, key=len, reverse=True))
_SEP = r"[^A-Za-z0-9]+"
_TO = rf"{_SEP}(?:to{_SEP})?"
# Each period pattern is a zero-width lookahead so that finditer tries every start position:
# an invalid first candidate ("99999999_20250101_20251231") does not hide a valid later one.
_PERIOD_RES = [
    re.compile(
        rf"(?<![A-Za-z])(?=({_MONTH}){_SEP}([0-9]{{1,2}}){_SEP}([0-9]{{4}}){_TO}"
        rf"({_MONTH}){_SEP}([0-9]{{1,2}}){_SEP}([0-9]{{4}})(?![0-9]))",
        re.ASCII | re.IGNORECASE,
    ),
    re.compile(
        rf"(?<![A-Za-z0-9])(?=([0-9]{{4}})([0-9]{{2}})([0-9]{{2}}){_TO}"
        r"([0-9]{4})([0-9]{2})([0-9]{2})(?![A-Za-z0-9]))",
        re.ASCII | re.IGNORECASE,
    ),
    re.compile(
        rf"(?<![A-Za-z0-9])(?=([0-9]{{4}})-([0-9]{{2}})-([0-9]{{2}}){_TO}"
        r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?![A-Za-z0-9]))",
        re.ASCII | re.IGNORECASE,
    ),
]
_ENCRYPTED_SUFFIXES = (".pgp", ".gpg", ".asc")
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive
# zipfile bounds the output of one read only for deflate; bzip2 and LZMA members decompress a
# whole input chunk at once, so one lying member could exhaust memory. IBKR uses deflate.
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_DRIVE_RE = re.compile(r"[A-Za-z]:")


# --------------------------------------------------------------------------------------------
# Names


@dataclass(frozen=True)
class ReportName:
    account: str | None
    query: str | None
    period_from: date | None
    period_to: date | None

    @property
    def year(self) -> int | None:
        return self.period_to.year if self.period_to else None


def plaintext_name(remote_name: str) -> str:
    """``remote_name`` without one trailing .pgp/.gpg/.asc; unchanged if nothing would remain."""
    lowered = remote_name.lower()
    for suffix in _ENCRYPTED_SUFFIXES:
        if lowered.endswith(suffix) and len(remote_name) > len(suffix):
            return remote_name[: -len(suffix)]
    return remote_name


def _date(year: str, month: int, day: str) -> date | None:
    try:
        return date(int(year), month, int(day))
    except ValueError:
        return None


def _period(start: date | None, end: date | None) -> tuple[date, date] | None:
    if start is None or end is None or start > end:
        return None
    return start, end


def parse_flex_name(name: str) -> ReportName | None:
    """``<account>.<Query>.<from YYYYMMDD>.<to YYYYMMDD>.<ext...>``, as Flex delivers; else None."""
    if len(name) > _MAX_PARSE_LEN:
        return None
    match = _FLEX_RE.fullmatch(name)
    if match is None:
        return None
    start, end = match["from"], match["to"]
    period = _period(
        _date(start[:4], int(start[4:6]), start[6:]), _date(end[:4], int(end[4:6]), end[6:])
    )
    if period is None:
        return None
    return ReportName(match["account"], match["query"], *period)


def parse_member_name(name: str) -> ReportName:
    """The account id and period standing anywhere in a free-form name; missing parts are None.

    Several different account ids make the account ambiguous, hence None: guessing would file
    one client's statement under another's account.
    """
    if len(name) > _MAX_PARSE_LEN:
        return ReportName(None, None, None, None)
    accounts = set(_ACCOUNT_TOKEN_RE.findall(name))
    account = accounts.pop() if len(accounts) == 1 else None
    period = _find_period(name)
    if period is None:
        return ReportName(account, None, None, None)
    return ReportName(account, None, *period)


def _find_period(name: str) -> tuple[date, date] | None:
    for index, pattern in enumerate(_PERIOD_RES):
        for match in pattern.finditer(name):
            y1, m1, d1, y2, m2, d2 = _period_groups(index, [g or "" for g in match.groups()])
            period = _period(_date(y1, m1, d1), _date(y2, m2, d2))
            if period is not None:
                return period
    return None


def _period_groups(index: int, groups: list[str]) -> tuple[str, int, str, str, int, str]:
    if index == 0:  # Month DD YYYY Month DD YYYY
        m1, d1, y1, m2, d2, y2 = groups
        return y1, _MONTHS[m1.lower()], d1, y2, _MONTHS[m2.lower()], d2
    y1, m1, d1, y2, m2, d2 = groups
    return y1, int(m1), d1, y2, int(m2), d2


def parse_report_name(name: str) -> ReportName:
    """A Flex name if it is one, else whatever account and period the name carries."""
    return parse_flex_name(name) or parse_member_name(name)


def safe_name(name: str) -> str:
    """``name`` made into one harmless path component, kept recognisable.

    Separators and control characters become "_", a leading "." gets a "_" in front (hidden files
    and ".." cannot appear), and an over-long name is cut in its stem, keeping a short suffix.
    """
    cleaned = "".join(
        "_" if ch in "/\\" or unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in name
    )
    if not cleaned or cleaned.startswith("."):
        cleaned = "_" + cleaned
    if len(cleaned.encode()) <= MAX_NAME_BYTES:
        return cleaned
    suffix = PurePosixPath(cleaned).suffix
    if len(suffix.encode()) > 16:
        suffix = ""
    stem = cleaned[: len(cleaned) - len(suffix)]
    budget = MAX_NAME_BYTES - len(suffix.encode())
    return stem.encode()[:budget].decode("utf-8", "ignore") + suffix


# --------------------------------------------------------------------------------------------
# Unpacking


@dataclass(frozen=True)
class UnpackLimits:
    max_members: int
    max_unpacked_bytes: int
    max_ratio: float

    @classmethod
    def from_config(cls, archive: ArchiveConfig) -> UnpackLimits:
        return cls(archive.max_members, archive.max_unpacked_bytes, archive.max_ratio)


class UnpackRefused(StatementsError):
    """One bundle was not unpacked: it is malformed, hostile, or beyond the configured limits."""

    exit_code = ExitCode.PARTIAL


@dataclass(frozen=True)
class Produced:
    name: str  # the archived file name: the plaintext name, or a zip member's base name
    path: Path  # where it is now (inside workdir, or the plaintext itself)
    member_of: str | None  # the bundle's plaintext name for zip members, else None


_HINT_CORRUPT = (
    "Nothing from this bundle was archived. Check the file by hand (unzip -l / gzip -t); if the "
    "download was damaged, fetching it again may help."
)
_HINT_HOSTILE = (
    "Nothing from this bundle was archived: it contains names or entries that a genuine IBKR "
    "bundle never does. Do not unpack it with other tools; inspect it with `unzip -l`."
)


def _hint_limit(key: str) -> str:
    return (
        "Nothing from this bundle was archived. If the bundle is genuine, raise "
        f"[archive] {key} in the configuration file and process the bundle again."
    )


def unpack(plaintext: Path, name: str, workdir: Path, limits: UnpackLimits) -> list[Produced]:
    """The files ``plaintext`` (named ``name``) yields: zip members, a gunzipped file, or itself.

    Zip members land in ``workdir/<entry index>/<base name>``, a gzip's content in
    ``workdir/<name without .gz>``; ``workdir`` is created if missing and must not already hold
    those entries. The plaintext itself is left in place. On refusal everything written into
    ``workdir`` is removed again.
    """
    lowered = name.lower()
    if lowered.endswith(".zip"):
        return _unpack_zip(plaintext, name, workdir, limits)
    if lowered.endswith(".gz"):
        return [_gunzip(plaintext, name, workdir, limits)]
    return [Produced(name, plaintext, None)]


@dataclass(frozen=True)
class _Member:
    index: int
    info: zipfile.ZipInfo
    basename: str


def _unpack_zip(plaintext: Path, name: str, workdir: Path, limits: UnpackLimits) -> list[Produced]:
    with plaintext.open("rb") as handle:
        if handle.read(4) not in _ZIP_MAGICS:
            raise UnpackRefused(
                f"{name} is named like a zip archive but is not one.", _HINT_CORRUPT
            )
        handle.seek(0)
        try:
            archive = zipfile.ZipFile(handle)
        except Exception as exc:  # the zip parser fails in many ways on hostile bytes
            raise UnpackRefused(
                f"{name} is not a readable zip archive ({_describe(exc)}).", _HINT_CORRUPT
            ) from None
        with archive:
            size = plaintext.stat().st_size
            members = _validate_zip(archive, name, size, limits)
            with _cleanup_on_failure(workdir) as created:
                return [
                    Produced(
                        member.basename,
                        _extract_member(archive, member, name, workdir, created, limits),
                        name,
                    )
                    for member in members
                ]


def _validate_zip(
    archive: zipfile.ZipFile, name: str, size: int, limits: UnpackLimits
) -> list[_Member]:
    """Every entry checked before anything is written; the file entries to extract, in order."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise UnpackRefused(
            f"{name} has {len(infos)} entries, more than the {limits.max_members} allowed.",
            _hint_limit("max_members"),
        )
    members: list[_Member] = []
    seen: set[str] = set()
    total = 0
    total_compressed = 0
    for index, info in enumerate(infos):
        where = f"{name}: entry {info.orig_filename!r}"
        parts, is_dir = _entry_parts(info, where)
        key = unicodedata.normalize("NFC", "/".join(parts))
        if key in seen:
            raise UnpackRefused(f"{where} appears twice in the archive.", _HINT_HOSTILE)
        seen.add(key)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise UnpackRefused(f"{where} is a symbolic link.", _HINT_HOSTILE)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnpackRefused(f"{where} is a special file, not a regular one.", _HINT_HOSTILE)
        if info.flag_bits & 0x41:  # bit 0: encrypted; bit 6: strong encryption
            raise UnpackRefused(
                f"{where} is password-protected; IBKR bundles are not.", _HINT_HOSTILE
            )
        total += info.file_size
        total_compressed += info.compress_size
        if total > limits.max_unpacked_bytes:
            raise UnpackRefused(
                f"{name} would unpack to more than {limits.max_unpacked_bytes} bytes "
                f"(declared sizes up to {where}).",
                _hint_limit("max_unpacked_bytes"),
            )
        if _over_ratio(info.file_size, info.compress_size, limits):
            raise UnpackRefused(
                f"{where} expands {info.file_size} bytes from {info.compress_size} "
                f"(more than {limits.max_ratio:g}:1), which is how zip bombs look.",
                _hint_limit("max_ratio"),
            )
        if is_dir:
            continue
        if info.compress_type not in _ZIP_METHODS:
            raise UnpackRefused(
                f"{where} uses compression method {info.compress_type}; only stored and "
                "deflate members are unpacked.",
                _HINT_CORRUPT,
            )
        members.append(_Member(index, info, parts[-1]))
    if _over_ratio(total, total_compressed, limits) or _over_ratio(total, size, limits):
        raise UnpackRefused(
            f"{name} expands to {total} bytes from {size} (more than {limits.max_ratio:g}:1), "
            "which is how zip bombs look.",
            _hint_limit("max_ratio"),
        )
    if not members:
        raise UnpackRefused(f"{name} contains no files.", _HINT_CORRUPT)
    return members


def _entry_parts(info: zipfile.ZipInfo, where: str) -> tuple[list[str], bool]:
    """The entry's path components after normalisation, and whether it is a directory."""
    raw = info.orig_filename  # before zipfile cut it at a NUL
    if not raw or any(unicodedata.category(ch) in ("Cc", "Cs") for ch in raw):
        raise UnpackRefused(f"{where} has an empty name or control characters.", _HINT_HOSTILE)
    # Backslashes are separators to Windows tools, so "..\\x" must count as traversal too.
    normal = raw.replace("\\", "/")
    if normal.startswith("/") or _DRIVE_RE.match(normal):
        raise UnpackRefused(f"{where} has an absolute path.", _HINT_HOSTILE)
    components = normal.split("/")
    if ".." in components:
        raise UnpackRefused(f"{where} points outside the archive ('..').", _HINT_HOSTILE)
    is_dir = normal.endswith("/")
    parts = [part for part in components if part not in ("", ".")]
    if not parts:
        raise UnpackRefused(f"{where} has no name.", _HINT_HOSTILE)
    if not is_dir and len(parts[-1].encode()) > 255:
        raise UnpackRefused(f"{where} has a file name over 255 bytes.", _HINT_HOSTILE)
    return parts, is_dir


def _over_ratio(unpacked: int, packed: int, limits: UnpackLimits) -> bool:
    return unpacked > RATIO_FLOOR_BYTES and unpacked / max(packed, 1) > limits.max_ratio


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _cleanup_on_failure(workdir: Path) -> Iterator[list[Path]]:
    """Yield a list to record what is created in ``workdir``; on any failure remove all of it."""
    made_workdir = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    created: list[Path] = []
    try:
        yield created
    except BaseException:
        for path in reversed(created):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if made_workdir:
            with contextlib.suppress(OSError):
                workdir.rmdir()
        raise


def _create_private(path: Path) -> BinaryIO:
    """A new file, 0600 whatever the umask; never follows or replaces what is already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return os.fdopen(fd, "wb")


def _extract_member(
    archive: zipfile.ZipFile,
    member: _Member,
    name: str,
    workdir: Path,
    created: list[Path],
    limits: UnpackLimits,
) -> Path:
    info = member.info
    where = f"{name}: member {info.orig_filename!r}"
    folder = workdir / str(member.index)
    folder.mkdir(mode=PRIVATE_DIR)
    created.append(folder)
    folder.chmod(PRIVATE_DIR)
    target = folder / member.basename
    written = 0
    with _create_private(target) as out:
        for chunk in _member_chunks(archive, info, where):
            written += len(chunk)
            # zipfile stops at the declared size, but count anyway: the cap must not depend
            # on the parser's good behaviour.
            if written > info.file_size or written > limits.max_unpacked_bytes:
                raise UnpackRefused(
                    f"{where} unpacks to more bytes than it declares ({info.file_size}).",
                    _HINT_HOSTILE,
                )
            out.write(chunk)
    if written != info.file_size:
        raise UnpackRefused(
            f"{where} unpacked to {written} bytes but declares {info.file_size}.", _HINT_CORRUPT
        )
    return target


def _member_chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Iterator[bytes]:
    """The member's bytes; zipfile checks the CRC when the last chunk is read."""
    try:
        source = archive.open(info)
    except Exception as exc:
        raise UnpackRefused(f"{where} cannot be read ({_describe(exc)}).", _HINT_CORRUPT) from None
    with source:
        while True:
            try:
                chunk = source.read(CHUNK)
            except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError, ...
                raise UnpackRefused(
                    f"{where} is damaged ({_describe(exc)}).", _HINT_CORRUPT
                ) from None
            if not chunk:
                return
            yield chunk


def _gunzip(plaintext: Path, name: str, workdir: Path, limits: UnpackLimits) -> Produced:
    inner = name[:-3]
    if (
        not inner
        or inner in (".", "..")
        or "/" in inner
        or any(unicodedata.category(ch) in ("Cc", "Cs") for ch in inner)
        or len(inner.encode()) > 255
    ):
        raise UnpackRefused(f"{name}: cannot name the unpacked file {inner!r}.", _HINT_HOSTILE)
    packed = plaintext.stat().st_size
    with _cleanup_on_failure(workdir) as created:
        target = workdir / inner
        with _create_private(target) as out:
            created.append(target)
            written = 0
            for chunk in _gzip_chunks(plaintext, name):
                written += len(chunk)
                if written > limits.max_unpacked_bytes:
                    raise UnpackRefused(
                        f"{name} unpacks to more than {limits.max_unpacked_bytes} bytes.",
                        _hint_limit("max_unpacked_bytes"),
                    )
                if _over_ratio(written, packed, limits):
                    raise UnpackRefused(
                        f"{name} expands more than {limits.max_ratio:g}:1, "
                        "which is how gzip bombs look.",
                        _hint_limit("max_ratio"),
                    )
                out.write(chunk)
        return Produced(inner, target, None)


def _gzip_chunks(plaintext: Path, name: str) -> Iterator[bytes]:
    # The file is opened by us first: a missing plaintext is the caller's problem, not the
    # bundle's, and must not be reported as a damaged bundle.
    with plaintext.open("rb") as raw:
        try:
            source = gzip.GzipFile(fileobj=raw, mode="rb")
        except Exception as exc:
            raise UnpackRefused(
                f"{name} is not a readable gzip file ({_describe(exc)}).", _HINT_CORRUPT
            ) from None
        with source:
            while True:
                try:
                    chunk = source.read(CHUNK)
                except Exception as exc:  # BadGzipFile, EOFError, zlib.error, ...
                    raise UnpackRefused(
                        f"{name} is not a readable gzip file ({_describe(exc)}).", _HINT_CORRUPT
                    ) from None
                if not chunk:
                    return
                yield chunk


# --------------------------------------------------------------------------------------------
# Where files go


def destination(
    produced: Produced, *, bundle: ReportName | None, fetched_on: date
) -> PurePosixPath:
    """The path, relative to the archive root, where ``produced`` belongs (DESIGN.md contract).

    Never raises and never escapes the root: the first component is an account id or _unsorted,
    the file name is made safe by :func:`safe_name`.
    """
    name = safe_name(produced.name)
    report = parse_report_name(produced.name)
    account, year = report.account, report.year
    if produced.member_of is not None and bundle is not None:
        # A member without its own account or period inherits the bundle's.
        account = account or bundle.account
        year = year or bundle.year
    # The bundle's account comes from the caller: the root must not depend on it being sane.
    if account is not None and not ACCOUNT_RE.fullmatch(account):
        account = None
    if account is None or year is None:
        return PurePosixPath(UNSORTED, fetched_on.isoformat(), name)
    return PurePosixPath(account, f"{year:04d}", name)


# --------------------------------------------------------------------------------------------
# Placing files exactly once


@dataclass(frozen=True)
class Placement:
    relative: PurePosixPath  # where the content now is (maybe a .vN name)
    version: int  # 1 for the plain name, 2 for NAME.v2.EXT, ...
    already_there: bool  # identical content was already at that path: nothing written


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def versioned(relative: PurePosixPath, version: int) -> PurePosixPath:
    """``x.xml`` -> ``x.v2.xml``: the version goes before the last suffix, or at the end."""
    if version == 1:
        return relative
    suffix = relative.suffix
    stem = relative.name[: len(relative.name) - len(suffix)]
    return relative.with_name(f"{stem}.v{version}{suffix}")


def place(source: Path, root: Path, relative: PurePosixPath, sha256: str) -> Placement:
    """Move ``source`` (whose SHA-256 is ``sha256``) to ``root/relative``, exactly once.

    Identical content already at the name, or at one of its versions, is ``already_there`` and
    ``source`` is left for the caller to delete. Different content is never overwritten: the
    file goes to the first free ``.vN`` name. The move is a hard link, so a crash leaves the
    file either absent or complete at its target; folders created are 0700, the file 0600.
    """
    if relative.is_absolute() or not relative.parts or ".." in relative.parts:
        raise ValueError(f"not a safe path inside the archive: {relative}")
    wanted = sha256.lower()
    folder = _make_folders(root, relative.parent)
    _seal(source)
    for version in range(1, MAX_VERSIONS + 1):
        candidate = versioned(relative, version)
        target = folder / candidate.name
        # A name seen free is linked; a name taken, even by another worker a moment ago, is
        # judged by its content. (Judging the content first and checking the name after let
        # another worker link the same bytes in between: they were filed twice, as .v2.)
        if not _lexists(target):
            try:
                _link(source, target)
            except FileExistsError:
                pass  # taken meanwhile: judged below
            else:
                fsync_dir(folder)
                source.unlink()
                return Placement(candidate, version, already_there=False)
        if _same_content(target, wanted):
            # Durable before the caller's ledger commit says so: another worker may have
            # linked it a moment ago and not yet synced the folder.
            fsync_dir(folder)
            return Placement(candidate, version, already_there=True)
    raise StatementsError(
        f"{relative} already has {MAX_VERSIONS} different versions in the archive.",
        "Look at what keeps arriving under that name; move the old versions elsewhere.",
        exit_code=ExitCode.PARTIAL,
    )


def _make_folders(root: Path, relative: PurePosixPath) -> Path:
    """``root/relative``, creating what is missing as 0700 (statements are private)."""
    if not root.is_dir():
        root.mkdir(parents=True, mode=PRIVATE_DIR, exist_ok=True)
        root.chmod(PRIVATE_DIR)
    folder = root
    for part in relative.parts:
        parent, folder = folder, folder / part
        try:
            folder.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue
        folder.chmod(PRIVATE_DIR)  # mkdir's mode is filtered by the umask
        fsync_dir(parent)
    return folder


def _seal(source: Path) -> None:
    """Make ``source`` 0600 and durable before a name in the archive points at it."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        os.fsync(fd)
    finally:
        os.close(fd)


def _lexists(path: Path) -> bool:
    try:
        path.lstat()
    except FileNotFoundError:
        return False
    return True


def _same_content(path: Path, sha256: str) -> bool:
    """True if ``path`` is a regular file (not followed if a link) holding these bytes."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return False
        return sha256_file(path) == sha256
    except FileNotFoundError:
        return False


# Where a hard link cannot be made, the file is copied into the target folder and linked from
# there: the link is what makes the name appear atomically and only if it is free.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
        return
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
