"""The handles every stage works through (not a config bag, not runtime state).

A stage function has the signature ``def run_<stage>(boot: Boot) -> None`` and
raises ``BootError`` to fail the boot. What a stage learns that later stages or
the ``ready`` frame need goes in ``boot.facts`` (``Facts``: typed attributes, each
written once by the stage named beside it; nothing re-parses a string into a mode, and
``Facts.ready_fields`` is the one place that turns them into the frame's maps).
"""

from __future__ import annotations

import os

from guestinit.values import Fabric, Mode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from guestinit.config import Config
    from guestinit.effects import Effects
    from guestinit.kmsg import Kmsg
    from guestinit.pci import Accelerator, Kind
    from guestinit.process import ProcessTable
    from guestinit.report import Reporter
    from guestinit.stages import Timeline
    from guestinit.supervisor import Supervisor
    from guestinit.syslog import SyslogServer


class AssignedGpu:
    """One GPU the devices stage gave a node (``index``: its rank in PCI bus order, CDI's
    ``nvidia.com/gpu=N`` and the audit's gpuN), with its MIG instances' nodes."""

    __slots__ = ("bdf", "index", "mig", "minor", "model", "node", "uuid")

    def __init__(self, index: int, bdf: str, uuid: str, model: str, minor: int,
                 node: dict[str, object], mig: list[dict[str, object]]) -> None:
        self.index = index
        self.bdf = bdf
        self.uuid = uuid
        self.model = model
        self.minor = minor
        self.node = node  # /dev/nvidiaM as a CDI device node map
        self.mig = mig  # [{"gi": N, "nodes": [...]}] for GPU instances with access caps

    def to_map(self) -> dict[str, object]:
        out: dict[str, object] = {"index": self.index, "bdf": self.bdf, "uuid": self.uuid,
                                  "model": self.model, "minor": self.minor, "node": self.node}
        if self.mig:
            out["mig"] = self.mig
        return out


class Facts:
    __slots__ = ("agent", "bench", "cdi", "daemons", "device_nodes", "extensions", "fabric",
                 "gpus", "inventory", "lockdown", "mode", "modules", "mounts", "pci")

    def __init__(self) -> None:
        self.mounts: list[str] = []  # early (and its deferred mounts): what was mounted
        self.extensions: dict[str, object] | None = None  # extensions: Kata's images
        self.mode = Mode.CPU  # discover: never AUTO once decided
        self.fabric = Fabric.NONE  # discover: the NVLink fabric beside GPUs
        self.inventory: list[Accelerator] = []  # discover: devices that matched a profile
        self.pci: list[dict[str, object]] = []  # discover: every device, briefly (ready)
        self.bench: dict[str, object] | None = None  # bench: bar-map figures
        self.modules: list[str] | None = None  # modules; None: the stage has not run
        self.gpus: list[AssignedGpu] = []  # devices, in PCI bus order
        self.device_nodes: dict[str, list[dict[str, object]]] = {}  # devices: control, imex, other
        self.daemons: list[str] = []  # daemons: started, in order
        self.cdi: list[str] = []  # cdi: spec files written
        self.lockdown = False  # lockdown: modules_disabled written
        self.agent: dict[str, object] | None = None  # agent: argv, pid, ready, ready_by...

    def of_kind(self, kind: Kind) -> list[Accelerator]:
        return [a for a in self.inventory if a.kind == kind]

    def gpu_maps(self) -> list[dict[str, object]]:
        """The GPUs assigned now, by index (``status``'s ``devices``, hot-plug's too)."""
        return [g.to_map() for g in sorted(self.gpus, key=lambda g: g.index)]

    def ready_fields(self) -> dict[str, object]:
        """The facts the ``ready`` frame carries (the timeline and daemons come from the init)."""
        out: dict[str, object] = {
            "inventory": {"devices": [a.to_map() for a in self.inventory], "pci": self.pci,
                          "fabric": str(self.fabric)},
            "mode": str(self.mode),
            "modules": list(self.modules or ()),
        }
        if self.bench is not None:
            out["bench"] = self.bench
        if self.agent is not None:
            out["agent"] = self.agent
        if self.extensions is not None:
            out["extensions"] = self.extensions
        return out


MAX_AUDIT = 256  # audit events kept; older ones are counted in audit_dropped
MAX_DEVICE_LOG = 256  # device events the shutdown frame lists (it is at most 64 KiB)

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
        "device_log", "device_log_dropped", "draft_cfg", "effects", "facts",
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
        self.draft_cfg: Config | None = None  # read leniently before it (early.lenient_config)
        self.syslog: SyslogServer | None = None  # set by the log stage
        self.facts = Facts()
        self.audit: list[str] = []  # device assignment / teardown events (a ring)
        self.audit_dropped = 0  # events the ring no longer holds
        self.device_log: list[str] = []  # every assignment and release of the VM's life
        self.device_log_dropped = 0  # the oldest, beyond MAX_DEVICE_LOG
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

    def device_event(self, text: str) -> None:
        """An assignment or release of a device: audited, and kept for the ``shutdown``
        frame (``device_history``)."""
        self.audit_event(text)
        self.device_log.append(text)
        if len(self.device_log) > MAX_DEVICE_LOG:
            del self.device_log[0]
            self.device_log_dropped += 1

    def device_history(self) -> list[str]:
        """Every device event of the VM's life, oldest first (a first line counts those
        beyond ``MAX_DEVICE_LOG``)."""
        dropped = ([f"({self.device_log_dropped} earlier device events not kept)"]
                   if self.device_log_dropped else [])
        return [*dropped, *self.device_log]
