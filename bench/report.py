"""The table `python -m bench` prints: absolute figures per tool, then the ratios and targets."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.measure import Sample, Summary
from bench.scenarios import Ratio, Scenario, Tool

# The "peak RSS < 100 MB", read strictly: 100,000,000 bytes, 95.4 MiB.
RSS_TARGET_MIB = 100e6 / (1 << 20)


@dataclass(frozen=True)
class Verdict:
    label: str
    value: float
    text: str
    met: bool | None  # None: no target


def median_seconds(tool: Tool) -> float:
    return Summary.of([s.seconds for s in tool.samples]).median


def ratio_value(scenario: Scenario, ratio: Ratio) -> float:
    ours = median_seconds(scenario.tool(ratio.ours))
    ref = median_seconds(scenario.tool(ratio.ref))
    return ours / ref if ratio.kind == "time" else ref / ours


def machine_cpu_seconds(tool: Tool) -> float | None:
    """The median of the machine's CPU seconds over ``tool``'s runs; None when unknown."""
    known = [s.machine_cpu_seconds for s in tool.samples if s.machine_cpu_seconds is not None]
    return statistics.median(known) if known else None


def floor_text(scenario: Scenario, ratio: Ratio, cores: int) -> str | None:
    """The best ``ratio`` ours could reach at the CPU it costs the machine, on ``cores``.

    However well a tool overlaps its work, its wall time is at least the CPU seconds the
    machine spends for it (its own, the sshd's, gpg's, the kernel's) over the core count: a
    ratio worse than this floor is lost to waiting, one at the floor only to CPU.
    """
    busy = machine_cpu_seconds(scenario.tool(ratio.ours))
    if busy is None or cores < 1:
        return None
    floor = busy / cores
    ref = median_seconds(scenario.tool(ratio.ref))
    best = floor / ref if ratio.kind == "time" else ref / floor
    wall = median_seconds(scenario.tool(ratio.ours))
    return (
        f"{best:.2f}x at best at this CPU cost: the machine worked {busy:.2f} CPU s for ours, "
        f"on {cores} cores at least {floor:.2f} s (its wall: {wall:.2f} s)"
    )


def verdict(scenario: Scenario, ratio: Ratio) -> Verdict:
    value = ratio_value(scenario, ratio)
    if ratio.target is None:
        return Verdict(ratio.label, value, f"{value:.2f}x", None)
    op = "<=" if ratio.kind == "time" else ">="
    met = value <= ratio.target if ratio.kind == "time" else value >= ratio.target
    text = f"{value:.2f}x (target {op} {ratio.target:.1f}x: {'met' if met else 'MISSED'}"
    if ratio.moonshot is not None:
        moon = value <= ratio.moonshot if ratio.kind == "time" else value >= ratio.moonshot
        text += f"; moonshot {ratio.moonshot:.1f}x: {'met' if moon else 'not yet'}"
    return Verdict(ratio.label, value, text + ")", met)


def rss_verdict(scenario: Scenario, twin: str = "") -> Verdict | None:
    """Our largest peak RSS in the scenario (of the --compare twins when ``twin`` is set)."""
    ours = [
        s
        for t in scenario.tools
        if t.name.startswith("ours")
        and t.name.endswith(f" [{twin}]" if twin else "")
        and (twin or " [" not in t.name)
        for s in t.samples
    ]
    if not ours or not scenario.rss_target:
        return None
    peak = max(s.max_rss_kib for s in ours) / 1024
    met = peak < RSS_TARGET_MIB
    goal = f"target < 100 MB = {RSS_TARGET_MIB:.1f} MiB"
    text = f"{peak:.0f} MiB ({goal}: {'met' if met else 'MISSED'})"
    return Verdict(f"ours peak RSS{f' [{twin}]' if twin else ''}", peak, text, met)


def steal_text(samples: Sequence[Sample]) -> str:
    """The host's steal over ``samples``: median (max), in percent; "-" when unknown."""
    shares = [s.steal for s in samples if s.steal is not None]
    if not shares:
        return "-"
    return f"{statistics.median(shares) * 100:.0f} ({max(shares) * 100:.0f})"


def _twins(scenario: Scenario) -> list[str]:
    return sorted({t.name.rsplit(" [", 1)[1][:-1] for t in scenario.tools if " [" in t.name})


def scenario_table(scenario: Scenario) -> list[str]:
    width = max(24, *(len(t.name) for t in scenario.tools))
    head = f"  {'tool':<{width}} {'wall s: median (min..max)':<27} {'spread':>6} "
    head += f"{'rate':>15} {'CPU s':>7} {'machine':>8} {'peak RSS':>9} {'steal %':>8}"
    lines = ["", scenario.title, head, "  " + "-" * (len(head) - 2)]
    for tool in scenario.tools:
        if not tool.samples:
            continue
        wall = Summary.of([s.seconds for s in tool.samples])
        cpu = Summary.of([s.cpu_seconds for s in tool.samples])
        rss = max(s.max_rss_kib for s in tool.samples) / 1024
        spread = (wall.high - wall.low) / wall.median * 100 if wall.median else 0.0
        rate = tool.rate(wall.median) if tool.rate else ""
        figures = f"{wall.median:.2f} ({wall.low:.2f}..{wall.high:.2f})"
        busy = machine_cpu_seconds(tool)
        machine = "-" if busy is None else f"{busy:.2f}"
        lines.append(
            f"  {tool.name:<{width}} {figures:<27} {spread:>5.0f}% {rate:>15} "
            f"{cpu.median:>7.2f} {machine:>8} {rss:>5.0f} MiB {steal_text(tool.samples):>8}"
        )
    cores = os.cpu_count() or 0
    for ratio in scenario.ratios:
        if scenario.tool(ratio.ours).samples and scenario.tool(ratio.ref).samples:
            v = verdict(scenario, ratio)
            lines.append(f"  -> {v.label}: {v.text}")
            if v.met is False and (floor := floor_text(scenario, ratio, cores)) is not None:
                lines.append(f"     {floor}")
    for added in scenario.added:
        more, less = scenario.tool(added.more), scenario.tool(added.less)
        if more.samples and less.samples:
            seconds = median_seconds(more) - median_seconds(less)
            lines.append(f"  -> {added.label}: {seconds:+.2f} s")
    for twin in ["", *_twins(scenario)]:
        peak = rss_verdict(scenario, twin)
        if peak is not None:
            lines.append(f"  -> {peak.label}: {peak.text}")
    if scenario.measured_again:
        kept = f"; {scenario.kept_stolen} kept over it" if scenario.kept_stolen else ""
        lines.append(f"  runs measured again for host steal: {scenario.measured_again}{kept}")
    lines += [f"  {note}" for note in scenario.notes]
    return lines


def summary(scenarios: list[Scenario]) -> list[str]:
    verdicts = []
    for scenario in scenarios:
        for ratio in scenario.ratios:
            if scenario.tool(ratio.ours).samples and scenario.tool(ratio.ref).samples:
                v = verdict(scenario, ratio)
                verdicts.append(Verdict(f"{scenario.key}: {v.label}", v.value, v.text, v.met))
        for twin in ["", *_twins(scenario)]:
            rss = rss_verdict(scenario, twin)
            if rss is not None:
                verdicts.append(
                    Verdict(f"{scenario.key}: {rss.label}", rss.value, rss.text, rss.met)
                )
    lines = [""]
    twins = sorted({label for sc in scenarios for label in _twins(sc)})
    for twin in ["", *twins]:
        judged = [
            v
            for v in verdicts
            if v.met is not None and (v.label.endswith(f"[{twin}]") if twin else "[" not in v.label)
        ]
        missed = [v for v in judged if not v.met]
        name = f" [{twin}]" if twin else ""
        lines.append(f"targets met{name}: {len(judged) - len(missed)} of {len(judged)}")
        lines += [f"  MISSED {v.label}: {v.text}" for v in missed]
    return lines
