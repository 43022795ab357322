"""NVIDIA's kernel modules: what each mode loads, and the ``NVreg_*`` parameters the init
chooses. The loader (``kmod``) gets both as data."""

from __future__ import annotations

from guestinit.kmod import normalize
from guestinit.pci import Kind
from guestinit.values import Fabric, Mode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from guestinit.boot import Facts
    from guestinit.config import Config
    from guestinit.pci import Accelerator

# what each mode loads beyond the early modules (names as the kernel spells them)
MODE_MODULES: dict[Mode, tuple[str, ...]] = {
    Mode.CPU: (),
    Mode.GPU: ("nvidia", "nvidia_uvm"),
    Mode.NVL4: ("nvidia",),
    Mode.NVL5: ("nvidia", "ib_umad", "mlx5_ib"),
}


def accel_modules(mode: Mode, inventory: Sequence[Accelerator],
                  nvidia_extra: Sequence[str], fabric: Fabric = Fabric.NONE) -> list[str]:
    """The modules the inventory needs: the mode's NVIDIA set (with the NVL5 fabric's
    InfiniBand drivers beside GPUs) plus each generic profile's."""
    out = list(MODE_MODULES[mode])
    if mode == Mode.GPU:
        if fabric == Fabric.NVL5:
            out.extend(m for m in MODE_MODULES[Mode.NVL5] if m not in out)
        out.extend(normalize(m) for m in nvidia_extra)
    for accel in inventory:
        out.extend(normalize(m) for m in accel.profile.modules)
    return list(dict.fromkeys(out))


def auto_params(mode: Mode, gpus: int, device_mode: int, device_gid: int) -> list[str]:
    """Parameters the init chooses: node mode/group, NVLink off on a lone GPU."""
    if mode == Mode.CPU:
        return []
    out = [f"nvidia.NVreg_DeviceFileMode=0{device_mode:o}",
           f"nvidia.NVreg_DeviceFileGID={device_gid}"]
    if mode == Mode.GPU and gpus == 1:
        out.append("nvidia.NVreg_NvLinkDisable=1")
    return out


def plan(facts: Facts, cfg: Config) -> tuple[list[str], list[str]]:
    """(modules, parameters) for ``kmod.run_modules``, from what discover found."""
    modules = accel_modules(facts.mode, facts.inventory, cfg.words("nvidia.modules"),
                            facts.fabric)
    params = auto_params(facts.mode, len(facts.of_kind(Kind.GPU)), cfg.int("device.mode"),
                         cfg.int("device.gid"))
    return modules, params
