"""`--profile`: one more run of a tool under py-spy, and the frames that took its wall time.

py-spy samples every thread of our process (and of its Python children) at 250 Hz, idle ones
included (``--idle``), so the profile shows where the wall time goes, waiting included. The
output is py-spy's collapsed-stack format ("frame;frame;... count"), which speedscope.app and
flamegraph.pl open; :func:`top_frames` summarises it per thread.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

from bench.measure import ProcessFailed
from bench.scenarios import Runner, Scenario, Tool

RATE_HZ = 250
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise ProcessFailed("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


def record(runner: Runner, scenario: Scenario, tool: Tool, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", tool.name).strip("-")
    path = out.resolve() / f"{scenario.key}-{slug}.txt"
    wrap = [py_spy(), "record", "--idle", "--threads", "--subprocesses", "--rate", str(RATE_HZ)]
    wrap += ["--nonblocking", "--format", "raw", "-o", str(path), "--"]
    sample = runner.once(scenario, tool, "profile", wrap)
    path.with_suffix(".wall").write_text(f"{sample.seconds:.3f}\n")
    return path


# Frames every stack passes through (click, threading, the import machinery): left out.
_PLUMBING = ("threading.py", "core.py", "decorators.py", "<frozen importlib._bootstrap>")


def _frame(text: str) -> str:
    found = _FRAME.match(text.strip())
    if found is None:
        return text.strip()
    return f"{found['func']} ({Path(found['file']).name})"


def _thread(process: str, thread: str) -> str:
    """ "ibkr-statements run / archiver" from py-spy's process and thread labels."""
    # py-spy labels a process whose command line it could not read (it had exited) with "".
    command = process.split(":", 1)[-1].strip('"').split() or ["?"]
    program = next((Path(w).name for w in command if "ibkr-statements" in w), Path(command[0]).name)
    name = thread.split(":", 1)[-1].strip() if ":" in thread else thread
    return f"{program} {command[-1]} / {re.sub(r'-[0-9]+', '', name)}"


def top_frames(path: Path, limit: int = 12) -> str:
    """Per thread: its seconds of samples, and the frames that hold the most of them."""
    threads: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text(errors="replace").splitlines():
        found = _LINE.match(line)
        if found is None:
            continue
        count = int(found["count"])
        parts = found["stack"].split(";")
        if (
            len(parts) < 3
            or not parts[0].startswith("process ")
            or not parts[1].startswith("thread")
        ):
            continue
        key = _thread(parts[0], parts[1])
        threads[key] += count
        frames = [_frame(p) for p in parts[2:]]
        for frame in dict.fromkeys(f for f in frames if not f.endswith(_PLUMBING_SUFFIXES)):
            inclusive[key][frame] += count
    wall = path.with_suffix(".wall")
    seconds = float(wall.read_text()) if wall.exists() else 0.0
    lines = [f"profile {path.name}: {seconds:.2f} s wall; per thread, seconds in each frame"]
    for key, count in threads.most_common(5):
        lines.append(f"  {key}: {count / RATE_HZ:.2f} s of samples")
        shown = [(f, n) for f, n in inclusive[key].most_common() if n < 0.97 * count][:limit]
        lines += [f"    {n / RATE_HZ:6.2f} s  {frame}" for frame, n in shown]
    return "\n".join(lines)


_PLUMBING_SUFFIXES = tuple(f"({name})" for name in _PLUMBING)
