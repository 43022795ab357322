"""PCI discovery (pci, discover) and NVIDIA's mode and fabric (the nvidia package), against
umockdev fixtures (tests/fixtures/pci)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from guestinit import discover, nvidia, pci
from guestinit.stages import BootError
from guestinit.values import Fabric, Mode
from tests.fixtures.accel import kmsg_text, make_boot
from tests.fixtures.umockdev_tree import FIXTURES, load, materialize

REPO = pathlib.Path(__file__).resolve().parents[2]


def tree(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    materialize(load(name), tmp_path)
    return tmp_path


def accels(root: pathlib.Path, specs: tuple[str, ...] = ()) -> list[pci.Accelerator]:
    profiles = discover.profiles_from(specs)
    return pci.classify(pci.scan(str(root), pci.vpd_vendors(profiles)), profiles)


def test_resource_file_gives_bars_with_size_and_flags() -> None:
    text = (
        "0x0000000080000000 0x0000000080ffffff 0x0000000000040200\n"
        "0x0000002000000000 0x0000002fffffffff 0x000000000014220c\n"
        "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
        "0x0000000000001000 0x000000000000107f 0x0000000000040101\n"
    )
    bars = pci.parse_resource(text)
    assert [(b.index, b.size, b.mem64, b.prefetch, b.io) for b in bars] == [
        (0, 16 << 20, False, False, False),
        (1, 64 << 30, True, True, False),
        (3, 128, False, False, True),
    ]


def test_resource_garbage_is_an_error_naming_the_line() -> None:
    with pytest.raises(ValueError, match="resource line 1"):
        pci.parse_resource("0x0 0x0 0x0\nnonsense\n")


def test_single_h100_is_gpu_mode_with_its_bars(tmp_path: pathlib.Path) -> None:
    found = accels(tree(tmp_path, "h100x1"))
    assert [(a.kind, a.dev.bdf) for a in found] == [(pci.Kind.GPU, "0000:18:00.0")]
    gpu = found[0].to_map()
    assert gpu["vendor"] == "0x10de" and gpu["device"] == "0x2330" and gpu["class"] == "0x030200"
    assert gpu["iommu_group"] == 10 and gpu["numa_node"] == 0
    assert [(b["index"], b["size"], b["prefetch"]) for b in gpu["bars"]] == [  # type: ignore[union-attr]
        (0, 16 << 20, False), (1, 128 << 30, True), (3, 32 << 20, True)]
    assert nvidia.decide_mode(found) == (Mode.GPU, "")


def test_hgx_board_is_gpu_mode_with_fabric(tmp_path: pathlib.Path) -> None:
    root = tree(tmp_path, "h100x8_nvswitch4")
    boot = make_boot(root)
    discover.run_discover(boot)
    inventory = [a.to_map() for a in boot.facts.inventory]
    kinds = [d["kind"] for d in inventory]
    assert kinds.count("gpu") == 8 and kinds.count("nvswitch") == 4
    assert boot.facts.mode is Mode.GPU and boot.facts.fabric is Fabric.NVL4
    assert {d["numa_node"] for d in inventory if d["kind"] == "gpu"} == {0, 1}
    assert any(span[0] == "discover:pci" for span in boot.timeline.spans)
    assert ("discover: mode gpu with the nvl4 fabric (8 GPUs, 4 NVSwitches, 0 SW_MNG bridges)"
            in kmsg_text(root))


@pytest.mark.parametrize(("fixture", "mode", "fabric"), [
    ("empty", Mode.CPU, ""),
    ("h100x1", Mode.GPU, ""),
    ("h100x8_nvswitch4", Mode.GPU, "nvl4"),  # HGX H100: GPU + NVL4
    ("b200x8_sw_mng4", Mode.GPU, "nvl5"),  # HGX B200: GPU + NVL5 through ConnectX SW_MNG
    ("nvswitch4", Mode.NVL4, ""),  # service VM, NVL4
    ("sw_mng2", Mode.NVL5, ""),  # service VM, NVL5
])
def test_nvrc_topologies_give_nvrc_modes(tmp_path: pathlib.Path, fixture: str, mode: Mode,
                                        fabric: str) -> None:
    assert nvidia.decide_mode(accels(tree(tmp_path, fixture))) == (mode, fabric)


def test_sw_mng_bridges_alone_are_nvl5(tmp_path: pathlib.Path) -> None:
    found = accels(tree(tmp_path, "sw_mng2"))
    assert [a.kind for a in found] == [pci.Kind.SW_MNG] * 2
    assert nvidia.decide_mode(found) == (Mode.NVL5, "")


@pytest.mark.parametrize(("forced", "want"), [
    (Mode.GPU, (Mode.GPU, "nvl5")), (Mode.NVL5, (Mode.NVL5, "")), (Mode.CPU, (Mode.CPU, ""))])
def test_forced_modes_on_a_b200_board(tmp_path: pathlib.Path, forced: Mode,
                                      want: tuple[Mode, str]) -> None:
    assert nvidia.decide_mode(accels(tree(tmp_path, "b200x8_sw_mng4")), forced) == want


def test_forcing_a_mode_the_inventory_lacks_names_the_counts(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"mode nvl4 was forced but the inventory has no "
                       r"NVSwitch \(found 1 GPUs, 0 NVSwitches, 0 SW_MNG bridges"):
        nvidia.decide_mode(accels(tree(tmp_path, "h100x1")), Mode.NVL4)


def test_mellanox_without_sw_mng_vpd_is_not_an_accelerator(tmp_path: pathlib.Path) -> None:
    root = tree(tmp_path, "sw_mng2")
    (root / "sys/devices/pci0000:80/0000:80:00.0/vpd").write_bytes(b"\x82\x08ConnectX")
    assert [a.dev.bdf for a in accels(root)] == ["0000:81:00.0"]


def test_no_accelerators_is_cpu_mode(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tree(tmp_path, "empty"))
    discover.run_discover(boot)
    assert boot.facts.mode == "cpu" and boot.facts.inventory == []


def test_missing_sysfs_is_cpu_mode(tmp_path: pathlib.Path) -> None:
    assert pci.scan(str(tmp_path)) == []


def test_fpga_profile_from_config_names_its_modules(tmp_path: pathlib.Path) -> None:
    root = tree(tmp_path, "fpga")
    assert accels(root) == []  # not an accelerator without a profile
    boot = make_boot(root, cmdline="guestinit.accel=10ee:903f:1200=xdma+qdma")
    discover.run_discover(boot)
    inventory = [a.to_map() for a in boot.facts.inventory]
    assert len(inventory) == 1
    assert inventory[0]["kind"] == "generic" and inventory[0]["modules"] == ["xdma", "qdma"]
    assert inventory[0]["profile"] == "accel:10ee:903f"
    assert boot.facts.mode == "cpu"


def test_generic_profile_class_must_match(tmp_path: pathlib.Path) -> None:
    assert accels(tree(tmp_path, "fpga"), ("10ee:903f:0300=xdma",)) == []
    assert len(accels(tmp_path, ("10ee:903f:120000=xdma",))) == 1


@pytest.mark.parametrize("spec", ["10ee:903f", "10ee=xdma", "zz:903f=xdma", "10ee:903f:1:2=x"])
def test_bad_accel_profile_names_the_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="accel profile"):
        pci.parse_accel(spec)


def test_mixed_topology_fails_listing_what_was_found(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tree(tmp_path, "mixed_invalid"))
    with pytest.raises(BootError) as err:
        discover.run_discover(boot)
    assert err.value.stage == "discover"
    reason = err.value.reason
    assert "NVSwitches and SW_MNG bridges together" in reason
    assert "found 0 GPUs, 1 NVSwitches, 1 SW_MNG bridges" in reason
    assert "0000:50:00.0" in reason and "0000:80:00.0" in reason
    for accepted in nvidia.TOPOLOGIES:  # the explanation lists every topology that would boot
        assert accepted in reason
    assert "nvswitch 0000:50:00.0 [10de:22a3]" in reason
    assert "sw_mng 0000:80:00.0 [15b3:1021]" in reason


def test_forced_mode_needs_matching_devices(tmp_path: pathlib.Path) -> None:
    root = tree(tmp_path, "nvswitch4")
    boot = make_boot(root, cmdline="guestinit.mode=gpu")
    with pytest.raises(BootError, match="mode gpu was forced but the inventory has no GPU"):
        discover.run_discover(boot)
    boot = make_boot(root, cmdline="nvrc.mode=cpu")
    discover.run_discover(boot)
    assert boot.facts.mode == "cpu"


def test_forcing_a_service_vm_mode_picks_one_of_a_mixed_topology(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tree(tmp_path, "mixed_invalid"), cmdline="nvrc.mode=nvswitch-nvl4")
    discover.run_discover(boot)
    assert boot.facts.mode is Mode.NVL4 and boot.facts.fabric is Fabric.NONE


def test_bad_sysfs_attribute_names_the_file(tmp_path: pathlib.Path) -> None:
    root = tree(tmp_path, "h100x1")
    (root / "sys/devices/pci0000:18/0000:18:00.0/class").write_text("garbage\n")
    with pytest.raises(BootError, match=r"0000:18:00.0/class: expected a hex number"):
        discover.run_discover(make_boot(root))


SCAN = ("import json; from guestinit import pci; "
        "print(json.dumps([d.to_map() for d in pci.scan('/')]))")


@pytest.mark.parametrize("name", ["h100x1", "h100x8_nvswitch4", "sw_mng2"])
def test_the_reader_on_root_under_umockdev_matches_the_tree_reader(
    tmp_path: pathlib.Path, name: str
) -> None:
    umockdev_run = shutil.which("umockdev-run")
    assert umockdev_run, "umockdev-run missing: apt-get install umockdev (build.sh setup)"
    out = subprocess.run(
        [umockdev_run, "-d", str(FIXTURES / f"{name}.umockdev"), "--", sys.executable, "-c", SCAN],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    via_udev = json.loads(out.stdout)
    via_tree = [d.to_map() for d in pci.scan(str(tree(tmp_path, name)))]
    assert via_udev == via_tree
    assert len(via_udev) >= 2


def test_real_root_lists_this_machines_pci_devices_without_pyudev() -> None:
    """On "/" the list is this machine's sysfs, read directly: no pyudev (or libudev)."""
    base = "/sys/bus/pci/devices"
    want = sorted(os.listdir(base)) if os.path.isdir(base) else []
    assert [os.path.basename(p) for p in pci.pci_paths("/")] == want
    code = ("import sys; from guestinit import pci; pci.scan('/'); "
            "print('pyudev' in sys.modules, 'ctypes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["False", "False"]


def test_stand_in_profiles_discover_emulated_devices_as_gpus_and_switches(
        tmp_path: pathlib.Path) -> None:
    gpu = pci.PciDevice("0000:00:01.0", 0x1AF4, 0x1110, 0x050000)
    switch = pci.PciDevice("0000:00:02.0", 0x1234, 0x11E8, 0x00FF00)
    other = pci.PciDevice("0000:00:03.0", 0x1B36, 0x0008, 0x060000)
    profiles = discover.profiles_from((), ["1af4:1110"], ["1234:11e8"])
    found = pci.classify([gpu, switch, other], profiles)
    assert [(a.dev.bdf, a.kind) for a in found] == [("0000:00:01.0", pci.Kind.GPU),
                                                   ("0000:00:02.0", pci.Kind.NVSWITCH)]
    assert nvidia.decide_mode(found) == (Mode.GPU, "nvl4")
    with pytest.raises(ValueError, match=r"stand-in gpu id 'zz:1': expected vendor:device"):
        discover.profiles_from((), ["zz:1"])
    with pytest.raises(ValueError, match=r"stand-in nvswitch id '1:2:3'"):
        discover.profiles_from((), (), ["1:2:3"])
