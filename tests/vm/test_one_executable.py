"""The image's one Python executable (rootfs/staticinit.c, the cpu profile's default):
every VM test boots it, as the init and, for the agent stand-in, as python3.11. Here: the
launcher path (profile cpu-launcher, kept for comparison) still boots, and an executable
that cannot start guestinit says so on the console and powers the VM off.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import image
from guestinit.wire import FrameType
from rootfs import cpio, fetch, proc, staticinit
from rootfs.profile import PROFILES_DIR
from rootfs.steps import BuildError
from tests.vm.conftest import REPO, REQUIRED, agent, boot_vm, ensure_image, explain
from tests.vm.test_boot import STAGES

pytestmark = pytest.mark.vm

LAUNCHER_IMAGE = REPO / "out" / "cpu-launcher"
GUEST = REPO / "guestinit"


def test_the_launcher_image_boots_to_ready(tmp_path: Path) -> None:
    res = boot_vm(ensure_image("cpu-launcher", LAUNCHER_IMAGE, REQUIRED), tmp_path,
                  append=f"{agent()} loglevel=7")
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None
    names = [n for n, _, _ in ready.timeline()]
    assert [n for n in names if n in STAGES] == STAGES, names
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None and res.qemu_rc == 0 and not res.forced, explain(res)


def _broken_init(tmp_path: Path) -> Path:
    """An executable whose frozen guestinit.__main__ fails on import (as if a module it
    needs were missing): built from a copy of guestinit with that __main__."""
    src = tmp_path / "guestinit"
    shutil.copytree(GUEST, src, ignore=shutil.ignore_patterns("__pycache__", "testing"))
    (src / "__main__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'guestinit.gone'\", name='guestinit.gone')\n")
    lock = fetch.Lock.load(PROFILES_DIR / "debian.lock")
    try:
        binary, _ = staticinit.static_init_binary(
            Path("/usr/lib/python3.11"), lock.debs["python3.11-minimal"].version,
            lock.wheels["cffi"].version, guest_src=src, pin=lock.sdists["cffi"])
    except BuildError as exc:
        pytest.fail(f"build the broken executable: {exc}")
    return binary


def test_an_executable_that_cannot_start_guestinit_reports_and_powers_off(
        cpu_image: str, tmp_path: Path) -> None:
    # the cpu image with the /usr/sbin/init link replaced by a broken build of the
    # executable: its initramfs unpacked, the entry swapped and packed again uncompressed
    # (the kernel takes that too)
    broken = tmp_path / "image"
    shutil.copytree(cpu_image, broken)
    packed = proc.run_bytes(["lz4", "-dc", str(broken / "initramfs.img")], timeout=120)
    entries = [e for e in cpio.read(packed) if e.path != "usr/sbin/init"]
    entries.append(cpio.Entry("usr/sbin/init", 0o100755, source=_broken_init(tmp_path)))
    with open(broken / "initramfs.img", "wb") as out:
        cpio.write(out, entries, mtime=0)
    assert image.load(str(broken)).initramfs is not None
    res = boot_vm(str(broken), tmp_path / "boot")
    assert res.first(FrameType.READY) is None
    console = Path(res.console_log).read_text(errors="replace")
    assert ("guestinit-init: import guestinit.__main__: ModuleNotFoundError: No module named "
            "'guestinit.gone'") in console, explain(res)
    assert "powering off" in console
    assert res.qemu_rc == 0 and not res.forced, explain(res)  # the guest powered itself off
