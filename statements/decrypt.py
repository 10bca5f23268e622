"""Decrypt one PGP file from IBKR into a plaintext file, trusting only what gpg's status proves.

gpg runs in the project's own GnuPG home (``[pgp] gnupg_home``) through
:func:`statements.keys.pgp.open_gnupg`: loopback pinentry, batch mode, an agent that caches no
passphrase, and nothing taken from ``$HOME``. gpg reads the ciphertext file itself and writes the
plaintext to a pipe; this process hashes it and writes it into a temporary file beside the output
as it comes (1 MiB at a time, never a whole file in memory), starting the disk writes as it goes.
:class:`EarlyDecryption` does the same for a file still downloading, fed through gpg's stdin.

A decryption counts only when gpg's status lines prove it (observed with GnuPG 2.2.40):

- ``DECRYPTION_OKAY`` and exit status 0. The one exception is a signature gpg could not accept
  (``ERRSIG`` exits 2, ``BADSIG`` 1) after it had confirmed the decryption.
- ``DECRYPTION_INFO <mdc_method> <sym_algo> [<aead_algo>]`` shows an MDC or AEAD. gpg 2.2 writes
  the whole plaintext of a message without integrity protection before it fails with
  ``DECRYPTION_FAILED``, and with ``ignore-mdc-error`` in gpg.conf it reports success.
- The message was encrypted to a public key (``ENC_TO``). gpg would otherwise accept a
  symmetrically encrypted file if its password happened to be our key's passphrase, and a
  file that is only signed gives exit status 0 and a plaintext without any decryption.
- The plaintext file holds as many bytes as ``PLAINTEXT_LENGTH`` announced.

Then one policy on top of gpg: the key that decrypted (``DECRYPTION_KEY``) must still be usable.
gpg 2.2.40 decrypts with an expired or revoked key of ours without complaint, but IBKR can no
longer encrypt new reports to such a key, so deliveries are about to stop silently. Such a file
is refused (``key_expired`` / ``key_revoked``) with a hint on how to renew or replace the key; the
ciphertext is kept by the caller, so nothing is lost and a retry after the fix archives it.

Anything else is a :class:`DecryptFailed` for that one file, and no output file is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from statements.agentlanes import clear_lanes, lanes_folder, make_lane, remove_lane
from statements.errors import DiskFull, ExitCode, KeyProblem, StatementsError
from statements.fsutil import Writeback, forget_cached, fsync_dir
from statements.keys.pgp import check_passphrase, gpg_time, open_gnupg, status_summary

log = logging.getLogger(__name__)

SignatureState = Literal["none", "good", "bad", "unverifiable"]
FailureKind = Literal[
    "no_secret_key",
    "bad_passphrase",
    "no_passphrase",
    "no_integrity",
    "corrupt",
    "signature_required",
    "bad_signature",
    "key_expired",
    "key_revoked",
    "no_output",
    "gpg_error",
]

_STATUS_PREFIX = "[GNUPG:] "
# libgpg-error's GPG_ERR_BAD_PASSPHRASE. gpg 2.2.40 with loopback pinentry reports a wrong
# passphrase only as "ERROR pkdecrypt_failed <code>", never with a BAD_PASSPHRASE status line.
_GPG_ERR_BAD_PASSPHRASE = 11
_GPG_ERR_CODE_MASK = 0xFFFF
# Signature statuses other than a good one: each starts or updates the current signature.
_SIG_UNVERIFIABLE = {"ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG"}
_SIG_WHY = {
    "ERRSIG": "could not be checked (the signer's public key is not in the GnuPG home)",
    "EXPSIG": "has expired",
    "EXPKEYSIG": "was made by a key that has expired",
    "REVKEYSIG": "was made by a key that was revoked",
    "BADSIG": "is BAD: the content does not match what was signed",
}

_RETRY = "then `ibkr-statements decrypt --retry-quarantine`"
# Validity letters in gpg's colon listing (field 2) of a key that may no longer be used.
_EXPIRED, _REVOKED = "e", "r"
_PASSPHRASE_PLACES = (
    "the environment variable named by [pgp] passphrase_env (default IBKR_PGP_PASSPHRASE) "
    "or the file named by [pgp] passphrase_file"
)


@dataclass(frozen=True)
class Decrypted:
    output: Path  # the plaintext file: exists, fsynced
    sha256: str  # of the plaintext, hashed as gpg wrote it
    size: int  # of the plaintext
    integrity: str  # "mdc" or "aead"
    recipients: tuple[str, ...]  # key ids from ENC_TO lines
    signature: SignatureState
    signer_fingerprint: str | None  # primary-key fingerprint from VALIDSIG, upper case
    status_lines: tuple[str, ...]  # gpg's [GNUPG:] lines; never the passphrase


class DecryptFailed(StatementsError):
    """One file could not be decrypted (or was refused); the rest of the run goes on."""

    exit_code = ExitCode.PARTIAL

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        hint: str | None = None,
        *,
        status_lines: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, hint)
        self.kind: FailureKind = kind
        self.status_lines = status_lines
        self.in_lane = False  # gpg refused it in a lane (see Decryptor.decrypt), not the home


@dataclass
class Signature:
    """One signature as gpg reported it, from NEWSIG to its VALIDSIG."""

    verdict: str = ""  # the status word: GOODSIG, BADSIG, ERRSIG, EXPKEYSIG, ...
    key_id: str = ""
    issuer_fingerprint: str = ""  # ERRSIG's field 7 (gpg >= 2.2.7): unverified, may be a subkey
    primary_fingerprint: str = ""  # from VALIDSIG: field 10, else field 1

    @property
    def good(self) -> bool:
        return self.verdict == "GOODSIG" and bool(self.primary_fingerprint)

    def who(self) -> str:
        return self.primary_fingerprint or self.issuer_fingerprint or f"key id {self.key_id}"


@dataclass
class GpgStatus:
    """What gpg's status lines say about one decryption."""

    recipients: list[str] = field(default_factory=list)  # ENC_TO key ids
    no_seckey: list[str] = field(default_factory=list)  # NO_SECKEY key ids
    session_key: bool = False  # DECRYPTION_KEY or DECRYPTION_INFO: a secret key unlocked it
    # DECRYPTION_KEY's (fingerprint of the (sub)key that decrypted, its primary's fingerprint).
    decryption_key: tuple[str, str] | None = None
    okay: bool = False  # DECRYPTION_OKAY
    failed: bool = False  # DECRYPTION_FAILED
    bad_mdc: bool = False
    no_data: bool = False
    need_passphrase: bool = False
    missing_passphrase: bool = False
    bad_passphrase: bool = False
    key_expired: bool = False
    key_revoked: bool = False
    errors: list[str] = field(default_factory=list)  # ERROR lines
    # (mdc_method, aead_algo) of each DECRYPTION_INFO line.
    protection: list[tuple[int, int]] = field(default_factory=list)
    plaintext_length: int | None = None
    signatures: list[Signature] = field(default_factory=list)

    def signature(self) -> tuple[SignatureState, str | None]:
        """The overall signature state: the worst of the signatures, and the good signer."""
        if not self.signatures:
            return "none", None
        if any(sig.verdict == "BADSIG" for sig in self.signatures):
            return "bad", None
        if not all(sig.good for sig in self.signatures):
            return "unverifiable", None
        return "good", self.signatures[0].primary_fingerprint

    def integrity(self) -> str | None:
        """The protection of every encrypted packet ("mdc" or "aead"), None if one had none."""
        if not self.protection:
            return None
        if all(mdc != 0 for mdc, _ in self.protection):
            return "mdc"
        if all(mdc != 0 or aead != 0 for mdc, aead in self.protection):
            return "aead"
        return None


def parse_status(lines: Sequence[str]) -> GpgStatus:
    """Read gpg's ``[GNUPG:]`` lines (other lines are ignored)."""
    st = GpgStatus()
    for line in lines:
        if not line.startswith(_STATUS_PREFIX):
            continue
        word, _, rest = line[len(_STATUS_PREFIX) :].strip().partition(" ")
        args = rest.split()
        if word == "ENC_TO" and args:
            st.recipients.append(args[0].upper())
        elif word == "NO_SECKEY" and args:
            st.no_seckey.append(args[0].upper())
        elif word == "DECRYPTION_KEY":
            st.session_key = True
            if len(args) >= 2:
                st.decryption_key = (args[0].upper(), args[1].upper())
        elif word == "DECRYPTION_INFO":
            st.session_key = True
            st.protection.append((_int(args, 0), _int(args, 2)))
        elif word == "DECRYPTION_OKAY":
            st.okay = True
        elif word == "DECRYPTION_FAILED":
            st.failed = True
        elif word == "BADMDC":
            st.bad_mdc = True
        elif word == "NODATA":
            st.no_data = True
        elif word in ("NEED_PASSPHRASE", "NEED_PASSPHRASE_SYM", "INQUIRE_MAXLEN"):
            st.need_passphrase = True
        elif word == "MISSING_PASSPHRASE":
            st.missing_passphrase = True
        elif word == "BAD_PASSPHRASE":
            st.bad_passphrase = True
        elif word == "KEYEXPIRED":
            st.key_expired = True
        elif word == "KEYREVOKED":
            st.key_revoked = True
        elif word == "ERROR":
            st.errors.append(rest)
            if _int(args, 1) & _GPG_ERR_CODE_MASK == _GPG_ERR_BAD_PASSPHRASE:
                st.bad_passphrase = True
        elif word == "PLAINTEXT_LENGTH" and args and args[0].isdigit():
            st.plaintext_length = (st.plaintext_length or 0) + int(args[0])
        elif word == "NEWSIG":
            st.signatures.append(Signature())
        elif word in ("GOODSIG", "BADSIG", *_SIG_UNVERIFIABLE):
            sig = _current_signature(st)
            sig.verdict = word
            sig.key_id = args[0].upper() if args else ""
            if word == "ERRSIG" and len(args) >= 7:
                sig.issuer_fingerprint = args[6].upper()
        elif word == "VALIDSIG" and args:
            sig = _current_signature(st)
            sig.primary_fingerprint = (args[9] if len(args) >= 10 else args[0]).upper()
    return st


def _current_signature(st: GpgStatus) -> Signature:
    # gpg 2.2 starts every signature with NEWSIG; older versions did not.
    if not st.signatures:
        st.signatures.append(Signature())
    return st.signatures[-1]


def _int(args: list[str], index: int) -> int:
    try:
        return int(args[index])
    except (IndexError, ValueError):
        return 0


def failure_kind(
    st: GpgStatus, returncode: int | None, *, passphrase_given: bool, output_size: int | None
) -> FailureKind | None:
    """Why this decryption does not count, or None when gpg proved it (signatures aside)."""
    # A signature gpg could not accept makes it exit non-zero after a good decryption; the
    # signature policy decides about that. Any other non-zero exit is a failure.
    signature_trouble = any(not sig.good for sig in st.signatures)
    exit_ok = returncode == 0 or (returncode in (1, 2) and signature_trouble and not st.errors)
    if not (st.okay and exit_ok and not st.failed and not st.bad_mdc):
        return _cause(st, passphrase_given=passphrase_given)
    if not st.recipients:
        return "corrupt"  # decrypted, but not a message encrypted to a public key
    if st.integrity() is None:
        return "no_integrity"
    if output_size is None or (
        st.plaintext_length is not None and output_size != st.plaintext_length
    ):
        return "no_output"
    return None


def _cause(st: GpgStatus, *, passphrase_given: bool) -> FailureKind:
    """The reason gpg failed, most specific first."""
    if st.missing_passphrase or (st.need_passphrase and not passphrase_given):
        return "no_passphrase"
    if st.bad_passphrase:
        return "bad_passphrase"
    if st.no_seckey and not st.session_key:
        return "no_secret_key"
    if st.protection and st.integrity() is None:
        return "no_integrity"  # gpg 2.2 itself fails such a message with DECRYPTION_FAILED
    if any(sig.verdict == "BADSIG" for sig in st.signatures):
        return "bad_signature"  # gpg 2.2 stops at a bad signature, before the MDC is checked
    # gpg 2.2.40 decrypts with an expired or revoked key; these are for a gpg that refuses.
    if st.key_revoked and not st.session_key:
        return "key_revoked"
    if st.key_expired and not st.session_key:
        return "key_expired"
    if st.no_data or st.bad_mdc or st.failed or not st.recipients:
        return "corrupt"
    return "gpg_error"


@dataclass(frozen=True)
class UnusableKey:
    """Our key that decrypted a file but can no longer receive new ones."""

    kind: Literal["key_expired", "key_revoked"]
    fingerprint: str  # the primary key's
    subkey: str | None  # the decrypting subkey's fingerprint when that is the unusable part
    since: datetime | None  # when it expired; gpg's listing gives no revocation date

    def describe(self) -> str:
        if self.subkey is None:
            return f"the PGP key {self.fingerprint}"
        return f"the encryption subkey {self.subkey} of the PGP key {self.fingerprint}"


def unusable_key(
    record: Mapping[str, Any], used: str, now: datetime | None = None
) -> UnusableKey | None:
    """Whether the key ``record`` (python-gnupg's listing of one of our secret keys) may no
    longer be used because of its primary key or the (sub)key ``used`` that decrypted.

    A revocation wins over an expiry: an expired key can be extended, a revoked one cannot.
    Expiry is judged both by gpg's validity letter and by the date, so a key that expires
    after the listing was cached is still caught.
    """
    now = now or datetime.now(UTC)
    primary = str(record.get("fingerprint", "")).upper()
    parts: list[tuple[str | None, Mapping[str, Any]]] = [(None, record)]
    if used.upper() != primary:
        for sub in dict(record.get("subkey_info") or {}).values():
            if str(sub.get("fingerprint", "")).upper() == used.upper():
                parts.append((used.upper(), sub))
    for subkey, part in parts:
        if str(part.get("trust", "")) == _REVOKED:
            return UnusableKey("key_revoked", primary, subkey, None)
    for subkey, part in parts:
        expires = gpg_time(str(part.get("expires", "") or ""))
        if str(part.get("trust", "")) == _EXPIRED or (expires is not None and expires <= now):
            return UnusableKey("key_expired", primary, subkey, expires)
    return None


def unusable_key_hint(kind: str, home: Path, fingerprint: str | None, subkey: str | None) -> str:
    """What to do about our expired or revoked key, with commands for this GnuPG home.

    ``subkey`` is the encryption subkey that decrypted. It is named explicitly: gpg 2.2's
    ``--quick-set-expire FPR 2y '*'`` skips subkeys that have already expired.
    """
    if kind == "key_revoked":
        return (
            "A revoked key cannot be reinstated: make a new key pair with `ibkr-statements keys "
            "pgp --force`, send IBKR its public key (`ibkr-statements keys export`) and ask IBKR "
            "to deliver this file again. To read files already encrypted to the revoked key on "
            'purpose, see README.md, "Decrypting and the archive".'
        )
    gpg = f"gpg --homedir {home}"
    # gpg refused before saying which key: the user finds both in `gpg --list-secret-keys`.
    fpr = fingerprint or "FINGERPRINT"
    if fingerprint is None:
        subkey = "SUBKEY-FINGERPRINT"
    extend = f"Extend the key: {gpg} --quick-set-expire {fpr} 2y"
    if subkey is not None:
        extend = (
            f"Extend the key and its encryption subkey: {gpg} --quick-set-expire {fpr} 2y and "
            f"{gpg} --quick-set-expire {fpr} 2y {subkey}"
        )
    return (
        f"{extend}; then `ibkr-statements keys export` (it exports the renewed public key) "
        f"and send it to IBKR; {_RETRY}."
    )


@dataclass(frozen=True)
class _HeldKey:
    fingerprint: str
    subkey_ids: tuple[str, ...]

    def describe(self) -> str:
        if not self.subkey_ids:
            return self.fingerprint
        return f"{self.fingerprint} (subkey id {', '.join(self.subkey_ids)})"


class Decryptor:
    """Decrypts files with the secret key in ``home``; one instance serves a whole run."""

    def __init__(
        self,
        home: Path,
        *,
        passphrase: str | None,
        signer_fingerprints: tuple[str, ...] = (),
        gpg_binary: str = "gpg",
        lanes: int = 1,
        lane_folder: Path | None = None,
    ) -> None:
        """``lanes`` > 1 (with a ``lane_folder``) lets that many decryptions run at once, each
        with its own gpg-agent (see :mod:`statements.agentlanes`); :meth:`close` stops them."""
        if passphrase is not None:
            # python-gnupg would otherwise send an empty one as nothing, and gpg would read the
            # ciphertext's first line as the passphrase; a line break would end it early.
            check_passphrase(passphrase, "PGP key")
        signers = tuple(f.replace(" ", "").upper() for f in signer_fingerprints)
        for fpr in signers:
            if len(fpr) != 40 or any(ch not in "0123456789ABCDEF" for ch in fpr):
                raise KeyProblem(
                    f"{fpr!r} in [pgp] signer_fingerprints is not a 40-hex-digit fingerprint.",
                    "Copy the signer's primary key fingerprint from `gpg --fingerprint`.",
                )
        self.home = home.absolute()
        self.signer_fingerprints = signers
        self.gpg_binary = gpg_binary
        self._passphrase = passphrase
        self._gpg: Any = None
        self._lock = threading.Lock()
        # Handles not in use, each with its lane folder (None: the home itself); lanes are
        # made on demand, when every handle is busy, up to ``lanes`` in all.
        self._idle: list[tuple[Any, Path | None]] = []
        self._idle_ready = threading.Condition(self._lock)
        self._lanes_left = max(0, lanes - 1)
        # None: the home's folder under the temporary folder, set up with the first lane.
        self._lane_folder = lane_folder.absolute() if lane_folder is not None else None
        self._own_lane_folder: Path | None = None
        self._lanes: list[Path] = []
        self._lanes_started = 0
        # Our secret keys by primary fingerprint, as last listed: one gpg call per run, not per
        # file. Listed again when a file names a key not in it.
        self._listing: dict[str, dict[str, Any]] | None = None

    def preflight(self) -> None:
        """Run-level checks, before any file: raise KeyProblem (exit 3) when none can succeed."""
        gpg = self._open()  # raises KeyProblem when the gpg binary is missing or too old
        if not self._held_keys():
            raise KeyProblem(
                f"The GnuPG home {self.home} holds no PGP secret key: no file can be decrypted.",
                "Create one with `ibkr-statements keys pgp` (and send IBKR the new public key) "
                "or restore a backup of the key pair.",
            )
        if self.signer_fingerprints:
            listing = gpg.list_keys(keys=list(self.signer_fingerprints))
            found = {str(f).upper() for f in listing.fingerprints}
            missing = [f for f in self.signer_fingerprints if f not in found]
            if missing:
                raise KeyProblem(
                    f"The public key of the signer {', '.join(missing)} named in [pgp] "
                    f"signer_fingerprints is not in the GnuPG home {self.home}: no signature "
                    "from it could be verified.",
                    f"Import it: gpg --homedir {self.home} --import SIGNER-KEY.asc "
                    "(or check that the fingerprint is the signer's primary key).",
                )

    def held_fingerprints(self) -> tuple[str, ...]:
        """Primary-key fingerprints of the secret keys in the home."""
        return tuple(key.fingerprint for key in self._held_keys())

    def decrypt(self, source: Path, output: Path) -> Decrypted:
        """Decrypt ``source`` into ``output`` (replaced atomically); raises DecryptFailed.

        Safe to call from several threads: each call takes a free gpg handle (a lane).
        """
        self._open()
        try:
            with source.open("rb"):  # gpg reads it; a clear error here if it cannot
                pass
        except OSError as exc:
            raise DecryptFailed(
                "gpg_error", f"Cannot read {source}: {exc.strerror}.", "Check the inbox folder."
            ) from None
        try:
            return self._decrypt_with(source, output, home_only=False)
        except DecryptFailed as exc:
            if not exc.in_lane:
                raise
            # A lane's refusal is checked by the home itself: a lane must never cost a file
            # that the home would have decrypted (say, its agent died under it).
            log.info("retrying %s in the GnuPG home itself: %s", source.name, exc.message)
        return self._decrypt_with(source, output, home_only=True)

    def close(self) -> None:
        """Stop the lanes' gpg-agents and delete the lanes; the decryptor stays usable."""
        with self._lock:
            lanes, self._lanes = self._lanes, []
            self._idle = [(gpg, lane) for gpg, lane in self._idle if lane is None]
            own, self._own_lane_folder = self._own_lane_folder, None
        for lane in lanes:
            remove_lane(lane, self.gpg_binary)
        if own is not None:
            clear_lanes(own, self.gpg_binary)

    def __enter__(self) -> Decryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self, *, home_only: bool = False) -> tuple[Any, Path | None]:
        with self._idle_ready:
            while True:
                for index, (_, idle_lane) in enumerate(self._idle):
                    if idle_lane is None or not home_only:
                        return self._idle.pop(index)
                if not home_only and self._lanes_left > 0:
                    self._lanes_left -= 1
                    self._lanes_started += 1
                    number = self._lanes_started
                    break
                self._idle_ready.wait()
        folder = self._lanes_folder()
        if folder is None:
            with self._idle_ready:
                self._lanes_left = 0
            return self._take()
        lane = folder / str(number)
        made = make_lane(self.home, lane, self.gpg_binary, set(self._listed_keys()))
        with self._idle_ready:
            if made is None:
                self._lanes_left = 0  # one failed: the others would fail alike
            else:
                self._lanes.append(lane)
                return made, lane
        return self._take()

    def _lanes_folder(self) -> Path | None:
        if self._lane_folder is not None:
            return self._lane_folder
        with self._lock:
            if self._own_lane_folder is None:
                self._own_lane_folder = lanes_folder(self.home, self.gpg_binary)
            return self._own_lane_folder

    def _give_back(self, gpg: Any, lane: Path | None) -> None:
        with self._idle_ready:
            self._idle.append((gpg, lane))
            # All: a waiter that needs the home must not be the only one woken for a lane.
            self._idle_ready.notify_all()

    def _listed_keys(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            cached = self._listing
        return cached if cached is not None else self._list_secret_keys()

    def _decrypt_with(self, source: Path, output: Path, *, home_only: bool) -> Decrypted:
        try:
            # mkstemp makes the file 0600 (the plaintext is never readable by others) and opens
            # it for reading too: the plaintext is hashed back from it as gpg writes it.
            fd, tmp_name = tempfile.mkstemp(
                dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull.at(output.parent) from None
            raise DecryptFailed(
                "no_output",
                f"Cannot write the plaintext of {source.name} in {output.parent}: {exc.strerror}.",
                "Check that the folder exists, is writable and the disk is not full.",
            ) from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb", buffering=0) as sink:
                return self._decrypt(source, sink, tmp, output, home_only=home_only)
        finally:
            # Only a successful decryption renamed it; every failure leaves nothing behind.
            tmp.unlink(missing_ok=True)

    def _decrypt(
        self,
        source: Path,
        sink: io.FileIO,
        tmp: Path,
        output: Path,
        *,
        home_only: bool,
    ) -> Decrypted:
        # gpg reads the ciphertext file itself and writes the plaintext into ``tmp``, which this
        # process hashes as it grows, on the other core (python-gnupg's _handle_io would copy
        # the ciphertext through a pipe, about as slow as gpg's own decryption). Only the
        # passphrase goes to stdin. The path is absolute and after "--", so a name that starts
        # with "-" is never read as an option.
        args = [*_DECRYPT_ARGS, "--", str(source.absolute())]
        secret = self._secret()
        # The lane is held only while gpg runs: the checks, fsync and rename below leave its
        # agent free for the next file.
        gpg, lane = self._take(home_only=home_only)
        try:
            command = gpg.make_args(args, self._passphrase is not None)
            run = _run_gpg(command, gpg.env, secret, sink)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                # gpg decrypts fine; the disk is full, not the file broken. Nothing is
                # quarantined: the run stops and the file waits in the inbox.
                raise DiskFull.at(output.parent) from None
            raise DecryptFailed(
                "no_output",
                f"Cannot write the plaintext of {source.name} in {output.parent}: "
                f"{exc.strerror or exc}.",
                "Check free disk space and the permissions of the archive folder.",
            ) from None
        finally:
            self._give_back(gpg, lane)
        st, lines = self._verdict(source, run, in_lane=lane is not None)
        os.fsync(sink.fileno())
        forget_cached(sink.fileno())
        tmp.replace(output)
        fsync_dir(output.parent)
        return _decrypted(output, run, st, lines)

    def _verdict(
        self, source: Path, run: _GpgRun, *, in_lane: bool
    ) -> tuple[GpgStatus, tuple[str, ...]]:
        """What gpg's run proves, or DecryptFailed; ``source`` names the file in messages."""
        lines = self._status_lines(run.stderr)
        st = parse_status(lines)
        size = run.written if run.crash is None else None
        kind = failure_kind(
            st, run.returncode, passphrase_given=self._passphrase is not None, output_size=size
        )
        if kind is None and run.crash is not None:
            kind = "gpg_error"
        if kind is not None:
            failed = self._failure(kind, source, st, run.stderr, lines, run.crash, size)
            failed.in_lane = in_lane
            raise failed
        self._check_key(source, st, lines)
        self._check_signature(source, st, lines)
        return st, lines

    def start_early(self, name: str, folder: Path) -> EarlyDecryption | None:
        """Start decrypting a file while it is still arriving; None if gpg or its threads
        cannot start.

        The caller feeds it the file's bytes in order and then calls ``finish``; any doubt
        (gpg refused, stalled, the disk filled) makes ``finish`` return None, and the file is
        then decrypted from the inbox as usual, where a real failure gets its full report. It
        runs in the home itself, not a lane: the key operation is over within the first
        kilobytes, and a lane held for a whole download would sit idle.
        """
        gpg = self._open()
        command = gpg.make_args(list(_DECRYPT_ARGS), self._passphrase is not None)
        try:
            return EarlyDecryption(self, name, folder, command, gpg.env, self._secret())
        except OSError as exc:
            log.info("cannot decrypt %s while it downloads: %s", name, exc.strerror or exc)
            return None

    def _secret(self) -> bytes:
        return b"" if self._passphrase is None else f"{self._passphrase}\n".encode()

    def _check_key(self, source: Path, st: GpgStatus, lines: tuple[str, ...]) -> None:
        """Refuse a file decrypted with an expired or revoked key of ours (see the module doc)."""
        if st.decryption_key is None:
            return  # a gpg without DECRYPTION_KEY (before 2.1.x): nothing to judge by
        used, primary = st.decryption_key
        record = self._key_record(primary, used)
        if record is None:
            return  # gpg just used it, so this is a listing race; the decryption itself is proven
        bad = unusable_key(record, used)
        if bad is None:
            return
        if bad.kind == "key_revoked":
            why = (
                "which is revoked: IBKR must not encrypt new reports to it, and current "
                "OpenPGP software refuses to"
            )
        else:
            since = f" on {bad.since:%Y-%m-%d %H:%M} UTC" if bad.since else ""
            why = (
                f"which expired{since}: IBKR can no longer encrypt new reports to it, so "
                "deliveries stop without a word"
            )
        raise DecryptFailed(
            bad.kind,
            f"{source.name} is encrypted to {bad.describe()}, {why}. Its plaintext was not kept.",
            unusable_key_hint(bad.kind, self.home, primary, None if used == primary else used),
            status_lines=lines,
        )

    def _check_signature(self, source: Path, st: GpgStatus, lines: tuple[str, ...]) -> None:
        if not self.signer_fingerprints:
            return  # reported in Decrypted.signature, not required
        allowed = set(self.signer_fingerprints)
        if any(sig.good and sig.primary_fingerprint in allowed for sig in st.signatures) and all(
            sig.verdict != "BADSIG" for sig in st.signatures
        ):
            return
        wanted = ", ".join(self.signer_fingerprints)
        hint = (
            f"Make sure the file comes from IBKR; if IBKR changed its signing key, import the new "
            f"one (gpg --homedir {self.home} --import KEY.asc) and update [pgp] "
            f"signer_fingerprints, {_RETRY}."
        )
        bad = [sig for sig in st.signatures if sig.verdict == "BADSIG"]
        if bad:
            raise DecryptFailed(
                "bad_signature",
                f"The signature on {source.name} by {bad[0].who()} {_SIG_WHY['BADSIG']}.",
                "Do not use this file: ask IBKR to deliver it again.",
                status_lines=lines,
            )
        if not st.signatures:
            seen = "it is not signed"
        else:
            seen = "; ".join(
                f"it is signed by {sig.who()}"
                + ("" if sig.good else f", and that signature {_SIG_WHY.get(sig.verdict, '')}")
                for sig in st.signatures
            )
        raise DecryptFailed(
            "signature_required",
            f"{source.name} has no good signature from the required signer {wanted}: {seen}.",
            hint,
            status_lines=lines,
        )

    def _failure(
        self,
        kind: FailureKind,
        source: Path,
        st: GpgStatus,
        stderr: str,
        lines: tuple[str, ...],
        crash: str | None,
        size: int | None,
    ) -> DecryptFailed:
        name = source.name
        said = status_summary(stderr, self._passphrase)
        if crash:
            said = f"{said}; {crash}"
        message, hint = f"gpg could not decrypt {name}: {said}.", None
        if kind == "no_passphrase":
            message = f"{name} needs the passphrase of the PGP key, and none was given."
            hint = f"Set it in {_PASSPHRASE_PLACES}, {_RETRY}."
        elif kind == "bad_passphrase":
            message = f"The PGP passphrase is wrong for the key {name} is encrypted to."
            hint = (
                f"Give the passphrase chosen at `ibkr-statements keys pgp` in "
                f"{_PASSPHRASE_PLACES}, {_RETRY}."
            )
        elif kind == "no_secret_key":
            wanted = ", ".join(dict.fromkeys(st.no_seckey or st.recipients))
            held = "; ".join(key.describe() for key in self._held_keys_or_empty()) or "no key"
            message = (
                f"{name} was encrypted to key id {wanted}, which this project does not hold; "
                f"the GnuPG home {self.home} holds {held}."
            )
            hint = (
                "Send IBKR keys/pgp-public.asc again (`ibkr-statements keys export`), or restore "
                f"or import the matching secret key, {_RETRY}."
            )
        elif kind == "no_integrity":
            message = (
                f"{name} is not integrity-protected (no MDC or AEAD): it could have been altered "
                "on the way, so its plaintext was not kept."
            )
            hint = "Ask IBKR to deliver it again; current OpenPGP software always protects it."
        elif kind == "corrupt" and (st.no_data or st.bad_mdc or st.failed or st.recipients):
            message = f"{name} is damaged or not a PGP message: {said}."
            hint = (
                f"A download cut short looks like this: fetch it again, {_RETRY}; if it stays "
                "so, ask IBKR to deliver it again."
            )
        elif kind == "corrupt":
            # gpg "decrypted" it (a signed-only or password-encrypted file) but not with our key.
            message = (
                f"{name} is not encrypted to a public key (it is only signed, or encrypted with "
                "a password), so it is not accepted as a delivery."
            )
            hint = "IBKR encrypts every report to your PGP public key: ask IBKR where it came from."
        elif kind == "bad_signature":
            bad = next(sig for sig in st.signatures if sig.verdict == "BADSIG")
            message = f"The signature on {name} by {bad.who()} {_SIG_WHY['BADSIG']}."
            hint = "Do not use this file: ask IBKR to deliver it again."
        elif kind in ("key_expired", "key_revoked"):
            state = "expired" if kind == "key_expired" else "revoked"
            message = f"gpg refused to decrypt {name}: the PGP key it is encrypted to is {state}."
            ours = self._held_keys_or_empty()
            hint = unusable_key_hint(
                kind, self.home, ours[0].fingerprint if len(ours) == 1 else None, None
            )
        elif kind == "no_output":
            expected = "" if st.plaintext_length is None else f" of {st.plaintext_length} bytes"
            found = "none" if size is None else f"{size} bytes"
            message = (
                f"gpg reported {name} decrypted but the plaintext{expected} is not there "
                f"(found {found})."
            )
            hint = "Check free disk space and the permissions of the archive folder."
        return DecryptFailed(kind, message, hint, status_lines=lines)

    def _status_lines(self, stderr: str) -> tuple[str, ...]:
        lines = []
        for raw in stderr.splitlines():
            line = raw.rstrip()
            if not line.startswith(_STATUS_PREFIX):
                continue
            if self._passphrase and self._passphrase in line:
                line = line.replace(self._passphrase, "***")  # gpg never echoes it; be sure
            lines.append(line)
        return tuple(lines)

    def _open(self) -> Any:
        with self._lock:
            if self._gpg is None:
                self._gpg = open_gnupg(self.home, self.gpg_binary)
                self._idle.append((self._gpg, None))
            return self._gpg

    def _held_keys(self) -> list[_HeldKey]:
        return [
            _HeldKey(
                fingerprint=fpr,
                subkey_ids=tuple(str(sub[0]).upper() for sub in raw.get("subkeys", ())),
            )
            for fpr, raw in self._list_secret_keys().items()
        ]

    def _list_secret_keys(self) -> dict[str, dict[str, Any]]:
        """List our secret keys now (and remember the listing for :meth:`_key_record`)."""
        listing = self._open().list_keys(secret=True)
        if listing.returncode not in (0, None):
            raise KeyProblem(
                f"gpg cannot list the secret keys in {self.home}: "
                f"{status_summary(listing.stderr)}.",
                f"Check the folder and its permissions: ls -la {self.home}",
            )
        found = {str(raw["fingerprint"]).upper(): dict(raw) for raw in listing}
        with self._lock:
            self._listing = found
        return found

    def _key_record(self, primary: str, used: str) -> dict[str, Any] | None:
        """Our secret key ``primary`` from the cached listing, listed again if the listing does
        not know it or its (sub)key ``used`` (a key imported or a subkey added since)."""
        with self._lock:
            cached = self._listing
        if cached is None or used not in _fingerprints_of(cached.get(primary)):
            cached = self._list_secret_keys()
        return cached.get(primary)

    def _held_keys_or_empty(self) -> list[_HeldKey]:
        # Only for a message: a listing failure must not hide the decryption failure.
        try:
            return self._held_keys()
        except StatementsError:
            return []


def _fingerprints_of(record: Mapping[str, Any] | None) -> set[str]:
    """The primary and subkey fingerprints in one listed key (none for no key)."""
    if record is None:
        return set()
    subkeys = dict(record.get("subkey_info") or {}).values()
    return {str(record.get("fingerprint", "")).upper()} | {
        str(sub.get("fingerprint", "")).upper() for sub in subkeys
    }


@dataclass(frozen=True)
class _GpgRun:
    returncode: int | None  # None when gpg could not be started
    stderr: str  # its status lines and messages
    crash: str | None  # why gpg could not be started
    written: int  # plaintext bytes written to the sink
    sha256: str  # of those bytes


# gpg writes the plaintext into the 0600 file this process made for it, as its stdout (stdin is
# the passphrase, or the ciphertext of an early decryption), and this process hashes the file as
# it grows (_follow_plaintext). Its stdout named as file descriptor 1 ("-&1"), not "-": gpg 2.2
# writes "-" 4 KiB at a time and a descriptor 8 KiB at a time, as it writes a named file. Every
# path given to gpg is absolute, so none reads as "-&N".
_DECRYPT_ARGS = (
    "--decrypt",
    "--enable-special-filenames",
    "--output",
    "-&1",
    "--trust-model",
    "always",  # a signature is judged against signer_fingerprints, not the web of trust
    "--no-auto-key-retrieve",  # an unknown signer must not make gpg go to the network
)
_PIPE_BYTES = 1 << 20  # a pipe that holds a few read replies of ciphertext for gpg
_F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
_FOLLOW_BYTES = 1 << 20  # read and hashed at a time from the growing plaintext
# Writeback steps left in flight while the follower goes on hashing: waiting for the step just
# queued would hold the hash (and so the end of the decryption) to the disk's pace.
_FOLLOW_WRITEBACK_BEHIND = 4
_FOLLOW_NAP_S = 0.002  # how often a follower looks for more; gpg writes ~0.8 MB in that time
# The nice value of an early decryption's follower (see EarlyDecryption._follow).
EARLY_FOLLOWER_NICE = 10
# Free bytes under which a failed gpg is taken to have filled the disk: gpg says so only in
# (translated) words, rc 2 after DECRYPTION_OKAY, and then at most a write's 8 KiB were left.
_FULL_DISK_BYTES = 1 << 16


def _run_gpg(
    command: Sequence[str], env: Mapping[str, str], secret: bytes, sink: io.FileIO
) -> _GpgRun:
    """Run gpg with its stdout into ``sink``, hashed as it grows; raise OSError when the file
    cannot be read back or written to disk, or ENOSPC when gpg failed and the disk is full.

    gpg is killed and reaped before an error leaves, so no gpg outlives a failed run.
    """
    digest = hashlib.sha256()
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=sink.fileno(),
            stderr=subprocess.PIPE,
            env=dict(env),
        )
    except (OSError, ValueError) as exc:
        return _GpgRun(None, "", str(exc), 0, digest.hexdigest())
    assert process.stdin is not None and process.stderr is not None
    errors: list[bytes] = []
    # Status lines are read on their own thread: a gpg blocked writing them must never stall
    # the decryption, nor the other way round.
    reader = threading.Thread(
        target=_read_all, args=(process.stderr, errors), name="gpg-stderr", daemon=True
    )
    try:
        reader.start()
        with contextlib.suppress(BrokenPipeError):  # gpg may refuse before reading it
            process.stdin.write(secret)
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        written = _follow_plaintext(sink.fileno(), process, digest)
    except BaseException:
        process.kill()
        raise
    finally:
        process.wait()
        if reader.ident is not None:  # None: it could not be started
            reader.join()
        else:
            process.stderr.close()
    if process.returncode != 0 and _disk_full(sink.fileno()):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    stderr = b"".join(errors).decode("utf-8", "replace")
    return _GpgRun(process.returncode, stderr, None, written, digest.hexdigest())


def _widen_pipe(fd: int) -> None:
    """Let the pipe hold _PIPE_BYTES: fewer, larger reads and writes; best effort."""
    if _F_SETPIPE_SZ is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)


def _follow_plaintext(fd: int, process: subprocess.Popen[bytes], digest: hashlib._Hash) -> int:
    """Hash the file ``fd`` (open for reading too) as gpg, ``process``, writes it, until gpg
    has exited and all of it is hashed; bytes hashed.

    gpg writing into the file itself, not into a pipe that this process copies into the file,
    spares a pipe's wake-up every 8 KiB: on these VMs, with a sleeping reader on the other
    core, that cost gpg more than the copy (1 GiB: gpg into a pipe read by `cat` 3.3-4.5 s,
    into a file 2.6-3.0 s). Writeback keeps the page cache to a few steps and has the disk
    written while gpg works, so the final fsync finds little left.
    """
    writeback = Writeback(fd, behind=_FOLLOW_WRITEBACK_BEHIND)
    buffer = bytearray(_FOLLOW_BYTES)
    view = memoryview(buffer)
    hashed = 0
    while True:
        exited = process.poll() is not None  # before the size: then that size is the last
        size = os.fstat(fd).st_size
        while hashed < size:
            count = os.preadv(fd, [view[: min(len(view), size - hashed)]], hashed)
            if not count:
                break  # made shorter under us: gpg's own writes never do that
            digest.update(view[:count])  # hashlib releases the GIL: this overlaps gpg's work
            hashed += count
            writeback.written(hashed)
        if exited:
            return hashed
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(_FOLLOW_NAP_S)  # returns within a millisecond of gpg's exit


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice``; best effort, Linux only.

    Linux keeps a nice value per thread, and setpriority(PRIO_PROCESS, tid) sets that thread's
    alone. Elsewhere the same call would name a process, so nothing is done there.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)


def _disk_full(fd: int) -> bool:
    """Whether the file system holding ``fd`` is full: a failed gpg then failed to write."""
    try:
        fs = os.fstatvfs(fd)
    except OSError:
        return False
    free = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail  # root may use the reserve
    return free * fs.f_frsize < _FULL_DISK_BYTES


def _decrypted(output: Path, run: _GpgRun, st: GpgStatus, lines: tuple[str, ...]) -> Decrypted:
    signature, signer = st.signature()
    return Decrypted(
        output=output,
        sha256=run.sha256,
        size=run.written,
        integrity=st.integrity() or "",
        recipients=tuple(dict.fromkeys(st.recipients)),
        signature=signature,
        signer_fingerprint=signer,
        status_lines=lines,
    )


class EarlyDecryption:
    """One gpg decrypting a file as its bytes arrive (see :meth:`Decryptor.start_early`).

    gpg reads the ciphertext from a pipe that :meth:`feed` fills, and the passphrase from a pipe
    of its own; it writes the plaintext into a 0600 temporary file in ``folder``, which a thread
    hashes as it grows. A feed that cannot go on (gpg exited, or read nothing for
    FEED_STALL_S) gives up on the early decryption and never on the download.
    """

    FEED_STALL_S = 30.0

    def __init__(
        self,
        decryptor: Decryptor,
        name: str,
        folder: Path,
        command: list[str],
        env: Mapping[str, str],
        secret: bytes,
    ) -> None:
        self._decryptor = decryptor
        self.name = name
        self.failed: str | None = None  # why the early decryption was given up
        self._digest = hashlib.sha256()
        self._written = 0
        self._follow_error: OSError | None = None
        self._errors: list[bytes] = []
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".early")
        self.output = Path(tmp)
        self._sink = os.fdopen(fd, "wb", buffering=0)  # mkstemp's fd reads too: it is followed
        opened: list[int] = []  # pipe ends this process must close whatever happens
        try:
            secret_read, secret_write = os.pipe()
            opened += [secret_read, secret_write]
            os.write(secret_write, secret)  # far below a pipe's capacity: never blocks
            if secret:  # gpg reads the passphrase from its own pipe: stdin is the ciphertext
                command = list(command)
                command[command.index("--passphrase-fd") + 1] = str(secret_read)
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=self._sink.fileno(),
                stderr=subprocess.PIPE,
                env=dict(env),
                pass_fds=(secret_read,),
            )
        except BaseException:
            self._discard()
            raise
        finally:
            for end in opened:
                os.close(end)
        assert self._process.stdin is not None and self._process.stderr is not None
        self._stdin = self._process.stdin.fileno()
        os.set_blocking(self._stdin, False)  # so that a stalled gpg cannot stall the download
        _widen_pipe(self._stdin)  # a read reply fits: fewer waits for gpg
        self._writable = select.poll()  # not select(): a busy process may have fds past 1024
        self._writable.register(self._stdin, select.POLLOUT)
        self._threads = [
            threading.Thread(target=self._follow, name="gpg-early", daemon=True),
            threading.Thread(
                target=_read_all,
                args=(self._process.stderr, self._errors),
                name="gpg-early-stderr",
                daemon=True,
            ),
        ]
        started = 0
        try:
            for thread in self._threads:
                thread.start()
                started += 1
        except RuntimeError as exc:  # no thread can be started: give up before the first byte
            self._threads = self._threads[:started]
            self.abandon()
            self._process.stderr.close()  # its reader, if it ran, is joined
            raise OSError(errno.EAGAIN, f"cannot start a thread: {exc}") from exc

    def feed(self, data: bytes | memoryview) -> None:
        """Hand gpg the next bytes of the file; gives up (and returns) rather than stall."""
        if self.failed is not None:
            return
        view = memoryview(data)
        deadline: float | None = None
        while view:
            try:
                view = view[os.write(self._stdin, view) :]
                deadline = None
                continue
            except BlockingIOError:
                pass
            except OSError as exc:  # EPIPE: gpg stopped reading (refused the file, or died)
                self._give_up(f"gpg stopped reading: {exc.strerror or exc}")
                return
            now = time.monotonic()
            deadline = deadline or now + self.FEED_STALL_S
            if now >= deadline:
                self._give_up(f"gpg read nothing for {self.FEED_STALL_S:g} s")
                return
            self._writable.poll(min(1000, int((deadline - now) * 1000) + 1))

    def finish(self, source: Path) -> Decrypted | None:
        """End of the file: gpg's verdict on it, as :meth:`Decryptor.decrypt` would give, or
        None (logged) when the file must be decrypted from ``source`` the usual way."""
        self._close_stdin()
        try:
            self._process.wait(timeout=self.FEED_STALL_S)
        except subprocess.TimeoutExpired:
            self._give_up(f"gpg did not finish within {self.FEED_STALL_S:g} s of the last byte")
        self._reap()
        if self.failed is None and self._follow_error is not None:
            error = self._follow_error
            self.failed = f"cannot write its plaintext: {error.strerror or error}"
        if self.failed is not None:
            self._fall_back()
            return None
        stderr = b"".join(self._errors).decode("utf-8", "replace")
        run = _GpgRun(
            self._process.returncode, stderr, None, self._written, self._digest.hexdigest()
        )
        try:
            st, lines = self._decryptor._verdict(source, run, in_lane=False)
            os.fsync(self._sink.fileno())
            forget_cached(self._sink.fileno())
        except (DecryptFailed, OSError) as exc:
            self.failed = exc.message if isinstance(exc, DecryptFailed) else str(exc)
            self._fall_back()
            return None
        self._sink.close()
        return _decrypted(self.output, run, st, lines)

    def abandon(self) -> None:
        """The download did not complete: stop gpg and delete what it wrote."""
        self._give_up("the download did not complete")
        self._reap()
        self._discard()

    def _follow(self) -> None:
        # In `run`, the server, the SSH transport, the .part writer and gpg form one chain
        # that keeps both cores of a small machine busy; hashing the plaintext is beside it
        # and may lag, so it yields to them and catches up in their gaps. bench/ big, `run`
        # of 1 GiB, two sets of 5 runs interleaved with the code before: medians 5.66 against
        # 6.10 s and 6.03 against 6.40 s.
        lower_thread_priority(EARLY_FOLLOWER_NICE)
        try:
            self._written = _follow_plaintext(self._sink.fileno(), self._process, self._digest)
        except OSError as exc:  # say the disk failed a writeback: gpg must not go on for it
            self._follow_error = exc
            self._process.kill()

    def _give_up(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
        self._process.kill()
        self._close_stdin()

    def _close_stdin(self) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(OSError):
            self._process.stdin.close()

    def _reap(self) -> None:
        self._process.wait()
        for thread in self._threads:
            thread.join()

    def _fall_back(self) -> None:
        log.info(
            "decrypting %s from the inbox: decrypting it while it downloaded failed (%s)",
            self.name,
            self.failed,
        )
        self._discard()

    def _discard(self) -> None:
        self._sink.close()
        self.output.unlink(missing_ok=True)


def _read_all(stream: IO[bytes], into: list[bytes]) -> None:
    into.append(stream.read())
