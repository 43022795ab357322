"""PID 1's machinery: run the stages, the main loop, shutdown, the failure path.

PID 1 must never exit (the kernel panics), so every way out ends in
``power_off``: ``reboot(POWER_OFF)`` in a VM; in a PID namespace the same call
ends the namespace (its init dies of SIGINT), which the tests observe.
"""

from __future__ import annotations

import gc
import os
import select
import time

from guestinit import mounts, wire
from guestinit.agent import agent_exit_reason
from guestinit.boot import Boot
from guestinit.effects import RB_POWER_OFF
from guestinit.stages import BootError, Stage, StopRequested, start_after_ready
from guestinit.sysfs import read_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable, Iterable

    from guestinit.control import ControlServer
    from guestinit.hotplug import Hotplug
    from guestinit.supervisor import Service
else:  # signal.py imports enum (boot path); the C module has everything used here
    import _signal as signal

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGPWR, signal.SIGINT)
WATCHED = (*SHUTDOWN_SIGNALS, signal.SIGCHLD, signal.SIGHUP)
SIGNAL_NAMES: dict[int, str] = {
    signal.SIGTERM: "SIGTERM", signal.SIGPWR: "SIGPWR", signal.SIGINT: "SIGINT",
    signal.SIGCHLD: "SIGCHLD", signal.SIGHUP: "SIGHUP",
}


def _noop(signum: int, frame: object) -> None:
    """Python-level handler: the real delivery is the wakeup fd byte."""


class Init:
    """Owns the boot: ``Init(boot).run(stages)`` never returns when PID 1."""

    __slots__ = ("_control_server", "_stop_reason", "_unwatch", "_wake_r", "boot", "current",
                 "extra_fds", "hotplug", "loop_iterations", "start_info", "started")

    def __init__(self, boot: Boot) -> None:
        self.boot = boot
        self.current: str = Stage.EARLY
        self._stop_reason: str | None = None
        self._wake_r = -1
        self.loop_iterations = 0
        self.started = time.monotonic()
        self.extra_fds: dict[int, Callable[[], object]] = {}  # e.g. the power button
        self._unwatch: list[int] = []  # extra fds whose device went away
        self._control_server: ControlServer | None = None
        self.hotplug: Hotplug | None = None  # after ready, with the hotplug setting
        self.start_info: dict[str, object] = {}  # the interpreter's start (stages.py)

    # -- signals -----------------------------------------------------------
    def install_signals(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_r = r
        self.boot.wake_fd = r
        for sig in WATCHED:
            signal.signal(sig, _noop)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def _drain_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 256)
        except BlockingIOError:
            return
        for signum in data:
            if signum in SHUTDOWN_SIGNALS and self._stop_reason is None:
                self._stop_reason = f"signal {SIGNAL_NAMES.get(signum, signum)}"

    def _poll_stop(self) -> str | None:
        self._drain_signals()
        return self._stop_reason

    # -- boot --------------------------------------------------------------
    def run(self, stages: Iterable[tuple[Stage, Callable[[Boot], None]]]) -> None:
        boot = self.boot
        boot.supervisor.on_degraded = self._degraded
        boot.supervisor.on_stop = self._service_stopped
        boot.stop_requested = self._poll_stop
        try:
            self.install_signals()
            for stage, fn in stages:
                self.current = stage
                self._run_stage(stage, fn)
        except StopRequested as exc:
            self.shutdown(f"{exc.reason}, during stage {self.current}")
        except BootError as exc:
            self.fail(exc.stage, exc.reason)
        except BaseException as exc:  # a bug in guestinit takes the same path
            self.fail(self.current, _describe(exc))
        try:
            self.current = Stage.RUN
            self.main_loop()
            self.shutdown(self._stop_reason or "main loop ended")
        except BaseException as exc:
            self.fail(self.current, _describe(exc))

    def _run_stage(self, stage: Stage, fn: Callable[[Boot], None]) -> None:
        boot = self.boot
        with boot.timeline.stage(stage):
            if boot.cfg is not None and boot.cfg.str("inject") == stage:
                raise RuntimeError(f"fault injected at stage {stage} (guestinit.inject)")
            fn(boot)
        boot.reporter.progress(stage, "done")
        boot.kmsg.log(7, f"stage {stage} done")

    def run_ready(self, boot: Boot) -> None:
        """The ready stage: the power button and the control socket (both before the
        frame: whoever reads it may ask at once), the report channel, the frame."""
        self._watch_power_button()
        self._control_server = self._control()
        if not boot.reporter.open(wait=2.0):
            boot.kmsg.log(3, f"report channel {boot.reporter.uri} did not open; using the "
                          "console")
            boot.reporter.configure("console")
        boot.timeline.end(Stage.READY)  # the ready frame carries its own stage, closed
        boot.reporter.send(wire.FrameType.READY, **ready_fields(boot))

    def _watch_power_button(self) -> None:
        """Before ``ready``: the host may ask for a powerdown as soon as it reads it."""
        from guestinit import powerbutton

        fd = powerbutton.open_button(self.boot.root)
        if fd is None:
            self.boot.kmsg.log(6, "no power button input device: powerdown requests "
                               "arrive only as signals")
            return

        def on_event() -> None:
            try:
                hit = powerbutton.read_pressed(fd)
            except OSError as exc:
                self.boot.kmsg.log(4, f"power button: {exc}; no longer watched")
                self._unwatch.append(fd)
                return
            if hit and self._stop_reason is None:
                self._stop_reason = "power button (ACPI powerdown request)"

        self.extra_fds[fd] = on_event
        self.boot.kmsg.log(6, "watching the power button")

    # -- running -----------------------------------------------------------
    def main_loop(self) -> None:
        boot = self.boot
        poller = select.poll()
        handlers: dict[int, Callable[[], object]] = {self._wake_r: self._drain_signals}
        if boot.syslog is not None:
            handlers[boot.syslog.fileno()] = boot.syslog.drain
        control = self._control_server
        if control is not None:
            handlers[control.fileno()] = control.handle
        handlers.update(self.extra_fds)
        self.start_info = start_after_ready(boot.timeline, boot.kmsg.log)
        if not gc.isenabled():  # off since the start (__main__.main, staticinit.c)
            # the boot's objects stay out of every later collection; cycles left as garbage
            # by the boot (a few caught exceptions' frames) are not collected
            gc.freeze()
            gc.enable()
        hotplug = self._start_hotplug()
        if hotplug is not None:
            handlers[hotplug.fileno()] = hotplug.on_readable
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        while self._stop_reason is None:
            boot.procs.reap()
            due = boot.supervisor.tick()
            if hotplug is not None and (wait := hotplug.tick()) is not None:
                due = wait if due is None else min(due, wait)
            timeout_ms = 1000 if due is None else max(1, int(due * 1000))
            for fd, _ in poller.poll(timeout_ms):
                handlers[fd]()
            while self._unwatch:
                fd = self._unwatch.pop()
                poller.unregister(fd)
                os.close(fd)
            self.loop_iterations += 1
        if control is not None:
            control.close()
        if hotplug is not None:
            hotplug.close()

    def _start_hotplug(self) -> Hotplug | None:
        """After the ready frame (off the boot path): the uevent monitor, when asked for."""
        boot = self.boot
        if boot.cfg is None or not boot.cfg.bool("hotplug"):
            return None
        from guestinit.nvidia.hotplug import start

        try:
            self.hotplug = start(boot)
        except Exception as exc:  # after ready: the VM runs on without hot-plug
            boot.kmsg.log(3, f"hotplug: not started: {_describe(exc)}")
            boot.reporter.progress("hotplug", "warning", f"not started: {_describe(exc)}")
        return self.hotplug

    def _control(self) -> ControlServer | None:
        from guestinit.control import ControlServer

        path = self.boot.path("run/guestinit/control")
        try:
            return ControlServer(path, self.status)
        except OSError as exc:
            self.boot.kmsg.log(3, f"control socket {path}: {exc}")
            return None

    def status(self) -> dict[str, object]:
        boot = self.boot
        services = []
        for service in boot.supervisor.services.values():
            entry = service.status()
            entry["rss"] = _rss(boot.root, service.pid)
            services.append(entry)
        return {
            "stage": str(self.current),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "timeline": boot.timeline.snapshot(),
            "daemons": services,
            "orphans_reaped": boot.procs.orphans_reaped,
            "frames": {"sent": boot.reporter.sent, "dropped": boot.reporter.dropped,
                       "recent": list(boot.reporter.recent)},
            "syslog": boot.syslog.stats() if boot.syslog is not None else None,
            "self_rss": _rss(boot.root, os.getpid()),
            "gc": {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()},
            "start": self.start_info,
            "devices": (self.hotplug.status() if self.hotplug is not None else
                        {"devices": boot.facts.gpu_maps()}),
            "audit": list(boot.audit[-50:]),
            "audit_dropped": boot.audit_dropped + max(0, len(boot.audit) - 50),
        }

    def _degraded(self, service: Service, reason: str) -> None:
        self.boot.kmsg.log(3, f"{service.name} degraded: {reason}")
        self.boot.reporter.send(wire.FrameType.DEGRADED, name=service.name, reason=reason,
                                restarts=service.restarts)

    def _service_stopped(self, service: Service) -> None:
        cfg = self.boot.cfg
        if service.name == "agent" and cfg is not None and cfg.bool("agent.shutdown_on_exit"):
            self._stop_reason = agent_exit_reason(service.last_status)

    # -- the ways out ------------------------------------------------------
    def shutdown(self, reason: str) -> None:
        boot = self.boot
        self.current = Stage.SHUTDOWN
        boot.kmsg.log(5, f"shutdown: {reason}")
        from guestinit.kmsg import kernel_marks  # off the boot path: read at shutdown

        marks = kernel_marks(os.path.join(boot.root, "dev/kmsg"))  # before /dev goes
        audit = self.teardown()
        # every assignment and release of the VM's life, then the teardown's own lines
        audit = [*boot.device_history(), *audit]
        boot.reporter.send(wire.FrameType.SHUTDOWN, reason=reason, audit=audit,
                           timeline=boot.timeline.snapshot(), kernel=marks)
        self.power_off()

    def teardown(self) -> list[str]:
        """Agent, then daemons (grace, then SIGKILL), then everyone else (``sweep``),
        sync, unmount; audit lines."""
        boot = self.boot
        sup = boot.supervisor
        sup.shutting_down = True
        grace = boot.cfg.float("shutdown.grace") if boot.cfg is not None else 2.0
        audit: list[str] = []
        try:
            if "agent" in sup.services:
                audit += sup.stop(["agent"], grace)
            audit += sup.stop([n for n in sup.services if n != "agent"], grace)
            from guestinit.leftovers import sweep

            audit += sweep(boot, grace)
            if boot.facts.gpus:
                from guestinit.nvidia.devices import audit_teardown

                audit += audit_teardown(boot)
            if boot.syslog is not None:
                boot.syslog.drain()
                boot.syslog.close()
            try:
                boot.wait_background(timeout=5.0)  # nothing mounts behind the unmounts
            except (OSError, TimeoutError) as exc:
                audit.append(f"background work: {exc}")
            boot.effects.sync()
            audit.append("sync")
            info = read_text("/proc/self/mountinfo", (OSError,)) or ""
            audit += mounts.apply_teardown(mounts.plan_teardown(info, boot.root), boot.effects)
        except Exception as exc:  # teardown is best effort: we power off regardless
            audit.append(f"teardown error: {_describe(exc)}")
        for line in audit:
            boot.audit_event(line)
        return audit

    def fail(self, stage: str, reason: str) -> None:
        """Fatal: say why (``failed`` frame), tear down, power off. Never returns."""
        boot = self.boot
        try:
            boot.kmsg.log(2, f"boot failed in stage {stage}: {reason}")
            boot.timeline.end(stage)
            _rescue_transport(boot)
            boot.reporter.send(wire.FrameType.FAILED, stage=str(stage), reason=reason,
                               timeline=boot.timeline.snapshot())
            self.teardown()
        finally:
            self.power_off()

    def power_off(self) -> None:
        boot = self.boot
        boot.reporter.spill_to_console()  # what the report channel could not take
        boot.reporter.close()
        try:
            boot.effects.sync()
            boot.effects.reboot(RB_POWER_OFF)
        except Exception as exc:  # OSError; ImportError when libc's binding is what failed
            boot.kmsg.log(2, f"power off failed: {_describe(exc)}")
        if boot.root != "/" or os.getpid() != 1:
            os._exit(3)  # outside a VM (tests, --root): nothing to panic
        while True:  # PID 1 must not exit; wait for the VMM to pull the plug
            time.sleep(3600)


def ready_fields(boot: Boot) -> dict[str, object]:
    return {"timeline": boot.timeline.snapshot(), **boot.facts.ready_fields(),
            "daemons": [s.status() for s in boot.supervisor.services.values()]}


def _rescue_transport(boot: Boot) -> None:
    """Before a ``failed`` frame: make sure the report channel exists if at all possible.

    A failure in the config stage (or earlier) comes before the report URI is
    known and before virtio_console is loaded; read the URI leniently and load
    the baked early modules so the host still learns why.
    """
    if boot.reporter.connected:
        return
    from guestinit.early import lenient_config

    lenient = lenient_config(boot)
    if boot.reporter.uri is None:
        boot.reporter.configure(lenient.str("report"))
    if boot.reporter.open():
        return
    if boot.facts.modules is None:  # the modules stage has not run
        try:
            from guestinit import kmod

            kmod.load_early(boot, lenient.words("modules"))
        except Exception as exc:
            boot.kmsg.log(3, f"loading the report channel's modules failed: {_describe(exc)}")
    boot.reporter.open(wait=2.0)


def _describe(exc: BaseException) -> str:
    # the innermost frame, without importing traceback (7 ms on the boot path)
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
             if tb is not None else "")
    return f"{type(exc).__name__}: {exc}{where}"


def _rss(root: str, pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        import psutil
    except ImportError:  # the image has it; a test's executable may not find it
        return None

    psutil.PROCFS_PATH = os.path.join(root, "proc")
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None

