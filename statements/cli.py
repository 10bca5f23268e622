"""The command line: parses arguments, prompts, prints, sets up logging and exits.

Everything a command does is a library function; this module only turns a
:class:`StatementsError` into text and an exit status, and is the only place that does.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from statements import __version__
from statements import config as config_mod
from statements.config import Config
from statements.errors import ExitCode, KeyProblem, StatementsError, UsageError
from statements.fsutil import PUBLIC_FILE, atomic_write, ensure_private_dir
from statements.passphrase import PassphraseSource, read_passphrase

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

# Control characters a terminal would act on (a server's file name or a gpg message could carry
# an escape sequence); tab and newline stay.
_UNPRINTABLE = dict.fromkeys([*range(0x09), *range(0x0B, 0x20), 0x7F], "?")


class _Output:
    """stdout or stderr. Plain lines go out through click; rich is imported only for what
    needs it (tables, styled text, spinners): importing it took 25-37 ms of the start of every
    command, `decrypt` and `run` included, which print nothing but plain lines."""

    def __init__(self, *, stderr: bool) -> None:
        self.stderr = stderr

    def print(self, message: str | RenderableType) -> None:
        if isinstance(message, str):
            click.echo(message.translate(_UNPRINTABLE), err=self.stderr)
        else:
            self.rich.print(message)

    @functools.cached_property
    def rich(self) -> Console:
        from rich.console import Console

        # No markup and no emoji: messages carry "[sftp]"-style keys and paths that rich would
        # read as tags, and a folder named "a:smile:b" would print as "a😄b".
        return Console(
            stderr=self.stderr, soft_wrap=True, highlight=False, markup=False, emoji=False
        )


def _styled(*parts: str | tuple[str, str]) -> RenderableType:
    """Text with styled parts, e.g. ``("error: ", "bold red")``; the plain parts are messages."""
    from rich.text import Text

    return Text.assemble(*(p.translate(_UNPRINTABLE) if isinstance(p, str) else p for p in parts))


out = _Output(stderr=False)
err = _Output(stderr=True)
log = logging.getLogger("statements")

BACKUP_PASSPHRASE_ENV = "IBKR_BACKUP_PASSPHRASE"
PPK_PASSPHRASE_ENV = "IBKR_PPK_PASSPHRASE"


# --- logging -------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers."""

    FIELDS = ("event", "file", "account", "bytes", "duration")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(verbosity: int, log_format: str) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paramiko is chatty at INFO and says nothing a user can act on that we do not say better.
    logging.getLogger("paramiko").setLevel(max(level, logging.WARNING))
    logging.getLogger("gnupg").setLevel(max(level, logging.WARNING))
    # The demo's in-process server logs every client hang-up as an error; that is its business.
    logging.getLogger("statements.sandbox").setLevel(
        logging.DEBUG if verbosity > 0 else logging.CRITICAL
    )


# --- context -------------------------------------------------------------------------------


@dataclass
class App:
    config_option: Path | None
    _config: Config | None = field(default=None, repr=False)

    @property
    def config_file(self) -> Path:
        return config_mod.config_path(self.config_option)

    def config(self) -> Config:
        if self._config is None:
            self._config = config_mod.load(self.config_file)
        return self._config


pass_app = click.make_pass_decorator(App)


def _on_terminal() -> bool:
    return sys.stdin.isatty()


def _new_passphrase(source: PassphraseSource, *, no_passphrase: bool) -> str | None:
    """The passphrase for a key about to be made: env/file, else a confirmed hidden prompt."""
    if no_passphrase:
        return None
    value = read_passphrase(source)
    if value is not None:
        return value
    if _on_terminal():
        return str(
            click.prompt(
                f"Passphrase for the new {source.what}",
                hide_input=True,
                confirmation_prompt=True,
            )
        )
    raise KeyProblem(
        f"No passphrase for the new {source.what}, and no terminal to ask on.",
        f"Set it in {source.describe()}, run the command on a terminal, or pass "
        "--no-passphrase to make a key without one (anyone who copies it can use it).",
    )


def _existing_passphrase(source: PassphraseSource) -> str | None:
    """The passphrase of an existing key: env/file, else a hidden prompt, else None."""
    value = read_passphrase(source)
    if value is None and _on_terminal():
        value = str(click.prompt(f"Passphrase of the {source.what}", hide_input=True))
    return value


def _ssh_source(cfg: Config) -> PassphraseSource:
    return PassphraseSource("SSH key", cfg.sftp.key_passphrase_env, cfg.sftp.key_passphrase_file)


def _pgp_source(cfg: Config) -> PassphraseSource:
    return PassphraseSource("PGP key", cfg.pgp.passphrase_env, cfg.pgp.passphrase_file)


# --- commands ------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_option",
    type=click.Path(path_type=Path, dir_okay=False),
    help=f"Configuration file [default: ${config_mod.CONFIG_ENV}, else "
    "config/ibkr-statements.toml].",
)
@click.option("-v", "--verbose", count=True, help="More detail (debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.version_option(__version__, prog_name="ibkr-statements")
@click.pass_context
def cli(
    ctx: click.Context, config_option: Path | None, verbose: int, quiet: bool, log_format: str
) -> None:
    """Fetch, decrypt and archive Interactive Brokers statements delivered over sFTP."""
    setup_logging(-1 if quiet else verbose, log_format)
    ctx.obj = App(config_option)


@cli.command()
@pass_app
def init(app: App) -> None:
    """Write config/ibkr-statements.toml from the example; never overwrites."""
    path = app.config_file
    if path.exists():
        raise UsageError(
            f"{path} already exists; init never overwrites a configuration.",
            "Edit it, or move it away and run init again.",
        )
    # Never writable by others, whatever the umask: the config names the gpg binary that runs.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with_home = config_mod.from_mapping({}, path)
    ensure_private_dir(with_home.keys_dir)
    atomic_write(path, config_mod.example_text().encode("utf-8"), PUBLIC_FILE)
    out.print(f"Wrote {path}")
    out.print(f"Project folder: {with_home.home}; keys go to {with_home.keys_dir} (0700).")
    out.print("Next: ibkr-statements keys ssh, then keys pgp --name NAME --email EMAIL.")


@cli.group()
def keys() -> None:
    """Make, import, show, export and back up the SSH and PGP keys IBKR needs."""


@keys.command("ssh")
@click.option("--bits", default=4096, show_default=True, help="RSA key size (2048 minimum).")
@click.option("--no-passphrase", is_flag=True, help="Make a key without a passphrase.")
@click.option("--force", is_flag=True, help="Replace an existing pair (the old one is kept).")
@click.option("--comment", default=None, help="Public key comment [default: ibkr-statements@HOST].")
@pass_app
def keys_ssh(app: App, bits: int, no_passphrase: bool, force: bool, comment: str | None) -> None:
    """Make the RSA key pair for the sFTP login: keys/ibkr_rsa and keys/ibkr_rsa.pub."""
    from statements.keys import ssh

    cfg = app.config()
    private = cfg.sftp.key_file
    if not force:
        ssh.refuse_existing_pair(private)  # before asking for a passphrase that goes unused
    passphrase = _new_passphrase(_ssh_source(cfg), no_passphrase=no_passphrase)
    with err.rich.status(f"Generating an RSA-{bits} key pair..."):
        key = ssh.generate_rsa(bits)
    files = ssh.write_key_pair(
        key,
        private,
        passphrase=passphrase,
        comment=comment or ssh.default_comment(),
        force=force,
    )
    _report_ssh(files)


def _report_ssh(files: Any) -> None:
    for kept in files.kept_aside:
        out.print(f"Kept the previous file as {kept}")
    out.print(f"Private key: {files.private} (0600)")
    out.print(f"Public key:  {files.public}")
    out.print(f"Fingerprint: {files.fingerprint}")
    out.print(files.public_line)


@keys.command("pgp")
@click.option("--name", required=True, help="Your name, for the key's user id.")
@click.option("--email", required=True, help="Your email, for the key's user id.")
@click.option("--bits", default=4096, show_default=True, help="RSA key size (2048 minimum).")
@click.option("--expire", default=0, show_default=True, help="Days until expiry; 0 = never.")
@click.option("--no-passphrase", is_flag=True, help="Make a key without a passphrase.")
@click.option("--force", is_flag=True, help="Add a new key even if one exists for EMAIL.")
@pass_app
def keys_pgp(
    app: App, name: str, email: str, bits: int, expire: int, no_passphrase: bool, force: bool
) -> None:
    """Make the PGP key pair IBKR encrypts your reports to, and write keys/pgp-public.asc."""
    from statements.keys import pgp

    cfg = app.config()
    if expire < 0:
        raise UsageError("--expire takes a number of days, 0 for never.")
    home = cfg.pgp.gnupg_home
    if not force:
        pgp.refuse_existing_email(home, email, cfg.pgp.gpg_binary)
    passphrase = _new_passphrase(_pgp_source(cfg), no_passphrase=no_passphrase)
    with err.rich.status(f"Generating an RSA-{bits} PGP key pair..."):
        info = pgp.generate_pgp_key(
            home,
            name=name,
            email=email,
            bits=bits,
            expire_days=expire,
            passphrase=passphrase,
            force=force,
            gpg_binary=cfg.pgp.gpg_binary,
        )
    pgp.export_public_key(home, info.fingerprint, cfg.pgp.public_key_file, cfg.pgp.gpg_binary)
    out.print(f"GnuPG home:  {home} (0700)")
    out.print(f"Public key:  {cfg.pgp.public_key_file}")
    out.print(f"Fingerprint: {info.fingerprint}")


@keys.command("import-ppk")
@click.argument("ppk_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--no-passphrase", is_flag=True, help="Write the converted key without one.")
@click.option("--force", is_flag=True, help="Replace an existing pair (the old one is kept).")
@pass_app
def keys_import_ppk(app: App, ppk_file: Path, no_passphrase: bool, force: bool) -> None:
    """Convert a PuTTY .ppk (v2 or v3) into keys/ibkr_rsa and keys/ibkr_rsa.pub."""
    from statements.keys import ppk, ssh

    cfg = app.config()
    try:
        data = ppk_file.read_bytes()
    except OSError as exc:
        raise KeyProblem(f"Cannot read {ppk_file}: {exc.strerror}.") from None
    ppk_passphrase: str | None = None
    if ppk.ppk_is_encrypted(data):
        ppk_passphrase = _existing_passphrase(
            PassphraseSource(f"PuTTY key {ppk_file.name}", PPK_PASSPHRASE_ENV)
        )
        if ppk_passphrase is None:
            raise KeyProblem(
                f"{ppk_file} is protected by a passphrase, and none was given.",
                f"Set it in {PPK_PASSPHRASE_ENV}, or run the command on a terminal.",
            )
    key = ppk.read_ppk(data, ppk_passphrase)
    private = cfg.sftp.key_file
    if not force:
        ssh.refuse_existing_pair(private)
    passphrase = _new_passphrase(_ssh_source(cfg), no_passphrase=no_passphrase)
    files = ssh.write_key_pair(
        key.private_key, private, passphrase=passphrase, comment=key.comment, force=force
    )
    out.print(f"Read PuTTY key format version {key.version} ({key.algorithm}), MAC verified.")
    _report_ssh(files)


@keys.command("show")
@pass_app
def keys_show(app: App) -> None:
    """Both fingerprints, the key files and their permissions."""
    from statements.keys.inventory import inventory

    inv = inventory(app.config())
    from rich.table import Table

    table = Table(title="Key files", show_lines=False)
    for column in ("what", "path", "mode", "state"):
        table.add_column(column)
    for f in inv.files:
        state = "missing" if not f.exists else "UNSAFE" if f.unsafe else "ok"
        mode = f"{f.mode:04o}" if f.mode is not None else "-"
        table.add_row(f.role, str(f.path), mode, state)
    out.print(table)
    out.print(f"SSH key fingerprint: {inv.ssh_fingerprint or '(no key: run keys ssh)'}")
    if inv.ssh_public_line:
        out.print(f"SSH public key:      {inv.ssh_public_line}")
    if not inv.pgp_keys:
        out.print("PGP secret keys:     (none: run keys pgp --name NAME --email EMAIL)")
    for key in inv.pgp_keys:
        exported = " (in pgp-public.asc)" if key.fingerprint == inv.exported_pgp_fingerprint else ""
        expires = key.expires.date().isoformat() if key.expires else "never"
        out.print(
            f"PGP key fingerprint: {key.fingerprint}{exported}  {key.algorithm} {key.bits}, "
            f"{'; '.join(key.uids)}, expires {expires}"
        )
    for problem in inv.problems:
        err.print(_styled(("WARNING: ", "bold red"), problem))


@keys.command("export")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder for the bundle [default: keys/outbox].",
)
@click.option("--account-last4", default=None, help="Last four digits of the account.")
@click.option("--ip", default=None, help="Public IPv4 address for IBKR to whitelist.")
@pass_app
def keys_export(app: App, out_dir: Path | None, account_last4: str | None, ip: str | None) -> None:
    """The bundle to send IBKR: both public keys and request.eml (never private keys)."""
    from statements.keys.export import export_bundle, format_pgp_fingerprint

    cfg = app.config()
    bundle = export_bundle(
        cfg, out_dir or cfg.keys_dir / "outbox", account_last4=account_last4, ip=ip
    )
    for path in bundle.files:
        out.print(f"Wrote {path}")
    out.print(f"SSH key fingerprint: {bundle.ssh_fingerprint}")
    out.print(f"PGP key fingerprint: {format_pgp_fingerprint(bundle.pgp_fingerprint)}")
    out.print(
        f"Open {bundle.folder / 'request.eml'} in your mail client, check it, and send it to "
        f"{cfg.request.to}. IBKR answers within 1-2 business days with host, port, username "
        "and folder."
    )


def _backup_passphrase(*, confirm: bool) -> str:
    value = read_passphrase(PassphraseSource("backup", BACKUP_PASSPHRASE_ENV))
    if value is not None:
        return value
    if _on_terminal():
        return str(click.prompt("Backup passphrase", hide_input=True, confirmation_prompt=confirm))
    raise KeyProblem(
        "No backup passphrase, and no terminal to ask on.",
        f"Set it in {BACKUP_PASSPHRASE_ENV} or run the command on a terminal.",
    )


@keys.command("backup")
@click.argument("backup_file", type=click.Path(path_type=Path, dir_okay=False))
@pass_app
def keys_backup(app: App, backup_file: Path) -> None:
    """One passphrase-encrypted file with every key, to restore here or on another computer."""
    from statements.keys.backup import create_backup

    cfg = app.config()
    if backup_file.exists():
        raise UsageError(f"{backup_file} already exists; choose another name.")
    pgp_passphrase = _existing_passphrase(_pgp_source(cfg))
    backup_passphrase = _backup_passphrase(confirm=True)
    contents = create_backup(
        cfg, backup_file, backup_passphrase=backup_passphrase, pgp_passphrase=pgp_passphrase
    )
    out.print(f"Wrote {backup_file} (0600), encrypted with the backup passphrase.")
    _report_backup(contents)
    out.print("Keep it off this machine. Without this tool it opens with: gpg -d FILE | tar -x")


@keys.command("restore")
@click.argument("backup_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@pass_app
def keys_restore(app: App, backup_file: Path) -> None:
    """Restore keys from a backup into this project; never overwrites existing keys."""
    from statements.keys.backup import restore_backup

    contents = restore_backup(
        app.config(), backup_file, backup_passphrase=_backup_passphrase(confirm=False)
    )
    out.print(f"Restored from {backup_file}:")
    _report_backup(contents)


def _report_backup(contents: Any) -> None:
    out.print(f"SSH key fingerprint: {contents.ssh_fingerprint or '(none)'}")
    for fpr in contents.pgp_fingerprints:
        out.print(f"PGP key fingerprint: {fpr}")


# --- server ------------------------------------------------------------------------------


@cli.command("trust-host")
@click.option(
    "--fingerprint",
    default=None,
    help="Pin only a key with this SHA256 fingerprint (as IBKR gave it), without asking.",
)
@pass_app
def trust_host_command(app: App, fingerprint: str | None) -> None:
    """Show the server's host keys and pin them in keys/known_hosts."""
    from statements.remote import trust_host

    cfg = app.config()
    target = f"{cfg.sftp.host}:{cfg.sftp.port}"

    def confirm(offered: list[Any]) -> bool:
        out.print(f"{target} offers these host keys:")
        for key in offered:
            out.print(f"  {key.key_type:22} {key.fingerprint}")
        out.print("Compare them with the fingerprint IBKR gave you before you accept.")
        return bool(click.confirm(f"Pin them for {target}?", default=False))

    pinned = trust_host(
        cfg.sftp.host,
        cfg.sftp.port,
        cfg.sftp.known_hosts,
        timeout_s=cfg.sftp.timeout_s,
        fingerprint=fingerprint,
        confirm=confirm if fingerprint is None and _on_terminal() else None,
    )
    for key in pinned:
        out.print(f"Pinned {key.key_type} {key.fingerprint} for {target} in {cfg.sftp.known_hosts}")


class _RichFetchProgress:
    """A progress bar with bytes, files and rate on a terminal."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.bytes_task: Any = None
        self.files_task: Any = None

    def started(self, files: int, total_bytes: int) -> None:
        self.bytes_task = self.progress.add_task("bytes", total=total_bytes)
        self.files_task = self.progress.add_task("files", total=files)

    def advanced(self, nbytes: int) -> None:
        self.progress.update(self.bytes_task, advance=nbytes)

    def finished_file(self, remote: Any, seconds: float) -> None:
        self.progress.update(self.files_task, advance=1)
        log.debug("fetched %s in %.2f s", remote.relative, seconds)

    def failed_file(self, remote: Any, reason: str) -> None:
        self.progress.update(self.files_task, advance=1)
        log.error("failed %s: %s", remote.relative, reason)


@contextlib.contextmanager
def _fetch_progress() -> Iterator[Any]:
    """A progress bar on a terminal; elsewhere None, and the pipeline logs a line per file."""
    # isatty first: a nightly run from cron never imports rich just to learn it has no terminal.
    if not sys.stderr.isatty() or not err.rich.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with Progress(*columns, console=err.rich, transient=True) as bar:
        yield _RichFetchProgress(bar)


@cli.command()
@click.option("--dry-run", is_flag=True, help="List what would be fetched; change nothing.")
@pass_app
def fetch(app: App, dry_run: bool) -> None:
    """Download the remote files not yet fetched into archive/.inbox."""
    from statements.lock import run_lock
    from statements.pipeline import fetch_from_config

    cfg = app.config()
    if dry_run:
        summary = fetch_from_config(cfg, dry_run=True)
    else:
        with (
            run_lock(cfg.archive.root, "fetch"),
            _stop_on_signals() as stop,
            _fetch_progress() as progress,
        ):
            summary = fetch_from_config(cfg, progress=progress, stop=stop)
    if dry_run:
        for item in summary.new:
            out.print(f"would fetch {item.remote.relative} ({item.remote.size} bytes)")
        out.print(
            f"{len(summary.new)} new, {summary.skipped} already fetched, "
            f"{summary.refused} refused (dry run: nothing downloaded)"
        )
        return
    out.print(
        f"fetched {summary.fetched} new, skipped {summary.skipped}, refused {summary.refused}, "
        f"failed {len(summary.failures)}; {summary.bytes} bytes in {summary.seconds:.1f} s"
    )
    for failure in summary.failures:
        err.print(f"failed: {failure.name}: {failure.reason}")
    if summary.failures:
        raise SystemExit(int(ExitCode.PARTIAL))


@cli.command()
@click.option(
    "--retry-quarantine",
    is_flag=True,
    help="Move quarantined files back to the inbox first and try them again.",
)
@pass_app
def decrypt(app: App, retry_quarantine: bool) -> None:
    """Decrypt, unpack and archive everything waiting in archive/.inbox."""
    from statements.lock import run_lock
    from statements.pipeline import decrypt_from_config

    cfg = app.config()
    with run_lock(cfg.archive.root, "decrypt"):
        summary = decrypt_from_config(cfg, retry_quarantine=retry_quarantine)
    out.print(
        f"archived {summary.archived_files} file(s) from {summary.processed} fetched, "
        f"quarantined {len(summary.failures)}"
    )
    _report_archive_failures(summary.failures)


def _report_archive_failures(failures: list[Any]) -> None:
    for failure in failures:
        err.print(f"quarantined: {failure.name}: {failure.reason}")
    if failures:
        err.print("See archive/.quarantine/*.error.txt; retry with: decrypt --retry-quarantine")
        raise SystemExit(int(ExitCode.PARTIAL))


@cli.command()
@pass_app
def run(app: App) -> None:
    """One nightly cycle: fetch new files and archive each as soon as it lands."""
    from statements.scheduler import run_once

    cfg = app.config()
    with _stop_on_signals() as stop, _fetch_progress() as progress:
        result = run_once(cfg, stop=stop, progress=progress)
    if result.error is not None:
        raise result.error
    assert result.cycle is not None
    fetch, archive = result.cycle.fetch, result.cycle.archive
    out.print(
        f"fetched {fetch.fetched} new, skipped {fetch.skipped}, refused {fetch.refused}, "
        f"failed {len(fetch.failures)}; archived {archive.archived_files} file(s), "
        f"quarantined {len(archive.failures)}; {fetch.bytes} bytes in {fetch.seconds:.1f} s"
    )
    if stop.is_set():
        out.print("stopped on request; the next run resumes where this one left off")
    if result.cycle.deleted_remote:
        out.print(f"deleted {result.cycle.deleted_remote} archived file(s) on the server")
    for failure in fetch.failures:
        err.print(f"failed: {failure.name}: {failure.reason}")
    _report_archive_failures(archive.failures)
    if fetch.failures:
        raise SystemExit(int(ExitCode.PARTIAL))


@cli.command("schedule")
@pass_app
def schedule_command(app: App) -> None:
    """Stay running: `run` on [schedule] days at [schedule] at, in [schedule] timezone."""
    from statements.scheduler import NightlyScheduler

    cfg = app.config()
    log.info(
        "scheduling runs on %s at %s %s",
        ", ".join(cfg.schedule.days),
        cfg.schedule.at,
        cfg.schedule.timezone,
    )
    with _stop_on_signals() as stop:
        NightlyScheduler(cfg, stop).serve()
    log.info("stopped on request")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM or SIGINT ask for a clean stop: the current file is finished or left resumable.

    A second signal stops at once.
    """
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("received %s: stopping after the current file", signal.Signals(signum).name)
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@cli.command()
@click.option("--runs", default=10, show_default=True, help="How many recent runs to show.")
@pass_app
def status(app: App, runs: int) -> None:
    """Last runs, what waits in the inbox and quarantine, and the latest period per account."""
    from statements.status import status_report

    _print_status(status_report(app.config(), runs=runs))


def _print_status(report: Any) -> None:
    if not report.ledger_exists:
        out.print("No runs yet: nothing has been fetched. Start with `ibkr-statements run`.")
        return
    from rich.table import Table

    table = Table(title="Recent runs")
    for column in ("#", "command", "started", "ended", "result", "fetched", "archived", "failed"):
        table.add_column(column)
    for r in report.runs:
        table.add_row(
            str(r.id),
            r.command,
            r.started_at,
            r.ended_at or "(running or killed)",
            r.result or "-",
            str(r.fetched),
            str(r.archived),
            str(r.failed),
        )
    out.print(table)
    accounts = Table(title="Archive by account")
    for column in ("account", "latest period end", "files"):
        accounts.add_column(column)
    for account, latest, files in report.accounts:
        accounts.add_row(account, latest, str(files))
    out.print(accounts)
    out.print(f"Waiting in the inbox: {len(report.inbox)}")
    for name in report.inbox:
        out.print(f"  {name}")
    out.print(f"In quarantine: {len(report.quarantine)}")
    for item in report.quarantine:
        out.print(f"  {item.name}: {item.reason}")
    totals = ", ".join(f"{k}: {v}" for k, v in sorted(report.totals.items()))
    out.print(f"Totals: {totals}")


@cli.command()
@pass_app
def doctor(app: App) -> None:
    """Check config, keys, gpg, DNS, TCP, SSH, host key, login and the remote folder."""
    from statements.doctor import FAILED, OK, WARNING, exit_code, run_checks

    marks = {OK: ("ok", "green"), WARNING: ("warning", "yellow"), FAILED: ("FAILED", "bold red")}

    def show(check: Any) -> None:
        label, style = marks.get(check.state, ("skipped", "dim"))
        out.print(_styled((f"{label:>8}", style), f"  {check.name}: {check.detail}"))
        if check.fix and check.state in (WARNING, FAILED):
            out.print(f"{'':>10}fix: {check.fix}")

    checks = run_checks(app.config_file, on_check=show)
    code = exit_code(checks)
    failed = [c.name for c in checks if c.state == FAILED]
    out.print("all checks passed" if not failed else f"failed: {', '.join(failed)}")
    if code:
        raise SystemExit(code)


@cli.command()
@click.option(
    "--dir",
    "folder",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="An empty or new folder for the demo project [default: a fresh temporary folder].",
)
def demo(folder: Path | None) -> None:
    """The whole pipeline on loopback: throwaway keys, sample reports, a local SFTP server."""
    from statements.demo import run_demo

    result = run_demo(folder, progress=lambda line: out.print(f"- {line}"))
    out.print("")
    out.print(f"The archive it made, {result.folder / 'archive'}:")
    for path in result.archive_files:
        out.print(f"  {path}")
    out.print(f"  .encrypted/  ({len(result.encrypted_kept)} ciphertexts kept as fetched)")
    out.print("")
    _print_status(result.status)
    out.print("")
    out.print(
        f"Everything is in {result.folder}: its config/ibkr-statements.toml is a complete "
        "project; try `ibkr-statements --config "
        f"{result.config_path} status`. Delete the folder when done."
    )


# --- entry point ---------------------------------------------------------------------------


def _fewer_malloc_arenas() -> None:
    """Cap glibc's malloc at two heaps ("arenas") instead of up to eight per core.

    Each download and decrypt thread would otherwise get a heap of its own, where its 256 KiB
    to 1 MiB buffers stay resident: 79 -> 70 MiB peak RSS in the nightly benchmark. The
    threads mostly wait on I/O, so two heaps cost no measurable time. Must run before the
    first thread starts; a no-op where glibc's mallopt is missing (macOS, musl).
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)


_M_ARENA_MAX = -8  # glibc's <malloc.h>


def main(argv: list[str] | None = None) -> None:
    """Run one command and exit with its status (sys.exit); the console script is
    :func:`statements.entry.main`, which imports this module and calls it."""
    _fewer_malloc_arenas()
    # What the imports made (pydantic's schemas above all) lives as long as the process.
    # Frozen, it is no longer walked by every full collection that the command's own objects
    # set off (a listing of 20,000 names sets off several): 0.1 CPU-s of a no-op `run` here.
    gc.freeze()
    try:
        _run_command(argv)
    finally:
        # The interpreter's last collection would walk everything made since, only to free
        # memory that the exit frees anyway: 40-60 ms of every command here. atexit handlers
        # and the flushing of stdout and stderr still run, and nothing of ours is left to a
        # collector: files, the ledger and the lock are closed by the command itself.
        gc.freeze()


def _run_command(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, prog_name="ibkr-statements", standalone_mode=False)
    except StatementsError as exc:
        err.print(_styled(("error: ", "bold red"), exc.message))
        if exc.hint:
            err.print(_styled(("what to do: ", "bold"), exc.hint))
        log.debug("exit %d after %s", exc.exit_code, type(exc).__name__)
        sys.exit(int(exc.exit_code))
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        err.print("Aborted.")
        sys.exit(int(ExitCode.USAGE))
    except click.ClickException as exc:
        exc.show()
        sys.exit(int(ExitCode.USAGE))
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)
    sys.exit(int(ExitCode.OK))
