"""The discover stage: the PCI scan with every profile, then NVIDIA's mode and fabric."""

from __future__ import annotations

from guestinit import nvidia, pci
from guestinit.pci import Kind
from guestinit.stages import BootError, Stage

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from guestinit.boot import Boot
    from guestinit.pci import Profile


def profiles_from(accel_specs: Sequence[str], standin_gpus: Sequence[str] = (),
                  standin_switches: Sequence[str] = ()) -> list[Profile]:
    """The ``accel`` profiles, the stand-ins (tests), then NVIDIA's."""
    return [*(pci.parse_accel(s) for s in accel_specs),
            *(pci.parse_standin(s, Kind.GPU) for s in standin_gpus),
            *(pci.parse_standin(s, Kind.NVSWITCH) for s in standin_switches),
            *nvidia.PROFILES]


def run_discover(boot: Boot) -> None:
    cfg = boot.config()
    try:
        profiles = profiles_from(cfg.words("accel"), cfg.words("standin.gpu"),
                                 cfg.words("standin.nvswitch"))
        start = boot.timeline.now()
        devices = pci.scan(boot.root, pci.vpd_vendors(profiles))
        accels = pci.classify(devices, profiles)
        boot.timeline.add("discover:pci", start, boot.timeline.now())
        mode, fabric = nvidia.decide_mode(accels, cfg.mode())
    except (ValueError, OSError) as exc:
        raise BootError(Stage.DISCOVER, str(exc)) from None
    facts = boot.facts
    facts.inventory = accels
    facts.pci = [d.brief() for d in devices[:pci.MAX_REPORTED]]
    facts.mode = mode
    facts.fabric = fabric
    boot.kmsg.log(6, f"discover: mode {mode}{' with the ' + fabric + ' fabric' if fabric else ''}"
                  f" ({nvidia.counts(accels)}): {pci.summary(accels)}")
