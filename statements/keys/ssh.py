"""SSH key pairs: generate, write, load and fingerprint, with `cryptography` only.

The private key is written in OpenSSH's own format (``-----BEGIN OPENSSH PRIVATE KEY-----``,
bcrypt-KDF + AES-256 when a passphrase is set): what ``ssh-keygen`` writes and paramiko reads.
The public key is the one-line ``ssh-rsa AAAA... comment`` form IBKR asks for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from statements.errors import KeyProblem, UsageError
from statements.fsutil import (
    PRIVATE_FILE,
    PUBLIC_FILE,
    atomic_write,
    ensure_private_dir,
    keep_copy_aside,
    utc_stamp,
)

SshPrivateKey: TypeAlias = (
    rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
)

MIN_RSA_BITS = 2048  # what IBKR documents; smaller keys are refused by modern OpenSSH anyway
MAX_RSA_BITS = 16384
_OPENSSH_MAGIC = b"openssh-key-v1\x00"


@dataclass(frozen=True)
class SshKeyFiles:
    private: Path
    public: Path
    public_line: str
    fingerprint: str
    kept_aside: tuple[Path, ...] = ()


def public_path_for(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def default_comment() -> str:
    return f"ibkr-statements@{socket.gethostname()}"


def generate_rsa(bits: int = 4096) -> rsa.RSAPrivateKey:
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise UsageError(
            f"An RSA key of {bits} bits is not accepted.",
            f"Use --bits between {MIN_RSA_BITS} (what IBKR documents) and {MAX_RSA_BITS}; "
            "4096 is the default.",
        )
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_line(key: SshPrivateKey, comment: str) -> str:
    """``ssh-rsa AAAA... comment``, as ``ssh-keygen -y`` and ``puttygen -L`` print it."""
    openssh = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = openssh.decode("ascii")
    return f"{line} {comment}" if comment else line


def fingerprint_of_blob(blob: bytes) -> str:
    """``SHA256:...`` exactly as ``ssh-keygen -lf`` prints it (base64 without padding)."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def parse_public_line(line: str) -> tuple[str, bytes, str]:
    """(key type, key blob, comment) of a one-line OpenSSH public key."""
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise KeyProblem(f"Not an OpenSSH public key line: {line[:40]!r}.")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise KeyProblem("The public key's base64 part is damaged.") from None
    (length,) = struct.unpack(">I", blob[:4]) if len(blob) >= 4 else (0,)
    if blob[4 : 4 + length].decode("ascii", "replace") != parts[0]:
        raise KeyProblem(f"The public key's type {parts[0]!r} does not match its contents.")
    return parts[0], blob, parts[2] if len(parts) > 2 else ""


def fingerprint_of_line(line: str) -> str:
    return fingerprint_of_blob(parse_public_line(line)[1])


def read_public_line(path: Path) -> str:
    try:
        return path.read_text("ascii").strip()
    except FileNotFoundError:
        raise KeyProblem(
            f"No SSH public key at {path}.",
            "Create a key pair with `ibkr-statements keys ssh` "
            "(or `keys import-ppk FILE` for a PuTTY key).",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyProblem(f"Cannot read the SSH public key {path}: {exc}.") from None


def private_key_bytes(key: SshPrivateKey, passphrase: str | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode("utf-8"))
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption
    )


def refuse_existing_pair(private: Path) -> None:
    for path in (private, public_path_for(private)):
        if path.exists():
            raise KeyProblem(
                f"An SSH key already exists at {path}.",
                "Keep using it, or pass --force to make a new pair: the old files are kept as "
                f"{private.name}.replaced-<time>, never deleted. IBKR knows only the old "
                "public key until you send them the new one.",
            )


def write_key_pair(
    key: SshPrivateKey,
    private: Path,
    *,
    passphrase: str | None,
    comment: str,
    force: bool = False,
) -> SshKeyFiles:
    """Write ``private`` (0600) and ``private.pub`` in a 0700 folder.

    An existing pair is refused unless ``force``; then it is kept beside as
    ``NAME.replaced-STAMP``, never deleted.
    """
    public = public_path_for(private)
    if not force:
        refuse_existing_pair(private)
    existing = [p for p in (private, public) if p.exists()]
    private_data = private_key_bytes(key, passphrase)
    line = public_line(key, comment)
    ensure_private_dir(private.parent)
    stamp = utc_stamp()
    kept = tuple(keep_copy_aside(p, stamp) for p in existing)
    atomic_write(private, private_data, PRIVATE_FILE)
    atomic_write(public, (line + "\n").encode("ascii"), PUBLIC_FILE)
    return SshKeyFiles(private, public, line, fingerprint_of_line(line), kept)


def load_private_key(path: Path, passphrase: str | None) -> SshPrivateKey:
    """Load an OpenSSH- or PEM-format RSA, Ed25519 or ECDSA private key.

    RSA keys are loaded without OpenSSL's full validation (see _SKIP_RSA_CHECK).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyProblem(
            f"No SSH private key at {path}.",
            "Create one with `ibkr-statements keys ssh`, import a PuTTY key with "
            "`keys import-ppk FILE`, or set [sftp] key_file.",
        ) from None
    except OSError as exc:
        raise KeyProblem(f"Cannot read the SSH private key {path}: {exc.strerror}.") from None
    secret = passphrase.encode("utf-8") if passphrase else None
    try:
        loaded: object = _load(data, secret)
    except TypeError:
        # cryptography raises TypeError for "encrypted but no password" and the reverse.
        if secret is None:
            raise KeyProblem(
                f"The SSH private key {path} is protected by a passphrase, and none was given.",
                "Set the passphrase in IBKR_SSH_PASSPHRASE (or the variable named by "
                "[sftp] key_passphrase_env), or in the file named by key_passphrase_file.",
            ) from None
        loaded = _load_unencrypted(data)
    except ValueError:
        if secret is not None and _is_encrypted(data):
            raise KeyProblem(
                f"Wrong passphrase for the SSH private key {path}.",
                "Check IBKR_SSH_PASSPHRASE (or key_passphrase_file).",
            ) from None
        raise KeyProblem(
            f"{path} is not a private key this tool can read.",
            "Use an OpenSSH or PEM private key (RSA, ed25519 or ECDSA); convert a PuTTY "
            "key with `ibkr-statements keys import-ppk FILE`.",
        ) from None
    except UnsupportedAlgorithm:
        raise KeyProblem(f"{path} uses a key type this tool does not support.") from None
    if not isinstance(
        loaded, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    ):
        raise KeyProblem(f"{path} holds a {type(loaded).__name__}; use RSA, ed25519 or ECDSA.")
    if isinstance(loaded, rsa.RSAPrivateKey) and not rsa_numbers_fit(loaded):
        raise KeyProblem(
            f"The SSH private key {path} is damaged: its RSA numbers do not fit together.",
            "Restore it from your backup (`ibkr-statements keys restore FILE`), or make a new "
            "pair and send IBKR its public key: ibkr-statements keys ssh --force.",
        )
    return loaded


# cryptography's full check of an RSA private key (OpenSSL's RSA_check_key) proves p and q
# prime: a quarter to half a second of every run's start for RSA-4096, twice the passphrase's
# bcrypt KDF. The check guards against keys from someone else. This is the user's own key, in
# a file only they can read (load_login_key refuses it otherwise), which they could replace
# with any key anyway, and IBKR's server checks every signature against its public half:
# OpenSSH uses the same file without that check. What a damaged file would break is caught
# cheaply instead: cryptography still checks p*q == n, and rsa_numbers_fit the rest.
_SKIP_RSA_CHECK = True


def _load(data: bytes, secret: bytes | None) -> object:
    if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
        return serialization.load_ssh_private_key(
            data, secret, unsafe_skip_rsa_key_validation=_SKIP_RSA_CHECK
        )
    return serialization.load_pem_private_key(
        data, secret, unsafe_skip_rsa_key_validation=_SKIP_RSA_CHECK
    )


def _load_unencrypted(data: bytes) -> object:
    return _load(data, None)


def rsa_numbers_fit(key: rsa.RSAPrivateKey) -> bool:
    """RSA_check_key's arithmetic, microseconds, without its primality tests (its cost).

    Signing uses d mod (p-1), d mod (q-1) and q's inverse mod p (CRT): a damaged one makes
    signatures the server refuses, blamed on the wrong key.
    """
    numbers = key.private_numbers()
    p, q, d = numbers.p, numbers.q, numbers.d
    e, n = numbers.public_numbers.e, numbers.public_numbers.n
    return (
        p > 2
        and q > 2
        and p * q == n
        and e > 1
        and (d * e) % (p - 1) == 1
        and (d * e) % (q - 1) == 1
        and numbers.dmp1 == d % (p - 1)
        and numbers.dmq1 == d % (q - 1)
        and 0 < numbers.iqmp < p
        and (numbers.iqmp * q) % p == 1
    )


def _is_encrypted(data: bytes) -> bool:
    if b"ENCRYPTED" in data[:200]:
        return True
    header = openssh_header(data)
    return header is not None and header[0] != "none"


def openssh_header(data: bytes) -> tuple[str, bytes] | None:
    """(cipher name, public key blob) from an OpenSSH private key file, without decrypting it.

    The format stores the public half in the clear, so a pair can be checked without the
    passphrase. None when ``data`` is not in that format or is damaged.
    """
    text = data.decode("ascii", "replace").strip().splitlines()
    if len(text) < 3 or text[0] != "-----BEGIN OPENSSH PRIVATE KEY-----":
        return None
    try:
        raw = base64.b64decode("".join(text[1:-1]), validate=True)
        if not raw.startswith(_OPENSSH_MAGIC):
            return None
        fields: list[bytes] = []
        offset = len(_OPENSSH_MAGIC)
        for _ in range(3):  # cipher name, kdf name, kdf options
            (length,) = struct.unpack_from(">I", raw, offset)
            fields.append(raw[offset + 4 : offset + 4 + length])
            offset += 4 + length
        offset += 4  # number of keys
        (length,) = struct.unpack_from(">I", raw, offset)
        blob = raw[offset + 4 : offset + 4 + length]
    except (binascii.Error, struct.error):
        return None
    if len(blob) != length:
        return None
    return fields[0].decode("ascii", "replace"), blob
