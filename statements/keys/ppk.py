"""Read PuTTY private key files (``.ppk``, format versions 2 and 3).

IBKR's set-up guide has users make their key pair with PuTTYgen, which saves the private half as a
``.ppk`` file that neither paramiko nor any working PyPI package can read. This reader follows the
format as PuTTY's manual documents it (appendix C, "PPK file format") and hands back a
``cryptography`` private key.

Trust order: the outer text is parsed and bounded first, then the private blob is decrypted and
its MAC checked, and only then are private fields read; finally the private key is checked
against the public blob, because the MAC of an unencrypted file has a known key and so proves
nothing against someone who edits the file. For any input bytes, the only exception that leaves
this module is :class:`~statements.errors.KeyProblem`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

from argon2.exceptions import HashingError
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from statements.errors import KeyProblem

# A 16384-bit RSA key makes a PPK file of about 12 KiB; anything far larger is not a key file.
MAX_FILE_BYTES = 256 * 1024
# PuTTYgen's defaults are 8 MiB, about 100 ms of passes and 1 lane; these bounds leave room for
# deliberate hardening while stopping a hostile file from making us allocate without limit.
MAX_ARGON2_MEMORY_KIB = 1024 * 1024
MAX_ARGON2_PASSES = 1000
MAX_ARGON2_PARALLELISM = 64
# OpenSSL refuses larger RSA moduli; checking first keeps big-number work on hostile input small.
MAX_RSA_BITS = 16384

_MAGIC = b"PuTTY-User-Key-File-"
_ED25519 = "ssh-ed25519"
_RSA = "ssh-rsa"
_ECDSA_CURVES: dict[str, tuple[bytes, ec.EllipticCurve]] = {
    "ecdsa-sha2-nistp256": (b"nistp256", ec.SECP256R1()),
    "ecdsa-sha2-nistp384": (b"nistp384", ec.SECP384R1()),
    "ecdsa-sha2-nistp521": (b"nistp521", ec.SECP521R1()),
}
SUPPORTED_ALGORITHMS = frozenset({_RSA, _ED25519, *_ECDSA_CURVES})
_ARGON2_FLAVOURS = {b"Argon2id": Type.ID, b"Argon2i": Type.I, b"Argon2d": Type.D}
_ENCRYPTIONS = (b"none", b"aes256-cbc")
_AES_BLOCK = 16

_HINT_DAMAGED = (
    "The file is damaged or incomplete. Use the copy PuTTYgen saved (transfer it as a binary "
    "file), or make a new key pair and send IBKR the new public key."
)
# PuTTYgen 0.78 refuses a plain format conversion as "no useful action"; --reencrypt forces it.
_HINT_RESAVE = (
    "Open the key in PuTTYgen 0.75 or later and save it again (PPK version 3), or run: "
    "puttygen KEY.ppk --reencrypt -o NEW.ppk"
)
_HINT_NEW_RSA = (
    "IBKR documents RSA 2048-bit keys: make a new pair with `puttygen -t rsa -b 2048 -o KEY.ppk` "
    "and send IBKR the public key."
)


@dataclass(frozen=True)
class PuttyKey:
    """A private key read from a ``.ppk`` file."""

    algorithm: str  # the SSH name from the file, e.g. "ssh-rsa", "ecdsa-sha2-nistp256"
    comment: str
    private_key: rsa.RSAPrivateKey | Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    version: int  # PPK format version: 2 or 3


@dataclass(frozen=True)
class _Argon2Params:
    flavour: Type
    memory_kib: int
    passes: int
    parallelism: int
    salt: bytes


@dataclass(frozen=True)
class _PpkFile:
    """The outer layer of a PPK file, checked for shape but not yet authenticated."""

    version: int
    algorithm: str
    encryption: bytes
    comment: bytes
    public_blob: bytes
    argon2: _Argon2Params | None  # present only for encrypted version 3 files
    private_data: bytes  # as stored: ciphertext when encrypted
    mac: bytes

    @property
    def encrypted(self) -> bool:
        return self.encryption != b"none"


def ppk_is_encrypted(data: bytes) -> bool:
    """Whether the ``.ppk`` file in ``data`` needs a passphrase.

    Checks the whole outer layer, so a damaged or unsupported file fails here (with
    :class:`KeyProblem`) before anyone is asked for a passphrase.
    """
    return _parse_outer(data).encrypted


def read_ppk(data: bytes, passphrase: str | None) -> PuttyKey:
    """The private key in the ``.ppk`` file ``data``; ``passphrase`` is ignored if unencrypted.

    Raises :class:`KeyProblem`, never anything else, for any file that is not a valid PPK v2 or
    v3 file holding an RSA, Ed25519 or NIST ECDSA key, or whose passphrase is missing or wrong.
    """
    ppk = _parse_outer(data)
    secret = b""
    if ppk.encrypted:
        if passphrase is None:
            raise KeyProblem(
                "The PuTTY key file is protected by a passphrase, and none was given.",
                "Set IBKR_PPK_PASSPHRASE, or run the command on a terminal to be asked for it.",
            )
        try:
            # surrogateescape gives back the exact bytes of a passphrase that came from a
            # non-UTF-8 environment variable.
            secret = passphrase.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise KeyProblem(
                "The passphrase for the PuTTY key file contains characters that cannot be "
                "encoded as UTF-8.",
                "Check how the passphrase is set (IBKR_PPK_PASSPHRASE or the terminal).",
            ) from None
    cipher_key, iv, mac_key = _derive_keys(ppk, secret)
    private_blob = _decrypt(ppk, cipher_key, iv)
    _check_mac(ppk, private_blob, mac_key)
    return PuttyKey(
        algorithm=ppk.algorithm,
        comment=ppk.comment.decode("utf-8", "replace"),
        private_key=_load_private_key(ppk.algorithm, ppk.public_blob, private_blob),
        version=ppk.version,
    )


# ---------------------------------------------------------------------------------------------
# Outer layer: text headers, base64 blobs, hex values.


def _malformed(detail: str) -> KeyProblem:
    return KeyProblem(f"The PuTTY key file is malformed: {detail}.", _HINT_DAMAGED)


def _shown(value: bytes) -> str:
    """A header value from the file, made safe and short enough to quote in a message."""
    return repr(value[:40].decode("ascii", "replace"))


class _Lines:
    """The file's lines in order, read the way PuTTY does: each header in its fixed place."""

    def __init__(self, data: bytes) -> None:
        # PuTTY writes LF but reads CR LF and bare CR as well; Windows copies often have CR LF.
        self._lines = re.split(rb"\r\n|\r|\n", data)
        self._next = 0

    def remaining(self) -> int:
        return len(self._lines) - self._next

    def line(self, what: str) -> bytes:
        if self._next >= len(self._lines):
            raise _malformed(f"it ends before the {what}")
        line = self._lines[self._next]
        self._next += 1
        return line

    def header(self, name: str) -> bytes:
        line = self.line(f"{name} line")
        key, colon, value = line.partition(b":")
        if not colon or key != name.encode():
            raise _malformed(f"line {self._next} should be the {name} line")
        # The separator is ": "; an editor may have trimmed the space after an empty value.
        return value.removeprefix(b" ")

    def count(self, name: str) -> int:
        count = _decimal(self.header(name), name, 1, MAX_FILE_BYTES)
        if count > self.remaining():
            raise _malformed(f"{name} says {count} lines, but the file ends sooner")
        return count

    def base64_blob(self, name: str) -> bytes:
        lines = [self.line(f"{name} data").strip(b" \t") for _ in range(self.count(name))]
        try:
            blob = base64.b64decode(b"".join(lines), validate=True)
        except binascii.Error:
            raise _malformed(f"the base64 data after {name} is invalid") from None
        if not blob:
            raise _malformed(f"the data after {name} is empty")
        return blob


def _decimal(value: bytes, name: str, low: int, high: int) -> int:
    # Bounding the digit count first keeps int() away from huge strings.
    if not re.fullmatch(rb"[0-9]{1,10}", value):
        raise _malformed(f"{name} is not a number")
    number = int(value)
    if not low <= number <= high:
        raise _malformed(f"{name} is {number}, outside {low} to {high}")
    return number


def _hex(value: bytes, name: str) -> bytes:
    if not re.fullmatch(rb"(?:[0-9a-fA-F]{2})+", value):
        raise _malformed(f"{name} is not a hexadecimal string")
    return bytes.fromhex(value.decode("ascii"))


def _parse_outer(data: bytes) -> _PpkFile:
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise KeyProblem("The PuTTY key file could not be read as bytes.")
    if len(data) > MAX_FILE_BYTES:
        raise KeyProblem(
            f"The file is too large ({len(data)} bytes) to be a PuTTY private key file (.ppk).",
            "Check that the configured key file is the .ppk file PuTTYgen saved.",
        )
    # Windows editors may add a UTF-8 byte order mark; it is not part of the format.
    lines = _Lines(data.removeprefix(b"\xef\xbb\xbf"))
    version, algorithm = _parse_first_line(lines.line("first line"), data)

    encryption = lines.header("Encryption")
    if encryption not in _ENCRYPTIONS:
        raise KeyProblem(
            f"The PuTTY key file uses the encryption {_shown(encryption)}, which is not supported "
            "(only aes256-cbc and none are).",
            _HINT_RESAVE,
        )
    comment = lines.header("Comment")
    public_blob = lines.base64_blob("Public-Lines")
    argon2 = _parse_argon2(lines) if version == 3 and encryption != b"none" else None
    private_data = lines.base64_blob("Private-Lines")
    if encryption != b"none" and len(private_data) % _AES_BLOCK:
        raise _malformed("the encrypted private data is not a whole number of AES blocks")
    mac = _hex(lines.header("Private-MAC"), "Private-MAC")
    mac_size = 20 if version == 2 else 32
    if len(mac) != mac_size:
        raise _malformed(f"Private-MAC should be {2 * mac_size} hex digits for version {version}")
    # Like PuTTY, ignore whatever follows the MAC line.
    return _PpkFile(version, algorithm, encryption, comment, public_blob, argon2, private_data, mac)


def _parse_first_line(line: bytes, data: bytes) -> tuple[int, str]:
    """The format version and key algorithm, or a KeyProblem naming what the file is instead."""
    key, colon, value = line.partition(b":")
    if not key.startswith(_MAGIC) or not colon:
        raise _not_ppk(data)
    version_text = key.removeprefix(_MAGIC)
    if not re.fullmatch(rb"[0-9]{1,4}", version_text):
        raise _not_ppk(data)
    version = int(version_text)
    if version not in (2, 3):
        newer = "a newer PuTTY than this program knows" if version > 3 else "an old PuTTY"
        raise KeyProblem(
            f"The PuTTY key file has format version {version}, written by {newer}; "
            "only versions 2 and 3 are supported.",
            _HINT_RESAVE,
        )
    name = value.removeprefix(b" ")
    algorithm = name.decode("ascii", "replace")
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise _unsupported_algorithm(name)
    return version, algorithm


def _not_ppk(data: bytes) -> KeyProblem:
    head = data.lstrip()[:200]
    if head.startswith(b"-----BEGIN") and b"PRIVATE KEY-----" in head:
        hint = (
            "It looks like an OpenSSH or PEM private key: use it as it is instead of importing "
            "it as a PuTTY key."
        )
    elif head.startswith((b"ssh-", b"ecdsa-", b"---- BEGIN SSH2 PUBLIC KEY")):
        hint = (
            "It looks like a public key. The private key is the .ppk file PuTTYgen saved with "
            '"Save private key", the one you keep rather than the one you sent IBKR.'
        )
    elif head.startswith(b"SSH PRIVATE KEY FILE FORMAT 1.1"):
        hint = "It is an SSH-1 key, which cannot be used for sFTP. " + _HINT_NEW_RSA
    else:
        hint = 'Choose the file PuTTYgen saved with "Save private key" (name ending in .ppk).'
    return KeyProblem("The file is not a PuTTY private key file (.ppk).", hint)


def _unsupported_algorithm(name: bytes) -> KeyProblem:
    text = name.decode("ascii", "replace")
    if text.endswith("-cert-v01@openssh.com"):
        hint = (
            "The key carries a certificate; save a copy without it: "
            "puttygen KEY.ppk --remove-certificate -o NEW.ppk"
        )
    else:
        hint = _HINT_NEW_RSA
    supported = ", ".join(sorted(SUPPORTED_ALGORITHMS))
    return KeyProblem(
        f"The PuTTY key file holds a {_shown(name)} key, which is not supported "
        f"(supported: {supported}).",
        hint,
    )


def _parse_argon2(lines: _Lines) -> _Argon2Params:
    flavour_name = lines.header("Key-Derivation")
    flavour = _ARGON2_FLAVOURS.get(flavour_name)
    if flavour is None:
        raise KeyProblem(
            f"The PuTTY key file uses the key derivation {_shown(flavour_name)}, which is not "
            "supported (only Argon2id, Argon2i and Argon2d are).",
            _HINT_RESAVE,
        )
    memory = _bounded_argon2(lines, "Argon2-Memory", 8, MAX_ARGON2_MEMORY_KIB)
    passes = _bounded_argon2(lines, "Argon2-Passes", 1, MAX_ARGON2_PASSES)
    parallelism = _bounded_argon2(lines, "Argon2-Parallelism", 1, MAX_ARGON2_PARALLELISM)
    if memory < 8 * parallelism:
        # Argon2 itself refuses this; say so in our words.
        raise _malformed("Argon2-Memory is less than 8 KiB per lane of Argon2-Parallelism")
    salt = _hex(lines.header("Argon2-Salt"), "Argon2-Salt")
    if not 8 <= len(salt) <= 1024:
        raise _malformed("Argon2-Salt should be 8 to 1024 bytes")
    return _Argon2Params(flavour, memory, passes, parallelism, salt)


def _bounded_argon2(lines: _Lines, name: str, low: int, high: int) -> int:
    value = lines.header(name)
    if re.fullmatch(rb"[0-9]{1,10}", value) and int(value) > high:
        raise KeyProblem(
            f"The PuTTY key file asks for {name} {int(value)}, above the limit of {high} this "
            "program accepts (PuTTYgen's default needs far less).",
            _HINT_RESAVE,
        )
    return _decimal(value, name, low, high)


# ---------------------------------------------------------------------------------------------
# Key derivation, decryption and the MAC.


def _derive_keys(ppk: _PpkFile, secret: bytes) -> tuple[bytes, bytes, bytes]:
    """The AES key, the IV and the MAC key (appendix C.4; C.5.1 for version 2)."""
    if ppk.version == 2:
        # Version 2 uses the empty passphrase for the MAC key of an unencrypted file.
        cipher_key = (_sha1(b"\0\0\0\0" + secret) + _sha1(b"\0\0\0\1" + secret))[:32]
        mac_key = _sha1(b"putty-private-key-file-mac-key" + secret)
        return cipher_key, bytes(_AES_BLOCK), mac_key
    if ppk.argon2 is None:  # unencrypted version 3: every piece of key material is empty
        return b"", b"", b""
    params = ppk.argon2
    try:
        material = hash_secret_raw(
            secret=secret,
            salt=params.salt,
            time_cost=params.passes,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=32 + _AES_BLOCK + 32,
            type=params.flavour,
            version=0x13,
        )
    except (HashingError, MemoryError):
        raise KeyProblem(
            "The passphrase of the PuTTY key file could not be processed with the file's "
            "Argon2 settings.",
            _HINT_RESAVE,
        ) from None
    return material[:32], material[32:48], material[48:]


def _sha1(data: bytes) -> bytes:
    # SHA-1 is what PPK version 2 prescribes; reading old files needs it.
    return hashlib.sha1(data).digest()  # noqa: S324


def _decrypt(ppk: _PpkFile, cipher_key: bytes, iv: bytes) -> bytes:
    if not ppk.encrypted:
        return ppk.private_data
    # The padding is PuTTY's own (random or hash bytes), not PKCS#7: decrypt the raw blocks.
    decryptor = Cipher(algorithms.AES256(cipher_key), modes.CBC(iv)).decryptor()
    return decryptor.update(ppk.private_data) + decryptor.finalize()


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _check_mac(ppk: _PpkFile, private_blob: bytes, mac_key: bytes) -> None:
    mac_input = b"".join(
        _string(part)
        for part in (
            ppk.algorithm.encode("ascii"),
            ppk.encryption,
            ppk.comment,
            ppk.public_blob,
            private_blob,
        )
    )
    digest = hashlib.sha1 if ppk.version == 2 else hashlib.sha256
    expected = hmac.new(mac_key, mac_input, digest).digest()
    if hmac.compare_digest(expected, ppk.mac):
        return
    if ppk.encrypted:
        raise KeyProblem(
            "Cannot open the PuTTY key file: wrong passphrase, or the file was modified.",
            "Check the passphrase (the one typed into PuTTYgen when the key was saved). If it is "
            "right, the file changed after PuTTYgen saved it: use an unmodified copy.",
        )
    raise KeyProblem(
        "The PuTTY key file was modified or is corrupt: its MAC does not match its contents.",
        _HINT_DAMAGED,
    )


# ---------------------------------------------------------------------------------------------
# Blobs: SSH wire encoding (RFC 4251 section 5) and the private key layouts of appendix C.3.


class _Reader:
    """Reads SSH wire values from a blob; running off the end is a KeyProblem."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    def string(self) -> bytes:
        end = self._offset + 4
        if end > len(self._data):
            raise _malformed(f"the {self._what} is cut short")
        length = int.from_bytes(self._data[self._offset : end], "big")
        if length > len(self._data) - end:
            raise _malformed(f"the {self._what} is cut short")
        self._offset = end + length
        return self._data[end : self._offset]

    def mpint(self) -> int:
        value = self.string()
        if value and value[0] & 0x80:
            raise _malformed(f"the {self._what} holds a negative number")
        return int.from_bytes(value, "big")

    def end(self) -> None:
        if self._offset != len(self._data):
            raise _malformed(f"the {self._what} has unexpected data at its end")


def _mismatch(detail: str) -> KeyProblem:
    return KeyProblem(
        f"The private key in the PuTTY key file does not match its public key ({detail}).",
        _HINT_DAMAGED,
    )


def _load_private_key(
    algorithm: str, public_blob: bytes, private_blob: bytes
) -> rsa.RSAPrivateKey | Ed25519PrivateKey | ec.EllipticCurvePrivateKey:
    public = _Reader(public_blob, "public key")
    if public.string() != algorithm.encode("ascii"):
        raise _malformed(f"the public key inside is not an {algorithm} key")
    # Trailing bytes of the private blob are padding (appendix C.2), so it has no end() check.
    private = _Reader(private_blob, "private key")
    if algorithm == _RSA:
        return _load_rsa(public, private)
    if algorithm == _ED25519:
        return _load_ed25519(public, private)
    return _load_ecdsa(algorithm, public, private)


def _load_rsa(public: _Reader, private: _Reader) -> rsa.RSAPrivateKey:
    e = public.mpint()
    n = public.mpint()
    public.end()
    d, p, q, iqmp = private.mpint(), private.mpint(), private.mpint(), private.mpint()
    if n.bit_length() > MAX_RSA_BITS:
        raise KeyProblem(
            f"The RSA key in the PuTTY key file has {n.bit_length()} bits; at most "
            f"{MAX_RSA_BITS} are supported.",
            _HINT_NEW_RSA,
        )
    # The bit-length test keeps a hostile file from making us multiply huge numbers.
    if not (p > 1 and q > 1 and p.bit_length() + q.bit_length() <= n.bit_length() + 1):
        raise _mismatch("p times q is not the modulus")
    if p * q != n:
        raise _mismatch("p times q is not the modulus")
    try:
        if iqmp != rsa.rsa_crt_iqmp(p, q):
            raise _mismatch("the stored q^-1 mod p is wrong")
        numbers = rsa.RSAPrivateNumbers(
            p=p,
            q=q,
            d=d,
            dmp1=rsa.rsa_crt_dmp1(d, p),
            dmq1=rsa.rsa_crt_dmq1(d, q),
            iqmp=iqmp,
            public_numbers=rsa.RSAPublicNumbers(e=e, n=n),
        )
        # Validation (on by default) has OpenSSL confirm that d inverts e and p, q are prime.
        return numbers.private_key()
    except ValueError:
        raise _mismatch("OpenSSL rejects the RSA numbers") from None


def _load_ed25519(public: _Reader, private: _Reader) -> Ed25519PrivateKey:
    point = public.string()
    public.end()
    if len(point) != 32:
        raise _malformed("the Ed25519 public key is not 32 bytes")
    # The manual calls this an mpint, but PuTTY writes the 32-byte RFC 8032 secret as a string,
    # read as a little-endian number; shorter or zero-extended forms encode the same secret.
    secret = int.from_bytes(private.string(), "little")
    if secret.bit_length() > 256:
        raise _malformed("the Ed25519 private key is longer than 32 bytes")
    key = Ed25519PrivateKey.from_private_bytes(secret.to_bytes(32, "little"))
    if key.public_key().public_bytes_raw() != point:
        raise _mismatch("the Ed25519 secret does not give the stored public point")
    return key


def _load_ecdsa(algorithm: str, public: _Reader, private: _Reader) -> ec.EllipticCurvePrivateKey:
    curve_name, curve = _ECDSA_CURVES[algorithm]
    if public.string() != curve_name:
        raise _malformed(f"the public key does not name the curve {curve_name.decode()}")
    point = public.string()
    public.end()
    scalar = private.mpint()
    if scalar <= 0 or scalar.bit_length() > curve.key_size:
        raise _mismatch("the ECDSA private value is out of range")
    try:
        key = ec.derive_private_key(scalar, curve)
    except ValueError:
        raise _mismatch("the ECDSA private value is out of range") from None
    # Comparing encodings also refuses compressed points, which PuTTY and OpenSSH never write.
    derived = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    if derived != point:
        raise _mismatch("the ECDSA private value does not give the stored public point")
    return key
