"""The other profiles build; the baselines do the same minimal work and send a ready frame."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from guestinit import wire
from rootfs import cpio, pack, profile
from rootfs.build import build_image
from rootfs.steps import Progress
from tests.fixtures.tcg import tsc_word


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("profiles")
    outs = {}
    for name in ("debug", "baseline-busybox", "baseline-systemd"):
        outs[name] = base / name
        build_image(profile.load(name), outs[name], locked=True, progress=Progress(quiet=True),
                    zstd_level=1)
    return outs


def entries(out: Path) -> dict[str, cpio.Entry]:
    return {e.path: e for e in cpio.read(pack.decompress(out / "initramfs.img"))}


def test_debug_has_a_shell(built: dict[str, Path]) -> None:
    ents = entries(built["debug"])
    assert ents["usr/bin/sh"].data == b"busybox" and stat.S_ISLNK(ents["usr/bin/sh"].mode)
    assert "usr/bin/busybox" in ents
    assert b"log=debug\n" in ents["etc/guestinit.conf"].data
    assert ents["etc/passwd"].data.startswith(b"root:x:0:0:root:/root:/bin/sh\n")


def ready_frame(script: str, tmp_path: Path) -> wire.Frame:
    """Run the image script's own frame functions with the host's busybox sh."""
    lines = script.splitlines(keepends=True)
    start = lines.index("boottime_octal() {\n")
    end = next(i for i, line in enumerate(lines) if line.startswith("send_shutdown() {"))
    out = tmp_path / "report.bin"
    subprocess.run(["busybox", "sh", "-c", "".join(lines[start:end + 1])
                    + f'exec 4> "{out}"\nsend_ready\n'], check=True, timeout=10)
    frames = wire.FrameReader().feed(out.read_bytes())
    assert len(frames) == 1 and isinstance(frames[0], wire.Frame), frames
    return frames[0]


def test_baseline_busybox(built: dict[str, Path], tmp_path: Path) -> None:
    out = built["baseline-busybox"]
    ents = entries(out)
    script = ents["init"].data.decode()
    release = (out / "kernel-release.txt").read_text().strip()
    loads = [line.split()[1] for line in script.splitlines() if line.startswith("insmod ")]
    names = [Path(p).stem for p in loads]
    # the early modules, each after its dependencies
    assert names.index("virtio") < names.index("virtio_mmio")
    assert names.index("vsock") < names.index("vmw_vsock_virtio_transport")
    assert all(p.startswith(f"/lib/modules/{release}/") for p in loads)
    assert all(f"usr{p}" in ents for p in loads)
    assert "erofs" not in names  # only the early set: the same work guestinit does first
    assert {"button", "evdev"} <= set(names)  # the power button ends the boot
    frame = ready_frame(script, tmp_path)
    assert frame.type is wire.FrameType.READY and frame.boot_id == "baseline-busybox"
    assert "usr/bin/python3.11" not in ents
    assert (out / "initramfs.img").stat().st_size < 4 * 2**20


def test_baseline_systemd(built: dict[str, Path], tmp_path: Path) -> None:
    out = built["baseline-systemd"]
    ents = entries(out)
    assert ents["init"].data == b"/usr/lib/systemd/systemd"
    assert "usr/lib/systemd/systemd" in ents
    assert "usr/lib/systemd/systemd-shutdown" in ents  # how SIGRTMIN+14 powers off
    unit = ents["usr/lib/systemd/system/baseline-ready.service"].data.decode()
    assert "ExecStart=/bin/sh /usr/lib/baseline/ready.sh" in unit
    assert "systemd.unit=baseline-ready.service" in (out / "cmdline.txt").read_text()
    assert ready_frame(ents["usr/lib/baseline/ready.sh"].data.decode(), tmp_path).boot_id == \
        "baseline-systemd"
    assert any(p.endswith("libsystemd-shared-252.so") for p in ents)


@pytest.mark.vm
def test_baseline_busybox_boots_to_ready(built: dict[str, Path], tmp_path: Path) -> None:
    out = built["baseline-busybox"]
    port = tmp_path / "report.bin"
    argv = ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "512", "-nographic",
            "-no-reboot", "-nodefaults", "-serial", "stdio", "-kernel", str(out / "vmlinuz"),
            "-initrd", str(out / "initramfs.img"),
            "-append", (out / "cmdline.txt").read_text().strip() + tsc_word(),
            "-device", "virtio-serial-device", "-chardev", f"file,id=rep,path={port}",
            "-device", "virtserialport,chardev=rep,name=guestinit.report"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        frames: list[wire.Frame | wire.FrameError] = []
        for _ in range(600):  # up to 60 s: the busybox init sleeps forever after ready
            if port.exists():
                frames = wire.FrameReader().feed(port.read_bytes())
                if frames:
                    break
            try:
                proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        proc.kill()
        console = proc.communicate()[0].decode(errors="replace")
    assert frames and isinstance(frames[0], wire.Frame), console[-3000:]
    assert frames[0].type is wire.FrameType.READY
