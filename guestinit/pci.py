"""PCI discovery: the accelerator inventory and the boot mode it implies.

Enumeration: the entries of ``<root>/sys/bus/pci/devices``, each read by
``read_device`` from the device's sysfs attribute files. That is what libudev's
enumeration does too; pyudev was dropped from the boot path because finding libudev
(``ctypes.util.find_library`` runs ``ldconfig -p``) and importing it cost ~0.8 s of a
TCG boot with PCI devices. A unit test runs the reader on "/" under ``umockdev-run``
(umockdev's fake sysfs) and compares it with the same fixture laid out as a tree.

Profiles are data: NVIDIA GPUs (class 0x0300/0x0302), NVSwitches (0x0680),
Mellanox SW_MNG bridges (NVL5, "SW_MNG" in the VPD) and generic
``vendor:device[:class]=module+module`` profiles from the ``accel`` setting.
"""

from __future__ import annotations

import os

from guestinit.stages import BootError, Stage
from guestinit.values import Mode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from enum import StrEnum

    from guestinit.boot import Boot
else:  # the type checker sees a real enum; the boot path does without enum
    from guestinit.choice import StrChoice as StrEnum

# <linux/ioport.h> flags in the third column of a device's sysfs ``resource`` file
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_MEM_64 = 0x00100000
BAR_LINES = 6  # lines 0-5 are the BARs; 6 is the expansion ROM, then bridge windows

MAX_REPORTED = 64  # PCI devices listed in the ready frame (it is at most 64 KiB)
NVIDIA = 0x10DE
MELLANOX = 0x15B3


class Kind(StrEnum):
    GPU = "gpu"
    NVSWITCH = "nvswitch"
    SW_MNG = "sw_mng"
    GENERIC = "generic"


class Profile:
    """Which devices count as an accelerator of one kind, and the modules they need.

    ``classes`` holds 16-bit base/sub class codes (0x0302) or full 24-bit codes
    (0x030200); ``None`` matches any. ``vpd`` is a byte string the device's VPD
    must contain.
    """

    __slots__ = ("classes", "device", "kind", "modules", "name", "vendor", "vpd")

    def __init__(self, name: str, kind: Kind, vendor: int, device: int | None = None,
                 classes: tuple[int, ...] | None = None, modules: tuple[str, ...] = (),
                 vpd: bytes = b"") -> None:
        self.name = name
        self.kind = kind
        self.vendor = vendor
        self.device = device
        self.classes = classes
        self.modules = modules
        self.vpd = vpd

    def matches(self, dev: PciDevice) -> bool:
        if dev.vendor != self.vendor or (self.device is not None and dev.device != self.device):
            return False
        if self.classes is not None and not any(
            dev.cls == c if c > 0xFFFF else dev.cls >> 8 == c for c in self.classes
        ):
            return False
        return not self.vpd or self.vpd in dev.vpd


BUILTIN_PROFILES: tuple[Profile, ...] = (
    Profile("nvidia-gpu", Kind.GPU, NVIDIA, classes=(0x0300, 0x0302)),
    Profile("nvidia-nvswitch", Kind.NVSWITCH, NVIDIA, classes=(0x0680,)),
    Profile("mellanox-sw-mng", Kind.SW_MNG, MELLANOX, vpd=b"SW_MNG"),
)


def parse_accel(spec: str) -> Profile:
    """``vendor:device[:class]=module+module`` (hex ids) -> a generic profile."""
    ids, sep, mods = spec.partition("=")
    parts = ids.split(":")
    modules = tuple(m for m in mods.split("+") if m)
    if not sep or not modules or len(parts) not in (2, 3):
        raise ValueError(f"accel profile {spec!r}: expected vendor:device[:class]=module+module "
                         "(e.g. 1d0f:f010:1200=xdma)")
    try:
        nums = [int(p, 16) for p in parts]
    except ValueError:
        raise ValueError(f"accel profile {spec!r}: ids must be hex (like 10ee:903f)") from None
    classes = (nums[2],) if len(nums) == 3 else None
    return Profile(f"accel:{parts[0].lower()}:{parts[1].lower()}", Kind.GENERIC, nums[0],
                   nums[1], classes, modules)


def parse_standin(spec: str, kind: Kind) -> Profile:
    """``vendor:device`` -> a stand-in profile of ``kind`` (``standin.gpu``/``standin.nvswitch``:
    VM tests on emulated devices, with the stand-in driver; the modules are the mode's)."""
    parts = spec.split(":")
    try:
        vendor, device = (int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"stand-in {kind} id {spec!r}: expected vendor:device in hex "
                         "(e.g. 1af4:1110)") from None
    return Profile(f"standin-{kind}:{parts[0].lower()}:{parts[1].lower()}", kind, vendor, device)


class Bar:
    __slots__ = ("index", "io", "mem64", "prefetch", "size", "start")

    def __init__(self, index: int, start: int, size: int, flags: int) -> None:
        self.index = index
        self.start = start
        self.size = size
        self.io = bool(flags & IORESOURCE_IO)
        self.mem64 = bool(flags & IORESOURCE_MEM_64)
        self.prefetch = bool(flags & IORESOURCE_PREFETCH)

    def to_map(self) -> dict[str, object]:
        return {"index": self.index, "size": self.size, "mem64": self.mem64,
                "prefetch": self.prefetch, "io": self.io}


def parse_resource(text: str) -> list[Bar]:
    """The BARs in a sysfs ``resource`` file (``start end flags`` per line); unset ones skipped."""
    bars = []
    for index, line in enumerate(text.splitlines()[:BAR_LINES]):
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"resource line {index}: expected 'start end flags', got {line!r}")
        start, end, flags = (int(f, 16) for f in fields)
        if end > start or (start and end == start):
            bars.append(Bar(index, start, end - start + 1, flags))
    return bars


class PciDevice:
    __slots__ = ("bars", "bdf", "cls", "device", "driver", "iommu_group", "numa_node",
                 "subsystem_device", "subsystem_vendor", "vendor", "vpd")

    def __init__(self, bdf: str, vendor: int, device: int, cls: int, *,
                 subsystem_vendor: int = 0, subsystem_device: int = 0, numa_node: int = -1,
                 iommu_group: int | None = None, driver: str = "",
                 bars: Sequence[Bar] = (), vpd: bytes = b"") -> None:
        self.bdf = bdf
        self.vendor = vendor
        self.device = device
        self.cls = cls
        self.subsystem_vendor = subsystem_vendor
        self.subsystem_device = subsystem_device
        self.numa_node = numa_node
        self.iommu_group = iommu_group
        self.driver = driver
        self.bars = list(bars)
        self.vpd = vpd

    def describe(self) -> str:
        return f"{self.bdf} [{self.vendor:04x}:{self.device:04x}] class {self.cls:06x}"

    def brief(self) -> dict[str, object]:
        """What the ready frame says of every PCI device: ids, class, BAR sizes."""
        return {"bdf": self.bdf, "id": f"{self.vendor:04x}:{self.device:04x}",
                "class": f"0x{self.cls:06x}", "bars": [[b.index, b.size] for b in self.bars]}

    def to_map(self) -> dict[str, object]:
        return {
            "bdf": self.bdf, "vendor": f"0x{self.vendor:04x}", "device": f"0x{self.device:04x}",
            "class": f"0x{self.cls:06x}",
            "subsystem": f"0x{self.subsystem_vendor:04x}:0x{self.subsystem_device:04x}",
            "numa_node": self.numa_node, "iommu_group": self.iommu_group,
            "driver": self.driver, "bars": [b.to_map() for b in self.bars],
        }


def _read(path: str, name: str) -> str:
    try:
        with open(os.path.join(path, name)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _link_base(path: str, name: str) -> str:
    try:
        return os.path.basename(os.readlink(os.path.join(path, name)))
    except OSError:
        return ""


def read_device(sys_path: str) -> PciDevice:
    """One PCI device from its sysfs directory; errors name the directory and file."""
    def hexattr(name: str, required: bool = True) -> int:
        text = _read(sys_path, name)
        if not text and not required:
            return 0
        try:
            return int(text, 16)
        except ValueError:
            raise ValueError(f"read {sys_path}/{name}: expected a hex number, "
                             f"got {text!r}") from None

    try:
        bars = parse_resource(_read(sys_path, "resource"))
    except ValueError as exc:
        raise ValueError(f"read {sys_path}/resource: {exc}") from None
    vendor = hexattr("vendor")
    vpd = b""
    if vendor == MELLANOX:  # VPD reads are slow on real hardware; only profiles that need it
        try:
            with open(os.path.join(sys_path, "vpd"), "rb") as f:
                vpd = f.read(4096)
        except OSError:
            vpd = b""
    numa = _read(sys_path, "numa_node")
    group = _link_base(sys_path, "iommu_group")
    return PciDevice(
        os.path.basename(sys_path), vendor, hexattr("device"), hexattr("class"),
        subsystem_vendor=hexattr("subsystem_vendor", False),
        subsystem_device=hexattr("subsystem_device", False),
        numa_node=int(numa) if numa.lstrip("-").isdigit() else -1,
        iommu_group=int(group) if group.isdigit() else None,
        driver=_link_base(sys_path, "driver"), bars=bars, vpd=vpd,
    )


def pci_paths(root: str) -> list[str]:
    """sysfs directories of every PCI device (``<root>/sys/bus/pci/devices``), by address."""
    base = os.path.join(root, "sys", "bus", "pci", "devices")
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:  # a kernel without PCI (microvm without pcie=on)
        return []
    return [os.path.join(base, n) for n in names]


def scan(root: str = "/") -> list[PciDevice]:
    return [read_device(p) for p in pci_paths(root)]


class Accelerator:
    __slots__ = ("dev", "profile")

    def __init__(self, dev: PciDevice, profile: Profile) -> None:
        self.dev = dev
        self.profile = profile

    @property
    def kind(self) -> Kind:
        return self.profile.kind

    def to_map(self) -> dict[str, object]:
        out = self.dev.to_map()
        out.update(kind=str(self.profile.kind), profile=self.profile.name,
                   modules=list(self.profile.modules))
        return out


def classify(devices: Iterable[PciDevice], profiles: Sequence[Profile]) -> list[Accelerator]:
    """Devices that match a profile (first match wins; generic profiles are tried first)."""
    ordered = sorted(profiles, key=lambda p: p.kind != Kind.GENERIC)
    found = []
    for dev in devices:
        for profile in ordered:
            if profile.matches(dev):
                found.append(Accelerator(dev, profile))
                break
    return found


def _summary(accels: Sequence[Accelerator]) -> str:
    if not accels:
        return "no accelerators"
    return "; ".join(f"{a.kind} {a.dev.describe()}" for a in accels)


_NEEDS = {Mode.GPU: "GPU", Mode.NVL4: "NVSwitch", Mode.NVL5: "SW_MNG bridge"}
# NVRC's topologies: (GPUs, NVSwitches, SW_MNG bridges) present -> mode, fabric
TOPOLOGIES = (
    "GPUs alone -> gpu",
    "GPUs + NVSwitches -> gpu with the NVL4 fabric (nv-fabricmanager, FABRIC_MODE 0)",
    "GPUs + SW_MNG bridges -> gpu with the NVL5 fabric (nvlsm + nv-fabricmanager, "
    "symmetric rails)",
    "NVSwitches alone -> nvl4 service VM (FABRIC_MODE 1)",
    "SW_MNG bridges alone -> nvl5 service VM (FABRIC_MODE 1, symmetric rails)",
    "none of them -> cpu",
)


def counts(accels: Sequence[Accelerator]) -> str:
    n = {k: sum(1 for a in accels if a.kind == k) for k in (Kind.GPU, Kind.NVSWITCH,
                                                             Kind.SW_MNG)}
    return (f"{n[Kind.GPU]} GPUs, {n[Kind.NVSWITCH]} NVSwitches, "
            f"{n[Kind.SW_MNG]} SW_MNG bridges")


def decide_mode(accels: Sequence[Accelerator], forced: Mode = Mode.AUTO) -> tuple[Mode, str]:
    """The mode and the NVLink fabric ("", "nvl4", "nvl5") the inventory implies (NVRC's
    rules), or the forced mode if the inventory allows it.

    Raises ValueError with the counts found and the topologies accepted when nothing fits.
    """
    kinds = {a.kind for a in accels}
    gpus, switches, swmng = Kind.GPU in kinds, Kind.NVSWITCH in kinds, Kind.SW_MNG in kinds
    if forced == Mode.CPU:
        return Mode.CPU, ""
    if switches and swmng and forced in (Mode.AUTO, Mode.GPU):
        # NVRC: a mixed management topology stops the boot; forcing nvl4/nvl5 picks one
        raise ValueError(f"inventory fits no topology: NVSwitches and SW_MNG bridges together "
                         f"(found {counts(accels)}: {_summary(accels)}); accepted: "
                         + "; ".join(TOPOLOGIES))
    fabric = "nvl4" if switches else "nvl5" if swmng else ""  # for a GPU mode
    need = {Mode.GPU: gpus, Mode.NVL4: switches, Mode.NVL5: swmng}
    if forced != Mode.AUTO:
        if not need[forced]:
            raise ValueError(f"mode {forced} was forced but the inventory has no "
                             f"{_NEEDS[forced]} (found {counts(accels)}: {_summary(accels)})")
        return forced, fabric if forced == Mode.GPU else ""
    if gpus:
        return Mode.GPU, fabric
    if switches:
        return Mode.NVL4, ""
    if swmng:
        return Mode.NVL5, ""
    return Mode.CPU, ""


def profiles_from(accel_specs: Sequence[str], standin_gpus: Sequence[str] = (),
                  standin_switches: Sequence[str] = ()) -> list[Profile]:
    return [*(parse_accel(s) for s in accel_specs),
            *(parse_standin(s, Kind.GPU) for s in standin_gpus),
            *(parse_standin(s, Kind.NVSWITCH) for s in standin_switches), *BUILTIN_PROFILES]


def run_discover(boot: Boot) -> None:
    cfg = boot.config()
    try:
        profiles = profiles_from(cfg.words("accel"), cfg.words("standin.gpu"),
                                 cfg.words("standin.nvswitch"))
        start = boot.timeline.now()
        devices = scan(boot.root)
        accels = classify(devices, profiles)
        boot.timeline.add("discover:pci", start, boot.timeline.now())
        mode, fabric = decide_mode(accels, Mode(cfg.str("mode")))
    except (ValueError, OSError) as exc:
        raise BootError(Stage.DISCOVER, str(exc)) from None
    boot.facts["inventory"] = [a.to_map() for a in accels]
    boot.facts["pci"] = [d.brief() for d in devices[:MAX_REPORTED]]
    boot.facts["mode"] = str(mode)
    boot.facts["fabric"] = fabric
    boot.kmsg.log(6, f"discover: mode {mode}{' with the ' + fabric + ' fabric' if fabric else ''}"
                  f" ({counts(accels)}): {_summary(accels)}")


def inventory_kinds(boot: Boot) -> dict[str, list[dict[str, object]]]:
    """The discovered accelerators grouped by kind (for the later stages)."""
    out: dict[str, list[dict[str, object]]] = {}
    inventory = boot.facts.get("inventory", [])
    assert isinstance(inventory, list)
    for dev in inventory:
        out.setdefault(str(dev["kind"]), []).append(dev)
    return out
