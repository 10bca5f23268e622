"""`python -m bench`: our fetch against `sftp -b` on a local sshd; prints one table.

Two scenarios, each run as whole processes, interleaved (ours, sftp, ours, sftp, ...):
many small files (listing plus a round trip per file dominate) and one big file (cipher and
packet handling dominate). Each run starts from an empty destination; each copy is checked
file by file (names, sizes, sha256) before its time counts.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from bench import clients, corpus
from bench.measure import ProcessFailed, Sample, Summary, run_measured
from statements.config import SftpConfig
from tests.sshd import SshdServer, make_client_keys, running_sshd

PROCESS_TIMEOUT_S = 1800.0
SEED = 20260901
MB = 1_000_000
# Targets for ours/sftp (rates) and for our peak RSS.
SMALL_TARGET = 0.6
BIG_TARGET = 0.5
RSS_TARGET_MB = 100.0


@dataclass(frozen=True)
class Options:
    runs: int
    small_files: int
    small_kib: int
    big_mib: int
    workers: int | None
    scenarios: tuple[str, ...]
    profile: Path | None
    quick: bool


@dataclass(frozen=True)
class Scenario:
    key: str  # "small" or "big"
    label: str
    files: corpus.Corpus
    total_bytes: int

    def rate(self, seconds: float) -> float:
        """files/s for the small files, MB/s (10^6 bytes) for the big file."""
        if self.key == "small":
            return self.files.count / seconds
        return self.total_bytes / MB / seconds

    @property
    def unit(self) -> str:
        return "files/s" if self.key == "small" else "MB/s"


@dataclass
class Result:
    scenario: Scenario
    ours: list[Sample] = field(default_factory=list)
    sftp: list[Sample] = field(default_factory=list)


def parse(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="300 small files, 64 MiB, 1 run")
    parser.add_argument("--runs", type=int, help="runs per tool and scenario (default 3)")
    parser.add_argument("--small-files", type=int, help="number of small files (default 2000)")
    parser.add_argument("--small-kib", type=int, default=20, help="size of each (default 20)")
    parser.add_argument("--big-mib", type=int, help="size of the big file (default 1024)")
    parser.add_argument("--workers", type=int, help="[sftp] workers for ours (default: config's)")
    parser.add_argument("--only", choices=("small", "big"), help="run one scenario")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the timed runs, one more run of ours per scenario under py-spy;\n"
        "writes DIR/fetch-<scenario>.speedscope.json (open at speedscope.app)",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    options = Options(
        runs=args.runs or (1 if quick else 3),
        small_files=args.small_files or (300 if quick else 2000),
        small_kib=args.small_kib,
        big_mib=args.big_mib or (64 if quick else 1024),
        workers=args.workers,
        scenarios=(args.only,) if args.only else ("small", "big"),
        profile=args.profile,
        quick=quick,
    )
    if min(options.runs, options.small_files, options.small_kib, options.big_mib) < 1:
        parser.error("counts and sizes must be at least 1")
    return options


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, target: clients.Target, work: Path, options: Options) -> None:
        self.target = target
        self.work = work
        self.options = options
        self.env = clients.clean_env()

    def run_ours(self, scenario: Scenario, tag: str, wrap: Sequence[str] = ()) -> Sample:
        root = self.work / f"ours-{scenario.key}-{tag}"
        config = clients.make_project(
            root, self.target, scenario.files.folder, self.options.workers
        )
        argv = [*wrap, *clients.ours_argv(config)]
        sample = self._measure(argv, root, scenario.files, clients.inbox_of(config))
        shutil.rmtree(root)
        return sample

    def run_sftp(self, scenario: Scenario, tag: str) -> Sample:
        root = self.work / f"sftp-{scenario.key}-{tag}"
        dest = root / "dest"
        dest.mkdir(parents=True)
        batch = clients.write_get_batch(root / "get.batch", scenario.files.folder, dest)
        sample = self._measure(clients.sftp_argv(self.target, batch), root, scenario.files, dest)
        shutil.rmtree(root)
        return sample

    def _measure(self, argv: Sequence[str], root: Path, files: corpus.Corpus, dest: Path) -> Sample:
        # Write back what the previous run left dirty, so that no run pays for another's.
        os.sync()
        log_path = root / "output.log"
        sample = run_measured(
            argv, env=self.env, cwd=root, log_path=log_path, timeout_s=PROCESS_TIMEOUT_S
        )
        problem = corpus.problem_with_copy(files, dest)
        if problem is not None:
            output = log_path.read_text(errors="replace")[-2000:]
            raise ProcessFailed(f"{argv[0]} exited 0 but the copy is wrong: {problem}\n{output}")
        return sample

    def scenario(self, scenario: Scenario) -> Result:
        result = Result(scenario)
        runs = self.options.runs
        for i in range(runs):
            for tool, run, samples in (
                ("ours", self.run_ours, result.ours),
                ("sftp", self.run_sftp, result.sftp),
            ):
                sample = run(scenario, str(i))
                samples.append(sample)
                say(
                    f"  {scenario.key} {tool} run {i + 1}/{runs}: {sample.seconds:.2f} s, "
                    f"{scenario.rate(sample.seconds):,.1f} {scenario.unit}, "
                    f"{sample.max_rss_kib * 1024 / MB:.0f} MB peak RSS"
                )
        return result

    def profile(self, scenario: Scenario, out: Path) -> Path:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            raise ProcessFailed("--profile needs py-spy: .venv/bin/pip install py-spy")
        out.mkdir(parents=True, exist_ok=True)
        path = out.resolve() / f"fetch-{scenario.key}.speedscope.json"
        wrap = [py_spy, "record", "--idle", "--threads", "--rate", "250"]
        self.run_ours(scenario, "profile", [*wrap, "--format", "speedscope", "-o", str(path), "--"])
        return path


def build_scenarios(server_root: Path, options: Options) -> list[Scenario]:
    made = []
    if "small" in options.scenarios:
        size = options.small_kib * 1024
        files = corpus.small_files(server_root / "small", options.small_files, size, SEED)
        label = f"{options.small_files} x {options.small_kib} KiB"
        made.append(Scenario("small", label, files, files.total_bytes))
    if "big" in options.scenarios:
        files = corpus.big_file(server_root / "big", options.big_mib * 1024 * 1024, SEED)
        made.append(Scenario("big", f"1 x {options.big_mib} MiB", files, files.total_bytes))
    return made


def machine() -> str:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = ", " + line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores{model}; {platform.system()} {platform.release()} "
        f"{platform.machine()}; Python {platform.python_version()}"
    )


def table(results: list[Result], header: list[tuple[str, str]], options: Options) -> str:
    runs = options.runs
    lines = [f"ibkr-statements fetch vs OpenSSH sftp -b, 127.0.0.1, median of {runs} run(s)", ""]
    width = max(len(k) for k, _ in header)
    lines += [f"{key:<{width}}  {value}" for key, value in header]
    lines.append("")
    columns = f"{'scenario':<18} {'tool':<5} {'wall s (min..max)':<22} {'rate':>16} "
    columns += f"{'CPU s':>7} {'peak RSS':>9}"
    lines += [columns, "-" * len(columns)]
    verdicts = []
    for result in results:
        s = result.scenario
        medians = {}
        for tool, samples in (("ours", result.ours), ("sftp", result.sftp)):
            wall = Summary.of([x.seconds for x in samples])
            cpu = Summary.of([x.cpu_seconds for x in samples])
            rss = max(x.max_rss_kib for x in samples) * 1024 / MB
            medians[tool] = wall.median
            spread = f"{wall.median:.2f} ({wall.low:.2f}..{wall.high:.2f})"
            rate = f"{s.rate(wall.median):,.1f} {s.unit}"
            label = s.label if tool == "ours" else ""
            lines.append(
                f"{label:<18} {tool:<5} {spread:<22} {rate:>16} {cpu.median:>7.2f} {rss:>6.0f} MB"
            )
        ratio = medians["sftp"] / medians["ours"]
        goal = SMALL_TARGET if s.key == "small" else BIG_TARGET
        line = f"{'':<18} ours/sftp {s.unit}: {ratio:.2f}x (target >= {goal:.1f}x: "
        line += "met)" if ratio >= goal else "MISSED)"
        lines.append(line)
        verdicts.append(ratio >= goal)
    if results:
        rss = max(x.max_rss_kib for r in results for x in r.ours) * 1024 / MB
        met = rss < RSS_TARGET_MB
        verdicts.append(met)
        lines += [
            "",
            f"ours peak RSS {rss:.0f} MB (target < {RSS_TARGET_MB:.0f} MB: "
            + ("met)" if met else "MISSED)"),
        ]
    lines += [
        "",
        "Whole processes, spawn to exit; each copy verified (names, sizes, sha256). MB = 10^6 "
        "bytes.",
        "CPU s = user + system of the client process (sftp: with its ssh child); the sshd side "
        "is not counted.",
        "ours fsyncs each file and records it in its SQLite ledger; sftp writes without fsync.",
    ]
    if options.quick:
        lines.append(
            "--quick is a smoke test: at these sizes start-up (Python imports, connecting) "
            "weighs most, so its ratios understate ours; judge the targets on a default run."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    if not clients.CONSOLE_SCRIPT.exists():
        say(f"{clients.CONSOLE_SCRIPT} is missing: .venv/bin/pip install -e .")
        return 2
    with tempfile.TemporaryDirectory(prefix="ibkr-bench-") as tmp:
        work = Path(tmp)
        say(f"setting up sshd and keys in {work}")
        keys = make_client_keys(work / "client-keys")
        with running_sshd(work / "sshd", keys) as server:
            try:
                return _run(server, work, options)
            except ProcessFailed as exc:
                say(f"benchmark failed: {exc}")
                return 1


def _run(server: SshdServer, work: Path, options: Options) -> int:
    say("writing the corpus")
    scenarios = build_scenarios(server.root, options)
    probe = clients.make_project(
        work / "probe",
        clients.Target(server, server.ed25519_key_path),
        scenarios[0].files.folder,
        options.workers,
    )
    ours = clients.ours_negotiates(probe)
    target = clients.Target(server, server.ed25519_key_path, ours.cipher, ours.mac)
    sftp_cipher = clients.sftp_cipher(target, work)
    ours_cipher = f"{ours.cipher} + {ours.mac}" if ours.mac else ours.cipher
    bench = Bench(target, work, options)
    default_workers = SftpConfig.model_fields["workers"].default
    workers = options.workers or f"config default ({default_workers})"
    header = [
        ("machine", machine()),
        (
            "versions",
            f"paramiko {paramiko.__version__}; client {clients.openssh_version()}; "
            f"server {ours.banner}",
        ),
        ("cipher", f"ours {ours_cipher} (negotiated); sftp {sftp_cipher} (made the same)"),
        ("ours", f"workers = {workers}; ed25519 key, no passphrase (sftp: the same key)"),
        ("statements", clients.statements_location(bench.env, work)),
        ("sftp", "one connection, `get *`: files one after another, 64 x 32 KiB requests"),
    ]
    results: list[Result] = []
    profiles: list[Path] = []
    for scenario in scenarios:
        say(f"{scenario.key}: {scenario.label} ({scenario.total_bytes:,} bytes)")
        results.append(bench.scenario(scenario))
        if options.profile is not None:
            profiles.append(bench.profile(scenario, options.profile))
            say(f"  profile: {profiles[-1]}")
    print(table(results, header, options))
    for path in profiles:
        print(f"profile: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
