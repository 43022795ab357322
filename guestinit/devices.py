"""Device nodes the NVIDIA driver does not create (no udev, no nvidia-modprobe in the guest).

``/dev/nvidiactl`` (195:255), ``/dev/nvidia<N>`` with N the "Device Minor" from
``/proc/driver/nvidia/gpus/<bdf>/information``, ``/dev/nvidia-uvm`` and
``/dev/nvidia-uvm-tools`` (major from ``/proc/devices``), the NVSwitch nodes in
service-VM or fabric mode, and ``/dev/nvidia-caps/nvidia-cap<N>`` from
``/proc/driver/nvidia-caps/mig-minors`` when MIG is present. Mode and group come
from ``device.mode``/``device.gid``. Applying a plan twice changes nothing.
"""

from __future__ import annotations

import os
import stat

from guestinit.config import Mode
from guestinit.stages import BootError, Stage

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from guestinit.boot import Boot

NVIDIA_MAJOR = 195  # fixed by the driver (nvidia-frontend)
CTL_MINOR = 255
MODESET_MINOR = 254
CAPS_MODE = 0o444


class Node:
    __slots__ = ("gid", "major", "minor", "mode", "path")

    def __init__(self, path: str, major: int, minor: int, mode: int, gid: int) -> None:
        self.path = path  # under /dev, e.g. "nvidia0" or "nvidia-caps/nvidia-cap1"
        self.major = major
        self.minor = minor
        self.mode = mode
        self.gid = gid

    def to_map(self) -> dict[str, object]:
        return {"path": f"/dev/{self.path}", "major": self.major, "minor": self.minor}

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


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


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
        info = parse_information(_read(path) or "")
        minor = info.get("Device Minor", "")
        if not minor.isdigit():
            raise ValueError(f"read {path}: no 'Device Minor' line (got {minor!r})")
        gpus.append(Gpu(bdf.lower(), int(minor), info.get("GPU UUID", ""), info.get("Model", "")))
    return sorted(gpus, key=lambda g: g.minor)


def parse_mig_minors(text: str) -> list[tuple[str, int]]:
    """``name minor`` lines of ``/proc/driver/nvidia-caps/mig-minors``."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            out.append((fields[0], int(fields[1])))
    return out


def plan_nodes(root: str, mode: Mode, gpus: Sequence[Gpu], switches: int,
               node_mode: int, gid: int, modeset: bool = False) -> list[Node]:
    """The nodes to create for this mode; majors from ``<root>/proc/devices``."""
    if mode == Mode.CPU:
        return []
    majors = parse_proc_devices(_read(os.path.join(root, "proc", "devices")) or "")
    nvidia = majors.get("nvidia-frontend", majors.get("nvidia", NVIDIA_MAJOR))
    nodes = [Node("nvidiactl", nvidia, CTL_MINOR, node_mode, gid)]
    nodes += [Node(f"nvidia{g.minor}", nvidia, g.minor, node_mode, gid) for g in gpus]
    if modeset:
        nodes.append(Node("nvidia-modeset", nvidia, MODESET_MINOR, node_mode, gid))
    if mode == Mode.GPU:
        uvm = majors.get("nvidia-uvm")
        if uvm is None:
            raise ValueError("nvidia-uvm has no major in /proc/devices (did nvidia_uvm load?)")
        nodes += [Node("nvidia-uvm", uvm, 0, node_mode, gid),
                  Node("nvidia-uvm-tools", uvm, 1, node_mode, gid)]
    if switches and "nvidia-nvswitch" in majors:
        sw = majors["nvidia-nvswitch"]
        nodes.append(Node("nvidia-nvswitchctl", sw, CTL_MINOR, node_mode, gid))
        nodes += [Node(f"nvidia-nvswitch{i}", sw, i, node_mode, gid) for i in range(switches)]
    mig = _read(os.path.join(root, "proc", "driver", "nvidia-caps", "mig-minors"))
    if mig is not None and "nvidia-caps" in majors:
        caps = majors["nvidia-caps"]
        nodes += [Node(f"nvidia-caps/nvidia-cap{minor}", caps, minor, CAPS_MODE, gid)
                  for _, minor in parse_mig_minors(mig)]
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


def _inventory(boot: Boot, kind: str) -> list[Mapping[str, object]]:
    inventory = boot.facts.get("inventory", [])
    assert isinstance(inventory, list)
    return [d for d in inventory if d.get("kind") == kind]


def run_devices(boot: Boot) -> None:
    mode = Mode(str(boot.facts.get("mode", Mode.CPU)))
    if mode == Mode.CPU:
        return
    cfg = boot.config()
    want = sorted(str(d["bdf"]) for d in _inventory(boot, "gpu"))
    try:
        gpus = read_gpus(boot.root)
    except ValueError as exc:
        raise BootError(Stage.DEVICES, str(exc)) from None
    missing = sorted(set(want) - {g.bdf for g in gpus})
    if missing:
        raise BootError(Stage.DEVICES, f"the nvidia driver registered {len(gpus)} of "
                        f"{len(want)} GPUs; missing {', '.join(missing)} "
                        "(see dmesg for NVRM errors)")
    loaded = boot.facts.get("modules", [])
    assert isinstance(loaded, list)
    modeset = any(str(m).split()[0] == "nvidia_modeset" for m in loaded)
    try:
        nodes = plan_nodes(boot.root, mode, gpus, len(_inventory(boot, "nvswitch")),
                           cfg.int("device.mode"), cfg.int("device.gid"), modeset)
    except ValueError as exc:
        raise BootError(Stage.DEVICES, str(exc)) from None
    created = apply_nodes(boot, nodes)
    by_minor = {n.minor: n for n in nodes if n.path.startswith("nvidia") and n.path[6:].isdigit()}
    control = [n.to_map() for n in nodes if n.path in
               ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")]
    boot.facts["gpus"] = [
        {"index": i, "bdf": g.bdf, "uuid": g.uuid, "model": g.model,
         "node": by_minor[g.minor].to_map()}
        for i, g in enumerate(gpus)
    ]
    boot.facts["device_nodes"] = {"control": control,
                                  "other": [n.to_map() for n in nodes
                                            if n.path.startswith(("nvidia-caps/", "nvidia-nvs"))]}
    for i, g in enumerate(gpus):
        boot.audit_event(f"assign gpu{i} {g.bdf} {g.uuid or '(no uuid)'} {g.model} "
                         f"as /dev/nvidia{g.minor}")
    boot.kmsg.log(6, f"devices: {len(nodes)} nodes ({len(created)} created)")


def audit_teardown(boot: Boot) -> list[str]:
    """At shutdown: one audit line per GPU assigned at boot (the shutdown's teardown puts
    them in its audit, which goes to kmsg and into the ``shutdown`` frame)."""
    gpus = boot.facts.get("gpus", [])
    if not isinstance(gpus, list):
        return []
    return [f"release gpu{g['index']} {g['bdf']} {g.get('uuid') or '(no uuid)'}" for g in gpus]
