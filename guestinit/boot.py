"""The handles every stage works through (not a config bag, not runtime state).

A stage function has the signature ``def run_<stage>(boot: Boot) -> None`` and
raises ``BootError`` to fail the boot. What a stage learns that later stages or
the ``ready`` frame need goes in ``boot.facts`` (a plain dict of msgpack-able
values: ``inventory``, ``mode``, ``modules``, ``daemons``, ``cdi``...).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from guestinit.config import Config
    from guestinit.effects import Effects
    from guestinit.kmsg import Kmsg
    from guestinit.process import ProcessTable
    from guestinit.report import Reporter
    from guestinit.stages import Timeline
    from guestinit.supervisor import Supervisor
    from guestinit.syslog import SyslogServer


MAX_AUDIT = 256  # audit events kept; older ones are counted in audit_dropped

class SideWork:
    """``fn`` on a side thread (``_thread``: ``threading`` costs an import); ``join``
    gives its result or raises its exception. Only for blocking syscalls (mounts,
    finit_module) that release the GIL, not for Python work."""

    __slots__ = ("_lock", "_outcome", "name")

    def __init__(self, name: str, fn: Callable[[], object]) -> None:
        import _thread

        self.name = name
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._outcome: list[object] = []

        def run() -> None:
            try:
                self._outcome.append(fn())
            except BaseException as exc:  # carried to join(): nothing is lost in the thread
                self._outcome.append(exc)
            finally:
                self._lock.release()

        _thread.start_new_thread(run, ())

    def join(self, timeout: float = -1) -> object:
        """The result; the thread's exception raised here; TimeoutError naming the work
        when it does not finish within ``timeout`` seconds (-1: wait as long as it takes)."""
        if not self._lock.acquire(True, timeout):
            raise TimeoutError(f"{self.name} did not finish within {timeout:g}s")
        self._lock.release()  # joinable again: a second join returns the same outcome
        if isinstance(self._outcome[0], BaseException):
            raise self._outcome[0]
        return self._outcome[0]


class Boot:
    __slots__ = (
        "_background", "audit", "audit_dropped", "cfg", "cmdline", "cmdline_from_proc",
        "effects", "facts",
        "kmsg", "procs", "reporter", "root", "stop_requested", "supervisor", "syslog",
        "timeline", "wake_fd",
    )

    def __init__(
        self,
        root: str,
        effects: Effects,
        timeline: Timeline,
        reporter: Reporter,
        kmsg: Kmsg,
        procs: ProcessTable,
        supervisor: Supervisor,
        cmdline: str,
    ) -> None:
        self.root = root  # "/" in the VM; a tmp dir in the pid-namespace tests
        self.effects = effects
        self.timeline = timeline
        self.reporter = reporter
        self.kmsg = kmsg
        self.procs = procs
        self.supervisor = supervisor
        self.cmdline = cmdline
        # No --cmdline: /proc/cmdline, read again once the early stage has mounted /proc
        # (the kernel starts PID 1 with no /proc).
        self.cmdline_from_proc = False
        self.cfg: Config | None = None  # set by the config stage
        self.syslog: SyslogServer | None = None  # set by the log stage
        self.facts: dict[str, object] = {}
        self.audit: list[str] = []  # device assignment / teardown events (a ring)
        self.audit_dropped = 0  # events the ring no longer holds
        self._background: list[SideWork] = []
        # set by the init: the shutdown reason if one was asked for, else None; a stage
        # that waits long (daemons) polls it and raises StopRequested
        self.stop_requested: Callable[[], str | None] = lambda: None
        # PID 1's signal wakeup fd (-1 until the init installs it): a stage that blocks
        # in select() adds it, so a signal ends the wait at once; then stop_requested()
        self.wake_fd = -1

    def background(self, name: str, fn: Callable[[], object]) -> None:
        """Start ``fn`` as side work whose result the boot needs later (``wait_background``)."""
        self._background.append(SideWork(name, fn))

    def wait_background(self, timeout: float = 30.0) -> list[tuple[str, object]]:
        """Wait for the side work; (name, result) pairs. An exception it raised is raised
        here; one that does not finish in ``timeout`` is a TimeoutError naming it."""
        done = []
        while self._background:
            result = self._background[0].join(timeout)
            done.append((self._background.pop(0).name, result))
        return done

    def path(self, *parts: str) -> str:
        """``boot.path("proc", "cmdline")`` -> ``<root>/proc/cmdline``."""
        return os.path.join(self.root, *parts)

    def config(self) -> Config:
        if self.cfg is None:
            raise RuntimeError("config used before the config stage")
        return self.cfg

    def audit_event(self, text: str) -> None:
        """Keep ``text`` in the audit ring (the last MAX_AUDIT events) and log it."""
        self.audit.append(text)
        if len(self.audit) > MAX_AUDIT:
            del self.audit[0]
            self.audit_dropped += 1
        self.kmsg.log(6, f"audit: {text}")
