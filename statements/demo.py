"""`ibkr-statements demo`: one real nightly cycle against a loopback server started on the spot.

In a fresh folder it builds a project the way a user would (config from the shipped example,
an SSH key pair, a PGP key pair), plays IBKR's part (IBKR-like reports encrypted to our public
key with the gpg binary, served over SFTP on 127.0.0.1), and then runs the same code path as
`ibkr-statements run` and `status`. Nothing here prints: the caller gets a :class:`DemoResult`
and human-readable steps through ``progress``.
"""

from __future__ import annotations

import io
import re
import secrets
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from statements import config as config_mod
from statements.errors import KeyProblem, UsageError
from statements.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write, ensure_private_dir
from statements.hostkeys import parse_known_hosts, pin
from statements.keys.pgp import (
    export_public_key,
    generate_pgp_key,
    status_summary,
    stop_agent,
)
from statements.keys.ssh import generate_rsa, write_key_pair
from statements.ledger import LEDGER_NAME
from statements.pipeline import ENCRYPTED, CycleSummary, run_from_config
from statements.sandbox import SandboxServer
from statements.status import StatusReport, status_report

__all__ = ["DemoResult", "demo_reports", "last_business_day", "run_demo"]

FOLDER_PREFIX = "ibkr-statements-demo-"
SENDER_PREFIX = "ibkr-statements-demo-sender-"
USERNAME = "demo"
REMOTE_DIR = "outgoing"  # what IBKR tells recent clients
# Throwaway keys: the smallest sizes IBKR and gpg accept, so the demo takes seconds, not minutes.
SSH_BITS = 2048
PGP_BITS = 2048
GPG_BINARY = "gpg"
SSH_PASSPHRASE_FILE = "keys/ssh-passphrase"
PGP_PASSPHRASE_FILE = "keys/pgp-passphrase"
# An environment variable wins over a passphrase file. A user who already exported the real
# IBKR_SSH_PASSPHRASE / IBKR_PGP_PASSPHRASE would override the demo's files with them, so the
# demo config names variables of its own, which nobody sets.
SSH_PASSPHRASE_ENV = "IBKR_DEMO_SSH_PASSPHRASE"
PGP_PASSPHRASE_ENV = "IBKR_DEMO_PGP_PASSPHRASE"
# gpg puts its agent sockets in the GnuPG home when there is no /run/user/UID; a Unix socket
# path holds at most 107 bytes, and gpg's longest socket name is this one.
_SOCKET_PATH_MAX = 107
_LONGEST_SOCKET = "S.gpg-agent.browser"
_GPG_TIMEOUT_S = 60
# A zip stores member times; a fixed one keeps the bundle byte-for-byte the same on every run.
_ZIP_TIME = (2026, 1, 2, 6, 30, 0)

# Bundle members as IBKR names them: <Name>_<account>_<period>.csv inside a folder.
BUNDLE_NAME = "Firm_2025_Q4_2025_Q4.zip.pgp"
_BUNDLE_MEMBERS = (
    ("Jane_Doe", "U20343697", "150000.00"),
    ("Richard_Roe", "U31415926", "82500.50"),
)
UNPARSEABLE_NAME = "statement_export.pgp"


@dataclass(frozen=True)
class DemoResult:
    folder: Path  # the project folder: config/, keys/, archive/, server/
    config_path: Path
    cycle: CycleSummary  # what run_from_config returned
    # Every archived file relative to the archive root, sorted; the hidden folders (.encrypted,
    # .inbox, ...) and the ledger are not archived reports and are left out.
    archive_files: tuple[str, ...]
    encrypted_kept: tuple[str, ...]  # names in archive/.encrypted
    status: StatusReport


# --- the sample reports ----------------------------------------------------------------------


def last_business_day(today: date) -> date:
    """The weekday before ``today``: the period of a "last business day" Flex query."""
    day = today - timedelta(days=1)
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


_TRADES = (
    # symbol, description, quantity, price, commission
    ("AAPL", "APPLE INC", 25, "228.15", "-1.00"),
    ("MSFT", "MICROSOFT CORP", -10, "431.40", "-1.00"),
    ("VWRA", "VANGUARD FTSE ALL-WORLD UCITS", 40, "140.22", "-1.70"),
)


def _flex(query: str, account: str, day: date, body: str) -> bytes:
    stamp = day.strftime("%Y%m%d")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<FlexQueryResponse queryName="{query}" type="AF">\n'
        '<FlexStatements count="1">\n'
        f'<FlexStatement accountId="{account}" fromDate="{stamp}" toDate="{stamp}" '
        f'period="LastBusinessDay" whenGenerated="{stamp};202315">\n'
        f"{body}"
        "</FlexStatement>\n"
        "</FlexStatements>\n"
        "</FlexQueryResponse>\n"
    ).encode()


def _trades(account: str, day: date, scale: int) -> str:
    stamp = day.strftime("%Y%m%d")
    rows = []
    for number, (symbol, name, qty, price, commission) in enumerate(_TRADES, start=1):
        quantity = qty * scale
        rows.append(
            f'<Trade accountId="{account}" currency="USD" assetCategory="STK" '
            f'symbol="{symbol}" description="{name}" tradeDate="{stamp}" '
            f'quantity="{quantity}" tradePrice="{price}" ibCommission="{commission}" '
            f'buySell="{"BUY" if quantity > 0 else "SELL"}" '
            f'tradeID="{day.toordinal()}{scale}{number:02d}"/>\n'
        )
    return "<Trades>\n" + "".join(rows) + "</Trades>\n"


def _equity_summary(account: str, day: date) -> str:
    return (
        "<EquitySummaryInBase>\n"
        f'<EquitySummaryByReportDateInBase accountId="{account}" currency="USD" '
        f'reportDate="{day.strftime("%Y%m%d")}" cash="12840.55" stock="96412.30" '
        'dividendAccruals="18.40" total="109271.25"/>\n'
        "</EquitySummaryInBase>\n"
    )


def _bundle_zip() -> bytes:
    folder = BUNDLE_NAME.removesuffix(".zip.pgp")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for person, account, nav in _BUNDLE_MEMBERS:
            member = f"{folder}/{person}_{account}_October_01_2025_December_31_2025.csv"
            csv = (
                "Statement,Header,Field Name,Field Value\n"
                f"Statement,Data,Account,{account}\n"
                f"Statement,Data,Name,{person.replace('_', ' ')}\n"
                'Statement,Data,Period,"October 1, 2025 - December 31, 2025"\n'
                f"Net Asset Value,Data,Total,{nav}\n"
            )
            bundle.writestr(zipfile.ZipInfo(member, date_time=_ZIP_TIME), csv)
    return buffer.getvalue()


def demo_reports(day: date) -> dict[str, bytes]:
    """What the demo's "IBKR" delivers for report day ``day``: remote name -> plaintext.

    The same ``day`` always gives the same bytes, so a test can recompute what was archived.
    A name ending in ``.asc`` is encrypted ASCII-armored, every other one binary.
    """
    stamp = day.strftime("%Y%m%d")
    return {
        f"U4698258.Trade_History.{stamp}.{stamp}.xml.pgp": _flex(
            "Trade History", "U4698258", day, _trades("U4698258", day, 1)
        ),
        f"U4698258.Equity_Summary_in_Base.{stamp}.{stamp}.xml.pgp": _flex(
            "Equity Summary in Base", "U4698258", day, _equity_summary("U4698258", day)
        ),
        f"U7654321.Trade_History.{stamp}.{stamp}.xml.asc": _flex(
            "Trade History", "U7654321", day, _trades("U7654321", day, 3)
        ),
        BUNDLE_NAME: _bundle_zip(),
        # Another product's naming that the archive cannot parse: kept under _unsorted/.
        UNPARSEABLE_NAME: b"Account,Date,Description,Amount\nU4698258,"
        + day.isoformat().encode()
        + b",Wire deposit,5000.00\n",
    }


# --- the demo --------------------------------------------------------------------------------


def run_demo(
    folder: Path | None = None, *, progress: Callable[[str], None] | None = None
) -> DemoResult:
    """Set up a project in ``folder`` (a new temp folder by default) and run one cycle there."""
    say = progress if progress is not None else _silent
    folder = _fresh_folder(folder)
    say(f"project folder: {folder}")
    today = datetime.now(UTC).date()  # the ledger dates fetches in UTC; so does _unsorted/
    reports = demo_reports(last_business_day(today))

    keys = ensure_private_dir(folder / "keys")
    ssh_passphrase = secrets.token_urlsafe(24)
    pgp_passphrase = secrets.token_urlsafe(24)
    atomic_write(folder / SSH_PASSPHRASE_FILE, ssh_passphrase.encode(), PRIVATE_FILE)
    atomic_write(folder / PGP_PASSPHRASE_FILE, pgp_passphrase.encode(), PRIVATE_FILE)
    say(f"wrote random throwaway passphrases to {SSH_PASSPHRASE_FILE} and {PGP_PASSPHRASE_FILE}")

    ssh_key = write_key_pair(
        generate_rsa(SSH_BITS),
        keys / "ibkr_rsa",
        passphrase=ssh_passphrase,
        comment="ibkr-statements-demo",
    )
    say(f"made an RSA-{SSH_BITS} SSH key pair: keys/ibkr_rsa ({ssh_key.fingerprint})")

    gnupg_home = keys / "gnupg"
    sender_home = Path(tempfile.mkdtemp(prefix=SENDER_PREFIX))
    server: SandboxServer | None = None
    try:
        pgp_key = generate_pgp_key(
            gnupg_home,
            name="Demo Investor",
            email="demo@example.com",
            bits=PGP_BITS,
            passphrase=pgp_passphrase,
            gpg_binary=GPG_BINARY,
        )
        public_key = keys / "pgp-public.asc"
        export_public_key(gnupg_home, pgp_key.fingerprint, public_key, GPG_BINARY)
        say(f"made an RSA-{PGP_BITS} PGP key pair in keys/gnupg ({pgp_key.fingerprint})")

        outgoing = folder / "server" / REMOTE_DIR
        outgoing.mkdir(parents=True)
        _encrypt_like_ibkr(sender_home, public_key, pgp_key.fingerprint, reports, outgoing)
        say(
            f"encrypted {len(reports)} IBKR-like reports to that key with the gpg binary, "
            f"as IBKR does, into server/{REMOTE_DIR}/"
        )

        server = SandboxServer(
            folder / "server", authorized_keys=[ssh_key.public_line], username=USERNAME
        )
        server.start()
        say(f"started an SFTP server on {server.host}:{server.port} serving server/")

        host_keys = [entry.key for entry in parse_known_hosts(server.host_key_line())]
        pin(keys / "known_hosts", server.host, server.port, host_keys)
        described = ", ".join(key.describe() for key in host_keys)
        say(
            f"pinned its host key {described} in keys/known_hosts without asking, because the "
            "demo started that server itself; for IBKR's server, `ibkr-statements trust-host` "
            "shows the key before pinning it"
        )

        config_path = _write_config(folder, server.host, server.port)
        say("wrote config/ibkr-statements.toml from the example, pointed at that server")

        cfg = config_mod.load(config_path)
        say("running `ibkr-statements run` on that configuration")
        cycle = run_from_config(cfg)
        status = status_report(cfg)
    finally:
        if server is not None:
            server.stop()
            say("stopped the SFTP server")
        # Every gpg call may leave an agent behind; a demo must leave no process running.
        stop_agent(sender_home, GPG_BINARY)
        shutil.rmtree(sender_home, ignore_errors=True)
        stop_agent(gnupg_home, GPG_BINARY)

    archive_files, encrypted_kept = _archive_listing(cfg.archive.root)
    return DemoResult(
        folder=folder,
        config_path=config_path,
        cycle=cycle,
        archive_files=archive_files,
        encrypted_kept=encrypted_kept,
        status=status,
    )


def _silent(_message: str) -> None:
    pass


def _fresh_folder(folder: Path | None) -> Path:
    if folder is None:
        return Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX)).resolve()
    folder = folder.expanduser().resolve()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(
            f"{folder} is not empty; the demo only writes into a fresh folder.",
            "Give a new or empty folder with --dir, or leave --dir out for a temporary one.",
        )
    socket_path = folder / "keys" / "gnupg" / _LONGEST_SOCKET
    if len(str(socket_path).encode()) > _SOCKET_PATH_MAX:
        # Caught here because gpg itself only says "can't connect to the agent".
        raise UsageError(
            f"{folder} is too deep for gpg: its agent socket path would exceed "
            f"{_SOCKET_PATH_MAX} bytes.",
            "Give a shorter --dir, or leave it out for a temporary folder.",
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _encrypt_like_ibkr(
    sender_home: Path,
    public_key: Path,
    fingerprint: str,
    reports: dict[str, bytes],
    outgoing: Path,
) -> None:
    """Encrypt each report as IBKR does: the gpg binary, in a home holding only our public key."""
    _sender_gpg(sender_home, ["--import", str(public_key)])
    for name, plaintext in reports.items():
        armor = ["--armor"] if name.endswith(".asc") else []
        ciphertext = _sender_gpg(
            sender_home,
            [*armor, "--trust-model", "always", "-r", fingerprint, "--encrypt"],
            plaintext,
        )
        atomic_write(outgoing / name, ciphertext, PUBLIC_FILE)


def _sender_gpg(home: Path, args: list[str], stdin: bytes = b"") -> bytes:
    cmd = [GPG_BINARY, "--homedir", str(home), "--batch", "--no-tty", "--quiet", *args]
    try:
        done = subprocess.run(
            cmd, input=stdin, capture_output=True, timeout=_GPG_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeyProblem(f"Running gpg to encrypt the demo reports failed: {exc}.") from None
    if done.returncode != 0:
        reason = status_summary(done.stderr.decode("utf-8", "replace"))
        raise KeyProblem(
            f"gpg could not encrypt the demo reports: {reason}.",
            "Check that GnuPG works: gpg --version",
        )
    return done.stdout


def _write_config(folder: Path, host: str, port: int) -> Path:
    """The shipped example, edited line by line the way a user would edit it."""
    text = config_mod.example_text()
    edits = (
        ('host = "xfer.interactivebrokers.com"', f'host = "{host}"'),
        ("port = 32", f"port = {port}"),
        ('username = ""', f'username = "{USERNAME}"'),
        ('remote_dir = "."', f'remote_dir = "{REMOTE_DIR}"'),
        (
            'key_passphrase_env = "IBKR_SSH_PASSPHRASE"',
            f'key_passphrase_env = "{SSH_PASSPHRASE_ENV}"',
        ),
        (
            f'# key_passphrase_file = "{SSH_PASSPHRASE_FILE}"',
            f'key_passphrase_file = "{SSH_PASSPHRASE_FILE}"',
        ),
        ('passphrase_env = "IBKR_PGP_PASSPHRASE"', f'passphrase_env = "{PGP_PASSPHRASE_ENV}"'),
        (
            f'# passphrase_file = "{PGP_PASSPHRASE_FILE}"',
            f'passphrase_file = "{PGP_PASSPHRASE_FILE}"',
        ),
    )
    for old, new in edits:
        text = _replace_line_start(text, old, new)
    header = (
        "# Written by `ibkr-statements demo` for its loopback SFTP server and throwaway keys.\n"
        "# Not for IBKR: start a real project with `ibkr-statements init`.\n\n"
    )
    path = folder / "config" / "ibkr-statements.toml"
    path.parent.mkdir()
    atomic_write(path, (header + text).encode("utf-8"), PUBLIC_FILE)
    return path


def _replace_line_start(text: str, old: str, new: str) -> str:
    """Replace ``old`` where it starts a line, exactly once.

    A changed example must break the demo loudly, not leave it aimed at IBKR's real server.
    """
    pattern = re.compile(rf"^{re.escape(old)}(?=\s|$)", re.MULTILINE)
    replaced, count = pattern.subn(new.replace("\\", "\\\\"), text)
    if count != 1:
        raise RuntimeError(f"config/example.toml has {count} lines starting {old!r}, expected 1")
    return replaced


def _archive_listing(root: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    files = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file()
        and not path.relative_to(root).parts[0].startswith(".")
        and not path.name.startswith(LEDGER_NAME)
    )
    kept = root / ENCRYPTED
    encrypted = sorted(p.name for p in kept.iterdir()) if kept.is_dir() else []
    return tuple(files), tuple(encrypted)
