"""Kata's QEMU machine for the harness: the cmdline Kata's runtime writes, and its devices.

The cmdline is a port of kata-containers @7c6ba40c54 ``src/runtime``: ``pkg/katautils``
``SetKernelParams`` (what precedes the configuration's ``kernel_params``) and
``virtcontainers``:
``qemu.go`` ``kernelParameters`` (arch params, ``panic=1``, ``nr_cpus``, ``selinux``, the
configuration's ``kernel_params``, one ``kata.extension.<name>.verity_params`` per
extension), ``qemu_amd64.go`` ``kernelParams`` (the fixed x86 words),
``qemu_arch_base.go`` (``handleImagePath`` appends the root parameters when the
architecture is set up, ``appendConsole`` the console words when the devices are built,
``kernelParameters`` then ``quiet`` or ``debug`` and the systemd words an image adds),
``hypervisor.go`` ``GetKernelRootParams`` and ``SerializeParams``. The tests hold this
port against the cases of Kata's ``hypervisor_test.go``.

The machine follows ``qemu_arch_base.go``/``govmm``: q35, OVMF via ``-bios``
(``FIRMWAREPATH_NV``), virtio-serial-pci with a virtconsole (hvc0), the image as one
read-only virtio-blk-pci disk (``disable_image_nvdimm = true``), ``pcie-root-port``s for
cold-plugged devices (``cold_plug_vfio = "root-port"``, ``pcie_root_port = 8`` in
``src/runtime/Makefile`` ``DEFAULTPCIEROOTPORT_NV``). Not here: vhost-vsock-pci (this
host has no ``/dev/vhost-vsock``), virtio-fs and the network; the harness adds its own
virtio-serial port for ``guestinit.report=virtio-port:`` when a boot asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rootfs.kata import VerityParamsError, parse_verity_params

OVMF = "/usr/share/ovmf/OVMF.fd"  # Debian's ovmf package; Kata ships its own build
ROOT_PORTS = 8  # DEFAULTPCIEROOTPORT_NV

Param = tuple[str, str]

# qemu_amd64.go kernelParams
AMD64_PARAMS: tuple[Param, ...] = (
    ("tsc", "reliable"), ("no_timer_check", ""), ("rcupdate.rcu_expedited", "1"),
    ("i8042.direct", "1"), ("i8042.dumbkbd", "1"), ("i8042.nopnp", "1"),
    ("i8042.noaux", "1"), ("noreplace-smp", ""), ("reboot", "k"),
    ("cryptomgr.notests", ""), ("net.ifnames", "0"), ("pci", "lastbus=0"),
)
NVDIMM_ROOT, VIRTIO_BLK_ROOT = "/dev/pmem0p1", "/dev/vda1"


class KataConfigError(ValueError):
    pass


def root_params(rootfstype: str, disable_nvdimm: bool, dax: bool,
                verity_params: str) -> list[Param]:
    """``GetKernelRootParams``: the words that mount the image as the root."""
    try:
        cfg = parse_verity_params(verity_params)
    except VerityParamsError as exc:
        raise KataConfigError(str(exc)) from None
    rootfstype = rootfstype or "ext4"
    flags = {"erofs": ("ro", "dax ro"), "xfs": ("ro", "dax ro"),
             "ext4": ("data=ordered,errors=remount-ro ro",
                      "dax,data=ordered,errors=remount-ro ro")}
    if cfg is not None:
        root, hashes = ("/dev/vda1", "/dev/vda2") if disable_nvdimm else (
            "/dev/pmem0p1", "/dev/pmem0p2")
        sectors = cfg.data_block_size // 512 * cfg.data_blocks
        table = (f"dm-verity,,,ro,0 {sectors} verity 1 {root} {hashes} {cfg.data_block_size} "
                 f"{cfg.hash_block_size} {cfg.data_blocks} 0 sha256 {cfg.root_hash} {cfg.salt}")
        if rootfstype not in flags:
            raise KataConfigError("unsupported rootfs type")
        return [("dm-mod.create", f'"{table}"'), ("root", "/dev/dm-0"),
                ("rootflags", flags[rootfstype][0]), ("rootfstype", rootfstype)]
    if disable_nvdimm and dax:
        raise KataConfigError("Virtio-Blk does not support DAX")
    if rootfstype not in flags:
        raise KataConfigError("unsupported rootfs type")
    return [("root", VIRTIO_BLK_ROOT if disable_nvdimm else NVDIMM_ROOT),
            ("rootflags", flags[rootfstype][1 if dax else 0]), ("rootfstype", rootfstype)]


def serialize(params: Sequence[Param], delim: str = "=") -> list[str]:
    """``SerializeParams``."""
    words: list[str] = []
    for key, value in params:
        if not key and not value:
            continue
        if not key:
            words.append(value)
        elif not value:
            words.append(key)
        elif not delim:
            words += [key, value]
        else:
            words.append(f"{key}{delim}{value}")
    return words


@dataclass(frozen=True)
class Runtime:
    """What of Kata's hypervisor configuration decides the cmdline."""

    image: bool  # image = (else initrd =)
    rootfs_type: str = "erofs"
    disable_image_nvdimm: bool = True
    kernel_verity_params: str = ""
    kernel_params: tuple[str, ...] = ()
    max_vcpus: int = 1  # default_maxvcpus (0 there means the host's CPU count)
    debug: bool = False  # enable_debug in [hypervisor.qemu]
    disable_guest_selinux: bool = True
    confidential: bool = False
    extensions: tuple[tuple[str, str], ...] = ()  # (name, verity params)
    block_device_driver: str = "virtio-scsi"  # DEFBLOCKSTORAGEDRIVER_QEMU
    agent_debug: bool = False  # [agent.kata] enable_debug
    launch_process_timeout: int = 15  # [agent.kata], DEFAULTLAUNCHPROCESSTIMEOUT_NV


def deserialize(words: Sequence[str]) -> list[Param]:
    """``DeserializeParams``: each word split at its first ``=``."""
    out: list[Param] = []
    for word in words:
        if word:
            key, _, value = word.partition("=")
            out.append((key, value))
    return out


def config_params(rt: Runtime) -> list[Param]:
    """The hypervisor's KernelParams after ``katautils.SetKernelParams``: systemd's words
    when an image boots (``create.go`` ``getKernelParams``), ``scsi_mod.scan=none`` for
    virtio-scsi, the agent's words (``kata_agent.go`` ``KataAgentKernelParams``), then the
    configuration's ``kernel_params`` so that they win."""
    params: list[Param] = []
    if rt.image:
        params += [("systemd.unit", "kata-containers.target"),
                   ("systemd.mask", "systemd-networkd.service"),
                   ("systemd.mask", "systemd-networkd.socket")]
    if rt.block_device_driver == "virtio-scsi":
        params.append(("scsi_mod.scan", "none"))
    if rt.agent_debug:
        params.append(("agent.log", "debug"))
    if rt.launch_process_timeout > 0:
        params.append(("agent.launch_process_timeout", str(rt.launch_process_timeout)))
    return params + deserialize(rt.kernel_params)


def kernel_parameters(rt: Runtime) -> str:
    """The cmdline Kata's Go runtime passes to QEMU for ``rt`` (``qemu.kernelParameters``)."""
    arch = list(AMD64_PARAMS)
    non_debug: list[Param] = [("quiet", "")]
    debug: list[Param] = [("debug", "")]
    if rt.image:  # handleImagePath, at newQemuArch: before the console words
        # a confidential guest has no NVDIMM on amd64 (newQemuArch); on NVDIMM the runtime
        # asks again with dax (amd64's qemuArchBase.dax is true)
        nvdimm = not (rt.disable_image_nvdimm or rt.confidential)
        arch += root_params(rt.rootfs_type, not nvdimm, nvdimm, rt.kernel_verity_params)
        non_debug.append(("systemd.show_status", "false"))
        debug += [("systemd.show_status", "true"), ("systemd.log_level", "debug")]
    arch += [("console", "hvc0"), ("console", "hvc1")]  # appendConsole (virtio-serial)
    params = [*arch, *(debug if rt.debug else non_debug), ("panic", "1")]
    if not rt.confidential:
        params.append(("nr_cpus", str(rt.max_vcpus)))
    params.append(("selinux", "0" if rt.disable_guest_selinux else "1"))
    params += config_params(rt)
    params += [(f"kata.extension.{name}.verity_params", value) for name, value in rt.extensions]
    return " ".join(serialize(params))


def machine_argv(firmware: str, disk: str | None, root_ports: int, console: str,
                 devices: Sequence[str] = (),
                 extensions: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The q35 devices of a Kata sandbox: firmware, console, the image disk, its extension
    disks, root ports. ``console`` is a chardev spec for the virtconsole; ``devices`` are
    -device specs plugged into the root ports in order (cold-plugged stand-in GPUs);
    ``extensions`` are (name, disk): read-only, serial ``extension-<name>`` (qemu.go)."""
    argv = ["-M", "q35", "-bios", firmware,
            "-device", "virtio-serial-pci,id=serial0,max_ports=3",
            "-chardev", f"{console},id=charconsole0",
            "-device", "virtconsole,chardev=charconsole0,id=console0"]
    if disk is not None:
        argv += ["-drive", f"id=image,file={disk},aio=threads,format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-pci,drive=image,config-wce=off,share-rw=on,"
                 "serial=image"]
    for name, path in extensions:
        argv += ["-drive", f"id=extension-{name},file={path},aio=threads,format=raw,if=none,"
                 "readonly=on",
                 "-device", f"virtio-blk-pci,drive=extension-{name},serial=extension-{name},"
                 "config-wce=off,share-rw=on"]
    if len(devices) > root_ports:
        raise KataConfigError(f"{len(devices)} cold-plugged devices but {root_ports} root "
                              "ports")
    for i in range(root_ports):
        # qemu.go genericAppendPCIeRootPort: chassis 0, slot i, no address
        argv += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis=0,slot={i},"
                 "multifunction=off"]
    for i, dev in enumerate(devices):
        argv += ["-device", f"{dev},bus=rp{i}"]
    return argv
