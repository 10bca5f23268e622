"""The .ppk reader against files made by the real PuTTYgen, tampered copies, and fuzzed bytes.

PuTTYgen (Debian package putty-tools) is the reference: every key we read must give exactly the
OpenSSH public line ``puttygen -L`` prints. Hand-built files (no PuTTYgen) cover what PuTTYgen
never writes: hostile parameters and private halves that do not match their public key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from statements.errors import ExitCode, KeyProblem
from statements.keys.ppk import PuttyKey, ppk_is_encrypted, read_ppk

# Non-ASCII on purpose: PuTTYgen hashes the passphrase's bytes, and we must encode it as UTF-8.
PASSPHRASE = "correct horse \u2603 battery"
# Argon2 settings far below PuTTYgen's defaults keep the suite fast; one sample uses the defaults.
CHEAP_ARGON2 = "memory=64,passes=1"

KEY_TYPES = {
    "rsa": ["-t", "rsa", "-b", "2048"],
    "ed25519": ["-t", "ed25519"],
    "p256": ["-t", "ecdsa", "-b", "256"],
    "p384": ["-t", "ecdsa", "-b", "384"],
    "p521": ["-t", "ecdsa", "-b", "521"],
}
ALGORITHMS = {
    "rsa": "ssh-rsa",
    "ed25519": "ssh-ed25519",
    "p256": "ecdsa-sha2-nistp256",
    "p384": "ecdsa-sha2-nistp384",
    "p521": "ecdsa-sha2-nistp521",
}
KEY_CLASSES: dict[str, type] = {
    "rsa": rsa.RSAPrivateKey,
    "ed25519": Ed25519PrivateKey,
    "p256": ec.EllipticCurvePrivateKey,
    "p384": ec.EllipticCurvePrivateKey,
    "p521": ec.EllipticCurvePrivateKey,
}
# Sample name -> (key type, PPK version, encrypted, extra --ppk-param for encrypted v3 files).
SAMPLES: dict[str, tuple[str, int, bool, str]] = {}
for _kind in KEY_TYPES:
    SAMPLES[f"{_kind}-v3"] = (_kind, 3, False, "")
    SAMPLES[f"{_kind}-v3-enc"] = (_kind, 3, True, CHEAP_ARGON2)
    SAMPLES[f"{_kind}-v2"] = (_kind, 2, False, "")
    SAMPLES[f"{_kind}-v2-enc"] = (_kind, 2, True, "")
# What IBKR's guide produces with PuTTYgen 0.75+: RSA, PPK 3, default Argon2id settings.
SAMPLES["rsa-v3-enc-default"] = ("rsa", 3, True, "")
SAMPLES["ed25519-v3-enc-argon2i"] = ("ed25519", 3, True, CHEAP_ARGON2 + ",kdf=argon2i")
SAMPLES["ed25519-v3-enc-argon2d"] = ("ed25519", 3, True, CHEAP_ARGON2 + ",kdf=argon2d")


@dataclass(frozen=True)
class Sample:
    path: Path
    kind: str
    version: int
    encrypted: bool

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    @property
    def passphrase(self) -> str | None:
        return PASSPHRASE if self.encrypted else None


@dataclass(frozen=True)
class Puttygen:
    directory: Path
    passphrase_file: Path
    empty_file: Path

    def run(self, *args: str | Path) -> str:
        # stdin is closed so a missing passphrase option fails instead of waiting on a prompt.
        done = subprocess.run(
            ["puttygen", *map(str, args)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise AssertionError(f"puttygen {args} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode("utf-8")

    def public_line(self, path: Path, encrypted: bool) -> str:
        extra: list[str | Path] = ["--old-passphrase", self.passphrase_file] if encrypted else []
        return self.run("-L", path, *extra).strip()


@pytest.fixture(scope="session")
def puttygen(tmp_path_factory: pytest.TempPathFactory) -> Puttygen:
    if shutil.which("puttygen") is None:
        pytest.fail(
            "puttygen is not installed; these tests need the real PuTTYgen "
            "(Debian/Ubuntu: apt-get install putty-tools)."
        )
    directory = tmp_path_factory.mktemp("ppk")
    passphrase_file = directory / "passphrase"
    passphrase_file.write_bytes(PASSPHRASE.encode("utf-8"))
    empty_file = directory / "empty"
    empty_file.write_bytes(b"")
    return Puttygen(directory, passphrase_file, empty_file)


@pytest.fixture(scope="session")
def samples(puttygen: Puttygen) -> dict[str, Sample]:
    made: dict[str, Sample] = {}
    for kind, type_args in KEY_TYPES.items():
        base = puttygen.directory / f"{kind}-v3.ppk"
        comment = f"{kind}-key-20250101 cl\u00e9 test"
        puttygen.run(*type_args, "-C", comment, "-q", "--new-passphrase", puttygen.empty_file,
                     "-o", base)  # fmt: skip
    for name, (kind, version, encrypted, params) in SAMPLES.items():
        path = puttygen.directory / f"{name}.ppk"
        if not path.exists():
            ppk_params = ",".join(p for p in (f"version={version}", params) if p)
            secret = puttygen.passphrase_file if encrypted else puttygen.empty_file
            puttygen.run("-P", puttygen.directory / f"{kind}-v3.ppk", "-o", path,
                         "--new-passphrase", secret, "--ppk-param", ppk_params)  # fmt: skip
        made[name] = Sample(path, kind, version, encrypted)
    return made


def openssh_line(key: PuttyKey) -> str:
    public = key.private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{public.decode('ascii')} {key.comment}"


def problem(data: bytes, passphrase: str | None = None) -> KeyProblem:
    with pytest.raises(KeyProblem) as caught:
        read_ppk(data, passphrase)
    assert caught.value.exit_code == ExitCode.CONFIG
    assert caught.value.hint, "every KeyProblem should say what to do"
    return caught.value


# ---------------------------------------------------------------------------------------------
# Files PuTTYgen wrote.


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_reads_puttygen_key(name: str, samples: dict[str, Sample], puttygen: Puttygen) -> None:
    sample = samples[name]
    data = sample.data
    assert ppk_is_encrypted(data) is sample.encrypted
    key = read_ppk(data, sample.passphrase)
    assert key.version == sample.version
    assert key.algorithm == ALGORITHMS[sample.kind]
    assert isinstance(key.private_key, KEY_CLASSES[sample.kind])
    assert key.comment == f"{sample.kind}-key-20250101 cl\u00e9 test"
    assert openssh_line(key) == puttygen.public_line(sample.path, sample.encrypted)


@pytest.mark.integration
@pytest.mark.parametrize("kind", sorted(KEY_TYPES))
def test_private_half_equals_puttygen_openssh_export(
    kind: str, samples: dict[str, Sample], puttygen: Puttygen
) -> None:
    sample = samples[f"{kind}-v2-enc"]
    exported = puttygen.directory / f"{kind}.openssh"
    puttygen.run(sample.path, "--old-passphrase", puttygen.passphrase_file,
                 "--new-passphrase", puttygen.empty_file, "-O", "private-openssh-new",
                 "-o", exported)  # fmt: skip
    theirs = serialization.load_ssh_private_key(exported.read_bytes(), password=None)
    ours = read_ppk(sample.data, PASSPHRASE).private_key
    pkcs8 = (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8)
    no_encryption = serialization.NoEncryption()
    assert ours.private_bytes(*pkcs8, no_encryption) == theirs.private_bytes(*pkcs8, no_encryption)


@pytest.mark.integration
def test_passphrase_is_ignored_for_unencrypted_file(samples: dict[str, Sample]) -> None:
    assert read_ppk(samples["ed25519-v3"].data, "anything").algorithm == "ssh-ed25519"


@pytest.mark.integration
@pytest.mark.parametrize("name", ["rsa-v3-enc", "ed25519-v2-enc"])
def test_wrong_passphrase(name: str, samples: dict[str, Sample]) -> None:
    wrong = PASSPHRASE + "x"
    error = problem(samples[name].data, wrong)
    assert "wrong passphrase" in error.message
    assert wrong not in str(error) and PASSPHRASE not in str(error)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["rsa-v3-enc", "p256-v2-enc"])
def test_missing_passphrase(name: str, samples: dict[str, Sample]) -> None:
    error = problem(samples[name].data, None)
    assert "passphrase" in error.message
    assert error.hint is not None and "IBKR_PPK_PASSPHRASE" in error.hint


@pytest.mark.integration
@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
@pytest.mark.parametrize("name", ["rsa-v3", "p384-v2-enc"])
def test_windows_and_old_mac_line_endings(
    name: str, newline: bytes, samples: dict[str, Sample]
) -> None:
    sample = samples[name]
    expected = openssh_line(read_ppk(sample.data, sample.passphrase))
    converted = sample.data.replace(b"\n", newline)
    assert ppk_is_encrypted(converted) is sample.encrypted
    assert openssh_line(read_ppk(converted, sample.passphrase)) == expected
    with_bom = b"\xef\xbb\xbf" + converted
    assert openssh_line(read_ppk(with_bom, sample.passphrase)) == expected


@pytest.mark.integration
def test_ed448_is_refused_clearly(puttygen: Puttygen) -> None:
    path = puttygen.directory / "ed448.ppk"
    puttygen.run("-t", "ed448", "-q", "--new-passphrase", puttygen.empty_file, "-o", path)
    for call in (
        lambda: ppk_is_encrypted(path.read_bytes()),
        lambda: read_ppk(path.read_bytes(), None),
    ):
        with pytest.raises(KeyProblem, match="'ssh-ed448' key, which is not supported"):
            call()


@pytest.mark.integration
def test_resave_hint_is_a_working_puttygen_command(
    samples: dict[str, Sample], puttygen: Puttygen
) -> None:
    hint = problem(b"PuTTY-User-Key-File-1: ssh-rsa\n").hint
    assert hint is not None
    command = hint.split("run: ")[1].split()
    new = puttygen.directory / "resaved.ppk"
    arguments = [samples["p256-v2"].path if word == "KEY.ppk" else word for word in command[1:]]
    puttygen.run(*[new if word == "NEW.ppk" else word for word in arguments])
    assert read_ppk(new.read_bytes(), None).version == 3


# ---------------------------------------------------------------------------------------------
# Tampering: the MAC covers every field, the passphrase or not.


def _section_line(data: bytes, header: bytes, offset: int) -> int:
    """Index in ``data`` of the line ``offset`` lines after the line starting with ``header``."""
    lines = data.split(b"\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(header)) + offset
    return sum(len(line) + 1 for line in lines[:index])


def _swap_char(data: bytes, at: int, alphabet: bytes) -> bytes:
    old = data[at : at + 1]
    new = alphabet[(alphabet.index(old) + 1) % len(alphabet) :][:1]
    return data[:at] + new + data[at + 1 :]


BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
HEX = b"0123456789abcdef"
TAMPERINGS: dict[str, Callable[[bytes], bytes]] = {
    "private blob": lambda d: _swap_char(d, _section_line(d, b"Private-Lines:", 1) + 10, BASE64),
    "public blob": lambda d: _swap_char(d, _section_line(d, b"Public-Lines:", 1) + 30, BASE64),
    "mac": lambda d: _swap_char(d, _section_line(d, b"Private-MAC:", 0) + 20, HEX),
    "comment": lambda d: d.replace(b"Comment: ", b"Comment: x", 1),
    "encryption": lambda d: d.replace(b"Encryption: none", b"Encryption: aes256-cbc", 1),
}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "part"),
    [
        (name, part)
        for name in ("rsa-v3", "rsa-v3-enc", "ed25519-v2", "p521-v2-enc")
        for part in sorted(TAMPERINGS)
        if not (part == "encryption" and name.endswith("-enc"))
    ],
)
def test_one_changed_field_is_caught(name: str, part: str, samples: dict[str, Sample]) -> None:
    sample = samples[name]
    tampered = TAMPERINGS[part](sample.data)
    assert tampered != sample.data
    error = problem(tampered, PASSPHRASE)
    if part == "encryption":
        assert "malformed" in error.message  # now missing its Key-Derivation lines
    elif sample.encrypted:
        assert "wrong passphrase, or the file was modified" in error.message
    else:
        assert "modified or is corrupt" in error.message


@pytest.mark.integration
@pytest.mark.parametrize(("name", "step"), [("ed25519-v3", 1), ("p256-v2-enc", 1), ("rsa-v3", 7)])
def test_truncated_files(name: str, step: int, samples: dict[str, Sample]) -> None:
    data = samples[name].data
    assert data.endswith(b"\n")
    read_ppk(data[:-1], PASSPHRASE)  # only the final newline gone: still a whole file
    for cut in range(0, len(data) - 1, step):
        problem(data[:cut], PASSPHRASE)


# ---------------------------------------------------------------------------------------------
# Hand-built files: what PuTTYgen never writes.


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _mpint(value: int) -> bytes:
    return _string(value.to_bytes(value.bit_length() // 8 + 1, "big") if value else b"")


def _lines(blob: bytes) -> bytes:
    text = base64.b64encode(blob)
    chunks = [text[i : i + 64] for i in range(0, len(text), 64)]
    return b"%d\n" % len(chunks) + b"".join(chunk + b"\n" for chunk in chunks)


def build_v3_unencrypted(
    algorithm: bytes, public_blob: bytes, private_blob: bytes, comment: bytes = b"built"
) -> bytes:
    """An unencrypted PPK 3 file: its MAC key is empty, so anyone can write a valid one."""
    mac_input = b"".join(map(_string, (algorithm, b"none", comment, public_blob, private_blob)))
    mac = hmac.new(b"", mac_input, hashlib.sha256).hexdigest().encode()
    return (
        b"PuTTY-User-Key-File-3: " + algorithm + b"\nEncryption: none\nComment: " + comment
        + b"\nPublic-Lines: " + _lines(public_blob)
        + b"Private-Lines: " + _lines(private_blob)
        + b"Private-MAC: " + mac + b"\n"
    )  # fmt: skip


def ed25519_blobs(key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    public = key.public_key().public_bytes_raw()
    return _string(b"ssh-ed25519") + _string(public), _string(key.private_bytes_raw())


def rsa_blobs(key: rsa.RSAPrivateKey, iqmp: int | None = None) -> tuple[bytes, bytes]:
    numbers = key.private_numbers()
    public = _string(b"ssh-rsa") + _mpint(numbers.public_numbers.e)
    public += _mpint(numbers.public_numbers.n)
    private = b"".join(_mpint(v) for v in (numbers.d, numbers.p, numbers.q, iqmp or numbers.iqmp))
    return public, private


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_built_files_are_read(rsa_key: rsa.RSAPrivateKey) -> None:
    ed = Ed25519PrivateKey.generate()
    ed_read = read_ppk(build_v3_unencrypted(b"ssh-ed25519", *ed25519_blobs(ed)), None).private_key
    assert isinstance(ed_read, Ed25519PrivateKey)
    assert ed_read.private_bytes_raw() == ed.private_bytes_raw()
    rsa_read = read_ppk(build_v3_unencrypted(b"ssh-rsa", *rsa_blobs(rsa_key)), None).private_key
    assert isinstance(rsa_read, rsa.RSAPrivateKey)
    assert rsa_read.private_numbers() == rsa_key.private_numbers()


def test_private_half_of_another_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    public, _ = ed25519_blobs(Ed25519PrivateKey.generate())
    _, private = ed25519_blobs(Ed25519PrivateKey.generate())
    error = problem(build_v3_unencrypted(b"ssh-ed25519", public, private))
    assert "does not match its public key" in error.message

    public, _ = rsa_blobs(rsa_key)
    _, private = rsa_blobs(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert "does not match" in problem(build_v3_unencrypted(b"ssh-rsa", public, private)).message


def test_rsa_with_wrong_crt_value_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    numbers = rsa_key.private_numbers()
    public, private = rsa_blobs(rsa_key, iqmp=numbers.iqmp + 1)
    assert "does not match" in problem(build_v3_unencrypted(b"ssh-rsa", public, private)).message


@pytest.mark.parametrize("scalar", [0, 1 << 300, (1 << 256) - 1])
def test_ecdsa_scalar_out_of_range_is_refused(scalar: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    public = _string(b"ecdsa-sha2-nistp256") + _string(b"nistp256") + _string(point)
    problem(build_v3_unencrypted(b"ecdsa-sha2-nistp256", public, _mpint(scalar)))


def test_ed25519_secret_longer_than_32_bytes_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    public, _ = ed25519_blobs(key)
    zero_extended = _string(key.private_bytes_raw() + b"\0")  # the same little-endian number
    assert read_ppk(build_v3_unencrypted(b"ssh-ed25519", public, zero_extended), None)
    too_long = _string(key.private_bytes_raw() + b"\1")
    assert (
        "longer than 32 bytes"
        in problem(build_v3_unencrypted(b"ssh-ed25519", public, too_long)).message
    )


def test_ecdsa_compressed_public_point_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    public = _string(b"ecdsa-sha2-nistp256") + _string(b"nistp256") + _string(point)
    private = _mpint(key.private_numbers().private_value)
    error = problem(build_v3_unencrypted(b"ecdsa-sha2-nistp256", public, private))
    assert "does not give the stored public point" in error.message


@pytest.mark.parametrize(
    ("data", "hint_words"),
    [
        (b"", ".ppk"),
        (b"hello world\n", ".ppk"),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n", "OpenSSH or PEM"),
        (b"-----BEGIN RSA PRIVATE KEY-----\nMIIE\n", "OpenSSH or PEM"),
        (b"ssh-rsa AAAAB3NzaC1yc2E= me@host\n", "public key"),
        (b"---- BEGIN SSH2 PUBLIC KEY ----\n", "public key"),
        (b"SSH PRIVATE KEY FILE FORMAT 1.1\n\0", "SSH-1"),
        (b"PuTTY-User-Key-File-x: ssh-rsa\n", ".ppk"),
        (b"\xff\xfe\x00P\x00u\x00", ".ppk"),
    ],
)
def test_not_a_ppk_file(data: bytes, hint_words: str) -> None:
    for call in (lambda: ppk_is_encrypted(data), lambda: read_ppk(data, "pw")):
        with pytest.raises(KeyProblem, match="not a PuTTY private key file") as caught:
            call()
        assert caught.value.hint is not None and hint_words in caught.value.hint


@pytest.mark.parametrize("version", [b"1", b"4", b"12"])
def test_unsupported_version(version: bytes) -> None:
    data = b"PuTTY-User-Key-File-" + version + b": ssh-rsa\nEncryption: none\n"
    assert "format version" in problem(data).message


@pytest.mark.parametrize(
    "algorithm",
    [b"ssh-dss", b"ssh-ed448", b"rsa-sha2-256", b"ssh-rsa-cert-v01@openssh.com", b"\xff"],
)
def test_unsupported_algorithm(algorithm: bytes) -> None:
    data = b"PuTTY-User-Key-File-3: " + algorithm + b"\nEncryption: none\nComment: x\n"
    assert "not supported" in problem(data).message


def test_unsupported_encryption() -> None:
    data = b"PuTTY-User-Key-File-3: ssh-rsa\nEncryption: aes128-ctr\nComment: x\n"
    assert "encryption 'aes128-ctr'" in problem(data).message


def _argon2_file(memory: bytes, passes: bytes, parallelism: bytes, salt: bytes) -> bytes:
    public, _ = ed25519_blobs(Ed25519PrivateKey.generate())
    return (
        b"PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: aes256-cbc\nComment: x\n"
        + b"Public-Lines: " + _lines(public)
        + b"Key-Derivation: Argon2id\nArgon2-Memory: " + memory + b"\nArgon2-Passes: " + passes
        + b"\nArgon2-Parallelism: " + parallelism + b"\nArgon2-Salt: " + salt + b"\n"
        + b"Private-Lines: " + _lines(bytes(48))
        + b"Private-MAC: " + b"00" * 32 + b"\n"
    )  # fmt: skip


SALT = b"00112233445566778899aabbccddeeff"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((b"1048577", b"1", b"1", SALT), "Argon2-Memory 1048577, above the limit"),
        ((b"99999999999999999999", b"1", b"1", SALT), "Argon2-Memory is not a number"),
        ((b"8192", b"1001", b"1", SALT), "Argon2-Passes 1001, above the limit"),
        ((b"8192", b"0", b"1", SALT), "Argon2-Passes is 0"),
        ((b"8192", b"1", b"65", SALT), "Argon2-Parallelism 65, above the limit"),
        ((b"64", b"1", b"16", SALT), "less than 8 KiB per lane"),
        ((b"8192", b"1", b"1", b"0011"), "Argon2-Salt should be 8 to 1024 bytes"),
        ((b"8192", b"1", b"1", b"xyz"), "Argon2-Salt is not a hexadecimal"),
        ((b"-5", b"1", b"1", SALT), "Argon2-Memory is not a number"),
    ],
)
def test_hostile_argon2_parameters_are_refused_before_hashing(
    fields: tuple[bytes, bytes, bytes, bytes], expected: str
) -> None:
    data = _argon2_file(*fields)
    with pytest.raises(KeyProblem, match=re.escape(expected)):
        ppk_is_encrypted(data)
    assert expected in problem(data, "pw").message


def test_cheap_argon2_file_parses_and_fails_only_on_the_mac() -> None:
    data = _argon2_file(b"64", b"1", b"1", SALT)
    assert ppk_is_encrypted(data)
    assert "wrong passphrase" in problem(data, "pw").message


def test_oversized_input_is_refused() -> None:
    assert "too large" in problem(b"PuTTY-User-Key-File-3: ssh-rsa\n" + bytes(300_000)).message


# ---------------------------------------------------------------------------------------------
# Fuzzing: for any bytes at all, KeyProblem is the only exception.


def _only_key_problem(data: bytes, passphrase: str | None) -> None:
    with contextlib.suppress(KeyProblem):
        ppk_is_encrypted(data)
    try:
        read_ppk(data, passphrase)
    except KeyProblem as error:
        assert passphrase is None or passphrase not in str(error)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=600),
        st.binary(max_size=600).map(lambda b: b"PuTTY-User-Key-File-3: ssh-rsa\n" + b),
        st.lists(
            st.sampled_from(
                [b"Encryption: none", b"Comment: c", b"Public-Lines: 1", b"Private-Lines: 1",
                 b"AAAAC3NzaC1lZDI1NTE5", b"AAAAB3NzaC1yc2E=", b"Private-MAC: 00",
                 b"PuTTY-User-Key-File-2: ssh-ed25519", b"", b"Argon2-Memory: 8"]
            ),
            max_size=12,
        ).map(b"\n".join),
    )
)  # fmt: skip
def test_fuzz_random_bytes(data: bytes) -> None:
    _only_key_problem(data, "pw")


# Samples to mutate, and the passphrase to try. Encrypted v3 gets no passphrase so that a mutated
# Argon2 line can never make a test example spend a second of CPU on key derivation.
FUZZ_SEEDS = {"rsa-v3": None, "ed25519-v2-enc": PASSPHRASE, "p384-v2": None, "p256-v3-enc": None}
HEADER_VALUE = st.one_of(
    st.integers(min_value=-2, max_value=2**70).map(lambda n: str(n).encode()),
    st.binary(max_size=12),
)


def _mutate(data: bytes, draw: st.DataObject, most: int) -> bytes:
    """``data`` with 1 to ``most`` random byte edits, at positions drawn across its length."""
    for _ in range(draw.draw(st.integers(min_value=1, max_value=most))):
        at = draw.draw(st.integers(min_value=0, max_value=len(data)))
        chunk = draw.draw(st.binary(min_size=1, max_size=6))
        kind = draw.draw(st.sampled_from(["replace", "insert", "delete", "flip"]))
        if kind == "replace":
            data = data[:at] + chunk + data[at + len(chunk) :]
        elif kind == "insert":
            data = data[:at] + chunk + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + len(chunk) :]
        elif at < len(data):
            data = data[:at] + bytes([data[at] ^ chunk[0]]) + data[at + 1 :]
    return data


def _replace_header(data: bytes, line_number: int, value: bytes) -> bytes:
    lines = data.split(b"\n")
    index = line_number % len(lines)
    name, colon, _ = lines[index].partition(b": ")
    if colon:
        lines[index] = name + b": " + value
    return b"\n".join(lines)


@pytest.mark.integration
@settings(max_examples=200, deadline=None)
@given(
    seed=st.sampled_from(sorted(FUZZ_SEEDS)),
    draw=st.data(),
    header=st.none() | st.tuples(st.integers(min_value=0, max_value=40), HEADER_VALUE),
)
def test_fuzz_mutated_puttygen_files(
    seed: str,
    draw: st.DataObject,
    header: tuple[int, bytes] | None,
    samples: dict[str, Sample],
) -> None:
    data = _mutate(samples[seed].data, draw, 4)
    if header is not None:
        data = _replace_header(data, *header)
    _only_key_problem(data, FUZZ_SEEDS[seed])


def _blobs(data: bytes) -> tuple[bytes, bytes]:
    """The public and private blobs of an unencrypted PPK file, for re-wrapping in fuzz tests."""
    lines = data.decode("utf-8").split("\n")

    def section(header: str) -> bytes:
        start = next(i for i, line in enumerate(lines) if line.startswith(header))
        count = int(lines[start].split(": ")[1])
        return base64.b64decode("".join(lines[start + 1 : start + 1 + count]))

    return section("Public-Lines"), section("Private-Lines")


# The MAC of an unencrypted file has a known key, so a hostile file can carry any blobs under a
# valid MAC: fuzz the blob decoders directly, behind a correct MAC.
@pytest.mark.integration
@settings(max_examples=200, deadline=None)
@given(
    seed=st.sampled_from(sorted(KEY_TYPES)),
    other_algorithm=st.none() | st.sampled_from(sorted(ALGORITHMS.values())),
    target=st.sampled_from(["public", "private", "random private"]),
    draw=st.data(),
)
def test_fuzz_blobs_behind_a_valid_mac(
    seed: str,
    other_algorithm: str | None,
    target: str,
    draw: st.DataObject,
    samples: dict[str, Sample],
) -> None:
    public, private = _blobs(samples[f"{seed}-v3"].data)
    if target == "public":
        public = _mutate(public, draw, 2) or b"\0"
    elif target == "private":
        private = _mutate(private, draw, 2) or b"\0"
    else:
        private = draw.draw(st.binary(min_size=1, max_size=80))
    algorithm = (other_algorithm or ALGORITHMS[seed]).encode()
    _only_key_problem(build_v3_unencrypted(algorithm, public, private), None)
