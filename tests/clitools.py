"""Run the real console script in a project folder, as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONSOLE_SCRIPT = Path(sys.executable).with_name("ibkr-statements")
SSH_PASSPHRASE = "correct horse ssh battery"
PGP_PASSPHRASE = "correct horse pgp battery"


@dataclass(frozen=True)
class Project:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config" / "ibkr-statements.toml"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("IBKR_", "GNUPGHOME")) and k != "IBKR_STATEMENTS_CONFIG"
        }
        env.update(
            IBKR_STATEMENTS_CONFIG=str(self.config),
            IBKR_SSH_PASSPHRASE=SSH_PASSPHRASE,
            IBKR_PGP_PASSPHRASE=PGP_PASSPHRASE,
            COLUMNS="200",
        )
        env.update(extra)
        return {k: v for k, v in env.items() if v != ""}

    def run(
        self, *args: str, env: dict[str, str] | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} missing: pip install -e ."
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *args],
            cwd=self.root,
            env=env if env is not None else self.env(),
            input=input,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def ok(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, **kwargs)  # type: ignore[arg-type]
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def stop_agent(self) -> None:
        home = self.keys / "gnupg"
        if home.exists():
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                capture_output=True,
                check=False,
                timeout=30,
            )

    def copy_to(self, target: Path) -> Project:
        shutil.copytree(self.root, target, symlinks=True, ignore=_agent_sockets)
        return Project(target)


def _agent_sockets(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("S.") or n.endswith(".lock")]


def run_on_terminal(
    argv: list[str], cwd: Path, env: dict[str, str], answers: list[tuple[str, str]]
) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal, typing each answer once its prompt has appeared.

    getpass flushes typed-ahead input, so an answer must wait for its prompt.
    """
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the command, with the pty as its controlling terminal
        os.chdir(cwd)
        os.execve(argv[0], argv, env)
    seen = b""
    pending = list(answers)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        if pending and pending[0][0].encode() in seen.split(b"\n")[-1] + seen[-200:]:
            prompt, answer = pending.pop(0)
            seen = seen.replace(prompt.encode(), f"<{prompt}>".encode(), 1)
            os.write(fd, answer.encode() + b"\n")
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode("utf-8", "replace")
