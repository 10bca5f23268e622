"""Where passphrases come from: an environment variable, else a file, else (in cli) a prompt.

A passphrase is never taken from the TOML, never logged, and never put in an argument list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from statements.errors import KeyProblem
from statements.fsutil import loose_permissions


@dataclass(frozen=True)
class PassphraseSource:
    """Names the places a passphrase may come from; ``what`` is for messages ("SSH key")."""

    what: str
    env: str
    file: Path | None = None

    def describe(self) -> str:
        places = f"the environment variable {self.env}"
        if self.file is not None:
            places += f" or the file {self.file}"
        return places


def read_passphrase(source: PassphraseSource) -> str | None:
    """The passphrase from the env var, else the file, else None (the caller may prompt)."""
    value = os.environ.get(source.env)
    if value:
        return value
    if source.file is None:
        return None
    try:
        if loose_permissions(source.file):
            raise KeyProblem(
                f"The {source.what} passphrase file {source.file} is readable by other users.",
                f"Run: chmod 600 {source.file}",
            )
        text = source.file.read_text("utf-8")
    except FileNotFoundError:
        raise KeyProblem(
            f"The {source.what} passphrase file {source.file} named in the configuration "
            "does not exist.",
            f"Create it (chmod 600), or remove the setting and use {source.env}.",
        ) from None
    except OSError as exc:
        raise KeyProblem(
            f"Cannot read the {source.what} passphrase file {source.file}: {exc.strerror}."
        ) from None
    # Editors add a final newline; a passphrase never ends in one.
    value = text.rstrip("\r\n")
    if not value:
        raise KeyProblem(f"The {source.what} passphrase file {source.file} is empty.")
    return value


def require_passphrase(source: PassphraseSource) -> str:
    """Like :func:`read_passphrase`, for unattended use where there is nobody to ask."""
    value = read_passphrase(source)
    if value is None:
        raise KeyProblem(
            f"No passphrase for the {source.what}.",
            f"Set it in {source.describe()}.",
        )
    return value
