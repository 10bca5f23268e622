"""The one error type users see, and the exit codes of the command-line contract.

Every failure a user can act on is a :class:`StatementsError`: a message that says what is wrong,
a hint that says what to do, and the exit code DESIGN.md assigns to that kind of failure. Adapters
translate library exceptions (paramiko, gnupg, pydantic, OSError) into these at their edge; only
``cli`` turns them into text and an exit status.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    PARTIAL = 1  # some files failed, the rest were archived
    USAGE = 2
    CONFIG = 3  # configuration or key problem
    REMOTE = 4  # server unreachable, host key mismatch or login refused
    LOCKED = 5  # another run holds the lock


class StatementsError(Exception):
    """A failure with a message for the user, a hint for what to do, and an exit code."""

    exit_code: ExitCode = ExitCode.CONFIG

    def __init__(
        self, message: str, hint: str | None = None, *, exit_code: ExitCode | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class UsageError(StatementsError):
    exit_code = ExitCode.USAGE


class ConfigError(StatementsError):
    """The configuration file is missing, malformed or inconsistent."""

    exit_code = ExitCode.CONFIG


class KeyProblem(StatementsError):
    """A key file or GnuPG home is missing, unreadable, unsafe or locked with another passphrase."""

    exit_code = ExitCode.CONFIG


class RemoteError(StatementsError):
    """The server cannot be reached, is not the one we pinned, or refuses our login."""

    exit_code = ExitCode.REMOTE


class LockHeld(StatementsError):
    exit_code = ExitCode.LOCKED


class ThreadLimit(StatementsError):
    """This process may start no more threads (``ulimit -u``, a container's pids.max)."""

    exit_code = ExitCode.CONFIG

    @classmethod
    def reached(cls, what: str, exc: BaseException, *, fewer: str = "") -> ThreadLimit:
        """``what`` could not start; ``fewer`` names a setting that needs fewer threads."""
        return cls(
            f"Cannot start the {what}: this process is at its thread limit ({exc}).",
            f"Raise the limit (`ulimit -u`, the container's pids.max){fewer}.",
        )


class DiskFull(StatementsError):
    """No space left where we write: not the file's fault, so it is never quarantined."""

    exit_code = ExitCode.PARTIAL

    @classmethod
    def at(cls, path: object) -> DiskFull:
        return cls(
            f"No space left on the disk holding {path}.",
            f"Free some space (see `df -h {path}`), then run again: nothing was lost, the "
            "files not yet archived wait in the inbox.",
        )
