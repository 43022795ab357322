"""NVIDIA daemons and settings: persistenced, fabric manager, nvlsm, DCGM, nvidia-smi.

Every daemon runs under the supervisor (restart on failure) and is waited for in
turn, by its signal in ``nvidia.daemon_ready.DAEMONS`` (one table: signal, timeout setting):

- nvidia-persistenced (``--foreground --verbose``): its verbose syslog line
  ``Local RPC services initialized`` (logged once the RPC socket is up), or the
  socket ``/var/run/nvidia-persistenced/socket``. While it works it
  logs ``device <bdf> - registered`` per GPU; each new one becomes a ``progress``
  frame (``gpus``/``of``), since confidential boots take 3-4 s per GPU.
- nv-fabricmanager (config copied to /run with DAEMONIZE=0, LOG_USE_SYSLOG=1):
  ``Successfully configured all the available NVSwitches``.
- nvlsm (NVL5, OpenSM based): ``SUBNET UP``.
- nv-hostengine / dcgm-exporter: their TCP port accepts a connection.

A daemon that exits before it is ready, or is not ready within its timeout, fails
the boot naming it and the setting that bounds it (``daemon_ready.wait_ready``).

Order and defaults follow NVRC: the fabric first (nvlsm, then the fabric manager),
then persistenced, the clock/power settings, then DCGM. FABRIC_MODE is 1 in a
service VM and 0 beside GPUs; the rail policy is symmetric on NVL5, greedy on NVL4.
"""

from __future__ import annotations

import os

from guestinit.nvidia.daemon_ready import (
    DAEMONS,
    EXPORTER,
    FABRICMANAGER,
    HOSTENGINE,
    NVLSM,
    PARTITIONS,
    PERSISTENCED,
    wait_ready,
)
from guestinit.pci import Kind
from guestinit.stages import BootError, Stage
from guestinit.sysfs import read_text, write_text
from guestinit.values import Fabric, Mode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from guestinit.boot import Boot

PERSISTENCED_RUN = "var/run/nvidia-persistenced"
FM_RUN_CONFIG = "run/nvidia-fabricmanager/fabricmanager.cfg"
FM_SOCKET = "/run/nvidia-fabricmanager/socket"  # the FM API in a service VM (libnvfm's peer)
PYTHON = "/usr/bin/python3.11"
# the partition service's binding, compiled into the image against the bundle's libnvfm
NVFM_BINDING = "usr/lib/guestinit/_guestinit_nvfm.cpython-311-x86_64-linux-gnu.so"
GUEST_SITE = "/usr/lib/guestinit"
SYSLOG = "/dev/log"  # guestinit's syslog socket
# python3.11 -S -c CODE SITE ARGS...: the site directory comes first (a test root has its own)
PARTITIONS_CODE = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
                   "from guestinit.nvidia.partitions import main; sys.exit(main())")
NVLSM_CONFIG = "/usr/share/nvidia/nvlsm/nvlsm.conf"
IB_CLASS = "sys/class/infiniband"
IS_SM_DISABLED = 1 << 10  # port capability mask bit: SM disabled on this port
SMI_TIMEOUT = 120.0


def user_ids(root: str, name: str) -> tuple[int, int] | None:
    """(uid, gid) of ``name`` in ``<root>/etc/passwd``; None when the image has no such user."""
    passwd = read_text(os.path.join(root, "etc", "passwd"), (OSError,)) or ""
    try:
        for line in passwd.splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and fields[0] == name:
                return int(fields[2]), int(fields[3])
    except ValueError:
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
            mask = int(read_text(os.path.join(port, "cap_mask"), ()) or "", 16)
            groups = (read_text(os.path.join(port, "gids", "0"), ()) or "").strip().split(":")
        except (OSError, ValueError):
            continue
        if mask & IS_SM_DISABLED or len(groups) != 8:
            continue
        return "0x" + "".join(groups[4:])
    return None


def managed_fabric(mode: Mode, fabric: Fabric) -> Fabric:
    """The NVLink fabric this boot manages: a service VM's own, the GPU mode's ``fabric``
    from discovery, or none."""
    if mode in (Mode.NVL4, Mode.NVL5):
        return Fabric(str(mode))
    return fabric if mode == Mode.GPU else Fabric.NONE


def fabric_settings(service_vm: bool, nvl5: bool, fm_mode: str, rail_policy: str
                    ) -> dict[str, str]:
    """FABRIC_MODE and PARTITION_RAIL_POLICY with NVRC's defaults for ``auto``."""
    return {"FABRIC_MODE": ("1" if service_vm else "0") if fm_mode == "auto" else fm_mode,
            "PARTITION_RAIL_POLICY": ("symmetric" if nvl5 else "greedy")
            if rail_policy == "auto" else rail_policy}


class Plan:
    """The daemons for a mode: (name, argv) in start order, and the FM config keys."""

    __slots__ = ("daemons", "fm_settings")

    def __init__(self) -> None:
        self.daemons: list[tuple[str, list[str]]] = []
        self.fm_settings: dict[str, str] = {}


def plan_daemons(mode: Mode, fabric: Fabric, bin_dir: str, *, uvm: bool, user: str | None,
                 fm_mode: str = "auto", rail_policy: str = "auto", dcgm: bool = False,
                 guid: str | None = None, ports: tuple[int, int] = (5555, 9400),
                 partitions: str = "off") -> Plan:
    """NVRC's order: nvlsm and the fabric manager (NVL5), or the fabric manager (NVL4),
    then persistenced and DCGM (gpu mode). ``fabric`` is the GPU mode's NVLink fabric.
    ``partitions`` (where the partition service listens, or off): in a Shared NVSwitch
    service VM (FABRIC_MODE=1) the fabric manager serves its API on FM_SOCKET and the
    partition service starts after it."""
    plan = Plan()
    if mode == Mode.CPU:
        return plan
    managed = managed_fabric(mode, fabric)
    nvl5 = managed == Fabric.NVL5
    if nvl5:
        if guid is None:
            raise ValueError("nvl5: no InfiniBand port with SM enabled under /sys/class/infiniband"
                             " (is mlx5_ib loaded and the SW_MNG port configured?)")
        plan.daemons.append((NVLSM, [os.path.join(bin_dir, NVLSM), "-F", NVLSM_CONFIG,
                                     "-g", guid]))
    if managed:
        plan.fm_settings = fabric_settings(mode != Mode.GPU, nvl5, fm_mode, rail_policy)
        plan.fm_settings.update(DAEMONIZE="0", LOG_USE_SYSLOG="1")
        if guid is not None:
            plan.fm_settings["FM_SM_MGMT_PORT_GUID"] = guid
        plan.daemons.append((FABRICMANAGER, [os.path.join(bin_dir, FABRICMANAGER), "-c",
                                             "/" + FM_RUN_CONFIG]))
        if plan.fm_settings["FABRIC_MODE"] == "1" and partitions != "off":
            plan.fm_settings["FM_CMD_UNIX_SOCKET_PATH"] = FM_SOCKET
            plan.daemons.append((PARTITIONS, [PYTHON, "-S", "-c", PARTITIONS_CODE, GUEST_SITE,
                                              "--listen", partitions, "--fm", FM_SOCKET,
                                              "--syslog", SYSLOG]))
    if mode == Mode.GPU:
        plan.daemons.append((PERSISTENCED, persistenced_argv(bin_dir, uvm, user)))
    if dcgm and mode == Mode.GPU:
        plan.daemons.append((HOSTENGINE, [os.path.join(bin_dir, HOSTENGINE), "-n",
                                          "--service-account", "nvidia-dcgm",
                                          "--home-dir", "/tmp", "-p", str(ports[0])]))
        plan.daemons.append((EXPORTER, [os.path.join(bin_dir, EXPORTER), "-k",
                                        "-a", f":{ports[1]}",
                                        "-r", f"127.0.0.1:{ports[0]}"]))
    return plan


def smi_settings(cfg_values: Mapping[str, str]) -> list[list[str]]:
    """nvidia-smi arguments for the clock/power settings that are set (lgc, lmc, pl)."""
    flags = (("smi.lgc", "-lgc"), ("smi.lmc", "-lmc"), ("smi.pl", "-pl"))
    return [[flag, cfg_values[key]] for key, flag in flags if cfg_values.get(key)]


def _exe(boot: Boot, argv: Sequence[str]) -> list[str]:
    """argv with its program under the boot root (a tmp root in the pid-namespace tests),
    and the partition service's site directory and fabric manager socket too."""
    rooted = (GUEST_SITE, FM_SOCKET, SYSLOG)
    return [boot.path(argv[0].lstrip("/")),
            *(boot.path(a.lstrip("/")) if a in rooted else a for a in argv[1:])]


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
    """``nvidia-smi conf-compute -srs`` when ``smi.srs`` is set: the last step of GPU
    bring-up (the boot script runs it after the CDI spec, NVRC's order)."""
    value = boot.config().str("smi.srs")
    if value:
        _smi(boot, ["conf-compute", "-srs", value], "srs", Stage.CDI)


def _start(boot: Boot, name: str, argv: Sequence[str], **spawn_kw: object) -> None:
    try:
        boot.supervisor.add(name, _exe(boot, argv), **spawn_kw)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        raise BootError(Stage.DAEMONS, f"start {name}: {exc}") from None
    boot.kmsg.log(6, f"daemons: started {name}: {' '.join(argv)}")


def _prepare_fm(boot: Boot, settings: Mapping[str, str]) -> None:
    template = boot.path(boot.config().str("fabricmanager.config").lstrip("/"))
    try:
        text = read_text(template, ()) or ""
        target = boot.path(FM_RUN_CONFIG)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_text(target, rewrite_fm_config(text, settings))
    except OSError as exc:
        raise BootError(Stage.DAEMONS, f"prepare {FABRICMANAGER} config from {template}: "
                        f"{exc.strerror or exc}") from None


def _partitions_listen(boot: Boot) -> str:
    """``partitions.listen``, or off (with a warning) when the image has no binding: a
    driver bundle without libnvfm.so.1 (rootfs builds the binding against it)."""
    listen = boot.config().str("partitions.listen")
    if listen != "off" and not os.path.exists(boot.path(NVFM_BINDING)):
        boot.kmsg.log(4, f"daemons: no partition service: the image has no /{NVFM_BINDING} "
                      "(its driver bundle has no libnvfm.so.1); guestinit.partitions.listen="
                      "off silences this")
        return "off"
    return listen


def run_daemons(boot: Boot) -> None:
    """Start and wait for the mode's daemons (the caller runs this outside cpu mode)."""
    facts = boot.facts
    mode, fabric = facts.mode, facts.fabric
    cfg = boot.config()
    gpus = facts.of_kind(Kind.GPU)
    user = cfg.str("nvidia.user")
    ids = user_ids(boot.root, user) if user else None
    guid = port_guid(boot.root) if managed_fabric(mode, fabric) == Fabric.NVL5 else None
    try:
        plan = plan_daemons(
            mode, fabric, cfg.str("nvidia.bin"),
            uvm=cfg.bool("uvm.persistence"), user=user if ids else None,
            fm_mode=cfg.str("fabricmanager.mode"),
            rail_policy=cfg.str("fabricmanager.rail_policy"), dcgm=cfg.bool("dcgm"), guid=guid,
            ports=(cfg.int("hostengine.port"), cfg.int("exporter.port")),
            partitions=_partitions_listen(boot))
    except ValueError as exc:
        raise BootError(Stage.DAEMONS, str(exc)) from None
    if plan.fm_settings:
        _prepare_fm(boot, plan.fm_settings)
    names: list[str] = []
    for name, argv in plan.daemons:
        daemon = DAEMONS[name]
        if name == PERSISTENCED:
            run_dir = boot.path(PERSISTENCED_RUN)
            boot.effects.makedirs(run_dir, 0o755)
            if ids is not None:
                boot.effects.chown_chmod(run_dir, 0o755, *ids)
        start = boot.timeline.now()
        # a Shared NVSwitch fabric manager restarted by the supervisor must come back in
        # resiliency mode (--restart): it keeps the fabric as it is and waits for the
        # partition service to tell it the activated partitions, instead of resetting it
        again = ({"restart_argv": _exe(boot, [*argv, "--restart"])}
                 if name == FABRICMANAGER and plan.fm_settings.get("FABRIC_MODE") == "1"
                 else {})
        _start(boot, name, argv, **again)
        names.append(name)
        facts.daemons = list(names)
        boot.reporter.progress("daemons", "wait", f"{name}: waiting for {daemon.signals(cfg)}")
        line = wait_ready(boot, daemon, len(gpus))
        boot.kmsg.log(6, f"daemons: {name} ready: {line}")
        boot.timeline.add(f"daemon:{name}", start, boot.timeline.now())
        if name == PERSISTENCED:
            values = {k: cfg.str(k) for k in ("smi.lgc", "smi.lmc", "smi.pl")}
            for args in smi_settings(values):
                _smi(boot, args, args[0].lstrip("-"))
    check_daemons(boot)


def check_daemons(boot: Boot) -> None:
    """Health check before ``ready``: every daemon this boot started is still running."""
    for name in boot.facts.daemons:
        service = boot.supervisor.service(name)
        if not service.running:
            raise BootError(Stage.DAEMONS, f"health check: {name} is not running "
                            f"(last status {service.last_status}, {service.restarts} restarts)")
