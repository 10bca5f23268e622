"""The "already archived" state a nightly run starts from, built once per invocation.

Ours: a project whose ledger and archive hold the history exactly as `run` leaves them. Either
`run` itself makes it (``--history-by-run``: one first sync of the whole history, which pays a
gpg decryption per file and takes 8-10 minutes for 20,000 files on these machines), or, by
default, it is written through the project's own code: `Ledger.record_fetched_many` and
`Ledger.complete` (the calls `run` makes), `archive.destination` for each file's place, the
plaintext filed there and the ciphertext kept under `.encrypted/`, as `run` does.

The reference script: its list of names seen (from one `sftp -b` listing, as it makes it) and
the same archive folders.

A measured run works on a copy: hard links for the archive files (no run rewrites an archived
file; new ones are linked or renamed in) and real copies of what a run writes in place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.clients import Target, remote_names
from bench.corpus import Corpus, sha256_file
from statements.archive import Produced, destination, parse_report_name
from statements.ledger import ArchivedFile, Ledger, RunCounts, ServerId

# What a run rewrites in place: copied, never linked, into each run's copy.
OURS_MUTABLE = ("archive/index.sqlite3", "archive/index.sqlite3-wal", "archive/index.sqlite3-shm")
REFERENCE_MUTABLE = ("seen.txt",)


@dataclass(frozen=True)
class State:
    folder: Path
    mutable: tuple[str, ...]

    def clone(self, target: Path) -> Path:
        """A copy of this state for one run: hard links, real copies of what it rewrites."""
        subprocess.run(["cp", "-al", str(self.folder), str(target)], check=True, timeout=600)
        for relative in self.mutable:
            path = target / relative
            if path.exists():
                path.unlink()
                shutil.copy2(self.folder / relative, path)
        return target


def seed_ours(config: Path, target: Target, history: Corpus, *, fetched_on: date) -> None:
    """Put ``history`` into the project of ``config`` as archived, through the project's code."""
    from statements import config as config_module

    cfg = config_module.load(config)
    root = cfg.archive.root
    server = ServerId(target.server.host, target.server.port, target.server.username)
    remote_dir = cfg.sftp.remote_dir
    encrypted = root / ".encrypted"
    encrypted.mkdir(parents=True, mode=0o700)
    with Ledger.open(root) as ledger:
        # Durability is not what is being set up here; every row still goes through complete().
        ledger._db.execute("PRAGMA synchronous=OFF")
        run_id = ledger.start_run("run")
        rows = []
        for report in history.reports:
            ciphertext = history.folder / report.remote_name
            info = ciphertext.stat()
            remote_path = f"{remote_dir}/{report.remote_name}"
            rows.append(
                (
                    remote_path,
                    info.st_size,
                    int(info.st_mtime),
                    1,
                    report.remote_name,
                )
            )
            os.link(ciphertext, encrypted / report.remote_name)
        ledger.record_fetched_many(server, rows, run_id)
        ids = {row.inbox_name: row.id for row in ledger.fetched_rows(("fetched",))}
        for report in history.reports:
            plaintext = history.plain / report.plain_name
            relative = destination(
                Produced(report.plain_name, plaintext, None),
                bundle=parse_report_name(report.plain_name),
                fetched_on=fetched_on,
            )
            folder = root / relative.parent
            if not folder.is_dir():
                folder.mkdir(parents=True, mode=0o700)
            os.link(plaintext, folder / relative.name)
            parsed = parse_report_name(report.plain_name)
            ledger.complete(
                ids[report.remote_name],
                [
                    ArchivedFile(
                        path=relative.as_posix(),
                        name=report.plain_name,
                        member_of=None,
                        sha256=history.plain_digests[report.archive_path],
                        size=report.size,
                        account=parsed.account,
                        query=parsed.query,
                        period_from=parsed.period_from.isoformat() if parsed.period_from else None,
                        period_to=parsed.period_to.isoformat() if parsed.period_to else None,
                        version=1,
                    )
                ],
                signature="none",
                signer=None,
                run_id=run_id,
            )
        ledger.finish_run(
            run_id,
            result="ok",
            exit_code=0,
            counts=RunCounts(
                fetched=history.count, archived=history.count, bytes=history.cipher_bytes
            ),
        )


def seed_reference(state: Path, target: Target, history: Corpus, ours_archive: Path) -> None:
    """The reference script's state: the names it listed once, and the same archive folders."""
    state.mkdir(parents=True)
    names = remote_names(target, history.folder, state)
    expected = sorted(r.remote_name for r in history.reports)
    if names != expected:
        raise RuntimeError(
            f"sftp lists {len(names)} names in {history.folder}, not {len(expected)}"
        )
    (state / "seen.txt").write_text("".join(f"{name}\n" for name in names))
    for folder in ours_archive.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            subprocess.run(["cp", "-al", str(folder), str(state / folder.name)], check=True)
    subprocess.run(
        ["cp", "-al", str(ours_archive / ".encrypted"), str(state / "encrypted")], check=True
    )


def check_seeded(root: Path, history: Corpus) -> None:
    """Spot-check the seeded archive against the corpus (the full check runs per measured run)."""
    for report in history.reports[:: max(1, history.count // 50)]:
        path = root / report.archive_path
        if sha256_file(path) != history.plain_digests[report.archive_path]:
            raise RuntimeError(f"seeded {path} differs from its plaintext")
