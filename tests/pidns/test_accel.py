"""Accelerator bring-up with the real init as PID 1 over a fake 8-GPU HGX board.

The root carries the umockdev fixture as its /sys (so sysfs is not mounted over
it), the procfs a loaded NVIDIA driver shows (/proc/devices, per-GPU
information, a modules_disabled file), the NVIDIA modules as already present in
/sys/module (the host kernel must not be asked to load anything), and the fake
driver bundle in /usr/bin.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

from guestinit.testing import nvidia_bundle
from guestinit.wire import FrameType
from tests.fixtures.accel import UVM_MAJOR, fake_nvidia_proc, gpu_bdfs
from tests.fixtures.umockdev_tree import load, materialize
from tests.pidns.harness import NsInit, agent_arg

# raising RLIMIT_NOFILE or lowering oom_score_adj needs CAP_SYS_RESOURCE, which a test
# container may lack; the agent's limits are not what is tested here
AGENT = " guestinit.agent.nofile=1024 guestinit.agent.oom_score_adj=0"


def hgx_root(behaviour: dict[str, str] | None = None) -> object:
    def setup(root: Path) -> None:
        materialize(load("h100x8_nvswitch4"), root)
        for name in ("nvidia", "nvidia_uvm"):
            (root / "sys/module" / name).mkdir(parents=True)
        fake_nvidia_proc(root, gpu_bdfs(8))
        (root / "proc/sys/kernel").mkdir(parents=True)
        (root / "proc/sys/kernel/modules_disabled").write_text("0\n")
        (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n"
                                         "nvidia-persistenced:x:120:130::/:/usr/sbin/nologin\n")
        nvidia_bundle.install(root, behaviour={"gpu_delay": "0.05", **(behaviour or {})})

    return setup


def test_gpu_mode_on_eight_gpus_reaches_ready_with_daemons_supervised(
    ns_init: type[NsInit], tmp_path: Path
) -> None:
    init = ns_init(tmp_path, agent_arg() + " guestinit.smi.lgc=1500,1980 nvrc.smi.srs=1" + AGENT,
                   root_setup=hgx_root(), lockdown=True)
    ready = init.wait_frame(FrameType.READY, timeout=60)
    root = init.root
    assert ready.get("mode") == "gpu"
    inventory = ready.get("inventory")
    assert isinstance(inventory, dict)
    kinds = [d["kind"] for d in inventory["devices"]]
    assert kinds.count("gpu") == 8 and kinds.count("nvswitch") == 4
    assert ready.get("modules") == ["nvidia (already loaded)", "nvidia_uvm (already loaded)"]
    daemons = {d["name"]: d for d in ready.get("daemons")}  # type: ignore[union-attr]
    for name in ("nvidia-persistenced", "nv-fabricmanager", "agent"):
        assert daemons[name]["running"], daemons
    stages = [name for name, _, _ in ready.timeline()]
    assert "daemon:nvidia-persistenced" in stages and "smi:lgc" in stages
    assert "smi:srs" in stages and "discover:pci" in stages
    # life while persistenced attached the GPUs: one progress frame per GPU
    per_gpu = [f.get("detail") for f in init.frames
               if f.type == FrameType.PROGRESS and f.get("event") == "gpu"]
    assert per_gpu[-1] == f"nvidia-persistenced: 8/8 GPUs attached (last {gpu_bdfs(8)[-1]})"
    assert len(per_gpu) == 8
    # device nodes, CDI spec, lockdown
    # /dev is the init's private tmpfs: look at it through its mount namespace
    dev = Path(f"/proc/{init.init_pid()}/root{root}/dev")
    for minor in range(8):
        st = (dev / f"nvidia{minor}").stat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(195, minor)
    assert (dev / "nvidia-uvm").stat().st_rdev == os.makedev(UVM_MAJOR, 0)
    assert (dev / "nvidia-nvswitch3").exists()
    spec = json.loads((root / "var/run/cdi/nvidia.json").read_text())
    # device "0" starts with a digit (0.5.0); no device.gid, so no additionalGids (0.7.0)
    assert spec["cdiVersion"] == "0.5.0" and len(spec["devices"]) == 17
    assert (root / "proc/sys/kernel/modules_disabled").read_text().startswith("1")
    calls = nvidia_bundle.calls(root)
    assert calls[:2] == [  # NVRC's order: the fabric, then persistenced
        "nv-fabricmanager -c /run/nvidia-fabricmanager/fabricmanager.cfg",
        "nvidia-persistenced --foreground --verbose --uvm-persistence-mode "
        "--user nvidia-persistenced"]
    assert "nvidia-smi -lgc 1500,1980" in calls and "nvidia-smi conf-compute -srs 1" in calls
    assert init.errors == []


def test_persistenced_without_its_marker_fails_naming_the_daemon(
    ns_init: type[NsInit], tmp_path: Path
) -> None:
    init = ns_init(tmp_path, agent_arg() + " guestinit.daemon.timeout=2" + AGENT,
                   root_setup=hgx_root({"persistenced": "hang"}))
    failed = init.wait_frame(FrameType.FAILED, timeout=60)
    assert failed.get("stage") == "daemons"
    reason = str(failed.get("reason"))
    assert reason.startswith("nvidia-persistenced not ready after 2s (daemon.timeout; no "
                             "'Local RPC services initialized' on syslog")
    progress = [f for f in init.frames if f.type == FrameType.PROGRESS and f.get("event") == "gpu"]
    assert len(progress) == 8  # it attached every GPU, then never said it was ready
    stages = [name for name, _, _ in failed.timeline()]
    assert "agent" not in stages and "ready" not in stages
    assert init.errors == []


def test_sigterm_while_waiting_for_a_daemon_shuts_down_at_once(
    ns_init: type[NsInit], tmp_path: Path
) -> None:
    init = ns_init(tmp_path, agent_arg() + " guestinit.daemon.timeout=300" + AGENT,
                   root_setup=hgx_root({"persistenced": "hang"}))
    init.wait_frame(FrameType.PROGRESS, timeout=60)
    deadline = time.monotonic() + 60
    while not any(f.get("event") == "gpu" for f in init.frames) and time.monotonic() < deadline:
        init.wait_frame(FrameType.PROGRESS, timeout=60)
    t0 = time.monotonic()
    init.signal(signal.SIGTERM)
    shutdown = init.wait_frame(FrameType.SHUTDOWN, timeout=30)
    assert time.monotonic() - t0 < 10  # not the 300 s daemon timeout
    assert shutdown.get("reason") == "signal SIGTERM, during stage daemons"
    audit = [str(a) for a in shutdown.get("audit")]  # type: ignore[union-attr]
    assert any(a.startswith("nvidia-persistenced: pid") for a in audit), audit
    assert not [f for f in init.frames if f.type == FrameType.FAILED]
    assert init.errors == []


def b200_root(root: Path) -> None:
    """HGX B200 in one VM: 8 GPUs and 4 SW_MNG ConnectX bridges, one IB port with SM on."""
    materialize(load("b200x8_sw_mng4"), root)
    for name in ("nvidia", "nvidia_uvm", "ib_umad", "mlx5_ib"):
        (root / "sys/module" / name).mkdir(parents=True)
    port = root / "sys/class/infiniband/mlx5_0/ports/1"
    (port / "gids").mkdir(parents=True)
    (port / "cap_mask").write_text("0x00000200\n")
    (port / "gids/0").write_text("fe80:0000:0000:0000:0002:c903:00ab:cdef\n")
    fake_nvidia_proc(root, gpu_bdfs(8))
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/modules_disabled").write_text("0\n")
    nvidia_bundle.install(root, behaviour={"gpu_delay": "0.02"})


def test_gpus_with_sw_mng_bridges_boot_gpu_mode_with_the_nvl5_fabric(
    ns_init: type[NsInit], tmp_path: Path
) -> None:
    """NVRC's GPU + NVL5 topology, from PCI alone: IB modules, nvlsm, the FM, persistenced."""
    init = ns_init(tmp_path, agent_arg() + AGENT, root_setup=b200_root)
    ready = init.wait_frame(FrameType.READY, timeout=60)
    assert ready.get("mode") == "gpu"
    inventory = ready.get("inventory")
    assert isinstance(inventory, dict) and inventory["fabric"] == "nvl5"
    assert [d["kind"] for d in inventory["devices"]].count("sw_mng") == 4
    assert ready.get("modules") == [f"{m} (already loaded)" for m in
                                    ("nvidia", "nvidia_uvm", "ib_umad", "mlx5_ib")]
    daemons = {d["name"]: d for d in ready.get("daemons")}  # type: ignore[union-attr]
    for name in ("nvlsm", "nv-fabricmanager", "nvidia-persistenced"):
        assert daemons[name]["running"], daemons
    calls = nvidia_bundle.calls(init.root)
    assert [c.split()[0] for c in calls[:3]] == ["nvlsm", "nv-fabricmanager",
                                                 "nvidia-persistenced"]
    # /run is the init's private tmpfs: read it through the init's mount namespace
    run = Path(f"/proc/{init.init_pid()}/root{init.root}/run")
    fm = (run / "nvidia-fabricmanager/fabricmanager.cfg").read_text()
    assert "FABRIC_MODE=0\n" in fm and "PARTITION_RAIL_POLICY=symmetric\n" in fm
    assert "FM_SM_MGMT_PORT_GUID=0x0002c90300abcdef\n" in fm
    assert init.errors == []
