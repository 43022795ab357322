"""NVIDIA GPUs hot-added and hot-removed after ready (``guestinit.hotplug``'s handler).

A PCI ``add`` is a GPU when the device, read from sysfs, matches a GPU profile (the same
profiles as the discover stage: NVIDIA's, ``accel``, the stand-ins). Serving it:

1. its driver: when ``nvidia`` is not loaded (a guest that booted without a GPU), the
   mode's modules are loaded with the parameters the boot would have chosen, unless
   ``modules_disabled`` is set: then the GPU is refused, naming the setting
   (``lockdown=false`` keeps module loading open for guests that boot without a GPU;
   the NVIDIA driver refuses to load with no device to probe, ``nvidia_init_module`` in
   kernel-open/nvidia/nv.c, so it cannot be preloaded instead);
2. the driver's registration (``/proc/driver/nvidia/gpus/<bdf>/information``): until it
   is there the add waits, and the caller looks again;
3. ``/dev/nvidiaM`` (M the driver's minor: the lowest free one, ``nv_linux_assign_minor
   _locked`` in nv.c) and the control nodes if missing, as the devices stage makes them;
4. an index: the lowest one no GPU has (GPUs assigned at boot keep theirs, so a
   container's ``nvidia.com/gpu=N`` never moves to another GPU);
5. the CDI spec rewritten atomically (``cdi.update``), and the audit line
   ``assign gpuN BDF UUID MODEL as /dev/nvidiaM (hot-plug)``.

A ``remove`` undoes 3-5 (``release gpuN BDF UUID (hot-unplug)``). No daemon of ours
holds one GPU: nvidia-persistenced serves them all and the driver drops a removed one
from it, so there is nothing to drain first.
"""

from __future__ import annotations

import os
import stat

from guestinit import pci
from guestinit.hotplug import Hotplug, HotplugError
from guestinit.lockdown import MODULES_DISABLED
from guestinit.nvidia import devices
from guestinit.pci import Kind
from guestinit.stages import BootError
from guestinit.sysfs import read_text
from guestinit.values import Mode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.boot import Boot
    from guestinit.uevents import Event

PCI_DEVICES = "sys/bus/pci/devices"


class GpuHandler:
    __slots__ = ("accepted", "boot", "profiles", "vpd_of")

    def __init__(self, boot: Boot) -> None:
        from guestinit.discover import profiles_from

        cfg = boot.config()
        self.boot = boot
        self.profiles = profiles_from(cfg.words("accel"), cfg.words("standin.gpu"),
                                      cfg.words("standin.nvswitch"))
        self.vpd_of = pci.vpd_vendors(self.profiles)
        # what accepts() read from sysfs, for the inventory once the GPU is assigned
        self.accepted: dict[str, pci.Accelerator] = {}

    def _classify(self, sys_path: str) -> pci.Accelerator | str:
        try:
            dev = pci.read_device(sys_path, self.vpd_of)
        except (OSError, ValueError) as exc:
            return f"not readable in sysfs ({exc})"
        found = pci.classify([dev], self.profiles)
        if not found:
            return f"{dev.describe()} matches no accelerator profile"
        if found[0].kind != Kind.GPU:
            return f"{dev.describe()} is a {found[0].kind}: only GPUs are hot-plugged"
        return found[0]

    def accepts(self, event: Event) -> str | None:
        path = self.boot.path("sys", event.devpath.lstrip("/")) if event.devpath \
            else self.boot.path(PCI_DEVICES, event.key)
        got = self._classify(path)
        if isinstance(got, str):
            return got
        self.accepted[event.key] = got
        return None

    def owns(self, key: str) -> bool:
        return any(g.bdf == key for g in self.boot.facts.gpus)

    def owned(self) -> set[str]:
        return {g.bdf for g in self.boot.facts.gpus}

    def present(self) -> set[str]:
        base = self.boot.path(PCI_DEVICES)
        try:
            names = os.listdir(base)
        except OSError:
            return set()
        return {n.lower() for n in names
                if not isinstance(self._classify(os.path.join(base, n)), str)}

    def devices(self) -> list[dict[str, object]]:
        return self.boot.facts.gpu_maps()

    # -- assign ------------------------------------------------------------
    def _ensure_driver(self, key: str) -> None:
        """Load the GPU mode's modules unless loaded; HotplugError when that cannot be."""
        from guestinit import kmod
        from guestinit.nvidia import modules

        boot = self.boot
        wanted = list(modules.MODE_MODULES[Mode.GPU])
        if all(m in kmod.loaded_modules(boot.root) for m in wanted):
            return
        locked = (boot.facts.lockdown or
                  (read_text(boot.path(MODULES_DISABLED), (OSError,)) or "0").strip() == "1")
        if locked:
            raise HotplugError(
                f"GPU {key} cannot be served: the nvidia driver is not loaded and module "
                "loading is locked (modules_disabled=1); boot with guestinit.lockdown=false "
                "for guests that boot without a GPU and get one hot-plugged")
        cfg = boot.config()
        params = modules.auto_params(Mode.GPU, 2, cfg.int("device.mode"), cfg.int("device.gid"))
        try:  # two GPUs' parameters: NVLink stays on, more may follow
            loaded = kmod.load_modules(boot, wanted, params)
        except BootError as exc:
            raise HotplugError(f"GPU {key} cannot be served: {exc.reason}") from None
        boot.facts.modules = [*(boot.facts.modules or ()), *loaded]
        boot.kmsg.log(6, f"hotplug: loaded {', '.join(loaded)} for GPU {key}")

    def assign(self, key: str) -> dict[str, object] | None:
        boot = self.boot
        info = boot.path("proc/driver/nvidia/gpus", key, "information")
        if not os.path.exists(info):
            self._ensure_driver(key)
            return None  # the driver probes it; the caller looks again
        try:
            gpu = next(g for g in devices.read_gpus(boot.root) if g.bdf == key)
        except (ValueError, StopIteration) as exc:
            raise HotplugError(f"GPU {key}: {exc or 'not in /proc/driver/nvidia/gpus'}") \
                from None
        cfg = boot.config()
        try:
            nodes = devices.plan_nodes(boot.root, Mode.GPU, [gpu], 0, cfg.int("device.mode"),
                                       cfg.int("device.gid"), uvm_tools=cfg.bool("uvm.tools"))
            devices.apply_nodes(boot, nodes)
        except (ValueError, BootError) as exc:
            raise HotplugError(f"GPU {key}: {getattr(exc, 'reason', exc)}") from None
        by_path = {n.path: n for n in nodes}
        facts = boot.facts
        taken = {g.index for g in facts.gpus}
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        facts.gpus.append(devices.assigned(index, gpu, by_path, ()))
        accel = self.accepted.pop(key, None)
        if accel is not None and not any(a.dev.bdf == key for a in facts.inventory):
            facts.inventory.append(accel)
        if not facts.device_nodes.get("control"):
            facts.device_nodes["control"] = [by_path[p].to_map() for p in devices.CONTROL
                                             if p in by_path]
        self._update_cdi(key)
        return {"detail": f"assign gpu{index} {gpu.bdf} {gpu.uuid or '(no uuid)'} "
                f"{gpu.model} as /dev/nvidia{gpu.minor} (hot-plug)",
                "index": index, "uuid": gpu.uuid}

    def _update_cdi(self, key: str) -> None:
        from guestinit.nvidia import cdi

        try:
            cdi.update(self.boot)
        except OSError as exc:
            raise HotplugError(f"GPU {key}: CDI spec {exc.filename or ''}: "
                               f"{exc.strerror or exc}") from None

    # -- release -----------------------------------------------------------
    def release(self, key: str) -> dict[str, object]:
        boot = self.boot
        facts = boot.facts
        gpu = next(g for g in facts.gpus if g.bdf == key)
        facts.gpus.remove(gpu)
        facts.inventory = [a for a in facts.inventory if a.dev.bdf != key]
        node = boot.path("dev", f"nvidia{gpu.minor}")
        try:
            st = os.lstat(node)
            if stat.S_ISCHR(st.st_mode) and os.minor(st.st_rdev) == gpu.minor:
                boot.effects.unlink(node)
        except FileNotFoundError:
            pass
        except OSError as exc:
            boot.kmsg.log(3, f"hotplug: remove {node}: {exc.strerror or exc}")
        self._update_cdi(key)
        return {"detail": f"release gpu{gpu.index} {gpu.bdf} {gpu.uuid or '(no uuid)'} "
                "(hot-unplug)", "index": gpu.index, "uuid": gpu.uuid}



def start(boot: Boot) -> Hotplug | None:
    """The monitor and NVIDIA's GPU handler, when ``hotplug`` is on and the boot is in gpu
    or cpu mode (a service VM's NVSwitches are not hot-plugged); None otherwise, said in
    kmsg and, when the monitor cannot open, in a ``progress`` warning frame."""
    cfg = boot.config()
    if not cfg.bool("hotplug"):
        return None
    if boot.facts.mode not in (Mode.GPU, Mode.CPU):
        boot.kmsg.log(6, f"hotplug: not in {boot.facts.mode} mode (a service VM's switches "
                      "stay as booted)")
        return None
    from guestinit.uevents import Monitor

    start_ns = boot.timeline.now()
    try:
        monitor = Monitor("pci")
    except OSError as exc:
        boot.kmsg.log(3, f"hotplug: no uevent monitor: {exc}")
        boot.reporter.progress("hotplug", "warning", detail=f"no uevent monitor: {exc}")
        return None
    hotplug = Hotplug(boot, GpuHandler(boot), monitor, cfg.float("hotplug.timeout"))
    boot.kmsg.log(6, "hotplug: watching PCI uevents")
    hotplug.guarded(lambda: hotplug.rescan(boot.timeline.now(),
                                           "scanning sysfs for devices added since discover"))
    boot.timeline.add("hotplug:monitor", start_ns, boot.timeline.now())
    return hotplug
