"""`python -m bench`: issue 7's nightly benchmark; prints one table.

Against a real OpenSSH sshd on 127.0.0.1, with a corpus made here from a fixed seed (Flex-named
XML reports, encrypted to the project's PGP key with the gpg binary), each scenario runs whole
processes in turn, ours and the reference, and checks every result before its time counts:

  1. nightly    20,000 reports already archived, 50 new: our `run` vs bench/reference.sh
                (sftp -b listing, comm against its list, sftp -b get, one gpg --decrypt-files,
                mv into <account>/<year>/); also ours with an encrypted RSA-4096 SSH key
  1b. nightly-calibrated   the same with the PGP key as `keys pgp` protects it (bench/pgp.py);
                with --calibrated (about 1.5 minutes more)
  2. noop       nothing new, 200 vs 20,000 archived: how our run grows with the history
                (as a ratio, and in seconds beside the seconds it adds to reference.sh)
  3. first-sync 2,000 x 20 KiB into an empty project: fetch vs sftp -b; decrypt vs ONE
                gpg --decrypt-files (issue 4); run vs reference.sh
  4. big        one 1 GiB report: fetch vs sftp -b (same cipher); decrypt vs gpg -d, and vs
                gpg -d then `sync FILE` (durable, as ours); run vs reference.sh
  5. many-big   8 reports of 48 MiB in one night: run vs reference.sh, and our peak memory
                with several big downloads at once

Both tools log in with the same unencrypted ed25519 key (ssh-agent would be needed for sftp with
a passphrase) and use the same cipher, the same GnuPG home and the same PGP key.

Every run also records the host's steal (bench/measure.py): on a shared VM whose neighbours take
a fifth of its CPU time, a run is the host's figure more than the tool's. Judge the targets on a
run whose steal column stays at a few percent (--max-steal measures a run again, up to four
times, when its steal is over the limit). It also records the CPU time of the whole machine
while a tool ran, sshd and gpg-agent included ("machine"): no tool takes less wall time than that
over the core count, so a missed target is shown with the best ratio it allows. SIGTERM or
Ctrl-C stops the sshd and the agents and deletes the work folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

import paramiko

from bench import clients, corpus, history, measure, pgp, report, scenarios
from bench.clients import Login, Target
from bench.corpus import KIB, MIB, Corpus
from bench.history import OURS_MUTABLE, REFERENCE_MUTABLE, State
from bench.measure import GNU_TIME, ProcessFailed
from bench.scenarios import Context, NightlyStates, Runner, Scenario, say
from statements.config import SftpConfig
from statements.keys.pgp import stop_agent
from tests.sshd import SshdServer, make_client_keys, running_sshd

SEED = 20260901
NIGHT = date(2026, 9, 1)  # the night measured; the history ends the day before
ACCOUNTS = 200  # an adviser's client accounts; five Flex queries each per day
ALL = ("nightly", "noop", "first-sync", "big", "many-big", "nightly-calibrated")
DEFAULT = ("nightly", "noop", "first-sync", "big", "many-big")
MANY_BIG = 8  # reports in scenario 5, each past pipeline's 16 MiB thresholds


@dataclass(frozen=True)
class Options:
    runs: int
    history: int
    small_history: int
    new: int
    first_sync: int
    first_sync_kib: int
    big_mib: int
    many_big_mib: int
    pgp_bits: int
    s2k: str
    history_by_run: bool
    workers: int | None
    scenarios: tuple[str, ...]
    profile: Path | None
    memory: Literal["warm", "as-is"]
    compare: tuple[str, Path] | None
    quick: bool
    max_steal: float | None = None  # a share of the CPU time, 0..1


def parse(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test of under a minute: 2,000/200 history, 10 new, 100 x 20 KiB,\n"
        "64 MiB, RSA-2048 PGP key, 1 run",
    )
    parser.add_argument(
        "--runs",
        type=int,
        help=f"runs per tool (default 3; the no-op's at least {scenarios.NOOP_MIN_RUNS})",
    )
    parser.add_argument(
        "--memory",
        choices=("warm", "as-is"),
        default="warm",
        help="warm (default): before each run, fault in and free a pool of memory, so that no\n"
        "run pays the host for fresh pages while another does (see bench/scenarios.py);\n"
        "as-is: leave memory as the run before left it",
    )
    parser.add_argument(
        "--max-steal",
        type=float,
        metavar="PERCENT",
        help="measure a run again (up to "
        f"{scenarios.STEAL_RETRIES} times) when the hypervisor took more than\n"
        "PERCENT of the CPU time while it ran (see 'steal %%'); off by default",
    )
    parser.add_argument("--history", type=int, help="reports already archived (default 20000)")
    parser.add_argument("--small-history", type=int, help="the no-op's small history (200)")
    parser.add_argument("--new", type=int, help="new reports in the nightly (default 50)")
    parser.add_argument("--first-sync", type=int, help="reports in the first sync (2000)")
    parser.add_argument("--first-sync-kib", type=int, default=20, help="their size (20)")
    parser.add_argument("--big-mib", type=int, help="the big report's size (default 1024)")
    parser.add_argument(
        "--many-big-mib", type=int, help="the size of scenario 5's reports (default 48)"
    )
    parser.add_argument("--pgp-bits", type=int, help="RSA size of the PGP key (default 4096)")
    parser.add_argument(
        "--s2k",
        choices=("fast", "calibrated"),
        default="fast",
        help="the PGP key protection for scenarios 1-4 (default fast: s2k-count 65536;\n"
        "calibrated: as `keys pgp` made it, 0.25-1 s more per file here)",
    )
    parser.add_argument(
        "--calibrated",
        action="store_true",
        help="also run the nightly with the key as `keys pgp` protects it (nightly-calibrated)",
    )
    parser.add_argument(
        "--history-by-run",
        action="store_true",
        help="make the archived history with one `run` (a timed first sync of the whole\n"
        "history: 8-10 minutes for 20,000 here) instead of through the ledger's own calls",
    )
    parser.add_argument("--workers", type=int, help="[sftp] workers for ours (default: config's)")
    parser.add_argument(
        "--only",
        help=f"comma-separated scenarios to run, of: {', '.join(ALL)}\n"
        f"(default: {', '.join(DEFAULT)})",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the timed runs, one more run of each of ours under py-spy\n"
        "(--subprocesses --idle); writes DIR/<scenario>-<tool>.txt (collapsed stacks:\n"
        "open at speedscope.app) and prints the top frames",
    )
    parser.add_argument(
        "--compare",
        metavar="LABEL=PATH",
        help="also run each of our tools with `statements` imported from PATH (PYTHONPATH),\n"
        "interleaved with the others, shown as '<tool> [LABEL]': before/after under one load",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    compare = None
    if args.compare:
        label, _, path = args.compare.partition("=")
        if not path or not (Path(path) / "statements").is_dir():
            parser.error("--compare wants LABEL=PATH, PATH holding a statements/ package")
        compare = (label, Path(path).resolve())
    chosen = DEFAULT if not args.only else tuple(s.strip() for s in args.only.split(","))
    if args.calibrated and "nightly-calibrated" not in chosen:
        chosen = (*chosen, "nightly-calibrated")
    unknown = [s for s in chosen if s not in ALL]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    options = Options(
        runs=args.runs or (1 if quick else 3),
        history=args.history or (2000 if quick else 20_000),
        small_history=args.small_history or 200,
        new=args.new or (10 if quick else 50),
        first_sync=args.first_sync or (100 if quick else 2000),
        first_sync_kib=args.first_sync_kib,
        big_mib=args.big_mib or (64 if quick else 1024),
        many_big_mib=args.many_big_mib or (17 if quick else 48),
        pgp_bits=args.pgp_bits or (2048 if quick else 4096),
        s2k=args.s2k,
        history_by_run=bool(args.history_by_run),
        workers=args.workers,
        scenarios=chosen,
        profile=args.profile,
        memory=args.memory,
        compare=compare,
        quick=quick,
        max_steal=None if args.max_steal is None else args.max_steal / 100,
    )
    if options.max_steal is not None and not 0 < options.max_steal < 1:
        parser.error("--max-steal wants a percentage between 0 and 100")
    if min(options.runs, options.history, options.small_history, options.new) < 1:
        parser.error("counts and sizes must be at least 1")
    if options.small_history > options.history:
        parser.error("--small-history must not exceed --history")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    for needed, fix in (
        (clients.CONSOLE_SCRIPT, ".venv/bin/pip install -e ."),
        (Path(GNU_TIME), "apt-get install -y time"),
    ):
        if not needed.exists():
            say(f"{needed} is missing: {fix}")
            return 2
    # SIGTERM (a `kill`, a CI timeout) unwinds like Ctrl-C: the sshd, the agents and the
    # temporary folder of gigabytes are cleaned up instead of left behind.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ibkr-bench-") as tmp:
        work = Path(tmp)
        say(f"setting up sshd and keys in {work}")
        keys = make_client_keys(work / "client-keys")
        with running_sshd(work / "sshd", keys) as server:
            try:
                code = _run(server, work, options, started)
            except ProcessFailed as exc:
                say(f"benchmark failed: {exc}")
                code = 1
            finally:
                for home in (
                    work / "pgp" / "pgp-project" / "keys" / "gnupg",
                    work / "pgp" / "gnupg-fast",
                ):
                    stop_agent(home)
    return code


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@dataclass(frozen=True)
class Corpora:
    history: Corpus
    small_history: Corpus
    new: Corpus
    first_sync: Corpus | None
    big: Corpus | None
    many_big: Corpus | None


def make_corpora(server: SshdServer, work: Path, keyring: pgp.Keyring, o: Options) -> Corpora:
    rng = random.Random(SEED)
    accounts = corpus.accounts(ACCOUNTS, rng)
    root = server.root

    def encrypt(plain: Path, names: list[str], folder: Path) -> None:
        pgp.encrypt_to(keyring, plain, names, folder)

    def make(key: str, names: list[str], sizes: list[int]) -> Corpus:
        return corpus.make(root / key, work / "plain" / key, names, sizes, SEED, encrypt)

    # History: small files (5-50 KiB), so that 20,000 of them stay around 400 MB.
    old_names = corpus.flex_names(o.history, accounts, NIGHT - timedelta(days=1))
    hist = make("history", old_names, corpus.log_uniform_sizes(o.history, 5 * KIB, 50 * KIB, rng))
    small_folder = root / "small-history"
    small_folder.mkdir()
    small_reports = hist.reports[: o.small_history]
    for r in small_reports:
        os.link(hist.folder / r.remote_name, small_folder / r.remote_name)
    small = Corpus(
        small_folder,
        small_reports,
        hist.plain,
        {r.remote_name: hist.cipher_digests[r.remote_name] for r in small_reports},
        {r.archive_path: hist.plain_digests[r.archive_path] for r in small_reports},
    )
    new_names = corpus.flex_names(o.new, accounts, NIGHT)
    new = make("new", new_names, corpus.log_uniform_sizes(o.new, 5 * KIB, 5 * MIB, rng))
    first = big = many = None
    if "first-sync" in o.scenarios:
        names = corpus.flex_names(o.first_sync, accounts, date(2025, 12, 31))
        first = make("first-sync", names, [o.first_sync_kib * KIB] * o.first_sync)
    if "big" in o.scenarios:
        big = make("big", [f"{accounts[0]}.Trade_History.20250101.20251231.xml"], [o.big_mib * MIB])
    if "many-big" in o.scenarios:
        names = [f"{a}.Trade_History.20250101.20251231.xml" for a in accounts[1 : 1 + MANY_BIG]]
        many = make("many-big", names, [o.many_big_mib * MIB] * MANY_BIG)
    return Corpora(hist, small, new, first, big, many)


def make_history(
    ctx: Context, name: str, hist: Corpus, o: Options
) -> tuple[NightlyStates, float | None]:
    """Ours and the reference's archived state for ``hist``; the first-sync time if by run."""
    states = ctx.work / "states"
    project = states / f"{name}-ours"
    config = clients.make_project(
        project, ctx.target, hist.folder, gnupg_home=ctx.keyring.fast, workers=ctx.workers
    )
    seconds = None
    if o.history_by_run:
        say(f"  first sync of {hist.count:,} reports by `run` (fast S2K key) ...")
        stop_agent(ctx.keyring.fast)
        started = time.perf_counter()
        done = subprocess.run(
            clients.ours_argv(config, "run"),
            env=clients.ours_env(ctx.env, ctx.keyring.passphrase_file.read_text()),
            cwd=project,
            capture_output=True,
            text=True,
            timeout=4 * 3600,
            check=False,
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise ProcessFailed(f"the history's first sync failed:\n{done.stderr[-2000:]}")
        say(f"  ... {seconds:.0f} s: {done.stdout.strip()}")
    else:
        history.seed_ours(config, ctx.target, hist, fetched_on=NIGHT)
    history.check_seeded(clients.archive_of(config), hist)
    ref = states / f"{name}-reference"
    history.seed_reference(ref, ctx.target, hist, clients.archive_of(config))
    return NightlyStates(hist, State(project, OURS_MUTABLE), State(ref, REFERENCE_MUTABLE)), seconds


def machine() -> str:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = ", " + line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores{model}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}"
    )


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _noop_runs(o: Options) -> str:
    rounds = scenarios.rounds_of(o.runs, scenarios.NOOP_MIN_RUNS)
    return f" ({rounds} for the no-op)" if "noop" in o.scenarios and rounds != o.runs else ""


def _run(server: SshdServer, work: Path, o: Options, started: float) -> int:
    load_before = load()
    jiffies_before = measure.cpu_jiffies()
    env = {**clients.clean_env(work / "pycache"), "COLUMNS": "200"}
    clients.compile_package(env, work)
    if o.compare is not None:
        clients.compile_package({**env, "PYTHONPATH": str(o.compare[1])}, work)
    say(f"making the PGP key (RSA-{o.pgp_bits}) with `ibkr-statements keys pgp`")
    keyring = pgp.make_keyring(work / "pgp", o.pgp_bits, env)
    calibrated_count = pgp.agent_count(keyring.calibrated)
    stored = sorted(pgp.stored_counts(keyring.calibrated))
    probe = clients.make_project(
        work / "probe",
        Target(server, server.ed25519_key_path),
        server.root,
        gnupg_home=keyring.fast,
    )
    ours = clients.ours_negotiates(probe)
    target = Target(server, server.ed25519_key_path, ours.cipher, ours.mac)
    sftp_cipher = clients.sftp_cipher(target, work)
    ctx = Context(
        target=target,
        keyring=keyring,
        env=env,
        rsa_login=Login(server.client_key_path, server.client_key_passphrase),
        work=work,
        workers=o.workers,
        s2k=o.s2k,
    )
    say("writing and encrypting the corpus")
    corpora = make_corpora(server, work, keyring, o)
    unlock = pgp.unlock_seconds(
        keyring, corpora.history.folder / corpora.history.reports[0].remote_name, 5
    )
    needs_history = {"nightly", "noop", "nightly-calibrated"} & set(o.scenarios)
    first_sync_seconds = None
    large = small = None
    if needs_history:
        say(f"archiving the history: {corpora.history.count:,} reports")
        large, first_sync_seconds = make_history(ctx, "history", corpora.history, o)
        if "noop" in o.scenarios:
            say(f"archiving the small history: {corpora.small_history.count:,} reports")
            small, _ = make_history(ctx, "small-history", corpora.small_history, o)

    runner = Runner(work, o.runs, o.memory, o.max_steal)
    done: list[Scenario] = []
    profiles: list[Path] = []
    for key in o.scenarios:
        scenario = _scenario(key, ctx, corpora, large, small, o)
        if o.compare is not None:
            scenarios.add_twins(scenario, *o.compare)
        say(scenario.title)
        linked = key.startswith("nightly")
        if linked:
            corpus.link_into(corpora.history.folder, [corpora.new])
        try:
            done.append(runner.run(scenario))
            if o.profile is not None:
                profiles += _profile(runner, scenario, o.profile)
        finally:
            if linked:
                corpus.unlink_from(corpora.history.folder, corpora.new)

    header = [
        ("machine", machine()),
        ("load average", f"{load_before} before, {load()} after (1, 5, 15 min)"),
        ("host steal", _steal(measure.steal_between(jiffies_before, measure.cpu_jiffies()))),
        *(
            [("steal gate", f"a run with more than {o.max_steal:.0%} steal was measured again")]
            if o.max_steal is not None
            else []
        ),
        (
            "versions",
            f"paramiko {paramiko.__version__}; {clients.version_of(['ssh', '-V'])}; "
            f"{clients.version_of(['gpg', '--version'])}; server {ours.banner}",
        ),
        ("cipher", f"ours {_cipher(ours)} (negotiated); sftp and reference.sh {sftp_cipher}"),
        (
            "SSH login",
            "ed25519 without passphrase for both; also ours with an encrypted RSA-4096 key",
        ),
        (
            "PGP key",
            f"RSA-{o.pgp_bits} with passphrase, made by `keys pgp`; its gpg-agent calibrates "
            f"s2k-count {calibrated_count:,} (key stored with {', '.join(map(str, stored))})",
        ),
        (
            "unlock per file",
            f"gpg -d of a small report: {unlock['calibrated']:.3f} s with the calibrated key, "
            f"{unlock['fast']:.3f} s re-protected with s2k-count {pgp.FAST_S2K_COUNT:,} "
            f"(median of 5); scenarios 1-4 use: {o.s2k}",
        ),
        (
            "memory",
            "warm: each run starts with a freshly freed pool of 256 MiB + what it writes"
            if o.memory == "warm"
            else "as-is: each run inherits the memory the run before it freed",
        ),
        (
            "corpus",
            f"history {corpora.history.count:,} x 5-50 KiB log-uniform "
            f"({corpora.history.cipher_bytes / 1e6:,.0f} MB); new "
            f"{corpora.new.count} x 5 KiB-5 MiB log-uniform ({corpora.new.cipher_bytes / 1e6:.1f} "
            "MB); XML encrypted by gpg to the project key, --compress-algo none",
        ),
        (
            "history",
            "made by one `run`" + (f" in {first_sync_seconds:.0f} s" if first_sync_seconds else "")
            if o.history_by_run
            else "written through Ledger.record_fetched_many/complete (see bench/history.py)",
        ),
        (
            "ours",
            f"workers = {o.workers or SftpConfig.model_fields['workers'].default}; "
            f"statements from {clients.statements_location(env, work)}",
        ),
        *([("compare", f"[{o.compare[0]}]: statements from {o.compare[1]}")] if o.compare else []),
        (
            "runs",
            f"{o.runs} per tool{_noop_runs(o)}, interleaved (each round starts one tool on); "
            f"wall time spawn to exit; total {(time.monotonic() - started) / 60:.1f} min",
        ),
    ]
    width = max(len(k) for k, _ in header)
    lines = ["ibkr-statements vs OpenSSH sftp -b, bench/reference.sh and gpg on 127.0.0.1", ""]
    lines += [f"{key:<{width}}  {value}" for key, value in header]
    for scenario in done:
        lines += report.scenario_table(scenario)
    if first_sync_seconds is not None:
        lines.append(
            f"\nbonus: first sync of {corpora.history.count:,} reports by one `run`: "
            f"{first_sync_seconds:.0f} s"
        )
    lines += report.summary(done)
    lines += [
        "",
        "Ratios compare medians measured in this run. time: ours/ref wall time (lower is "
        "better); speed: ref/ours (higher is better).",
        "spread = (max - min) / median of a tool's runs: the machine's noise. ours fsyncs every "
        "file and its ledger; sftp, gpg and reference.sh do not (but 'gpg -d, sync FILE').",
        "CPU s and peak RSS are of the whole process tree the tool waited for (GNU time); the "
        "sshd and gpg-agent sides are not counted. machine = CPU s of the whole machine while "
        "the tool ran (every process and the kernel, from /proc/stat; writeback of what a "
        "tool left dirty comes after it): a tool takes at least machine / cores s, and a "
        "missed target shows that best ratio under it.",
        "steal % = the share of both cores' time the hypervisor gave to other guests during a "
        "tool's runs, median (max): above a few percent, figures are the host's as much as the "
        "tools' (and ours, which keeps both cores busy, lost more to it here than the "
        "references did).",
    ]
    if o.quick:
        lines.append(
            "--quick is a smoke test: at these sizes start-up weighs most; judge the targets "
            "on a default run."
        )
    print("\n".join(lines))
    for path in profiles:
        print(f"profile: {path}")
    return 0


def _steal(share: float | None) -> str:
    if share is None:
        return "unknown (no /proc/stat)"
    return f"{share:.1%} of both cores' time went to other guests while the benchmark ran"


def _cipher(n: clients.Negotiated) -> str:
    return f"{n.cipher} + {n.mac}" if n.mac else n.cipher


def _scenario(
    key: str,
    ctx: Context,
    corpora: Corpora,
    large: NightlyStates | None,
    small: NightlyStates | None,
    o: Options,
) -> Scenario:
    if key in ("nightly", "nightly-calibrated"):
        assert large is not None
        return scenarios.nightly(ctx, large, corpora.new, calibrated=key == "nightly-calibrated")
    if key == "noop":
        assert large is not None and small is not None
        return scenarios.noop(ctx, small, large)
    if key == "first-sync":
        assert corpora.first_sync is not None
        c = corpora.first_sync
        title = f"3. first sync: {c.count:,} x {o.first_sync_kib} KiB into an empty project"
        return scenarios.transfer(ctx, key, title, c, big=False)
    if key == "many-big":
        assert corpora.many_big is not None
        c = corpora.many_big
        title = f"5. many big: {c.count} x {o.many_big_mib} MiB in one night"
        return scenarios.many_big(ctx, title, c)
    assert corpora.big is not None
    c = corpora.big
    title = f"4. big file: 1 x {o.big_mib:,} MiB ({c.cipher_bytes / 1e6:,.0f} MB encrypted)"
    return scenarios.transfer(ctx, key, title, c, big=True)


def _profile(runner: Runner, scenario: Scenario, out: Path) -> list[Path]:
    from bench import profile

    made = []
    for tool in scenario.tools:
        if tool.name.startswith("ours"):
            path = profile.record(runner, scenario, tool, out)
            made.append(path)
            say(profile.top_frames(path))
    return made


if __name__ == "__main__":
    sys.exit(main())
