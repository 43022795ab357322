"""NVIDIA daemons: plans; the real supervisor, syslog and fake driver bundle in a tmp root."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Iterator

import pytest

import guestinit.__main__ as boot_script
from guestinit.boot import Boot
from guestinit.effects import Effects
from guestinit.nvidia import daemon_ready, daemons
from guestinit.stages import BootError
from guestinit.testing import nvidia_bundle
from guestinit.values import Fabric, Mode
from tests.fixtures.accel import (
    accelerators,
    fake_nvidia_proc,
    frames,
    gpu_bdfs,
    kmsg_text,
    make_boot,
)

BIN = "/usr/bin"


def test_registered_gpus_from_persistenced_lines() -> None:
    lines = ["nvidia-persistenced[7]: Started (7)",
             "nvidia-persistenced[7]: device 0000:18:00.0 - registered",
             "nvidia-persistenced[7]: device 0000:18:00.0 - persistence mode enabled.",
             "other[1]: device 0000:99:00.0 - registered",
             "nvidia-persistenced[7]: device 0000:19:00.0 - registered",
             "nvidia-persistenced[9]: device 0000:18:00.0 - registered"]
    assert daemon_ready.registered_gpus(lines) == ["0000:18:00.0", "0000:19:00.0"]


def test_persistenced_argv() -> None:
    assert daemons.persistenced_argv(BIN, True, "nvidia-persistenced") == [
        "/usr/bin/nvidia-persistenced", "--foreground", "--verbose", "--uvm-persistence-mode",
        "--user", "nvidia-persistenced"]
    assert daemons.persistenced_argv(BIN, False, None) == [
        "/usr/bin/nvidia-persistenced", "--foreground", "--verbose"]


def test_user_lookup(tmp_path: pathlib.Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n"
                                         "nvidia-persistenced:x:120:130::/:/usr/sbin/nologin\n")
    assert daemons.user_ids(str(tmp_path), "nvidia-persistenced") == (120, 130)
    assert daemons.user_ids(str(tmp_path), "nobody") is None
    assert daemons.user_ids(str(tmp_path / "none"), "root") is None


def test_fabric_manager_config_rewrite() -> None:
    text = "# FABRIC_MODE=9 stays a comment\nLOG_LEVEL=4\nFABRIC_MODE=0\nDAEMONIZE=1\n"
    out = daemons.rewrite_fm_config(text, {"FABRIC_MODE": "1", "DAEMONIZE": "0",
                                          "LOG_USE_SYSLOG": "1"})
    assert out == ("# FABRIC_MODE=9 stays a comment\nLOG_LEVEL=4\nFABRIC_MODE=1\nDAEMONIZE=0\n"
                   "LOG_USE_SYSLOG=1\n")


def ib_port(root: pathlib.Path, name: str, cap_mask: str, gid: str) -> None:
    port = root / "sys/class/infiniband" / name / "ports/1"
    (port / "gids").mkdir(parents=True)
    (port / "cap_mask").write_text(cap_mask + "\n")
    (port / "gids/0").write_text(gid + "\n")


def test_port_guid_skips_ports_with_sm_disabled(tmp_path: pathlib.Path) -> None:
    assert daemons.port_guid(str(tmp_path)) is None
    ib_port(tmp_path, "mlx5_1", "0x00000200", "fe80:0000:0000:0000:1111:2222:3333:4444")
    ib_port(tmp_path, "mlx5_0", "0x00000400", "fe80:0000:0000:0000:aaaa:bbbb:cccc:dddd")
    assert daemons.port_guid(str(tmp_path)) == "0x1111222233334444"


def plan(mode: Mode, fabric: Fabric = Fabric.NONE, dcgm: bool = False,
         guid: str | None = None) -> list[str]:
    p = daemons.plan_daemons(mode, fabric, BIN, uvm=True, user=None, dcgm=dcgm, guid=guid)
    return [name for name, _ in p.daemons]


def test_daemon_plans_per_mode_in_nvrcs_order() -> None:
    assert plan(Mode.CPU, dcgm=True) == []
    assert plan(Mode.GPU) == ["nvidia-persistenced"]
    assert plan(Mode.GPU, fabric=Fabric.NVL4, dcgm=True) == [
        "nv-fabricmanager", "nvidia-persistenced", "nv-hostengine", "dcgm-exporter"]
    assert plan(Mode.GPU, fabric=Fabric.NVL5, guid="0x2") == [
        "nvlsm", "nv-fabricmanager", "nvidia-persistenced"]
    assert plan(Mode.NVL4, dcgm=True) == ["nv-fabricmanager"]
    assert plan(Mode.NVL5, guid="0x1") == ["nvlsm", "nv-fabricmanager"]
    p = daemons.plan_daemons(Mode.NVL5, Fabric.NONE, BIN, uvm=True, user=None, guid="0x1111")
    assert p.daemons[0][1] == ["/usr/bin/nvlsm", "-F", daemons.NVLSM_CONFIG, "-g", "0x1111"]
    assert p.fm_settings["FM_SM_MGMT_PORT_GUID"] == "0x1111"
    with pytest.raises(ValueError, match="nvl5: no InfiniBand port with SM enabled"):
        plan(Mode.NVL5)
    with pytest.raises(ValueError, match="nvl5: no InfiniBand port"):
        plan(Mode.GPU, fabric=Fabric.NVL5)


@pytest.mark.parametrize(("mode", "fabric", "fm", "rail"), [
    (Mode.NVL4, "", "1", "greedy"),  # NVRC: service VM NVL4, FABRIC_MODE_SHARED, greedy
    (Mode.NVL5, "", "1", "symmetric"),  # service VM NVL5: shared, symmetric
    (Mode.GPU, "nvl4", "0", "greedy"),  # HGX H100 with GPUs: FABRIC_MODE_FULL, greedy
    (Mode.GPU, "nvl5", "0", "symmetric"),  # HGX B200 with GPUs: full, symmetric
])
def test_fabric_defaults_are_nvrcs(mode: Mode, fabric: str, fm: str, rail: str) -> None:
    p = daemons.plan_daemons(mode, fabric, BIN, uvm=True, user=None, guid="0x1")
    assert (p.fm_settings["FABRIC_MODE"], p.fm_settings["PARTITION_RAIL_POLICY"]) == (fm, rail)
    forced = daemons.plan_daemons(mode, fabric, BIN, uvm=True, user=None, guid="0x1",
                                 fm_mode="2", rail_policy="greedy")
    assert forced.fm_settings["FABRIC_MODE"] == "2"
    assert forced.fm_settings["PARTITION_RAIL_POLICY"] == "greedy"


def test_a_shared_nvswitch_service_vm_starts_the_partition_service_after_the_fm() -> None:
    p = daemons.plan_daemons(Mode.NVL4, Fabric.NONE, BIN, uvm=True, user=None,
                             partitions="vsock:1050")
    assert [name for name, _ in p.daemons] == ["nv-fabricmanager", "guestinit-partitions"]
    assert p.fm_settings["FM_CMD_UNIX_SOCKET_PATH"] == daemons.FM_SOCKET
    argv = dict(p.daemons)["guestinit-partitions"]
    assert argv[:2] == ["/usr/bin/python3.11", "-S"]
    assert argv[-6:] == ["--listen", "vsock:1050", "--fm", daemons.FM_SOCKET,
                         "--syslog", "/dev/log"]
    # FABRIC_MODE 0 (GPUs beside the switches) has no partitions; off starts nothing
    for mode, fabric, listen in ((Mode.GPU, Fabric.NVL4, "vsock:1050"),
                                 (Mode.NVL4, Fabric.NONE, "off")):
        p = daemons.plan_daemons(mode, fabric, BIN, uvm=True, user=None, partitions=listen)
        assert "guestinit-partitions" not in dict(p.daemons)
        assert "FM_CMD_UNIX_SOCKET_PATH" not in p.fm_settings


def test_dcgm_argv_points_the_exporter_at_the_host_engine() -> None:
    p = daemons.plan_daemons(Mode.GPU, "", BIN, uvm=False, user=None, dcgm=True,
                            ports=(6000, 9500))
    argv = dict(p.daemons)
    assert argv["nv-hostengine"] == ["/usr/bin/nv-hostengine", "-n", "--service-account",
                                     "nvidia-dcgm", "--home-dir", "/tmp", "-p", "6000"]
    assert argv["dcgm-exporter"] == ["/usr/bin/dcgm-exporter", "-k", "-a", ":9500",
                                     "-r", "127.0.0.1:6000"]


def test_each_daemon_has_its_own_timeout_unless_only_daemon_timeout_is_set() -> None:
    from guestinit import config

    cfg = config.build()
    assert [daemon_ready.timeout_for(cfg, d) for d in daemon_ready.DAEMONS.values()] == [
        (600.0, "persistenced.timeout"), (300.0, "fabricmanager.timeout"),
        (300.0, "nvlsm.timeout"), (60.0, "hostengine.timeout"), (60.0, "exporter.timeout"),
        (30.0, "partitions.timeout")]
    cfg = config.build(cmdline="guestinit.daemon.timeout=30 guestinit.nvlsm.timeout=90")
    got = {d.name: daemon_ready.timeout_for(cfg, d) for d in daemon_ready.DAEMONS.values()}
    assert got["nvidia-persistenced"] == (30.0, "daemon.timeout")
    assert got["nvlsm"] == (90.0, "nvlsm.timeout")


def test_smi_settings_in_order() -> None:
    assert daemons.smi_settings({"smi.lgc": "1500,1980", "smi.lmc": "", "smi.pl": "500"}) == [
        ["-lgc", "1500,1980"], ["-pl", "500"]]


# -- the real supervisor, syslog server and process table with the stand-ins ---------------


@pytest.fixture
def gpu_root(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, list[Boot]]]:
    """A root with 4 registered GPUs and the fake bundle; every boot's daemons stopped after."""
    fake_nvidia_proc(tmp_path, gpu_bdfs(4))
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/nvidiactl").touch()
    boots: list[Boot] = []
    yield tmp_path, boots
    for boot in boots:
        boot.supervisor.stop(list(boot.supervisor.services), grace=2.0)
        assert boot.syslog is not None
        boot.syslog.close()


def gpu_boot(root: pathlib.Path, boots: list[Boot], cmdline: str = "", gpus: int = 4,
             fabric: Fabric = Fabric.NONE, effects: Effects | None = None) -> Boot:
    boot = make_boot(root, cmdline=cmdline, syslog=True, effects=effects)
    boot.facts.mode, boot.facts.fabric = Mode.GPU, fabric
    boot.facts.inventory = accelerators("gpu", gpu_bdfs(gpus))
    boots.append(boot)
    return boot


def test_gpu_mode_persistenced_ready_with_progress_and_smi_settings(
    gpu_root: tuple[pathlib.Path, list[Boot]]
) -> None:
    root, boots = gpu_root
    nvidia_bundle.install(root, behaviour={"gpu_delay": "0.15"})
    boot = gpu_boot(root, boots, "nvrc.smi.lgc=1500,1980 guestinit.smi.pl=500")
    daemons.run_daemons(boot)
    service = boot.supervisor.service("nvidia-persistenced")
    assert service.running and boot.facts.daemons == ["nvidia-persistenced"]
    assert (root / "var/run/nvidia-persistenced/socket").exists()
    gpu_frames = [f for f in frames(boot) if f.get("event") == "gpu"]
    assert [f["detail"] for f in gpu_frames] == [  # one per GPU, in order
        f"nvidia-persistenced: {i + 1}/4 GPUs attached (last {bdf})"
        for i, bdf in enumerate(gpu_bdfs(4))]
    calls = nvidia_bundle.calls(root)
    assert calls[0] == ("nvidia-persistenced --foreground --verbose --uvm-persistence-mode")
    assert calls[1:] == ["nvidia-smi -lgc 1500,1980", "nvidia-smi -pl 500"]
    spans = [s[0] for s in boot.timeline.spans]
    assert spans == ["daemon:nvidia-persistenced", "smi:lgc", "smi:pl"]
    daemons.check_daemons(boot)


def test_persistenced_runs_as_its_user_when_the_image_has_one(
    gpu_root: tuple[pathlib.Path, list[Boot]]
) -> None:
    root, boots = gpu_root
    nvidia_bundle.install(root)
    (root / "etc/passwd").write_text("nvidia-persistenced:x:120:130::/:/usr/sbin/nologin\n")
    boot = gpu_boot(root, boots, "guestinit.uvm.persistence=0", effects=Effects())
    daemons.run_daemons(boot)
    assert nvidia_bundle.calls(root)[0] == (
        "nvidia-persistenced --foreground --verbose --user nvidia-persistenced")
    st = os.stat(root / "var/run/nvidia-persistenced")
    assert (st.st_uid, st.st_gid) == (120, 130)


def test_marker_never_logged_fails_after_the_timeout_naming_the_daemon(
    gpu_root: tuple[pathlib.Path, list[Boot]]
) -> None:
    root, boots = gpu_root
    nvidia_bundle.install(root, behaviour={"persistenced": "hang"})
    boot = gpu_boot(root, boots, "guestinit.persistenced.timeout=1.5")
    start = time.monotonic()
    with pytest.raises(BootError) as err:
        daemons.run_daemons(boot)
    took = time.monotonic() - start
    assert err.value.stage == "daemons"
    assert err.value.reason.startswith(
        "nvidia-persistenced not ready after 1.5s (persistenced.timeout; no 'Local RPC "
        "services initialized' on syslog or /var/run/nvidia-persistenced/socket)")
    assert "last line: nvidia-persistenced[" in err.value.reason
    assert 1.5 <= took < 5
    assert len([f for f in frames(boot) if f.get("event") == "gpu"]) == 4


def test_daemon_that_keeps_crashing_fails_fast_with_its_status(
    gpu_root: tuple[pathlib.Path, list[Boot]]
) -> None:
    root, boots = gpu_root
    nvidia_bundle.install(root, behaviour={"persistenced": "crash"})
    boot = gpu_boot(root, boots, "guestinit.restart.max=1 guestinit.restart.backoff=0.05")
    boot.supervisor.max_restarts = 1
    boot.supervisor.backoff = 0.05
    start = time.monotonic()
    with pytest.raises(BootError, match=r"nvidia-persistenced exited with status 1 before it "
                                        r"was ready"):
        daemons.run_daemons(boot)
    assert time.monotonic() - start < 10
    assert boot.supervisor.service("nvidia-persistenced").restarts == 1
    assert len([c for c in nvidia_bundle.calls(root) if c.startswith("nvidia-persistenced")]) == 2


def test_smi_failure_names_the_setting_and_output(
    gpu_root: tuple[pathlib.Path, list[Boot]]
) -> None:
    root, boots = gpu_root
    nvidia_bundle.install(root)
    boot = gpu_boot(root, boots, "guestinit.smi.pl=900")
    with pytest.raises(BootError, match=r"nvidia-smi pl \(-pl 900\) exited 2: Provided power "
                                        r"limit 900.00 W is not a valid power limit"):
        daemons.run_daemons(boot)


def test_set_ready_state_runs_conf_compute(gpu_root: tuple[pathlib.Path, list[Boot]]) -> None:
    root, boots = gpu_root
    nvidia_bundle.install(root)
    boot = gpu_boot(root, boots, "nvrc.smi.srs=1")
    daemons.set_ready_state(boot)
    assert nvidia_bundle.calls(root) == ["nvidia-smi conf-compute -srs 1"]


def test_fabric_manager_with_rewritten_config(gpu_root: tuple[pathlib.Path, list[Boot]]) -> None:
    root, boots = gpu_root
    nvidia_bundle.install(root)
    for i in range(4):
        (root / f"dev/nvidia-nvswitch{i}").touch()
    boot = gpu_boot(root, boots, "nvrc.fm.mode=1 nvrc.fm.rail.policy=symmetric", fabric=Fabric.NVL4)
    daemons.run_daemons(boot)
    assert boot.facts.daemons == ["nv-fabricmanager", "nvidia-persistenced"]
    cfg = (root / daemons.FM_RUN_CONFIG).read_text()
    assert "FABRIC_MODE=1\n" in cfg and "PARTITION_RAIL_POLICY=symmetric\n" in cfg
    assert "DAEMONIZE=0\n" in cfg and "LOG_USE_SYSLOG=1\n" in cfg
    assert boot.supervisor.service("nv-fabricmanager").running
    daemons.check_daemons(boot)
    boot.supervisor.stop(["nv-fabricmanager"], grace=2.0)
    with pytest.raises(BootError, match="health check: nv-fabricmanager is not running"):
        daemons.check_daemons(boot)


def test_missing_fm_template_is_named(gpu_root: tuple[pathlib.Path, list[Boot]]) -> None:
    root, boots = gpu_root
    boot = gpu_boot(root, boots)
    boot.facts.mode = Mode.NVL4
    with pytest.raises(BootError, match=r"prepare nv-fabricmanager config from .*"
                                        r"fabricmanager.cfg: No such file"):
        daemons.run_daemons(boot)


def test_cpu_mode_starts_nothing(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tmp_path)
    boot_script.run_daemons(boot)  # the boot script's gate: no NVIDIA work in cpu mode
    assert boot.facts.daemons == [] and boot.supervisor.services == {}


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def dcgm_boot(root: pathlib.Path, boots: list[Boot], extra: str = "",
              ) -> tuple[Boot, int, int]:
    """A gpu boot with DCGM on free ports: (boot, host engine port, exporter port)."""
    engine, metrics = free_ports(2)
    boot = gpu_boot(root, boots, f"nvrc.dcgm=on guestinit.hostengine.port={engine} "
                                 f"guestinit.exporter.port={metrics} {extra}")
    return boot, engine, metrics


def test_dcgm_daemons_are_ready_when_their_ports_listen(
    gpu_root: tuple[pathlib.Path, list[Boot]]
) -> None:
    import urllib.request

    root, boots = gpu_root
    nvidia_bundle.install(root)
    boot, engine, metrics = dcgm_boot(root, boots)
    daemons.run_daemons(boot)
    assert boot.facts.daemons == ["nvidia-persistenced", "nv-hostengine", "dcgm-exporter"]
    assert [s[0] for s in boot.timeline.spans] == [
        "daemon:nvidia-persistenced", "daemon:nv-hostengine", "daemon:dcgm-exporter"]
    waits = [f["detail"] for f in frames(boot) if f.get("event") == "wait"]
    assert f"nv-hostengine: waiting for 127.0.0.1:{engine} listening" in waits
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    assert body.count("DCGM_FI_DEV_GPU_TEMP{") == 4  # one gauge per GPU the driver has
    assert f"daemons: nv-hostengine ready: 127.0.0.1:{engine}" in kmsg_text(root)
    daemons.check_daemons(boot)


def test_a_host_engine_that_never_listens_fails_naming_it_and_its_timeout(
    gpu_root: tuple[pathlib.Path, list[Boot]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, boots = gpu_root
    nvidia_bundle.install(root, behaviour={"hostengine": "hang"})
    monkeypatch.setattr(daemon_ready, "PROGRESS_EVERY", 0.4)
    boot, engine, _ = dcgm_boot(root, boots, "guestinit.hostengine.timeout=1.5")
    with pytest.raises(BootError) as err:
        daemons.run_daemons(boot)
    assert err.value.reason.startswith(
        f"nv-hostengine not ready after 1.5s (hostengine.timeout; no 127.0.0.1:{engine} "
        "listening)")
    still = [f for f in frames(boot) if "still waiting" in str(f.get("detail"))]
    assert len(still) >= 2  # a frame every PROGRESS_EVERY s while it waits
    assert all(f["stage"] == "daemons" and isinstance(f["waited_ms"], int) for f in still)
    assert still[-1]["waited_ms"] >= 800  # type: ignore[operator]
    assert "dcgm-exporter" not in boot.facts.daemons  # type: ignore[operator]


def test_an_exporter_without_its_host_engine_fails_naming_its_status(
    gpu_root: tuple[pathlib.Path, list[Boot]]
) -> None:
    root, boots = gpu_root
    nvidia_bundle.install(root)
    _, metrics = free_ports(2)
    boot = gpu_boot(root, boots, f"guestinit.exporter.port={metrics} "
                                 "guestinit.restart.max=0")
    boot.supervisor.max_restarts = 0
    boot.facts.daemons = []
    with pytest.raises(BootError, match=r"dcgm-exporter exited with status 1 before it was "
                                        r"ready"):
        daemons._start(boot, "dcgm-exporter", ["/usr/bin/dcgm-exporter", "-k", "-a",
                                              f":{metrics}", "-r", "127.0.0.1:1"])
        daemon_ready.wait_ready(boot, daemon_ready.DAEMONS["dcgm-exporter"])


def test_gpus_with_sw_mng_start_nvlsm_then_the_fabric_manager_then_persistenced(
    gpu_root: tuple[pathlib.Path, list[Boot]]
) -> None:
    """HGX B200 in one VM (NVRC's GPU + NVL5): the port GUID goes to nvlsm and the FM."""
    root, boots = gpu_root
    nvidia_bundle.install(root)
    ib_port(root, "mlx5_0", "0x00000200", "fe80:0000:0000:0000:0002:c903:00ab:cdef")
    boot = gpu_boot(root, boots, fabric=Fabric.NVL5)
    daemons.run_daemons(boot)
    assert boot.facts.daemons == ["nvlsm", "nv-fabricmanager", "nvidia-persistenced"]
    calls = nvidia_bundle.calls(root)
    assert calls[0] == f"nvlsm -F {daemons.NVLSM_CONFIG} -g 0x0002c90300abcdef"
    cfg = (root / daemons.FM_RUN_CONFIG).read_text()
    assert "FABRIC_MODE=0\n" in cfg and "PARTITION_RAIL_POLICY=symmetric\n" in cfg
    assert "FM_SM_MGMT_PORT_GUID=0x0002c90300abcdef\n" in cfg
    assert "daemons: nvlsm ready: " in kmsg_text(root) and "SUBNET UP" in kmsg_text(root)
    daemons.check_daemons(boot)
