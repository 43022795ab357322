"""Sends frames to the host over the configured transport.

Frames made before the transport exists (a virtio port appears only once
virtio_console is loaded) are kept, bounded, and flushed when it opens. A write
never blocks PID 1 for more than ``WRITE_TIMEOUT``: a host that stops reading
loses frames (counted, logged), not the guest.
"""

from __future__ import annotations

import _socket as socket  # socket.py would import enum and selectors (boot path)
import errno
import os
import select
import time

from guestinit import wire
from guestinit.stages import boottime_ns
from guestinit.values import report_target

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.kmsg import Kmsg

WRITE_TIMEOUT = 2.0
PENDING_MAX = 64
RECENT_MAX = 16
VERSION = "0.1.0"


class TransportError(OSError):
    pass


# connect() errors that mean the vsock peer will not appear by waiting: ECONNRESET is what
# a host vsock answers for a port nobody listens on, ENODEV a VM without a vsock device
NOBODY_LISTENS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ENODEV)


def find_virtio_port(root: str, name: str) -> str | None:
    """``/dev/vportNpM`` whose sysfs ``name`` is ``name``, or None if not (yet) there."""
    from guestinit.sysfs import find_named

    entry = find_named(root, "virtio-ports", name)
    return None if entry is None else os.path.join(root, "dev", entry)


def open_transport(uri: str, root: str) -> tuple[int, bool]:
    """Open ``uri``; returns (fd, console_mode). Raises TransportError if not possible now."""
    try:
        kind, target, port = report_target(uri)
    except ValueError as exc:
        raise TransportError(errno.EINVAL, f"unknown report transport {uri!r} ({exc})") from None
    try:
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(WRITE_TIMEOUT)
            sock.connect(target)
            return sock.detach(), False
        if kind == "vsock":
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(WRITE_TIMEOUT)
            try:
                sock.connect((int(target), port))
            except OSError:
                sock.close()
                raise
            return sock.detach(), False
        if kind == "virtio-port":
            path = find_virtio_port(root, target)
            if path is None:
                raise TransportError(errno.ENOENT,
                                     f"virtio port {target!r} not found under {root}sys")
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY), False
        path = os.path.join(root, "dev/console")  # console: the only kind left
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY), True
    except TransportError:
        raise
    except OSError as exc:
        raise TransportError(exc.errno or errno.EIO,
                             f"open report channel {uri}: {exc.strerror or exc}") from None


def _write_all(fd: int, data: bytes, timeout: float) -> None:
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"host not reading: {len(view)} bytes unsent") from None
            select.select([], [fd], [], left)


class Reporter:
    __slots__ = ("_console", "_fd", "_pending", "boot_id", "dropped", "kmsg", "recent", "root",
                 "sent", "uri")

    def __init__(self, root: str, boot_id: str, kmsg: Kmsg, uri: str | None = None) -> None:
        self.root = root
        self.boot_id = boot_id
        self.kmsg = kmsg
        self.uri = uri
        self._fd = -1
        self._console = False
        self._pending: list[bytes] = []
        self.recent: list[dict[str, object]] = []
        self.sent = 0
        self.dropped = 0

    @property
    def connected(self) -> bool:
        return self._fd >= 0

    def configure(self, uri: str) -> None:
        if uri != self.uri:
            self.close()
            self.uri = uri

    def open(self, wait: float = 0.0) -> bool:
        """Try to open the transport (retrying up to ``wait`` s); flush what is pending."""
        if self._fd >= 0:
            return True
        if self.uri is None:
            return False
        deadline = time.monotonic() + wait
        while True:
            try:
                self._fd, self._console = open_transport(self.uri, self.root)
                break
            except TransportError as exc:
                if exc.errno in NOBODY_LISTENS and self.uri.startswith("vsock:"):
                    # an answer, not a delay: the host's vsock says no one listens there
                    # (Kata's runtime never does on our port) or the VM has no vsock device
                    self.kmsg.log(4, f"report channel: {exc}; frames go to the console")
                    self.uri = "console"
                    continue
                if time.monotonic() >= deadline:
                    if wait:
                        self.kmsg.log(4, f"report channel: {exc}")
                    return False
                time.sleep(0.01)  # the virtio port shows up shortly after its driver loads
        pending, self._pending = self._pending, []
        for i, data in enumerate(pending):
            if self._fd < 0:  # the host side went away while we flushed: keep the rest
                self._pending.extend(pending[i:])
                break
            self._write(data)
        return self._fd >= 0

    def send(self, ftype: wire.FrameType, **fields: object) -> None:
        frame = wire.Frame(ftype, self.boot_id, boottime_ns(), fields)
        try:
            data = wire.encode(frame)
        except wire.FrameError as exc:
            # never lose the fact that something happened: shrink to a note
            self.kmsg.log(3, f"report: {exc}")
            data = wire.encode(wire.Frame(ftype, self.boot_id, frame.t, _shrunk(ftype, fields)))
        self.recent.append({"type": ftype.value, "t": frame.t})
        del self.recent[:-RECENT_MAX]
        if self._fd < 0 and not self.open():
            self._pending.append(data)
            if len(self._pending) > PENDING_MAX:
                del self._pending[0]
                self.dropped += 1
            return
        self._write(data)

    def progress(self, stage: str, event: str, detail: str = "", **fields: object) -> None:
        if detail:
            fields["detail"] = detail
        self.send(wire.FrameType.PROGRESS, stage=stage, event=event, **fields)

    def _write(self, data: bytes) -> None:
        if self._console:
            import binascii  # built in (base64.py is not frozen in: docs/guest.md)

            data = wire.CONSOLE_MARKER.encode() + binascii.b2a_base64(data, newline=True)
        try:
            _write_all(self._fd, data, WRITE_TIMEOUT)
            self.sent += 1
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET):
                # the other end went away: keep the frame for a reopen, or the console
                self.kmsg.log(3, f"report: {self.uri} closed by the host side: {exc}")
                self.close()
                self._pending.insert(0, data)
                return
            self.dropped += 1
            self.kmsg.log(3, f"report: frame lost on {self.uri}: {exc}")

    def spill_to_console(self) -> int:
        """Frames still pending at the end (the channel never opened, or broke) go to
        ``/dev/console`` as marker lines, so the host can still read why the guest
        stopped; returns how many."""
        if not self._pending:
            return 0
        self.close()
        try:
            self._fd, self._console = open_transport("console", self.root)
        except TransportError as exc:
            self.kmsg.log(3, f"report: {len(self._pending)} frames lost: {exc}")
            return 0
        pending, self._pending = self._pending, []
        for data in pending:
            self._write(data)
        self.kmsg.log(4, f"report: {len(pending)} frames sent on the console instead of "
                      f"{self.uri}")
        return len(pending)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _shrunk(ftype: wire.FrameType, fields: dict[str, object]) -> dict[str, object]:
    keep = {k: v for k, v in fields.items() if k in wire.REQUIRED[ftype] and k != "timeline"}
    if "timeline" in wire.REQUIRED[ftype]:
        keep["timeline"] = []
    for key, want in wire.REQUIRED[ftype].items():
        keep.setdefault(key, [] if want == (list,) else "")
        if isinstance(keep[key], str):
            keep[key] = str(keep[key])[: wire.MAX_STR]
    keep["error"] = "frame too large; fields dropped"
    return keep
