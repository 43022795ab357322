"""The reporter: frames kept until the channel opens, every transport we can make here,
oversized frames shrunk, and a host that stops reading never blocks PID 1."""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import pytest

from guestinit import report, wire
from guestinit.kmsg import Kmsg
from guestinit.wire import FrameType


def reporter(root: Path, uri: str | None = None) -> report.Reporter:
    return report.Reporter(str(root) + "/", "b" * 32, Kmsg(str(root / "no-kmsg"),
                                                          fallback=io.StringIO()), uri)


def frames_from(data: bytes) -> list[wire.Frame]:
    reader = wire.FrameReader()
    out = reader.feed(data) + reader.eof()
    assert all(isinstance(f, wire.Frame) for f in out), out
    return out  # type: ignore[return-value]


def test_frames_wait_for_the_channel_then_flush_in_order(tmp_path: Path) -> None:
    path = tmp_path / "report.sock"
    rep = reporter(tmp_path, f"unix:{path}")
    rep.send(FrameType.HELLO, version="1", pid=1)  # no listener yet: kept
    rep.progress("early", "done")
    assert not rep.connected and rep.sent == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)
        assert rep.open(wait=1.0)
        rep.progress("log", "done")
        rep.close()
        conn, _ = srv.accept()
        with conn:
            data = b"".join(iter(lambda: conn.recv(65536), b""))
    got = frames_from(data)
    assert [f.type for f in got] == [FrameType.HELLO, FrameType.PROGRESS, FrameType.PROGRESS]
    assert [f.get("stage") for f in got[1:]] == ["early", "log"]
    assert rep.sent == 3 and rep.dropped == 0


def test_pending_frames_are_bounded_and_the_loss_counted(tmp_path: Path) -> None:
    rep = reporter(tmp_path, f"unix:{tmp_path}/nobody-listens")
    for i in range(report.PENDING_MAX + 10):
        rep.progress("early", "tick", detail=str(i))
    assert rep.dropped == 10 and len(rep._pending) == report.PENDING_MAX


def test_virtio_port_found_by_name(tmp_path: Path) -> None:
    for entry, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport0p2", "guestinit")):
        d = tmp_path / "sys/class/virtio-ports" / entry
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
    (tmp_path / "dev").mkdir()
    port = tmp_path / "dev/vport0p2"
    port.write_bytes(b"")  # a plain file stands in for the character device
    assert report.find_virtio_port(str(tmp_path), "guestinit") == str(port)
    assert report.find_virtio_port(str(tmp_path), "other") is None
    rep = reporter(tmp_path, "virtio-port:guestinit")
    rep.send(FrameType.READY, timeline=[["early", 1, 2]], inventory={}, mode="cpu",
             modules=[], daemons=[])
    got = frames_from(port.read_bytes())
    assert got[0].type == FrameType.READY and got[0].timeline() == [("early", 1, 2)]


def test_console_frames_are_marked_base64_lines(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    console = tmp_path / "dev/console"
    console.write_text("")  # a plain file stands in for the console device
    rep = reporter(tmp_path, "console")
    rep.send(FrameType.FAILED, stage="config", reason="guestinit.log='loud'", timeline=[])
    text = console.read_text()
    assert text.startswith(wire.CONSOLE_MARKER) and text.endswith("\n")
    got = list(wire.iter_console("[ 1.0] kernel noise\n" + text))
    assert len(got) == 1 and isinstance(got[0], wire.Frame)
    assert got[0].get("reason") == "guestinit.log='loud'"


def test_oversized_frame_is_shrunk_not_lost(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/console").write_text("")
    rep = reporter(tmp_path, "console")
    rep.send(FrameType.FAILED, stage="modules", reason="x" * 100, timeline=[["early", 1, 2]],
             detail="y" * (2 * wire.MAX_FRAME))
    got = list(wire.iter_console((tmp_path / "dev/console").read_text()))
    assert isinstance(got[0], wire.Frame)
    assert got[0].get("error") == "frame too large; fields dropped"
    assert got[0].get("stage") == "modules" and got[0].get("reason") == "x" * 100


def test_a_host_that_stops_reading_costs_a_bounded_wait(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "WRITE_TIMEOUT", 0.2)
    path = tmp_path / "slow.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)
        rep = reporter(tmp_path, f"unix:{path}")
        assert rep.open()
        conn, _ = srv.accept()  # accepted, never read
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        t0 = time.monotonic()
        for _ in range(40):
            rep.progress("daemons", "gpus", detail="z" * 30000)
            if rep.dropped:
                break
        took = time.monotonic() - t0
        conn.close()
    assert rep.dropped >= 1 and rep.sent >= 1
    # each lost frame waited at most WRITE_TIMEOUT (generous bound for a loaded machine)
    assert took < (rep.dropped + 1) * 0.2 + 5


def test_unknown_transport_is_named(tmp_path: Path) -> None:
    with pytest.raises(report.TransportError, match="unknown report transport 'pigeon:1'"):
        report.open_transport("pigeon:1", str(tmp_path))
    with pytest.raises(report.TransportError, match="virtio port 'x' not found"):
        report.open_transport("virtio-port:x", str(tmp_path))
    assert not os.path.exists(tmp_path / "dev")


def test_a_channel_the_host_closes_keeps_its_frames_for_the_console(tmp_path: Path) -> None:
    """EPIPE keeps the frame (and, mid-flush, the rest) queued; at the end they go to the
    console in order, where the host's harness also reads frames."""
    path = tmp_path / "report.sock"
    (tmp_path / "dev").mkdir()
    console = tmp_path / "dev/console"
    console.write_text("")
    rep = reporter(tmp_path, f"unix:{path}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)
        assert rep.open(wait=1.0)
        conn, _ = srv.accept()
        conn.close()  # the host side goes away
    rep.send(FrameType.PROGRESS, stage="agent", event="done")  # may still be buffered ...
    rep.send(FrameType.SHUTDOWN, reason="power button", audit=["sync"], timeline=[])
    deadline = time.monotonic() + 5
    while rep.connected and time.monotonic() < deadline:  # ... until the peer's close shows
        rep.send(FrameType.PROGRESS, stage="run", event="tick")
    assert not rep.connected and rep._pending, "EPIPE should keep the frame queued"
    queued = len(rep._pending)
    assert rep.spill_to_console() == queued
    got = [f for f in wire.iter_console(console.read_text()) if isinstance(f, wire.Frame)]
    assert len(got) == queued and rep.dropped == 0
    assert got[-1].type in (FrameType.PROGRESS, FrameType.SHUTDOWN)
    assert rep.spill_to_console() == 0  # nothing left twice


def _vsock_answer(cid: int, port: int) -> int | None:
    """The errno this host's vsock gives a connect to (cid, port), None without AF_VSOCK."""
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError:
        return None
    with sock:
        sock.settimeout(2.0)
        try:
            sock.connect((cid, port))
        except OSError as exc:
            return exc.errno
    return 0


def test_a_vsock_nobody_listens_on_sends_to_the_console_at_once(tmp_path: Path) -> None:
    """Under Kata nothing listens on our port: the host's vsock answers ECONNRESET and
    frames go to the console at once, not after ready's wait (and not only at poweroff)."""
    port = 1040
    answer = _vsock_answer(2, port)  # on a host, CID 2 is the host's own vsock
    if answer not in report.NOBODY_LISTENS:
        pytest.skip(f"this host's vsock does not refuse CID 2 port {port} (errno {answer})")
    (tmp_path / "dev").mkdir()
    console = tmp_path / "dev/console"
    console.write_text("")
    rep = reporter(tmp_path)
    rep.send(FrameType.HELLO, version="t", pid=1)  # before the config: kept
    rep.configure(f"vsock:2:{port}")
    started = time.monotonic()
    assert rep.open(wait=2.0)
    assert time.monotonic() - started < 1.0  # an answer, not a wait
    rep.send(FrameType.READY, timeline=[])
    assert rep.uri == "console"
    got = [f for f in wire.iter_console(console.read_text()) if isinstance(f, wire.Frame)]
    assert [f.type for f in got] == [FrameType.HELLO, FrameType.READY]


def test_a_vsock_that_does_not_exist_yet_is_waited_for(tmp_path: Path) -> None:
    """EAFNOSUPPORT (vsock still a module) or a timeout is no answer: frames stay pending."""
    rep = reporter(tmp_path, "vsock:1:1040")  # CID 1: loopback; unloaded here or silent
    answer = _vsock_answer(1, 1040)
    if answer in report.NOBODY_LISTENS:
        pytest.skip("this host's vsock loopback refuses at once")
    rep.send(FrameType.HELLO, version="t", pid=1)
    assert not rep.connected and rep.uri == "vsock:1:1040"
