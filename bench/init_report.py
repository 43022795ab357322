"""What ``guestinit-bench init`` found: the samples, the table people read and the gate."""

from __future__ import annotations

import statistics

TARGET_RATIO = 3.0  # the target: the init's median at most 3x a bare interpreter's
EXEC_TO_EARLY = "exec -> early"  # host spawn to the first stage: unshare, interpreter, imports
READY_TO_HOST = "ready -> host"  # ready stage end to the frame read on the host


class Sample:
    """One init run: host seconds spawn -> ready, and ms per phase of the way there."""

    def __init__(self, seconds: float, phases: dict[str, float]) -> None:
        self.seconds = seconds
        self.phases = phases


class Results:
    def __init__(self) -> None:
        self.init_ms: list[float] = []
        self.python_ms: list[float] = []
        self.phases: dict[str, list[float]] = {}  # in first-seen order

    def add(self, python_s: float, sample: Sample) -> None:
        self.python_ms.append(python_s * 1e3)
        self.init_ms.append(sample.seconds * 1e3)
        for name, value in sample.phases.items():
            self.phases.setdefault(name, []).append(value)

    def ratio(self) -> float:
        return statistics.median(self.init_ms) / statistics.median(self.python_ms)

    def stage_names(self) -> list[str]:
        return [n for n in self.phases if n not in (EXEC_TO_EARLY, READY_TO_HOST)]


def _row(label: str, values: list[float], width: int) -> str:
    nums = (statistics.median(values), min(values), max(values))
    return f"  {label:<{width}}" + "".join(f"  {v:>8.1f}" for v in nums)


def table(res: Results) -> str:
    width = 26
    head = f"  {'':<{width}}  {'median':>8}  {'min':>8}  {'max':>8}   (ms)"
    ratio = res.ratio()
    met = "met" if ratio <= TARGET_RATIO else "not met"
    out = [head,
           _row("python3 -I -S -c pass", res.python_ms, width),
           _row("guestinit exec -> ready", res.init_ms, width),
           f"  {'ratio (median)':<{width}}  {ratio:>8.2f}   target <= {TARGET_RATIO:g}: {met}",
           "",
           f"where the time goes (median of {len(res.init_ms)} ready frames, CLOCK_BOOTTIME):"]
    names = list(res.phases)
    pwidth = max(width, *(len(n) + 2 for n in names)) if names else width
    out.append(f"  {'':<{pwidth}}  {'median':>8}  {'min':>8}  {'max':>8}   (ms)")
    for name in names:
        # sub-spans ("discover:pci") run inside their stage: indented, not added up
        label = f"  {name}" if ":" in name else name
        out.append(_row(label, res.phases[name], pwidth))
    out.append(f"  ({EXEC_TO_EARLY}: unshare, interpreter start, site and imports before "
               "the first stage;")
    out.append(f"   {READY_TO_HOST}: from the end of the ready stage to the frame read here)")
    return "\n".join(out)


def gate_line(ratio: float, gate: float | None) -> tuple[bool, str | None]:
    """(passed, what to print) for the median ``ratio`` against ``--gate``; no gate passes."""
    if gate is None:
        return True, None
    if ratio > gate:
        return False, f"gate: median ratio {ratio:.3f} exceeds the gate {gate:g}: FAILED"
    return True, f"gate: median ratio {ratio:.3f} within the gate {gate:g}: passed"
