"""The reports the server offers, made once per invocation from a fixed seed.

Each report is a Flex-named XML file (``<account>.<query>.<from>.<to>.xml``) that the sender
encrypts to the project's public key with the gpg binary (:mod:`bench.pgp`), as IBKR does,
giving ``<name>.xml.pgp``. Encryption uses ``--compress-algo none`` so that the sizes below are
the sizes on the wire and on disk; both tools run the same gpg to decrypt, so compression would
add the same inflate time to both.

The plaintexts are kept, so that every archive a run leaves can be checked file by file.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

KIB = 1024
MIB = 1024 * 1024
_CHUNK = 4 * MIB
QUERIES = ("Activity", "Trade_History", "Cash_Report", "Open_Positions", "Equity_Summary")
_SYMBOLS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK.B", "JPM", "V", "XOM")


@dataclass(frozen=True)
class Report:
    """One report: its Flex name (without .pgp), its plaintext size and where the text is."""

    plain_name: str  # U1234567.Activity.20260901.20260901.xml
    size: int

    @property
    def remote_name(self) -> str:
        return self.plain_name + ".pgp"

    @property
    def account(self) -> str:
        return self.plain_name.split(".")[0]

    @property
    def year(self) -> str:
        return self.plain_name.split(".")[3][:4]

    @property
    def archive_path(self) -> str:
        """Where DESIGN.md's contract files it: <account>/<year of period end>/<name>."""
        return f"{self.account}/{self.year}/{self.plain_name}"


@dataclass(frozen=True)
class Corpus:
    """Encrypted reports in one folder on the sshd (its path is also the remote path)."""

    folder: Path
    reports: tuple[Report, ...]
    plain: Path  # the plaintexts, by plain name
    cipher_digests: dict[str, str]  # remote name -> sha256 of the ciphertext
    plain_digests: dict[str, str]  # archive path -> sha256 of the plaintext

    @property
    def count(self) -> int:
        return len(self.reports)

    @property
    def cipher_bytes(self) -> int:
        return sum((self.folder / r.remote_name).stat().st_size for r in self.reports)

    @property
    def plain_bytes(self) -> int:
        return sum(r.size for r in self.reports)


def log_uniform_sizes(count: int, low: int, high: int, rng: random.Random) -> list[int]:
    """``count`` sizes whose logarithm is uniform on [log low, log high]."""
    a, b = math.log(low), math.log(high)
    return [int(math.exp(rng.uniform(a, b))) for _ in range(count)]


def flex_names(count: int, accounts: Sequence[str], last_day: date, *, first: int = 0) -> list[str]:
    """Distinct daily Flex names: every account x query for a day, then the day before, ...

    ``first`` skips that many names from the start (so history and new files never collide).
    """
    names = []
    per_day = len(accounts) * len(QUERIES)
    for i in range(first, first + count):
        day = last_day - timedelta(days=i // per_day)
        account = accounts[i % len(accounts)]
        query = QUERIES[(i // len(accounts)) % len(QUERIES)]
        stamp = day.strftime("%Y%m%d")
        names.append(f"{account}.{query}.{stamp}.{stamp}.xml")
    return names


def accounts(count: int, rng: random.Random) -> list[str]:
    return sorted({f"U{rng.randrange(1_000_000, 99_999_999)}" for _ in range(count * 2)})[:count]


class XmlWriter:
    """Flex-like XML of an exact size, fast: rows drawn from a pool made once per seed."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self._rng = rng
        self._rows = [self._row(rng, i) for i in range(4096)]
        self._longest = max(len(row) for row in self._rows)

    @staticmethod
    def _row(rng: random.Random, i: int) -> bytes:
        qty = rng.randrange(1, 5000)
        price = rng.uniform(5, 900)
        return (
            f'<Trade tradeID="{rng.randrange(10**9, 10**10)}" symbol="{rng.choice(_SYMBOLS)}" '
            f'currency="USD" quantity="{qty}" tradePrice="{price:.4f}" '
            f'proceeds="{-qty * price:.2f}" ibCommission="{-rng.uniform(0.35, 9):.6f}" '
            f'buySell="{"BUY" if i % 2 else "SELL"}" orderType="LMT" '
            f'dateTime="2026{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d};'
            f'{rng.randrange(93000, 160000):06d}"/>\n'
        ).encode()

    def write(self, path: Path, plain_name: str, size: int) -> str:
        """Write exactly ``size`` bytes of well-formed XML for ``plain_name``; its sha256."""
        account, query, start, end = plain_name.split(".")[:4]
        head = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<FlexQueryResponse queryName="{query}" '
            f'type="AF">\n<FlexStatements count="1">\n<FlexStatement accountId="{account}" '
            f'fromDate="{start}" toDate="{end}" period="LastBusinessDay">\n<Trades>\n'
        ).encode()
        tail = b"</Trades>\n</FlexStatement>\n</FlexStatements>\n</FlexQueryResponse>\n"
        body = size - len(head) - len(tail)
        if body < 0:
            raise ValueError(f"{size} bytes is too small for a report")
        digest = hashlib.sha256()
        with path.open("wb") as out:
            for data in itertools.chain((head,), self._body(body), (tail,)):
                out.write(data)
                digest.update(data)
        return digest.hexdigest()

    def _body(self, size: int) -> Iterable[bytes]:
        """Whole rows, then blank lines up to ``size`` (blanks between elements are XML)."""
        while size > 0:
            room = min(size, _CHUNK)
            block = b"".join(self._rng.choices(self._rows, k=room // self._longest))
            block += b"\n" * (room - len(block))
            yield block
            size -= room


def write_plaintexts(
    folder: Path, names: Sequence[str], sizes: Sequence[int], seed: int
) -> tuple[list[Report], dict[str, str]]:
    """The XML files, in ``folder``; the reports and their plaintext digests by archive path."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = XmlWriter(seed)
    reports, digests = [], {}
    for name, size in zip(names, sizes, strict=True):
        report = Report(name, size)
        digests[report.archive_path] = writer.write(folder / name, name, size)
        reports.append(report)
    return reports, digests


def make(
    server_folder: Path,
    plain_folder: Path,
    names: Sequence[str],
    sizes: Sequence[int],
    seed: int,
    encrypt: Callable[[Path, list[str], Path], None],
) -> Corpus:
    """Write the plaintexts, have ``encrypt`` put ``NAME.pgp`` into ``server_folder``."""
    reports, plain_digests = write_plaintexts(plain_folder, names, sizes, seed)
    encrypt(plain_folder, [r.plain_name for r in reports], server_folder)
    cipher_digests = {r.remote_name: sha256_file(server_folder / r.remote_name) for r in reports}
    return Corpus(server_folder, tuple(reports), plain_folder, cipher_digests, plain_digests)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def link_into(folder: Path, corpora: Iterable[Corpus]) -> None:
    """Hard-link the ciphertexts of ``corpora`` into ``folder`` (an existing server folder)."""
    for corpus in corpora:
        for report in corpus.reports:
            os.link(corpus.folder / report.remote_name, folder / report.remote_name)


def unlink_from(folder: Path, corpus: Corpus) -> None:
    for report in corpus.reports:
        (folder / report.remote_name).unlink(missing_ok=True)


def problem_with_copy(expected: dict[str, str], copy: Path) -> str | None:
    """None when ``copy`` holds exactly these files (name -> sha256) at its top level."""
    if not copy.is_dir():
        return f"{copy} does not exist"
    found = {p.name: p for p in copy.iterdir()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        return (
            f"{copy}: {len(found)} files, expected {len(expected)}; "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, digest in expected.items():
        if sha256_file(found[name]) != digest:
            return f"{found[name]}: content differs from the original"
    return None


def problem_with_archive(expected: dict[str, str], root: Path) -> str | None:
    """None when every expected ``<account>/<year>/<name>`` is under ``root`` with its bytes."""
    for relative, digest in expected.items():
        path = root / relative
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path}: content differs from the plaintext that was encrypted"
    return None
