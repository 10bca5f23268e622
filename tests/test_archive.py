"""The archive's file logic: report names, unpacking (hostile) bundles, placing files once.

Real zip and gzip files throughout; hostile ones are made with zipfile and then patched byte by
byte where zipfile itself refuses to write them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import stat
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from datetime import date
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statements.archive import (
    ACCOUNT_RE,
    MAX_NAME_BYTES,
    UNSORTED,
    Placement,
    Produced,
    ReportName,
    UnpackLimits,
    UnpackRefused,
    destination,
    parse_flex_name,
    parse_member_name,
    parse_report_name,
    place,
    plaintext_name,
    safe_name,
    sha256_file,
    unpack,
    versioned,
)
from statements.config import ArchiveConfig
from statements.errors import ExitCode

MiB = 1024 * 1024
LIMITS = UnpackLimits(max_members=100, max_unpacked_bytes=64 * MiB, max_ratio=200.0)
FETCHED = date(2026, 11, 21)
TRADES = "U4698258.Trade_History.20260901.20260901.xml"
EQUITY = "U4698258.Equity_Summary_in_Base.20260901.20260901.xml"
BUNDLE = "Firm_2025_Q4_2025_Q4.zip"
MEMBER = "Firm_2025_Q4_2025_Q4/Jane_Doe_U20343697_October_01_2025_December_31_2025.csv"
MEMBER_BASE = "Jane_Doe_U20343697_October_01_2025_December_31_2025.csv"


# --------------------------------------------------------------------------------------------
# Helpers


def zip_bytes(entries: list[tuple[str | zipfile.ZipInfo, bytes]], method: int = 8) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we want
        with zipfile.ZipFile(buffer, "w", compression=method) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return buffer.getvalue()


def zeros_member(archive: zipfile.ZipFile, name: str, size: int) -> None:
    """A member of ``size`` zero bytes, written in chunks so the test never holds it whole."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w", force_zip64=size > 2**31) as out:
        block = bytes(MiB)
        for _ in range(size // MiB):
            out.write(block)


def central_entries(data: bytes) -> Iterator[int]:
    """Offsets of the central directory headers."""
    start = 0
    while (found := data.find(b"PK\x01\x02", start)) >= 0:
        yield found
        start = found + 4


def patch_flags(data: bytes, bits: int) -> bytes:
    """Set general purpose flag bits in every local and central header."""
    out = bytearray(data)
    for offset in central_entries(data):
        local = struct.unpack_from("<I", out, offset + 42)[0]
        for flag_at in (offset + 8, local + 6):
            struct.pack_into("<H", out, flag_at, struct.unpack_from("<H", out, flag_at)[0] | bits)
    return bytes(out)


def patch_declared_size(data: bytes, size: int) -> bytes:
    """Lie about every member's uncompressed size, in local and central headers alike."""
    out = bytearray(data)
    for offset in central_entries(data):
        local = struct.unpack_from("<I", out, offset + 42)[0]
        struct.pack_into("<I", out, offset + 24, size)
        struct.pack_into("<I", out, local + 22, size)
    return bytes(out)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def refused(tmp_path: Path, data: bytes, limits: UnpackLimits = LIMITS, name: str = BUNDLE) -> str:
    """Unpack ``data`` expecting a refusal that leaves nothing behind; its message and hint."""
    tmp_path.mkdir(exist_ok=True)
    bundle = write(tmp_path / name, data)
    workdir = tmp_path / "work"
    with pytest.raises(UnpackRefused) as caught:
        unpack(bundle, name, workdir, limits)
    assert caught.value.exit_code == ExitCode.PARTIAL
    assert caught.value.hint
    assert files_under(workdir) == []
    assert sorted(p.name for p in tmp_path.iterdir()) in ([name], [name, "work"])
    return str(caught.value)


# --------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("remote", "plain"),
    [
        (f"{TRADES}.pgp", TRADES),
        (f"{TRADES}.GPG", TRADES),
        ("x.zip.asc", "x.zip"),
        ("x.pgp.pgp", "x.pgp"),  # only one
        ("x.xml", "x.xml"),
        (".pgp", ".pgp"),  # nothing would remain
        ("xpgp", "xpgp"),
    ],
)
def test_plaintext_name(remote: str, plain: str) -> None:
    assert plaintext_name(remote) == plain


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (TRADES, ReportName("U4698258", "Trade_History", date(2026, 9, 1), date(2026, 9, 1))),
        (
            EQUITY,
            ReportName("U4698258", "Equity_Summary_in_Base", date(2026, 9, 1), date(2026, 9, 1)),
        ),
        (
            "F1234567.Year.20250101.20251231.xml.gz",
            ReportName("F1234567", "Year", date(2025, 1, 1), date(2025, 12, 31)),
        ),
        (
            "I12345678.Q.20240229.20240301.zip",
            ReportName("I12345678", "Q", date(2024, 2, 29), date(2024, 3, 1)),
        ),
        ("U4698258.Q.20250230.20250301.xml", None),  # 30 February
        ("U4698258.Q.20250302.20250301.xml", None),  # from after to
        ("U4698258.Q.20250301.20250301", None),  # no extension
        ("u4698258.Q.20250301.20250301.xml", None),  # IBKR writes the letter in capitals
        ("X4698258.Q.20250301.20250301.xml", None),
        ("U4698258..20250301.20250301.xml", None),  # no query
        ("U4698258.Q.2025031.20250301.xml", None),
        ("U4698258.Q.20250301.20250301.xml\n", None),
        ("U4698258.a/b.20250301.20250301.xml", None),
        ("Firm_2025_Q4_2025_Q4.zip", None),
        ("", None),
    ],
)
def test_parse_flex_name(name: str, expected: ReportName | None) -> None:
    assert parse_flex_name(name) == expected


def test_report_name_year_is_the_year_the_period_ends() -> None:
    assert ReportName("U1234567", None, date(2025, 12, 1), date(2026, 1, 2)).year == 2026
    assert ReportName("U1234567", None, None, None).year is None


@pytest.mark.parametrize(
    ("name", "account", "start", "end"),
    [
        (MEMBER, "U20343697", date(2025, 10, 1), date(2025, 12, 31)),
        (MEMBER_BASE, "U20343697", date(2025, 10, 1), date(2025, 12, 31)),
        (
            "Doe_U1234567_Oct_1_2025_Dec_31_2025.csv",
            "U1234567",
            date(2025, 10, 1),
            date(2025, 12, 31),
        ),
        (
            "Doe U1234567 september 30 2025 to OCTOBER 2 2025.pdf",
            "U1234567",
            date(2025, 9, 30),
            date(2025, 10, 2),
        ),
        (
            "activity-U1234567-20250101-20251231.csv",
            "U1234567",
            date(2025, 1, 1),
            date(2025, 12, 31),
        ),
        ("U1234567_2025-01-01_2025-03-31.csv", "U1234567", date(2025, 1, 1), date(2025, 3, 31)),
        ("x_99999999_20250101_20251231.csv", None, date(2025, 1, 1), date(2025, 12, 31)),
        ("U1234567_and_U7654321_20250101_20251231.csv", None, date(2025, 1, 1), date(2025, 12, 31)),
        ("U1234567_copy_of_U1234567.csv", "U1234567", None, None),
        ("XU1234567_20251231_20250101.csv", None, None, None),  # not a token; period reversed
        ("U20250101_20251231.csv", "U20250101", None, None),  # an account id is not a date
        ("Firm_2025_Q4_2025_Q4.zip", None, None, None),
        ("U1234567_February_30_2025_March_31_2025.csv", "U1234567", None, None),
        ("F1_Q4.csv", None, None, None),  # too short to be an account id
    ],
)
def test_parse_member_name(
    name: str, account: str | None, start: date | None, end: date | None
) -> None:
    assert parse_member_name(name) == ReportName(account, None, start, end)


def test_parse_report_name_prefers_the_flex_form() -> None:
    assert parse_report_name(TRADES).query == "Trade_History"
    assert parse_report_name(MEMBER_BASE).account == "U20343697"


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("a.csv", "a.csv"),
        (".DS_Store", "_.DS_Store"),
        ("..", "_.."),
        ("", "_"),
        ("a/b\\c\x00d\ne.csv", "a_b_c_d_e.csv"),
    ],
)
def test_safe_name(name: str, safe: str) -> None:
    assert safe_name(name) == safe


def test_safe_name_cuts_long_names_keeping_the_suffix() -> None:
    cut = safe_name("é" * 300 + ".xml")
    assert cut.endswith(".xml")
    assert len(cut.encode()) <= MAX_NAME_BYTES
    assert cut.startswith("éé")


# --------------------------------------------------------------------------------------------
# Destinations


def test_flex_reports_go_to_account_and_year() -> None:
    for name in (TRADES, EQUITY):
        produced = Produced(name, Path("/in") / name, None)
        assert destination(produced, bundle=None, fetched_on=FETCHED) == PurePosixPath(
            "U4698258", "2026", name
        )


def test_bundle_member_goes_to_the_account_in_its_name() -> None:
    produced = Produced(MEMBER_BASE, Path("/w/0") / MEMBER_BASE, BUNDLE)
    bundle = parse_report_name(BUNDLE)
    assert destination(produced, bundle=bundle, fetched_on=FETCHED) == PurePosixPath(
        "U20343697/2025/Jane_Doe_U20343697_October_01_2025_December_31_2025.csv"
    )


def test_member_without_account_or_year_inherits_the_bundles() -> None:
    bundle = ReportName("F1234567", "Q", date(2025, 1, 1), date(2025, 12, 31))
    no_account = Produced("summary_20240101_20241231.csv", Path("/w/1/s"), "b.zip")
    assert destination(no_account, bundle=bundle, fetched_on=FETCHED) == PurePosixPath(
        "F1234567/2024/summary_20240101_20241231.csv"
    )
    no_year = Produced("U7654321.csv", Path("/w/2/s"), "b.zip")
    assert destination(no_year, bundle=bundle, fetched_on=FETCHED) == PurePosixPath(
        "U7654321/2025/U7654321.csv"
    )
    neither = Produced("readme.txt", Path("/w/3/r"), "b.zip")
    assert destination(neither, bundle=bundle, fetched_on=FETCHED) == PurePosixPath(
        "F1234567/2025/readme.txt"
    )


@pytest.mark.parametrize(
    ("produced", "bundle"),
    [
        (Produced("readme.txt", Path("/w/0/readme.txt"), BUNDLE), parse_report_name(BUNDLE)),
        (Produced("readme.txt", Path("/w/0/readme.txt"), BUNDLE), None),
        (Produced("U1234567_notes.txt", Path("/w/0/n"), BUNDLE), parse_report_name(BUNDLE)),
        (Produced("Reporting_Feed_2026.csv", Path("/in/r"), None), None),
        # A bundle's period is not lent to a file that is not one of its members.
        (
            Produced("U1234567.csv", Path("/in/u"), None),
            ReportName("U7654321", None, FETCHED, FETCHED),
        ),
        # An account that is not an IBKR id never becomes a folder.
        (Produced("readme", Path("/w/r"), BUNDLE), ReportName("../..", None, FETCHED, FETCHED)),
    ],
)
def test_names_that_do_not_parse_are_kept_unsorted(
    produced: Produced, bundle: ReportName | None
) -> None:
    assert destination(produced, bundle=bundle, fetched_on=FETCHED) == PurePosixPath(
        UNSORTED, "2026-11-21", produced.name
    )


def test_unsafe_names_are_made_safe_not_dropped() -> None:
    produced = Produced(".hidden/../x", Path("/in/x"), None)
    relative = destination(produced, bundle=None, fetched_on=FETCHED)
    assert relative == PurePosixPath(UNSORTED, "2026-11-21", "_.hidden_.._x")


# --------------------------------------------------------------------------------------------
# Unpacking: good bundles


def test_plain_files_are_produced_as_they_are(tmp_path: Path) -> None:
    plain = write(tmp_path / TRADES, b"<FlexQueryResponse/>")
    assert unpack(plain, TRADES, tmp_path / "work", LIMITS) == [Produced(TRADES, plain, None)]
    assert not (tmp_path / "work").exists()


def test_zip_members_are_extracted_each_in_its_own_folder(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        data = zip_bytes(
            [
                (f"{BUNDLE[:-4]}/", b""),
                (MEMBER, b"account,cash\nU20343697,1\n"),
                ("Firm_2025_Q4_2025_Q4/Other_U7654321_October_01_2025_December_31_2025.csv", b"b"),
                ("top\\level.csv", b"c"),  # a Windows-made zip: backslash separators
                ("empty.csv", b""),
            ]
        )
        bundle = write(tmp_path / BUNDLE, data)
        produced = unpack(bundle, BUNDLE, tmp_path / "work", LIMITS)
    finally:
        os.umask(old)
    assert [p.name for p in produced] == [
        MEMBER_BASE,
        "Other_U7654321_October_01_2025_December_31_2025.csv",
        "level.csv",
        "empty.csv",
    ]
    assert all(p.member_of == BUNDLE for p in produced)
    assert produced[0].path == tmp_path / "work" / "1" / MEMBER_BASE
    assert produced[0].path.read_bytes() == b"account,cash\nU20343697,1\n"
    assert produced[2].path.read_bytes() == b"c"
    for p in produced:
        assert stat.S_IMODE(p.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(p.path.parent.stat().st_mode) == 0o700
    assert bundle.exists()  # the bundle is the caller's to keep or delete
    where = [destination(p, bundle=parse_report_name(BUNDLE), fetched_on=FETCHED) for p in produced]
    assert [str(w) for w in where] == [
        f"U20343697/2025/{MEMBER_BASE}",
        "U7654321/2025/Other_U7654321_October_01_2025_December_31_2025.csv",
        "_unsorted/2026-11-21/level.csv",
        "_unsorted/2026-11-21/empty.csv",
    ]


def test_zip_detection_is_by_name_case_insensitive(tmp_path: Path) -> None:
    data = zip_bytes([("a.csv", b"a")])
    upper = write(tmp_path / "B.ZIP", data)
    assert [p.name for p in unpack(upper, "B.ZIP", tmp_path / "w1", LIMITS)] == ["a.csv"]
    # A zip by content but not by name (an .xlsx, say) is a file like any other.
    other = write(tmp_path / "book.xlsx", data)
    assert unpack(other, "book.xlsx", tmp_path / "w2", LIMITS) == [
        Produced("book.xlsx", other, None)
    ]


def test_stored_members_and_zip_members_are_not_recursed(tmp_path: Path) -> None:
    inner = zip_bytes([("deep.csv", b"d")])
    data = zip_bytes([("inner.zip", inner), ("plain.csv", b"p")], method=zipfile.ZIP_STORED)
    produced = unpack(write(tmp_path / "b.zip", data), "b.zip", tmp_path / "w", LIMITS)
    assert [p.name for p in produced] == ["inner.zip", "plain.csv"]
    assert produced[0].path.read_bytes() == inner


def test_nested_42_zip_style_bomb_is_only_unpacked_one_level(tmp_path: Path) -> None:
    """16 x 16 x 10 MiB of zeros in under 100 KB: unpack opens one level, never recurses."""
    base = io.BytesIO()
    with zipfile.ZipFile(base, "w") as archive:
        zeros_member(archive, "zeros.bin", 10 * MiB)
    layer1 = zip_bytes([(f"{i}.zip", base.getvalue()) for i in range(16)])
    layer2 = zip_bytes([(f"{i}.zip", layer1) for i in range(16)])
    assert len(layer2) < 100_000
    produced = unpack(write(tmp_path / "42.zip", layer2), "42.zip", tmp_path / "w", LIMITS)
    assert len(produced) == 16
    assert all(p.path.read_bytes() == layer1 for p in produced)
    assert sum(p.path.stat().st_size for p in produced) < 16 * 200_000
    # Each level only ever yields the next one as files; at the bottom the ratio gives it away.
    inner = unpack(produced[0].path, "0.zip", tmp_path / "w1", LIMITS)
    assert [p.path.read_bytes() for p in inner] == [base.getvalue()] * 16
    assert "200:1" in refused(tmp_path / "bottom", base.getvalue())


# --------------------------------------------------------------------------------------------
# Unpacking: refusals


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/etc/cron.d/x", "absolute path"),
        ("C:\\Windows\\x.csv", "absolute path"),
        ("c:x.csv", "absolute path"),
        ("\\\\server\\share\\x.csv", "absolute path"),
        ("../x.csv", "outside the archive"),
        ("a/../../x.csv", "outside the archive"),
        ("..\\..\\x.csv", "outside the archive"),
        ("a\\..\\x.csv", "outside the archive"),
        ("bell\x07.csv", "control characters"),
        ("line\nbreak.csv", "control characters"),
        ("", "empty name"),
        ("./", "no name"),
        ("x" * 256, "over 255 bytes"),
    ],
)
def test_hostile_member_names_refuse_the_whole_bundle(
    tmp_path: Path, name: str, reason: str
) -> None:
    # A good member first: the refusal must come before anything is extracted.
    data = zip_bytes([("good.csv", b"g"), (zipfile.ZipInfo(name), b"evil")])
    assert reason in refused(tmp_path, data)


def test_nul_in_a_member_name_is_refused(tmp_path: Path) -> None:
    # zipfile cuts names at NUL when reading; the name as stored must be judged.
    data = zip_bytes([("good.csv", b"g"), ("evil#../../x.csv", b"evil")])
    data = data.replace(b"evil#", b"evil\x00")
    assert "control characters" in refused(tmp_path, data)


def test_symlink_entries_are_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("statement.csv")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    data = zip_bytes([("good.csv", b"g"), (link, b"/home/user/.ssh/id_rsa")])
    assert "symbolic link" in refused(tmp_path, data)


def test_special_files_are_refused(tmp_path: Path) -> None:
    fifo = zipfile.ZipInfo("pipe")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    assert "special file" in refused(tmp_path, zip_bytes([(fifo, b"")]))


@pytest.mark.parametrize(
    "names",
    [
        ["a/x.csv", "a/x.csv"],
        ["a/x.csv", "a\\x.csv"],
        ["a/x.csv", "./a//x.csv"],
        ["caf\u00e9.csv", "cafe\u0301.csv"],  # the same name in NFC and NFD
    ],
)
def test_duplicate_names_are_refused(tmp_path: Path, names: list[str]) -> None:
    data = zip_bytes([(name, b"x") for name in names])
    assert "appears twice" in refused(tmp_path, data)


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    limits = UnpackLimits(max_members=5, max_unpacked_bytes=MiB, max_ratio=200)
    data = zip_bytes([(f"{i}.csv", b"x") for i in range(6)])
    assert "6 entries, more than the 5 allowed" in refused(tmp_path, data, limits)
    ok = zip_bytes([(f"{i}.csv", b"x") for i in range(5)])
    assert len(unpack(write(tmp_path / "ok.zip", ok), "ok.zip", tmp_path / "w", limits)) == 5


def test_declared_total_over_the_cap_is_refused(tmp_path: Path) -> None:
    limits = UnpackLimits(max_members=10, max_unpacked_bytes=1000, max_ratio=200)
    data = zip_bytes([("a.bin", os.urandom(600)), ("b.bin", os.urandom(600))], method=0)
    message = refused(tmp_path, data, limits)
    assert "more than 1000 bytes" in message
    assert "raise [archive] max_unpacked_bytes" in message


def test_single_member_with_a_bomb_ratio_is_refused(tmp_path: Path) -> None:
    """20 MiB of zeros deflate about 1000:1; nothing is decompressed before the refusal."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("small.csv", b"fine")
        zeros_member(archive, "zeros.csv", 20 * MiB)
    limits = UnpackLimits(max_members=10, max_unpacked_bytes=10**12, max_ratio=200)
    message = refused(tmp_path, buffer.getvalue(), limits)
    assert "zeros.csv" in message
    assert "200:1" in message


def test_a_lying_declared_ratio_of_10000_to_1_is_refused(tmp_path: Path) -> None:
    data = patch_declared_size(zip_bytes([("a.csv", os.urandom(1000))]), 10_000_000)
    limits = UnpackLimits(max_members=10, max_unpacked_bytes=10**12, max_ratio=200)
    assert "200:1" in refused(tmp_path, data, limits)


def test_small_members_are_not_judged_by_ratio(tmp_path: Path) -> None:
    # 64 KiB of blanks compress far beyond 200:1 but cannot hurt anyone.
    data = zip_bytes([("blank.csv", b" " * 65536)])
    produced = unpack(write(tmp_path / "b.zip", data), "b.zip", tmp_path / "w", LIMITS)
    assert produced[0].path.read_bytes() == b" " * 65536


def test_a_member_that_lies_about_its_size_is_refused_while_extracting(tmp_path: Path) -> None:
    """Declared 1000 bytes, 8 MiB in the stream: the cut is caught, and the good member before
    it (already extracted) is removed again."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        zeros_member(archive, "zeros.csv", 8 * MiB)
    liar = patch_declared_size(buffer.getvalue(), 1000)
    # Put an honest member in front by rebuilding: copy the lying archive's member raw.
    good = zip_bytes([("good.csv", b"g")])
    data = _concat_zips(good, liar)
    message = refused(tmp_path, data)
    assert "zeros.csv" in message
    assert "damaged" in message or "more bytes than it declares" in message


def test_a_member_shorter_than_declared_is_refused(tmp_path: Path) -> None:
    # The CRC matches the short content, so zipfile itself reports nothing wrong.
    data = patch_declared_size(zip_bytes([("a.csv", b"abc")]), 10)
    assert "unpacked to 3 bytes but declares 10" in refused(tmp_path, data)


def _concat_zips(first: bytes, second: bytes) -> bytes:
    """One archive with the members of both, copied byte for byte (headers and all)."""

    def split(data: bytes) -> tuple[bytes, bytes]:
        cd = data.find(b"PK\x01\x02")
        eocd = data.rfind(b"PK\x05\x06")
        return data[:cd], data[cd:eocd]

    locals1, central1 = split(first)
    locals2, central2 = split(second)
    shifted = bytearray(central2)
    for offset in central_entries(central2):
        old = struct.unpack_from("<I", shifted, offset + 42)[0]
        struct.pack_into("<I", shifted, offset + 42, old + len(locals1))
    central = central1 + bytes(shifted)
    count = first.count(b"PK\x01\x02") + second.count(b"PK\x01\x02")
    eocd = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(locals1 + locals2), 0
    )
    return locals1 + locals2 + central + eocd


def test_a_crc_mismatch_is_refused(tmp_path: Path) -> None:
    data = bytearray(zip_bytes([("good.csv", b"g"), ("a.csv", b"A" * 100)], method=0))
    data[data.find(b"A" * 100) + 50] = ord("B")
    message = refused(tmp_path, bytes(data))
    assert "a.csv" in message
    assert "CRC" in message


@pytest.mark.parametrize("bits", [0x1, 0x40])
def test_encrypted_members_are_refused(tmp_path: Path, bits: int) -> None:
    data = patch_flags(zip_bytes([("a.csv", b"secret")]), bits)
    assert "password-protected" in refused(tmp_path, data)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_bzip2_and_lzma_members_are_refused(tmp_path: Path, method: int) -> None:
    # zipfile does not bound their output per read, so a lying header could exhaust memory.
    assert "compression method" in refused(tmp_path, zip_bytes([("a.csv", b"a")], method=method))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not one"),
        (b"<xml/>", "not one"),
        (b"PK\x03\x04" + b"\x00" * 100, "not a readable zip"),
        (zip_bytes([("a.csv", b"a")])[:-10], "not a readable zip"),
        (zip_bytes([]), "contains no files"),
        (zip_bytes([("only/", b"")]), "contains no files"),
    ],
)
def test_files_that_are_not_usable_zips_are_refused(
    tmp_path: Path, data: bytes, reason: str
) -> None:
    assert reason in refused(tmp_path, data)


def test_workdir_created_by_a_refused_unpack_is_removed(tmp_path: Path) -> None:
    data = bytearray(zip_bytes([("a.csv", b"A" * 100)], method=0))
    data[data.find(b"A" * 100)] = ord("B")
    refused(tmp_path, bytes(data))
    assert not (tmp_path / "work").exists()


# --------------------------------------------------------------------------------------------
# gzip


def test_gzip_is_unpacked_one_level(tmp_path: Path) -> None:
    name = f"{TRADES}.gz"
    source = write(tmp_path / name, gzip.compress(b"<FlexQueryResponse/>"))
    [produced] = unpack(source, name, tmp_path / "w", LIMITS)
    assert produced == Produced(TRADES, tmp_path / "w" / TRADES, None)
    assert produced.path.read_bytes() == b"<FlexQueryResponse/>"
    assert stat.S_IMODE(produced.path.stat().st_mode) == 0o600
    assert destination(produced, bundle=None, fetched_on=FETCHED) == PurePosixPath(
        "U4698258", "2026", TRADES
    )
    tar = write(tmp_path / "x.tar.GZ", gzip.compress(b"tar bytes"))
    assert [p.name for p in unpack(tar, "x.tar.GZ", tmp_path / "w", LIMITS)] == ["x.tar"]


@pytest.mark.parametrize(
    "data",
    [
        b"not gzip at all",
        gzip.compress(b"x" * 1000)[:-5],  # truncated
        gzip.compress(b"x" * 1000)[:20] + b"\xff" * 20,  # garbage stream
        gzip.compress(b"x" * 1000)[:-8] + b"\x00\x00\x00\x00" + gzip.compress(b"x")[-4:],  # CRC
    ],
)
def test_corrupt_gzip_is_refused(tmp_path: Path, data: bytes) -> None:
    assert "not a readable gzip file" in refused(tmp_path, data, name="r.xml.gz")


def test_gzip_bomb_is_refused_by_ratio(tmp_path: Path) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    bomb = b"".join(packer.compress(bytes(MiB)) for _ in range(32)) + packer.flush()
    assert "200:1" in refused(tmp_path, bomb, name="bomb.xml.gz")


def test_gzip_over_the_size_cap_is_refused(tmp_path: Path) -> None:
    limits = UnpackLimits(max_members=1, max_unpacked_bytes=1000, max_ratio=10**9)
    data = gzip.compress(os.urandom(5000))
    assert "more than 1000 bytes" in refused(tmp_path, data, limits, name="r.csv.gz")


def test_gzip_without_a_usable_inner_name_is_refused(tmp_path: Path) -> None:
    assert "cannot name" in refused(tmp_path, gzip.compress(b"x"), name=".gz")


# --------------------------------------------------------------------------------------------
# Placing


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(tmp_path: Path, root: Path, relative: str, data: bytes) -> tuple[Placement, Path]:
    source = tmp_path / "work" / f"src-{os.urandom(4).hex()}"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(data)
    return place(source, root, PurePosixPath(relative), sha(data)), source


def test_same_content_is_archived_once(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    relative = f"U4698258/2026/{TRADES}"
    first, source = put(tmp_path, root, relative, b"<a/>")
    assert first == Placement(PurePosixPath(relative), 1, already_there=False)
    assert not source.exists()
    again, source = put(tmp_path, root, relative, b"<a/>")
    assert again == Placement(PurePosixPath(relative), 1, already_there=True)
    assert source.exists()  # left for the caller to delete
    assert files_under(root) == [root / relative]


def test_different_content_goes_beside_as_versions(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    relative = f"U4698258/2026/{TRADES}"
    put(tmp_path, root, relative, b"one")
    two, _ = put(tmp_path, root, relative, b"two")
    three, _ = put(tmp_path, root, relative, b"three")
    two_again, _ = put(tmp_path, root, relative, b"two")
    assert two == Placement(PurePosixPath(str(versioned(PurePosixPath(relative), 2))), 2, False)
    assert str(two.relative) == "U4698258/2026/U4698258.Trade_History.20260901.20260901.v2.xml"
    assert (three.version, three.already_there) == (3, False)
    assert (two_again.version, two_again.already_there) == (2, True)
    assert (root / relative).read_bytes() == b"one"
    assert (root / two.relative).read_bytes() == b"two"
    assert (root / three.relative).read_bytes() == b"three"
    assert len(files_under(root)) == 3


def test_modes_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        placement, _ = put(tmp_path, tmp_path / "archive", "U20343697/2025/m.csv", b"m")
    finally:
        os.umask(old)
    target = tmp_path / "archive" / placement.relative
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    for folder in (target.parent, target.parent.parent, tmp_path / "archive"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_the_same_content_placed_by_another_worker_meanwhile_is_archived_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two versions of one report with the same bytes, archived by two workers: the other one
    links the file just after this one looked and found the name free."""
    root = tmp_path / "archive"
    target = root / "_unsorted/2026-11-21/twin.xml"
    other = write(tmp_path / "other", b"twin")
    real_lstat = Path.lstat

    def lstat_then_the_other_worker_links(path: Path) -> os.stat_result:
        try:
            return real_lstat(path)
        except FileNotFoundError:
            if path == target and not os.path.lexists(target):
                os.link(other, target)
            raise

    monkeypatch.setattr(Path, "lstat", lstat_then_the_other_worker_links)
    placement, source = put(tmp_path, root, "_unsorted/2026-11-21/twin.xml", b"twin")
    assert placement == Placement(PurePosixPath("_unsorted/2026-11-21/twin.xml"), 1, True)
    assert [p.name for p in target.parent.iterdir()] == ["twin.xml"]
    assert source.exists()  # left for the caller to delete, as for any content already there


def test_existing_folders_keep_their_mode(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    (root / "U1234567").mkdir(parents=True)
    (root / "U1234567").chmod(0o750)
    put(tmp_path, root, "U1234567/2025/a.csv", b"a")
    assert stat.S_IMODE((root / "U1234567").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "U1234567/2025").stat().st_mode) == 0o700


def test_a_symlink_at_the_target_is_neither_followed_nor_replaced(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    (root / "U1234567/2025").mkdir(parents=True)
    outside = write(tmp_path / "outside", b"a")
    (root / "U1234567/2025/a.csv").symlink_to(outside)
    placement, _ = put(tmp_path, root, "U1234567/2025/a.csv", b"a")
    assert placement == Placement(PurePosixPath("U1234567/2025/a.v2.csv"), 2, False)
    assert (root / "U1234567/2025/a.csv").is_symlink()


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir()
    or os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev,
    reason="needs /dev/shm on another file system than the temp folder",
)
def test_place_across_file_systems_copies(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        source = write(Path(other) / "src", b"across")
        placement = place(
            source, tmp_path / "archive", PurePosixPath("U1234567/2026/x"), sha(b"across")
        )
        assert placement == Placement(PurePosixPath("U1234567/2026/x"), 1, False)
        assert not source.exists()
    target = tmp_path / "archive/U1234567/2026/x"
    assert target.read_bytes() == b"across"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["x"]  # no temp file left


@pytest.mark.parametrize("relative", ["/abs/x", "../x", "a/../../x", ""])
def test_place_refuses_paths_that_leave_the_root(tmp_path: Path, relative: str) -> None:
    source = write(tmp_path / "s", b"s")
    with pytest.raises(ValueError, match="not a safe path"):
        place(source, tmp_path / "archive", PurePosixPath(relative), sha(b"s"))


@pytest.mark.parametrize(
    ("relative", "version", "expected"),
    [
        ("a/x.xml", 1, "a/x.xml"),
        ("a/x.xml", 2, "a/x.v2.xml"),
        ("U1/2026/U1.Q.20260901.20260901.xml", 2, "U1/2026/U1.Q.20260901.20260901.v2.xml"),
        ("a/x.tar.gz", 3, "a/x.tar.v3.gz"),
        ("a/name", 2, "a/name.v2"),
    ],
)
def test_versioned(relative: str, version: int, expected: str) -> None:
    assert versioned(PurePosixPath(relative), version) == PurePosixPath(expected)


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 7)
    assert sha256_file(write(tmp_path / "f", data)) == sha(data)


def test_limits_from_config() -> None:
    config = ArchiveConfig(max_members=7, max_unpacked_bytes=99, max_ratio=50.0)
    assert UnpackLimits.from_config(config) == UnpackLimits(7, 99, 50.0)


# --------------------------------------------------------------------------------------------
# Fuzzing


_name_parts = st.one_of(
    st.sampled_from(["U4698258", "F1234567", "I12345678", "U1", "u1234567", "Jane", "Doe"]),
    st.sampled_from(["20260901", "20251231", "20250230", "2025-10-01", "October", "Dec"]),
    st.sampled_from(["01", "31", "2025", "Q4", "to", "xml", "zip", "csv", "gz", "..", ""]),
    st.text(max_size=8),
)
_names = st.one_of(
    st.text(max_size=300),
    st.lists(_name_parts, max_size=10).flatmap(
        lambda parts: st.sampled_from([".", "_", "/", " ", "-", "\\"]).map(
            lambda sep: sep.join(parts)
        )
    ),
)
_report_names = st.builds(
    ReportName,
    st.one_of(st.none(), st.from_regex(ACCOUNT_RE, fullmatch=True), st.text(max_size=12)),
    st.none(),
    st.none(),
    st.one_of(st.none(), st.dates()),
)


@settings(max_examples=400, deadline=None)
@given(
    name=_names,
    member_of=st.one_of(st.none(), st.just(BUNDLE)),
    bundle=st.one_of(st.none(), _report_names),
    fetched_on=st.dates(),
)
def test_names_never_raise_and_destinations_stay_inside(
    name: str, member_of: str | None, bundle: ReportName | None, fetched_on: date
) -> None:
    plaintext_name(name)
    parse_flex_name(name)
    parse_member_name(name)
    relative = destination(
        Produced(name, Path("/w/x"), member_of), bundle=bundle, fetched_on=fetched_on
    )
    assert not relative.is_absolute()
    assert len(relative.parts) == 3
    first, middle, last = relative.parts
    assert first == UNSORTED or ACCOUNT_RE.fullmatch(first)
    assert re.fullmatch(r"[0-9]{4}(-[0-9]{2}-[0-9]{2})?", middle)
    assert last not in (".", "..")
    assert not last.startswith(".")
    assert "/" not in last and "\x00" not in last
    assert len(last.encode()) <= MAX_NAME_BYTES
    root = "/archive"
    assert os.path.normpath(os.path.join(root, relative)).startswith(root + "/")


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    edits = st.lists(
        st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=8
    )

    def apply(changes: list[tuple[int, int]], cut: int) -> bytes:
        out = bytearray(data)
        for at, value in changes:
            out[at] = value
        return bytes(out[:cut])

    return st.builds(apply, edits, st.integers(0, len(data)) | st.just(len(data)))


_SAMPLE_ZIP = zip_bytes(
    [
        ("dir/", b""),
        (MEMBER, b"account,cash\nU20343697,1\n" * 20),
        ("b.csv", os.urandom(200)),
        ("c.csv", b"stored"),
    ]
)
_SAMPLE_GZ = gzip.compress(b"<FlexQueryResponse>" + b"x" * 500 + b"</FlexQueryResponse>")
_FUZZ_LIMITS = UnpackLimits(max_members=20, max_unpacked_bytes=MiB, max_ratio=200)


def _unpack_in_fresh_folder(data: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        source = write(base / "in", data)
        workdir = base / "out" / "work"
        (base / "out").mkdir()
        try:
            produced = unpack(source, name, workdir, _FUZZ_LIMITS)
        except UnpackRefused:
            assert files_under(base / "out") == []
        else:
            for item in produced:
                assert item.path == source or item.path.resolve().is_relative_to(workdir)
        assert sorted(p.name for p in base.iterdir()) == ["in", "out"]
        assert [p.name for p in (base / "out").iterdir()] in ([], ["work"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(_mutations(_SAMPLE_ZIP), st.binary(max_size=600)))
def test_unpack_of_damaged_zips_only_refuses(data: bytes) -> None:
    _unpack_in_fresh_folder(data, "fuzz.zip")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(_mutations(_SAMPLE_GZ), st.binary(max_size=200)))
def test_unpack_of_damaged_gzips_only_refuses(data: bytes) -> None:
    _unpack_in_fresh_folder(data, "fuzz.xml.gz")
