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
from tests.fixtures.umockdev_tree import FIXTURES

REPO = Path(__file__).resolve().parents[2]


def under_udev(fixture: str, *args: str) -> subprocess.CompletedProcess[str]:
    umockdev_run = shutil.which("umockdev-run")
    assert umockdev_run, "umockdev-run missing: apt-get install umockdev (build.sh setup)"
    return subprocess.run([umockdev_run, "-d", str(FIXTURES / f"{fixture}.umockdev"), "--",
                           sys.executable, *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_an_hgx_board_is_eight_gpus_and_four_switches_with_their_bars() -> None:
    out = under_udev("h100x8_nvswitch4", "-m", "bench.host_gpus", "--json")
    assert out.returncode == 0, out.stderr
    devices = json.loads(out.stdout)
    assert [d["kind"] for d in devices] == ["gpu"] * 8 + ["nvswitch"] * 4
    first = devices[0]
    assert first["bdf"] == "0000:18:00.0" and first["device"] == "0x2330"
    assert first["class"] == "0x030200" and first["driver"] is None
    assert [(b["index"], b["size"], b["prefetch"]) for b in first["bars"]] == [
        (0, 16 << 20, False), (1, 128 << 30, True), (3, 32 << 20, True)]
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


def test_bar_map_without_a_target_maps_the_gpu_udev_lists() -> None:
    out = under_udev("h100x1", "-m", "bench.cli", "bar-map", "--sysfs", "/nonexistent")
    assert "no target given: 0000:18:00.0 BAR 1, the largest BAR of the first NVIDIA GPU" \
        in out.stdout
    assert "/nonexistent" in out.stderr and out.returncode == 2  # then the sysfs path says no


def test_bar_map_without_a_target_or_a_gpu_says_what_it_looked_for() -> None:
    out = under_udev("empty", "-m", "bench.cli", "bar-map")
    assert out.returncode == 2
    assert "no target given and udev lists no NVIDIA GPU (vendor 0x10de, class 0x0300xx or " \
        "0x0302xx)" in out.stderr
    listed = under_udev("empty", "-m", "bench.cli", "gpus")
    assert listed.returncode == 0 and "no NVIDIA PCI devices" in listed.stdout
