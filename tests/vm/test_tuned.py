"""The tuned guest kernel (profile cpu-tuned, ./build.sh kernel) boots the cpu image.

Every boot driver is built in, so the init loads no module before the report channel
is up; QEMU enters the uncompressed vmlinux at its PVH note, and the bzImage of the
same build still boots for VMMs without PVH.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import image
from guestinit.wire import FrameType
from tests.vm.conftest import agent, boot_vm, explain
from tests.vm.test_boot import STAGES

pytestmark = pytest.mark.vm


def _release(directory: str) -> str:
    return (Path(directory) / "kernel-release.txt").read_text().strip()


def test_tuned_kernel_boots_to_ready_at_its_pvh_entry(tuned_image: str, tmp_path: Path) -> None:
    assert image.load(tuned_image).entry == "pvh"
    res = boot_vm(tuned_image, tmp_path, append=f"{agent()} loglevel=7")  # the banner too
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None
    names = [n for n, _, _ in ready.timeline()]
    assert [n for n in names if n in STAGES] == STAGES, names
    assert ready.fields.get("modules") == [], ready.fields.get("modules")  # all built in
    with open(res.console_log, encoding="utf-8", errors="replace") as fh:
        console = fh.read()
    assert f"Linux version {_release(tuned_image)}" in console
    # the powerdown request reached the init through the built-in ACPI power button
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None and res.qemu_rc == 0 and not res.forced, explain(res)


def test_tuned_kernel_mounts_the_verity_root_itself(tuned_image: str, tmp_path: Path) -> None:
    img = image.load(tuned_image, erofs=True)
    assert img.initramfs is None and "dm-mod.create=" in img.cmdline  # no initramfs at all
    res = boot_vm(tuned_image, tmp_path, erofs=True, append=agent())
    assert res.ok, explain(res)
    assert res.first(FrameType.READY) is not None


def test_the_bzimage_of_the_same_build_boots_too(tuned_image: str, tmp_path: Path) -> None:
    assert image.load(tuned_image, entry="bzimage").kernel.endswith("/vmlinuz")
    res = boot_vm(tuned_image, tmp_path, entry="bzimage", append=agent())
    assert res.ok, explain(res)
    assert res.first(FrameType.READY) is not None
