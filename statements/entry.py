"""The console script's entry point: the command line, reached sooner.

Importing pydantic, click and our modules makes some 31,000 objects that live as long as the
process, and the collector walked them over and over while they were being made (62 collections
that found 595 objects of garbage): 17 ms of every command's 0.2 s start here (`ibkr-statements
status`, 21 runs: 218 -> 202 ms). :func:`statements.cli.main` freezes what they left once it
starts, so the collector never walks them again.

paramiko imports invoke, for the `Match exec` lines of an ssh_config file, which this tool never
reads (its settings are its own config's), and invoke imports asyncio, unittest.mock and a
yaml parser: 0.1 s of the start of every command that connects (`import paramiko`, 15 runs:
267 -> 163 ms). paramiko takes an invoke that fails to import for one not installed, and a None
in sys.modules makes the import fail; the console script owns its process, so it may.
"""

from __future__ import annotations

import gc
import sys

# What the console script never imports: a None in sys.modules makes `import NAME` fail.
NOT_IMPORTED = ("invoke",)


def keep_out_unused_imports() -> None:
    """Make `import invoke` fail in this process, unless something has imported it already."""
    for name in NOT_IMPORTED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main() -> None:
    """`ibkr-statements`: what :func:`statements.cli.main` does, reached sooner."""
    keep_out_unused_imports()
    gc.disable()
    try:
        from statements.cli import main as run_command_line
    finally:
        gc.enable()
    run_command_line()
