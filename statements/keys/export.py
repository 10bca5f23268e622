"""The email-ready bundle for IBKR: both public keys and ``request.eml``, never private material.

IBKR refuses a request that carries a private key (KB3842), so every file is built from public
halves only and the whole bundle is scanned for private-key markers before it is reported done.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from pathlib import Path

from statements.config import Config
from statements.errors import KeyProblem, UsageError
from statements.fsutil import PUBLIC_FILE, atomic_write
from statements.keys.pgp import (
    PgpKeyInfo,
    export_public_key,
    scan_public_key_file,
    secret_keys,
)
from statements.keys.ssh import fingerprint_of_line, parse_public_line, read_public_line

PRIVATE_MARKERS = (b"PRIVATE KEY", b"PGP PRIVATE KEY BLOCK", b"PuTTY-User-Key-File")


@dataclass(frozen=True)
class RequestDetails:
    to: str
    from_address: str
    account_last4: str
    egress_ip: str
    username: str
    ssh_public_line: str
    pgp_public_armored: str
    pgp_key: PgpKeyInfo


@dataclass(frozen=True)
class ExportedBundle:
    folder: Path
    files: tuple[Path, ...]
    ssh_fingerprint: str
    pgp_fingerprint: str


def check_last4(value: str) -> str:
    if not re.fullmatch(r"\d{4}", value):
        raise UsageError(
            f"The email to IBKR needs the last four digits of your account number (got {value!r}).",
            "Pass --account-last4 NNNN or set [request] account_last4.",
        )
    return value


def check_public_ipv4(value: str) -> str:
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise UsageError(
            f"{value!r} is not an IPv4 address.",
            "Pass --ip with this machine's public IPv4 address (the one IBKR must whitelist), "
            "or set [request] egress_ip.",
        ) from None
    if not address.is_global:
        raise UsageError(
            f"{value} is a private or reserved address; IBKR whitelists the public address "
            "your connection leaves from.",
            "Find it with your router, or from this machine with `curl -4 ifconfig.me`, "
            "and pass it with --ip.",
        )
    return value


def format_pgp_fingerprint(fingerprint: str) -> str:
    """``ABCD EF01 ...`` in groups of four, as gpg shows it to people."""
    return " ".join(fingerprint[i : i + 4] for i in range(0, len(fingerprint), 4))


def build_request(details: RequestDetails) -> EmailMessage:
    """An RFC 5322 message a mail client opens as a draft, with both public keys attached."""
    key_type, blob, _ = parse_public_line(details.ssh_public_line)
    ssh_fpr = fingerprint_of_line(details.ssh_public_line)
    pgp = details.pgp_key
    message = EmailMessage(policy=SMTP)
    message["To"] = details.to
    if details.from_address:
        message["From"] = details.from_address
    # IBKR asks for the last four digits of the account number as the subject.
    message["Subject"] = details.account_last4
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain="ibkr-statements.invalid")
    # Makes Outlook and others open the file as an unsent draft rather than a received mail.
    message["X-Unsent"] = "1"
    username = details.username or "(please assign one and tell me)"
    message.set_content(
        "Hello,\n\n"
        "Please set up delivery of my reports through IB-hosted sFTP: your server, and we\n"
        "pull the files. Please encrypt every file with the PGP public key attached.\n\n"
        f"Account number, last four digits: {details.account_last4}\n"
        f"sFTP username: {username}\n"
        f"Public IPv4 address to whitelist: {details.egress_ip}\n"
        "Delivery: Flex Query reports, XML, PGP-encrypted.\n\n"
        f"SSH public key for the sFTP login ({key_type}, {_ssh_bits(key_type, blob)}; "
        "attached as ibkr_rsa.pub):\n"
        f"  fingerprint {ssh_fpr}\n"
        f"  {details.ssh_public_line}\n\n"
        f"PGP public key for encrypting the files ({pgp.algorithm} {pgp.bits}, "
        f"{', '.join(pgp.uids)}; attached as pgp-public.asc):\n"
        f"  fingerprint {format_pgp_fingerprint(pgp.fingerprint)}\n\n"
        "Both attachments are public keys only. Please reply with the host, port,\n"
        "username and remote folder to use.\n\n"
        "Thank you.\n"
    )
    message.add_attachment(
        (details.ssh_public_line + "\n").encode("ascii"),
        maintype="text",
        subtype="plain",
        filename="ibkr_rsa.pub",
    )
    message.add_attachment(
        details.pgp_public_armored.encode("ascii"),
        maintype="application",
        subtype="pgp-keys",
        filename="pgp-public.asc",
    )
    return message


def export_bundle(
    cfg: Config, out: Path, *, account_last4: str | None = None, ip: str | None = None
) -> ExportedBundle:
    """Write ``ibkr_rsa.pub``, ``pgp-public.asc`` and ``request.eml`` into ``out``."""
    last4 = check_last4(account_last4 or cfg.request.account_last4)
    egress_ip = check_public_ipv4(ip or cfg.request.egress_ip)
    ssh_line = read_public_line(cfg.sftp.key_file.with_name(cfg.sftp.key_file.name + ".pub"))
    pgp_key, armored = _our_pgp_public_key(cfg)
    details = RequestDetails(
        to=cfg.request.to,
        from_address=cfg.request.from_address,
        account_last4=last4,
        egress_ip=egress_ip,
        username=cfg.sftp.username,
        ssh_public_line=ssh_line,
        pgp_public_armored=armored,
        pgp_key=pgp_key,
    )
    eml = build_request(details).as_bytes()
    contents = {
        "ibkr_rsa.pub": (ssh_line + "\n").encode("ascii"),
        "pgp-public.asc": armored.encode("ascii"),
        "request.eml": eml,
    }
    for name, data in contents.items():
        if any(marker in data for marker in PRIVATE_MARKERS):
            # Cannot happen with the files we read, unless someone put a private key where the
            # public one belongs: stop before it leaves the machine.
            raise KeyProblem(
                f"Refusing to export: {name} would contain private key material.",
                "Check that keys/ibkr_rsa.pub and keys/pgp-public.asc hold public keys only.",
            )
    # Never writable by others, whatever the umask: nobody may swap the keys before they go out.
    out.mkdir(parents=True, exist_ok=True, mode=0o755)
    written = []
    for name, data in contents.items():
        atomic_write(out / name, data, PUBLIC_FILE)
        written.append(out / name)
    return ExportedBundle(out, tuple(written), fingerprint_of_line(ssh_line), pgp_key.fingerprint)


def _our_pgp_public_key(cfg: Config) -> tuple[PgpKeyInfo, str]:
    path = cfg.pgp.public_key_file
    if not path.is_file():
        raise KeyProblem(
            f"No PGP public key at {path}.",
            "Create the PGP key pair first: ibkr-statements keys pgp --name NAME --email EMAIL",
        )
    scanned = scan_public_key_file(cfg.pgp.gnupg_home, path, cfg.pgp.gpg_binary)
    if len(scanned) != 1:
        raise KeyProblem(
            f"{path} should hold exactly one PGP public key; it holds {len(scanned)}.",
            "Re-create it with `ibkr-statements keys pgp ... --force` or export the key again.",
        )
    held = {k.fingerprint for k in secret_keys(cfg.pgp.gnupg_home, cfg.pgp.gpg_binary)}
    if scanned[0].fingerprint not in held:
        raise KeyProblem(
            f"The PGP public key in {path} ({scanned[0].fingerprint}) has no secret key in "
            f"{cfg.pgp.gnupg_home}: IBKR would encrypt to a key this tool cannot decrypt with.",
            "Restore the matching secret key (`ibkr-statements keys restore`) or make a new "
            "pair with `ibkr-statements keys pgp`.",
        )
    # Export afresh from the GnuPG home: a renewed expiry or a new subkey must reach IBKR,
    # and pgp-public.asc is brought up to date with it.
    export_public_key(cfg.pgp.gnupg_home, scanned[0].fingerprint, path, cfg.pgp.gpg_binary)
    fresh = scan_public_key_file(cfg.pgp.gnupg_home, path, cfg.pgp.gpg_binary)
    return fresh[0], path.read_text("ascii")


def _ssh_bits(key_type: str, blob: bytes) -> str:
    if key_type != "ssh-rsa":
        return key_type.removeprefix("ssh-")
    # blob: string "ssh-rsa", mpint e, mpint n
    offset = 0
    values = []
    for _ in range(3):
        length = int.from_bytes(blob[offset : offset + 4], "big")
        values.append(blob[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return f"{int.from_bytes(values[2], 'big').bit_length()} bits"
