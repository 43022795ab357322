"""Device nodes the NVIDIA driver does not create (no udev, no nvidia-modprobe in the guest).

``/dev/nvidiactl`` (195:255), ``/dev/nvidia<N>`` with N the "Device Minor" from
``/proc/driver/nvidia/gpus/<bdf>/information``, ``/dev/nvidia-uvm`` and, with
``uvm.tools``, ``/dev/nvidia-uvm-tools`` (major from ``/proc/devices``), the NVSwitch
nodes in service-VM or fabric mode, ``imex.channels`` IMEX channels
``/dev/nvidia-caps-imex-channels/channel<N>`` (at most ``ImexChannelCount`` of
``/proc/driver/nvidia/params``), and the MIG capabilities that exist
(``nvidia.mig``: ``/dev/nvidia-caps/nvidia-cap<N>``, with the driver's modes and group
0). Mode and group of the others come from ``device.mode``/``device.gid``. Applying a
plan twice changes nothing.
"""

from __future__ import annotations

import os
import stat

from guestinit.boot import AssignedGpu
from guestinit.nvidia import mig
from guestinit.pci import Kind
from guestinit.stages import BootError, Stage
from guestinit.sysfs import read_text
from guestinit.values import Mode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from guestinit.boot import Boot

NVIDIA_MAJOR = 195  # fixed by the driver (nvidia-frontend)
CTL_MINOR = 255
MODESET_MINOR = 254
IMEX_DIR = "nvidia-caps-imex-channels"


class Node:
    __slots__ = ("gid", "major", "minor", "mode", "path")

    def __init__(self, path: str, major: int, minor: int, mode: int, gid: int) -> None:
        self.path = path  # under /dev, e.g. "nvidia0" or "nvidia-caps/nvidia-cap1"
        self.major = major
        self.minor = minor
        self.mode = mode
        self.gid = gid

    def to_map(self) -> dict[str, object]:
        return {"path": f"/dev/{self.path}", "major": self.major, "minor": self.minor,
                "mode": self.mode}

    def __repr__(self) -> str:
        return f"Node(/dev/{self.path} {self.major}:{self.minor} 0{self.mode:o} gid {self.gid})"


class Gpu:
    __slots__ = ("bdf", "minor", "model", "uuid")

    def __init__(self, bdf: str, minor: int, uuid: str, model: str) -> None:
        self.bdf = bdf
        self.minor = minor
        self.uuid = uuid
        self.model = model


def parse_proc_devices(text: str) -> dict[str, int]:
    """Character device majors by name from ``/proc/devices``."""
    majors: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("Block devices"):
            break
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit():
            majors[fields[1]] = int(fields[0])
    return majors


def parse_information(text: str) -> dict[str, str]:
    """``Key: value`` lines of ``/proc/driver/nvidia/gpus/<bdf>/information``."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def read_gpus(root: str) -> list[Gpu]:
    """The GPUs the driver registered, by minor; errors name the file."""
    base = os.path.join(root, "proc", "driver", "nvidia", "gpus")
    try:
        bdfs = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    gpus = []
    for bdf in bdfs:
        path = os.path.join(base, bdf, "information")
        info = parse_information(read_text(path) or "")
        minor = info.get("Device Minor", "")
        if not minor.isdigit():
            raise ValueError(f"read {path}: no 'Device Minor' line (got {minor!r})")
        gpus.append(Gpu(bdf.lower(), int(minor), info.get("GPU UUID", ""), info.get("Model", "")))
    return sorted(gpus, key=lambda g: g.minor)


def bus_order(gpu: Gpu) -> tuple[int, ...]:
    """Sort key of a GPU's PCI address ``domain:bus:device.function`` (hex), numerically."""
    domain, bus, rest = gpu.bdf.split(":")
    device, _, function = rest.partition(".")
    return (int(domain, 16), int(bus, 16), int(device, 16), int(function or "0", 16))


def imex_channel_count(root: str) -> int:
    """``ImexChannelCount`` of ``/proc/driver/nvidia/params``; 0 when absent."""
    params = parse_information(read_text(os.path.join(root, "proc/driver/nvidia/params")) or "")
    count = params.get("ImexChannelCount", "")
    return int(count) if count.isdigit() else 0


def plan_nodes(root: str, mode: Mode, gpus: Sequence[Gpu], switches: int,
               node_mode: int, gid: int, *, modeset: bool = False, uvm_tools: bool = False,
               caps: Sequence[mig.Cap] = (), imex_channels: int = 0) -> list[Node]:
    """The nodes to create for this mode; majors from ``<root>/proc/devices``, ``caps``
    as ``mig.read_caps`` found them, ``imex_channels`` IMEX channels (``imex.channels``:
    the driver makes none itself, and its ImexChannelCount defaults to 2048)."""
    if mode == Mode.CPU:
        return []
    majors = parse_proc_devices(read_text(os.path.join(root, "proc", "devices")) or "")
    nvidia = majors.get("nvidia-frontend", majors.get("nvidia", NVIDIA_MAJOR))
    nodes = [Node("nvidiactl", nvidia, CTL_MINOR, node_mode, gid)]
    nodes += [Node(f"nvidia{g.minor}", nvidia, g.minor, node_mode, gid) for g in gpus]
    if modeset:
        nodes.append(Node("nvidia-modeset", nvidia, MODESET_MINOR, node_mode, gid))
    if mode == Mode.GPU:
        uvm = majors.get("nvidia-uvm")
        if uvm is None:
            raise ValueError("nvidia-uvm has no major in /proc/devices (did nvidia_uvm load?)")
        nodes.append(Node("nvidia-uvm", uvm, 0, node_mode, gid))
        if uvm_tools:  # profiling and debugging only: NVRC leaves it out by default
            nodes.append(Node("nvidia-uvm-tools", uvm, 1, node_mode, gid))
        if imex_channels:
            imex, count = majors.get(IMEX_DIR), imex_channel_count(root)
            if imex is None or imex_channels > count:
                raise ValueError(f"imex.channels={imex_channels}, but the driver has "
                                 f"{count if imex is not None else 'no'} IMEX channels "
                                 f"(ImexChannelCount in /proc/driver/nvidia/params, {IMEX_DIR} "
                                 "in /proc/devices; set nvidia.NVreg_ImexChannelCount)")
            nodes += [Node(f"{IMEX_DIR}/channel{n}", imex, n, node_mode, gid)
                      for n in range(imex_channels)]
    if switches and "nvidia-nvswitch" in majors:
        sw = majors["nvidia-nvswitch"]
        nodes.append(Node("nvidia-nvswitchctl", sw, CTL_MINOR, node_mode, gid))
        nodes += [Node(f"nvidia-nvswitch{i}", sw, i, node_mode, gid) for i in range(switches)]
    if "nvidia-caps" in majors:
        # the driver's own mode per capability, group root: what nvidia-modprobe -f makes
        nodes += [Node(c.node, majors["nvidia-caps"], c.minor, c.mode, 0) for c in caps]
    return nodes


def apply_nodes(boot: Boot, nodes: Sequence[Node]) -> list[str]:
    """Create (or fix the mode/group of) each node; the paths created."""
    created = []
    for node in nodes:
        path = boot.path("dev", node.path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(node.major, node.minor):
                raise BootError(Stage.DEVICES, f"create {path}: a different file is there "
                                f"(want char {node.major}:{node.minor}); remove it from the image")
            if stat.S_IMODE(st.st_mode) == node.mode and st.st_gid == node.gid:
                continue
        try:
            if st is None:
                if "/" in node.path:
                    boot.effects.makedirs(os.path.dirname(path), 0o755)
                boot.effects.mknod(path, stat.S_IFCHR | node.mode, node.major, node.minor)
                created.append(path)
            boot.effects.chown_chmod(path, node.mode, 0, node.gid)
        except OSError as exc:
            raise BootError(Stage.DEVICES, f"create {path}: {exc.strerror or exc}") from None
    return created


CONTROL = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


def assigned(index: int, gpu: Gpu, by_path: Mapping[str, Node],
             caps: Sequence[mig.Cap]) -> AssignedGpu:
    """What the cdi stage needs of one GPU: its node and, with MIG, each GPU instance's
    access caps (the GI's, then its CIs')."""
    instances: list[dict[str, object]] = [
        {"gi": gi, "nodes": [by_path[c.node].to_map() for c in group]}
        for gi, group in mig.instances(caps, gpu.minor) if all(c.node in by_path for c in group)]
    return AssignedGpu(index, gpu.bdf, gpu.uuid, gpu.model, gpu.minor,
                       by_path[f"nvidia{gpu.minor}"].to_map(), instances)


def run_devices(boot: Boot) -> None:
    """Check the driver's GPUs against discover's and make the nodes (outside cpu mode)."""
    facts = boot.facts
    cfg = boot.config()
    want = sorted(a.dev.bdf for a in facts.of_kind(Kind.GPU))
    try:
        gpus = read_gpus(boot.root)
    except ValueError as exc:
        raise BootError(Stage.DEVICES, str(exc)) from None
    missing = sorted(set(want) - {g.bdf for g in gpus})
    if missing:
        raise BootError(Stage.DEVICES, f"the nvidia driver registered {len(gpus)} of "
                        f"{len(want)} GPUs; missing {', '.join(missing)} "
                        "(see dmesg for NVRM errors)")
    modeset = any(m.split()[0] == "nvidia_modeset" for m in facts.modules or ())
    caps = mig.read_caps(boot.root)
    try:
        nodes = plan_nodes(boot.root, facts.mode, gpus, len(facts.of_kind(Kind.NVSWITCH)),
                           cfg.int("device.mode"), cfg.int("device.gid"), modeset=modeset,
                           uvm_tools=cfg.bool("uvm.tools"), caps=caps,
                           imex_channels=cfg.int("imex.channels"))
    except ValueError as exc:
        raise BootError(Stage.DEVICES, str(exc)) from None
    created = apply_nodes(boot, nodes)
    by_path = {n.path: n for n in nodes}
    control = [by_path[p].to_map() for p in CONTROL if p in by_path]
    # the GPU index (CDI's nvidia.com/gpu=N, the audit's gpuN) is the rank in PCI bus order:
    # what Kata's runtime annotates a cold-plugged GPU with (container.go
    # annotateContainerWithVFIOMetadata sorts by bus) and NVML's order; the driver's minor
    # numbers (/dev/nvidiaM) need not follow it
    gpus = sorted(gpus, key=bus_order)
    facts.gpus = [assigned(i, g, by_path, caps) for i, g in enumerate(gpus)]
    facts.device_nodes = {
        "control": control,
        "imex": [n.to_map() for n in nodes if n.path.startswith(IMEX_DIR + "/")],
        "other": [n.to_map() for n in nodes if n.path.startswith(("nvidia-caps/", "nvidia-nvs"))],
    }
    for i, g in enumerate(gpus):
        boot.device_event(f"assign gpu{i} {g.bdf} {g.uuid or '(no uuid)'} {g.model} "
                         f"as /dev/nvidia{g.minor}")
    boot.kmsg.log(6, f"devices: {len(nodes)} nodes ({len(created)} created)")


def audit_teardown(boot: Boot) -> list[str]:
    """At shutdown: one audit line per GPU assigned at boot (the shutdown's teardown puts
    them in its audit, which goes to kmsg and into the ``shutdown`` frame)."""
    return [f"release gpu{g.index} {g.bdf} {g.uuid or '(no uuid)'}" for g in boot.facts.gpus]
