"""The service VM's partition service (issue #25): the host's requests, the fabric manager's
partitions.

A host controller connects (vsock from the host CID only, or a Unix socket in tests) and
sends ``request`` frames (guestinit.wire): ``op`` is ``list``, ``activate``,
``deactivate`` or ``status``, ``id`` the partition, ``by`` who asks. Each request gets
one ``reply`` frame: ``status`` ``ok`` with ``partitions`` (and ``audit`` for a change),
or ``error`` with ``error`` naming the cause. Requests are handled one at a time, in
arrival order, from any number of connections.

Every activation and deactivation is an audit event (who asked, which GPUs), kept,
printed and sent in the reply. What the service activated is also remembered: when the
fabric manager restarts, the next call fails with FM_ST_CONNECTION_NOT_VALID or
FM_ST_NOT_CONFIGURED, and the service reconnects, gives it that list
(fmSetActivatedFabricPartitions) and retries.

Bad input costs that connection only: a frame over MAX_REQUEST bytes or one that does
not decode gets an error reply, then the connection is closed; an unknown op or a missing
id gets an error reply.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import sys
import time

from guestinit import wire
from guestinit.nvidia.daemon_ready import PARTITIONS_MARKER  # the init waits for it
from guestinit.nvidia.fabric import Fabric, FabricError, Partition
from guestinit.wire import Frame, FrameError, FrameReader, FrameType

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_REQUEST = 4096  # bytes of one request frame (a request is a few fields)
MAX_AUDIT = 200
OPS = ("list", "activate", "deactivate", "status")
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2
RETRY = ("FM_ST_CONNECTION_NOT_VALID", "FM_ST_NOT_CONFIGURED")  # a restarted fabric manager
BOOT_ID = "partition-service"


def table(parts: list[Partition]) -> list[dict[str, object]]:
    return [{"id": p.id, "active": int(p.active), "gpus": [g.physical_id for g in p.gpus],
             "nvlinks": p.nvlinks} for p in parts]


class PartitionService:
    """Requests in, replies out; ``connect`` opens a Fabric (again after a restart)."""

    def __init__(self, connect: Callable[[], Fabric],
                 audit: Callable[[str], None] | None = None) -> None:
        self._connect = connect
        self._fm: Fabric | None = None
        self._print = audit or (lambda line: print(f"audit: {line}", file=sys.stderr,
                                                   flush=True))
        self.activated: set[int] = set()
        self.audit: list[str] = []

    def _audit(self, line: str) -> str:
        self.audit = [*self.audit, line][-MAX_AUDIT:]
        self._print(line)
        return line

    def _fabric(self, call: Callable[[Fabric], object]) -> object:
        """``call`` on the connection; a restarted fabric manager is reconnected and told
        the activated list once, then ``call`` is tried again."""
        restored = False
        while True:
            try:
                if self._fm is None:
                    self._fm = self._connect()
                return call(self._fm)
            except FabricError as exc:
                if exc.name not in RETRY or restored:
                    raise
                restored = True
                if self._fm is not None:
                    self._fm.close()
                    self._fm = None  # a failed reconnect leaves none: the next call tries
                self._fm = self._connect()
                try:
                    self._fm.set_activated(sorted(self.activated))
                except FabricError as again:
                    if again.name != "FM_ST_NOT_SUPPORTED":  # it had not restarted after all
                        raise
                else:
                    self._audit(f"fabric manager restarted: activated list restored "
                                f"{sorted(self.activated)}")

    def _partitions(self) -> list[Partition]:
        parts = self._fabric(lambda fm: fm.partitions())
        assert isinstance(parts, list)
        self.activated = {p.id for p in parts if p.active}
        return parts

    def handle(self, req: Frame) -> Frame:
        op, pid = req.get("op"), req.get("id")
        # who asks goes into the audit trail and syslog: one printable line, bounded
        by = "".join(c if c.isprintable() else "?" for c in str(req.get("by") or "unknown"))[:64]
        if req.type is not FrameType.REQUEST or op not in OPS:
            return reply(str(op), error=f"unknown request {req.type.value} {op!r}: want op "
                         "list, activate ID, deactivate ID or status")
        try:
            if op == "list":
                return reply(op, partitions=table(self._partitions()))
            if op == "status":
                return reply(op, partitions=table(self._partitions()), audit=self.audit[-20:])
            if not isinstance(pid, int) or pid < 0:
                return reply(op, error=f"{op} needs a partition id (id, a number)")
            parts = {p.id: p for p in self._partitions()}
            if pid not in parts:
                return reply(op, error=f"{op} {pid}: no such partition (the fabric has "
                             f"{', '.join(map(str, sorted(parts)))})")
            gpus = ",".join(str(g.physical_id) for g in parts[pid].gpus)
            if op == "activate":
                self._fabric(lambda fm: fm.activate(pid))
                self.activated.add(pid)
            else:
                self._fabric(lambda fm: fm.deactivate(pid))
                self.activated.discard(pid)
            line = self._audit(f"{op} partition {pid} gpus {gpus} by {by}")
        except FabricError as exc:
            if op in ("activate", "deactivate"):
                self._audit(f"{op} partition {pid} by {by} refused: {exc.name}")
            return reply(op, error=str(exc))
        try:  # the change is done; the table after it is a courtesy
            return reply(op, partitions=table(self._partitions()), audit=[line])
        except FabricError:
            return reply(op, audit=[line])

    def serve(self, listener: socket.socket, running: Callable[[], bool] = lambda: True,
              host_only: bool = False) -> None:
        """Answer every connection on ``listener`` until ``running()`` is false (checked
        at least every 0.5 s); ``host_only``: a vsock peer that is not the host is refused."""
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        clients: dict[socket.socket, tuple[FrameReader, list[int]]] = {}
        try:
            while running():
                for key, _ in sel.select(0.5):
                    if key.fileobj is listener:
                        conn, peer = listener.accept()
                        if host_only and peer[0] != VMADDR_CID_HOST:
                            self._print(f"refused a connection from CID {peer[0]}")
                            conn.close()
                            continue
                        clients[conn] = (FrameReader(), [0])
                        sel.register(conn, selectors.EVENT_READ)
                    else:
                        conn = key.fileobj  # type: ignore[assignment]
                        if not self._serve_one(conn, *clients[conn]):
                            sel.unregister(conn)
                            conn.close()
                            del clients[conn]
        finally:
            for conn in clients:
                conn.close()
            sel.close()

    def _serve_one(self, conn: socket.socket, reader: FrameReader, pending: list[int]) -> bool:
        """Read from one client and answer what completed; False: close it."""
        try:
            data = conn.recv(MAX_REQUEST + wire.HEADER.size)
        except OSError:
            return False
        return bool(data) and self.feed(conn, reader, pending, data)

    def feed(self, conn: socket.socket, reader: FrameReader, pending: list[int],
             data: bytes) -> bool:
        """Answer what ``data`` completes on ``conn``; False: that stream is done."""
        pending[0] += len(data)
        if pending[0] > MAX_REQUEST + wire.HEADER.size:
            send(conn, reply("?", error=f"request over {MAX_REQUEST} bytes: closed"))
            return False
        for item in reader.feed(data):
            if isinstance(item, FrameError):
                send(conn, reply("?", error=f"malformed request: {item}"))
                return False
            pending[0] = 0
            send(conn, self.handle(item))
        return not reader.closed


def reply(op: str, error: str = "", **fields: object) -> Frame:
    body = {"op": op, "status": "error" if error else "ok", **fields}
    if error:
        body["error"] = error[:wire.MAX_STR]
    return Frame(FrameType.REPLY, BOOT_ID, time.monotonic_ns(), body)


def send(conn: socket.socket, frame: Frame) -> None:
    try:
        conn.sendall(wire.encode(frame))
    except OSError:
        pass  # the client went away: nothing to tell it


class PortStream:
    """A virtio-serial port (``/dev/virtio-ports/NAME``) as one client connection: the host
    end is a socket a VMM chardev gives the host (what the VM tier uses: its host has no
    vsock). Reads wait up to 0.5 s; EOF (the host side closed) is retried, not an end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], 0.5)
        data = os.read(self.fd, size) if ready else b""
        if ready and not data:
            time.sleep(0.2)  # no host connected: wait for one
        return data

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        os.close(self.fd)


def serve_port(service: PartitionService, path: str,
               running: Callable[[], bool] = lambda: True) -> None:
    """Answer requests on a virtio-serial port until ``running()`` is false; a malformed or
    oversized request gets its error reply and the port's reader starts over."""
    port = PortStream(path)
    try:
        while running():
            reader, pending = FrameReader(), [0]
            while running():
                data = port.recv(MAX_REQUEST + wire.HEADER.size)
                if data and not service.feed(port, reader, pending, data):  # type: ignore[arg-type]
                    break
    finally:
        port.close()


def listener(spec: str) -> tuple[socket.socket, bool]:
    """``vsock:PORT`` (any CID, host peers only) or ``unix:PATH``; (socket, host_only)."""
    kind, _, rest = spec.partition(":")
    if kind == "vsock" and rest.isdigit():
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((VMADDR_CID_ANY, int(rest)))
        host_only = True
    elif kind == "unix" and rest:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(rest):
            os.unlink(rest)
        sock.bind(rest)
        host_only = False
    else:
        raise ValueError(f"--listen {spec!r}: want vsock:PORT or unix:PATH")
    sock.listen(8)
    return sock, host_only


class _Syslog:
    """Lines to the syslog socket at ``path`` as ``guestinit-partitions`` (the stdlib's
    SysLogHandler: the syslog module only knows /dev/log)."""

    def __init__(self, path: str) -> None:
        import logging
        import logging.handlers

        self.logger = logging.getLogger("guestinit-partitions")
        handler = logging.handlers.SysLogHandler(
            address=path, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("guestinit-partitions: %(message)s"))
        self.logger.addHandler(handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False

    def info(self, text: str) -> None:
        self.logger.info(text)

    def notice(self, text: str) -> None:
        self.logger.warning(text)  # logging has no NOTICE: an audit event is a warning-level line

    def error(self, text: str) -> None:
        self.logger.error(text)


def main(argv: list[str] | None = None) -> int:
    """``python3 -m guestinit.nvidia.partitions --listen vsock:PORT --fm ADDRESS``
    (ADDRESS: a Unix socket path, or a.b.c.d[:port])."""
    import argparse

    p = argparse.ArgumentParser(prog="guestinit-partitions")
    p.add_argument("--listen", default="vsock:1050")
    p.add_argument("--fm", default="127.0.0.1", help="the fabric manager's API address")
    p.add_argument("--syslog", default="/dev/log", help="the syslog socket (a test root's)")
    args = p.parse_args(argv)
    unix = args.fm.startswith("/")
    log = _Syslog(args.syslog)

    def audit(line: str) -> None:
        log.notice(f"audit: {line}")

    service = PartitionService(lambda: Fabric(args.fm, unix=unix), audit)
    kind, _, rest = args.listen.partition(":")
    try:
        if kind == "virtio-port":
            from guestinit.report import find_virtio_port

            found = rest if rest.startswith("/") else find_virtio_port("/", rest)
            if found is None:
                raise ValueError(f"no virtio-serial port named {rest} (sysfs virtio-ports)")
            path = found
            port = PortStream(path)
            port.close()  # it exists and opens: serve_port opens it for good
        else:
            sock, host_only = listener(args.listen)
    except (ValueError, OSError) as exc:
        log.error(f"cannot listen on {args.listen}: {exc}")
        print(f"guestinit-partitions: {args.listen}: {exc}", file=sys.stderr)
        return 2
    log.info(f"{PARTITIONS_MARKER} {args.listen}, fabric manager at {args.fm}")
    if kind == "virtio-port":
        serve_port(service, path)
    else:
        service.serve(sock, host_only=host_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
