"""Issue 7's scenarios (and issue 4's decrypt figures) as tools that run in turn.

A scenario is a list of tools, each a whole process prepared afresh for every run from a saved
state; the runner interleaves them (ours, reference, ours, reference, ...) so that a change in
the machine's load hits both, and checks every result file by file before its time counts.
Each round starts one tool further on (A B C, B C A, C A B, ...), so that no tool always runs
right after the same other one (with a fixed order, our 1 GiB decrypt always ran right after
`sftp -b` had written its gigabyte, and `gpg -d` always after ours: a bias the table could not
show). The first round keeps the declared order: a tool may save its first run as a state for
one declared after it (Tool.keep_first).
Before each run: the gpg-agent of the key is stopped (each run starts its own, as a nightly
run does), the files a decrypt reads are read once (both decrypt from the page cache), dirty
pages are written back (no run pays for another's writes) and, with the default
``memory="warm"``, the kernel is handed a pool of freshly used free memory.

Why the pool: on VMs with free page reporting (virtio-balloon, this machine), memory freed for
a few seconds goes back to the host, and taking it again costs about 2 s of system time per GiB
(0.2-0.3 s when the pages were freed a moment ago). Without the pool a run's time depended on
whether the run before it had just deleted a few GiB: a 1 GiB reference.sh took 4.3 s or 6.8 s
depending on what ran before it. The pool (faulted in and released right before the spawn)
gives every run the cheap case, the one a machine without a balloon always has; it is the
conservative choice for us, since ours keeps little page cache (fsutil.Writeback) and the
reference keeps all of it.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from bench import clients
from bench.clients import Login, Target
from bench.corpus import MIB, Corpus, problem_with_archive, problem_with_copy
from bench.history import OURS_MUTABLE, State
from bench.measure import ProcessFailed, Sample, run_measured
from bench.pgp import Keyring
from statements.keys.pgp import stop_agent

PROCESS_TIMEOUT_S = 3600.0
WARM_POOL_FLOOR = 256 * MIB  # the pool before any scenario's own page cache
# The no-op's runs take 0.2-0.6 s with spreads of 20-40%: in one day's invocations of three
# runs its growth ratio came out 1.26x and 1.74x; nine cost about a minute more.
NOOP_MIN_RUNS = 9
# With --max-steal, a run is measured again at most this many times; the last one counts.
STEAL_RETRIES = 4
Check = Callable[[str], str | None]  # the run's output -> what is wrong, or None


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Job:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    check: Check
    agents: tuple[Path, ...] = ()  # GnuPG homes whose agent is stopped before the run
    inputs: tuple[Path, ...] = ()  # files read before the run, so that it finds them cached


@dataclass
class Tool:
    name: str
    prepare: Callable[[Path], Job]  # given an empty folder of its own
    rate: Callable[[float], str] | None = None  # seconds -> "123 files/s"
    keep_first: Path | None = None  # move the first run's folder here (a state for others)
    samples: list[Sample] = field(default_factory=list)


@dataclass(frozen=True)
class Ratio:
    """ours/ref wall time ("time": lower is better) or ref/ours ("speed": higher is better)."""

    label: str
    ours: str
    ref: str
    kind: Literal["time", "speed"]
    target: float | None = None  # None: reported, no target
    moonshot: float | None = None


@dataclass(frozen=True)
class Added:
    """The seconds one tool's median wall time adds to another's: reported, no target."""

    label: str
    more: str
    less: str


@dataclass
class Scenario:
    key: str
    title: str
    tools: list[Tool]
    ratios: list[Ratio]
    notes: list[str] = field(default_factory=list)
    added: list[Added] = field(default_factory=list)
    # Rounds of at least this many when the runner does more than one: for sub-second runs,
    # whose medians of three moved a ratio by a third from one invocation to the next.
    min_runs: int = 1
    rss_target: bool = True  # our peak RSS is held to the target here
    page_cache_bytes: int = 0  # what one run may write (ciphertext and plaintext): the pool
    measured_again: int = 0  # runs done again for host steal over the Runner's max_steal
    kept_stolen: int = 0  # samples kept over it, after STEAL_RETRIES more tries

    def tool(self, name: str) -> Tool:
        return next(t for t in self.tools if t.name == name)


@dataclass(frozen=True)
class Context:
    """What every scenario needs: the server, the key, the clean environment, the options."""

    target: Target
    keyring: Keyring
    env: dict[str, str]
    rsa_login: Login  # the encrypted RSA-4096 key users have
    work: Path
    workers: int | None
    s2k: str  # "fast" or "calibrated": the GnuPG home the main scenarios use

    @property
    def home(self) -> Path:
        return self.keyring.home(self.s2k)


def rounds_of(runs: int, min_runs: int) -> int:
    """A scenario's rounds: ``runs``, raised to its ``min_runs`` unless one run (--quick) was
    asked for."""
    return max(runs, min_runs) if runs > 1 else runs


class Runner:
    def __init__(
        self,
        work: Path,
        runs: int,
        memory: Literal["warm", "as-is"] = "warm",
        max_steal: float | None = None,
    ) -> None:
        self.work = work
        self.runs = runs
        self.memory = memory
        self.max_steal = max_steal  # a run with more host steal is measured again (a share)

    def run(self, scenario: Scenario) -> Scenario:
        tools = scenario.tools
        rounds = rounds_of(self.runs, scenario.min_runs)
        for i in range(rounds):
            turn = i % len(tools)
            for tool in tools[turn:] + tools[:turn]:
                sample = self.once(scenario, tool, str(i))
                for again in range(1, STEAL_RETRIES + 1):
                    if not self._stolen(sample):
                        break
                    say(
                        f"  {scenario.key} {tool.name} {i + 1}/{rounds}: {sample.seconds:.2f} s "
                        f"with host steal {sample.steal:.0%}: measured again"
                    )
                    scenario.measured_again += 1
                    sample = self.once(scenario, tool, f"{i}-again{again}")
                if self._stolen(sample):
                    scenario.kept_stolen += 1
                tool.samples.append(sample)
                rate = f", {tool.rate(sample.seconds)}" if tool.rate else ""
                steal = "" if sample.steal is None else f", host steal {sample.steal:.0%}"
                busy = sample.machine_cpu_seconds
                machine = "" if busy is None else f", machine {busy:.2f} CPU s"
                say(
                    f"  {scenario.key} {tool.name} {i + 1}/{rounds}: {sample.seconds:.2f} s"
                    f"{rate}{machine}, {sample.max_rss_kib / 1024:.0f} MiB peak RSS{steal}"
                )
        return scenario

    def _stolen(self, sample: Sample) -> bool:
        limit, steal = self.max_steal, sample.steal
        return limit is not None and steal is not None and steal > limit

    def once(self, scenario: Scenario, tool: Tool, tag: str, wrap: Sequence[str] = ()) -> Sample:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", tool.name).strip("-")
        folder = self.work / "runs" / f"{scenario.key}-{slug}-{tag}"
        folder.mkdir(parents=True)
        job = tool.prepare(folder)
        for home in job.agents:
            stop_agent(home)
        for path in job.inputs:
            read_through(path)
        os.sync()
        if self.memory == "warm":
            warm_free_memory(WARM_POOL_FLOOR + scenario.page_cache_bytes)
        log_path = folder / "output.log"
        sample = run_measured(
            [*wrap, *job.argv],
            env=job.env,
            cwd=job.cwd,
            log_path=log_path,
            timeout_s=PROCESS_TIMEOUT_S,
        )
        output = log_path.read_text(errors="replace")
        problem = job.check(output)
        if problem is not None:
            raise ProcessFailed(f"{tool.name} exited 0 but {problem}\n{output[-2000:]}")
        if tool.keep_first is not None and not tool.keep_first.exists():
            tool.keep_first.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(tool.keep_first)
        else:
            shutil.rmtree(folder)
        return sample


def read_through(path: Path) -> None:
    """Read ``path`` to its end: its pages are cached for the run that follows."""
    with path.open("rb", buffering=0) as handle:
        while handle.read(1 << 20):
            pass


def warm_free_memory(size: int) -> None:
    """Fault in ``size`` bytes of anonymous memory and give them back (see the module's text)."""
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
    populate = getattr(mmap, "MAP_POPULATE", 0)
    pool = mmap.mmap(-1, size, flags=flags | populate)
    try:
        if not populate:
            for offset in range(0, size, mmap.PAGESIZE):
                pool[offset] = 1
    finally:
        pool.close()


# --- the tools -----------------------------------------------------------------------------


def _also_checking(
    prepare: Callable[[Path], Job], problem: Callable[[Path], str | None]
) -> Callable[[Path], Job]:
    """``prepare``'s job, whose check then also asks ``problem`` of the run's project folder."""

    def job(path: Path) -> Job:
        made = prepare(path)
        project = path / "project"
        return replace(made, check=_all(made.check, lambda _output: problem(project)))

    return job


def _all(*checks: Check) -> Check:
    def check(output: str) -> str | None:
        for one in checks:
            problem = one(output)
            if problem is not None:
                return problem
        return None

    return check


def _ignore_root(check: Check) -> Callable[[Path, str], str | None]:
    return lambda _root, output: check(output)


def _says(pattern: str) -> Check:
    def check(output: str) -> str | None:
        return None if re.search(pattern, output) else f"its output does not say {pattern!r}"

    return check


def ours(
    ctx: Context,
    command: str,
    remote: Path,
    *,
    state: State | None = None,
    login: Login | None = None,
    home: Path | None = None,
    check: Check,
) -> Callable[[Path], Job]:
    """Our console script in a project: a fresh one, or a copy of ``state``'s."""

    def prepare(folder: Path) -> Job:
        root = folder / "project"
        gnupg_home = home or ctx.home
        if state is None:
            config = clients.make_project(
                root,
                ctx.target,
                remote,
                gnupg_home=gnupg_home,
                login=login,
                workers=ctx.workers,
            )
        else:
            state.clone(root)
            if login is not None:
                clients.install_login(root, login)
            config = clients.write_config(
                root, ctx.target, remote, gnupg_home=gnupg_home, workers=ctx.workers
            )
        return Job(
            clients.ours_argv(config, command),
            clients.ours_env(ctx.env, _passphrase(ctx), login),
            root,
            lambda output: check(output) or _check_archive_root(config, output),
            (gnupg_home,),
        )

    return prepare


def _check_archive_root(config: Path, _output: str) -> str | None:
    return None if clients.archive_of(config).is_dir() else "it left no archive folder"


def _passphrase(ctx: Context) -> str:
    return ctx.keyring.passphrase_file.read_text()


def reference(
    ctx: Context,
    remote: Path,
    *,
    state: State | None = None,
    home: Path | None = None,
    check: Callable[[Path, str], str | None],
) -> Callable[[Path], Job]:
    """bench/reference.sh with its own state folder: a fresh one, or a copy of ``state``'s."""

    def prepare(folder: Path) -> Job:
        root = folder / "state"
        if state is None:
            root.mkdir()
        else:
            state.clone(root)
        gnupg_home = home or ctx.home
        env = clients.reference_env(
            ctx.env, ctx.target, remote, gnupg_home, ctx.keyring.passphrase_file
        )
        return Job(
            clients.reference_argv(root),
            env,
            folder,
            lambda output: check(root, output),
            (gnupg_home,),
        )

    return prepare


def sftp_get_all(ctx: Context, corpus: Corpus) -> Callable[[Path], Job]:
    """`sftp -b` with `get *`: one connection, files one after another, 64 x 32 KiB in flight."""

    def prepare(folder: Path) -> Job:
        dest = folder / "dest"
        dest.mkdir()
        batch = clients.write_get_batch(folder / "get.batch", corpus.folder, dest)
        return Job(
            clients.sftp_argv(ctx.target, batch),
            ctx.env,
            folder,
            lambda _output: problem_with_copy(corpus.cipher_digests, dest),
        )

    return prepare


GPG_DURABLE = "gpg -d, sync FILE"  # scenario 4's like-for-like reference: durable as ours


def gpg_decrypt(ctx: Context, corpus: Corpus, *, durable: bool = False) -> Callable[[Path], Job]:
    """The gpg binary alone: `gpg -d` of one file, or ONE `gpg --decrypt-files` of them all.

    ``durable`` (one file): then `sync FILE`, which fsyncs it, as ours does before it records
    the file; gpg -d leaves it in the page cache, for the kernel to write some time later.
    """

    def prepare(folder: Path) -> Job:
        home = ctx.home
        common = [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--quiet",
            "--no-tty",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(ctx.keyring.passphrase_file),
        ]
        if corpus.count == 1:
            report = corpus.reports[0]
            output = folder / report.plain_name
            argv = [*common, "--output", str(output), "--decrypt"]
            argv.append(str(corpus.folder / report.remote_name))
            if durable:
                then_sync = 'out=$1; shift; "$@"; exec sync -- "$out"'
                argv = ["sh", "-ec", then_sync, "sh", str(output), *argv]
        else:
            for report in corpus.reports:
                os.link(corpus.folder / report.remote_name, folder / report.remote_name)
            argv = [*common, "--decrypt-files", *(r.remote_name for r in corpus.reports)]
        expected = {r.plain_name: corpus.plain_digests[r.archive_path] for r in corpus.reports}

        def check(_output: str) -> str | None:
            plain = folder / "plain"
            plain.mkdir()
            for name in expected:
                (folder / name).rename(plain / name)
            return problem_with_copy(expected, plain)

        inputs = tuple(corpus.folder / r.remote_name for r in corpus.reports)
        return Job(argv, ctx.env, folder, check, (home,), inputs)

    return prepare


def _files_rate(count: int) -> Callable[[float], str]:
    return lambda seconds: f"{count / seconds:,.0f} files/s"


def _mb_rate(nbytes: int) -> Callable[[float], str]:
    return lambda seconds: f"{nbytes / 1e6 / seconds:,.1f} MB/s"


# --- the scenarios -------------------------------------------------------------------------


@dataclass(frozen=True)
class NightlyStates:
    """The server folder with the history (and, during the nightly, the new files)."""

    history: Corpus
    ours: State
    reference: State


def nightly(ctx: Context, states: NightlyStates, new: Corpus, *, calibrated: bool) -> Scenario:
    """Scenario 1: a history already archived, ``new`` new files; our `run` vs reference.sh."""
    folder = states.history.folder
    n, old = new.count, states.history.count
    home = ctx.keyring.calibrated if calibrated else None

    def ours_check(output: str) -> str | None:
        return _says(rf"fetched {n} new, skipped {old}\b")(output) or None

    def archived(config_root: Path) -> str | None:
        return problem_with_archive(new.plain_digests, config_root)

    def ours_tool(login: Login | None) -> Callable[[Path], Job]:
        prepare = ours(
            ctx, "run", folder, state=states.ours, login=login, home=home, check=ours_check
        )
        return _also_checking(prepare, lambda project: archived(project / "archive"))

    ref = reference(
        ctx,
        folder,
        state=states.reference,
        home=home,
        check=lambda root, output: (
            _says(rf"fetched and archived {n} new \({old + n} listed\)")(output)
            or problem_with_archive(new.plain_digests, root)
        ),
    )
    key = "calibrated S2K" if calibrated else f"{ctx.s2k} S2K"
    tools = [Tool("ours run", ours_tool(None)), Tool("reference.sh", ref)]
    ratios = [Ratio("nightly: run / reference", "ours run", "reference.sh", "time", 1.0, 0.8)]
    if not calibrated:
        tools.append(Tool("ours run, RSA-4096 key", ours_tool(ctx.rsa_login)))
        ratios.append(
            Ratio(
                "nightly, ours with the encrypted RSA-4096 SSH key / reference (ed25519)",
                "ours run, RSA-4096 key",
                "reference.sh",
                "time",
            )
        )
    return Scenario(
        "nightly-calibrated" if calibrated else "nightly",
        f"1. nightly: {old:,} archived, {n} new ({new.cipher_bytes / 1e6:.1f} MB); PGP key "
        f"with {key}",
        tools,
        ratios,
        page_cache_bytes=new.cipher_bytes + new.plain_bytes,
    )


def noop(ctx: Context, small: NightlyStates, large: NightlyStates) -> Scenario:
    """Scenario 2: nothing new, with a small and a large history; ours should barely grow."""
    tools = []
    for states in (small, large):
        count = states.history.count
        tools.append(
            Tool(
                f"ours run, {count:,} old",
                ours(
                    ctx,
                    "run",
                    states.history.folder,
                    state=states.ours,
                    check=_says(rf"fetched 0 new, skipped {count}\b"),
                ),
            )
        )
        tools.append(
            Tool(
                f"reference.sh, {count:,} old",
                reference(
                    ctx,
                    states.history.folder,
                    state=states.reference,
                    check=_ignore_root(_says(rf"nothing new \({count} listed\)")),
                ),
            )
        )
    s, ln = f"{small.history.count:,} old", f"{large.history.count:,} old"
    return Scenario(
        "noop",
        f"2. no-op nightly: 0 new, {small.history.count:,} vs {large.history.count:,} archived",
        tools,
        [
            Ratio(
                f"no-op growth, ours: {ln} / {s}", f"ours run, {ln}", f"ours run, {s}", "time", 1.5
            ),
            Ratio(
                f"no-op growth, reference: {ln} / {s}",
                f"reference.sh, {ln}",
                f"reference.sh, {s}",
                "time",
            ),
            Ratio(
                f"no-op, {ln}: run / reference", f"ours run, {ln}", f"reference.sh, {ln}", "time"
            ),
        ],
        # The growth ratio divides by the small history's time, which a faster start lowers;
        # the seconds added show what the larger listing costs each client (mostly the
        # server's own work: a readdir, lstat and `ls -l` line per name).
        added=[
            Added(f"{ln} adds, ours", f"ours run, {ln}", f"ours run, {s}"),
            Added(f"{ln} adds, reference", f"reference.sh, {ln}", f"reference.sh, {s}"),
        ],
        min_runs=NOOP_MIN_RUNS,
    )


def ours_archiving(
    ctx: Context,
    command: str,
    corpus: Corpus,
    state: State | None,
    check: Check = lambda _output: None,
) -> Callable[[Path], Job]:
    """Our ``command`` on ``corpus`` into a project (fresh, or ``state``'s), whose archive must
    then hold every report's plaintext."""
    return _also_checking(
        ours(ctx, command, corpus.folder, state=state, check=check),
        lambda project: problem_with_archive(corpus.plain_digests, project / "archive"),
    )


def reference_archiving(ctx: Context, corpus: Corpus) -> Callable[[Path], Job]:
    """reference.sh on ``corpus`` into an empty state: all of it new, every plaintext archived."""
    return reference(
        ctx,
        corpus.folder,
        check=lambda root, output: (
            _says(rf"fetched and archived {corpus.count} new")(output)
            or problem_with_archive(corpus.plain_digests, root)
        ),
    )


def transfer(ctx: Context, key: str, title: str, corpus: Corpus, *, big: bool) -> Scenario:
    """Scenarios 3 and 4: a first sync of ``corpus`` into empty projects.

    fetch vs `sftp -b`; decrypt (the fetched inbox) vs the gpg binary; run vs reference.sh.
    """
    folder = corpus.folder
    rate = _mb_rate(corpus.cipher_bytes) if big else _files_rate(corpus.count)
    fetched = ctx.work / "states" / f"{key}-fetched"
    fetched_state = State(fetched / "project", OURS_MUTABLE)

    def fetch_check(output: str) -> str | None:
        return _says(rf"fetched {corpus.count} new")(output)

    ours_fetch = _also_checking(
        ours(ctx, "fetch", folder, check=fetch_check),
        lambda project: problem_with_copy(corpus.cipher_digests, project / "archive" / ".inbox"),
    )

    def ours_decrypt(path: Path) -> Job:
        # Its ciphertexts cached, as gpg's are: ours drops a download from the page cache as
        # it writes it (fsutil.Writeback), and a first read from this VM's disk took 2.4-3.4 s
        # where a cached one took 1.8-2.2 s; the decrypt figure is about decrypting, not disks.
        job = ours_archiving(ctx, "decrypt", corpus, fetched_state)(path)
        inbox = path / "project" / "archive" / ".inbox"
        return replace(job, inputs=tuple(inbox / r.remote_name for r in corpus.reports))

    gpg_name = "gpg -d" if big else "ONE gpg --decrypt-files"
    tools = [
        Tool("ours fetch", ours_fetch, rate, keep_first=fetched),
        Tool("sftp -b get", sftp_get_all(ctx, corpus), rate),
        Tool("ours decrypt", ours_decrypt, rate),
        Tool(gpg_name, gpg_decrypt(ctx, corpus), rate),
        *([Tool(GPG_DURABLE, gpg_decrypt(ctx, corpus, durable=True), rate)] if big else []),
        Tool("ours run", ours_archiving(ctx, "run", corpus, None), rate),
        Tool("reference.sh", reference_archiving(ctx, corpus), rate),
    ]
    fetch_goal, decrypt_goal = (0.5, 0.9) if big else (0.6, 1.0)
    return Scenario(
        key,
        title,
        tools,
        [
            Ratio(
                "fetch: ours / sftp -b (speed)", "ours fetch", "sftp -b get", "speed", fetch_goal
            ),
            Ratio(
                f"decrypt: ours / {gpg_name} (speed)",
                "ours decrypt",
                gpg_name,
                "speed",
                decrypt_goal,
            ),
            *(
                [
                    Ratio(
                        f"decrypt: ours / {GPG_DURABLE} (speed)",
                        "ours decrypt",
                        GPG_DURABLE,
                        "speed",
                    )
                ]
                if big
                else []
            ),
            Ratio("run / reference.sh", "ours run", "reference.sh", "time", 1.0),
        ],
        page_cache_bytes=corpus.cipher_bytes + corpus.plain_bytes,
    )


def many_big(ctx: Context, title: str, corpus: Corpus) -> Scenario:
    """Scenario 5: several big reports in one night: run vs reference.sh, and our peak memory.

    Each big download holds megabytes of buffers while it runs; this is the scenario that
    showed peak memory growing with [sftp] workers (pipeline._Downloads).
    """
    return Scenario(
        "many-big",
        title,
        [
            Tool(
                "ours run",
                ours_archiving(ctx, "run", corpus, None, _says(rf"fetched {corpus.count} new")),
            ),
            Tool("reference.sh", reference_archiving(ctx, corpus)),
        ],
        [Ratio("run / reference.sh", "ours run", "reference.sh", "time", 1.0)],
        page_cache_bytes=corpus.cipher_bytes + corpus.plain_bytes,
    )


def add_twins(scenario: Scenario, label: str, pythonpath: Path) -> Scenario:
    """Each of our tools again with `statements` imported from ``pythonpath``, interleaved
    with the others: a before/after comparison under the same load."""
    tools: list[Tool] = []
    for tool in scenario.tools:
        tools.append(tool)
        if tool.name.startswith("ours"):
            tools.append(
                Tool(f"{tool.name} [{label}]", _with_path(tool.prepare, pythonpath), tool.rate)
            )
    names = {t.name for t in scenario.tools}
    ratios = list(scenario.ratios)
    for ratio in scenario.ratios:
        if ratio.ours in names and ratio.ours.startswith("ours"):
            twin_ref = f"{ratio.ref} [{label}]" if ratio.ref.startswith("ours") else ratio.ref
            ratios.append(
                Ratio(
                    f"{ratio.label} [{label}]",
                    f"{ratio.ours} [{label}]",
                    twin_ref,
                    ratio.kind,
                    ratio.target,
                    ratio.moonshot,
                )
            )
    twins = [
        Added(f"{a.label} [{label}]", f"{a.more} [{label}]", f"{a.less} [{label}]")
        for a in scenario.added
        if a.more.startswith("ours") and a.less.startswith("ours")
    ]
    scenario.tools, scenario.ratios = tools, ratios
    scenario.added = [*scenario.added, *twins]
    return scenario


def _with_path(prepare: Callable[[Path], Job], pythonpath: Path) -> Callable[[Path], Job]:
    def twin(folder: Path) -> Job:
        job = prepare(folder)
        env = {**job.env, "PYTHONPATH": str(pythonpath)}
        return replace(job, env=env)  # the same job otherwise: agents, inputs

    return twin
