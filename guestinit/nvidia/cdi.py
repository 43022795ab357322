"""The CDI specs for the GPUs found: ``/var/run/cdi/nvidia.json`` (kind ``nvidia.com/gpu``)
and, when ``imex.channels`` asks for IMEX channels, ``/var/run/cdi/nvidia-imex.json`` (kind
``nvidia.com/imex-channel``), on par with ``nvidia-ctk cdi generate`` (``features()``
says what is produced and what is not, and why).

Devices: each GPU by index and by UUID, each MIG GPU instance as ``<gpu>:<gi>``, and
``all``. The spec-wide edits carry ``NVIDIA_VISIBLE_DEVICES=void``, the control nodes,
``additionalGids`` when the nodes belong to a group, the driver's userspace as bind mounts
and the ``nvidia-cdi-hook`` hooks (``guestinit.driver_files``). ``cdiVersion`` is the
lowest version the spec's features need (``minimum_version``, CDI's own rules). Written
atomically (tmp + rename) so a reader never sees half a spec.
"""

from __future__ import annotations

import os

from guestinit.nvidia import driver_files
from guestinit.stages import BootError, Stage
from guestinit.sysfs import write_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from guestinit.boot import Boot

KIND = "nvidia.com/gpu"
IMEX_KIND = "nvidia.com/imex-channel"
SPEC_PATH = "var/run/cdi/nvidia.json"
IMEX_SPEC_PATH = "var/run/cdi/nvidia-imex.json"
# the released versions of the CDI specification (specs-go/version.go); 0.3.0 is the
# earliest CDI still accepts
VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0")

# (nvidia-ctk spec feature, produced here, how or why not): the table of docs/guest.md
FEATURES: tuple[tuple[str, bool, str], ...] = (
    ("device nodes per GPU index, per UUID, and `all`", True,
     "from the driver's procfs; `fileMode` from `device.mode`, no `hostPath`"),
    ("device name strategies", True, "index and uuid, both at once; the index is the GPU's "
     "rank in PCI bus order, as Kata annotates a cold-plugged GPU (`cdi.k8s.io/vfioN: "
     "nvidia.com/gpu=<rank>`, `container.go` `annotateContainerWithVFIOMetadata`) and as "
     "NVML numbers GPUs; `/dev/nvidiaM` keeps the driver's minor, which the `ready` facts "
     "and the `assign gpuN BDF UUID MODEL as /dev/nvidiaM` audit line both show"),
    ("MIG devices", True, "`<gpu>:<gi>` per GPU instance with a compute instance: "
     "/dev/nvidiaN + the GI and CI access caps; no MIG UUID names (they come from NVML)"),
    ("IMEX channels", True, "a second spec, kind `nvidia.com/imex-channel`, one device per "
     "channel node, `imex.channels` of them (the driver creates none itself)"),
    ("control nodes", True, "nvidiactl, nvidia-uvm, nvidia-uvm-tools (with `uvm.tools`), "
     "nvidia-modeset (when loaded)"),
    ("library mounts", True, "every regular `lib*.so.<driver version>` of the library dir"),
    ("binary mounts", True, "nvidia-smi, nvidia-debugdump, nvidia-persistenced, "
     "nvidia-cuda-mps-control, nvidia-cuda-mps-server, those in `nvidia.bin`"),
    ("GSP firmware mounts", True, "the files of /lib/firmware/nvidia/<driver version>/"),
    ("IPC: persistenced socket", True, "/run/nvidia-persistenced/socket when it exists"),
    ("IPC: fabric manager socket", True, "/run/nvidia-fabricmanager/socket when it exists "
     "(fabric manager talks TCP on 127.0.0.1 unless configured for a socket)"),
    ("IPC: MPS pipe directory", False, "the spec is written at boot, before any MPS "
     "control daemon could make /tmp/nvidia-mps; the init does not start one"),
    ("hook create-symlinks", True, "soname links (read from each library's ELF DT_SONAME) "
     "and libcuda.so / libnvidia-opticalflow.so, when nvidia-cdi-hook is in the image"),
    ("hook update-ldcache", True, "`--folder <library dir>`, when nvidia-cdi-hook is there"),
    ("hook enable-cuda-compat", False, "the image's driver is the one the kernel runs: "
     "there is no older host driver for a forward-compat CUDA to stand in for"),
    ("hook chmod, DRI nodes", False, "a headless guest has no DRM render nodes"),
    ("graphics libraries and configs (Vulkan, EGL, GLX, Xorg)", False,
     "headless compute guest; only what the `lib*.so.<version>` rule picks up"),
)


def features() -> tuple[tuple[str, bool, str], ...]:
    """What of ``nvidia-ctk cdi generate``'s output these specs have (``FEATURES``)."""
    return FEATURES


def _maps(value: object) -> list[Mapping[str, object]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def minimum_version(spec: Mapping[str, object]) -> str:
    """The lowest cdiVersion whose features ``spec`` uses, by CDI's rules
    (``MinimumRequiredVersion`` in specs-go/version.go)."""
    devices = _maps(spec.get("devices"))
    common = spec.get("containerEdits")
    edits = [e for e in [common, *(d.get("containerEdits") for d in devices)]
             if isinstance(e, dict)]
    if any(e.get("intelRdt") is not None or e.get("additionalGids") for e in edits):
        return "0.7.0"
    vendor, slash, cls = str(spec.get("kind", "")).partition("/")
    if (spec.get("annotations") or any(d.get("annotations") for d in devices)
            or (vendor and slash and "." in cls)):
        return "0.6.0"
    names = [str(d.get("name", "")) for d in devices]
    nodes = [n for e in edits for n in _maps(e.get("deviceNodes"))]
    if (any(n and not (n[0].isascii() and n[0].isalpha()) for n in names)
            or any(n.get("hostPath") for n in nodes)):
        return "0.5.0"
    if any(m.get("type") for e in edits for m in _maps(e.get("mounts"))):
        return "0.4.0"
    return VERSIONS[0]


def _node(node: Mapping[str, object]) -> dict[str, object]:
    out = {"path": node["path"], "type": "c", "major": node["major"], "minor": node["minor"],
           "permissions": "rw"}
    if "mode" in node:
        out["fileMode"] = node["mode"]
    return out


def _with_version(kind: str, devices: list[dict[str, object]],
                  common: dict[str, object]) -> dict[str, object]:
    spec: dict[str, object] = {"cdiVersion": "", "kind": kind, "devices": devices}
    if common:
        spec["containerEdits"] = common
    spec["cdiVersion"] = minimum_version(spec)
    return spec


def plan_spec(gpus: Sequence[Mapping[str, object]], control: Sequence[Mapping[str, object]],
              gid: int = 0, files: driver_files.Userspace | None = None) -> dict[str, object]:
    """The GPU spec; ``gpus`` as ``AssignedGpu.to_map`` gives them, ``control`` as device maps,
    ``files`` as ``driver_files.read_userspace`` found them (none: no mounts, no hooks)."""
    devices: list[dict[str, object]] = []
    every: list[dict[str, object]] = []
    for gpu in gpus:
        node = gpu["node"]
        assert isinstance(node, dict)
        edits = {"deviceNodes": [_node(node)]}
        devices.append({"name": str(gpu["index"]), "containerEdits": edits})
        if gpu.get("uuid"):
            devices.append({"name": str(gpu["uuid"]), "containerEdits": edits})
        every.append(_node(node))
    # MIG devices by "<gpu index>:<gi>": nvidia-ctk names them by NVML's MIG index and
    # adds their MIG UUIDs, both of which need NVML; a GPU instance made with
    # `nvidia-smi mig -cgi ... -C` has one compute instance, so a GI is the MIG device
    for gpu in gpus:
        node = gpu["node"]
        assert isinstance(node, dict)
        for instance in _maps(gpu.get("mig")):
            nodes = [_node(node), *(_node(n) for n in _maps(instance.get("nodes")))]
            devices.append({"name": f"{gpu['index']}:{instance['gi']}",
                            "containerEdits": {"deviceNodes": nodes}})
            every += [n for n in nodes if n not in every]
    devices.append({"name": "all", "containerEdits": {"deviceNodes": every}})
    common: dict[str, object] = {"env": ["NVIDIA_VISIBLE_DEVICES=void"],
                                 "deviceNodes": [_node(n) for n in control]}
    if gid:
        common["additionalGids"] = [gid]
    if files is not None:
        if mounts := driver_files.mounts(files):
            common["mounts"] = mounts
        if hooks := driver_files.hooks(files):
            common["hooks"] = hooks
    return _with_version(KIND, devices, common)


def plan_imex_spec(channels: Sequence[Mapping[str, object]], gid: int = 0) -> dict[str, object]:
    """The IMEX channel spec: one device per channel node, named by its number (minor)."""
    devices: list[dict[str, object]] = [
        {"name": str(c["minor"]), "containerEdits": {"deviceNodes": [_node(c)]}}
        for c in channels]
    return _with_version(IMEX_KIND, devices, {"additionalGids": [gid]} if gid else {})


def write_spec(path: str, spec: Mapping[str, object]) -> None:
    import json

    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        write_text(tmp, json.dumps(spec, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)  # a reader sees the old spec or the new one, never half
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _warn_about(boot: Boot, files: driver_files.Userspace) -> None:
    if not files.version:
        boot.kmsg.log(4, "cdi: no driver version in /proc/driver/nvidia/version: the spec "
                      "mounts no driver libraries or firmware")
    elif files.libraries and not files.hook:
        boot.kmsg.log(4, f"cdi: {driver_files.HOOK} is not in the image: the spec "
                      "has no hooks (containers get no soname links or ld cache entries "
                      "for the driver's libraries)")


def plan_specs(boot: Boot, libdir: str = driver_files.LIBDIR
               ) -> list[tuple[str, dict[str, object]]]:
    """(path under the root, spec) for the GPUs assigned now; OSError names a driver file
    that could not be read."""
    facts = boot.facts
    gpus = [g.to_map() for g in sorted(facts.gpus, key=lambda g: g.index)]
    nodes = facts.device_nodes
    cfg = boot.config()
    gid = cfg.int("device.gid")
    files = driver_files.read_userspace(boot.root, libdir, cfg.str("nvidia.bin"))
    _warn_about(boot, files)
    specs = [(SPEC_PATH, plan_spec(gpus, nodes.get("control", []), gid, files))]
    if nodes.get("imex"):
        specs.append((IMEX_SPEC_PATH, plan_imex_spec(nodes["imex"], gid)))
    return specs


def run_cdi(boot: Boot, libdir: str = driver_files.LIBDIR) -> None:
    """Write the specs of the GPUs the devices stage assigned (the caller runs this only
    when there are some: gpu mode)."""
    try:
        specs = plan_specs(boot, libdir)
    except OSError as exc:
        raise BootError(Stage.CDI, f"read {exc.filename}: {exc.strerror or exc}") from None
    for rel, spec in specs:
        path = boot.path(rel)
        try:
            write_spec(path, spec)
        except OSError as exc:
            raise BootError(Stage.CDI, f"write CDI spec {path}: {exc.strerror or exc}") from None
    facts = boot.facts
    facts.cdi = ["/" + rel for rel, _ in specs]
    boot.kmsg.log(6, f"cdi: {len(facts.gpus)} GPUs in /{SPEC_PATH} (cdiVersion "
                  f"{specs[0][1]['cdiVersion']})" + (f"; {len(facts.device_nodes['imex'])} "
                  f"IMEX channels in /{IMEX_SPEC_PATH}" if len(specs) > 1 else ""))


def update(boot: Boot, libdir: str = driver_files.LIBDIR) -> None:
    """After a hot-plug: the GPU spec again for the GPUs assigned now (written atomically,
    as at boot), or removed when none is left (a spec whose ``all`` has no node asks a
    runtime for nothing). OSError names the file."""
    path = boot.path(SPEC_PATH)
    if not boot.facts.gpus:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        boot.facts.cdi = [p for p in boot.facts.cdi if p != "/" + SPEC_PATH]
        return
    spec = dict(plan_specs(boot, libdir))[SPEC_PATH]
    write_spec(path, spec)
    if "/" + SPEC_PATH not in boot.facts.cdi:
        boot.facts.cdi.insert(0, "/" + SPEC_PATH)
