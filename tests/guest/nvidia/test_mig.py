"""MIG capabilities: which exist, minors and modes, as the driver's procfs shows them."""

from __future__ import annotations

import pathlib

from guestinit.nvidia import mig
from tests.fixtures.accel import MIG_LAYOUT, cap_minor, fake_nvidia_proc, mig_minors_text


def test_parsers() -> None:
    assert mig.parse_mig_minors("config 1\nmonitor 2\ngpu0/gi0/access 3\nbogus\n") == {
        "config": 1, "monitor": 2, "gpu0/gi0/access": 3}
    assert mig.parse_cap_file("DeviceFileMinor: 1\nDeviceFileMode: 256\nDeviceFileModify: 1\n") \
        == {"DeviceFileMinor": 1, "DeviceFileMode": 256, "DeviceFileModify": 1}
    assert len(mig.parse_mig_minors(mig_minors_text())) == 2 + 8 * 15 * 9


def test_read_caps_of_the_faithful_fixture(tmp_path: pathlib.Path) -> None:
    fake_nvidia_proc(tmp_path, [], caps=True)
    caps = mig.read_caps(str(tmp_path))
    got = [(c.name, c.minor, c.mode, c.gpu, c.gi, c.ci) for c in caps]
    assert got[:2] == [("config", 1, 0o400, -1, -1, -1), ("monitor", 2, 0o444, -1, -1, -1)]
    want = []
    for gi, cis in MIG_LAYOUT.items():
        want.append((f"gpu0/gi{gi}/access", cap_minor(0, gi), 0o444, 0, gi, -1))
        want += [(f"gpu0/gi{gi}/ci{ci}/access", cap_minor(0, gi, ci), 0o444, 0, gi, ci)
                 for ci in cis]
    assert got[2:] == want
    assert [(gi, [c.minor for c in group]) for gi, group in mig.instances(caps, 0)] == [
        (1, [cap_minor(0, 1), cap_minor(0, 1, 0)]), (2, [cap_minor(0, 2), cap_minor(0, 2, 0)])]
    assert mig.instances(caps, 1) == []


def test_defaults_without_a_mode_line_and_minors_from_mig_minors(tmp_path: pathlib.Path) -> None:
    base = tmp_path / "proc/driver/nvidia/capabilities"
    (tmp_path / "proc/driver/nvidia-caps").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia-caps/mig-minors").write_text(
        "config 1\nmonitor 2\ngpu1/gi4/access 40\ngpu1/gi4/ci2/access 43\n")
    (base / "gpu1/mig/gi4/ci2").mkdir(parents=True)
    (base / "gpu1/mig/gi4/access").write_text("DeviceFileModify: 1\n")  # no minor, no mode
    (base / "gpu1/mig/gi4/ci2/access").write_text("DeviceFileMode: 288\n")  # 0440
    (base / "gpu1/mig/gi5").mkdir()  # a GI directory without its access file: not there
    caps = {c.name: (c.minor, c.mode) for c in mig.read_caps(str(tmp_path))}
    # config and monitor are listed; without their files they get the driver's defaults
    assert caps == {"config": (1, 0o400), "monitor": (2, 0o444),
                    "gpu1/gi4/access": (40, 0o444), "gpu1/gi4/ci2/access": (43, 0o440)}


def test_a_cap_neither_file_numbers_is_skipped(tmp_path: pathlib.Path) -> None:
    base = tmp_path / "proc/driver/nvidia/capabilities"
    (tmp_path / "proc/driver/nvidia-caps").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia-caps/mig-minors").write_text("config 1\n")
    (base / "gpu0/mig/gi1").mkdir(parents=True)
    (base / "gpu0/mig/gi1/access").write_text("DeviceFileMode: 292\n")
    assert [c.name for c in mig.read_caps(str(tmp_path))] == ["config"]


def test_no_mig_minors_no_caps(tmp_path: pathlib.Path) -> None:
    fake_nvidia_proc(tmp_path, [])
    assert mig.read_caps(str(tmp_path)) == []
