"""The project's PGP key, the sender that encrypts to it, and what unlocking the key costs.

The key is made the way a user makes it: ``ibkr-statements keys pgp`` (RSA, passphrase), in a
GnuPG home whose gpg-agent protects it with the S2K iteration count it calibrates itself
(``GETINFO s2k_count``; about 300 million bytes of SHA-1 on these machines). gpg 2.2 keeps no
unlocked key in memory, so every private-key operation pays that count again: once per file,
for our tool and for ``gpg --decrypt-files`` alike.

Two GnuPG homes hold the same key:

- ``calibrated``: as ``keys pgp`` left it (what users have);
- ``fast``: the same key re-protected (``gpg --passwd``) under ``s2k-count 65536``, the smallest
  count gpg-agent accepts. Ratios between the tools hold with either, since both use the same
  home; the fast one keeps a run about the tools rather than the key derivation.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.clients import CONSOLE_SCRIPT
from statements.keys.pgp import stop_agent

PASSPHRASE = "bench pgp passphrase, correct horse battery"
FAST_S2K_COUNT = 65536
_BATCH = 500  # files per `gpg --encrypt-files` (argument list length)
_TIMEOUT_S = 600


@dataclass(frozen=True)
class Keyring:
    calibrated: Path  # the GnuPG home `keys pgp` made
    fast: Path  # the same key, re-protected with FAST_S2K_COUNT
    sender: Path  # a GnuPG home holding only the public key: "IBKR"
    passphrase_file: Path  # 0600, for the reference script's --passphrase-file
    fingerprint: str
    bits: int

    def home(self, s2k: str) -> Path:
        return self.fast if s2k == "fast" else self.calibrated


def gpg(home: Path, *args: str, stdin: bytes = b"") -> bytes:
    result = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
        input=stdin,
        capture_output=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"gpg {' '.join(args[:3])} failed: {result.stderr.decode()[-1500:]}")
    return result.stdout


def make_keyring(work: Path, bits: int, env: dict[str, str]) -> Keyring:
    """The project's key pair made by our own `init` + `keys pgp`; the sender and fast copy."""
    project = work / "pgp-project"
    project.mkdir(parents=True)
    env = {**env, "IBKR_PGP_PASSPHRASE": PASSPHRASE}
    for argv in (
        ["init"],
        [
            "keys",
            "pgp",
            "--name",
            "Bench Adviser",
            "--email",
            "bench@example.com",
            "--bits",
            f"{bits}",
        ],
    ):
        done = subprocess.run(
            [str(CONSOLE_SCRIPT), *argv],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ibkr-statements {argv[0]} failed:\n{done.stderr[-2000:]}")
    found = re.search(r"Fingerprint:\s+([0-9A-F]{40})", done.stdout)
    if found is None:
        raise RuntimeError(f"no fingerprint in `keys pgp` output:\n{done.stdout}")
    calibrated = project / "keys" / "gnupg"
    stop_agent(calibrated)
    passphrase_file = work / "pgp-passphrase"
    passphrase_file.touch(mode=0o600)
    passphrase_file.write_text(PASSPHRASE)
    sender = work / "sender"
    sender.mkdir(mode=0o700)
    gpg(sender, "--quiet", "--import", str(project / "keys" / "pgp-public.asc"))
    fast = work / "gnupg-fast"
    shutil.copytree(calibrated, fast, ignore=lambda _d, names: [n for n in names if n[:2] == "S."])
    _reprotect(fast, found.group(1), FAST_S2K_COUNT)
    return Keyring(calibrated, fast, sender, passphrase_file, found.group(1), bits)


def _reprotect(home: Path, fingerprint: str, count: int) -> None:
    """Protect the secret key in ``home`` again, same passphrase, with this S2K count."""
    conf = home / "gpg-agent.conf"
    original = conf.read_text()
    conf.write_text(original + f"s2k-count {count}\n")
    stop_agent(home)
    try:
        # Loopback pinentry asks for the old passphrase, then the new one: the same here.
        gpg(
            home,
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            "0",
            "--command-fd",
            "0",
            "--passwd",
            fingerprint,
            stdin=f"{PASSPHRASE}\n{PASSPHRASE}\n".encode(),
        )
    finally:
        stop_agent(home)
        conf.write_text(original)
    if stored_counts(home) != {count}:
        raise RuntimeError(f"re-protecting the key gave S2K counts {stored_counts(home)}")


def stored_counts(home: Path) -> set[int]:
    """The S2K counts the secret (sub)keys in ``home`` are protected with."""
    counts = set()
    for path in (home / "private-keys-v1.d").glob("*.key"):
        data = path.read_bytes()
        at = data.find(b"(sha1")
        found = re.search(rb'"(\d+)"\)', data[at:]) if at >= 0 else None
        if found is not None:
            counts.add(int(found.group(1)))
    return counts


def agent_count(home: Path) -> int:
    """What the home's gpg-agent calibrates as its S2K count (applied to keys it protects)."""
    done = subprocess.run(
        ["gpg-connect-agent", "--homedir", str(home), "GETINFO s2k_count", "/bye"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"^D (\d+)", done.stdout, re.MULTILINE)
    stop_agent(home)
    return int(found.group(1)) if found else 0


def encrypt_to(keyring: Keyring, plain: Path, names: list[str], folder: Path) -> None:
    """``plain/NAME`` -> ``folder/NAME.pgp``, encrypted to the project key like IBKR does."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(names), _BATCH):
        batch = names[start : start + _BATCH]
        gpg(
            keyring.sender,
            "--quiet",
            "--yes",
            "--trust-model",
            "always",
            "--compress-algo",
            "none",
            "--recipient",
            keyring.fingerprint,
            "--encrypt-files",
            *(str(plain / name) for name in batch),
        )
        for name in batch:
            (plain / f"{name}.gpg").replace(folder / f"{name}.pgp")


def decrypt(keyring: Keyring, s2k: str, source: Path, output: Path) -> None:
    gpg(
        keyring.home(s2k),
        "--quiet",
        "--pinentry-mode",
        "loopback",
        "--passphrase-file",
        str(keyring.passphrase_file),
        "--output",
        str(output),
        "--yes",
        "--decrypt",
        str(source),
    )


def unlock_seconds(keyring: Keyring, sample: Path, runs: int) -> dict[str, float]:
    """Median wall time of one `gpg -d` of a small file with each home, agent already up."""
    times: dict[str, list[float]] = {"fast": [], "calibrated": []}
    for run in range(runs + 1):  # the first round starts the agents and is not counted
        for s2k, samples in times.items():
            started = time.perf_counter()
            decrypt(keyring, s2k, sample, Path("/dev/null"))
            if run:
                samples.append(time.perf_counter() - started)
    for s2k in times:
        stop_agent(keyring.home(s2k))
    return {s2k: statistics.median(samples) for s2k, samples in times.items()}
