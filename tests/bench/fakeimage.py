"""A tiny stand-in guest image for testing the harness: Debian's kernel + busybox.

Laid out like ``guestinit-build`` output (vmlinuz, initramfs.img, cmdline.txt).
Its /init loads the virtio + power-button modules with busybox ``insmod``, writes
frames that were encoded on the host with ``guestinit.wire.encode`` to the
``guestinit.report`` virtio port, and behaves per ``fake.mode=`` on the cmdline:

- ``ok``: ready, then wait for the ACPI power button (QMP system_powerdown),
  send ``shutdown`` and power off;
- ``exit``: ready, then shutdown on its own a second later;
- ``fail``: a ``failed`` frame, power off;
- ``garbage``: a malformed frame first, then like ``ok``;
- ``hang``: hello, then nothing.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile

from guestinit.wire import Frame, FrameType, encode
from rootfs import proc

DEB_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "guestinit", "debs")
BUSYBOX = "/bin/busybox"
# Load order follows each module's depends= in .modinfo (virtio needs virtio_ring).
MODULES = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/char/virtio_console.ko",
    "drivers/acpi/button.ko",
    "drivers/input/evdev.ko",
]
STAGES = ["early", "log", "config", "discover", "modules", "devices", "daemons", "cdi",
          "lockdown", "agent", "ready"]
BOOT_ID = "fake-boot-0001"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_console button evdev; do
  insmod /lib/modules/$m.ko || echo "fake init: insmod $m failed"
done
mode=ok
for w in $(cat /proc/cmdline); do
  case "$w" in fake.mode=*) mode="${w#fake.mode=}" ;; esac
done
port=
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  for d in /sys/class/virtio-ports/*; do
    [ "$(cat $d/name 2>/dev/null)" = guestinit.report ] && port=/dev/${d##*/}
  done
  [ -n "$port" ] && [ -e "$port" ] && break
  sleep 0.1
done
echo "fake init: mode=$mode port=$port"
exec 3>"$port"
cat /frames/hello.bin >&3
case "$mode" in
  hang) while :; do sleep 60; done ;;
  fail) cat /frames/failed.bin >&3; poweroff -f ;;
  garbage) cat /frames/garbage.bin >&3 ;;
esac
# Open the power button before saying ready: evdev only queues events for open readers,
# and the host may press the button the moment ready arrives.
ev=
for e in /sys/class/input/event*; do
  grep -q "Power Button" $e/device/name 2>/dev/null && ev=/dev/input/${e##*/}
done
[ -n "$ev" ] && exec 4<"$ev"
cat /frames/progress.bin /frames/ready.bin >&3
if [ "$mode" = exit ]; then
  sleep 1
else
  echo "fake init: waiting for the power button on $ev"
  if timeout 60 dd bs=24 count=1 <&4 >/dev/null 2>&1; then
    echo "fake init: power button pressed"
  else
    echo "fake init: no power button event (ev=$ev)"
  fi
fi
cat /frames/shutdown.bin >&3
exec 3>&-
poweroff -f
"""


def timeline() -> list[list[object]]:
    base = 1_500_000_000
    return [[name, base + i * 10_000_000, base + i * 10_000_000 + 5_000_000]
            for i, name in enumerate(STAGES)]


def frames() -> dict[str, bytes]:
    t = 1_400_000_000
    ready_fields: dict[str, object] = {
        "timeline": timeline(),
        "mode": "cpu",
        "modules": ["virtio_ring", "virtio", "virtio_mmio", "virtio_console", "button"],
        "inventory": {"accelerators": []},
        "daemons": [],
    }
    made = {
        "hello": Frame(FrameType.HELLO, BOOT_ID, t, {"version": "fake-0"}),
        "progress": Frame(FrameType.PROGRESS, BOOT_ID, t + 1, {"stage": "modules",
                                                                "event": "done"}),
        "ready": Frame(FrameType.READY, BOOT_ID, 1_620_000_000, ready_fields),
        "failed": Frame(FrameType.FAILED, BOOT_ID, t + 2, {
            "stage": "config", "reason": "guestinit.log: 'loud' is not a log level",
            "timeline": timeline()[:3]}),
        "shutdown": Frame(FrameType.SHUTDOWN, BOOT_ID, 9_000_000_000,
                          {"reason": "power button", "audit": []}),
    }
    out = {name: encode(frame) for name, frame in made.items()}
    out["garbage"] = b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    return out


def kernel_package() -> str:
    """linux-image-<abi>-amd64, the package linux-image-amd64 currently depends on."""
    text = proc.run(["apt-cache", "depends", "linux-image-amd64"], timeout=60).stdout
    found = re.search(r"Depends:\s*(linux-image-\S+-amd64)", text)
    if not found:
        raise RuntimeError(f"apt-cache depends linux-image-amd64 names no ABI package:\n{text}")
    return found.group(1)


def kernel_deb() -> str:
    """The cached kernel .deb (the cache the image builder shares); downloaded if missing."""
    os.makedirs(DEB_CACHE, exist_ok=True)
    have = sorted(glob.glob(os.path.join(DEB_CACHE, "linux-image-*-amd64_*_amd64.deb")))
    if have:
        return have[-1]
    pkg = kernel_package()
    with tempfile.TemporaryDirectory(dir=DEB_CACHE) as tmp:
        proc.run(["apt-get", "download", pkg], cwd=tmp, timeout=600)
        (name,) = os.listdir(tmp)
        os.replace(os.path.join(tmp, name), os.path.join(DEB_CACHE, name))
    return os.path.join(DEB_CACHE, name)


def build(out: str, cmdline: str = "console=ttyS0 quiet") -> str:
    """Write the fake image into ``out`` and return it."""
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        kx = os.path.join(tmp, "kernel")
        os.makedirs(kx)
        proc.run(["dpkg-deb", "-x", kernel_deb(), kx], timeout=300)
        (vmlinuz,) = glob.glob(os.path.join(kx, "boot", "vmlinuz-*"))
        shutil.copy(vmlinuz, os.path.join(out, "vmlinuz"))
        (moddir,) = glob.glob(os.path.join(kx, "lib", "modules", "*", "kernel"))
        tree = os.path.join(tmp, "tree")
        for sub in ("bin", "proc", "sys", "dev", "lib/modules", "frames"):
            os.makedirs(os.path.join(tree, sub))
        shutil.copy(BUSYBOX, os.path.join(tree, "bin", "busybox"))
        for rel in MODULES:
            shutil.copy(os.path.join(moddir, rel), os.path.join(tree, "lib", "modules"))
        for name, data in frames().items():
            with open(os.path.join(tree, "frames", f"{name}.bin"), "wb") as fh:
                fh.write(data)
        init = os.path.join(tree, "init")
        with open(init, "w", encoding="ascii") as fh:
            fh.write(INIT)
        os.chmod(init, 0o755)
        names = sorted(os.path.relpath(os.path.join(d, n), tree)
                       for d, dirs, files in os.walk(tree) for n in dirs + files)
        cpio = os.path.join(tmp, "initramfs.cpio")
        with open(cpio, "wb") as fh:
            done = proc.run_bytes(["cpio", "-o", "-H", "newc", "-R", "0:0"], cwd=tree,
                                  input_bytes="\n".join(names).encode() + b"\n")
            fh.write(done)
        proc.run(["zstd", "-q", "-f", "-19", cpio, "-o",
                  os.path.join(out, "initramfs.img")], timeout=300)
    with open(os.path.join(out, "cmdline.txt"), "w", encoding="ascii") as fh:
        fh.write(cmdline + "\n")
    return out
