"""Tree parts that depend on the profile: init variants, busybox, ld.so.cache, driver bundle."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from guestinit import modinfo, wire
from rootfs import profile
from rootfs.closure import Origin, Pool, Tree
from rootfs.steps import BuildError, run

GENERATED = Origin("guestinit-build", "0.1.0")
BUSYBOX_APPLETS = ("sh", "ls", "cat", "mount", "umount", "insmod", "lsmod", "dmesg", "ps",
                   "echo", "printf", "sleep", "poweroff", "reboot", "mkdir", "ln", "vi", "grep",
                   "dd", "sync", "kill")
# Started alone with systemd.unit= on the cmdline (profile baseline-systemd): no targets,
# no generators' output needed, so systemd does only its own PID-1 set-up plus this.
# Type=exec: the script stays up after ready to wait for the power button.
SYSTEMD_UNIT = """[Unit]
Description=baseline boot work: load the modules, send the ready frame, wait for powerdown
DefaultDependencies=no

[Service]
Type=exec
ExecStart=/bin/sh /usr/lib/baseline/ready.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
"""
# A t no real boot reaches: msgpack packs it as 0xcf + 8 bytes, a slot of fixed width
# that the shell fills with the real time.
T_SLOT = 2**64 - 1
# The mounts of guestinit's early stage (guestinit/mounts.py) that the boot path needs;
# systemd as PID 1 mounts all but /tmp itself.
BUSYBOX_MOUNTS = (
    "mount -t proc -o nosuid,nodev,noexec proc /proc",
    "mount -t sysfs -o nosuid,nodev,noexec sysfs /sys",
    "mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev",
    "mount -t tmpfs -o nosuid,nodev,mode=0755,size=64m run /run",
    "mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp",
)
SYSTEMD_MOUNTS = ("mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp",)
# systemd(1): SIGRTMIN+14 powers off at once (no unit stop jobs; systemd-shutdown still
# kills, unmounts and syncs); glibc's SIGRTMIN is 34.
SYSTEMD_POWEROFF_SIGNAL = 34 + 14


def wheel_roots(whl: Path) -> list[str]:
    """Top-level importable names a wheel provides (cffi: only ``_cffi_backend``)."""
    names: set[str] = set()
    with zipfile.ZipFile(whl) as zf:
        for name in zf.namelist():
            top = name.split("/")[0]
            if top.endswith((".dist-info", ".data", ".libs")) or top == "cffi":
                continue
            stem = top.split(".")[0]
            if top.endswith((".py", ".so")) or "/" in name:
                names.add(stem)
    return sorted(names)


# shared libraries a wheel loads with dlopen (ctypes), which the ELF closure cannot see:
# pyudev opens libudev by its soname (guestinit.uevents.LIBUDEV)
DLOPENED = {"pyudev": ("usr/lib/x86_64-linux-gnu/libudev.so.1",)}


def take_dlopened(tree: Tree, pool: Pool, wheel: str) -> None:
    """The libraries ``wheel`` dlopens, from the profile's packages (then the ELF closure
    adds what they need); a missing one is a BuildError naming the package to add."""
    for lib in DLOPENED.get(wheel, ()):
        tree.take(pool, lib, f"the {wheel} wheel, which loads it at run time")


def install_busybox(tree: Tree, pool: Pool) -> None:
    tree.take(pool, "/bin/busybox", "shell = true")
    for applet in BUSYBOX_APPLETS:
        tree.add_symlink(f"usr/bin/{applet}", "busybox")


def frame_around_t(ftype: wire.FrameType, init: str,
                   fields: dict[str, object]) -> tuple[bytes, bytes]:
    """A baseline frame encoded with guestinit.wire, split around the 8 bytes of ``t``."""
    frame = wire.Frame(ftype, f"baseline-{init}", T_SLOT, {**fields, "init": init})
    data = wire.encode(frame)
    slot = b"\xcf" + T_SLOT.to_bytes(8, "big")
    if data.count(slot) != 1:
        raise BuildError(f"baseline {ftype.value} frame: no single t slot in {data!r}")
    head, tail = data.split(slot)
    return head + b"\xcf", tail


def _octal(data: bytes) -> str:
    return "".join(f"\\{b:03o}" for b in data)


def frame_functions(init: str, uptime: str = "/proc/uptime") -> str:
    """Shell functions ``send_ready`` and ``send_shutdown``: write a frame to fd 4.

    ``t`` must be CLOCK_BOOTTIME; busybox sh has no clock_gettime, and /proc/uptime is
    that clock in 10 ms steps (the kernel prints it as %lu.%02lu). ash's $(( )) is
    64-bit and forks nothing, so the 8 bytes of t are made as octal escapes there.
    """
    ready = frame_around_t(wire.FrameType.READY, init, {"mode": "cpu", "timeline": []})
    down = frame_around_t(wire.FrameType.SHUTDOWN, init,
                          {"reason": "power button (ACPI powerdown request)", "audit": []})
    return f"""boottime_octal() {{
  read -r up _ < "{uptime}"
  # 1$frac - 100: the two fraction digits without a leading 0 that $(( )) reads as octal
  ns=$(( ${{up%.*}} * 1000000000 + (1${{up#*.}} - 100) * 10000000 ))
  T=
  for shift in 56 48 40 32 24 16 8 0; do
    b=$(( ns >> shift & 255 ))
    T="$T\\\\$(( b >> 6 ))$(( b >> 3 & 7 ))$(( b & 7 ))"
  done
}}
send_ready() {{ boottime_octal; printf '{_octal(ready[0])}'"$T"'{_octal(ready[1])}' >&4; }}
send_shutdown() {{ boottime_octal; printf '{_octal(down[0])}'"$T"'{_octal(down[1])}' >&4; }}
"""


def baseline_script(init: str, release: str, module_paths: list[str]) -> str:
    """Shell doing the boot work guestinit does before ready, then waiting for powerdown."""
    mounts = BUSYBOX_MOUNTS if init == profile.Init.BUSYBOX.value else SYSTEMD_MOUNTS
    loads = "".join(f"insmod /lib/modules/{release}/{p}\n" for p in module_paths)
    poweroff = ("poweroff -f" if init == profile.Init.BUSYBOX.value
                else f"kill -{SYSTEMD_POWEROFF_SIGNAL} 1")
    mount_lines = "".join(f"{m}\n" for m in mounts)
    return f"""#!/bin/sh
# baseline {init}: mount, load the early modules, open the report port and the power
# button, send ready; on a button press send shutdown and power off (generated by
# guestinit-build). Only regular builtins may fail here: a failed redirection on exec
# ends the shell, and a dead PID 1 panics the kernel.
{mount_lines}{loads}{frame_functions(init)}for port in /sys/class/virtio-ports/*; do
  name=
  read -r name 2>/dev/null < "$port/name"
  [ "$name" = guestinit.report ] && [ -c "/dev/${{port##*/}}" ] && exec 4> "/dev/${{port##*/}}"
done
button=
for ev in /sys/class/input/event*; do
  name=
  read -r name 2>/dev/null < "$ev/device/name"
  [ "$name" = "Power Button" ] && [ -c "/dev/input/${{ev##*/}}" ] && button=/dev/input/${{ev##*/}}
done
# evdev drops events no one reads: the node is open before ready goes out
[ -n "$button" ] && exec 3< "$button"
send_ready
if [ -n "$button" ]; then
  # one struct input_event (24 bytes): the Power Button device sends only its key
  dd bs=24 count=1 <&3 >/dev/null 2>&1
  send_shutdown
  # the kernel's own marks for the bench (quiet keeps them off the console at boot)
  # /init from an initramfs, /sbin/init from a disk root (Kata's image)
  dmesg 2>/dev/null | grep -e 'init as init process' -e 'crng init done' > /dev/console 2>&1
  sync
  {poweroff}
else
  echo "baseline {init}: no Power Button input device: powerdown requests go unseen" \
    > /dev/console
fi
"""


def install_init(tree: Tree, prof: profile.Profile, pool: Pool, release: str,
                 module_paths: list[str]) -> list[str]:
    """Init-specific files; returns extra Python roots (none for the baselines)."""
    if prof.init is profile.Init.GUESTINIT:
        return []
    install_busybox(tree, pool)
    script = baseline_script(prof.init.value, release, module_paths)
    if prof.init is profile.Init.BUSYBOX:
        # PID 1 must not exit, also when poweroff -f returns
        tree.add_bytes("init", (script + "exec sleep 2147483647\n").encode(), GENERATED, 0o755)
        tree.add_symlink("usr/sbin/init", "/init")
        return []
    tree.add_bytes("usr/lib/baseline/ready.sh", script.encode(), GENERATED, 0o755)
    tree.take(pool, "/lib/systemd/systemd", "init = systemd")
    # what PID 1 execs to power off (SIGRTMIN+14); without it systemd freezes instead
    tree.take(pool, "/lib/systemd/systemd-shutdown", "init = systemd")
    tree.add_symlink("init", "/usr/lib/systemd/systemd")
    tree.add_symlink("usr/sbin/init", "/usr/lib/systemd/systemd")
    tree.add_bytes("usr/lib/systemd/system/baseline-ready.service", SYSTEMD_UNIT.encode(),
                   GENERATED)
    tree.add_bytes("etc/machine-id", b"", GENERATED, 0o444)
    tree.add_bytes("etc/os-release", b"ID=debian\nNAME=guestinit-baseline\n", GENERATED)
    return []


def write_ld_cache(tree: Tree) -> None:
    """/etc/ld.so.cache: the dynamic loader finds every library without probing paths."""
    tree.add_bytes("etc/ld.so.conf", b"/usr/lib/x86_64-linux-gnu\n/usr/lib\n", GENERATED)
    # ldconfig -r chroots: as a normal user, do it in a user namespace
    prefix = [] if os.geteuid() == 0 else ["unshare", "-r"]
    run([*prefix, "ldconfig", "-X", "-r", tree.root], what="ldconfig -r (ld.so.cache)")
    if tree.has("etc/ld.so.cache"):
        tree.origins["etc/ld.so.cache"] = GENERATED


@dataclass(frozen=True)
class DriverBundle:
    """An NVIDIA driver bundle directory: a root overlay (layout in docs/image.md).

    ``VERSION`` (optional) names the driver version; ``lib/modules/<release>/`` holds
    the kernel modules, which go in with the kernel's; everything else is copied
    as is (``usr/bin``, ``usr/lib/x86_64-linux-gnu``, ``lib/firmware/nvidia``...).
    """

    root: Path
    version: str
    release: str

    @property
    def origin(self) -> Origin:
        return Origin("nvidia-driver", self.version)

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @classmethod
    def open(cls, root: Path, release: str, required: tuple[str, ...] = ()) -> DriverBundle:
        if not root.is_dir():
            raise BuildError(f"driver bundle {root}: not a directory (--driver DIR)")
        version_file = root / "VERSION"
        version = version_file.read_text().strip() if version_file.is_file() else "unversioned"
        mods = root / "lib" / "modules"
        built = sorted(p.name for p in mods.iterdir()) if mods.is_dir() else []
        if built and release not in built:
            raise BuildError(f"driver bundle {root}: no lib/modules/{release}/ (modules are "
                             f"built for {', '.join(built)}); build the driver's kernel "
                             f"modules against the image kernel {release}")
        for rel in required:
            if not (root / rel.lstrip("/")).exists():
                raise BuildError(f"driver bundle {root}: {rel.lstrip('/')} is missing (the "
                                 "profile's driver_files need it)")
        return cls(root, version, release)

    def module_names(self) -> list[str]:
        if not self.modules_dir.is_dir():
            return []
        return sorted(modinfo.find_modules(str(self.modules_dir)))

    def install(self, tree: Tree) -> int:
        """Everything but VERSION and the modules; returns the number of files."""
        count = 0
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if str(rel) == "VERSION" or rel.parts[:2] == ("lib", "modules"):
                continue
            if path.is_symlink():
                tree.add_symlink(str(rel), str(path.readlink()))
            elif path.is_file():
                tree.add_file(str(rel), path, self.origin)
                count += 1
        return count


# -- what kata-agent expects of the image (docs/kata.md) ------------------------------------

AGENT_PATH = "usr/bin/kata-agent"  # where Kata's images carry it and guestinit.agent points
PAUSE_BUNDLE = "pause_bundle"  # kata-agent's built-in sandbox (pause) bundle


def install_agent(tree: Tree, agent: Path) -> Origin:
    """``agent`` at /usr/bin/kata-agent (its libraries come with the ELF closure; a static
    one needs none). BuildError for a missing, non-executable or non-ELF file."""
    import hashlib

    from rootfs.closure import is_elf

    if not agent.is_file():
        raise BuildError(f"--agent {agent}: no such file")
    if not os.access(agent, os.X_OK):
        raise BuildError(f"--agent {agent}: not executable (chmod +x it)")
    if not is_elf(agent):
        raise BuildError(f"--agent {agent}: not an ELF executable (kata-agent is one)")
    digest = hashlib.sha256(agent.read_bytes()).hexdigest()[:12]
    origin = Origin("kata-agent", f"sha256-{digest}")
    tree.add_file(AGENT_PATH, agent, origin, 0o755)
    return origin


def install_pause_bundle(tree: Tree, bundle: Path) -> int:
    """The OCI bundle directory ``bundle`` (config.json, rootfs/) at /pause_bundle."""
    if not (bundle / "config.json").is_file():
        raise BuildError(f"--pause-bundle {bundle}: no config.json: not an OCI bundle "
                         "directory (config.json + rootfs/)")
    origin = Origin("pause-bundle", "user-supplied")
    count = 0
    for src in sorted(bundle.rglob("*")):
        rel = src.relative_to(bundle)
        if src.is_symlink():
            tree.add_symlink(f"{PAUSE_BUNDLE}/{rel}", os.readlink(src))
        elif src.is_file():
            tree.add_file(f"{PAUSE_BUNDLE}/{rel}", src, origin)
        else:
            continue
        count += 1
    return count


def write_agent_files(tree: Tree, hostname: str) -> None:
    """/etc/resolv.conf (empty: kata-agent bind-mounts the sandbox's DNS over it and skips
    DNS when it is absent, src/agent/src/network.rs) and /etc/hostname (init mode reads
    it, main.rs init_agent_as_init)."""
    tree.add_bytes("etc/resolv.conf", b"", GENERATED, 0o644)
    tree.add_bytes("etc/hostname", f"{hostname}\n".encode(), GENERATED, 0o644)


NVFM_LIB = "usr/lib/x86_64-linux-gnu/libnvfm.so.1"


def install_nvfm_binding(tree: Tree, origin: Origin) -> str | None:
    """The partition service's binding (guestinit.nvidia.fabric, cffi's API mode) compiled
    against the driver bundle's libnvfm.so.1 when the tree has it; its image path, or None
    (a bundle without the Fabric Manager SDK: the service then stays off)."""
    import subprocess
    import tempfile

    from guestinit.nvidia import daemons, fabric

    if not tree.has(NVFM_LIB):
        return None
    libdir = tree.host(NVFM_LIB).parent
    with tempfile.TemporaryDirectory(prefix="guestinit-nvfm-") as tmp:
        try:
            built = fabric.build(Path(tmp), libdir, rpath=False)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            raise BuildError(f"compile the partition service's libnvfm binding against "
                             f"/{NVFM_LIB}: {detail} (needs gcc and python3-dev)") from None
        tree.add_file(daemons.NVFM_BINDING, built, origin, 0o644)
    return daemons.NVFM_BINDING
