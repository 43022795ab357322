"""NVIDIA daemons and settings: persistenced, fabric manager, nvlsm, DCGM, nvidia-smi.

Readiness, per daemon, with the timeout ``daemon.timeout``:

- nvidia-persistenced (``--foreground --verbose``): its verbose syslog line
  ``Local RPC services initialized`` (logged once the RPC socket is up), or the
  socket ``/var/run/nvidia-persistenced/socket``. While it works it logs
  ``device <bdf> - registered`` per GPU; each new one becomes a ``progress``
  frame (``gpus``/``of``), since confidential boots take 3-4 s per GPU.
- nv-fabricmanager (config copied to /run with DAEMONIZE=0, LOG_USE_SYSLOG=1):
  ``Successfully configured all the available NVSwitches``.
- nvlsm (nvl5, OpenSM based): ``SUBNET UP``.
- nv-hostengine / dcgm-exporter: no marker; they must still be running at the
  health check.

Every daemon runs under the supervisor (restart on failure); a daemon that exits
before it is ready, or never says so, fails the boot naming it.
"""

from __future__ import annotations

import os

from guestinit.config import Mode
from guestinit.stages import BootError, Stage, StopRequested

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from guestinit.boot import Boot

PERSISTENCED = "nvidia-persistenced"
FABRICMANAGER = "nv-fabricmanager"
NVLSM = "nvlsm"
HOSTENGINE = "nv-hostengine"
EXPORTER = "dcgm-exporter"

PERSISTENCED_MARKER = "Local RPC services initialized"
PERSISTENCED_RUN = "var/run/nvidia-persistenced"
PERSISTENCED_SOCKET = "var/run/nvidia-persistenced/socket"
FM_MARKER = "Successfully configured all the available NVSwitches"
FM_RUN_CONFIG = "run/nvidia-fabricmanager/fabricmanager.cfg"
NVLSM_MARKER = "SUBNET UP"
NVLSM_CONFIG = "/usr/share/nvidia/nvlsm/nvlsm.conf"
IB_CLASS = "sys/class/infiniband"
IS_SM_DISABLED = 1 << 10  # port capability mask bit: SM disabled on this port
SMI_TIMEOUT = 120.0


def registered_gpus(lines: Sequence[str]) -> list[str]:
    """BDFs from persistenced's ``device <bdf> - registered`` lines, in order, once each."""
    seen: dict[str, None] = {}
    for line in lines:
        if PERSISTENCED in line and line.endswith(" - registered"):
            _, _, rest = line.partition("device ")
            seen.setdefault(rest.removesuffix(" - registered"), None)
    return list(seen)


def user_ids(root: str, name: str) -> tuple[int, int] | None:
    """(uid, gid) of ``name`` in ``<root>/etc/passwd``; None when the image has no such user."""
    try:
        with open(os.path.join(root, "etc", "passwd")) as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 4 and fields[0] == name:
                    return int(fields[2]), int(fields[3])
    except (OSError, ValueError):
        return None
    return None


def persistenced_argv(bin_dir: str, uvm: bool, user: str | None) -> list[str]:
    argv = [os.path.join(bin_dir, PERSISTENCED), "--foreground", "--verbose"]
    if uvm:
        argv.append("--uvm-persistence-mode")
    if user:
        argv += ["--user", user]
    return argv


def rewrite_fm_config(text: str, settings: Mapping[str, str]) -> str:
    """The fabric manager config with ``settings`` replacing (or appended to) its keys."""
    out, done = [], set()
    for line in text.splitlines():
        key = line.partition("=")[0].strip()
        if key in settings and not line.lstrip().startswith("#"):
            out.append(f"{key}={settings[key]}")
            done.add(key)
        else:
            out.append(line)
    out += [f"{k}={v}" for k, v in settings.items() if k not in done]
    return "\n".join(out) + "\n"


def port_guid(root: str) -> str | None:
    """GUID of port 1 of the first InfiniBand device (by name) with SM enabled, ``0x...``."""
    base = os.path.join(root, IB_CLASS)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return None
    for name in names:
        port = os.path.join(base, name, "ports", "1")
        try:
            with open(os.path.join(port, "cap_mask")) as f:
                mask = int(f.read().strip(), 16)
            with open(os.path.join(port, "gids", "0")) as f:
                groups = f.read().strip().split(":")
        except (OSError, ValueError):
            continue
        if mask & IS_SM_DISABLED or len(groups) != 8:
            continue
        return "0x" + "".join(groups[4:])
    return None


class Plan:
    """The daemons for a mode: (name, argv, marker or "") in start order."""

    __slots__ = ("daemons", "fm_settings")

    def __init__(self) -> None:
        self.daemons: list[tuple[str, list[str], str]] = []
        self.fm_settings: dict[str, str] = {}


def plan_daemons(mode: Mode, fabric: bool, bin_dir: str, *, uvm: bool, user: str | None,
                 fm_mode: int, rail_policy: str, dcgm: bool, guid: str | None) -> Plan:
    plan = Plan()
    if mode == Mode.CPU:
        return plan
    if mode == Mode.GPU:
        plan.daemons.append((PERSISTENCED, persistenced_argv(bin_dir, uvm, user),
                             PERSISTENCED_MARKER))
    if mode == Mode.NVL5:
        if guid is None:
            raise ValueError("nvl5: no InfiniBand port with SM enabled under /sys/class/infiniband"
                             " (is mlx5_ib loaded and the SW_MNG port configured?)")
        plan.daemons.append((NVLSM, [os.path.join(bin_dir, NVLSM), "-F", NVLSM_CONFIG,
                                     "-g", guid], NVLSM_MARKER))
    if mode in (Mode.NVL4, Mode.NVL5) or fabric:
        plan.fm_settings = {"FABRIC_MODE": str(fm_mode), "PARTITION_RAIL_POLICY": rail_policy,
                            "DAEMONIZE": "0", "LOG_USE_SYSLOG": "1"}
        if guid is not None:
            plan.fm_settings["FM_SM_MGMT_PORT_GUID"] = guid
        plan.daemons.append((FABRICMANAGER, [os.path.join(bin_dir, FABRICMANAGER), "-c",
                                             "/" + FM_RUN_CONFIG], FM_MARKER))
    if dcgm and mode == Mode.GPU:
        plan.daemons.append((HOSTENGINE, [os.path.join(bin_dir, HOSTENGINE), "-n",
                                          "--service-account", "nvidia-dcgm"], ""))
        plan.daemons.append((EXPORTER, [os.path.join(bin_dir, EXPORTER), "-k"], ""))
    return plan


def smi_settings(cfg_values: Mapping[str, str]) -> list[list[str]]:
    """nvidia-smi arguments for the clock/power settings that are set (lgc, lmc, pl)."""
    flags = (("smi.lgc", "-lgc"), ("smi.lmc", "-lmc"), ("smi.pl", "-pl"))
    return [[flag, cfg_values[key]] for key, flag in flags if cfg_values.get(key)]


def _exe(boot: Boot, argv: Sequence[str]) -> list[str]:
    """argv with its program under the boot root (a tmp root in the pid-namespace tests)."""
    return [boot.path(argv[0].lstrip("/")), *argv[1:]]


def _smi(boot: Boot, args: Sequence[str], what: str, stage: Stage = Stage.DAEMONS) -> None:
    argv = [boot.path(boot.config().str("nvidia.bin").lstrip("/"), "nvidia-smi"), *args]
    start = boot.timeline.now()
    try:
        code, out = boot.procs.run(argv, timeout=SMI_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise BootError(stage, f"nvidia-smi {what}: {exc.strerror or exc}") from None
    if code != 0:
        tail = out.strip().splitlines()[-1:] or ["no output"]
        raise BootError(stage, f"nvidia-smi {what} ({' '.join(args)}) exited {code}: "
                        f"{tail[0][:200]}")
    boot.timeline.add(f"smi:{what}", start, boot.timeline.now())


def set_ready_state(boot: Boot) -> None:
    """``nvidia-smi conf-compute -srs`` when ``smi.srs`` is set (after the CDI spec)."""
    value = boot.config().str("smi.srs")
    if value:
        _smi(boot, ["conf-compute", "-srs", value], "srs", Stage.CDI)


class _Watch:
    """The abort hook of one readiness wait: death, socket, progress frames."""

    __slots__ = ("boot", "expected", "name", "reported", "socket", "socket_ready")

    def __init__(self, boot: Boot, name: str, socket: str, expected: int) -> None:
        self.boot = boot
        self.name = name
        self.socket = socket
        self.expected = expected
        self.reported = 0
        self.socket_ready = False

    def __call__(self) -> str | None:
        stop = self.boot.stop_requested()
        if stop is not None:  # the host wants the VM down: do not sit out the timeout
            raise StopRequested(stop)
        self.boot.supervisor.tick()  # a crashed daemon gets its restart while we wait
        service = self.boot.supervisor.service(self.name)
        if self.socket and os.path.exists(self.socket):
            self.socket_ready = True
            return "socket"
        if not service.running and service.next_start is None:
            return f"{self.name} exited with status {service.last_status} before it was ready"
        self.progress()
        return None

    def progress(self) -> None:
        """A ``progress`` frame for each GPU persistenced attached since the last call."""
        if self.name == PERSISTENCED and self.boot.syslog is not None:
            attached = registered_gpus(self.boot.syslog.recent(256))
            if len(attached) > self.reported:
                self.reported = len(attached)
                # the count is in ``detail`` too: hosts keep only the fields they know
                self.boot.reporter.progress(
                    "daemons", "gpu", f"{self.name}: {len(attached)}/{self.expected} GPUs "
                    f"attached (last {attached[-1]})", gpus=len(attached), of=self.expected)


def wait_ready(boot: Boot, name: str, marker: str, timeout: float, socket: str = "",
               expected: int = 0) -> str:
    """Block until ``name`` is ready; the line (or socket) that said so."""
    watch = _Watch(boot, name, socket, expected)
    if boot.syslog is None:
        raise BootError(Stage.DAEMONS, f"wait for {name}: syslog is off, so its readiness "
                        f"line cannot be seen (set guestinit.syslog=1)")
    try:
        line = boot.syslog.wait_for(marker, timeout, abort=watch)
    except RuntimeError as exc:
        if not watch.socket_ready:
            raise BootError(Stage.DAEMONS, str(exc)) from None
        line = socket
    except TimeoutError:
        last = [x for x in boot.syslog.recent(256) if name in x][-1:]
        raise BootError(Stage.DAEMONS, f"{name} not ready after {timeout:g}s (no '{marker}' on "
                        f"syslog{', no ' + socket if socket else ''}); last line: "
                        f"{last[0] if last else 'none'}") from None
    watch.progress()  # GPUs logged in the same breath as the marker
    return line


def _start(boot: Boot, name: str, argv: Sequence[str], **spawn_kw: object) -> None:
    try:
        boot.supervisor.add(name, _exe(boot, argv), **spawn_kw)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        raise BootError(Stage.DAEMONS, f"start {name}: {exc}") from None
    boot.kmsg.log(6, f"daemons: started {name}: {' '.join(argv)}")


def _prepare_fm(boot: Boot, settings: Mapping[str, str]) -> None:
    template = boot.path(boot.config().str("fabricmanager.config").lstrip("/"))
    try:
        with open(template) as f:
            text = f.read()
        target = boot.path(FM_RUN_CONFIG)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(rewrite_fm_config(text, settings))
    except OSError as exc:
        raise BootError(Stage.DAEMONS, f"prepare {FABRICMANAGER} config from {template}: "
                        f"{exc.strerror or exc}") from None


def run_daemons(boot: Boot) -> None:
    mode = Mode(str(boot.facts.get("mode", Mode.CPU)))
    boot.facts.setdefault("daemons", [])
    if mode == Mode.CPU:
        return
    cfg = boot.config()
    inventory = boot.facts.get("inventory", [])
    assert isinstance(inventory, list)
    gpus = [d for d in inventory if d.get("kind") == "gpu"]
    user = cfg.str("nvidia.user")
    ids = user_ids(boot.root, user) if user else None
    guid = port_guid(boot.root) if mode == Mode.NVL5 else None
    try:
        plan = plan_daemons(
            mode, bool(boot.facts.get("fabric")), cfg.str("nvidia.bin"),
            uvm=cfg.bool("uvm.persistence"), user=user if ids else None,
            fm_mode=cfg.int("fabricmanager.mode"),
            rail_policy=cfg.str("fabricmanager.rail_policy"), dcgm=cfg.bool("dcgm"), guid=guid)
    except ValueError as exc:
        raise BootError(Stage.DAEMONS, str(exc)) from None
    if plan.fm_settings:
        _prepare_fm(boot, plan.fm_settings)
    timeout = cfg.float("daemon.timeout")
    names: list[str] = []
    for name, argv, marker in plan.daemons:
        socket = ""
        if name == PERSISTENCED:
            run_dir = boot.path(PERSISTENCED_RUN)
            boot.effects.makedirs(run_dir, 0o755)
            if ids is not None:
                boot.effects.chown_chmod(run_dir, 0o755, *ids)
            socket = boot.path(PERSISTENCED_SOCKET)
        start = boot.timeline.now()
        _start(boot, name, argv)
        names.append(name)
        boot.facts["daemons"] = list(names)
        if marker:
            boot.reporter.progress("daemons", "wait", f"{name}: waiting for '{marker}'")
            line = wait_ready(boot, name, marker, timeout, socket, len(gpus))
            boot.kmsg.log(6, f"daemons: {name} ready: {line}")
        boot.timeline.add(f"daemon:{name}", start, boot.timeline.now())
        if name == PERSISTENCED:
            values = {k: cfg.str(k) for k in ("smi.lgc", "smi.lmc", "smi.pl")}
            for args in smi_settings(values):
                _smi(boot, args, args[0].lstrip("-"))
    check_daemons(boot)


def check_daemons(boot: Boot) -> None:
    """Health check before ``ready``: every daemon this boot started is still running."""
    names = boot.facts.get("daemons", [])
    assert isinstance(names, list)
    for name in names:
        service = boot.supervisor.service(name)
        if not service.running:
            raise BootError(Stage.DAEMONS, f"health check: {name} is not running "
                            f"(last status {service.last_status}, {service.restarts} restarts)")
