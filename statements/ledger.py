"""The ledger: what was fetched, refused, archived, and every run, in one SQLite file.

``archive/index.sqlite3``, WAL mode, schema versioned by a migration table. A remote file's
identity is (host, port, username, remote path); a version of it is that plus (size, mtime).
Deciding what is new is one indexed query for the server's history, compared in memory against
one listing: it does not grow with anything but the listing itself.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from statements.errors import ConfigError, DiskFull
from statements.fsutil import PRIVATE_DIR, PRIVATE_FILE

LEDGER_NAME = "index.sqlite3"
_LOOKUP_BATCH = 500  # names per IN (...) query: well under SQLite's variable limit
_HISTORY = "SELECT remote_path, size, mtime FROM fetched WHERE host=? AND port=? AND username=?"

# Each migration runs once, in order, in its own transaction; never edit one that has shipped.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "runs, fetched and refused remote files",
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            command TEXT NOT NULL,
            started_at TEXT NOT NULL,
            ended_at TEXT,
            result TEXT,
            exit_code INTEGER,
            fetched INTEGER NOT NULL DEFAULT 0,
            skipped INTEGER NOT NULL DEFAULT 0,
            refused INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            archived INTEGER NOT NULL DEFAULT 0,
            bytes INTEGER NOT NULL DEFAULT 0,
            message TEXT
        );
        CREATE TABLE fetched (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            host TEXT NOT NULL,
            port INTEGER NOT NULL,
            username TEXT NOT NULL,
            remote_path TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime INTEGER NOT NULL,
            version INTEGER NOT NULL,
            inbox_name TEXT NOT NULL UNIQUE,
            -- The ciphertext's SHA-256 until 2026-11, '' since then: gpg's integrity check
            -- verifies a ciphertext as it decrypts it, and (size, mtime) identify it.
            sha256 TEXT NOT NULL,
            fetched_at TEXT NOT NULL,
            run_id INTEGER REFERENCES runs(id),
            state TEXT NOT NULL DEFAULT 'fetched',
            -- Also the covering index behind history(): one SEARCH per server, no table reads.
            UNIQUE (host, port, username, remote_path, size, mtime)
        );
        CREATE INDEX fetched_by_state ON fetched (state);
        CREATE TABLE refused (
            host TEXT NOT NULL,
            port INTEGER NOT NULL,
            username TEXT NOT NULL,
            remote_name TEXT NOT NULL,
            reason TEXT NOT NULL,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            times INTEGER NOT NULL DEFAULT 1,
            PRIMARY KEY (host, port, username, remote_name)
        );
        """,
    ),
    (
        2,
        "archived files, quarantine reasons, signatures, remote deletions",
        """
        ALTER TABLE fetched ADD COLUMN failure TEXT;
        ALTER TABLE fetched ADD COLUMN signature TEXT;
        ALTER TABLE fetched ADD COLUMN signer TEXT;
        ALTER TABLE fetched ADD COLUMN processed_at TEXT;
        ALTER TABLE fetched ADD COLUMN remote_deleted_at TEXT;
        CREATE TABLE archived (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            fetched_id INTEGER NOT NULL REFERENCES fetched(id),
            path TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            member_of TEXT,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            account TEXT,
            query TEXT,
            period_from TEXT,
            period_to TEXT,
            version INTEGER NOT NULL,
            archived_at TEXT NOT NULL,
            run_id INTEGER REFERENCES runs(id)
        );
        CREATE INDEX archived_by_account ON archived (account, period_to);
        CREATE INDEX archived_by_fetched ON archived (fetched_id);
        """,
    ),
    (
        3,
        "scheduled days: one nightly run per day across restarts",
        """
        CREATE TABLE scheduled_days (
            local_date TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_attempt_at TEXT,
            last_exit_code INTEGER
        );
        """,
    ),
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ServerId:
    host: str
    port: int
    username: str


@dataclass(frozen=True)
class FetchedRow:
    id: int
    remote_path: str
    size: int
    mtime: int
    version: int
    inbox_name: str
    state: str


@dataclass(frozen=True)
class ArchivedFile:
    path: str  # relative to the archive root
    name: str
    member_of: str | None
    sha256: str
    size: int
    account: str | None
    query: str | None
    period_from: str | None
    period_to: str | None
    version: int


@dataclass(frozen=True)
class RunRow:
    id: int
    command: str
    started_at: str
    ended_at: str | None
    result: str | None
    exit_code: int | None
    fetched: int
    archived: int
    failed: int
    refused: int
    message: str | None


@dataclass(frozen=True)
class RunCounts:
    fetched: int = 0
    skipped: int = 0
    refused: int = 0
    failed: int = 0
    archived: int = 0
    bytes: int = 0


class Ledger:
    """One connection, used from one thread: the caller serialises writes."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, archive_root: Path) -> Ledger:
        path = archive_root / LEDGER_NAME
        try:
            archive_root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
            # SQLite would create the file (and its -wal, -shm, which copy its mode) 0644 less
            # the umask; the ledger names accounts and reports, so it is private like them.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
            db = sqlite3.connect(path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss; the archive's promise rests on it.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"Cannot open the ledger {path}: {exc}.",
                "Check that [archive] root points to a writable folder.",
            ) from None
        ledger = cls(db, path)
        ledger._migrate()
        return ledger

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (a full disk) leaves the transaction open: end it too.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise DiskFull.at(self.path.parent) from None
            raise

    def _migrate(self) -> None:
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        applied = {row[0] for row in self._db.execute("SELECT version FROM schema_migrations")}
        newest = max(version for version, _, _ in MIGRATIONS)
        if applied and max(applied) > newest:
            raise ConfigError(
                f"The ledger {self.path} was written by a newer version of ibkr-statements "
                f"(schema {max(applied)}, this one knows {newest}).",
                "Upgrade ibkr-statements; do not edit the ledger by hand.",
            )
        for version, name, sql in MIGRATIONS:
            if version in applied:
                continue
            with self.transaction() as db:
                for statement in sql.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, now_iso()),
                )

    @property
    def schema_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    # --- runs ----------------------------------------------------------------------------

    def start_run(self, command: str) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (command, started_at) VALUES (?, ?)", (command, now_iso())
            )
        return int(cursor.lastrowid or 0)

    def finish_run(
        self, run_id: int, *, result: str, exit_code: int, counts: RunCounts, message: str = ""
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET ended_at=?, result=?, exit_code=?, fetched=?, skipped=?, "
                "refused=?, failed=?, archived=?, bytes=?, message=? WHERE id=?",
                (
                    now_iso(),
                    result,
                    exit_code,
                    counts.fetched,
                    counts.skipped,
                    counts.refused,
                    counts.failed,
                    counts.archived,
                    counts.bytes,
                    message,
                    run_id,
                ),
            )

    # --- fetched files -------------------------------------------------------------------

    def history(self, server: ServerId) -> set[tuple[str, int, int]]:
        """Every (remote path, size, mtime) fetched so far: one indexed query, on a read-only
        connection of its own, so that any thread may call it.

        The fetch reads it on another thread while it connects and lists: SQLite reads the
        20,000 rows a few years of nightly reports make without holding the GIL, so they cost
        no wall time there. A flat set built in C: a dict of per-path sets took three times as
        long (and memory).
        """
        db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            return set(db.execute(_HISTORY, (server.host, server.port, server.username)))
        finally:
            db.close()

    def record_fetched(
        self,
        server: ServerId,
        *,
        remote_path: str,
        size: int,
        mtime: int,
        version: int,
        inbox_name: str,
        run_id: int | None,
    ) -> None:
        self.record_fetched_many(server, [(remote_path, size, mtime, version, inbox_name)], run_id)

    def record_fetched_many(
        self,
        server: ServerId,
        rows: Sequence[tuple[str, int, int, int, str]],
        run_id: int | None,
    ) -> None:
        """Record each (remote_path, size, mtime, version, inbox_name) fetched, in one
        transaction: one fsync of the ledger for a batch of files."""
        stamp = now_iso()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO fetched (host, port, username, remote_path, size, mtime, version, "
                "inbox_name, sha256, fetched_at, run_id) VALUES (?,?,?,?,?,?,?,?,'',?,?)",
                [(server.host, server.port, server.username, *row, stamp, run_id) for row in rows],
            )

    def fetched_rows(self, states: Sequence[str] = ("fetched",)) -> list[FetchedRow]:
        marks = ",".join("?" * len(states))
        rows = self._db.execute(
            "SELECT id, remote_path, size, mtime, version, inbox_name, state "  # noqa: S608
            f"FROM fetched WHERE state IN ({marks}) ORDER BY id",  # marks are only '?'s
            tuple(states),
        )
        return [FetchedRow(*row) for row in rows]

    def fetched_rows_named(
        self, inbox_names: Iterable[str], states: Sequence[str]
    ) -> list[FetchedRow]:
        """The rows of these inbox names in these states: one indexed lookup per name."""
        names = list(inbox_names)
        marks = ",".join("?" * len(states))
        found: list[FetchedRow] = []
        for start in range(0, len(names), _LOOKUP_BATCH):
            batch = names[start : start + _LOOKUP_BATCH]
            rows = self._db.execute(
                "SELECT id, remote_path, size, mtime, version, inbox_name, state "  # noqa: S608
                f"FROM fetched WHERE inbox_name IN ({','.join('?' * len(batch))}) "
                f"AND state IN ({marks}) ORDER BY id",  # the f-strings add only '?'s
                (*batch, *states),
            )
            found.extend(FetchedRow(*row) for row in rows)
        return sorted(found, key=lambda row: row.id)

    def newest_fetched_at(self) -> str | None:
        """When the newest file was fetched (ISO 8601, UTC), or None if nothing ever was."""
        row = self._db.execute("SELECT fetched_at FROM fetched ORDER BY id DESC LIMIT 1")
        found = row.fetchone()
        return None if found is None else str(found[0])

    def inbox_names(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT inbox_name FROM fetched")}

    # --- refused names -------------------------------------------------------------------

    def record_refused(self, server: ServerId, refused: Iterable[tuple[str, str]]) -> None:
        stamp = now_iso()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO refused (host, port, username, remote_name, reason, first_seen, "
                "last_seen) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT (host, port, username, remote_name) DO UPDATE SET "
                "reason=excluded.reason, last_seen=excluded.last_seen, times=times+1",
                [
                    (server.host, server.port, server.username, name, reason, stamp, stamp)
                    for name, reason in refused
                ],
            )

    def refused_names(self, server: ServerId) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT remote_name, reason FROM refused WHERE host=? AND port=? AND username=?",
            (server.host, server.port, server.username),
        )
        return dict(rows.fetchall())

    # --- decrypt and archive -------------------------------------------------------------

    def fetched_row(self, fetched_id: int) -> FetchedRow:
        row = self._db.execute(
            "SELECT id, remote_path, size, mtime, version, inbox_name, state "
            "FROM fetched WHERE id=?",
            (fetched_id,),
        ).fetchone()
        return FetchedRow(*row)

    def fetched_at(self, fetched_id: int) -> str:
        row = self._db.execute("SELECT fetched_at FROM fetched WHERE id=?", (fetched_id,))
        return str(row.fetchone()[0])

    def complete(
        self,
        fetched_id: int,
        files: Sequence[ArchivedFile],
        *,
        signature: str,
        signer: str | None,
        run_id: int | None,
    ) -> None:
        """Record every archived file of one fetched file and mark it archived, atomically."""
        stamp = now_iso()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO archived (fetched_id, path, name, member_of, sha256, size, account, "
                "query, period_from, period_to, version, archived_at, run_id) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (path) DO NOTHING",
                [
                    (
                        fetched_id,
                        f.path,
                        f.name,
                        f.member_of,
                        f.sha256,
                        f.size,
                        f.account,
                        f.query,
                        f.period_from,
                        f.period_to,
                        f.version,
                        stamp,
                        run_id,
                    )
                    for f in files
                ],
            )
            db.execute(
                "UPDATE fetched SET state='archived', failure=NULL, signature=?, signer=?, "
                "processed_at=? WHERE id=?",
                (signature, signer, stamp, fetched_id),
            )

    def quarantine(self, fetched_id: int, reason: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE fetched SET state='quarantined', failure=?, processed_at=? WHERE id=?",
                (reason, now_iso(), fetched_id),
            )

    def requeue(self, fetched_id: int) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE fetched SET state='fetched', failure=NULL WHERE id=? "
                "AND state='quarantined'",
                (fetched_id,),
            )

    def archived_for(self, fetched_id: int) -> list[str]:
        rows = self._db.execute(
            "SELECT path FROM archived WHERE fetched_id=? ORDER BY id", (fetched_id,)
        )
        return [r[0] for r in rows]

    def to_delete_remotely(self, server: ServerId) -> list[FetchedRow]:
        rows = self._db.execute(
            "SELECT id, remote_path, size, mtime, version, inbox_name, state "
            "FROM fetched WHERE host=? AND port=? AND username=? AND state='archived' "
            "AND remote_deleted_at IS NULL ORDER BY id",
            (server.host, server.port, server.username),
        )
        return [FetchedRow(*row) for row in rows]

    def mark_remote_deleted(self, fetched_id: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE fetched SET remote_deleted_at=? WHERE id=?", (now_iso(), fetched_id))

    # --- status --------------------------------------------------------------------------

    def recent_runs(self, limit: int = 10) -> list[RunRow]:
        rows = self._db.execute(
            "SELECT id, command, started_at, ended_at, result, exit_code, fetched, archived, "
            "failed, refused, message FROM runs ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [RunRow(*row) for row in rows]

    def quarantined(self) -> list[tuple[FetchedRow, str]]:
        rows = self._db.execute(
            "SELECT id, remote_path, size, mtime, version, inbox_name, state, failure "
            "FROM fetched WHERE state='quarantined' ORDER BY id"
        )
        return [(FetchedRow(*row[:7]), str(row[7] or "")) for row in rows]

    def latest_by_account(self) -> list[tuple[str, str, int]]:
        """(account, latest period end archived, number of files) per account."""
        rows = self._db.execute(
            "SELECT account, MAX(period_to), COUNT(*) FROM archived "
            "WHERE account IS NOT NULL GROUP BY account ORDER BY account"
        )
        return [(str(r[0]), str(r[1] or "-"), int(r[2])) for r in rows]

    def totals(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM fetched GROUP BY state")
        totals = {str(state): int(count) for state, count in rows}
        totals["archived files"] = int(
            self._db.execute("SELECT COUNT(*) FROM archived").fetchone()[0]
        )
        return totals

    # --- the nightly schedule ------------------------------------------------------------

    def scheduled_day(self, local_date: str) -> tuple[str, int, str | None] | None:
        """(state, attempts, last attempt time) of a scheduled day, or None if never tried."""
        row = self._db.execute(
            "SELECT state, attempts, last_attempt_at FROM scheduled_days WHERE local_date=?",
            (local_date,),
        ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]), row[2])

    def record_attempt(self, local_date: str, *, state: str, exit_code: int, at: datetime) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO scheduled_days (local_date, state, attempts, last_attempt_at, "
                "last_exit_code) VALUES (?, ?, 1, ?, ?) ON CONFLICT (local_date) DO UPDATE SET "
                "state=excluded.state, attempts=attempts+1, "
                "last_attempt_at=excluded.last_attempt_at, last_exit_code=excluded.last_exit_code",
                (local_date, state, at.isoformat(timespec="seconds"), exit_code),
            )
