"""The harness against real QEMU and Debian's kernel, with the busybox stand-in guest.

The ``ok`` boot also shows what ``system_powerdown`` needs in the guest: the fake
init waits for KEY_POWER on the ``button`` driver's evdev node before it sends
``shutdown`` (see fakeimage.py), so the boot only passes if that path works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from tests.bench import fakeimage
from tests.bench.conftest import vmm_processes

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fakeimage.build(str(tmp_path_factory.mktemp("fakeimage")))


def test_boot_ready_powerdown_shutdown(busybox_image: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = vmm_processes()
    rc = main(["boot", busybox_image, "--accel", "tcg", "--timeout", "60",
               "--json", str(tmp_path / "boot.json"), "--workdir", str(tmp_path / "w"),
               "--hold-until", "fake init: waiting for the power button"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "accelerator: tcg (requested)" in out
    assert "result: OK (ready, clean shutdown, QEMU exit status 0)" in out
    assert "modules (5): virtio_ring, virtio, virtio_mmio, virtio_console, button" in out
    assert "shutdown: power button" in out
    doc = json.loads((tmp_path / "boot.json").read_text())
    assert doc["machine"]["accel"] == "tcg" and doc["machine"]["cpu"] == "qemu64,+rdrand"
    assert [f["type"] for f in doc["frames"]] == ["hello", "progress", "ready", "shutdown"]
    assert doc["timings"]["guest_init_exec_ns"] == 1_500_000_000
    assert 0 < doc["timings"]["host_ready_s"] < 60
    assert doc["timings"]["host_ready_s"] <= doc["timings"]["host_hold_s"]
    assert doc["timings"]["host_hold_s"] <= doc["timings"]["host_powerdown_s"]
    assert doc["forced"] == ""
    assert "fake init: power button pressed" in (tmp_path / "w" / "console.log").read_text()
    assert vmm_processes() - before == set()


def test_boot_failed_frame_exits_nonzero_with_reason_and_console_log(
    busybox_image: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = vmm_processes()
    rc = main(["boot", busybox_image, "--accel", "tcg", "--append", "fake.mode=fail",
               "--workdir", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert rc == 1
    assert ("result: FAILED: guest failed in stage config: "
            "guestinit.log: 'loud' is not a log level") in out
    assert f"console log: {tmp_path / 'w' / 'console.log'}" in out
    assert vmm_processes() - before == set()


def test_boot_timeout_stops_qemu(busybox_image: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = vmm_processes()
    rc = main(["boot", busybox_image, "--accel", "tcg", "--append", "fake.mode=hang",
               "--timeout", "4", "--workdir", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "result: FAILED: no ready frame after 4s" in out
    assert vmm_processes() - before == set()
