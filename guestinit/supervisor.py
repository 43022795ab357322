"""Keeps daemons (and the agent) running: restart policy, backoff, give-up.

The policy is pure (``decide``, ``backoff_delay``) and tested with a fake
clock; ``Supervisor`` applies it to children of a ``ProcessTable``. A service
that exceeds its restart limit is given up and reported ``degraded``.
"""

from __future__ import annotations

import time

from guestinit.values import Restart

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable, Sequence

    from guestinit.process import ProcessTable
else:  # signal.py imports enum (boot path); the C module has everything used here
    import _signal as signal

RESTART = "restart"
STOPPED = "stopped"  # ended as its policy allows
GIVE_UP = "give-up"


def decide(policy: Restart, code: int, restarts: int, max_restarts: int) -> str:
    """What to do when a service exits with ``code`` after ``restarts`` restarts."""
    if policy is Restart.NEVER or (policy is Restart.ON_FAILURE and code == 0):
        return STOPPED
    if restarts >= max_restarts:
        return GIVE_UP
    return RESTART


def backoff_delay(restarts: int, base: float, cap: float) -> float:
    """Delay before restart number ``restarts + 1``: base, 2*base, 4*base ... cap."""
    return float(min(cap, base * (2.0 ** min(restarts, 32))))


class Service:
    __slots__ = (
        "argv", "given_up", "last_status", "name", "next_start", "pid", "restart",
        "restart_argv", "restarts", "spawn_kw", "started_at", "stopping",
    )

    def __init__(self, name: str, argv: Sequence[str], restart: Restart,
                 spawn_kw: dict[str, object]) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.restart_argv = self.argv  # what a restart runs (nv-fabricmanager: --restart)
        self.restart = restart
        self.spawn_kw = spawn_kw
        self.pid: int | None = None
        self.restarts = 0
        self.given_up = False
        self.stopping = False
        self.last_status: int | None = None
        self.next_start: float | None = None
        self.started_at: float | None = None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def status(self) -> dict[str, object]:
        return {
            "name": self.name, "pid": self.pid, "running": self.running,
            "restarts": self.restarts, "given_up": self.given_up,
            "last_status": self.last_status, "restart": str(self.restart),
        }


class Supervisor:
    __slots__ = ("_clock", "_procs", "backoff", "backoff_max", "max_restarts", "on_degraded",
                 "on_stop", "services", "shutting_down", "stable_after")

    def __init__(
        self,
        procs: ProcessTable,
        *,
        max_restarts: int = 5,
        backoff: float = 0.2,
        backoff_max: float = 10.0,
        stable_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._procs = procs
        self._clock = clock
        self.max_restarts = max_restarts
        self.backoff = backoff
        self.backoff_max = backoff_max
        # a run this long counts as healthy: the next failure starts the count afresh
        # (max_restarts limits a crash loop, not crashes over the life of the VM)
        self.stable_after = stable_after
        self.services: dict[str, Service] = {}
        self.shutting_down = False
        # hooks set by the init: a service given up, a service stopped for good
        self.on_degraded: Callable[[Service, str], None] = lambda s, why: None
        self.on_stop: Callable[[Service], None] = lambda s: None

    def add(self, name: str, argv: Sequence[str], *, restart: Restart = Restart.ON_FAILURE,
            restart_argv: Sequence[str] | None = None, **spawn_kw: object) -> Service:
        """Start ``name``; a restart runs ``restart_argv`` when given (else ``argv``)."""
        if name in self.services and self.services[name].running:
            raise ValueError(f"service {name} is already running")
        service = Service(name, argv, restart, spawn_kw)
        if restart_argv is not None:
            service.restart_argv = tuple(restart_argv)
        self.services[name] = service
        self._start(service)
        return service

    def service(self, name: str) -> Service:
        return self.services[name]

    def _start(self, service: Service, again: bool = False) -> None:
        service.next_start = None
        service.pid = self._procs.spawn(
            service.restart_argv if again else service.argv,
            on_exit=lambda pid, code: self._exited(service, pid, code),
            **service.spawn_kw,  # type: ignore[arg-type]
        )
        service.started_at = self._clock()

    def _exited(self, service: Service, pid: int, code: int) -> None:
        if service.pid != pid:
            return
        service.pid = None
        service.last_status = code
        if self.shutting_down or service.stopping:
            return
        if service.started_at is not None and \
                self._clock() - service.started_at >= self.stable_after:
            service.restarts = 0
        action = decide(service.restart, code, service.restarts, self.max_restarts)
        if action == RESTART:
            service.next_start = self._clock() + backoff_delay(
                service.restarts, self.backoff, self.backoff_max)
            return
        if action == GIVE_UP:
            service.given_up = True
            self.on_degraded(service, f"exited {code} after {service.restarts} restarts; given up")
        self.on_stop(service)

    def tick(self) -> float | None:
        """Start services whose backoff elapsed; seconds until the next is due."""
        now = self._clock()
        due: float | None = None
        for service in self.services.values():
            if service.next_start is None or self.shutting_down:
                continue
            if service.next_start <= now:
                service.restarts += 1
                try:
                    self._start(service, again=True)
                except OSError as exc:
                    service.pid = None
                    self._exited_spawn_failure(service, exc)
            else:
                wait = service.next_start - now
                due = wait if due is None else min(due, wait)
        return due

    def _exited_spawn_failure(self, service: Service, exc: OSError) -> None:
        service.given_up = True
        service.next_start = None
        self.on_degraded(service, f"restart failed: {exc}")
        self.on_stop(service)

    def stop(self, names: Sequence[str], grace: float) -> list[str]:
        """SIGTERM the named services, SIGKILL what is left after ``grace``; audit lines."""
        audit: list[str] = []
        targets = [self.services[n] for n in names if n in self.services]
        # pids first: reaping while we wait for one clears the others' records
        pids = [(service, service.pid) for service in targets]
        for service, pid in pids:
            service.stopping = True
            service.next_start = None
            if pid is not None:
                self._procs.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for service, pid in pids:
            if pid is None:
                audit.append(f"{service.name}: not running")
                continue
            code = self._procs.wait(pid, max(0.0, deadline - time.monotonic()))
            if code is None:
                self._procs.kill(pid, signal.SIGKILL)
                code = self._procs.wait(pid, 5.0)
                audit.append(f"{service.name}: pid {pid} killed after {grace}s grace "
                             f"(status {code})")
            else:
                audit.append(f"{service.name}: pid {pid} stopped (status {code})")
            service.pid = None
            service.last_status = code
        return audit
