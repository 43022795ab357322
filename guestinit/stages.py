"""The boot stages, named and ordered in one place, the boot timeline, and the end of the
interpreter's start under the image's executable (rootfs/staticinit.c).

The executable starts CPython's core phase only: built-in and frozen imports, all the boot
needs. The main phase (path imports, the codec registry, sys.stdout, __main__) runs after
the ready frame, or earlier at the first import from the image's files, which the
executable's last finder serves (docs/guest.md, "Two start phases")."""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # the type checker sees real enums; the boot path does without enum
    from collections.abc import Callable
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


def finish_start(trigger: str) -> tuple[str, int, int] | None:
    """Run the main phase unless it ran; (what ran it, start ns, end ns) on CLOCK_BOOTTIME,
    or None when this is not the image's executable."""
    if "_guestinit_start" not in sys.builtin_module_names:
        return None  # not even an import attempt: nothing else is imported after ready
    import _guestinit_start  # type: ignore[import-not-found]

    _guestinit_start.finish(trigger)
    done = _guestinit_start.state()
    return None if done is None else (str(done[0]), int(done[1]), int(done[2]))


def start_after_ready(timeline: Timeline, log: Callable[[int, str], None]) -> dict[str, object]:
    """The main phase once the ready frame is out: its span on the ``timeline``
    (``start:main``), a ``log`` line (kmsg) when an import ran it before ready, and what
    ``status`` shows: the modules the boot imported and what ran the main phase (``ready``,
    or that import)."""
    info: dict[str, object] = {"main_phase": None, "boot_modules": sorted(sys.modules)}
    try:
        done = finish_start("ready")
    except Exception as exc:  # the frozen modules still serve; say what is missing
        log(3, f"the interpreter's main start phase: {type(exc).__name__}: {exc}")
        return info
    if done is not None:
        info["main_phase"], start_ns, end_ns = done
        timeline.add("start:main", start_ns, end_ns)
        if done[0] != "ready":
            log(6, f"the interpreter's main start phase ran before ready, for an import of "
                f"{done[0]} (not frozen into the init)")
    return info
