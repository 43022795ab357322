"""The static init (profile cpu-static: rootfs/staticinit.c, CPython and guestinit in one
executable) boots to ready under QEMU, and a static init that cannot start guestinit says
so on the console and powers the VM off.
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

STATIC_IMAGE = REPO / "out" / "cpu-static"
GUEST = REPO / "guestinit"


@pytest.fixture(scope="module")
def static_image() -> str:
    return ensure_image("cpu-static", STATIC_IMAGE, REQUIRED)


def test_static_init_boots_to_ready(static_image: str, tmp_path: Path) -> None:
    res = boot_vm(static_image, tmp_path, append=f"{agent()} loglevel=7")
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None
    names = [n for n, _, _ in ready.timeline()]
    assert [n for n in names if n in STAGES] == STAGES, names
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None and res.qemu_rc == 0 and not res.forced, explain(res)


def _broken_init(tmp_path: Path) -> Path:
    """A static init whose frozen guestinit.__main__ fails on import (as if a module it
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
        pytest.fail(f"build the broken static init: {exc}")
    return binary


def test_a_static_init_that_cannot_start_guestinit_reports_and_powers_off(
        static_image: str, tmp_path: Path) -> None:
    # the image with /usr/sbin/init replaced: its initramfs unpacked, the entry swapped and
    # packed again uncompressed (the kernel takes that too)
    broken = tmp_path / "image"
    shutil.copytree(static_image, broken)
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
