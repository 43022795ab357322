"""QEMU ``-M microvm`` command lines, and the choice between KVM and TCG.

Every socket is one the harness listens on *before* QEMU starts, and QEMU
connects as the client: the connection exists before the guest runs its first
instruction, so no early frame can be dropped and there is nothing to poll for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field

from rootfs import proc

QEMU = "qemu-system-x86_64"
REPORT_PORT = "guestinit.report"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "guestinit")
PROBE_SECONDS = 4.0
PROBE_VERSION = 2  # 2: the kernel must get to mounting its root, not only print its banner
DEFAULT_PHYS_BITS = 40  # QEMU's TCG default; KVM's host-phys-bits would follow the host
MAX_PHYS_BITS = 52  # x86-64's architectural limit
BAR_BDF = "0000:00:01.0"  # where the large-BAR stand-in sits (ivshmem-plain, BAR 2)
BAR_INDEX = 2


@dataclass(frozen=True)
class VmSpec:
    kernel: str
    initramfs: str | None  # None: no -initrd (the erofs boot mounts its root from disk)
    cmdline: str
    console_log: str
    report_socket: str
    qmp_socket: str
    accel: str = "tcg"
    memory_mib: int = 1024
    cpus: int = 1
    disks: list[str] = field(default_factory=list)  # read-only virtio-blk, in order
    qemu: str = QEMU
    entropy: str = "rdrand"  # one of ENTROPY: what seeds the guest's CRNG early
    console_socket: str | None = None  # serial console to a socket the harness reads
    bar: BarDevice | None = None  # a PCIe root complex, with a large-BAR device if sized
    machine: str = "microvm"  # or "kata": q35 + OVMF as Kata's runtime builds it
    firmware: str = ""  # kata: the OVMF image (-bios)
    root_ports: int = 0  # kata: pcie-root-ports; stand-in devices sit on the first ones
    extensions: tuple[tuple[str, str], ...] = ()  # kata: extension images (name, disk)
    # more virtio-serial ports (name, host socket QEMU listens on): a guest service's channel
    ports: tuple[tuple[str, str], ...] = ()


def port_argv(spec: VmSpec, bus: str = "") -> list[str]:
    """-chardev/-device pairs for ``spec.ports`` (QEMU listens; a host tool connects)."""
    out: list[str] = []
    for i, (name, path) in enumerate(spec.ports):
        out += ["-chardev", f"socket,id=port{i},path={path},server=on,wait=off",
                "-device", f"virtserialport,{bus}chardev=port{i},name={name}"]
    return out


@dataclass(frozen=True)
class BarDevice:
    """microvm's PCIe root complex (``pcie=on``) and, unless ``size`` is 0, an
    ``ivshmem-plain`` device at ``BAR_BDF`` whose BAR 2 (64-bit prefetchable) is ``size``
    bytes of a RAM backend with ``reserve=off``: host pages exist only where the guest
    touches, no file is written. microvm's 64-bit PCI window is the top quarter of the
    guest-physical space, so ``phys_bits`` (the CPU's address width) decides the largest
    BAR it can place: 40 bits (QEMU's TCG default) hold 256 GiB.
    """

    size: int
    phys_bits: int = DEFAULT_PHYS_BITS
    count: int = 1  # ivshmem-plain devices (the GPU stand-ins), at 01.0, 02.0, ...
    edu: int = 0  # QEMU "edu" devices after them (the NVSwitch stand-ins)
    # empty pcie-root-ports hp0, hp1, ... after them, for QMP device_add (hot-plug); the
    # guest needs pcie_ports=native: microvm's ACPI _OSC grants no native hot-plug
    hotplug_ports: int = 0

    def bdfs(self) -> list[str]:
        """The addresses of the ivshmem devices, then of the edu devices."""
        n = (self.count if self.size else 0) + self.edu
        return [f"0000:00:{slot:02x}.0" for slot in range(1, n + 1)]


def phys_bits_for(size: int) -> int:
    """The smallest address width whose 64-bit window (a quarter of it) holds ``size``."""
    bits = DEFAULT_PHYS_BITS
    while (1 << bits) // 4 < size:
        bits += 1
    return bits


def host_tsc_khz(cpuinfo: str = "/proc/cpuinfo", sysfs: str = "/sys") -> int | None:
    """The host TSC rate in kHz, when the host knows it for sure; else None.

    Under TCG the guest's TSC is the host's, so this is the guest's TSC rate too.
    """
    try:
        with open(os.path.join(sysfs, "devices/system/cpu/cpu0/tsc_freq_khz")) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        pass
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            first_cpu = fh.read().split("\n\n", 1)[0]
    except OSError:
        return None
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in
        (line.partition(":") for line in first_cpu.splitlines()) if k.strip()
    )
    flags = set(fields.get("flags", "").split())
    if not {"constant_tsc", "nonstop_tsc"} <= flags:
        return None
    ghz = re.search(r"@\s*([0-9.]+)\s*GHz", fields.get("model name", ""))
    if ghz:  # Intel names carry the nominal rate, which is the TSC rate
        return round(float(ghz.group(1)) * 1e6)
    if "tsc_known_freq" in flags and "cpu MHz" in fields:
        # A guest told its TSC rate by its hypervisor reports it as ``cpu MHz``.
        return round(float(fields["cpu MHz"]) * 1000)
    return None


def kernel_cmdline(
    base: str, extra: str = "", port: str = REPORT_PORT, tsc_khz: int | None = None
) -> str:
    """The image's cmdline + the report channel + ``extra`` (later words win in guestinit).

    Adds ``console=ttyS0`` (the harness captures ttyS0) and ``panic=-1`` (a dead
    PID 1 reboots, which ``-no-reboot`` turns into a QEMU exit instead of a hang)
    when the image does not set them. With ``tsc_khz`` (TCG boots) it adds
    ``tsc_early_khz=``: microvm has no HPET or ACPI PM timer, so when a loaded host
    makes the PIT calibration fail the kernel marks the TSC unstable and hangs at
    boot with nothing on the console; a given rate skips that calibration.
    """
    words = base.split()
    if not any(w.startswith("console=") for w in words):
        words.append("console=ttyS0")
    if not any(w.startswith("panic=") for w in words):
        words.append("panic=-1")
    if tsc_khz and not any(w.startswith("tsc_early_khz=") for w in words):
        words.append(f"tsc_early_khz={tsc_khz}")
    words.append(f"guestinit.report=virtio-port:{port}")
    words.extend(extra.split())  # kernel syntax, quotes kept: a="b c" stays one parameter
    return " ".join(words)


# Entropy sources a real microVM has, by name. KVM guests get the host CPU, RDRAND
# included; under TCG only ``-cpu max`` has RDRAND (QEMU's default qemu64 has none, and
# then the guest CRNG is ready only seconds into the boot). virtio-rng is a device; on
# Debian's kernel its driver is a module, so it helps only once the modules are loaded.
ENTROPY = ("rdrand", "virtio-rng", "rdrand+virtio-rng", "none")


def cpu_model(accel: str, entropy: str) -> str:
    """The ``-cpu`` model a boot uses: host under KVM, max (RDRAND) or qemu64 under TCG."""
    if entropy not in ENTROPY:
        raise ValueError(f"entropy {entropy!r}: use one of {', '.join(ENTROPY)}")
    if accel == "kvm":
        return "host"
    return "qemu64,+rdrand" if "rdrand" in entropy else "qemu64"


def standin_devices(bar: BarDevice | None) -> list[tuple[list[str], str]]:
    """The stand-in devices in slot order: (-object args, -device spec without a bus or
    address) each; microvm puts them at ``bar.bdfs()``, Kata's machine on root ports."""
    if bar is None:
        return []
    out: list[tuple[list[str], str]] = []
    for i in range(len(bar.bdfs())):
        if i >= bar.count or not bar.size:
            out.append(([], "edu"))
            continue
        out.append((["-object", f"memory-backend-ram,id=bar{i},size={bar.size},share=on,"
                     "reserve=off"], f"ivshmem-plain,memdev=bar{i}"))
    return out


def kata_argv(spec: VmSpec) -> list[str]:
    """Kata's q35 + OVMF machine (bench.kata): console on hvc0, one image disk, root ports
    with the stand-in devices cold-plugged; plus the harness's report port and QMP."""
    from bench import kata

    cpu = cpu_model(spec.accel, spec.entropy)
    console = (f"socket,path={spec.console_socket}" if spec.console_socket
               else f"file,path={spec.console_log}")
    standins = standin_devices(spec.bar)
    objects = [arg for obj, _dev in standins for arg in obj]
    devices = [dev for _obj, dev in standins]
    disk = spec.disks[0] if spec.disks else None
    return [
        spec.qemu, *kata.machine_argv(spec.firmware, disk, spec.root_ports, console, devices,
                                      spec.extensions),
        "-accel", spec.accel, "-cpu", cpu, "-m", str(spec.memory_mib), "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", spec.kernel, "-append", spec.cmdline,
        *(["-initrd", spec.initramfs] if spec.initramfs else []), *objects,
        "-chardev", f"socket,id=report,path={spec.report_socket}",
        "-device", f"virtserialport,bus=serial0.0,chardev=report,name={REPORT_PORT}",
        *port_argv(spec, "bus=serial0.0,"),
        "-chardev", f"socket,id=qmp,path={spec.qmp_socket}",
        "-mon", "chardev=qmp,mode=control",
        # Kata always gives the guest an entropy device (entropy_source, /dev/urandom)
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
    ]


def qemu_argv(spec: VmSpec) -> list[str]:
    if spec.machine == "kata":
        return kata_argv(spec)
    cpu = cpu_model(spec.accel, spec.entropy)
    if spec.bar is not None and spec.accel != "kvm":
        cpu += f",phys-bits={spec.bar.phys_bits}"
    accel = ["-accel", spec.accel, "-cpu", cpu]
    machine = "microvm,x-option-roms=off" + (",pcie=on" if spec.bar is not None else "")
    serial = (f"socket,id=console,path={spec.console_socket}" if spec.console_socket
              else f"file,id=console,path={spec.console_log}")
    argv = [
        spec.qemu, "-M", machine, *accel,
        "-m", str(spec.memory_mib), "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", spec.kernel, "-append", spec.cmdline,
        *(["-initrd", spec.initramfs] if spec.initramfs else []),
        "-chardev", serial,
        "-serial", "chardev:console",
        "-chardev", f"socket,id=report,path={spec.report_socket}",
        "-device", "virtio-serial-device",
        "-device", f"virtserialport,chardev=report,name={REPORT_PORT}",
        *port_argv(spec),
        "-chardev", f"socket,id=qmp,path={spec.qmp_socket}",
        "-mon", "chardev=qmp,mode=control",
    ]
    if "virtio-rng" in spec.entropy:
        argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom",
                 "-device", "virtio-rng-device,rng=rng0"]
    if spec.bar is not None:
        for (obj, dev), bdf in zip(standin_devices(spec.bar), spec.bar.bdfs(), strict=True):
            argv += [*obj, "-device", f"{dev},addr={bdf.split(':', 2)[2]}"]
        first = len(spec.bar.bdfs()) + 1
        for i in range(spec.bar.hotplug_ports):
            argv += ["-device", f"pcie-root-port,id=hp{i},bus=pcie.0,chassis={i + 1},"
                     f"slot={i + 1},addr={first + i:02x}.0"]
    for i, disk in enumerate(spec.disks):
        argv += [
            "-drive", f"id=disk{i},file={disk},format=raw,if=none,readonly=on",
            "-device", f"virtio-blk-device,drive=disk{i}",
        ]
    return argv


def _probe_key(kernel: str, qemu: str) -> str:
    digest = hashlib.sha256()
    with open(kernel, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    version = proc.run([qemu, "--version"], timeout=30).stdout.splitlines()[0]
    # PROBE_VERSION: a cached verdict of an older, weaker probe is not reused
    return f"{PROBE_VERSION}|{os.uname().release}|{version}|{digest.hexdigest()[:16]}"


# A kernel booted with no root gets this far only if the CPU really runs it; a console
# with the banner alone is no proof (below).
KVM_PROBE_LATE = (b"Unable to mount root", b"Cannot open root device", b"Freeing unused kernel",
                  b"Run /")


def probe_kvm(kernel: str, qemu: str = QEMU, seconds: float = PROBE_SECONDS) -> bool:
    """Boot ``kernel`` under KVM with no initramfs: works iff it gets to mounting its root
    (``KVM_PROBE_LATE``) in time.

    On nested microVMs /dev/kvm opens but a stock kernel hangs at decompression, so
    opening /dev/kvm proves nothing; only a boot does. The banner is not enough either:
    on such a host a kernel entered at its PVH note printed it, then QEMU stopped with
    "KVM internal error ... emulation failure" a few lines later.
    """
    with tempfile.TemporaryDirectory(prefix="guestinit-kvm-probe-") as tmp:
        log = os.path.join(tmp, "console.log")
        child = proc.spawn([
            qemu, "-M", "microvm,x-option-roms=off", "-accel", "kvm", "-cpu", "host",
            "-m", "256", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", kernel, "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1",
            "-chardev", f"file,id=console,path={log}", "-serial", "chardev:console",
        ])
        try:
            def got_far() -> bool:
                if not os.path.exists(log):
                    return False
                with open(log, "rb") as fh:
                    text = fh.read()
                return b"Linux version" in text and any(m in text for m in KVM_PROBE_LATE)

            return proc.wait_until(got_far, seconds, step=0.1)
        finally:
            proc.stop(child, grace=0.5)


def choose_accel(
    requested: str, kernel: str, qemu: str = QEMU, cache_dir: str = CACHE_DIR,
    kvm_device: str = "/dev/kvm",
) -> tuple[str, str]:
    """Return (accel, why). ``requested`` is auto, kvm or tcg; auto probes once and caches."""
    if requested in ("kvm", "tcg"):
        return requested, "requested"
    if requested != "auto":
        raise ValueError(f"accelerator {requested!r}: use auto, kvm or tcg")
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return "tcg", f"no usable {kvm_device}"
    key = _probe_key(kernel, qemu)
    cache = os.path.join(cache_dir, "kvm-probe.json")
    try:
        with open(cache, encoding="utf-8") as fh:
            known = json.load(fh)
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key in known and isinstance(known[key], bool):
        ok = known[key]
        return ("kvm", "KVM probe passed (cached)") if ok else (
            "tcg", f"KVM probe failed earlier (cached in {cache})")
    started = time.monotonic()
    ok = probe_kvm(kernel, qemu)
    known[key] = ok
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(known, fh, indent=1, sort_keys=True)
    os.replace(tmp, cache)
    took = time.monotonic() - started
    if ok:
        return "kvm", f"KVM probe boot passed in {took:.1f}s"
    return "tcg", f"KVM probe boot printed no kernel banner in {took:.1f}s"
