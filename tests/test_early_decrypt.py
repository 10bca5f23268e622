"""`run` decrypting big files while they download: real sshd, real gpg, in this process.

The size above which a file is decrypted early is lowered so small reports take that path;
everything else is the real run.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from statements import config, pipeline
from statements import decrypt as decrypt_module
from statements.decrypt import EARLY_FOLLOWER_NICE, Decryptor, lower_thread_priority
from statements.errors import ExitCode
from statements.fsutil import Writeback
from statements.ledger import Ledger
from statements.remote import MAX_READ_CHUNK
from tests import harness
from tests.clitools import PGP_PASSPHRASE, Project
from tests.harness import make_sender, sha, sshd_project, stranger_key
from tests.sshd import SshdServer
from tests.test_pipeline_logic import SERVER, FakeServer

pytestmark = pytest.mark.integration


def report(seed: int, lines: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(
        b"<Trade symbol='%d' qty='%d' price='%f'/>\n"
        % (rng.randrange(10**6), rng.randrange(1000), rng.random())
        for _ in range(lines)
    )


@pytest.fixture
def early_project(
    keyed_project: Project,
    sshd: SshdServer,
    sftp_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Project:
    project = sshd_project(keyed_project, sshd, sftp_dir, tmp_path / "p")
    monkeypatch.setenv("IBKR_SSH_PASSPHRASE", sshd.client_key_passphrase or "")
    monkeypatch.setenv("IBKR_PGP_PASSPHRASE", PGP_PASSPHRASE)
    return project


def test_run_archives_early_decrypted_files_as_a_plain_run_would(
    early_project: Project,
    sftp_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = make_sender(tmp_path, early_project.keys / "pgp-public.asc")
    _, stranger = stranger_key(tmp_path)
    sender.import_key(tmp_path / "stranger-public.asc")
    trades = report(1, 60_000)  # ~3 MiB: many reads and pipe buffers
    activity = report(2, 20_000)
    remote = {
        "U4698258.Trade_History.20260901.20260901.xml.pgp": sender.encrypt(trades),
        "U4698258.Activity.20260901.20260930.xml.gz.gpg": sender.encrypt(gzip.compress(activity)),
        "U4698258.Trade_History.20260902.20260902.xml.asc": sender.encrypt(trades, armor=True),
        "U7654321.Trade_History.20260901.20260901.xml.pgp": sender.encrypt(
            b"not for us\n", recipient=stranger
        ),
    }
    for name, data in remote.items():
        (sftp_dir / name).write_bytes(data)
    monkeypatch.setattr(pipeline, "EARLY_DECRYPT_BYTES", 1)  # every file, however small
    # Page-cache drops every 16 KiB, so that these reports (0.7 MiB compressed and encrypted,
    # 3 MiB plain) take the big-file path.
    monkeypatch.setattr(Writeback, "STEP", 16 << 10)
    decrypted_from_inbox: list[str] = []
    decrypt = Decryptor.decrypt

    def counting(self: Decryptor, source: Path, output: Path):  # type: ignore[no-untyped-def]
        decrypted_from_inbox.append(source.name)
        return decrypt(self, source, output)

    monkeypatch.setattr(Decryptor, "decrypt", counting)
    follow_nice: list[int] = []  # the nice value each plaintext follower ran at
    follow = decrypt_module._follow_plaintext

    def recording(fd, process, digest):  # type: ignore[no-untyped-def]
        follow_nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return follow(fd, process, digest)

    monkeypatch.setattr(decrypt_module, "_follow_plaintext", recording)
    caplog.set_level(logging.DEBUG, logger="statements")

    saved_umask = os.umask(0)  # every folder made on the way must still be private
    try:
        cycle = pipeline.run_from_config(config.load(early_project.config))
    finally:
        os.umask(saved_umask)

    archive = early_project.root / "archive"
    assert cycle.exit_code == ExitCode.PARTIAL
    # Both the ciphertext and the plaintext of the big reports left the page cache as they were
    # written (checked before anything below reads them; tmpfs keeps every page whatever we
    # ask, so there is nothing to check there).
    if harness.filesystem_type(archive) != "tmpfs":
        # At most two steps, the bytes since the last one and one write: an SFTP read (up to
        # 256 KiB) for the ciphertext; the plaintext, fsynced, is dropped whole.
        written = {
            archive / ".encrypted" / "U4698258.Trade_History.20260901.20260901.xml.pgp": (
                MAX_READ_CHUNK
            ),
            archive / "U4698258" / "2026" / "U4698258.Trade_History.20260901.20260901.xml": 0,
        }
        for path, write in written.items():
            bound = 3 * Writeback.STEP + write
            assert path.stat().st_size > 2 * bound, path
            assert harness.cached_bytes(path) <= bound, path
    assert (cycle.fetch.fetched, cycle.archive.archived_files) == (4, 3)
    assert harness.archive_tree(archive) == {
        "U4698258/2026/U4698258.Trade_History.20260901.20260901.xml": sha(trades),
        "U4698258/2026/U4698258.Activity.20260901.20260930.xml": sha(activity),
        "U4698258/2026/U4698258.Trade_History.20260902.20260902.xml": sha(trades),
    }
    harness.assert_consistent(archive)
    started = [r.getMessage() for r in caplog.records if "while it downloads" in r.getMessage()]
    assert len(started) == 4
    # Only the file gpg refused went the usual way, which wrote its report in quarantine.
    assert decrypted_from_inbox == ["U7654321.Trade_History.20260901.20260901.xml.pgp"]
    # The four early decryptions hashed their plaintexts at a lower priority; the one from the
    # inbox, in an archiver thread, at the process's.
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert sorted(follow_nice) == [base] + [min(19, base + EARLY_FOLLOWER_NICE)] * 4
    quarantined = archive / ".quarantine" / "U7654321.Trade_History.20260901.20260901.xml.pgp"
    assert quarantined.read_bytes() == remote[quarantined.name]
    assert "which this project does not hold" in (
        quarantined.with_name(quarantined.name + ".error.txt").read_text()
    )
    # Nothing of the early plaintexts is left behind, and no gpg still runs.
    assert list((archive / ".work").iterdir()) == []
    assert stat.S_IMODE((archive / ".work").stat().st_mode) == 0o700
    assert harness.gpg_children() == []
    with Ledger.open(archive) as ledger:
        states = sorted(r.state for r in ledger.fetched_rows(("archived", "quarantined")))
    assert states == ["archived", "archived", "archived", "quarantined"]
    kept = {p.name: p.read_bytes() for p in (archive / ".encrypted").iterdir()}
    assert kept == {n: d for n, d in remote.items() if not n.startswith("U7654321")}


def test_a_download_cut_midway_drops_its_early_decryption_and_resumes_without(
    keyed_project: Project, tmp_path: Path
) -> None:
    sender = make_sender(tmp_path, keyed_project.keys / "pgp-public.asc")
    plain = report(3, 20_000)
    data = sender.encrypt(plain)
    project = keyed_project.copy_to(tmp_path / "p")
    decryptor = Decryptor(project.keys / "gnupg", passphrase=PGP_PASSPHRASE)
    early = pipeline.EarlyDecryptions(decryptor, tmp_path / "early", min_bytes=1)
    root = tmp_path / "archive"
    cut = "U1234567.Trade_History.20260901.20260901.xml.pgp"
    whole = "U1234567.Trade_History.20260902.20260902.xml.pgp"
    try:
        with Ledger.open(root) as ledger:
            # The first connection drops halfway; the retry resumes from the .part.
            dropping = FakeServer({cut: (data, 7)}, drop_after=len(data) // 2)
            summary = pipeline.fetch_new(
                dropping, ledger, SERVER, root, workers=1, retries=2, early=early
            )
            assert (summary.fetched, summary.failures) == (1, [])
            assert dropping.connections == 2
            assert early.take(cut) is None  # resumed: the archiver decrypts it as usual
            assert list((tmp_path / "early").iterdir()) == []
            assert harness.gpg_children() == []

            steady = FakeServer({whole: (data, 8)})
            pipeline.fetch_new(steady, ledger, SERVER, root, workers=1, retries=2, early=early)
            decrypted = early.take(whole)
            assert decrypted is not None
            assert decrypted.output.read_bytes() == plain
            assert decrypted.sha256 == sha(plain)
            early.discard()
    finally:
        project.stop_agent()
    assert (root / ".inbox" / cut).read_bytes() == data == (root / ".inbox" / whole).read_bytes()


@pytest.mark.parametrize("thread", ["gpg-early", "gpg-early-stderr"])
def test_an_early_decryption_whose_thread_cannot_start_leaves_no_gpg_no_file_no_pipe(
    keyed_project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread: str
) -> None:
    # At a thread limit: the file is then decrypted from the inbox as usual, and nothing of
    # the attempt is left (the gpg it started, its temporary file, the plaintext pipe).
    project = keyed_project.copy_to(tmp_path / "p")
    decryptor = Decryptor(project.keys / "gnupg", passphrase=PGP_PASSPHRASE)
    folder = tmp_path / "early"
    folder.mkdir()
    start = threading.Thread.start

    def refusing(self: threading.Thread) -> None:
        if self.name == thread:
            raise RuntimeError("can't start new thread")
        start(self)

    fds = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(threading.Thread, "start", refusing)
    try:
        assert decryptor.start_early("f.pgp", folder) is None
    finally:
        monkeypatch.undo()
        decryptor.close()
        project.stop_agent()
    assert list(folder.iterdir()) == []
    assert harness.gpg_children() == []
    assert set(os.listdir("/proc/self/fd")) == fds


def test_a_lowered_thread_priority_is_that_threads_alone() -> None:
    """Only the calling thread yields: not the process, nor what it starts afterwards."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen: list[int] = []

    def lowered() -> None:
        lower_thread_priority(3)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen == [min(19, base + 3)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    child = subprocess.run(
        ["sh", "-c", "cut -d' ' -f19 /proc/self/stat"], capture_output=True, text=True, check=True
    )
    assert int(child.stdout) == base
