"""The local control socket (``/run/guestinit/control``): status as JSON.

One request line per connection (``status``, or nothing), one JSON reply, close.
The server runs inside PID 1, so a slow or silent client gets a small time budget
and is then answered or dropped: ``handle()`` never blocks longer than
``max_clients`` x ``client_budget`` seconds.
"""

from __future__ import annotations

import _socket as socket  # socket.py would import enum and selectors (boot path)
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_REQUEST = 256
MAX_REPLY = 4 << 20  # what query() accepts


def default_path(root: str = "/") -> str:
    return os.path.join(root, "run", "guestinit", "control")


class ControlServer:
    """``ControlServer(path, status)``: answers ``status`` with ``status()`` as JSON."""

    __slots__ = ("_sock", "client_budget", "max_clients", "path", "served", "status")

    def __init__(
        self,
        path: str,
        status: Callable[[], dict[str, object]],
        client_budget: float = 0.05,
        max_clients: int = 4,
    ) -> None:
        self.path = path
        self.status = status
        self.client_budget = client_budget
        self.max_clients = max_clients
        self.served = 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, mode=0o700, exist_ok=True)
                os.chmod(parent, 0o700)  # makedirs' mode is subject to the umask
            if os.path.lexists(path):
                os.unlink(path)  # a stale socket from an earlier run
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            hint = " (AF_UNIX paths are limited to 107 bytes: use a shorter root)" \
                if len(path.encode()) > 107 else ""
            raise OSError(exc.errno, f"bind control socket {path}: {exc.strerror or exc}{hint}") \
                from None
        sock.setblocking(False)
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def handle(self) -> None:
        """Serve up to ``max_clients`` pending connections; never blocks beyond their
        budgets (a silent client is answered as if it had asked for ``status``)."""
        for _ in range(self.max_clients):
            try:
                fd, _addr = self._sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # closed, or out of fds: try again on the next readiness
            conn = socket.socket(fileno=fd)
            try:
                self._serve(conn)
            finally:
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.client_budget
        request = self._read_line(conn, deadline)
        reply = self._reply(request)
        try:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            conn.sendall(reply)
        except OSError:
            return  # the client left or did not read in time: its loss, not PID 1's
        self.served += 1

    @staticmethod
    def _read_line(conn: socket.socket, deadline: float) -> str:
        data = b""
        while b"\n" not in data and len(data) < MAX_REQUEST:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn.settimeout(left)
            try:
                chunk = conn.recv(MAX_REQUEST - len(data))
            except OSError:
                break  # timeout or reset: answer what we have
            if not chunk:
                break
            data += chunk
        return data.partition(b"\n")[0].decode("utf-8", "replace").strip()

    def _reply(self, request: str) -> bytes:
        import json  # only when someone asks: keeps PID 1's imports cheap

        if request in ("", "status"):
            try:
                body: dict[str, object] = self.status()
            except Exception as exc:  # a status bug must not take PID 1 down with it
                body = {"error": f"status failed: {type(exc).__name__}: {exc}"}
        else:
            body = {"error": f"unknown request {request[:64]!r}; expected 'status'"}
        return (json.dumps(body, default=str, sort_keys=True) + "\n").encode()

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                return


def query(path: str, timeout: float = 2.0) -> dict[str, object]:
    """Ask the init at ``path`` for its status; raises OSError naming the socket."""
    import json

    try:
        import socket as stdsocket  # the client side (host, CLI): not the boot path

        with stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            try:
                sock.sendall(b"status\n")
            except BrokenPipeError:
                # a client slower than the init's budget is answered as if it had asked
                # for status, and the connection closed: the reply is still to be read
                pass
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_REPLY:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    if not chunks:
                        raise
                    break  # the init closed with our late request unread: the reply is whole
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except OSError as exc:
        raise OSError(exc.errno, f"query guestinit control socket {path}: "
                      f"{exc.strerror or exc} (is guestinit running, and is the root right?)") \
            from None
    if size > MAX_REPLY:
        raise ValueError(f"reply from {path} is over {MAX_REPLY} bytes")
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ValueError(f"reply from {path} is not JSON: {exc}") from None
    if not isinstance(reply, dict):
        raise ValueError(f"reply from {path} is {type(reply).__name__}, expected an object")
    return reply
