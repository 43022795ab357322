"""The boot stages, named and ordered in one place, and the boot timeline."""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # the type checker sees real enums; the boot path does without enum
    from enum import StrEnum
else:
    from guestinit.choice import StrChoice as StrEnum


class Stage(StrEnum):
    EARLY = "early"
    LOG = "log"
    CONFIG = "config"
    EXTENSIONS = "extensions"  # only with kata.extension.<name>.verity_params= (Kata)
    DISCOVER = "discover"
    BENCH = "bench"  # only with guestinit.bench.bar=: not part of a normal boot
    MODULES = "modules"
    DEVICES = "devices"
    DAEMONS = "daemons"
    CDI = "cdi"
    LOCKDOWN = "lockdown"
    AGENT = "agent"
    READY = "ready"
    RUN = "run"
    SHUTDOWN = "shutdown"


class StopRequested(Exception):
    """A shutdown was asked for (signal, power button) while a stage was waiting: the
    boot ends with an orderly shutdown, not a ``failed`` frame."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BootError(Exception):
    """A fatal error in one stage: ``BootError(Stage.MODULES, "finit_module x: ENOENT")``."""

    def __init__(self, stage: Stage | str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = str(stage)
        self.reason = reason


def boottime_ns() -> int:
    """ns since the kernel started (counts suspend; what the timeline uses)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Timeline:
    """Stage start/end times on CLOCK_BOOTTIME, in the order they ran.

    ``with timeline.stage(Stage.X):`` times one stage; ``mark`` records a point
    event (e.g. one module load) as a zero-or-more length span.
    """

    __slots__ = ("_clock", "_open", "spans")

    def __init__(self, clock: object = boottime_ns) -> None:
        self._clock = clock
        self.spans: list[list[object]] = []  # [name, start_ns, end_ns]
        self._open: dict[str, list[object]] = {}

    def now(self) -> int:
        return int(self._clock())  # type: ignore[operator]

    def start(self, name: str) -> None:
        span: list[object] = [name, self.now(), -1]
        self._open[name] = span
        self.spans.append(span)

    def end(self, name: str) -> None:
        span = self._open.pop(name, None)
        if span is not None:
            span[2] = self.now()

    def add(self, name: str, start: int, end: int) -> None:
        self.spans.append([name, start, end])

    def stage(self, name: str) -> _Span:
        return _Span(self, name)

    def snapshot(self) -> list[list[object]]:
        """Closed spans, plus open ones ended now (for a ``failed`` frame)."""
        now = self.now()
        return [[n, s, e if isinstance(e, int) and e >= 0 else max(now, s)]  # type: ignore[call-overload]
                for n, s, e in self.spans]


class _Span:
    __slots__ = ("_name", "_timeline")

    def __init__(self, timeline: Timeline, name: str) -> None:
        self._timeline = timeline
        self._name = name

    def __enter__(self) -> None:
        self._timeline.start(self._name)

    def __exit__(self, *exc: object) -> None:
        self._timeline.end(self._name)
