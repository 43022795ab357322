"""SyslogServer on real AF_UNIX sockets in tmp_path; kmsg is a regular file there."""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from guestinit.config import LogLevel
from guestinit.kmsg import Kmsg
from guestinit.syslog import MATCHED_MAX, MAX_DATAGRAM, RING_MAX, SyslogServer


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.sock_path = str(tmp_path / "dev" / "log")
        self.kmsg_path = tmp_path / "kmsg"
        self.kmsg_path.touch()
        self.store = tmp_path / "run" / "guestinit" / "syslog"
        self.kmsg = Kmsg(str(self.kmsg_path), level=LogLevel.DEBUG)
        self.clients: list[socket.socket] = []

    def server(self, store_max: int = 1 << 20, rate: int = 1000, forward: bool = True,
               **kw: object) -> SyslogServer:
        return SyslogServer(self.sock_path, self.kmsg, str(self.store), store_max, rate, forward,
                            **kw)  # type: ignore[arg-type]

    def client(self) -> socket.socket:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        c.connect(self.sock_path)
        self.clients.append(c)
        return c

    def send_all(self, srv: SyslogServer, datagrams: list[bytes]) -> None:
        """Send without blocking the test: the kernel queues only
        net.unix.max_dgram_qlen datagrams per socket, then the sender would block."""
        c = self.client()
        c.setblocking(False)
        for data in datagrams:
            while True:
                try:
                    c.send(data)
                    break
                except BlockingIOError:
                    srv.drain()

    def kmsg_lines(self) -> list[str]:
        return self.kmsg_path.read_text().splitlines()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    yield e  # type: ignore[misc]
    for c in e.clients:
        c.close()
    e.kmsg.close()


def test_socket_mode_stale_socket_and_close(env: Env) -> None:
    os.makedirs(os.path.dirname(env.sock_path))
    Path(env.sock_path).write_text("stale")
    srv = env.server()
    st = os.stat(env.sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert os.get_blocking(srv.fileno()) is False
    srv.close()
    assert not os.path.exists(env.sock_path)
    srv.close()  # idempotent


def test_bind_error_names_the_path(tmp_path: Path, env: Env) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"bind syslog socket .*file/log"):
        SyslogServer(str(tmp_path / "file" / "log"), env.kmsg, str(env.store), 100, 1, True)
    too_long = str(tmp_path / ("x" * 120) / "log")
    with pytest.raises(OSError, match="limited to 107 bytes"):
        SyslogServer(too_long, env.kmsg, str(env.store), 100, 1, True)


def test_drain_stores_forwards_and_keeps_ring(env: Env) -> None:
    srv = env.server()
    c = env.client()
    c.send(b"<30>Nov 22 09:00:01 foo[7]: first")
    c.send(b"<27>bar: second")
    assert srv.drain() == 2
    assert srv.drain() == 0  # nothing pending: returns at once
    assert env.kmsg_lines() == ["<30>foo[7]: first", "<27>bar: second"]
    stored = env.store.read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in stored] == ["info foo[7]: first", "err bar: second"]
    assert srv.recent() == ["foo[7]: first", "bar: second"]
    assert srv.recent(1) == ["bar: second"]
    stats = srv.stats()
    assert stats["received"] == 2 and stats["forwarded"] == 2
    assert stats["bytes_stored"] == env.store.stat().st_size
    srv.close()


def test_drain_is_bounded_per_call(env: Env) -> None:
    srv = env.server()
    c = env.client()
    for i in range(8):
        c.send(f"line {i}".encode())
    assert srv.drain(max_datagrams=3) == 3
    assert srv.drain(max_datagrams=3) == 3
    assert srv.drain(max_datagrams=3) == 2
    srv.close()


def test_forward_off_and_store_off(env: Env) -> None:
    srv = env.server(store_max=0, forward=False)
    env.client().send(b"hello")
    assert srv.drain() == 1
    assert env.kmsg_lines() == []
    assert not env.store.exists()
    assert srv.stats()["forwarded"] == srv.stats()["suppressed"] == 0
    assert srv.recent() == ["hello"]
    srv.close()


def test_oversize_datagram_is_dropped_and_counted(env: Env) -> None:
    srv = env.server()
    c = env.client()
    c.send(b"x" * (MAX_DATAGRAM + 1))
    c.send(b"y" * MAX_DATAGRAM)
    assert srv.drain() == 2
    stats = srv.stats()
    assert stats["dropped_oversize"] == 1 and stats["received"] == 2
    assert srv.recent() == ["y" * MAX_DATAGRAM]
    srv.close()


def test_rate_limit_token_bucket_with_fake_clock(env: Env) -> None:
    clock = FakeClock()
    srv = env.server(rate=10, clock=clock)
    env.send_all(srv, [f"<14>d: burst {i}".encode() for i in range(25)])
    srv.drain()
    c = env.client()
    assert srv.stats()["forwarded"] == 10
    assert srv.stats()["suppressed"] == 15
    assert env.kmsg_lines() == [f"<14>d: burst {i}" for i in range(10)]
    clock.now += 0.05  # half a token: still nothing forwarded
    c.send(b"<14>d: too soon")
    srv.drain()
    assert srv.stats()["suppressed"] == 16
    assert len(env.kmsg_lines()) == 10
    clock.now += 1.0  # the bucket refills: one note, then lines flow again
    c.send(b"<14>d: later")
    srv.drain()
    lines = env.kmsg_lines()
    assert lines[10] == "<4>guestinit: syslog: suppressed 16 lines (over 10/s)"
    assert lines[11] == "<14>d: later"
    assert len(lines) == 12
    stats = srv.stats()
    assert stats["forwarded"] + stats["suppressed"] == stats["received"] == 27
    srv.close()


def test_store_rotates_and_stays_within_twice_the_cap(env: Env) -> None:
    srv = env.server(store_max=1000)
    c = env.client()
    for i in range(200):
        c.send(f"<14>svc: line number {i:04d} ".encode() + b"." * 20)
        if i % 7 == 0:
            srv.drain()
    srv.drain()
    rotated = Path(str(env.store) + ".1")
    assert env.store.stat().st_size <= 1000
    assert rotated.stat().st_size <= 1000
    assert env.store.read_text().splitlines()[-1].endswith("svc: line number 0199 " + "." * 20)
    assert srv.stats()["bytes_stored"] > 2000  # older rotations are gone from disk
    srv.close()


def test_store_caps_one_record_longer_than_the_cap(env: Env) -> None:
    srv = env.server(store_max=100)
    env.client().send(b"z" * 500)
    srv.drain()
    assert env.store.stat().st_size == 100
    assert env.store.read_bytes().endswith(b"z\n")
    srv.close()


def test_wait_for_line_that_arrives_later(env: Env) -> None:
    srv = env.server()
    c = env.client()
    ticks: list[float] = []

    def later() -> None:
        time.sleep(0.4)
        c.send(b"<30>nvidia-persistenced[9]: other")
        c.send(b"<30>nvidia-persistenced[9]: Started persistenced")

    t = threading.Thread(target=later)
    start = time.monotonic()
    t.start()

    def abort() -> str | None:
        ticks.append(time.monotonic())
        return None

    line = srv.wait_for("Started", timeout=5.0, abort=abort)
    elapsed = time.monotonic() - start
    t.join()
    assert line == "nvidia-persistenced[9]: Started persistenced"
    assert 0.35 < elapsed < 2.0
    # select() woke us: a handful of rounds, not a busy loop.
    assert 2 <= len(ticks) <= 20
    # Found again without waiting, by a later caller.
    assert srv.wait_for("Started", timeout=0) == line
    srv.close()


def test_wait_for_timeout_calls_tick_each_round(env: Env) -> None:
    ticks: list[int] = []
    srv = env.server(tick=lambda: ticks.append(1))
    env.client().send(b"unrelated")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no line containing 'marker' on syslog after 0.35s"):
        srv.wait_for("marker", timeout=0.35)
    elapsed = time.monotonic() - start
    assert 0.3 < elapsed < 1.5
    assert 3 <= len(ticks) <= 10
    assert srv.stats()["received"] == 1  # it kept serving while it waited
    srv.close()


def test_wait_for_abort_reason_raises(env: Env) -> None:
    srv = env.server()
    calls: list[int] = []

    def abort() -> str | None:
        calls.append(1)
        return "nvidia-persistenced exited with status 1" if len(calls) >= 2 else None

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="nvidia-persistenced exited with status 1"):
        srv.wait_for("never", timeout=30.0, abort=abort)
    assert time.monotonic() - start < 1.0
    srv.close()


def test_marker_inside_a_flood_larger_than_the_ring(env: Env) -> None:
    srv = env.server()
    c = env.client()
    got: list[str] = []

    def send() -> None:
        for i in range(RING_MAX * 3):
            c.send(f"noise {i}".encode())
            if i == RING_MAX:
                c.send(b"daemon: READY")

    t = threading.Thread(target=send)
    t.start()
    got.append(srv.wait_for("READY", timeout=10.0))
    while t.is_alive():  # the sender blocks until we read the rest
        select.select([srv], [], [], 0.05)
        srv.drain()
    t.join()
    while srv.drain():
        pass
    assert got == ["daemon: READY"]
    assert "daemon: READY" not in srv.recent(RING_MAX)  # pushed out of the ring...
    assert srv.wait_for("READY", timeout=0) == "daemon: READY"  # ...but still findable
    srv.close()


def test_first_matching_line_wins_and_matched_list_is_bounded(env: Env) -> None:
    srv = env.server()
    c = env.client()
    c.send(b"a: marker one")
    c.send(b"a: marker two")
    srv.drain()
    assert srv.wait_for("marker", timeout=0) == "a: marker one"
    for i in range(MATCHED_MAX + 10):
        c.send(f"m{i}".encode())
        srv.drain()
        srv.wait_for(f"m{i}", timeout=0)
    for i in range(RING_MAX):
        c.send(b"filler")
        if i % 8 == 0:
            srv.drain()
    srv.drain()
    # The oldest remembered lines fell out of the bounded list, the newest did not.
    assert srv.wait_for(f"m{MATCHED_MAX + 9}", timeout=0) == f"m{MATCHED_MAX + 9}"
    with pytest.raises(TimeoutError):
        srv.wait_for("marker one", timeout=0.05)
    srv.close()


def test_flood_of_100k_datagrams_stays_bounded(env: Env) -> None:
    store_max = 64 * 1024
    clock = FakeClock()
    srv = env.server(store_max=store_max, rate=50, clock=clock)
    total = 100_000
    done = threading.Event()

    def flood() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(env.sock_path)
            for i in range(total):
                s.send(b"<15>Nov 22 09:00:01 flood[1]: line %d padding........" % i)
        done.set()

    t = threading.Thread(target=flood)
    t.start()
    peak_ring = 0
    while not done.is_set() or srv.drain() > 0:
        select.select([srv], [], [], 0.05)
        clock.now += 0.001
        srv.drain()
        peak_ring = max(peak_ring, len(srv.recent(RING_MAX * 2)))
    t.join()
    stats = srv.stats()
    assert stats["received"] == total
    assert stats["forwarded"] + stats["suppressed"] == total
    assert stats["dropped_oversize"] == 0
    assert 0 < stats["forwarded"] < 1000  # ~50/s of fake time, plus the burst
    on_disk = env.store.stat().st_size + Path(str(env.store) + ".1").stat().st_size
    assert on_disk <= 2 * store_max
    assert stats["bytes_stored"] > 10 * store_max
    assert peak_ring == RING_MAX
    assert srv.recent(1) == [f"flood[1]: line {total - 1} padding........"]
    kmsg = env.kmsg_lines()
    assert len(kmsg) == stats["forwarded"] + sum("suppressed" in k for k in kmsg)
    srv.close()
