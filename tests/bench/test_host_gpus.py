"""The host's NVIDIA devices through udev (bench.host_gpus), under umockdev-run: the
fixtures of tests/fixtures/pci are udev's whole PCI bus, so the host's own devices (and
any GPU it has) stay out of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import host_gpus
from guestinit.pci import Bar
from tests.fixtures.umockdev_tree import FIXTURES, device, host_bridge, nvswitch

REPO = Path(__file__).resolve().parents[2]


def under_udev(fixture: str | Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` with udev's PCI bus the fixture's (a name in tests/fixtures/pci or
    a .umockdev file)."""
    umockdev_run = shutil.which("umockdev-run")
    assert umockdev_run, "umockdev-run missing: apt-get install umockdev (build.sh setup)"
    path = fixture if isinstance(fixture, Path) else FIXTURES / f"{fixture}.umockdev"
    return subprocess.run([umockdev_run, "-d", str(path), "--", sys.executable, *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def python(*args: str, path: str = str(REPO)) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": path})


def bound(text: str, driver: str) -> str:
    """A fixture device bound to a driver, as udev reports it (the DRIVER property)."""
    return text.rstrip("\n") + f"\nE: DRIVER={driver}\n\n"


def test_an_hgx_board_is_eight_gpus_and_four_switches_with_their_bars() -> None:
    out = under_udev("h100x8_nvswitch4", "-m", "bench.host_gpus", "--json")
    assert out.returncode == 0, out.stderr
    devices = json.loads(out.stdout)
    assert [d["kind"] for d in devices] == ["gpu"] * 8 + ["nvswitch"] * 4
    first = devices[0]
    assert first["bdf"] == "0000:18:00.0" and first["device"] == "0x2330"
    assert first["class"] == "0x030200" and first["driver"] is None
    assert [(b["index"], b["size"], b["prefetch"], b["mem64"]) for b in first["bars"]] == [
        (0, 16 << 20, False, False), (1, 128 << 30, True, True), (3, 32 << 20, True, True)]
    assert first["bars"][1]["start"] == "0x200040000000"  # the fixture's address, parsed
    assert [d["numa_node"] for d in devices[:8]] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert first["iommu_group"] == "10"
    assert all(d["bdf"] != "0000:00:00.0" for d in devices)  # the Intel host bridge


def test_the_bar_map_target_is_the_first_gpus_largest_bar() -> None:
    def dev(bdf: str, kind: str, bars: list[tuple[int, int]]) -> host_gpus.HostDevice:
        return host_gpus.HostDevice(bdf, 0x10DE, 0x2330, 0x030200, kind, None, None, None,
                                    tuple(Bar(i, 1 << 40, size, 0x14220C) for i, size in bars),
                                    {})

    switch = dev("0000:05:00.0", "nvswitch", [(0, 32 << 20)])
    gpu = dev("0000:18:00.0", "gpu", [(0, 16 << 20), (1, 128 << 30), (3, 32 << 20)])
    found = host_gpus.bar_map_target([switch, gpu])
    assert found is not None and (found[0].bdf, found[1].index) == ("0000:18:00.0", 1)
    assert host_gpus.bar_map_target([switch]) is None
    assert host_gpus.kind_of(0x2330, 0x030200) == "gpu"
    assert host_gpus.kind_of(0x22A3, 0x068000) == "nvswitch"
    assert host_gpus.kind_of(0x1234, 0x020000) == "other"
    assert host_gpus.kind_of(0x2684, 0x030000) == "gpu"
    assert host_gpus.kind_of(0x22BA, 0x040300) == "other"  # a GPU's HDMI audio function
    assert host_gpus.kind_of(0x0001, 0x000300) == "other"  # subclass 03 of class 00: no GPU


def test_a_workstation_lists_drivers_kinds_and_the_first_gpu_in_pci_order(
        tmp_path: Path) -> None:
    """Bound drivers (udev's DRIVER), an audio function (other), an I/O BAR left out, and
    bar-map's default: the first GPU in PCI order, not the first NVIDIA device."""
    rtx = [(0, 0x40200, 16 << 20), (1, 0x14220C, 256 << 20), (3, 0x14220C, 32 << 20),
           (5, 0x40101, 128)]
    h100 = [(0, 0x40200, 16 << 20), (1, 0x14220C, 128 << 30), (3, 0x14220C, 32 << 20)]
    fixture = tmp_path / "workstation.umockdev"
    fixture.write_text(
        host_bridge() + bound(device("0000:c1:00.0", 0x10DE, 0x2330, 0x030200, numa=1,
                                     group=30, bars=h100), "vfio-pci")
        + bound(device("0000:41:00.1", 0x10DE, 0x22BA, 0x040300, group=20,
                       bars=[(0, 0x40200, 16 << 10)]), "snd_hda_intel")
        + bound(device("0000:41:00.0", 0x10DE, 0x2684, 0x030000, group=20, bars=rtx), "nvidia")
        + nvswitch(0))
    out = under_udev(fixture, "-m", "bench.host_gpus", "--json")
    assert out.returncode == 0, out.stderr
    devices = json.loads(out.stdout)
    assert [(d["bdf"], d["kind"], d["driver"]) for d in devices] == [
        ("0000:41:00.0", "gpu", "nvidia"), ("0000:41:00.1", "other", "snd_hda_intel"),
        ("0000:50:00.0", "nvswitch", None), ("0000:c1:00.0", "gpu", "vfio-pci")]
    assert [b["index"] for b in devices[0]["bars"]] == [0, 1, 3]  # BAR 5 is I/O
    target = under_udev(fixture, "-m", "bench.host_gpus", "--bar-map-target")
    assert target.returncode == 0 and target.stdout == "0000:41:00.0:1\n"
    table = under_udev(fixture, "-m", "bench.cli", "gpus")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["BDF", "KIND", "ID", "DRIVER"] and len(lines) == 5
    assert lines[4].split()[:5] == ["0000:c1:00.0", "gpu", "10de:2330", "vfio-pci", "1"]
    assert "1:128 GiB pf" in lines[4]


def test_bar_map_without_a_target_maps_the_gpu_udev_lists() -> None:
    out = under_udev("h100x1", "-m", "bench.cli", "bar-map", "--sysfs", "/nonexistent")
    assert "no target given: 0000:18:00.0 BAR 1, the largest BAR of the first NVIDIA GPU" \
        in out.stdout
    assert "/nonexistent" in out.stderr and out.returncode == 2  # then the sysfs path says no


def test_bar_map_without_a_target_or_a_gpu_says_what_it_looked_for() -> None:
    out = under_udev("empty", "-m", "bench.cli", "bar-map")
    assert out.returncode == 2
    assert "no target given and udev lists no NVIDIA GPU (vendor 0x10de, class 0x0300xx or " \
        "0x0302xx)" in out.stderr and not out.stdout
    listed = under_udev("empty", "-m", "bench.cli", "gpus")
    assert listed.returncode == 0 and "no NVIDIA PCI devices" in listed.stdout


def test_without_pyudev_or_libudev_the_error_names_what_to_install(tmp_path: Path) -> None:
    no_pyudev = python("-c", "import sys; sys.modules['pyudev'] = None\n"
                       "from bench.cli import main; sys.exit(main(['gpus']))")
    assert no_pyudev.returncode == 2 and not no_pyudev.stdout
    assert "guestinit-bench gpus: pyudev is not installed" in no_pyudev.stderr
    assert "pip install 'pyudev>=0.24'" in no_pyudev.stderr
    # a pyudev whose Context fails the way pyudev's does when find_library("udev") finds
    # nothing (pyudev._ctypeslib.utils.load_ctypes_library)
    (tmp_path / "pyudev").mkdir()
    (tmp_path / "pyudev/__init__.py").write_text(
        "class Context:\n    def __init__(self):\n"
        "        raise ImportError('No library named udev')\n")
    no_libudev = python("-m", "bench.cli", "bar-map", path=f"{tmp_path}:{REPO}")
    assert no_libudev.returncode == 2
    assert "bar-map: no target given and libudev did not load (No library named udev): " \
        "install the libudev1 package (Debian/Ubuntu: apt-get install libudev1)" \
        in no_libudev.stderr
