"""The partition service (guestinit/nvidia/partitions.py) and the host command
(bench/fabric.py) end to end: the command over a Unix socket, the service with the
binding compiled against the libnvfm stand-in, the fabric manager stand-in behind it."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import fabric as cli
from guestinit import wire
from guestinit.nvidia import fabric, partitions
from guestinit.testing import fake_fabric


class Rig:
    """The fabric manager stand-in on one socket, the partition service on another."""

    def __init__(self, root: Path, module: ModuleType) -> None:
        self.fm_path, self.uri = str(root / "fm.sock"), f"unix:{root / 'svc.sock'}"
        self.state = fake_fabric.FabricState()
        self.fm = fake_fabric.Server.unix(self.state, self.fm_path).start()
        self.audit: list[str] = []
        self.service = partitions.PartitionService(
            lambda: fabric.Fabric(self.fm_path, unix=True, module=module), self.audit.append)
        self.listener, _ = partitions.listener(self.uri)
        self._run = True
        self.thread = threading.Thread(target=self.service.serve,
                                       args=(self.listener, lambda: self._run), daemon=True)
        self.thread.start()

    def restart_fm(self) -> None:
        """nv-fabricmanager --restart: a new process, nothing active, waiting for the list."""
        self.fm.stop()
        self.state = fake_fabric.FabricState(restart=True)
        self.fm = fake_fabric.Server.unix(self.state, self.fm_path).start()

    def close(self) -> None:
        self._run = False
        self.thread.join(5)
        self.listener.close()
        self.fm.stop()


@pytest.fixture
def rig(tmp_path: Path, nvfm: ModuleType) -> Iterator[Rig]:
    r = Rig(tmp_path, nvfm)
    yield r
    r.close()


def run(rig: Rig, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(["--to", rig.uri, "--by", "ops@host", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_prints_the_operators_table(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(rig, capsys, "list")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 16
    assert lines[0].split("  ")[0] == "PARTITION ID"
    assert lines[1].split() == ["0", "Inactive", "8", "144", "1,2,3,4,5,6,7,8"]
    assert lines[4].split() == ["3", "Inactive", "2", "36", "1,3"]
    assert lines[15].split() == ["14", "Inactive", "1", "0", "8"]


def test_activate_refuse_deactivate_with_audit(rig: Rig,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run(rig, capsys, "activate", "3")[0] == 0
    rc, out, _ = run(rig, capsys, "activate", "4")
    assert rc == 0 and out.splitlines()[0] == "activate partition 4 gpus 2,4 by ops@host"
    assert out.splitlines()[6].split()[:2] == ["4", "Active"]
    rc, _, err = run(rig, capsys, "activate", "1")
    assert rc == 1 and "fmActivateFabricPartition 1: FM_ST_IN_USE" in err
    assert run(rig, capsys, "deactivate", "3")[0] == 0
    rc, _, err = run(rig, capsys, "activate", "99")
    assert rc == 1 and "activate 99: no such partition" in err
    assert rig.audit == ["activate partition 3 gpus 1,3 by ops@host",
                         "activate partition 4 gpus 2,4 by ops@host",
                         "activate partition 1 by ops@host refused: FM_ST_IN_USE",
                         "deactivate partition 3 gpus 1,3 by ops@host"]
    rc, out, _ = run(rig, capsys, "status")
    assert rc == 0 and "audit: deactivate partition 3 gpus 1,3 by ops@host" in out
    assert sorted(rig.state.active) == [4]


def test_the_activated_list_survives_a_fabric_manager_restart(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(rig, capsys, "activate", "5")[0] == 0
    assert run(rig, capsys, "activate", "10")[0] == 0  # GPU 4 alone
    rig.restart_fm()
    rc, out, _ = run(rig, capsys, "list")
    assert rc == 0
    assert [ln.split()[0] for ln in out.splitlines()[1:] if ln.split()[1] == "Active"] \
        == ["5", "10"]
    assert rig.audit[-1] == "fabric manager restarted: activated list restored [5, 10]"


def test_who_asks_is_one_bounded_line_in_the_audit(rig: Rig,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--to", rig.uri, "--by", "a\nforged line" + "x" * 100, "activate",
                     "7"]) == 0
    capsys.readouterr()
    assert rig.audit == ["activate partition 7 gpus 1 by a?forged line" + "x" * 51]


def test_json_reply(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    rc, out, _ = run(rig, capsys, "--json", "list")
    reply = json.loads(out)
    assert rc == 0 and reply["status"] == "ok" and len(reply["partitions"]) == 15
    assert reply["partitions"][1] == {"id": 1, "active": 0, "gpus": [1, 2, 3, 4], "nvlinks": 72}


def test_bad_requests_get_an_error_and_the_service_goes_on(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    path = rig.uri.partition(":")[2]

    def raw(data: bytes) -> list[object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(data)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        return list(wire.FrameReader().feed(got))

    # too large: error reply, then closed
    (too_big,) = raw(struct.pack(">I", 60000) + b"x" * (partitions.MAX_REQUEST + 10))
    assert isinstance(too_big, wire.Frame) and "over 4096 bytes" in str(too_big.get("error"))
    # not msgpack: error reply, then closed
    (garbage,) = raw(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    assert isinstance(garbage, wire.Frame)
    assert str(garbage.get("error")).startswith("malformed request: undecodable frame")
    # a well-formed frame with an unknown op, and activate without an id
    for fields, want in (({"op": "reboot"}, "unknown request request 'reboot'"),
                         ({"op": "activate"}, "activate needs a partition id")):
        req = wire.Frame(wire.FrameType.REQUEST, "t", 1, fields)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(wire.encode(req))
            (answer,) = wire.FrameReader().feed(s.recv(65536))
        assert isinstance(answer, wire.Frame) and want in str(answer.get("error"))
    assert run(rig, capsys, "list")[0] == 0  # still serving


def test_two_controllers_racing_are_serialised_and_both_answered(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    codes: dict[str, int] = {}

    def controller(pid: str) -> None:
        codes[pid] = cli.main(["--to", rig.uri, "--by", f"c{pid}", "activate", pid])

    threads = [threading.Thread(target=controller, args=(pid,)) for pid in ("1", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    capsys.readouterr()
    assert sorted(codes.values()) == [0, 1]  # 1 and 3 share GPUs 1 and 3


def test_no_service_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--to", f"unix:{tmp_path / 'none'}", "list"]) == 2
    assert "is the service VM up" in capsys.readouterr().err
    assert cli.main(["--to", "tcp:1.2.3.4", "list"]) == 2
    assert "want unix:PATH, vsock:CID:PORT" in capsys.readouterr().err


class _NoFabric:
    """A Fabric whose fabric manager always refuses: requests are judged before it counts."""

    def partitions(self) -> list[fabric.Partition]:
        return [fabric.Partition(3, False, (fabric.Gpu(1, "GPU-1", "00:01.0", 18, 18, 1),))]

    def activate(self, pid: int) -> None:
        raise fabric.FabricError("fmActivateFabricPartition", -7, f" {pid}")

    def deactivate(self, pid: int) -> None:
        raise fabric.FabricError("fmDeactivateFabricPartition", -4, f" {pid}")

    def close(self) -> None:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "id", "by", "x"]),
                       st.one_of(st.text(max_size=20), st.integers(-5, 2**40)), max_size=4),
       st.sampled_from(list(wire.FrameType)))
def test_any_request_gets_one_reply(fields: dict[str, object], ftype: wire.FrameType) -> None:
    service = partitions.PartitionService(lambda: _NoFabric(), lambda line: None)  # type: ignore[arg-type, return-value]
    out = service.handle(wire.Frame(ftype, "t", 1, fields))
    assert out.type is wire.FrameType.REPLY and out.get("status") in ("ok", "error")
    assert (out.get("status") == "error") == bool(out.get("error"))
    wire.encode(out)  # always a valid frame to send


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=6000))
def test_any_bytes_on_a_connection_are_answered_or_end_it(data: bytes) -> None:
    service = partitions.PartitionService(lambda: _NoFabric(), lambda line: None)  # type: ignore[arg-type, return-value]
    sent: list[bytes] = []

    class Conn:
        def sendall(self, b: bytes) -> None:
            sent.append(b)

    keep = service.feed(Conn(), wire.FrameReader(), [0], data)  # type: ignore[arg-type]
    replies = wire.FrameReader().feed(b"".join(sent))
    assert all(isinstance(r, wire.Frame) and r.type is wire.FrameType.REPLY for r in replies)
    if len(data) > partitions.MAX_REQUEST + wire.HEADER.size:
        assert not keep


def test_a_request_while_the_fabric_manager_is_down_fails_and_the_next_one_recovers(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(rig, capsys, "activate", "5")[0] == 0
    rig.fm.stop()  # gone, not yet back
    rc, _, err = run(rig, capsys, "list")
    assert rc == 1 and "FM_ST_CONNECTION_NOT_VALID" in err
    rig.state = fake_fabric.FabricState(restart=True)
    rig.fm = fake_fabric.Server.unix(rig.state, rig.fm_path).start()
    rc, out, _ = run(rig, capsys, "list")
    assert rc == 0 and out.splitlines()[6].split()[:2] == ["5", "Active"]
