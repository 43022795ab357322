"""Device-node plans and their application (real mknod in a tmp root, and the recording fake):
GPUs, uvm (uvm-tools only with ``uvm.tools``), NVSwitches, MIG caps with the driver's modes,
IMEX channels."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

import guestinit.__main__ as boot_script
from guestinit import discover
from guestinit.boot import Boot
from guestinit.effects import DryEffects, Effects
from guestinit.nvidia import devices, mig
from guestinit.stages import BootError
from guestinit.values import Mode
from tests.fixtures.accel import (
    CAPS_MAJOR,
    IMEX_MAJOR,
    MIG_LAYOUT,
    SWITCH_MAJOR,
    UVM_MAJOR,
    cap_minor,
    fake_nvidia_proc,
    gpu_bdfs,
    kmsg_text,
    make_boot,
)
from tests.fixtures.umockdev_tree import load, materialize


def gpu_boot(root: pathlib.Path, topology: str, registered: int, conf: str = "",
             effects: Effects | None = None, caps: bool = False, imex: int = 0) -> Boot:
    materialize(load(topology), root)
    fake_nvidia_proc(root, gpu_bdfs(registered), caps=caps, imex=imex)
    (root / "dev").mkdir(exist_ok=True)
    boot = make_boot(root, conf=conf, effects=effects)
    discover.run_discover(boot)
    boot.facts.modules = ["nvidia", "nvidia_uvm"]
    return boot


def test_proc_devices_and_information_parsers() -> None:
    majors = devices.parse_proc_devices(
        "Character devices:\n195 nvidia-frontend\n237 nvidia-uvm\n\nBlock devices:\n237 zz\n")
    assert majors == {"nvidia-frontend": 195, "nvidia-uvm": 237}
    info = devices.parse_information("Model: \t\t NVIDIA H100\nBus Location: \t 0000:18:00.0\n"
                                     "Device Minor: \t 3\n")
    assert info == {"Model": "NVIDIA H100", "Bus Location": "0000:18:00.0", "Device Minor": "3"}


def test_plan_for_eight_gpus_with_switches_and_mig(tmp_path: pathlib.Path) -> None:
    fake_nvidia_proc(tmp_path, gpu_bdfs(8), caps=True)
    gpus = devices.read_gpus(str(tmp_path))
    nodes = devices.plan_nodes(str(tmp_path), Mode.GPU, gpus, 4, 0o660, 44,
                               caps=mig.read_caps(str(tmp_path)))
    table = {n.path: (n.major, n.minor, n.mode, n.gid) for n in nodes}
    assert table["nvidiactl"] == (195, 255, 0o660, 44)
    assert [table[f"nvidia{i}"][:2] for i in range(8)] == [(195, i) for i in range(8)]
    assert table["nvidia-uvm"][:2] == (UVM_MAJOR, 0)
    assert "nvidia-uvm-tools" not in table  # uvm.tools is off by default, as in NVRC
    assert table["nvidia-nvswitchctl"][:2] == (SWITCH_MAJOR, 255)
    assert table["nvidia-nvswitch3"][:2] == (SWITCH_MAJOR, 3)
    # the caps keep the driver's modes (config 0400, monitor and access 0444) and group 0
    caps = {minor: mode_gid for (major, minor, *mode_gid) in
            (table[p] for p in table if p.startswith("nvidia-caps/"))}
    assert caps == {1: [0o400, 0], 2: [0o444, 0],
                    **{cap_minor(0, gi): [0o444, 0] for gi in MIG_LAYOUT},
                    **{cap_minor(0, gi, ci): [0o444, 0]
                       for gi, cis in MIG_LAYOUT.items() for ci in cis}}
    assert all(table[p][0] == CAPS_MAJOR for p in table if p.startswith("nvidia-caps/"))
    # of the 8 x 15 x 9 + 2 minors mig-minors lists, only what exists: 2 + 3 GIs + 2 CIs
    assert len(caps) == 7 and not any(p.startswith("nvidia-caps-imex") for p in table)


def test_uvm_tools_only_when_asked(tmp_path: pathlib.Path) -> None:
    fake_nvidia_proc(tmp_path, [])
    nodes = devices.plan_nodes(str(tmp_path), Mode.GPU, [], 0, 0o666, 0, uvm_tools=True)
    assert [(n.path, n.major, n.minor) for n in nodes if n.path.startswith("nvidia-uvm")] == [
        ("nvidia-uvm", UVM_MAJOR, 0), ("nvidia-uvm-tools", UVM_MAJOR, 1)]


def imex_nodes(nodes: list[devices.Node]) -> list[tuple[str, int, int, int, int]]:
    return [(n.path, n.major, n.minor, n.mode, n.gid) for n in nodes
            if n.path.startswith("nvidia-caps-imex-channels/")]


def test_imex_channels_as_asked_within_the_driver_params(tmp_path: pathlib.Path) -> None:
    fake_nvidia_proc(tmp_path, [], imex=3)
    # none unless asked: the real driver's ImexChannelCount defaults to 2048
    assert imex_nodes(devices.plan_nodes(str(tmp_path), Mode.GPU, [], 0, 0o660, 44)) == []
    nodes = devices.plan_nodes(str(tmp_path), Mode.GPU, [], 0, 0o660, 44, imex_channels=2)
    assert imex_nodes(nodes) == [
        (f"nvidia-caps-imex-channels/channel{i}", IMEX_MAJOR, i, 0o660, 44) for i in range(2)]
    with pytest.raises(ValueError, match=r"imex.channels=4, but the driver has 3 IMEX channels"):
        devices.plan_nodes(str(tmp_path), Mode.GPU, [], 0, 0o660, 44, imex_channels=4)
    assert devices.imex_channel_count(str(tmp_path)) == 3
    (tmp_path / "proc/driver/nvidia/params").write_text("ResmanDebugLevel: 4294967295\n")
    assert devices.imex_channel_count(str(tmp_path)) == 0  # no such param: no channels
    (tmp_path / "proc/driver/nvidia/params").unlink()
    assert devices.imex_channel_count(str(tmp_path)) == 0


def test_service_vm_has_no_uvm_and_cpu_mode_has_nothing(tmp_path: pathlib.Path) -> None:
    fake_nvidia_proc(tmp_path, [])
    nodes = devices.plan_nodes(str(tmp_path), Mode.NVL4, [], 4, 0o666, 0)
    assert {n.path for n in nodes} == {"nvidiactl", "nvidia-nvswitchctl",
                                       *(f"nvidia-nvswitch{i}" for i in range(4))}
    assert devices.plan_nodes(str(tmp_path), Mode.CPU, [], 0, 0o666, 0) == []


def test_uvm_major_missing_is_named(tmp_path: pathlib.Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/devices").write_text("Character devices:\n195 nvidia-frontend\n")
    with pytest.raises(ValueError, match="nvidia-uvm has no major in /proc/devices"):
        devices.plan_nodes(str(tmp_path), Mode.GPU, [], 0, 0o666, 0)


def test_run_devices_creates_real_nodes_idempotently(tmp_path: pathlib.Path) -> None:
    boot = gpu_boot(tmp_path, "h100x1", 1, conf="device.mode=0660\ndevice.gid=44\n"
                    "imex.channels=2", effects=Effects(), imex=2)
    old = os.umask(0o077)  # mknod's mode is cut by the umask; the stage must not care
    try:
        devices.run_devices(boot)
    finally:
        os.umask(old)
    st = os.stat(tmp_path / "dev/nvidia0")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 195 and os.minor(st.st_rdev) == 0
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 44
    uvm = os.stat(tmp_path / "dev/nvidia-uvm")
    assert (os.major(uvm.st_rdev), os.minor(uvm.st_rdev)) == (UVM_MAJOR, 0)
    assert not (tmp_path / "dev/nvidia-uvm-tools").exists()
    channel = os.stat(tmp_path / "dev/nvidia-caps-imex-channels/channel1")
    assert stat.S_ISCHR(channel.st_mode) and channel.st_rdev == os.makedev(IMEX_MAJOR, 1)
    assert stat.S_IMODE(channel.st_mode) == 0o660 and channel.st_gid == 44
    gpus = [g.to_map() for g in boot.facts.gpus]
    assert gpus == [{"index": 0, "bdf": "0000:18:00.0",
                     "uuid": "GPU-00000000-1111-2222-3333-444455556666",
                     "model": "NVIDIA H100 80GB HBM3", "minor": 0,
                     "node": {"path": "/dev/nvidia0", "major": 195, "minor": 0, "mode": 0o660}}]
    nodes = boot.facts.device_nodes
    assert [n["path"] for n in nodes["control"]] == ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert [n["minor"] for n in nodes["imex"]] == [0, 1]
    assert any("assign gpu0 0000:18:00.0 GPU-00000000" in a for a in boot.audit)
    before = sorted(os.listdir(tmp_path / "dev"))
    os.chmod(tmp_path / "dev/nvidiactl", 0o600)
    devices.run_devices(boot)
    assert sorted(os.listdir(tmp_path / "dev")) == before
    assert stat.S_IMODE(os.stat(tmp_path / "dev/nvidiactl").st_mode) == 0o660
    assert "devices: 5 nodes (0 created)" in kmsg_text(tmp_path)
    assert devices.audit_teardown(boot)[0].startswith("release gpu0 0000:18:00.0")


def test_recorded_effects_for_mig_caps(tmp_path: pathlib.Path) -> None:
    boot = gpu_boot(tmp_path, "h100x1", 1, conf="device.gid=44", caps=True)
    devices.run_devices(boot)
    assert isinstance(boot.effects, DryEffects)
    calls = boot.effects.calls
    cap = str(tmp_path / "dev/nvidia-caps/nvidia-cap{}").format
    assert ("makedirs", str(tmp_path / "dev/nvidia-caps"), 0o755) in calls
    assert ("mknod", cap(1), stat.S_IFCHR | 0o400, CAPS_MAJOR, 1) in calls  # config
    assert ("chown_chmod", cap(1), 0o400, 0, 0) in calls  # group 0, not device.gid
    assert ("mknod", cap(2), stat.S_IFCHR | 0o444, CAPS_MAJOR, 2) in calls  # monitor
    gi1, ci0 = cap_minor(0, 1), cap_minor(0, 1, 0)
    assert ("mknod", cap(ci0), stat.S_IFCHR | 0o444, CAPS_MAJOR, ci0) in calls
    made = [c[1] for c in calls if c[0] == "mknod" and "nvidia-caps/" in str(c[1])]
    assert len(made) == 7 and cap(cap_minor(0, 0)) not in made  # gi0 does not exist
    gpu = boot.facts.gpus[0]
    assert [(m["gi"], [n["minor"] for n in m["nodes"]]) for m in gpu.mig] == [  # type: ignore[attr-defined]
        (1, [gi1, ci0]), (2, [cap_minor(0, 2), cap_minor(0, 2, 0)])]  # gi3 has no CI
    assert {n["mode"] for m in gpu.mig for n in m["nodes"]} == {0o444}  # type: ignore[attr-defined]


def test_uvm_tools_setting_creates_the_node(tmp_path: pathlib.Path) -> None:
    boot = gpu_boot(tmp_path, "h100x1", 1, conf="uvm.tools=1")
    devices.run_devices(boot)
    assert isinstance(boot.effects, DryEffects)
    tools = str(tmp_path / "dev/nvidia-uvm-tools")
    assert ("mknod", tools, stat.S_IFCHR | 0o666, UVM_MAJOR, 1) in boot.effects.calls
    control = boot.facts.device_nodes["control"]
    assert [n["path"] for n in control] == [
        "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]


def test_a_gpu_the_driver_did_not_register_fails_naming_it(tmp_path: pathlib.Path) -> None:
    boot = gpu_boot(tmp_path, "h100x8_nvswitch4", 7)
    with pytest.raises(BootError) as err:
        devices.run_devices(boot)
    assert err.value.stage == "devices"
    assert "registered 7 of 8 GPUs; missing 0000:1f:00.0" in err.value.reason


def test_wrong_existing_file_is_an_error(tmp_path: pathlib.Path) -> None:
    boot = gpu_boot(tmp_path, "h100x1", 1, effects=DryEffects())
    (tmp_path / "dev/nvidiactl").write_text("not a device")
    with pytest.raises(BootError, match=r"create .*/dev/nvidiactl: a different file is there"):
        devices.run_devices(boot)


def test_cpu_mode_is_a_no_op(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tmp_path)
    boot_script.run_devices(boot)  # the boot script's gate: no NVIDIA work in cpu mode
    assert isinstance(boot.effects, DryEffects) and boot.effects.calls == []


def test_gpu_index_is_pci_bus_order_whatever_the_minor_numbers(tmp_path: pathlib.Path) -> None:
    """Kata annotates a cold-plugged GPU with nvidia.com/gpu=<its rank in bus order>
    (container.go annotateContainerWithVFIOMetadata); the driver's minors may differ."""
    from guestinit.nvidia import cdi

    materialize(load("h100x8_nvswitch4"), tmp_path)
    bdfs = gpu_bdfs(8)
    fake_nvidia_proc(tmp_path, [*reversed(bdfs[:2]), *bdfs[2:]])  # minor 0 on bus 0x19
    (tmp_path / "dev").mkdir(exist_ok=True)
    boot = make_boot(tmp_path, effects=DryEffects())
    discover.run_discover(boot)
    boot.facts.modules = ["nvidia", "nvidia_uvm"]
    devices.run_devices(boot)
    gpus = [g.to_map() for g in boot.facts.gpus]
    assert [(g["index"], g["bdf"], g["minor"]) for g in gpus[:3]] == [
        (0, "0000:18:00.0", 1), (1, "0000:19:00.0", 0), (2, "0000:1a:00.0", 2)]
    spec = cdi.plan_spec(gpus, [])
    by_name = {d["name"]: d for d in spec["devices"]}  # type: ignore[union-attr, index]
    node = by_name["0"]["containerEdits"]["deviceNodes"][0]  # type: ignore[index]
    assert node["path"] == "/dev/nvidia1"  # nvidia.com/gpu=0 is the GPU on the lowest bus
    assert boot.audit[0].startswith("assign gpu0 0000:18:00.0 ") and boot.audit[0].endswith(
        "as /dev/nvidia1")
