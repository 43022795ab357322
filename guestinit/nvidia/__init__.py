"""NVIDIA's policy and bring-up.

This package's own module is the topology every boot needs (the discover stage): which
devices are NVIDIA's, and the mode and NVLink fabric they make (NVRC's rules). The
profiles are data for the generic PCI scan (``pci.classify``): GPUs by class
0x0300/0x0302, NVSwitches by 0x0680, Mellanox SW_MNG bridges (NVL5) by "SW_MNG" in
their VPD. Keeping it here, not in a submodule, saves the cpu boot one import.

The submodules, imported only in NVIDIA modes: the driver's modules and parameters
(modules), device nodes and MIG capabilities (devices, mig), the daemons and their ready
signals (daemons, daemon_ready), the CDI spec and the driver's userspace files (cdi,
driver_files). Generic modules (pci, kmod) know nothing of NVIDIA: they get this
package's profiles and module lists as data from the stage that calls them.
"""

from __future__ import annotations

from guestinit.pci import Kind, Profile, summary
from guestinit.values import Fabric, Mode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from guestinit.pci import Accelerator

NVIDIA = 0x10DE
MELLANOX = 0x15B3

PROFILES: tuple[Profile, ...] = (
    Profile("nvidia-gpu", Kind.GPU, NVIDIA, classes=(0x0300, 0x0302)),
    Profile("nvidia-nvswitch", Kind.NVSWITCH, NVIDIA, classes=(0x0680,)),
    Profile("mellanox-sw-mng", Kind.SW_MNG, MELLANOX, vpd=b"SW_MNG"),
)

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


def decide_mode(accels: Sequence[Accelerator], forced: Mode = Mode.AUTO) -> tuple[Mode, Fabric]:
    """The mode and the NVLink fabric the inventory implies (NVRC's rules), or the forced
    mode if the inventory allows it.

    Raises ValueError with the counts found and the topologies accepted when nothing fits.
    """
    kinds = {a.kind for a in accels}
    gpus, switches, swmng = Kind.GPU in kinds, Kind.NVSWITCH in kinds, Kind.SW_MNG in kinds
    if forced == Mode.CPU:
        return Mode.CPU, Fabric.NONE
    if switches and swmng and forced in (Mode.AUTO, Mode.GPU):
        # NVRC: a mixed management topology stops the boot; forcing nvl4/nvl5 picks one
        raise ValueError(f"inventory fits no topology: NVSwitches and SW_MNG bridges together "
                         f"(found {counts(accels)}: {summary(accels)}); accepted: "
                         + "; ".join(TOPOLOGIES))
    fabric = Fabric.NVL4 if switches else Fabric.NVL5 if swmng else Fabric.NONE  # GPU mode's
    need = {Mode.GPU: gpus, Mode.NVL4: switches, Mode.NVL5: swmng}
    if forced != Mode.AUTO:
        if not need[forced]:
            raise ValueError(f"mode {forced} was forced but the inventory has no "
                             f"{_NEEDS[forced]} (found {counts(accels)}: {summary(accels)})")
        return forced, fabric if forced == Mode.GPU else Fabric.NONE
    if gpus:
        return Mode.GPU, fabric
    if switches:
        return Mode.NVL4, Fabric.NONE
    if swmng:
        return Mode.NVL5, Fabric.NONE
    return Mode.CPU, Fabric.NONE
