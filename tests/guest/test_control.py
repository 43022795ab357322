"""ControlServer on real AF_UNIX stream sockets in tmp_path."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from guestinit.config import Mode
from guestinit.control import ControlServer, default_path, query


def serve_in_background(srv: ControlServer, stop: threading.Event) -> threading.Thread:
    import select

    def loop() -> None:
        while not stop.is_set():
            if select.select([srv], [], [], 0.02)[0]:
                srv.handle()

    t = threading.Thread(target=loop)
    t.start()
    return t


def test_query_gets_status_json(tmp_path: Path) -> None:
    path = default_path(str(tmp_path))
    srv = ControlServer(path, lambda: {"stage": "ready", "mode": Mode.GPU, "pids": (1, 2)})
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.get_blocking(srv.fileno()) is False
    stop = threading.Event()
    t = serve_in_background(srv, stop)
    try:
        assert query(path) == {"stage": "ready", "mode": "gpu", "pids": [1, 2]}
        assert query(path)["stage"] == "ready"
    finally:
        stop.set()
        t.join()
    assert srv.served == 2
    srv.close()
    assert not os.path.exists(path)


def raw_request(path: str, srv: ControlServer, data: bytes, shut: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        c.sendall(data)
        if shut:
            c.shutdown(socket.SHUT_WR)
        srv.handle()
        c.settimeout(2)
        return c.recv(65536)


def test_unknown_request_and_empty_request(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl")
    srv = ControlServer(path, lambda: {"ok": True})
    assert raw_request(path, srv, b"reboot now\n") == \
        b'{"error": "unknown request \'reboot now\'; expected \'status\'"}\n'
    assert raw_request(path, srv, b"") == b'{"ok": true}\n'
    assert raw_request(path, srv, b"status\r\n") == b'{"ok": true}\n'
    srv.close()


def test_status_that_raises_is_an_error_reply(tmp_path: Path) -> None:
    def broken() -> dict[str, object]:
        raise KeyError("daemons")

    path = str(tmp_path / "ctl")
    srv = ControlServer(path, broken)
    assert raw_request(path, srv, b"status\n") == \
        b'{"error": "status failed: KeyError: \'daemons\'"}\n'
    srv.close()


def test_silent_client_does_not_block_handle(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl")
    srv = ControlServer(path, lambda: {"ok": True}, client_budget=0.1, max_clients=4)
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(6)]
    try:
        for c in silent:
            c.connect(path)  # and never send, never close
        start = time.monotonic()
        srv.handle()
        elapsed = time.monotonic() - start
        # Four clients per call, 0.1 s each at most; the other two wait for the next call.
        assert 0.35 < elapsed < 0.7
        start = time.monotonic()
        srv.handle()
        assert time.monotonic() - start < 0.4
        start = time.monotonic()
        srv.handle()  # nothing pending: returns at once
        assert time.monotonic() - start < 0.05
        silent[0].settimeout(1)
        assert silent[0].recv(100) == b'{"ok": true}\n'
    finally:
        for c in silent:
            c.close()
    srv.close()


def test_client_that_never_reads_a_large_reply(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl")
    big = {"blob": "x" * (8 << 20)}
    srv = ControlServer(path, lambda: big, client_budget=0.1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        c.sendall(b"status\n")
        start = time.monotonic()
        srv.handle()
        assert time.monotonic() - start < 0.5
    assert srv.served == 0
    srv.close()


def test_query_errors_name_the_socket(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"query guestinit control socket .*nothing.*is guestinit"):
        query(str(tmp_path / "nothing"), timeout=0.5)
    # Something that answers with a non-object.
    path = str(tmp_path / "fake")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(1)

        def answer() -> None:
            conn, _ = s.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"[1, 2]\n")

        t = threading.Thread(target=answer)
        t.start()
        with pytest.raises(ValueError, match="is list, expected an object"):
            query(path)
        t.join()


def test_bind_error_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"bind control socket .*file/ctl"):
        ControlServer(str(tmp_path / "file" / "ctl"), dict)


def test_a_client_slower_than_the_budget_still_gets_the_reply(tmp_path: Path) -> None:
    """With no budget at all the init answers before the request arrives and closes; the
    client's send may then meet a closed socket (EPIPE), and the reply is still there."""
    path = default_path(str(tmp_path))
    srv = ControlServer(path, lambda: {"stage": "ready"}, client_budget=0.0)
    stop = threading.Event()
    t = serve_in_background(srv, stop)
    try:
        for _ in range(20):
            assert query(path) == {"stage": "ready"}
    finally:
        stop.set()
        t.join()
        srv.close()
