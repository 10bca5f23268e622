"""The TOML configuration: frozen pydantic models, loaded with tomllib, validated at the edge.

Relative paths resolve against ``home``, a top-level key that is itself relative to the config
file's folder and defaults to ``..`` (the project folder holding config/, keys/ and archive/).
Every problem becomes a :class:`ConfigError` naming the file, the key and what is expected.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from statements.errors import ConfigError

CONFIG_ENV = "IBKR_STATEMENTS_CONFIG"
DEFAULT_CONFIG = Path("config/ibkr-statements.toml")
IBKR_FILE_DELIVERY = "filedelivery@interactivebrokers.com"

# Keys that look like someone pasted a secret into the file; secrets live in env vars or files.
_SECRET_KEY = re.compile(r"(passphrase|password|secret|private_key)$", re.IGNORECASE)


def _project_path(value: object, info: ValidationInfo) -> Path:
    """A path from the TOML (a string) or a default (a Path), resolved against ``home``."""
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError("expected a path as a non-empty string")
    path = Path(value).expanduser()
    home = (info.context or {}).get("home")
    if home is None or path.is_absolute():
        return path
    return Path(home) / path


ProjectPath = Annotated[Path, PlainValidator(_project_path)]


class _Section(BaseModel):
    # validate_default: default paths must be resolved against home like the given ones.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


class SftpConfig(_Section):
    host: str = "xfer.interactivebrokers.com"
    port: int = Field(default=32, ge=1, le=65535)
    username: str = ""
    key_file: ProjectPath = Path("keys/ibkr_rsa")
    key_passphrase_env: str = "IBKR_SSH_PASSPHRASE"
    key_passphrase_file: ProjectPath | None = None
    known_hosts: ProjectPath = Path("keys/known_hosts")
    remote_dir: str = "."
    patterns: tuple[str, ...] = ("*.pgp", "*.gpg", "*.asc")
    recursive: bool = False
    timeout_s: float = Field(default=30, gt=0, le=3600)
    keepalive_s: float = Field(default=15, ge=0, le=3600)
    retries: int = Field(default=3, ge=0, le=20)
    retry_backoff_s: float = Field(default=2.0, ge=0, le=300)
    workers: int = Field(default=4, ge=1, le=32)
    delete_after_archive: bool = False
    # Passed to paramiko as is, e.g. {pubkeys = ["rsa-sha2-512", "rsa-sha2-256"]} for servers
    # that do not announce server-sig-algs.
    disabled_algorithms: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("patterns")
    @classmethod
    def _patterns_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not p for p in value):
            raise ValueError("needs at least one non-empty glob pattern, e.g. ['*.pgp']")
        return value


class PgpConfig(_Section):
    gnupg_home: ProjectPath = Path("keys/gnupg")
    gpg_binary: str = "gpg"
    passphrase_env: str = "IBKR_PGP_PASSPHRASE"
    passphrase_file: ProjectPath | None = None
    signer_fingerprints: tuple[str, ...] = ()
    public_key_file: ProjectPath = Path("keys/pgp-public.asc")

    @field_validator("signer_fingerprints")
    @classmethod
    def _fingerprints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(v.replace(" ", "").upper() for v in value)
        for fpr in cleaned:
            if not re.fullmatch(r"[0-9A-F]{40}", fpr):
                raise ValueError(f"{fpr!r} is not a 40-hex-digit PGP fingerprint")
        return cleaned


class ArchiveConfig(_Section):
    root: ProjectPath = Path("archive")
    keep_encrypted: bool = True
    max_members: int = Field(default=10_000, ge=1)
    max_unpacked_bytes: int = Field(default=4 * 1024**3, ge=1)
    max_ratio: float = Field(default=200.0, gt=1)


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class ScheduleConfig(_Section):
    at: str = "06:30"
    timezone: str = "America/New_York"
    days: tuple[str, ...] = ("tue", "wed", "thu", "fri", "sat")
    retry_after_min: int = Field(default=30, ge=1, le=24 * 60)
    max_retries: int = Field(default=3, ge=0, le=48)

    @field_validator("at")
    @classmethod
    def _at(cls, value: str) -> str:
        match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", value)
        if not match:
            raise ValueError(f"{value!r} is not a time of day as HH:MM (24-hour), e.g. '06:30'")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not an IANA time zone name, e.g. 'America/New_York'"
            ) from None
        return value

    @field_validator("days")
    @classmethod
    def _days(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        days = tuple(d.lower()[:3] for d in value)
        if not days or any(d not in _DAYS for d in days):
            raise ValueError(f"days must be a non-empty list of {', '.join(_DAYS)}")
        return days


class EmailConfig(_Section):
    smtp_host: str
    smtp_port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: str = ""
    password_env: str = "IBKR_SMTP_PASSWORD"
    from_address: str
    to: tuple[str, ...] = Field(min_length=1)
    timeout_s: float = Field(default=30, gt=0, le=300)
    # A private CA (PEM) to trust for the server's certificate; None: the system's store.
    ca_file: ProjectPath | None = None


class WebhookConfig(_Section):
    url: str
    timeout_s: float = Field(default=10, gt=0, le=300)
    retries: int = Field(default=3, ge=0, le=10)
    retry_backoff_s: float = Field(default=1.0, ge=0, le=60)
    ca_file: ProjectPath | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"https?://", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value


class NotifyConfig(_Section):
    on_failure: bool = True
    on_success: bool = False
    missing_after_days: int = Field(default=2, ge=0, le=60)
    email: EmailConfig | None = None
    webhook: WebhookConfig | None = None


class RequestConfig(_Section):
    """What `keys export` puts into the email to IBKR."""

    to: str = IBKR_FILE_DELIVERY
    from_address: str = ""
    account_last4: str = ""
    egress_ip: str = ""

    @field_validator("account_last4")
    @classmethod
    def _last4(cls, value: str) -> str:
        if value and not re.fullmatch(r"\d{4}", value):
            raise ValueError(f"{value!r} is not the last four digits of an account number")
        return value

    @field_validator("egress_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        if value:
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IPv4 address like 203.0.113.7") from None
        return value


_SECTIONS = ("sftp", "pgp", "archive", "schedule", "notify", "request")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)

    home: Path = Path("..")
    sftp: SftpConfig = SftpConfig()
    pgp: PgpConfig = PgpConfig()
    archive: ArchiveConfig = ArchiveConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    notify: NotifyConfig = NotifyConfig()
    request: RequestConfig = RequestConfig()
    # Where this configuration was read from; not a TOML key.
    source: Path | None = Field(default=None, exclude=True)

    @property
    def keys_dir(self) -> Path:
        return self.sftp.key_file.parent


def example_text() -> str:
    """The commented example configuration shipped with the package (config/example.toml)."""
    return resources.files("statements").joinpath("data/example.toml").read_text("utf-8")


def config_path(explicit: Path | None) -> Path:
    """``--config``, else ``$IBKR_STATEMENTS_CONFIG``, else ``config/ibkr-statements.toml``."""
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG


def load(path: Path) -> Config:
    """Read and validate ``path``; any problem is a ConfigError that names file and key."""
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"No configuration file at {path}.",
            "Run `ibkr-statements init` in your project folder to create one, "
            f"or point --config / ${CONFIG_ENV} at an existing file.",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read configuration file {path}: {exc}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid TOML: {exc}.", "Compare it with config/example.toml."
        ) from None
    return from_mapping(raw, path)


def from_mapping(raw: dict[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML mapping as if it came from ``path``."""
    _refuse_inline_secrets(raw, path)
    _refuse_dates(raw, path)
    folder = path.resolve().parent
    home_raw = raw.get("home", "..")
    if not isinstance(home_raw, str):
        raise ConfigError(f"{path}: home: expected a folder path as a string, got {home_raw!r}.")
    home = (folder / home_raw).resolve()
    if not home.is_dir():
        raise ConfigError(
            f"{path}: home: the project folder {home} does not exist.",
            "Set `home` to the folder that holds config/, keys/ and archive/ "
            "(relative to the config file's folder), or create it.",
        )
    # Absent sections are validated as empty ones, so their default paths resolve against home.
    data = {**{name: {} for name in _SECTIONS}, **raw, "home": str(home), "source": str(path)}
    # Strict JSON-mode validation: "32" is not a port and "yes" is not a boolean, while TOML
    # strings still become paths and arrays become tuples.
    try:
        return Config.model_validate_json(
            json.dumps(data, default=str), strict=True, context={"home": home}
        )
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path), "Compare with config/example.toml.") from None


def _refuse_inline_secrets(raw: dict[str, Any], path: Path, prefix: str = "") -> None:
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _refuse_inline_secrets(value, path, f"{dotted}.")
        elif _SECRET_KEY.search(key):
            raise ConfigError(
                f"{path}: {_section_key(dotted)}: secrets never go into the configuration file.",
                "Remove it, and put the secret in an environment variable (e.g. "
                "IBKR_SSH_PASSPHRASE, IBKR_PGP_PASSPHRASE, named by *_env keys) or in a file "
                "readable only by you, named by a *_file key (key_passphrase_file, "
                "passphrase_file).",
            )


def _refuse_dates(raw: dict[str, Any], path: Path, prefix: str = "") -> None:
    """No key takes a TOML date or time; without this check one would pass as its text."""
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _refuse_dates(value, path, f"{dotted}.")
        elif isinstance(value, list):
            if any(isinstance(item, datetime.date | datetime.time) for item in value):
                raise _date_error(path, dotted)
        elif isinstance(value, datetime.date | datetime.time):
            raise _date_error(path, dotted)


def _date_error(path: Path, dotted: str) -> ConfigError:
    return ConfigError(
        f"{path}: {_section_key(dotted)}: a TOML date or time, which no key takes; "
        "expected text in quotes, a number, a boolean or a list, as config/example.toml shows.",
        'Put the value in quotes if it is text, e.g. at = "06:30".',
    )


def _section_key(dotted: str) -> str:
    section, _, key = dotted.rpartition(".")
    return f"[{section}] {key}" if section else key


def _describe(exc: ValidationError, path: Path) -> str:
    lines = [f"{path} has {exc.error_count()} problem(s):"]
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
        where = _section_key(loc) if loc else "(top level)"
        kind = error["type"]
        if kind == "extra_forbidden" and isinstance(error.get("input"), dict):
            where, what = f"[{loc}]", "unknown section; see config/example.toml for the sections"
        elif kind == "extra_forbidden":
            what = "unknown key; check its spelling and section against config/example.toml"
        elif kind == "missing":
            what = "required value is missing"
        else:
            what = error["msg"].removeprefix("Value error, ")
            given = error.get("input")
            if not isinstance(given, dict):
                what = f"{what} (got {given!r})"
        lines.append(f"  {where}: {what}")
    return "\n".join(lines)
