"""The console script's entry point: a fast start that leaves the collector as it found it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

from statements import __version__

# Runs in a fresh interpreter, as the console script does: records whether the collector was on
# while statements.cli was being imported, and whether it is on again when the command ends.
_PROBE = textwrap.dedent(
    """
    import atexit, gc, json, sys

    seen = {}

    class Probe:
        def find_spec(self, name, path=None, target=None):
            if name == "statements.cli":
                seen["collector_on_while_importing_cli"] = gc.isenabled()
            return None

    sys.meta_path.insert(0, Probe())
    atexit.register(lambda: print(json.dumps({**seen, "collector_on_at_exit": gc.isenabled()})))
    sys.argv = ["ibkr-statements", "--version"]
    from statements.entry import main
    main()
    """
)


def test_installed_console_script_starts_at_the_entry_module() -> None:
    (script,) = entry_points(group="console_scripts", name="ibkr-statements")
    assert script.value == "statements.entry:main"


def test_imports_run_with_the_collector_paused_and_the_command_with_it_on() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    version_line, probe_line = done.stdout.strip().splitlines()
    assert __version__ in version_line
    assert json.loads(probe_line) == {
        "collector_on_while_importing_cli": False,
        "collector_on_at_exit": True,
    }


def test_python_dash_m_runs_the_same_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "statements", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert __version__ in done.stdout


def test_the_console_script_loads_paramiko_without_invoke() -> None:
    # paramiko imports invoke (and invoke asyncio, unittest.mock, yaml) only for ssh_config's
    # `Match exec`, which this tool never reads: 0.1 s of every connecting command's start.
    probe = textwrap.dedent(
        """
        import json, sys
        from statements.entry import keep_out_unused_imports
        keep_out_unused_imports()
        import paramiko.config
        import statements.remote
        heavy = ("invoke", "asyncio", "unittest.mock")
        print(json.dumps({
            "loaded": [name for name in heavy if sys.modules.get(name) is not None],
            "paramiko_sees_no_invoke": paramiko.config.invoke is None,
        }))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"loaded": [], "paramiko_sees_no_invoke": True}
