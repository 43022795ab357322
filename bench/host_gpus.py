"""A host's NVIDIA PCI devices, enumerated through udev (pyudev over libudev).

Hosts have udev: its enumeration (``Context().list_devices(subsystem="pci")``) gives each
device's properties (``PCI_ID``, ``PCI_CLASS``, ``PCI_SLOT_NAME``, ``DRIVER``) and its
sysfs attributes, read here through pyudev too (``resource``, ``numa_node``, the link
speeds), the BARs parsed by the guest's own parser (``guestinit.pci.parse_resource``) and
the kind decided by the guest's NVIDIA profiles (``guestinit.nvidia.PROFILES``: GPUs are
class 0x0300/0x0302, NVSwitches 0x0680), so host and guest agree on what a GPU is. The
IOMMU group is a symlink, which libudev does not read as an attribute: it is read from
the device's sysfs path. Tests run it under ``umockdev-run`` with the fixtures of
``tests/fixtures/pci``.

``python -m bench.host_gpus`` prints a table (``--json``: the list); ``--bar-map-target``
prints ``<bdf>:<bar>`` of the largest memory BAR of the first GPU (PCI order), what
``guestinit-bench bar-map`` maps when given no target, or nothing when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from guestinit.nvidia import NVIDIA, PROFILES
from guestinit.pci import Bar, PciDevice, parse_resource

LINK = ("current_link_speed", "current_link_width", "max_link_speed", "max_link_width")


class HostGpuError(RuntimeError):
    """udev cannot be asked (pyudev or libudev missing), named with what to install."""


@dataclass(frozen=True)
class HostDevice:
    bdf: str
    vendor: int
    device: int
    cls: int
    kind: str  # gpu, nvswitch or other
    driver: str | None
    numa_node: int | None
    iommu_group: str | None
    bars: tuple[Bar, ...]  # memory BARs (I/O ones left out)
    link: dict[str, str]  # current/max link speed and width, as sysfs spells them

    def to_map(self) -> dict[str, object]:
        return {"bdf": self.bdf, "vendor": f"0x{self.vendor:04x}",
                "device": f"0x{self.device:04x}", "class": f"0x{self.cls:06x}",
                "kind": self.kind, "driver": self.driver, "numa_node": self.numa_node,
                "iommu_group": self.iommu_group,
                "bars": [{"index": b.index, "start": f"0x{b.start:x}", "size": b.size,
                          "prefetch": b.prefetch, "mem64": b.mem64} for b in self.bars],
                "link": self.link}


def kind_of(device: int, cls: int) -> str:
    """gpu or nvswitch as the guest's NVIDIA profiles decide (by class), else other."""
    dev = PciDevice("", NVIDIA, device, cls)
    for profile in PROFILES:
        if profile.vendor == NVIDIA and profile.matches(dev):
            return str(profile.kind)
    return "other"


def _context() -> object:
    try:
        import pyudev
    except ImportError as exc:
        raise HostGpuError(f"pyudev is not installed ({exc}): pip install 'pyudev>=0.24' "
                          "(a dependency of this project)") from None
    try:
        return pyudev.Context()
    except (ImportError, OSError) as exc:
        raise HostGpuError(f"libudev did not load ({exc}): install the libudev1 package "
                          "(Debian/Ubuntu: apt-get install libudev1)") from None


def _int(text: str | None, base: int = 10) -> int | None:
    try:
        return int(text, base) if text else None
    except ValueError:
        return None


def from_udev(dev: object) -> HostDevice | None:
    """One pyudev PCI device, or None when it is not NVIDIA's."""
    props = dev.properties  # type: ignore[attr-defined]
    vendor_id, _, device_id = str(props.get("PCI_ID", "")).partition(":")
    if _int(vendor_id, 16) != NVIDIA:
        return None
    cls = _int(props.get("PCI_CLASS"), 16) or 0
    device = _int(device_id, 16) or 0
    attrs = dev.attributes  # type: ignore[attr-defined]

    def attr(name: str) -> str | None:
        try:
            return str(attrs.asstring(name)).strip()
        except (KeyError, OSError, UnicodeDecodeError):
            return None

    try:
        bars = parse_resource(attr("resource") or "")
    except ValueError:
        bars = []
    group = os.path.join(str(dev.sys_path), "iommu_group")  # type: ignore[attr-defined]
    numa = _int(attr("numa_node"))
    return HostDevice(
        bdf=str(props.get("PCI_SLOT_NAME") or dev.sys_name).lower(),  # type: ignore[attr-defined]
        vendor=NVIDIA, device=device, cls=cls, kind=kind_of(device, cls),
        driver=str(props["DRIVER"]) if props.get("DRIVER") else None,
        numa_node=numa if numa is not None and numa >= 0 else None,
        iommu_group=os.path.basename(os.readlink(group)) if os.path.islink(group) else None,
        bars=tuple(b for b in bars if not b.io),
        link={name: value for name in LINK if (value := attr(name))})


def enumerate_nvidia(context: object | None = None) -> list[HostDevice]:
    """The host's NVIDIA PCI devices in PCI address order; HostGpuError without udev."""
    ctx = context if context is not None else _context()
    found = [d for d in map(from_udev, ctx.list_devices(subsystem="pci"))  # type: ignore[attr-defined]
             if d is not None]
    return sorted(found, key=lambda d: d.bdf)


def bar_map_target(devices: list[HostDevice]) -> tuple[HostDevice, Bar] | None:
    """The first GPU and its largest memory BAR (BAR 1 on NVIDIA's data-center GPUs)."""
    for dev in devices:
        if dev.kind == "gpu" and dev.bars:
            return dev, max(dev.bars, key=lambda b: (b.size, -b.index))
    return None


def describe(devices: list[HostDevice]) -> str:
    from guestinit.sizes import format_size

    if not devices:
        return "no NVIDIA PCI devices (udev's pci enumeration)"
    lines = [f"{'BDF':<14} {'KIND':<9} {'ID':<10} {'DRIVER':<12} {'NUMA':<5} BARS"]
    for d in devices:
        bars = ", ".join(f"{b.index}:{format_size(b.size)}{' pf' if b.prefetch else ''}"
                         for b in d.bars)
        lines.append(f"{d.bdf:<14} {d.kind:<9} 10de:{d.device:04x}  {d.driver or '-':<12} "
                     f"{'-' if d.numa_node is None else d.numa_node!s:<5} {bars}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m bench.host_gpus") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__)
    ap.add_argument("--json", action="store_true", help="print the devices as JSON")
    ap.add_argument("--bar-map-target", action="store_true",
                    help="print <bdf>:<bar> of the first GPU's largest BAR (nothing if none)")
    args = ap.parse_args(argv)
    try:
        devices = enumerate_nvidia()
    except HostGpuError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.bar_map_target:
        found = bar_map_target(devices)
        if found is not None:
            print(f"{found[0].bdf}:{found[1].index}")
        return 0
    print(json.dumps([d.to_map() for d in devices], indent=1) if args.json
          else describe(devices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
