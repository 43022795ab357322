"""A small syslog server on /dev/log for the daemons PID 1 starts.

Bounded in every direction, because it runs inside PID 1:

- reads: ``drain()`` takes at most ``max_datagrams`` per call from a non-blocking
  socket, each at most ``MAX_DATAGRAM`` bytes (longer ones are dropped and counted);
  senders that outrun us block in the kernel (AF_UNIX datagram back-pressure),
  they are not lost and they cannot grow our memory;
- disk: the store file is rotated to ``<store>.1`` when it would pass ``store_max``,
  so at most 2 x ``store_max`` bytes are on disk;
- console: lines are forwarded to kmsg through a token bucket (``kmsg_rate`` lines
  per second, burst of one second's worth); what the bucket drops is counted and
  announced in one "suppressed N lines" note when it refills;
- memory: the last ``RING_MAX`` lines are kept for ``wait_for`` and the status,
  plus up to ``MATCHED_MAX`` lines that earlier ``wait_for`` calls returned, so a
  readiness marker found once stays findable even after a flood pushed it out of
  the ring. Worst case ~ (RING_MAX + MATCHED_MAX) x MAX_DATAGRAM bytes.

``wait_for`` also watches every line handled while it waits, so a marker cannot
slip through the ring between two looks.
"""

from __future__ import annotations

import _socket as socket  # socket.py would import enum and selectors (boot path)
import os
import select
import time

from guestinit.syslog_parse import SEVERITY, parse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable

    from guestinit.kmsg import Kmsg
    from guestinit.syslog_parse import Message
else:  # the C type itself: collections/__init__ costs ~2 ms of the boot path
    from _collections import deque

MAX_DATAGRAM = 8192
RING_MAX = 256
MATCHED_MAX = 64
RCVBUF = 256 * 1024
WAIT_ROUND = 0.1  # seconds per select() round in wait_for: how often tick/abort run


def _unlink(path: str) -> bool:
    """Remove ``path`` if it is there; False when it was not (or could not go)."""
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


class SyslogServer:
    """Datagram syslog server at ``path`` (``<root>/dev/log``); see the module doc."""

    __slots__ = (
        "_bucket", "_burst", "_clock", "_fd", "_last_refill", "_matched", "_pending_note",
        "_rate", "_ring", "_seq", "_size", "_sock", "_watch", "_watch_hit", "bytes_stored",
        "dropped_oversize", "forward", "forwarded", "kmsg", "path", "received", "store_errors",
        "store_max", "store_path", "suppressed", "tick",
    )

    def __init__(
        self,
        path: str,
        kmsg: Kmsg,
        store_path: str,
        store_max: int,
        kmsg_rate: int,
        forward: bool,
        tick: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.kmsg = kmsg
        self.store_path = store_path
        self.store_max = store_max  # 0: keep no store file
        self.forward = forward and kmsg_rate > 0  # rate 0: forward nothing
        self.tick = tick
        self._clock = clock
        self._rate = kmsg_rate
        self._burst = float(max(kmsg_rate, 1))
        self._bucket = self._burst
        self._last_refill = clock()
        self._pending_note = 0
        self._ring: deque[tuple[int, str]] = deque(maxlen=RING_MAX)
        self._matched: deque[tuple[int, str]] = deque(
            maxlen=MATCHED_MAX)
        self._seq = 0
        self._watch: str | None = None
        self._watch_hit: tuple[int, str] | None = None
        self.received = 0
        self.forwarded = 0
        self.suppressed = 0
        self.bytes_stored = 0
        self.dropped_oversize = 0
        self.store_errors = 0
        self._fd: int | None = None
        self._size = 0
        self._sock = self._bind(path)
        if store_max > 0:
            try:
                self._open_store()
            except OSError:
                self._sock.close()
                raise

    @staticmethod
    def _bind(path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            _unlink(path)  # a stale socket from an earlier run
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind(path)
            os.chmod(path, 0o666)  # every daemon, whatever its user, may log
        except OSError as exc:
            sock.close()
            hint = " (AF_UNIX paths are limited to 107 bytes: use a shorter root)" \
                if len(path.encode()) > 107 else ""
            raise OSError(exc.errno, f"bind syslog socket {path}: {exc.strerror or exc}{hint}") \
                from None
        sock.setblocking(False)
        return sock

    def _open_store(self) -> None:
        parent = os.path.dirname(self.store_path)
        try:
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._fd = os.open(self.store_path,
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise OSError(exc.errno, f"open syslog store {self.store_path}: {exc.strerror}") \
                from None

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- reading -------------------------------------------------------------

    def drain(self, max_datagrams: int = 256) -> int:
        """Handle up to ``max_datagrams`` pending datagrams without blocking; returns
        how many were read."""
        self._refill()
        buf = bytearray(MAX_DATAGRAM + 1)
        view = memoryview(buf)
        out: list[bytes] = []
        now = self._clock()
        n = 0
        while n < max_datagrams:
            try:
                size = self._sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the socket was closed under us: nothing more to read
            n += 1
            self.received += 1
            if size > MAX_DATAGRAM:
                self.dropped_oversize += 1
                continue
            self._handle(parse(bytes(view[:size])), now, out)
        if out:
            self._store(out)
        return n

    def _handle(self, msg: Message, now: float, out: list[bytes]) -> None:
        line = msg.line()
        self._seq += 1
        entry = (self._seq, line)
        self._ring.append(entry)
        if self._watch is not None and self._watch_hit is None and self._watch in line:
            self._watch_hit = entry
        if self.store_max > 0:
            sev = SEVERITY[msg.pri & 7]
            out.append(f"{now:.6f} {sev} {line}\n".encode("utf-8", "replace"))
        if self.forward:
            self._forward(msg.pri, line)

    # -- kmsg forwarding (token bucket) ---------------------------------------

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last_refill
        self._last_refill = now
        if elapsed > 0:
            self._bucket = min(self._burst, self._bucket + elapsed * self._rate)
        if self._pending_note and self._bucket >= 1.0:
            self._bucket -= 1.0
            count, self._pending_note = self._pending_note, 0
            self.kmsg.log(4, f"syslog: suppressed {count} lines (over {self._rate}/s)")

    def _forward(self, pri: int, line: str) -> None:
        if self._bucket < 1.0:
            self._refill()
        if self._bucket >= 1.0:
            self._bucket -= 1.0
            self.forwarded += 1
            self.kmsg.raw(f"<{pri}>{line}")
        else:
            self.suppressed += 1
            self._pending_note += 1

    # -- store -----------------------------------------------------------------

    def _store(self, records: list[bytes]) -> None:
        chunk: list[bytes] = []
        chunk_size = 0
        for rec in records:
            if len(rec) > self.store_max:
                rec = rec[: self.store_max - 1] + b"\n"
            if self._size + chunk_size + len(rec) > self.store_max:
                self._write_store(chunk)
                chunk, chunk_size = [], 0
                self._rotate()
            chunk.append(rec)
            chunk_size += len(rec)
        self._write_store(chunk)

    def _write_store(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        if self._fd is None and not self._reopen_store():
            return
        assert self._fd is not None
        data = b"".join(chunk)
        try:
            written = os.write(self._fd, data)
        except OSError:
            # ENOSPC on /run and friends: the lines still reach the ring and kmsg.
            self.store_errors += 1
            return
        self._size += written
        self.bytes_stored += written

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.replace(self.store_path, self.store_path + ".1")
        except FileNotFoundError:
            pass  # removed under us: the new file starts the same way
        except OSError:
            self.store_errors += 1
        self._reopen_store()

    def _reopen_store(self) -> bool:
        try:
            self._open_store()
        except OSError:
            self.store_errors += 1
            self._fd = None
            self._size = 0
            return False
        return True

    # -- queries ----------------------------------------------------------------

    def _find(self, needle: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for entry in self._matched:
            if needle in entry[1]:
                best = entry
                break
        for entry in self._ring:
            if best is not None and entry[0] >= best[0]:
                break
            if needle in entry[1]:
                best = entry
                break
        return best

    def _remember(self, entry: tuple[int, str]) -> str:
        if entry not in self._matched:
            self._matched.append(entry)
        return entry[1]

    def wait_for(
        self,
        needle: str,
        timeout: float,
        abort: Callable[[], str | None] | None = None,
    ) -> str:
        """The first line since the server started that contains ``needle``.

        Blocks in ``select`` on the socket in rounds of at most ``WAIT_ROUND`` s,
        calling ``tick()`` and ``abort()`` each round; raises ``TimeoutError`` after
        ``timeout`` seconds and ``RuntimeError(reason)`` once ``abort()`` gives one.
        """
        hit = self._find(needle)
        if hit is not None:
            return self._remember(hit)
        deadline = self._clock() + timeout
        self._watch, self._watch_hit = needle, None
        try:
            while True:
                self.drain(RING_MAX)
                if self._watch_hit is not None:
                    return self._remember(self._watch_hit)
                if self.tick is not None:
                    self.tick()
                if abort is not None:
                    reason = abort()
                    if reason:
                        raise RuntimeError(reason)
                left = deadline - self._clock()
                if left <= 0:
                    raise TimeoutError(
                        f"no line containing {needle!r} on syslog after {timeout}s")
                select.select([self._sock], [], [], min(left, WAIT_ROUND))
        finally:
            self._watch, self._watch_hit = None, None

    def recent(self, count: int = 20) -> list[str]:
        """The last ``count`` lines (at most ``RING_MAX``), oldest first."""
        lines = [line for _, line in self._ring]
        return lines[-count:] if count > 0 else []

    def stats(self) -> dict[str, int]:
        return {
            "received": self.received,
            "forwarded": self.forwarded,
            "suppressed": self.suppressed,
            "bytes_stored": self.bytes_stored,
            "dropped_oversize": self.dropped_oversize,
            "store_errors": self.store_errors,
            "ring": len(self._ring),
        }

    def close(self) -> None:
        """Close the socket (and unlink it) and the store file; idempotent."""
        if self._sock.fileno() >= 0:
            self._sock.close()
            _unlink(self.path)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
