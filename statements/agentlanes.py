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

Lanes live in a private (0700) temporary folder, not in the project: gpg-agent puts its sockets
in the home folder when ``/run/user/<uid>`` is missing (root in a container, a cron job), and a
socket path is limited to 107 bytes, which a project folder a few levels deep already exceeds.
:meth:`statements.decrypt.Decryptor.close` stops the lanes' agents and deletes them; after a
crash an agent whose socket is gone, or answered by another agent, exits by itself.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from statements.errors import StatementsError
from statements.fsutil import PRIVATE_FILE, ensure_private_dir
from statements.keys.pgp import open_gnupg, stop_agent

log = logging.getLogger(__name__)

SHARED = "private-keys-v1.d"
COPIED = ("pubring.kbx", "pubring.gpg", "trustdb.gpg", "gpg.conf")
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, with its terminating NUL


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
