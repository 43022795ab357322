"""How each NVIDIA daemon says it is ready, and the wait for it (``DAEMONS``, ``wait_ready``).

One table: the daemon, its ready signal (a syslog line, a socket, a TCP port), the setting
that bounds the wait. The wait is the boot's one engine (``readiness.wait_for``, the
agent's too): syslog lines and PID 1's signals wake it at once (``select`` on the syslog
socket and the wakeup fd); sockets and ports are looked at every 0.1 s, as are the
daemon's death (with its restarts ticking), and a ``progress`` frame says every
``PROGRESS_EVERY`` s what is still awaited. ``nvidia.daemons`` starts the
daemons and waits for each in turn.
"""

from __future__ import annotations

from guestinit.stages import BootError, Stage, StopRequested

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from guestinit.boot import Boot
    from guestinit.config import Config
    from guestinit.readiness import Probe

PERSISTENCED = "nvidia-persistenced"
FABRICMANAGER = "nv-fabricmanager"
NVLSM = "nvlsm"
HOSTENGINE = "nv-hostengine"
EXPORTER = "dcgm-exporter"
PARTITIONS = "guestinit-partitions"  # the service VM's partition service (nvidia.partitions)

PERSISTENCED_MARKER = "Local RPC services initialized"
PERSISTENCED_SOCKET = "var/run/nvidia-persistenced/socket"
FM_MARKER = "Successfully configured all the available NVSwitches"
NVLSM_MARKER = "SUBNET UP"
PARTITIONS_MARKER = "partition service serving on"  # nvidia.partitions logs it
PROGRESS_EVERY = 5.0  # seconds between "still waiting" frames
WAIT_ROUND = 0.1  # s: how often restarts, a death and progress are looked at


def registered_gpus(lines: Sequence[str]) -> list[str]:
    """BDFs from persistenced's ``device <bdf> - registered`` lines, in order, once each."""
    seen: dict[str, None] = {}
    for line in lines:
        if PERSISTENCED in line and line.endswith(" - registered"):
            _, _, rest = line.partition("device ")
            seen.setdefault(rest.removesuffix(" - registered"), None)
    return list(seen)


class Daemon:
    """How one daemon says it is ready, and the setting that bounds the wait."""

    __slots__ = ("files", "marker", "name", "port_key", "timeout_key")

    def __init__(self, name: str, timeout_key: str, marker: str = "",
                 files: tuple[str, ...] = (), port_key: str = "") -> None:
        self.name = name
        self.timeout_key = timeout_key
        self.marker = marker  # a syslog line containing this
        self.files = files  # or one of these paths (under the root) existing
        self.port_key = port_key  # or 127.0.0.1:<this setting> accepting a connection

    def signals(self, cfg: Config) -> str:
        """The ready signal in words, for the waiting frame and the timeout message."""
        out = [f"'{self.marker}' on syslog"] if self.marker else []
        out += ["/" + f for f in self.files]
        if self.port_key:
            out.append(f"127.0.0.1:{cfg.int(self.port_key)} listening")
        return " or ".join(out)


DAEMONS: dict[str, Daemon] = {d.name: d for d in (
    # not its pid file: persistenced writes that before the RPC socket is up
    Daemon(PERSISTENCED, "persistenced.timeout", PERSISTENCED_MARKER, (PERSISTENCED_SOCKET,)),
    Daemon(FABRICMANAGER, "fabricmanager.timeout", FM_MARKER),
    Daemon(NVLSM, "nvlsm.timeout", NVLSM_MARKER),
    Daemon(HOSTENGINE, "hostengine.timeout", port_key="hostengine.port"),
    Daemon(EXPORTER, "exporter.timeout", port_key="exporter.port"),
    Daemon(PARTITIONS, "partitions.timeout", PARTITIONS_MARKER),
)}


def timeout_for(cfg: Config, daemon: Daemon) -> tuple[float, str]:
    """The daemon's timeout and the setting it came from: its own, unless only
    ``daemon.timeout`` was set."""
    if cfg.sources.get(daemon.timeout_key) == "default" and cfg.float("daemon.timeout") > 0:
        return cfg.float("daemon.timeout"), "daemon.timeout"
    return cfg.float(daemon.timeout_key), daemon.timeout_key


class _Watch:
    """What one daemon's wait checks every round besides its signals: stop requests, the
    daemon's restarts and death, progress frames."""

    __slots__ = ("boot", "daemon", "expected", "last_frame", "reported", "started", "timeout")

    def __init__(self, boot: Boot, daemon: Daemon, expected: int, timeout: float) -> None:
        self.boot = boot
        self.daemon = daemon
        self.expected = expected
        self.timeout = timeout
        self.reported = 0
        self.started = self.last_frame = boot.timeline.now()

    def __call__(self) -> None:
        """Every round: a stop request ends the wait at once; a crashed daemon gets its
        restart; one that stays down fails the boot; progress frames go out."""
        stop = self.boot.stop_requested()
        if stop is not None:  # the host wants the VM down: do not sit out the timeout
            raise StopRequested(stop)
        self.boot.procs.reap()  # PID 1 reaps (a dead daemon shows as not running)
        self.boot.supervisor.tick()  # a crashed daemon gets its restart while we wait
        service = self.boot.supervisor.service(self.daemon.name)
        if not service.running and service.next_start is None:
            raise BootError(Stage.DAEMONS, f"{self.daemon.name} exited with status "
                            f"{service.last_status} before it was ready")
        self.progress()

    def progress(self) -> None:
        """A ``progress`` frame per GPU persistenced attached since the last call, and one
        every PROGRESS_EVERY s while the wait goes on."""
        name = self.daemon.name
        now = self.boot.timeline.now()
        if (now - self.last_frame) / 1e9 >= PROGRESS_EVERY:
            self.last_frame = now
            waited = (now - self.started) // 1_000_000
            self.boot.reporter.progress(
                "daemons", "wait", f"{name}: still waiting for "
                f"{self.daemon.signals(self.boot.config())} ({waited / 1000:.0f}s of "
                f"{self.timeout:g}s)", waited_ms=waited)
        if name == PERSISTENCED and self.boot.syslog is not None:
            attached = registered_gpus(self.boot.syslog.recent(256))
            if len(attached) > self.reported:
                self.reported = len(attached)
                # the count is in ``detail`` too: hosts keep only the fields they know
                self.boot.reporter.progress(
                    "daemons", "gpu", f"{name}: {len(attached)}/{self.expected} GPUs "
                    f"attached (last {attached[-1]})", gpus=len(attached), of=self.expected)


def wait_ready(boot: Boot, daemon: Daemon, expected: int = 0) -> str:
    """Block until ``daemon`` is ready (``readiness.wait_for``, the agent's wait too); the
    line, path or address that said so."""
    from guestinit.readiness import FileProbe, NotReady, PortProbe, SyslogProbe, wait_for

    cfg = boot.config()
    timeout, key = timeout_for(cfg, daemon)
    watch = _Watch(boot, daemon, expected, timeout)
    name = daemon.name
    if boot.syslog is None and daemon.marker:
        raise BootError(Stage.DAEMONS, f"wait for {name}: syslog is off, so its readiness "
                        f"line cannot be seen (set guestinit.syslog=1)")
    probes: list[Probe] = []
    if daemon.marker and boot.syslog is not None:
        probes.append(SyslogProbe(boot.syslog, daemon.marker))
    if daemon.files:
        probes.append(FileProbe([boot.path(f) for f in daemon.files]))
    if daemon.port_key:
        service = boot.supervisor.service(name)
        probes.append(PortProbe(cfg.int(daemon.port_key), lambda: service.running))

    def on_wake() -> None:
        stop = boot.stop_requested()
        if stop is not None:
            raise StopRequested(stop)

    try:
        line = wait_for(probes, timeout, check=watch, every=WAIT_ROUND, wake_fd=boot.wake_fd,
                        on_wake=on_wake)
    except NotReady:
        recent = boot.syslog.recent(256) if boot.syslog is not None else []
        last = [x for x in recent if name in x][-1:]
        raise BootError(Stage.DAEMONS, f"{name} not ready after {timeout:g}s ({key}; no "
                        f"{daemon.signals(cfg)}); last line: "
                        f"{last[0] if last else 'none'}") from None
    watch.progress()  # GPUs logged in the same breath as the marker
    return line
