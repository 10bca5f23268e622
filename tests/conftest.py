"""Shared fixtures. Expensive things (RSA-4096 and PGP keys, the sshd) are made once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clitools import Project


@pytest.fixture(scope="session")
def keyed_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """A project set up as the README says, with default (RSA-4096) keys: made once, copy it."""
    project = Project(tmp_path_factory.mktemp("keyed"))
    project.ok("init")
    project.ok("keys", "ssh")
    project.ok("keys", "pgp", "--name", "Test User", "--email", "test@example.com")
    project.stop_agent()
    yield project
    project.stop_agent()


@pytest.fixture
def project(keyed_project: Project, tmp_path: Path) -> Iterator[Project]:
    """A private copy of the keyed project for a test that changes it."""
    copy = keyed_project.copy_to(tmp_path / "p")
    yield copy
    copy.stop_agent()


@pytest.fixture
def empty_project(tmp_path: Path) -> Iterator[Project]:
    """A project folder with only `init` done."""
    root = tmp_path / "e"
    root.mkdir()
    project = Project(root)
    project.ok("init")
    yield project
    project.stop_agent()


pytest_plugins = ["tests.sshd"]


@pytest.fixture(scope="session", autouse=True)
def _stop_every_gpg_agent(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """gpg starts an agent per GnuPG home on first use; none may outlive the session.

    The decryptor's extra agents (lanes) live under the temporary folder: the session points
    that (TMPDIR, for the processes it starts too) inside its own base folder, so that lanes a
    killed run leaves are found and stopped here, and nothing lands in the machine's /tmp.
    """
    base = tmp_path_factory.getbasetemp()
    temp = base / "t"
    temp.mkdir(exist_ok=True)
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(temp)
    yield
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]
    for socket_path in base.rglob("S.gpg-agent"):
        subprocess.run(
            ["gpgconf", "--homedir", str(socket_path.parent), "--kill", "gpg-agent"],
            capture_output=True,
            check=False,
            timeout=30,
        )


@pytest.fixture
def disk_folder(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, unless it is on tmpfs (whose pages cannot be dropped nor written direct):
    then a folder in the project's tests/, on its disk."""
    from tests.harness import filesystem_type  # here: pytest must load tests.sshd first

    if filesystem_type(tmp_path) != "tmpfs":
        yield tmp_path
        return
    folder = Path(__file__).resolve().parent / f".disk-{tmp_path.name}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder)
