"""More gpg-agents for one GnuPG home, so that several files decrypt at the same time.

Every file costs gpg-agent one private-key operation (about 20 ms with RSA-4096 here), and one
agent does them one after the other whatever the number of gpg processes asking: for 400 files,
one ``gpg --decrypt-files`` took 8.2 s and two at once against the same home 8.0 s, while two
against two agents took 4.2 s (GnuPG 2.2.40, 2 cores). gpg starts one agent per home folder, so
a *lane* is a second home folder that shows gpg the same keys:

- ``private-keys-v1.d`` is a symlink to the real one: the secret keys stay in one place, in
  their own 0600 files, and the agent only reads them;
- ``pubring.kbx``, ``trustdb.gpg`` and ``gpg.conf`` are copies: public and small; gpg may write
  to its keyring and trust database, and a copy keeps those writes and their lock files away
  from the real home;
- ``gpg-agent.conf`` gets the project's settings (no passphrase cache) from ``open_gnupg``.

Lanes live in ``<temp>/ibkr-statements-gpg-<uid>/<hash of the home's path>/<n>``, not in the
project: gpg-agent puts its sockets in the home folder when ``/run/user/<uid>`` is missing (root
in a container, a cron job), and a socket path is limited to 107 bytes, which a project folder a
few levels deep already exceeds. The folder is private (0700, ours, never a symlink: anything
else there and lanes are not used) and its name is fixed per GnuPG home, so that each run first
stops the agents and deletes the lanes a killed run left behind (and those of homes that no
longer exist); :meth:`statements.decrypt.Decryptor.close` does the same for its own at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from statements.errors import StatementsError
from statements.fsutil import PRIVATE_DIR, PRIVATE_FILE, ensure_private_dir
from statements.keys.pgp import open_gnupg, stop_agent

log = logging.getLogger(__name__)

SHARED = "private-keys-v1.d"
COPIED = ("pubring.kbx", "pubring.gpg", "trustdb.gpg", "gpg.conf")
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, with its terminating NUL
_OWNER_FILE = "home"  # in each home's lanes folder: the home's path, to tell whose it is


def lanes_folder(home: Path, gpg_binary: str) -> Path | None:
    """The (emptied) folder for ``home``'s lanes, or None if no safe one can be had."""
    base = Path(tempfile.gettempdir()) / f"ibkr-statements-gpg-{os.getuid()}"
    try:
        with contextlib.suppress(FileExistsError):
            base.mkdir(mode=PRIVATE_DIR)
        found = os.lstat(base)
    except OSError as exc:
        log.info("decrypting without an extra gpg-agent: cannot make %s (%s)", base, exc)
        return None
    if (
        not stat.S_ISDIR(found.st_mode)
        or found.st_uid != os.getuid()
        or stat.S_IMODE(found.st_mode) != PRIVATE_DIR
    ):
        # Someone else's, a symlink, or open to others: a place that is not private.
        log.warning("decrypting without an extra gpg-agent: %s is not a private folder", base)
        return None
    mine = base / hashlib.sha256(os.fsencode(home.absolute())).hexdigest()[:12]
    for folder in base.iterdir():
        owner = _owner(folder)
        if folder == mine or owner is None or not owner.is_dir():
            clear_lanes(folder, gpg_binary)  # a killed run's, or a deleted home's
    try:
        ensure_private_dir(mine)
        (mine / _OWNER_FILE).write_text(str(home.absolute()), "utf-8")
    except OSError as exc:
        log.info("decrypting without an extra gpg-agent: cannot use %s (%s)", mine, exc)
        return None
    return mine


def clear_lanes(folder: Path, gpg_binary: str) -> None:
    """Stop the agents of every lane in ``folder`` and delete it."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for lane in folder.iterdir():
        if lane.is_dir() and not lane.is_symlink():
            stop_agent(lane, gpg_binary)
    shutil.rmtree(folder, ignore_errors=True)


def _owner(folder: Path) -> Path | None:
    try:
        return Path((folder / _OWNER_FILE).read_text("utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def make_lane(home: Path, lane: Path, gpg_binary: str, fingerprints: set[str]) -> Any | None:
    """A python-gnupg handle on a new lane of ``home`` at ``lane``, or None if it is not usable.

    Usable means gpg in the lane lists the same secret keys (``fingerprints``) as the home; a
    lane that cannot be made is logged and skipped, never an error: the home alone still works.
    """
    socket = lane / "S.gpg-agent.browser"  # the longest name gpg-agent gives a socket
    if len(os.fsencode(socket)) > _SOCKET_PATH_MAX:
        log.info("decrypting without an extra gpg-agent: %s is too long for a socket", socket)
        return None
    try:
        if lane.exists():
            stop_agent(lane, gpg_binary)
            shutil.rmtree(lane)
        ensure_private_dir(lane.parent)
        ensure_private_dir(lane)
        (lane / SHARED).symlink_to(home / SHARED, target_is_directory=True)
        for name in COPIED:
            if (home / name).is_file():
                shutil.copyfile(home / name, lane / name)
                (lane / name).chmod(PRIVATE_FILE)
        gpg = open_gnupg(lane, gpg_binary)
        listed = gpg.list_keys(secret=True)
        found = {str(fpr).upper() for fpr in listed.fingerprints}
    except (OSError, StatementsError) as exc:
        log.info("decrypting without an extra gpg-agent: cannot prepare %s (%s)", lane, exc)
        remove_lane(lane, gpg_binary)
        return None
    if not fingerprints or found != fingerprints:
        log.info("decrypting without an extra gpg-agent: %s does not list our secret keys", lane)
        remove_lane(lane, gpg_binary)
        return None
    return gpg


def remove_lane(lane: Path, gpg_binary: str) -> None:
    """Stop the lane's agent and delete the lane (never the keys its symlink points at)."""
    if lane.exists():
        stop_agent(lane, gpg_binary)
        shutil.rmtree(lane, ignore_errors=True)  # rmtree unlinks a symlink, never follows it
