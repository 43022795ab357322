"""PCI discovery: the devices, and the accelerators among them that match a profile.

Enumeration: the entries of ``<root>/sys/bus/pci/devices``, each read by
``read_device`` from the device's sysfs attribute files. That is what libudev's
enumeration does too; pyudev was dropped from the boot path because finding libudev
(``ctypes.util.find_library`` runs ``ldconfig -p``) and importing it cost ~0.8 s of a
TCG boot with PCI devices. A unit test runs the reader on "/" under ``umockdev-run``
(umockdev's fake sysfs) and compares it with the same fixture laid out as a tree.

Profiles are data, given by the caller: NVIDIA's (``nvidia.PROFILES``: GPUs,
NVSwitches, Mellanox SW_MNG bridges found by their VPD), stand-ins, and generic
``vendor:device[:class]=module+module`` profiles from the ``accel`` setting. A device's
VPD is read only for vendors a profile matches VPD on (slow on real hardware).
"""

from __future__ import annotations

import os

from guestinit.sysfs import read_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Container, Iterable, Sequence
    from enum import StrEnum
else:  # the type checker sees a real enum; the boot path does without enum
    from guestinit.choice import StrChoice as StrEnum

# <linux/ioport.h> flags in the third column of a device's sysfs ``resource`` file
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_MEM_64 = 0x00100000
BAR_LINES = 6  # lines 0-5 are the BARs; 6 is the expansion ROM, then bridge windows

MAX_REPORTED = 64  # PCI devices listed in the ready frame (it is at most 64 KiB)


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


def _attr(path: str, name: str) -> str:
    """A sysfs attribute, stripped; "" if it cannot be read (absent, or refused)."""
    return (read_text(os.path.join(path, name), (OSError,)) or "").strip()


def _link_base(path: str, name: str) -> str:
    try:
        return os.path.basename(os.readlink(os.path.join(path, name)))
    except OSError:
        return ""


def read_device(sys_path: str, read_vpd_of: Container[int] = ()) -> PciDevice:
    """One PCI device from its sysfs directory, its VPD read for the vendors in
    ``read_vpd_of``; errors name the directory and file."""
    def hexattr(name: str, required: bool = True) -> int:
        text = _attr(sys_path, name)
        if not text and not required:
            return 0
        try:
            return int(text, 16)
        except ValueError:
            raise ValueError(f"read {sys_path}/{name}: expected a hex number, "
                             f"got {text!r}") from None

    try:
        bars = parse_resource(_attr(sys_path, "resource"))
    except ValueError as exc:
        raise ValueError(f"read {sys_path}/resource: {exc}") from None
    vendor = hexattr("vendor")
    vpd = b""
    if vendor in read_vpd_of:  # VPD reads are slow on real hardware; only profiles that need it
        try:
            with open(os.path.join(sys_path, "vpd"), "rb") as f:
                vpd = f.read(4096)
        except OSError:
            vpd = b""
    numa = _attr(sys_path, "numa_node")
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


def scan(root: str = "/", read_vpd_of: Container[int] = ()) -> list[PciDevice]:
    return [read_device(p, read_vpd_of) for p in pci_paths(root)]


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


def summary(accels: Sequence[Accelerator]) -> str:
    if not accels:
        return "no accelerators"
    return "; ".join(f"{a.kind} {a.dev.describe()}" for a in accels)


def vpd_vendors(profiles: Iterable[Profile]) -> frozenset[int]:
    """Vendors whose devices' VPD a profile matches on (only those are read)."""
    return frozenset(p.vendor for p in profiles if p.vpd)
