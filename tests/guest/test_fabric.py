"""The partition API binding (guestinit/nvidia/fabric.py, cffi API mode) compiled against the
libnvfm stand-in, talking to the fabric manager stand-in's partition server (issue #25)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestinit.nvidia import fabric
from guestinit.testing import fake_fabric


@pytest.fixture
def fm_socket(tmp_path: Path) -> Iterator[tuple[str, fake_fabric.FabricState]]:
    state = fake_fabric.FabricState()
    path = str(tmp_path / "fm.sock")
    server = fake_fabric.Server.unix(state, path).start()
    yield path, state
    server.stop()


def connect(nvfm: ModuleType, path: str) -> fabric.Fabric:
    return fabric.Fabric(path, unix=True, module=nvfm)


def test_the_hgx_table_lists_fifteen_partitions(nvfm: ModuleType,
                                               fm_socket: tuple[str, object]) -> None:
    with connect(nvfm, fm_socket[0]) as fm:
        parts = fm.partitions()
    assert [p.id for p in parts] == list(range(15))
    assert [(len(p.gpus), p.nvlinks) for p in parts] == (
        [(8, 144)] + [(4, 72)] * 2 + [(2, 36)] * 4 + [(1, 0)] * 8)
    assert [g.physical_id for g in parts[3].gpus] == [1, 3]
    gpu = parts[0].gpus[0]
    assert gpu.uuid.startswith("GPU-") and gpu.bdf == "00000000:27:00.0"
    assert (gpu.max_nvlinks, gpu.line_rate_mbps) == (18, 25000)
    assert not any(p.active for p in parts)


def test_activation_follows_the_fabric_managers_rules(nvfm: ModuleType,
                                                     fm_socket: tuple[str, object]) -> None:
    with connect(nvfm, fm_socket[0]) as fm:
        fm.activate(3)
        fm.activate(4)
        with pytest.raises(fabric.FabricError, match="fmActivateFabricPartition 1: "
                           "FM_ST_IN_USE: in use") as refused:
            fm.activate(1)  # GPUs 1-4: shared with 3 and 4
        assert refused.value.code == -7
        with pytest.raises(fabric.FabricError, match="FM_ST_IN_USE"):
            fm.activate(3)
        fm.deactivate(3)
        with pytest.raises(fabric.FabricError, match="fmDeactivateFabricPartition 3: "
                           "FM_ST_UNINITIALIZED"):
            fm.deactivate(3)
        with pytest.raises(fabric.FabricError, match="99: FM_ST_BADPARAM: bad parameter"):
            fm.activate(99)
        assert [p.id for p in fm.partitions() if p.active] == [4]
        assert fm.unsupported() == [] and fm.nvlink_failed() == []


def test_a_restarted_fabric_manager_takes_the_activated_list(nvfm: ModuleType,
                                                            tmp_path: Path) -> None:
    state = fake_fabric.FabricState(restart=True)
    server = fake_fabric.Server.unix(state, str(tmp_path / "fm.sock")).start()
    try:
        with connect(nvfm, str(tmp_path / "fm.sock")) as fm:
            with pytest.raises(fabric.FabricError, match="FM_ST_NOT_CONFIGURED"):
                fm.partitions()
            with pytest.raises(fabric.FabricError, match="FM_ST_NOT_CONFIGURED"):
                fm.activate(7)
            fm.set_activated([3, 4])
            assert [p.id for p in fm.partitions() if p.active] == [3, 4]
            with pytest.raises(fabric.FabricError, match="FM_ST_NOT_SUPPORTED"):
                fm.set_activated([3])  # only once, after the restart
    finally:
        server.stop()


def test_an_unreachable_fabric_manager_is_named(nvfm: ModuleType, tmp_path: Path) -> None:
    gone = str(tmp_path / "none.sock")
    with pytest.raises(fabric.FabricError, match=f"fmConnect to {gone}: "
                       "FM_ST_CONNECTION_NOT_VALID"):
        connect(nvfm, gone)
    with pytest.raises(fabric.FabricError, match="fmConnect to not-an-ip: FM_ST_BADPARAM"):
        fabric.Fabric("not-an-ip", module=nvfm)


def test_two_controllers_racing_are_both_answered_one_at_a_time(
        nvfm: ModuleType, fm_socket: tuple[str, object]) -> None:
    results: dict[int, str] = {}

    def controller(pid: int) -> None:
        with connect(nvfm, fm_socket[0]) as fm:
            try:
                fm.activate(pid)
                results[pid] = "ok"
            except fabric.FabricError as exc:
                results[pid] = exc.name

    threads = [threading.Thread(target=controller, args=(pid,)) for pid in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results.values()) == ["FM_ST_IN_USE", "ok"]  # 1 and 3 share GPUs 1, 3


def test_an_oversized_request_ends_that_client_and_the_server_goes_on(
        nvfm: ModuleType, fm_socket: tuple[str, object]) -> None:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(fm_socket[0])
    raw.sendall(b"A" * (fake_fabric.MAX_REQUEST + 100))
    raw.settimeout(5)
    assert raw.recv(16) == b""  # closed without an answer
    raw.close()
    with connect(nvfm, fm_socket[0]) as fm:
        assert len(fm.partitions()) == 15


def test_a_structure_of_another_version_is_refused(nvfm: ModuleType,
                                                   fm_socket: tuple[str, object]) -> None:
    with connect(nvfm, fm_socket[0]) as fm:
        out = nvfm.ffi.new("fmFabricPartitionList_t *")
        out.version = nvfm.ffi.sizeof("fmFabricPartitionList_t") | (2 << 24)
        assert nvfm.lib.fmGetSupportedFabricPartitions(fm.handle, out) == -6


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_the_stand_in_answers_any_line_with_a_reply_or_an_error(line: str) -> None:
    reply = fake_fabric.FabricState().answer(line)
    assert reply.endswith(".\n") or (reply.startswith("E -") and reply.count("\n") == 1)


@pytest.mark.parametrize("restart", [False, True])
def test_the_fabric_manager_stand_in_serves_the_api_its_config_names(
        nvfm: ModuleType, tmp_path: Path, restart: bool) -> None:
    """nv-fabricmanager (the bundle's stand-in) with FABRIC_MODE=1 and
    FM_CMD_UNIX_SOCKET_PATH serves libnvfm there; with --restart it waits for the list."""
    import os
    import signal
    import subprocess
    import time

    from guestinit.testing import nvidia_bundle

    root = tmp_path / "root"
    nvidia_bundle.install(root)
    (root / "dev").mkdir()
    (root / "dev" / "nvidia-nvswitch0").write_text("")
    cfg = root / "fm.cfg"
    cfg.write_text("FABRIC_MODE=1\nDAEMONIZE=0\nLOG_FILE_NAME=/fm.log\n"
                   "FM_CMD_UNIX_SOCKET_PATH=/run/nvidia-fabricmanager/socket\n")
    argv = [str(root / "usr/bin/nv-fabricmanager"), "-c", "/fm.cfg",
            *(["--restart"] if restart else [])]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sock = root / "run/nvidia-fabricmanager/socket"
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), proc.stderr.read().decode() if proc.poll() is not None else ""
        with fabric.Fabric(str(sock), unix=True, module=nvfm) as fm:
            if restart:
                with pytest.raises(fabric.FabricError, match="FM_ST_NOT_CONFIGURED"):
                    fm.partitions()
                fm.set_activated([0])
            parts = fm.partitions()
        assert len(parts) == 15 and [p.id for p in parts if p.active] == ([0] if restart else [])
        log = (root / "fm.log").read_text()
        assert "Fabric Manager API interface listening on /run/nvidia-fabricmanager/socket" \
            in log
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
    assert not sock.exists()  # removed at exit
