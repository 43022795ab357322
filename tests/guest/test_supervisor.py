from __future__ import annotations

import sys

import pytest

from guestinit.config import Restart
from guestinit.process import ProcessTable
from guestinit.supervisor import (
    GIVE_UP,
    RESTART,
    STOPPED,
    Service,
    Supervisor,
    backoff_delay,
    decide,
)


@pytest.mark.parametrize(
    ("policy", "code", "restarts", "want"),
    [
        (Restart.NEVER, 1, 0, STOPPED),
        (Restart.NEVER, 0, 0, STOPPED),
        (Restart.ON_FAILURE, 0, 0, STOPPED),
        (Restart.ON_FAILURE, 1, 0, RESTART),
        (Restart.ON_FAILURE, -9, 4, RESTART),
        (Restart.ON_FAILURE, 1, 5, GIVE_UP),
        (Restart.ALWAYS, 0, 0, RESTART),
        (Restart.ALWAYS, 0, 5, GIVE_UP),
    ],
)
def test_decide(policy: Restart, code: int, restarts: int, want: str) -> None:
    assert decide(policy, code, restarts, 5) == want


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_delay(n, 0.2, 2.0) for n in range(6)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert backoff_delay(10_000, 0.2, 2.0) == 2.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeProcs(ProcessTable):
    """Spawns nothing: records argv and lets the test end 'children'."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[str, ...]] = []
        self.exits: dict[int, object] = {}

    def spawn(self, argv, **kw):  # type: ignore[no-untyped-def, override]
        pid = 1000 + len(self.spawned)
        self.spawned.append(tuple(argv))
        self.exits[pid] = kw["on_exit"]
        return pid

    def end(self, pid: int, code: int) -> None:
        self.exits.pop(pid)(pid, code)  # type: ignore[operator]


def test_supervisor_restarts_with_backoff_then_gives_up() -> None:
    clock = FakeClock()
    procs = FakeProcs()
    sup = Supervisor(procs, max_restarts=2, backoff=1.0, backoff_max=10.0, clock=clock)
    degraded: list[tuple[str, str]] = []
    stopped: list[str] = []
    sup.on_degraded = lambda s, why: degraded.append((s.name, why))
    sup.on_stop = lambda s: stopped.append(s.name)
    svc = sup.add("d", ["/bin/d"], restart=Restart.ON_FAILURE)
    assert svc.pid == 1000
    procs.end(1000, 1)
    assert not svc.running and svc.next_start == 101.0
    assert sup.tick() == pytest.approx(1.0)  # not due yet
    assert len(procs.spawned) == 1
    clock.now = 101.0
    sup.tick()
    assert svc.pid == 1001 and svc.restarts == 1
    procs.end(1001, 1)
    assert svc.next_start == 103.0  # doubled
    clock.now = 103.0
    sup.tick()
    procs.end(1002, 2)
    assert svc.given_up and degraded == [("d", "exited 2 after 2 restarts; given up")]
    assert stopped == ["d"]
    clock.now = 1000.0
    assert sup.tick() is None and len(procs.spawned) == 3


def test_a_restart_runs_the_restart_argv() -> None:
    """nv-fabricmanager in a service VM comes back with --restart (nvidia.daemons)."""
    clock, procs = FakeClock(), FakeProcs()
    sup = Supervisor(procs, max_restarts=3, backoff=1.0, clock=clock)
    sup.add("fm", ["/usr/bin/nv-fabricmanager", "-c", "cfg"],
            restart_argv=["/usr/bin/nv-fabricmanager", "-c", "cfg", "--restart"])
    procs.end(1000, 1)
    clock.now += 1
    sup.tick()
    assert procs.spawned == [("/usr/bin/nv-fabricmanager", "-c", "cfg"),
                             ("/usr/bin/nv-fabricmanager", "-c", "cfg", "--restart")]
    plain = sup.add("d", ["/bin/d"])  # no restart_argv: the same argv again
    procs.end(plain.pid, 1)  # type: ignore[arg-type]
    clock.now += 1
    sup.tick()
    assert procs.spawned[-1] == ("/bin/d",)


def test_a_long_healthy_run_starts_the_restart_count_afresh() -> None:
    clock = FakeClock()
    procs = FakeProcs()
    sup = Supervisor(procs, max_restarts=1, backoff=1.0, stable_after=60.0, clock=clock)
    degraded: list[str] = []
    sup.on_degraded = lambda s, why: degraded.append(why)
    svc = sup.add("d", ["/bin/d"], restart=Restart.ON_FAILURE)
    procs.end(1000, 1)  # quick crash: restart 1 of 1
    clock.now += 1.0
    sup.tick()
    assert svc.restarts == 1
    clock.now += 600.0  # then ten healthy minutes
    procs.end(1001, 1)
    assert svc.restarts == 0 and svc.next_start is not None and not degraded
    clock.now += 1.0
    sup.tick()
    assert svc.restarts == 1
    procs.end(1002, 1)  # a quick crash again: its one restart is used up
    assert svc.given_up and degraded == ["exited 1 after 1 restarts; given up"]


def test_clean_exit_under_on_failure_is_a_stop_not_degraded() -> None:
    procs = FakeProcs()
    sup = Supervisor(procs, clock=FakeClock())
    stopped: list[Service] = []
    sup.on_stop = stopped.append
    svc = sup.add("d", ["/bin/d"])
    procs.end(svc.pid or 0, 0)
    assert stopped == [svc] and not svc.given_up and svc.last_status == 0


def test_no_restart_while_shutting_down() -> None:
    clock = FakeClock()
    procs = FakeProcs()
    sup = Supervisor(procs, clock=clock)
    svc = sup.add("d", ["/bin/d"], restart=Restart.ALWAYS)
    sup.shutting_down = True
    procs.end(svc.pid or 0, -15)
    clock.now += 100
    sup.tick()
    assert len(procs.spawned) == 1


def test_stop_escalates_to_sigkill_with_real_processes() -> None:
    procs = ProcessTable()
    sup = Supervisor(procs)
    code = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    sup.add("stubborn", [sys.executable, "-c", code], restart=Restart.ALWAYS)
    sup.add("polite", [sys.executable, "-c", "import time; time.sleep(60)"])
    import time

    time.sleep(0.3)  # let the stubborn one install its handler
    audit = sup.stop(["stubborn", "polite"], grace=0.5)
    assert audit[0].startswith("stubborn: pid")
    assert "killed after 0.5s grace (status -9)" in audit[0]
    assert audit[1].startswith("polite: pid") and "stopped (status -15)" in audit[1]
    assert not sup.service("stubborn").running
