"""Notices: what a run says, and that it arrives by real SMTP and HTTP servers on loopback.

The servers (aiosmtpd, http.server) run in this process on 127.0.0.1, each started and stopped
by its fixture. A failing notifier must never raise out of send().
"""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from statements import config, notify
from statements.config import EmailConfig, NotifyConfig, WebhookConfig
from statements.ledger import Ledger, ServerId
from statements.notify import Notice, RunOutcome

FRIDAY = dt.date(2026, 9, 4)
SATURDAY, MONDAY, TUESDAY = (FRIDAY + dt.timedelta(days=n) for n in (1, 3, 4))
SMTP_PASSWORD = "smtp-pw-Zq7!never-shown"
PASSPHRASES = {"IBKR_PGP_PASSPHRASE": "pgp-pass-Xy9", "IBKR_SSH_PASSPHRASE": "ssh-pass-Wv8"}


def outcome(exit_code: int = 1, **changes: Any) -> RunOutcome:
    fields: dict[str, Any] = {
        "command": "run",
        "exit_code": exit_code,
        "started_at": dt.datetime(2026, 9, 8, 6, 30, tzinfo=dt.UTC),
        "ended_at": dt.datetime(2026, 9, 8, 6, 31, tzinfo=dt.UTC),
        "fetched": 3,
        "archived": 2,
        "failed": 1,
        "message": "1 file could not be decrypted",
        "hint": None,
        "failures": ("U4698258.Trade_History.20260904.20260904.xml.pgp: no secret key",),
    }
    fields.update(changes)
    return RunOutcome(**fields)


def notices(
    cfg: NotifyConfig | None = None, result: RunOutcome | None = None, **kw: Any
) -> list[Notice]:
    kw.setdefault("last_new_file", MONDAY)
    kw.setdefault("today", TUESDAY)
    return notify.notices_for(
        cfg or NotifyConfig(), result or outcome(), host=kw.pop("host", "nas"), **kw
    )


def failure_notice() -> Notice:
    (notice,) = notices(
        NotifyConfig(missing_after_days=0),
        outcome(hint="Import the secret key with `ibkr-statements keys pgp`."),
    )
    return notice


# --- business days and what to say (no network) --------------------------------------------


@pytest.mark.parametrize(
    ("last", "today", "expected"),
    [
        (FRIDAY, FRIDAY, 0),
        (FRIDAY, SATURDAY, 0),
        (FRIDAY, MONDAY, 1),
        (FRIDAY, TUESDAY, 2),
        (SATURDAY, TUESDAY, 2),
        (MONDAY, TUESDAY, 1),
        (FRIDAY, FRIDAY + dt.timedelta(days=7), 5),
        (TUESDAY, MONDAY, 0),  # a clock that went back counts nothing
    ],
)
def test_business_days_since(last: dt.date, today: dt.date, expected: int) -> None:
    assert notify.business_days_since(last, today) == expected


@given(st.dates(dt.date(2000, 1, 1), dt.date(2040, 1, 1)), st.integers(0, 800))
def test_business_days_since_counts_each_weekday_once(last: dt.date, span: int) -> None:
    today = last + dt.timedelta(days=span)
    slow = sum(1 for n in range(1, span + 1) if (last + dt.timedelta(days=n)).weekday() < 5)
    assert notify.business_days_since(last, today) == slow


@pytest.mark.parametrize("code", [1, 3, 4])
def test_failure_notice_for_exit_1_3_4(code: int) -> None:
    result = outcome(
        code, message="Login refused by xfer.interactivebrokers.com", hint="Run doctor"
    )
    (notice,) = notices(NotifyConfig(missing_after_days=0), result)
    assert notice.kind == "failure"
    assert notice.subject.startswith("[ibkr-statements] nas:")
    assert f"exit code {code}" in notice.body
    assert "Login refused by xfer.interactivebrokers.com" in notice.body
    assert "What to do: Run doctor" in notice.body
    assert notice.payload["exit_code"] == code


def test_partial_failure_lists_each_failed_file_and_where_to_look() -> None:
    notice = failure_notice()
    assert notice.subject == "[ibkr-statements] nas: 1 file(s) failed"
    assert "U4698258.Trade_History.20260904.20260904.xml.pgp: no secret key" in notice.body
    assert "Import the secret key" in notice.body
    assert "decrypt --retry-quarantine" in notice.body


@pytest.mark.parametrize("code", [0, 2, 5])
def test_no_failure_notice_for_success_usage_or_lock(code: int) -> None:
    assert notices(NotifyConfig(missing_after_days=0), outcome(code)) == []


def test_on_failure_false_silences_failures() -> None:
    assert notices(NotifyConfig(on_failure=False, missing_after_days=0), outcome(4)) == []


def test_success_summary_only_when_asked() -> None:
    good = outcome(0, failed=0, failures=(), message="")
    (notice,) = notices(NotifyConfig(on_success=True), good)
    assert notice.kind == "success"
    assert notice.subject == "[ibkr-statements] nas: 2 report(s) archived"
    assert "Fetched 3, archived 2, failed 0." in notice.body
    assert notices(NotifyConfig(on_success=True, on_failure=False), outcome(1)) == []


def test_missing_after_two_business_days_across_a_weekend() -> None:
    (notice,) = notices(NotifyConfig(), outcome(0), last_new_file=FRIDAY, today=TUESDAY)
    assert notice.kind == "missing"
    assert "No new report since 2026-09-04 (2 business days)." in notice.body
    assert "ibkr-statements doctor" in notice.body
    assert "Flex query delivery settings in the Client Portal" in notice.body


def test_not_missing_on_the_monday_after_a_friday_delivery() -> None:
    assert notices(NotifyConfig(), outcome(0), last_new_file=FRIDAY, today=MONDAY) == []


def test_never_fetched_is_missing_unless_switched_off() -> None:
    (notice,) = notices(NotifyConfig(), outcome(0), last_new_file=None)
    assert notice.kind == "missing"
    assert "No report has been fetched from IBKR yet." in notice.body
    assert notices(NotifyConfig(missing_after_days=0), outcome(0), last_new_file=None) == []


def test_a_failure_and_a_missing_delivery_are_two_notices() -> None:
    kinds = [n.kind for n in notices(NotifyConfig(), outcome(4), last_new_file=FRIDAY)]
    assert kinds == ["failure", "missing"]


def test_payload_is_json_with_the_documented_fields() -> None:
    payload = json.loads(json.dumps(failure_notice().payload))
    assert set(payload) == {
        "kind", "subject", "text", "host", "exit_code", "fetched", "archived", "failed",
        "failures", "started_at", "ended_at",
    }  # fmt: skip
    assert payload["failures"] == [
        "U4698258.Trade_History.20260904.20260904.xml.pgp: no secret key"
    ]
    assert payload["text"].startswith("[ibkr-statements] nas: 1 file(s) failed\n\n")
    assert payload["started_at"] == "2026-09-08T06:30:00+00:00"


def test_a_host_name_cannot_break_the_subject_line() -> None:
    (notice,) = notices(NotifyConfig(missing_after_days=0), host="nas\r\nBcc: x@example.com")
    assert "\n" not in notice.subject and "\r" not in notice.subject


def test_the_commented_channels_in_the_example_load(tmp_path: Path) -> None:
    text = config.example_text()
    start, end = text.index("# [notify.email]"), text.index("[request]")
    channels = re.sub(r"(?m)^# (?=\[notify\.|\w+ = )", "", text[start:end])
    path = tmp_path / "config" / "ibkr-statements.toml"
    path.parent.mkdir()
    path.write_text(text[:start] + channels + text[end:])
    cfg = config.load(path).notify
    assert cfg.email is not None and cfg.webhook is not None
    assert (cfg.email.timeout_s, cfg.email.ca_file) == (30, tmp_path / "keys" / "smtp-ca.pem")
    assert (cfg.webhook.retry_backoff_s, cfg.webhook.ca_file) == (
        1.0,
        tmp_path / "keys" / "webhook-ca.pem",
    )


def test_last_new_file_date_from_the_ledger(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        assert notify.last_new_file_date(ledger) is None
        server = ServerId("h", 22, "u")
        for n in (1, 2):
            ledger.record_fetched(
                server, remote_path=f"f{n}.pgp", size=n, mtime=n, version=1,
                inbox_name=f"f{n}.pgp", run_id=None,
            )  # fmt: skip
        ledger.quarantine(2, "bad")  # what became of a file later does not matter
        stamp = dt.datetime.fromisoformat(ledger.fetched_at(2))
        assert notify.last_new_file_date(ledger, dt.UTC) == stamp.date()


# --- delivery without a network ------------------------------------------------------------


def email_cfg(port: int, **changes: Any) -> EmailConfig:
    fields: dict[str, Any] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "security": "none",
        "from_address": "statements@example.com",
        "to": ("me@example.com", "partner@example.com"),
        "timeout_s": 5,
    }
    fields.update(changes)
    return EmailConfig(**fields)


def test_no_channel_configured_sends_nothing() -> None:
    assert notify.send(NotifyConfig(), [failure_notice()]) == []


def test_missing_password_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IBKR_SMTP_PASSWORD", raising=False)
    cfg = email_cfg(587, smtp_host="192.0.2.1", security="starttls", username="me")
    (problem,) = notify.send(NotifyConfig(email=cfg), [failure_notice()])
    assert "set the environment variable IBKR_SMTP_PASSWORD" in problem


def test_a_password_never_travels_in_clear_to_another_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IBKR_SMTP_PASSWORD", SMTP_PASSWORD)
    cfg = email_cfg(25, smtp_host="192.0.2.1", username="me")
    (problem,) = notify.send(NotifyConfig(email=cfg), [failure_notice()])
    assert "in clear" in problem and 'security = "starttls"' in problem
    assert SMTP_PASSWORD not in problem


# --- real servers: TLS material ---------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A private CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    folder = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    tls = Tls(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    tls.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls


def free_port() -> int:
    # aiosmtpd's Controller connects to its own port to check it is up, so it cannot take 0.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- real servers: SMTP -----------------------------------------------------------------------


@dataclass
class Mailbox:
    """What the SMTP server received: messages, envelopes and the credentials of each login."""

    port: int = 0
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.raw.append(content)
        self.messages.append(message_from_bytes(content, policy=policy.default))
        self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login, password = data.login.decode(), data.password.decode()
        self.logins.append((login, password))
        # handled=False: aiosmtpd answers the client itself (235 or 535).
        return AuthResult(success=(login, password) == ("me", SMTP_PASSWORD), handled=False)


StartSmtp = Callable[..., Mailbox]


@pytest.fixture
def smtp_server() -> Iterator[StartSmtp]:
    """Start an aiosmtpd server on 127.0.0.1 with the given Controller options; stopped after.

    ``auth=True`` accepts the login ("me", SMTP_PASSWORD) and records every login tried.
    """
    controllers: list[Controller] = []

    def start(*, auth: bool = False, **options: Any) -> Mailbox:
        mailbox = Mailbox(port=free_port())
        if auth:
            options["authenticator"] = mailbox.authenticate
        controller = Controller(
            mailbox, hostname="127.0.0.1", port=mailbox.port, server_hostname="localhost",
            **options,
        )  # fmt: skip
        controller.start()
        controllers.append(controller)
        return mailbox

    yield start
    for controller in controllers:
        controller.stop()


def assert_failure_mail_arrived(mailbox: Mailbox) -> None:
    (message,) = mailbox.messages
    assert message["From"] == "statements@example.com"
    assert message["To"] == "me@example.com, partner@example.com"
    assert message["Subject"] == "[ibkr-statements] nas: 1 file(s) failed"
    assert message["Date"] and message["Message-ID"]
    body = message.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert "U4698258.Trade_History.20260904.20260904.xml.pgp: no secret key" in text
    assert "Import the secret key with `ibkr-statements keys pgp`." in text
    assert mailbox.envelopes == [
        ("statements@example.com", ["me@example.com", "partner@example.com"])
    ]


@pytest.mark.integration
def test_plain_smtp_delivers_the_failure(smtp_server: StartSmtp) -> None:
    mailbox = smtp_server()
    assert notify.send(NotifyConfig(email=email_cfg(mailbox.port)), [failure_notice()]) == []
    assert_failure_mail_arrived(mailbox)


@pytest.mark.integration
def test_starttls_with_a_private_ca(smtp_server: StartSmtp, tls: Tls) -> None:
    mailbox = smtp_server(tls_context=tls.server_context(), require_starttls=True)
    cfg = email_cfg(mailbox.port, security="starttls", ca_file=tls.ca_file)
    assert notify.send(NotifyConfig(email=cfg), [failure_notice()]) == []
    assert_failure_mail_arrived(mailbox)


@pytest.mark.integration
def test_starttls_refuses_a_certificate_it_does_not_trust(smtp_server: StartSmtp, tls: Tls) -> None:
    mailbox = smtp_server(tls_context=tls.server_context(), require_starttls=True)
    cfg = email_cfg(mailbox.port, security="starttls")  # system store: the test CA is unknown
    (problem,) = notify.send(NotifyConfig(email=cfg), [failure_notice()])
    assert "certificate is not trusted" in problem and "ca_file" in problem
    assert mailbox.messages == []


@pytest.mark.integration
def test_starttls_never_falls_back_to_plain(smtp_server: StartSmtp, tls: Tls) -> None:
    mailbox = smtp_server()  # offers no STARTTLS
    cfg = email_cfg(mailbox.port, security="starttls", ca_file=tls.ca_file)
    (problem,) = notify.send(NotifyConfig(email=cfg), [failure_notice()])
    assert "STARTTLS" in problem
    assert mailbox.messages == []


@pytest.mark.integration
def test_implicit_tls(smtp_server: StartSmtp, tls: Tls) -> None:
    mailbox = smtp_server(ssl_context=tls.server_context())
    cfg = email_cfg(mailbox.port, security="ssl", ca_file=tls.ca_file)
    assert notify.send(NotifyConfig(email=cfg), [failure_notice()]) == []
    assert_failure_mail_arrived(mailbox)


@pytest.mark.integration
def test_login_over_starttls_with_the_password_from_the_environment(
    smtp_server: StartSmtp,
    tls: Tls,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="statements")
    for name, value in PASSPHRASES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MY_SMTP_PW", SMTP_PASSWORD)
    mailbox = smtp_server(
        tls_context=tls.server_context(),
        require_starttls=True,
        auth_require_tls=True,
        auth_required=True,
        auth=True,
    )
    cfg = email_cfg(
        mailbox.port, security="starttls", ca_file=tls.ca_file, username="me",
        password_env="MY_SMTP_PW",
    )  # fmt: skip
    notices = [failure_notice(), *notices_missing()]
    assert notify.send(NotifyConfig(email=cfg), notices) == []
    assert mailbox.logins == [("me", SMTP_PASSWORD)]
    assert len(mailbox.messages) == 2
    for secret in (SMTP_PASSWORD, *PASSPHRASES.values()):
        assert all(secret.encode() not in raw for raw in mailbox.raw)
        assert secret not in caplog.text


def notices_missing() -> list[Notice]:
    return notices(NotifyConfig(), outcome(0), last_new_file=FRIDAY, today=TUESDAY)


@pytest.mark.integration
def test_a_refused_login_is_a_problem_without_the_password(
    smtp_server: StartSmtp,
    tls: Tls,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("IBKR_SMTP_PASSWORD", "wrong-" + SMTP_PASSWORD)
    mailbox = smtp_server(tls_context=tls.server_context(), require_starttls=True, auth=True)
    cfg = email_cfg(mailbox.port, security="starttls", ca_file=tls.ca_file, username="me")
    (problem,) = notify.send(NotifyConfig(email=cfg), [failure_notice()])
    assert "refused the login of me" in problem and "IBKR_SMTP_PASSWORD" in problem
    assert SMTP_PASSWORD not in problem and SMTP_PASSWORD not in caplog.text
    assert mailbox.messages == []


@pytest.mark.integration
def test_login_without_tls_is_allowed_to_a_relay_on_this_machine(
    smtp_server: StartSmtp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IBKR_SMTP_PASSWORD", SMTP_PASSWORD)
    mailbox = smtp_server(auth_require_tls=False, auth=True)
    cfg = email_cfg(mailbox.port, username="me")
    assert notify.send(NotifyConfig(email=cfg), [failure_notice()]) == []
    assert mailbox.logins == [("me", SMTP_PASSWORD)]
    assert len(mailbox.messages) == 1


# --- real servers: HTTP ----------------------------------------------------------------------


@dataclass
class Hook:
    """A webhook receiver: answers with the queued status codes, then 200."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)


StartHook = Callable[..., Hook]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours proxy variables; the loopback servers must be reached directly.
    for name in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hook_server() -> Iterator[StartHook]:
    servers: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def start(*answers: int, location: str = "") -> Hook:
        hook = Hook(answers=list(answers))

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.requests.append((self.path, dict(self.headers.items()), body))
                status = hook.answers.pop(0) if hook.answers else 200
                reply = b"ok" if status < 300 else b"invalid_payload"
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread))
        hook.url = f"http://127.0.0.1:{server.server_address[1]}/services/T0/B0/secret-token"
        return hook

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def hook_cfg(url: str, **changes: Any) -> NotifyConfig:
    fields: dict[str, Any] = {"url": url, "timeout_s": 2, "retries": 2, "retry_backoff_s": 0.01}
    fields.update(changes)
    return NotifyConfig(webhook=WebhookConfig(**fields))


@pytest.mark.integration
def test_webhook_receives_the_json(hook_server: StartHook) -> None:
    hook = hook_server()
    assert notify.send(hook_cfg(hook.url), [failure_notice()]) == []
    ((path, headers, body),) = hook.requests
    assert path == "/services/T0/B0/secret-token"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("ibkr-statements/")
    sent = json.loads(body)
    assert sent["kind"] == "failure"
    assert sent["exit_code"] == 1
    assert (sent["fetched"], sent["archived"], sent["failed"]) == (3, 2, 1)
    assert sent["failures"] == ["U4698258.Trade_History.20260904.20260904.xml.pgp: no secret key"]
    assert "Import the secret key" in sent["text"]
    assert sent["host"] == "nas"


@pytest.mark.integration
def test_webhook_retries_server_errors(hook_server: StartHook) -> None:
    hook = hook_server(500, 503)
    assert notify.send(hook_cfg(hook.url), [failure_notice()]) == []
    assert len(hook.requests) == 3


@pytest.mark.integration
def test_webhook_gives_up_after_its_retries(hook_server: StartHook) -> None:
    hook = hook_server(500, 500, 500, 500)
    (problem,) = notify.send(hook_cfg(hook.url, retries=1), [failure_notice()])
    assert "answered 500" in problem and "after 2 attempt(s)" in problem
    assert len(hook.requests) == 2


@pytest.mark.integration
def test_webhook_does_not_retry_a_client_error(
    hook_server: StartHook, caplog: pytest.LogCaptureFixture
) -> None:
    hook = hook_server(400)
    (problem,) = notify.send(hook_cfg(hook.url), [failure_notice()])
    assert "answered 400" in problem and "invalid_payload" in problem and "not retried" in problem
    assert len(hook.requests) == 1
    # The URL's path is the secret of many webhooks: problems and logs show scheme://host only.
    assert "secret-token" not in problem and "secret-token" not in caplog.text
    assert "notification not delivered" in caplog.text


@pytest.mark.integration
def test_webhook_does_not_follow_a_redirect(hook_server: StartHook) -> None:
    target = hook_server()
    hook = hook_server(302, location=target.url)
    (problem,) = notify.send(hook_cfg(hook.url), [failure_notice()])
    assert "answered 302" in problem
    assert target.requests == []


@pytest.mark.integration
def test_webhook_that_never_answers_times_out() -> None:
    # A listening socket nobody accepts from: connect and send succeed (the kernel's backlog),
    # the answer never comes.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        (problem,) = notify.send(hook_cfg(url, timeout_s=0.3, retries=1), [failure_notice()])
    assert "no answer within 0.3 s" in problem


@pytest.mark.integration
def test_closed_ports_are_problems_not_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    cfg = NotifyConfig(
        email=email_cfg(port),
        webhook=WebhookConfig(url=f"http://127.0.0.1:{port}/", retries=1, retry_backoff_s=0.01),
    )
    problems = notify.send(cfg, [failure_notice(), *notices_missing()])
    assert len(problems) == 3  # one for the email connection, one per webhook notice
    assert all("connection refused" in p for p in problems)
    assert caplog.text.count("notification not delivered") == 3


@pytest.mark.integration
def test_one_channel_failing_does_not_stop_the_other(hook_server: StartHook) -> None:
    hook = hook_server()
    cfg = NotifyConfig(email=email_cfg(free_port()), webhook=WebhookConfig(url=hook.url))
    (problem,) = notify.send(cfg, [failure_notice()])
    assert problem.startswith("email via 127.0.0.1")
    assert len(hook.requests) == 1


@pytest.mark.parametrize(
    ("last_fetch", "today", "missed"),
    [
        (
            dt.date(2026, 11, 14),
            dt.date(2026, 11, 17),
            1,
        ),  # Sat fetch (Fri's delivery); Tue: Mon's
        (dt.date(2026, 11, 14), dt.date(2026, 11, 18), 2),  # ... Wed: Mon's and Tue's
        (
            dt.date(2026, 11, 14),
            dt.date(2026, 11, 16),
            0,
        ),  # ... Mon: none was due over the weekend
        (
            dt.date(2026, 11, 18),
            dt.date(2026, 11, 19),
            1,
        ),  # Wed fetch (Tue's); Thu: Wed's
        (dt.date(2026, 11, 18), dt.date(2026, 11, 20), 2),  # ... Fri: Wed's and Thu's
        (
            dt.date(2026, 11, 18),
            dt.date(2026, 11, 18),
            0,
        ),  # ... the same morning: nothing missed
    ],
)
def test_missed_deliveries_count_business_days_ibkr_should_have_delivered(
    last_fetch: dt.date, today: dt.date, missed: int
) -> None:
    from statements.notify import missed_deliveries

    assert missed_deliveries(last_fetch, today) == missed
