"""``guestinit-bench listen URI``: print the frames a guest sends, one line each.

URIs: ``unix:PATH`` (listen on a Unix socket, e.g. a QEMU chardev connects to
it), ``vsock:CID:PORT`` (listen with AF_VSOCK; CID ``any`` binds every CID),
``hvsock:UDS:PORT`` and ``hvsock-connect:UDS:PORT`` (the hybrid vsock of Firecracker
and Cloud Hypervisor, below), ``console:FILE`` (decode marker lines from a console
log; ``-`` is stdin). Malformed input becomes an ``error:`` line, never a crash.

Hybrid vsock: the VMM's vsock device is a Unix socket ``UDS`` on the host. A guest
that connects to the host (CID 2) on port P reaches whoever listens on ``UDS_P``:
``hvsock:UDS:P`` listens there (this is how guestinit's default ``vsock:2:1040``
report arrives). The other way, the host connects to ``UDS`` and sends
``CONNECT P\n``; the VMM answers ``OK <host port>\n`` and the stream is then the
guest's listener on P: ``hvsock-connect:UDS:P`` does that, for a guest that listens.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import TextIO

from bench.render import frame_line
from bench.report import plain
from guestinit.wire import Frame, FrameError, FrameReader, iter_console

VMADDR_CID_ANY = 0xFFFFFFFF
HANDSHAKE_SECONDS = 5.0


class UriError(ValueError):
    """A listen URI this tool does not understand."""


class Printer:
    """Writes frames and errors as text or JSON lines; counts errors for the exit status."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.frames = 0
        self.errors = 0

    def __call__(self, item: Frame | FrameError) -> None:
        if isinstance(item, FrameError):
            self.errors += 1
            line = json.dumps({"error": str(item)}) if self.as_json else f"error: {item}"
        else:
            self.frames += 1
            line = json.dumps(plain(item.to_map())) if self.as_json else frame_line(item)
        self.out.write(line + "\n")
        self.out.flush()


def read_stream(sock: socket.socket, emit: Callable[[Frame | FrameError], None]) -> None:
    """Decode one connection until EOF."""
    reader = FrameReader()
    while True:
        try:
            data = sock.recv(65536)
        except OSError as exc:
            emit(FrameError(f"connection broke: {exc}"))
            return
        if not data:
            break
        for item in reader.feed(data):
            emit(item)
    for err in reader.eof():
        emit(err)


class FramePump:
    """The host end of one guest's ``unix:PATH`` report channel, read a slice at a time:
    ``pump(timeout)`` accepts the guest's connection and decodes what arrives into
    ``frames`` and ``errors`` (malformed input, a stream cut inside a frame)."""

    def __init__(self, path: str, backlog: int = 1) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(backlog)
        self.conn: socket.socket | None = None
        self.eof = False
        self.reader = FrameReader()
        self.frames: list[Frame] = []
        self.errors: list[FrameError] = []

    def pump(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the connection or data; whether data arrived."""
        if self.conn is None:
            self.listener.settimeout(timeout)
            try:
                self.conn, _ = self.listener.accept()
            except TimeoutError:
                return False
        if self.eof:
            time.sleep(timeout)
            return False
        self.conn.settimeout(timeout)
        try:
            data = self.conn.recv(65536)
        except TimeoutError:
            return False
        items: list[Frame | FrameError] = []
        if data:
            items = self.reader.feed(data)
        else:
            self.eof = True
            items += self.reader.eof()
        for item in items:
            if isinstance(item, FrameError):
                self.errors.append(item)
            else:
                self.frames.append(item)
        return bool(data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def _uds_port(uri: str, rest: str) -> tuple[str, int]:
    uds, _, port_s = rest.rpartition(":")
    if not uds or not port_s.isdigit() or not 0 < int(port_s) < 2**32:
        kind = uri.partition(":")[0]
        raise UriError(f"listen URI {uri!r}: want {kind}:UDS:PORT, e.g. "
                       f"{kind}:/run/vm/vsock.sock:1040")
    return uds, int(port_s)


def hvsock_connect(uri: str, timeout: float = HANDSHAKE_SECONDS) -> socket.socket:
    """Connect to a hybrid vsock UDS and open port P (``CONNECT P`` -> ``OK ...``)."""
    uds, port = _uds_port(uri, uri.partition(":")[2])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(uds)
        sock.sendall(f"CONNECT {port}\n".encode())
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < 64:
            chunk = sock.recv(1)  # byte by byte: what follows the line is the guest's
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        sock.close()
        raise UriError(f"{uri}: {exc.strerror or exc} (is the VMM's vsock socket {uds} "
                       "there?)") from None
    if not reply.startswith(b"OK "):
        sock.close()
        raise UriError(f"{uri}: the VMM answered {reply.decode(errors='replace')!r} to "
                       f"CONNECT {port} (nothing listens on that port in the guest?)")
    sock.settimeout(None)
    return sock


def unix_path(uri: str) -> str | None:
    """The Unix socket a ``unix:`` or ``hvsock:`` URI listens on (``UDS_PORT``)."""
    kind, _, rest = uri.partition(":")
    if kind == "hvsock":
        uds, port = _uds_port(uri, rest)
        return f"{uds}_{port}"
    return rest if kind == "unix" and rest else None


def _bound(uri: str) -> socket.socket:
    kind, _, rest = uri.partition(":")
    path = unix_path(uri)
    if path is not None:
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        return sock
    if kind == "vsock":
        cid_s, _, port_s = rest.partition(":")
        try:
            cid = VMADDR_CID_ANY if cid_s in ("any", "-1") else int(cid_s)
            port = int(port_s)
        except ValueError:
            raise UriError(
                f"listen URI {uri!r}: want vsock:CID:PORT, e.g. vsock:any:1040"
            ) from None
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.bind((cid, port))
        except OSError as exc:
            raise UriError(
                f"listen {uri}: {exc} (is the vhost_vsock module loaded? use unix: or console:)"
            ) from None
        return sock
    raise UriError(f"listen URI {uri!r}: want unix:PATH, vsock:CID:PORT, hvsock:UDS:PORT, "
                   "hvsock-connect:UDS:PORT or console:FILE")


def listen(uri: str, emit: Printer, *, keep: bool = False) -> None:
    """Serve ``uri``: one connection (a boot), or every connection with ``keep``."""
    kind, _, rest = uri.partition(":")
    if kind == "console":
        _console(rest, emit)
        return
    if kind == "hvsock-connect":
        with hvsock_connect(uri) as conn:
            read_stream(conn, emit)
        return
    sock = _bound(uri)
    try:
        sock.listen(1)
        while True:
            conn, _ = sock.accept()
            with conn:
                read_stream(conn, emit)
            if not keep:
                return
    finally:
        sock.close()
        path = unix_path(uri)
        if path is not None and os.path.exists(path):
            os.unlink(path)


def _console(path: str, emit: Callable[[Frame | FrameError], None]) -> None:
    if not path:
        raise UriError("listen URI 'console:': name the log file, e.g. console:out/console.log")
    if path == "-":
        items: Iterable[Frame | FrameError] = iter_console(sys.stdin.read())
    else:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as exc:
            raise UriError(f"listen console:{path}: {exc.strerror}") from None
        items = iter_console(text)
    for item in items:
        emit(item)
