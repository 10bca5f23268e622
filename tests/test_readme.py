"""Every command README.md shows a user is run, in the README's order, as the user would."""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from statements.demo import demo_reports, last_business_day
from statements.sandbox import SandboxServer
from tests.clitools import CONSOLE_SCRIPT, Project, run_on_terminal

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parent.parent / "README.md"

# Long-running: tests/test_scheduler.py starts it as a process, lets it run and stops it.
RUN_ELSEWHERE = {
    "ibkr-statements --log-format json schedule": "tests/test_scheduler.py::"
    "test_schedule_daemon_catches_up_logs_json_and_stops_on_sigterm",
}


def readme_commands() -> list[str]:
    """Lines in code blocks (fenced or indented) that call the tool, in order."""
    commands, fenced = [], False
    for line in README.read_text().splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        indented = line.startswith("    ") and line.strip()
        if (fenced or indented) and line.strip().startswith("ibkr-statements"):
            commands.append(line.strip())
    return commands


def test_the_readme_shows_the_whole_newcomer_path() -> None:
    verbs = {shlex.split(c)[1] for c in readme_commands()}
    for verb in (
        "demo",
        "init",
        "keys",
        "trust-host",
        "doctor",
        "fetch",
        "run",
        "status",
        "decrypt",
    ):
        assert verb in verbs, verb


def args_of(command: str, substitutions: dict[str, str]) -> list[str]:
    for old, new in substitutions.items():
        command = command.replace(old, new)
    return shlex.split(command)[1:]


def test_every_readme_command_runs(tmp_path: Path) -> None:
    commands = readme_commands()
    ran: list[str] = []
    main = Project(tmp_path / "main")
    main.root.mkdir()
    ppk_project = Project(tmp_path / "ppk")
    ppk_project.root.mkdir()
    restored = Project(tmp_path / "restored")
    restored.root.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    ppk = tmp_path / "privatekey.ppk"
    subprocess.run(
        ["puttygen", "-t", "rsa", "-b", "2048", "-o", str(ppk), "--new-passphrase", "/dev/null"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    served = tmp_path / "served"
    (served / "outgoing").mkdir(parents=True)
    sandbox: SandboxServer | None = None
    substitutions = {
        "~/": f"{home}/",
        "privatekey.ppk": str(ppk),
        "/tmp/ibkr-demo": str(tmp_path / "demo"),
        # A documentation address: export refuses it on purpose; a user puts their own here.
        "203.0.113.7": "8.8.4.4",
    }
    try:
        for command in commands:
            if command in RUN_ELSEWHERE:
                continue
            verb = shlex.split(command)[1:3]
            args = args_of(command, substitutions)
            if verb[:1] == ["demo"]:
                result = main.run(*args, env=main.env())
                assert result.returncode == 0, (command, result.stderr)
                assert "U20343697/2025/" in result.stdout
                folder = re.search(r"Everything is in (\S+):", result.stdout)
                assert folder, result.stdout
                if not command.endswith("demo"):
                    assert Path(folder.group(1)) == tmp_path / "demo"
                else:
                    shutil.rmtree(folder.group(1))
            elif verb == ["keys", "import-ppk"]:
                # The alternative to `keys ssh`: in a project of its own.
                if not ppk_project.config.exists():
                    ppk_project.ok("init")
                ppk_project.ok(*args)
                pub = (ppk_project.keys / "ibkr_rsa.pub").read_text().strip()
                expected = subprocess.run(
                    ["puttygen", "-L", str(ppk)], capture_output=True, text=True, check=True
                ).stdout.strip()
                assert pub == expected
            elif verb == ["keys", "restore"]:
                # Restoring is for a fresh project (another computer).
                restored.ok("init")
                restored.ok(*args, env=restored.env(IBKR_BACKUP_PASSPHRASE="backup words"))
            elif verb[:1] == ["trust-host"]:
                if sandbox is None:
                    sandbox = start_sandbox(main, served)
                (main.keys / "known_hosts").unlink(missing_ok=True)
                if "--fingerprint" in args:
                    fingerprint = sandbox_fingerprint(sandbox)
                    main.ok(*args_of(command, {**substitutions, "SHA256:...": fingerprint}))
                else:
                    code, screen = run_on_terminal(
                        [str(CONSOLE_SCRIPT), *args],
                        main.root,
                        main.env(),
                        [("Pin them for", "y")],
                    )
                    assert code == 0, screen
                    assert sandbox_fingerprint(sandbox) in screen
            else:
                if verb[:1] in (["doctor"], ["fetch"], ["run"]) and sandbox is None:
                    sandbox = start_sandbox(main, served)
                    main.ok("trust-host", "--fingerprint", sandbox_fingerprint(sandbox))
                env = main.env(IBKR_BACKUP_PASSPHRASE="backup words")
                result = main.run(*args, env=env)
                assert result.returncode == 0, (command, result.stdout, result.stderr)
                if verb[:1] == ["run"]:
                    assert "archived" in result.stdout
            ran.append(command)
    finally:
        if sandbox is not None:
            sandbox.stop()
        for project in (main, ppk_project, restored):
            project.stop_agent()
    assert set(ran) | set(RUN_ELSEWHERE) == set(commands)
    # And what the user was promised arrived: the reports, filed by account and year.
    archived = {p.name for p in (main.root / "archive").rglob("*.xml")}
    assert any(name.startswith("U4698258.Trade_History") for name in archived), archived


def start_sandbox(project: Project, served: Path) -> SandboxServer:
    """IBKR's side: our reports, encrypted to the project's key, on a server of our own."""
    sender = served.parent / "sender"
    sender.mkdir(mode=0o700, exist_ok=True)
    gpg = ["gpg", "--homedir", str(sender), "--batch", "--quiet", "--trust-model", "always"]
    subprocess.run(
        [*gpg, "--import", str(project.keys / "pgp-public.asc")], check=True, capture_output=True
    )
    for name, data in demo_reports(last_business_day(datetime.now(UTC).date())).items():
        armor = ["--armor"] if name.endswith(".asc") else []
        encrypted = subprocess.run(
            [*gpg, *armor, "-r", "jane@example.com", "--encrypt"],
            input=data,
            capture_output=True,
            check=True,
        ).stdout
        (served / "outgoing" / name).write_bytes(encrypted)
    subprocess.run(["gpgconf", "--homedir", str(sender), "--kill", "gpg-agent"], check=False)
    public = (project.keys / "ibkr_rsa.pub").read_text()
    server = SandboxServer(served, authorized_keys=[public], username="jane")
    server.start()
    text = project.config.read_text()
    for old, new in (
        ('host = "xfer.interactivebrokers.com"', f'host = "{server.host}"'),
        ("port = 32", f"port = {server.port}"),
        ('username = ""', 'username = "jane"'),
        ('remote_dir = "."', 'remote_dir = "outgoing"'),
    ):
        assert old in text
        text = text.replace(old, new)
    project.config.write_text(text)
    return server


def sandbox_fingerprint(server: SandboxServer) -> str:
    digest = hashlib.sha256(server.host_key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
