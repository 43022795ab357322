"""Hot-plug with the real init as PID 1: real kernel uevents, a fake GPU behind them.

The events are the host kernel's own: writing ``add`` or ``remove`` to a PCI device's
``uevent`` file makes the kernel broadcast that uevent (what ``udevadm trigger`` does;
the device itself is untouched), and the init's pyudev monitor receives it in its own
PID and network namespace. The init reads the device named by the event's DEVPATH under
its test root, where the test has laid out an H100 (sysfs) and, as the driver would,
its ``/proc/driver/nvidia/gpus/<bdf>/information``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from guestinit.wire import Frame, FrameType
from tests.fixtures.umockdev_tree import device, materialize
from tests.pidns.harness import NsInit, agent_arg
from tests.pidns.test_accel import AGENT, hgx_root

HOST_PCI = Path("/sys/bus/pci/devices")


def host_devices() -> list[str]:
    """This host's PCI devices on bus 0 other than 00:00.0 (the fixture's host bridge)."""
    names = sorted(p.name for p in HOST_PCI.iterdir()) if HOST_PCI.is_dir() else []
    usable = [n for n in names if n.startswith("0000:00:") and n != "0000:00:00.0"
              and os.access(HOST_PCI / n / "uevent", os.W_OK)]
    if len(usable) < 2:
        pytest.fail(f"the hot-plug test triggers uevents on two of this host's PCI devices "
                    f"on bus 0; {HOST_PCI} has {names}")
    return usable


def trigger(bdf: str, action: str) -> None:
    (HOST_PCI / bdf / "uevent").write_text(f"{action}\n")


def h100_at(root: Path, bdf: str) -> None:
    """An H100 at ``bdf`` in the root's sysfs."""
    materialize(device(bdf, 0x10DE, 0x2330, 0x030200, bars=[(1, 0x14220C, 1 << 30)]), root)


def register(root: Path, bdf: str, minor: int) -> None:
    """What the driver's probe publishes for the GPU."""
    info = root / "proc/driver/nvidia/gpus" / bdf
    info.mkdir(parents=True)
    (info / "information").write_text(
        f"Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t GPU-{minor:08x}-hot0-plug\n"
        f"Bus Location: \t {bdf}\nDevice Minor: \t {minor}\n")


def hotplug_frame(init: NsInit, event: str, bdf: str, timeout: float = 15) -> Frame:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in init.frames:
            if f.get("stage") == "hotplug" and f.get("event") == event and f.get("bdf") == bdf:
                return f
        init.channel.pump(0.2)
    raise AssertionError(f"no hotplug {event} frame for {bdf}; frames "
                         f"{[(f.get('stage'), f.get('event'), f.get('bdf')) for f in init.frames]}"
                         f"\nlog:\n{init.log()}")


def test_hot_add_and_remove_of_a_gpu_from_real_uevents(
    ns_init: type[NsInit], tmp_path: Path
) -> None:
    slow, good = host_devices()[-2:]
    init = ns_init(tmp_path, agent_arg() + AGENT + " guestinit.hotplug=1 "
                   "guestinit.hotplug.timeout=1.5", root_setup=hgx_root())
    init.wait_frame(FrameType.READY, timeout=60)
    root = init.root
    deadline = time.monotonic() + 10
    while "hotplug:monitor" not in str(init.status().get("timeline")):
        assert time.monotonic() < deadline, init.log()
        time.sleep(0.1)

    # a device the driver never registers: refused after hotplug.timeout, naming it
    h100_at(root, slow)
    trigger(slow, "add")
    refused = hotplug_frame(init, "refused", slow)
    assert f"{slow}: its driver did not register it within 1.5s" in str(refused.get("detail"))

    # the driver registers it 0.3 s after the add: assigned once it is there
    h100_at(root, good)
    trigger(good, "add")
    time.sleep(0.3)
    assert good in init.status()["devices"]["pending"]  # type: ignore[index]
    register(root, good, 8)
    frame = hotplug_frame(init, "assign", good)
    assert frame.get("index") == 8 and frame.get("uuid") == "GPU-00000008-hot0-plug"
    assert frame.get("detail") == (f"assign gpu8 {good} GPU-00000008-hot0-plug NVIDIA H100 "
                                   "80GB HBM3 as /dev/nvidia8 (hot-plug)")
    assert isinstance(frame.get("latency_us"), int)
    node = init.inside("dev/nvidia8").stat()
    assert stat.S_ISCHR(node.st_mode) and node.st_rdev == os.makedev(195, 8)
    spec = json.loads((root / "var/run/cdi/nvidia.json").read_text())
    names = {d["name"] for d in spec["devices"]}
    assert {"8", "GPU-00000008-hot0-plug"} <= names and len(names) == 19
    status = init.status()["devices"]
    assert [g["bdf"] for g in status["devices"]][-1] == good  # type: ignore[index]
    assert status["assign"] == 1 and status["refused"] == 1  # type: ignore[index]

    # a storm for a device no profile knows: folded, ignored, the loop keeps answering
    other = host_devices()[0]
    for _ in range(200):
        trigger(other, "add")
    t0 = time.monotonic()
    status = init.status()["devices"]
    assert time.monotonic() - t0 < 2
    deadline = time.monotonic() + 10
    while status["events"] < 202:  # type: ignore[operator]
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
        status = init.status()["devices"]
    assert status["ignored"] >= 1 and status["assign"] == 1, status  # type: ignore[index]

    # removal: the driver lets go, the kernel says remove
    (root / "proc/driver/nvidia/gpus" / good / "information").unlink()
    trigger(good, "remove")
    released = hotplug_frame(init, "release", good)
    assert released.get("detail") == f"release gpu8 {good} GPU-00000008-hot0-plug (hot-unplug)"
    assert not init.inside("dev/nvidia8").exists()
    spec = json.loads((root / "var/run/cdi/nvidia.json").read_text())
    assert "8" not in {d["name"] for d in spec["devices"]}

    init.signal(signal.SIGTERM)
    shutdown = init.wait_frame(FrameType.SHUTDOWN, timeout=30)
    audit = [str(a) for a in shutdown.get("audit")]  # type: ignore[union-attr]
    lifetime = [a for a in audit if a.startswith(("assign ", "release "))]
    assert lifetime[:8] == [a for a in lifetime if a.startswith("assign gpu")][:8]
    assert f"assign gpu8 {good} GPU-00000008-hot0-plug NVIDIA H100 80GB HBM3 as " \
        "/dev/nvidia8 (hot-plug)" in lifetime
    assert f"release gpu8 {good} GPU-00000008-hot0-plug (hot-unplug)" in lifetime
    assert sum(a.startswith("release gpu") for a in lifetime) == 9  # 8 at shutdown
    assert init.errors == []
