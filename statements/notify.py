"""Notices after a run, by email (SMTP) and/or an HTTP webhook.

Three kinds: ``failure`` (exit 1, 3 or 4), ``success`` (exit 0, when ``[notify] on_success``),
and ``missing``: no new file for ``[notify] missing_after_days`` business days. IBKR delivers on
weekday evenings and its outgoing folder going quiet is how a broken delivery looks, so silence
is worth a message even when every run "succeeds".

:func:`notices_for` decides what to say (pure, no I/O); :func:`send` delivers it. A notifier
that fails is logged and reported back as a problem string, never raised: a good run must not
become a failed one because the mail server is down. Secrets never appear in a notice, a log
line or a problem: the SMTP password is read from its environment variable at the moment of
login, and webhook URLs (whose path is often the secret, e.g. Slack's) are logged as
scheme://host only.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from statements import __version__
from statements.config import EmailConfig, NotifyConfig, WebhookConfig
from statements.errors import ExitCode
from statements.ledger import Ledger

logger = logging.getLogger(__name__)

SUBJECT_PREFIX = "[ibkr-statements]"
USER_AGENT = f"ibkr-statements/{__version__}"
FAILURE_EXITS = (ExitCode.PARTIAL, ExitCode.CONFIG, ExitCode.REMOTE)

# Every state a fetched file can be in: a file counts as "new" whatever became of it later.
# Enough of an error answer to show why a webhook refused us, not a whole HTML page.
_EXCERPT = 200


@dataclass(frozen=True)
class RunOutcome:
    """What one run did, as the command line and the scheduler report it."""

    command: str  # "run"
    exit_code: int  # 0, 1, 3, 4, 5
    started_at: datetime
    ended_at: datetime
    fetched: int
    archived: int
    failed: int
    message: str  # the error message for 3/4, or a summary of failed files
    hint: str | None = None
    failures: tuple[str, ...] = ()  # "name: reason" per failed file


@dataclass(frozen=True)
class Notice:
    kind: str  # "failure" | "success" | "missing"
    subject: str
    body: str
    payload: dict[str, object] = field(hash=False)  # the JSON for webhooks


# --- what to say -------------------------------------------------------------------------


def business_days_since(last: date, today: date) -> int:
    """Weekdays (Mon-Fri) strictly after ``last`` up to and including ``today``; 0 if none.

    Market holidays count as business days: IBKR's calendar is not known here, and the default
    threshold of 2 absorbs a single holiday.
    """
    days = (today - last).days
    if days <= 0:
        return 0
    # Any 7 consecutive days hold exactly 5 weekdays; only the remainder needs looking at.
    weeks, rest = divmod(days, 7)
    extra = sum(1 for n in range(1, rest + 1) if (last + timedelta(days=n)).weekday() < 5)
    return weeks * 5 + extra


def missed_deliveries(last_fetch: date, today: date) -> int:
    """Business-day deliveries that should have arrived by this morning and did not.

    IBKR delivers on business-day evenings and a run picks them up the next morning, so the
    newest fetch carries the delivery of the business day before it (a Saturday fetch, Friday's),
    and today's run can only have seen deliveries of the business days before today.
    """
    delivered = last_fetch - timedelta(days=1)
    while delivered.weekday() >= 5:
        delivered -= timedelta(days=1)
    return business_days_since(delivered, today - timedelta(days=1))


def notices_for(
    cfg: NotifyConfig,
    outcome: RunOutcome,
    *,
    last_new_file: date | None,
    today: date,
    host: str,
) -> list[Notice]:
    """The notices one run calls for: at most one failure or success, plus a missing one.

    ``last_new_file`` is the date the newest file was fetched (None: never), ``today`` the
    local date of the run and ``host`` the machine's name, so a reader knows which install
    speaks.
    """
    host = _one_line(host) or "?"
    notices: list[Notice] = []
    if outcome.exit_code in FAILURE_EXITS and cfg.on_failure:
        notices.append(_failure(outcome, host))
    elif outcome.exit_code == ExitCode.OK and cfg.on_success:
        notices.append(_success(outcome, host))
    if cfg.missing_after_days > 0:
        quiet = None if last_new_file is None else missed_deliveries(last_new_file, today)
        if quiet is None or quiet >= cfg.missing_after_days:
            notices.append(_missing(outcome, host, last_new_file, quiet, cfg.missing_after_days))
    return notices


_FAILURE_WHAT = {
    ExitCode.PARTIAL: "some files failed; the rest were archived",
    ExitCode.CONFIG: "a configuration or key problem stopped it",
    ExitCode.REMOTE: "the server was unreachable, its host key did not match, or it refused "
    "the login",
}
_FAILURE_TODO = {
    ExitCode.PARTIAL: "Failed downloads are tried again by the next run. Files that could not "
    "be decrypted or unpacked wait in archive/.quarantine/, each with the reason in "
    "<name>.error.txt: fix the cause, then run `ibkr-statements decrypt --retry-quarantine`. "
    "`ibkr-statements status` lists them.",
    ExitCode.CONFIG: "Fix the problem above, then run `ibkr-statements doctor`: it checks the "
    "configuration, the key files and their permissions, and gpg.",
    ExitCode.REMOTE: "Run `ibkr-statements doctor`: it checks DNS, TCP, the SSH handshake, the "
    "host key and the login, and names IBKR's known causes and fixes for each failure.",
}


def _failure(outcome: RunOutcome, host: str) -> Notice:
    code = ExitCode(outcome.exit_code)
    if code == ExitCode.PARTIAL:
        subject = f"{SUBJECT_PREFIX} {host}: {outcome.failed} file(s) failed"
    elif code == ExitCode.CONFIG:
        subject = f"{SUBJECT_PREFIX} {host}: run failed (configuration or key problem)"
    else:
        subject = f"{SUBJECT_PREFIX} {host}: run failed (server unreachable or login refused)"
    lines = [
        f"The `{outcome.command}` on {host} ended with exit code {int(code)}: "
        f"{_FAILURE_WHAT[code]}.",
        "",
    ]
    if outcome.message:
        lines += [outcome.message, ""]
    if outcome.failures:
        lines += ["Failed files:", *(f"  - {item}" for item in outcome.failures), ""]
    if outcome.hint:
        lines += [f"What to do: {outcome.hint}", "", _FAILURE_TODO[code]]
    else:
        lines += [f"What to do: {_FAILURE_TODO[code]}"]
    lines += ["", *_counts(outcome)]
    return _notice("failure", subject, "\n".join(lines), outcome, host)


def _success(outcome: RunOutcome, host: str) -> Notice:
    if outcome.archived:
        subject = f"{SUBJECT_PREFIX} {host}: {outcome.archived} report(s) archived"
    else:
        subject = f"{SUBJECT_PREFIX} {host}: run done, nothing new"
    lines = [f"The `{outcome.command}` on {host} finished without errors.", ""]
    if outcome.message:
        lines += [outcome.message, ""]
    lines += _counts(outcome)
    return _notice("success", subject, "\n".join(lines), outcome, host)


def _missing(
    outcome: RunOutcome, host: str, last: date | None, quiet: int | None, threshold: int
) -> Notice:
    if last is None or quiet is None:
        subject = f"{SUBJECT_PREFIX} {host}: no report from IBKR fetched yet"
        first = "No report has been fetched from IBKR yet."
    else:
        subject = f"{SUBJECT_PREFIX} {host}: no new report from IBKR for {quiet} business days"
        first = f"No new report since {last.isoformat()} ({quiet} business days)."
    lines = [
        f"{first} IBKR's folder going quiet is how a broken delivery looks: run "
        "`ibkr-statements doctor`, check the Flex query delivery settings in the Client Portal.",
        "",
        "If files do sit on the server, check [sftp] remote_dir and patterns: IBKR may deliver "
        "into `outgoing`, and as .pgp, .gpg or .asc.",
        "",
        f"This notice comes after [notify] missing_after_days = {threshold} business days "
        "(Monday to Friday, holidays included) without a new file.",
        "",
        f"Last run: exit code {outcome.exit_code}.",
        *_counts(outcome),
    ]
    return _notice("missing", subject, "\n".join(lines), outcome, host)


def _counts(outcome: RunOutcome) -> list[str]:
    return [
        f"Fetched {outcome.fetched}, archived {outcome.archived}, failed {outcome.failed}.",
        f"Started {outcome.started_at.isoformat(timespec='seconds')}, "
        f"ended {outcome.ended_at.isoformat(timespec='seconds')}.",
    ]


def _notice(kind: str, subject: str, body: str, outcome: RunOutcome, host: str) -> Notice:
    """The notice with its webhook payload.

    The JSON POSTed to the webhook, one object per notice::

        {"kind": "failure" | "success" | "missing",
         "subject": "[ibkr-statements] ...",
         "text": subject, a blank line, then the body (what Slack-style hooks display),
         "host": "the machine that ran", "exit_code": 1,
         "fetched": 3, "archived": 2, "failed": 1,
         "failures": ["name: reason", ...],
         "started_at": "2026-09-02T06:30:00-04:00", "ended_at": "..."}   # ISO 8601
    """
    payload: dict[str, object] = {
        "kind": kind,
        "subject": subject,
        "text": f"{subject}\n\n{body}",
        "host": host,
        "exit_code": outcome.exit_code,
        "fetched": outcome.fetched,
        "archived": outcome.archived,
        "failed": outcome.failed,
        "failures": list(outcome.failures),
        "started_at": outcome.started_at.isoformat(),
        "ended_at": outcome.ended_at.isoformat(),
    }
    return Notice(kind=kind, subject=subject, body=body, payload=payload)


def last_new_file_date(ledger: Ledger, tz: tzinfo | None = None) -> date | None:
    """The date (in ``tz``, default the machine's zone) the newest file was fetched; None: never.

    Ids grow with every insert, so the highest id is the newest fetch.
    """
    newest = ledger.newest_fetched_at()
    return None if newest is None else datetime.fromisoformat(newest).astimezone(tz).date()


# --- delivery ----------------------------------------------------------------------------


def send(cfg: NotifyConfig, notices: Sequence[Notice]) -> list[str]:
    """Deliver every notice to every configured channel; return the problems, never raise.

    Each problem is also logged at WARNING. No channel configured: nothing to do, [].
    """
    if not notices:
        return []
    problems: list[str] = []
    if cfg.email is not None:
        problems += _guarded("email", partial(_send_email, cfg.email, notices))
    if cfg.webhook is not None:
        problems += _guarded("webhook", partial(_send_webhook, cfg.webhook, notices))
    for problem in problems:
        logger.warning("notification not delivered: %s", problem)
    return problems


def _guarded(channel: str, deliver: Callable[[], list[str]]) -> list[str]:
    # The last line of defence for "a notifier never fails the run": anything the channel did
    # not foresee becomes a problem string too.
    try:
        return deliver()
    except Exception as exc:
        logger.debug("%s notifier crashed", channel, exc_info=True)
        return [f"{channel}: unexpected {type(exc).__name__}: {_one_line(str(exc))}"]


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifying context: the system's store, or only ``ca_file`` when set."""
    return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))


def _reason(exc: BaseException, timeout: float) -> str:
    """A short, secret-free sentence for a network failure, with the fix where one is known."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the server's certificate is not trusted ({exc.verify_message}); if it comes from "
            "a private CA, set ca_file to that CA's certificate (PEM)"
        )
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that host and port)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return f'{exc}; use security = "ssl" (port 465) if the server speaks TLS from the start'
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = ", ".join(f"{to} ({code})" for to, (code, _) in exc.recipients.items())
        return f"every recipient was refused: {refused}"
    if isinstance(exc, smtplib.SMTPResponseException):
        error = exc.smtp_error
        text = error.decode("utf-8", "replace") if isinstance(error, bytes) else error
        return f"the server answered {exc.smtp_code} {_one_line(text)}"
    return _one_line(str(exc)) or type(exc).__name__


def _one_line(text: str) -> str:
    """No line breaks or control characters: safe for a mail header, a log line."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- email ---------------------------------------------------------------------------------


def _send_email(cfg: EmailConfig, notices: Sequence[Notice]) -> list[str]:
    """All notices over one SMTP connection; login only when a username is set."""
    where = f"email via {cfg.smtp_host}:{cfg.smtp_port}"
    password: str | None = None
    if cfg.username:
        password = os.environ.get(cfg.password_env)
        if not password:
            return [
                f"{where}: not sent: set the environment variable {cfg.password_env} to the SMTP "
                f"password of {cfg.username} (or leave [notify.email] username empty if the "
                "server needs no login)"
            ]
        if cfg.security == "none":
            if not _is_loopback(cfg.smtp_host):
                return [
                    f'{where}: not sent: security = "none" would send the password in clear '
                    'over the network; set [notify.email] security = "starttls" or "ssl"'
                ]
            logger.warning(
                "%s: logging in without TLS; acceptable only because the relay is on this machine",
                where,
            )
    try:
        context = None if cfg.security == "none" else _tls_context(cfg.ca_file)
    except OSError as exc:
        return [f"{where}: not sent: cannot load [notify.email] ca_file {cfg.ca_file}: {exc}"]

    sent = 0
    problems: list[str] = []
    try:
        with _smtp_connection(cfg, context) as smtp:
            if password is not None:
                smtp.login(cfg.username, password)
            for notice in notices:
                refused = smtp.send_message(_message(cfg, notice))
                sent += 1
                if refused:
                    names = ", ".join(sorted(refused))
                    problems.append(f"{where}: {notice.kind} notice refused for {names}")
                logger.info("%s notice sent by email to %s", notice.kind, ", ".join(cfg.to))
    except smtplib.SMTPAuthenticationError as exc:
        return [
            f"{where}: not sent: the server refused the login of {cfg.username} "
            f"({_reason(exc, cfg.timeout_s)}); check [notify.email] username and the password "
            f"in {cfg.password_env}"
        ]
    except (smtplib.SMTPException, OSError, ValueError) as exc:
        # ValueError: a header EmailMessage refuses (e.g. a malformed from_address).
        unsent = len(notices) - sent
        problems.append(f"{where}: {unsent} notice(s) not sent: {_reason(exc, cfg.timeout_s)}")
    return problems


def _smtp_connection(cfg: EmailConfig, context: ssl.SSLContext | None) -> smtplib.SMTP:
    # gethostname, not smtplib's default getfqdn(): a reverse DNS lookup can stall for long.
    ehlo_name = socket.gethostname() or "localhost"
    if cfg.security == "ssl":
        return smtplib.SMTP_SSL(
            cfg.smtp_host,
            cfg.smtp_port,
            local_hostname=ehlo_name,
            timeout=cfg.timeout_s,
            context=context,
        )
    smtp = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, ehlo_name, timeout=cfg.timeout_s)
    if cfg.security == "starttls":
        try:
            # Fails closed: a server that does not offer STARTTLS raises, we never fall back.
            smtp.starttls(context=context)
        except BaseException:
            smtp.close()
            raise
    return smtp


def _message(cfg: EmailConfig, notice: Notice) -> EmailMessage:
    message = EmailMessage()
    message["From"] = cfg.from_address
    message["To"] = ", ".join(cfg.to)
    message["Subject"] = _one_line(notice.subject)
    message["Date"] = formatdate(localtime=True)
    domain = cfg.from_address.rpartition("@")[2].strip("> ") or "localhost"
    message["Message-ID"] = make_msgid("ibkr-statements", domain=domain)
    message.set_content(notice.body)
    return message


# --- webhook -------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would turn a redirected POST into a GET without the body and call that success.
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _send_webhook(cfg: WebhookConfig, notices: Sequence[Notice]) -> list[str]:
    where = f"webhook {_redacted(cfg.url)}"
    try:
        context = _tls_context(cfg.ca_file)
    except OSError as exc:
        return [f"{where}: not sent: cannot load [notify.webhook] ca_file {cfg.ca_file}: {exc}"]
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect)
    problems = []
    for notice in notices:
        problem = _post(opener, cfg, notice)
        if problem is None:
            logger.info("%s notice posted to %s", notice.kind, where)
        else:
            problems.append(f"{where}: {notice.kind} notice not delivered: {problem}")
    return problems


def _post(opener: urllib.request.OpenerDirector, cfg: WebhookConfig, notice: Notice) -> str | None:
    """POST one notice; retry connection errors and 5xx with exponential backoff, not 4xx."""
    # WebhookConfig accepts only http:// and https:// URLs, so no file: or custom schemes.
    request = urllib.request.Request(  # noqa: S310
        cfg.url,
        data=json.dumps(notice.payload).encode("utf-8"),
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
        method="POST",
    )
    delay = cfg.retry_backoff_s
    attempts = cfg.retries + 1
    last = "not tried"
    for attempt in range(1, attempts + 1):
        try:
            with opener.open(request, timeout=cfg.timeout_s) as response:
                response.read(_EXCERPT)
            return None  # urllib raises HTTPError for anything outside 2xx
        except urllib.error.HTTPError as exc:
            answer = f"answered {exc.code} {_one_line(str(exc.reason))}{_excerpt(exc)}"
            if exc.code < 500:
                advice = (
                    "set [notify.webhook] url to the final address"
                    if exc.code < 400
                    else "check [notify.webhook] url and that the hook accepts this JSON"
                )
                return f"{answer}; not retried: {advice}"
            last = answer
        except (OSError, http.client.HTTPException) as exc:
            # OSError covers URLError, timeouts, refused and reset connections, TLS failures.
            last = _reason(exc, cfg.timeout_s)
        if attempt < attempts:
            logger.info(
                "%s: %s; retry %d of %d in %.1f s",
                _redacted(cfg.url),
                last,
                attempt,
                cfg.retries,
                delay,
            )
            time.sleep(delay)
            delay *= 2
    return f"{last} (after {attempts} attempt(s))"


def _excerpt(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read(_EXCERPT).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        text = ""
    finally:
        exc.close()
    text = _one_line(text)
    return f": {text}" if text else ""


def _redacted(url: str) -> str:
    """scheme://host[:port] only: the path and query of a webhook URL are often its secret."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    rest = "/..." if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"
