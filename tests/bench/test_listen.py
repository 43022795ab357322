from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.listen import FramePump, Printer, UriError, listen
from guestinit.wire import CONSOLE_MARKER, Frame, FrameType, encode

READY = encode(Frame(FrameType.READY, "b1", 5_000_000, {"timeline": [["early", 1, 2]]}))
HELLO = encode(Frame(FrameType.HELLO, "b1", 1_000_000, {"version": "1"}))


def _send_when_listening(path: Path, payload: bytes) -> threading.Thread:
    def go() -> None:
        deadline = time.monotonic() + 5
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with s:
            s.sendall(payload)

    t = threading.Thread(target=go)
    t.start()
    return t


def test_unix_listener_prints_frames_and_errors_for_garbage(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    # A good frame, an undecodable one, a frame of the wrong shape, another good one,
    # then a truncated frame at EOF.
    wrong = encode(Frame(FrameType.READY, "b1", 7, {"timeline": [["x", 1, 2]]})).replace(
        b"\xa8timeline", b"\xa8timelinX")
    payload = HELLO + b"\x00\x00\x00\x03\xc1\xc1\xc1" + wrong + READY + READY[:9]
    sender = _send_when_listening(path, payload)
    out = io.StringIO()
    printer = Printer(out, as_json=False)
    listen(f"unix:{path}", printer)
    sender.join()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("hello") and "t=1.0ms" in lines[0]
    assert lines[1].startswith("error: undecodable frame")
    assert lines[2] == "error: ready frame lacks 'timeline'"
    assert lines[3].startswith("ready")
    assert lines[4].startswith("error: stream ended inside a frame")
    assert (printer.frames, printer.errors) == (2, 3)
    assert not path.exists()


def test_bad_length_prefix_stops_the_stream_with_one_error(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    sender = _send_when_listening(path, HELLO + b"\xff\xff\xff\xff" + READY * 100)
    out = io.StringIO()
    printer = Printer(out, as_json=True)
    listen(f"unix:{path}", printer)
    sender.join()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[0]["type"] == "hello" and rows[0]["boot_id"] == "b1"
    assert rows[1:] == [{"error": "frame length 4294967295 outside 1..65536"}]


def test_console_log_is_decoded_and_bad_lines_reported(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(
        "[    1.0] kernel noise\n"
        f"{CONSOLE_MARKER}{base64.b64encode(READY).decode()}\n"
        f"x {CONSOLE_MARKER}%%%not-base64\n"
    )
    out = io.StringIO()
    printer = Printer(out, as_json=False)
    listen(f"console:{log}", printer)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("ready")
    assert lines[1] == "error: console frame is not base64"


@pytest.mark.parametrize("uri, message", [
    ("tcp:1.2.3.4:5", "want unix:PATH, vsock:CID:PORT, hvsock:UDS:PORT"),
    ("hvsock:/run/v.sock", "want hvsock:UDS:PORT"),
    ("hvsock-connect:/run/v.sock:x", "want hvsock-connect:UDS:PORT"),
    ("vsock:two:1040", "want vsock:CID:PORT"),
    ("console:", "name the log file"),
])
def test_bad_uris_are_usage_errors(uri: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        listen(uri, Printer(io.StringIO(), as_json=False))


def test_cli_listen_exit_status_counts_errors(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "c.log"
    log.write_text(f"{CONSOLE_MARKER}{base64.b64encode(HELLO).decode()}\n")
    assert main(["listen", f"console:{log}"]) == 0
    log.write_text(f"{CONSOLE_MARKER}AAAA\n")
    assert main(["listen", f"console:{log}"]) == 1
    assert main(["listen", "bogus:x"]) == 2
    assert "bogus:x" in capsys.readouterr().err


def test_frame_pump_keeps_frames_and_errors_in_arrival_order(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    pump = FramePump(path)
    try:
        assert not pump.pump(0.05)  # nobody connected yet
        guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        guest.connect(path)
        ready = Frame(FrameType.READY, "b" * 32, 7, {"timeline": [["early", 1, 2]]})
        data = encode(ready)
        guest.sendall(data + data[:5])  # a second frame cut short
        while len(pump.frames) < 1:
            assert pump.pump(2.0)
        guest.close()
        while not pump.eof:
            pump.pump(2.0)
        assert [f.type for f in pump.frames] == [FrameType.READY]
        assert len(pump.errors) == 1 and "stream ended inside a frame" in str(pump.errors[0])
        assert not pump.pump(0.01)  # after EOF: nothing more, no busy loop
    finally:
        pump.close()


def test_hybrid_vsock_guest_connections_arrive_on_uds_underscore_port(tmp_path: Path) -> None:
    """Firecracker / Cloud Hypervisor forward a guest's connect(CID 2, 1040) to UDS_1040."""
    uds = tmp_path / "vsock.sock"
    sender = _send_when_listening(tmp_path / "vsock.sock_1040", HELLO + READY)
    out = io.StringIO()
    printer = Printer(out, as_json=False)
    listen(f"hvsock:{uds}:1040", printer)
    sender.join()
    assert (printer.frames, printer.errors) == (2, 0)
    assert not (tmp_path / "vsock.sock_1040").exists()


def _fake_vmm(uds: Path, answer: bytes, payload: bytes, seen: list[bytes]) -> threading.Thread:
    """The VMM side of a hybrid vsock: read ``CONNECT P``, answer, then be the guest."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(uds))
    server.listen(1)

    def go() -> None:
        conn, _ = server.accept()
        with conn, server:
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)
            seen.append(line)
            conn.sendall(answer + payload)

    t = threading.Thread(target=go)
    t.start()
    return t


def test_hybrid_vsock_connect_handshake_then_frames(tmp_path: Path) -> None:
    seen: list[bytes] = []
    vmm = _fake_vmm(tmp_path / "v.sock", b"OK 1073741824\n", HELLO + READY, seen)
    out = io.StringIO()
    printer = Printer(out, as_json=True)
    listen(f"hvsock-connect:{tmp_path / 'v.sock'}:1040", printer)
    vmm.join()
    assert seen == [b"CONNECT 1040\n"]
    types = [json.loads(line)["type"] for line in out.getvalue().splitlines()]
    assert types == ["hello", "ready"]  # the bytes after OK's line are the guest's


def test_hybrid_vsock_refused_port_names_the_answer(tmp_path: Path) -> None:
    seen: list[bytes] = []
    vmm = _fake_vmm(tmp_path / "v.sock", b"", b"", seen)  # the VMM closes: nobody listens
    with pytest.raises(UriError, match=r"the VMM answered '' to CONNECT 7"):
        listen(f"hvsock-connect:{tmp_path / 'v.sock'}:7", Printer(io.StringIO(), False))
    vmm.join()
    with pytest.raises(UriError, match="is the VMM's vsock socket"):
        listen(f"hvsock-connect:{tmp_path / 'absent.sock'}:7", Printer(io.StringIO(), False))
