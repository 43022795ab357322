"""Hot-plug logic: uevents -> queue -> plan -> work. The events are the ones a VM's kernel
sent for a hot-plugged stand-in GPU (tests/fixtures/uevents.json, recorded with
guestinit.log=debug) and, for the other cases, maps spelled as the kernel's pci_uevent
spells them.

The monitor is a stand-in that hands out recorded uevent property maps; the handler is
the real ``GpuHandler`` over a tmp root (umockdev fixture as sysfs, the fake driver's
procfs, nodes through the recording effects), so assignments, releases, the CDI spec and
the frames are the real ones.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestinit import discover, hotplug, uevents
from guestinit.boot import Boot
from guestinit.nvidia import cdi, devices
from guestinit.nvidia.hotplug import GpuHandler
from tests.fixtures.accel import fake_nvidia_proc, frames, gpu_bdfs, make_boot
from tests.fixtures.umockdev_tree import device, load, materialize

HOT = "0000:40:00.0"


def uevent(action: str, bdf: str = HOT, seq: int = 1, driver: str = "") -> dict[str, str]:
    """A PCI uevent's properties (drivers/pci/pci-driver.c pci_uevent, plus the core's)."""
    props = {"ACTION": action, "DEVPATH": f"/devices/pci0000:{bdf[5:7]}/{bdf}", "SUBSYSTEM": "pci",
             "PCI_CLASS": "30200", "PCI_ID": "10DE:2330", "PCI_SUBSYS_ID": "10DE:16C1",
             "PCI_SLOT_NAME": bdf, "MODALIAS": "pci:v000010DEd00002330sv000010DEsd000016C1"
             "bc03sc02i00", "SEQNUM": str(seq)}
    if driver:
        props["DRIVER"] = driver
    return props


class FakeMonitor:
    """``uevents.Monitor``'s interface over recorded events."""

    def __init__(self) -> None:
        self.waiting: list[dict[str, str]] = []
        self.lost = 0
        self.drop = 0  # events the next receive() loses (the socket buffer overflowed)
        self.closed = False

    def fileno(self) -> int:
        return -1

    def receive(self) -> list[dict[str, str]]:
        self.lost, self.drop = self.lost + self.drop, 0
        out, self.waiting = self.waiting[:uevents.MAX_BATCH], self.waiting[uevents.MAX_BATCH:]
        return out

    def close(self) -> None:
        self.closed = True


def gpu_root(root: pathlib.Path) -> Boot:
    """Two GPUs booted (gpu0, gpu1), their nodes and spec; a third H100 appears later."""
    materialize(load("h100x1"), root)
    materialize(device("0000:19:00.0", 0x10DE, 0x2330, 0x030200), root)
    fake_nvidia_proc(root, gpu_bdfs(2))
    for name in ("nvidia", "nvidia_uvm"):
        (root / "sys/module" / name).mkdir(parents=True)
    (root / "dev").mkdir(exist_ok=True)
    boot = make_boot(root, conf="hotplug = true\nhotplug.timeout = 5\n")
    discover.run_discover(boot)
    devices.run_devices(boot)
    cdi.run_cdi(boot)
    return boot


def plug(root: pathlib.Path, minor: int | None = 2) -> None:
    materialize(device(HOT, 0x10DE, 0x2330, 0x030200), root)
    if minor is not None:
        register(root, minor)


def register(root: pathlib.Path, minor: int) -> None:
    info = root / "proc/driver/nvidia/gpus" / HOT
    info.mkdir(parents=True)
    (info / "information").write_text(f"Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t "
                                      f"GPU-hot-{minor}\nDevice Minor: \t {minor}\n")


def service(boot: Boot) -> tuple[hotplug.Hotplug, FakeMonitor]:
    mon = FakeMonitor()
    return hotplug.Hotplug(boot, GpuHandler(boot), mon, timeout=5.0), mon  # type: ignore[arg-type]


def hot_frames(boot: Boot) -> list[dict[str, object]]:
    return [f for f in frames(boot) if f.get("stage") == "hotplug"]


def spec_names(root: pathlib.Path) -> list[str]:
    spec = json.loads((root / cdi.SPEC_PATH).read_text())
    return [d["name"] for d in spec["devices"]]


def test_add_then_remove_assigns_and_releases_the_gpu(tmp_path: pathlib.Path) -> None:
    boot = gpu_root(tmp_path)
    hp, mon = service(boot)
    plug(tmp_path)
    mon.waiting = [uevent("add", seq=10), uevent("bind", seq=11, driver="nvidia")]
    hp.on_readable()
    (assign,) = hot_frames(boot)
    assert assign["event"] == "assign" and assign["bdf"] == HOT and assign["index"] == 2
    assert assign["detail"] == f"assign gpu2 {HOT} GPU-hot-2 NVIDIA H100 80GB HBM3 as " \
        "/dev/nvidia2 (hot-plug)"
    assert isinstance(assign["latency_us"], int) and assign["fds"] > 0  # type: ignore[operator]
    calls = boot.effects.calls  # type: ignore[attr-defined]
    assert ("mknod", str(tmp_path / "dev/nvidia2"), 0o20666, 195, 2) in calls
    assert spec_names(tmp_path) == ["0", "GPU-00000000-1111-2222-3333-444455556666", "1",
                                    "GPU-00000001-1111-2222-3333-444455556666", "2",
                                    "GPU-hot-2", "all"]
    assert hp.queue.coalesced == 1  # the bind folded into the queued add
    assert HOT in [a.dev.bdf for a in boot.facts.inventory]  # as accepts() read it
    assert [g["bdf"] for g in hp.status()["devices"]] == [  # type: ignore[union-attr]
        "0000:18:00.0", "0000:19:00.0", HOT]

    mon.waiting = [uevent("remove", seq=12)]
    hp.on_readable()
    release = hot_frames(boot)[-1]
    assert release["event"] == "release"
    assert release["detail"] == f"release gpu2 {HOT} GPU-hot-2 (hot-unplug)"
    assert spec_names(tmp_path)[-1] == "all" and "2" not in spec_names(tmp_path)
    assert boot.device_history()[-2:] == [str(assign["detail"]), str(release["detail"])]
    assert HOT not in [a.dev.bdf for a in boot.facts.inventory]
    assert hp.status()["assign"] == 1 and hp.status()["release"] == 1


def pending_add(tmp_path: pathlib.Path) -> tuple[Boot, hotplug.Hotplug, FakeMonitor]:
    """A GPU added whose driver has not registered it yet."""
    boot = gpu_root(tmp_path)
    hp, mon = service(boot)
    plug(tmp_path, minor=None)
    mon.waiting = [uevent("add")]
    hp.on_readable()
    return boot, hp, mon


def test_an_add_waits_for_the_driver_then_is_served_on_a_tick(tmp_path: pathlib.Path) -> None:
    boot, hp, _ = pending_add(tmp_path)
    assert hot_frames(boot) == [] and list(hp.pending) == [HOT]
    assert hp.tick() == hotplug.POLL_WHILE_PENDING
    register(tmp_path, 3)  # the driver's probe gave it minor 3 (the lowest free one there)
    assert hp.tick() is None
    (assign,) = hot_frames(boot)
    assert assign["index"] == 2 and str(assign["detail"]).endswith("as /dev/nvidia3 (hot-plug)")


def test_a_driver_that_never_registers_the_gpu_refuses_it_after_the_timeout(
        tmp_path: pathlib.Path) -> None:
    boot = gpu_root(tmp_path)
    hp, mon = service(boot)
    hp.timeout = 0.0
    plug(tmp_path, minor=None)
    mon.waiting = [uevent("add")]
    hp.on_readable()
    hp.tick()
    (refused,) = hot_frames(boot)
    assert refused["event"] == "refused"
    assert str(refused["detail"]).startswith(f"{HOT}: its driver did not register it within 0s")
    assert hp.pending == {} and HOT not in {g.bdf for g in boot.facts.gpus}


def test_a_remove_during_the_add_cancels_it(tmp_path: pathlib.Path) -> None:
    boot, hp, mon = pending_add(tmp_path)
    mon.waiting = [uevent("remove")]
    hp.on_readable()
    (cancelled,) = hot_frames(boot)
    assert cancelled["event"] == "cancelled" and hp.pending == {}
    register(tmp_path, 2)
    assert hp.tick() is None and len(hot_frames(boot)) == 1  # nothing served afterwards


def test_unknown_devices_and_non_gpus_are_ignored(tmp_path: pathlib.Path) -> None:
    boot = gpu_root(tmp_path)
    hp, mon = service(boot)
    materialize(device("0000:41:00.0", 0x10EE, 0x903F, 0x120000), tmp_path)  # an FPGA
    materialize(device("0000:42:00.0", 0x10DE, 0x22A3, 0x068000), tmp_path)  # an NVSwitch
    mon.waiting = [uevent("add", "0000:41:00.0"), uevent("add", "0000:42:00.0"),
                   uevent("add", "0000:43:00.0")]  # gone from sysfs already
    hp.on_readable()
    assert hot_frames(boot) == [] and hp.counts["ignored"] == 3
    log = (tmp_path / "kmsg.log").read_text()
    assert "add 0000:41:00.0 ignored: 0000:41:00.0 [10ee:903f] class 120000 matches no " \
        "accelerator profile" in log
    assert "is a nvswitch: only GPUs are hot-plugged" in log
    assert "add 0000:43:00.0 ignored: not readable in sysfs" in log


def test_a_locked_guest_without_the_driver_refuses_naming_the_setting(
        tmp_path: pathlib.Path) -> None:
    materialize(load("empty"), tmp_path)
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/modules_disabled").write_text("1\n")
    boot = make_boot(tmp_path, conf="hotplug = true\n")
    discover.run_discover(boot)
    hp, mon = service(boot)
    plug(tmp_path, minor=None)
    mon.waiting = [uevent("add")]
    hp.on_readable()
    (refused,) = hot_frames(boot)
    assert refused["event"] == "refused"
    assert "the nvidia driver is not loaded and module loading is locked" in \
        str(refused["detail"]) and "guestinit.lockdown=false" in str(refused["detail"])


def test_the_last_gpu_removed_removes_the_spec(tmp_path: pathlib.Path) -> None:
    materialize(load("empty"), tmp_path)
    fake_nvidia_proc(tmp_path, [])
    for name in ("nvidia", "nvidia_uvm"):
        (tmp_path / "sys/module" / name).mkdir(parents=True)
    boot = make_boot(tmp_path, conf="hotplug = true\n")
    discover.run_discover(boot)  # cpu mode: no GPU at boot
    hp, mon = service(boot)
    plug(tmp_path, minor=0)
    mon.waiting = [uevent("add")]
    hp.on_readable()
    assert spec_names(tmp_path) == ["0", "GPU-hot-0", "all"]
    assert boot.facts.device_nodes["control"][0]["path"] == "/dev/nvidiactl"
    mon.waiting = [uevent("remove")]
    hp.on_readable()
    assert not (tmp_path / cdi.SPEC_PATH).exists()
    assert [f["event"] for f in hot_frames(boot)] == ["assign", "release"]


def test_lost_events_rescan_sysfs(tmp_path: pathlib.Path) -> None:
    boot = gpu_root(tmp_path)
    hp, mon = service(boot)
    plug(tmp_path)
    mon.drop = 1  # the socket overflowed: the add itself was lost
    hp.on_readable()
    (assign,) = hot_frames(boot)
    assert assign["event"] == "assign" and hp.counts["rescans"] == 1
    assert "hotplug: uevents lost (queue 0, socket 1); rescanning sysfs" in \
        (tmp_path / "kmsg.log").read_text()


def test_a_spec_write_that_fails_leaves_the_old_spec_whole(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "nvidia.json"
    cdi.write_spec(str(path), {"cdiVersion": "0.5.0", "kind": cdi.KIND, "devices": []})
    before = path.read_text()

    def half(tmp: str, text: str) -> None:  # the disk fills up halfway through the write
        pathlib.Path(tmp).write_text(text[:len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cdi, "write_text", half)
    with pytest.raises(OSError, match="No space"):
        cdi.write_spec(str(path), {"cdiVersion": "0.6.0"})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nvidia.json"]  # no tmp left


ACTIONS = st.sampled_from(["add", "remove", "bind", "change", "unbind"])
KEYS = st.sampled_from(["0000:01:00.0", "0000:02:00.0", "0000:03:00.0"])


@given(st.lists(st.tuples(ACTIONS, KEYS), max_size=200), st.integers(1, 3))
def test_the_queue_holds_one_entry_per_device_with_its_last_presence(
        events: list[tuple[str, str]], limit: int) -> None:
    queue = uevents.EventQueue(limit)
    for action, key in events:
        queue.push(uevents.Event({"ACTION": action, "PCI_SLOT_NAME": key}))
    assert len(queue) <= limit
    taken = list(queue.take())
    assert len(queue) == 0 and queue.received == len(events)
    kept = {p.event.key: p for p in taken}
    for key, item in kept.items():
        mine = [a for a, k in events if k == key and a in ("add", "remove", "bind")]
        presence = [a for a in mine if a in uevents.PRESENCE]
        assert item.removed == ("remove" in mine)
        assert item.event.action == (presence[-1] if presence else "bind")
    acted = [k for a, k in events if a in ("add", "remove", "bind")]
    assert len(kept) + queue.overflowed + queue.coalesced == len(acted)


def test_the_monitor_names_a_missing_libudev(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uevents, "LIBUDEV", "libudev-not-here.so.9")
    with pytest.raises(OSError, match=r"libudev-not-here\.so\.9 did not load"):
        uevents.Monitor("pci")


def test_the_monitor_receives_a_real_kernel_uevent() -> None:
    """A synthetic ``change`` written to a PCI device's uevent file comes back through the
    netlink monitor with the kernel's properties (this host's first PCI device)."""
    import os
    import select

    devices_dir = pathlib.Path("/sys/bus/pci/devices")
    names = sorted(os.listdir(devices_dir))
    assert names, "this test needs a PCI device to send a uevent for"
    mon = uevents.Monitor("pci")
    try:
        (devices_dir / names[-1] / "uevent").write_text("change\n")
        got: list[dict[str, str]] = []
        while not any(e.get("PCI_SLOT_NAME") == names[-1] for e in got):
            assert select.select([mon.fileno()], [], [], 5)[0], "no uevent within 5 s"
            got += mon.receive()
    finally:
        mon.close()
    event = uevents.Event(next(e for e in got if e.get("PCI_SLOT_NAME") == names[-1]))
    assert event.action == "change" and event.subsystem == "pci" and event.key == names[-1]
    assert event.seqnum > 0 and event.devpath.endswith(names[-1])


def test_a_bug_in_the_handler_is_reported_and_the_loop_goes_on(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boot = gpu_root(tmp_path)
    hp, mon = service(boot)
    plug(tmp_path)

    def broken(self: GpuHandler, key: str) -> dict[str, object] | None:
        raise KeyError(key)

    monkeypatch.setattr(GpuHandler, "assign", broken)
    mon.waiting = [uevent("add")]
    hp.on_readable()  # no exception reaches PID 1's loop
    (warning,) = hot_frames(boot)
    assert warning["event"] == "warning"
    assert warning["detail"] == f"internal error: KeyError: '{HOT}'"
    assert hp.pending == {} and hp.tick() is None  # not retried (and reported) every tick


def test_a_monitor_that_cannot_start_leaves_the_vm_running_without_hot_plug(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from guestinit.nvidia import hotplug as nvidia_hotplug
    from guestinit.pid1 import Init

    boot = gpu_root(tmp_path)

    def broken(boot: Boot) -> None:
        raise RuntimeError("no netlink here")

    monkeypatch.setattr(nvidia_hotplug, "start", broken)
    init = Init(boot)
    assert init._start_hotplug() is None
    (warning,) = hot_frames(boot)
    assert warning["event"] == "warning"
    assert str(warning["detail"]).startswith("not started: RuntimeError: no netlink here")
    assert init.status()["devices"] == {"devices": [g.to_map() for g in boot.facts.gpus]}


def test_the_uevents_recorded_in_a_vm_assign_then_release_the_stand_in_gpu(
        tmp_path: pathlib.Path) -> None:
    """The add, bind, unbind and remove the VM's kernel sent for a hot-plugged stand-in
    GPU (tests/fixtures/uevents.json), replayed against the same device in a test root."""
    recorded = json.loads((pathlib.Path(__file__).parents[2] / "fixtures/uevents.json")
                          .read_text())["events"]
    assert [e["ACTION"] for e in recorded] == ["add", "bind", "unbind", "remove"]
    bdf, devpath = recorded[0]["PCI_SLOT_NAME"], recorded[0]["DEVPATH"]
    text = device(bdf, 0x1AF4, 0x1110, 0x050000).replace(
        f"P: /devices/pci0000:01/{bdf}", f"P: {devpath}")
    materialize(load("empty") + text, tmp_path)
    fake_nvidia_proc(tmp_path, [])
    for name in ("nvidia", "nvidia_uvm"):
        (tmp_path / "sys/module" / name).mkdir(parents=True)
    boot = make_boot(tmp_path, conf="hotplug = true\nstandin.gpu = 1af4:1110\n")
    discover.run_discover(boot)
    hp, mon = service(boot)
    mon.waiting = recorded[:1]
    hp.on_readable()
    assert list(hp.pending) == [bdf]  # the driver has not probed it yet
    info = tmp_path / "proc/driver/nvidia/gpus" / bdf
    info.mkdir(parents=True)
    (info / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3 (stand-in)\n"
                                      "GPU UUID: \t GPU-00000001-5354-414e-4449-4e0000000000\n"
                                      f"Bus Location: \t {bdf}\nDevice Minor: \t 1\n")
    mon.waiting = recorded[1:2]  # bind: looked at again at once
    hp.on_readable()
    mon.waiting = recorded[2:]
    hp.on_readable()
    assert [(f["event"], f["detail"]) for f in hot_frames(boot)] == [
        ("assign", f"assign gpu0 {bdf} GPU-00000001-5354-414e-4449-4e0000000000 NVIDIA H100 "
                   "80GB HBM3 (stand-in) as /dev/nvidia1 (hot-plug)"),
        ("release", f"release gpu0 {bdf} GPU-00000001-5354-414e-4449-4e0000000000 "
                    "(hot-unplug)")]
