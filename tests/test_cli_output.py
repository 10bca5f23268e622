"""What the command line prints, and what it costs to start it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from statements import cli


def test_plain_lines_reach_the_terminal_without_its_control_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A file name from the server or a message from gpg ends up in these lines: an escape
    # sequence in one must not recolour, retitle or rewrite the user's terminal.
    cli.out.print("failed: U1.\x1b]0;pwned\x07xml\x1b[2K\r: bad\tpacket")
    cli.err.print("quarantined: a\x08b\x7fc")
    printed = capsys.readouterr()
    assert printed.out == "failed: U1.?]0;pwned?xml?[2K?: bad\tpacket\n"
    assert printed.err == "quarantined: a?b?c\n"


def test_styled_text_and_tables_still_print(capsys: pytest.CaptureFixture[str]) -> None:
    from rich.table import Table

    table = Table(title="Recent runs")
    table.add_column("result")
    table.add_row("ok [sftp] a:smile:b")
    cli.out.print(table)
    cli.err.print(cli._styled(("error: ", "bold red"), "no key for U1.\x1b[2Jxml"))
    printed = capsys.readouterr()
    assert "ok [sftp] a:smile:b" in printed.out  # no markup, no emoji
    assert printed.err == "error: no key for U1.?[2Jxml\n"


def test_the_commands_that_print_plain_lines_start_without_rich() -> None:
    # rich took 25-37 ms of every start (decrypt, run, fetch print nothing else); a module-level
    # import of it anywhere on their path brings that back.
    probe = (
        "import sys, statements.cli, statements.pipeline, statements.lock; "
        "print(sorted(m for m in sys.modules if m == 'rich' or m.startswith('rich.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
