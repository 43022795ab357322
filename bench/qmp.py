"""A minimal QMP client over an already-accepted socket (QEMU connected to us)."""

from __future__ import annotations

import json
import socket
import time

MAX_LINE = 1 << 20


class QmpError(RuntimeError):
    """QMP said no, went quiet, or sent something that is not QMP."""


class Qmp:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self.events: list[dict[str, object]] = []

    def _line(self, deadline: float) -> dict[str, object]:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QMP: no reply in time")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise QmpError(f"QMP socket: {exc}") from None
            if not chunk:
                raise QmpError("QMP: QEMU closed the monitor (it exited)")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise QmpError(f"QMP: line longer than {MAX_LINE} bytes")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"QMP: not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"QMP: not an object: {line[:200]!r}")
        return msg

    def handshake(self, timeout: float = 10.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        greeting = self._line(deadline)
        if "QMP" not in greeting:
            raise QmpError(f"QMP: expected the greeting, got {greeting!r}")
        self.execute("qmp_capabilities", timeout=timeout)
        return greeting

    def execute(self, command: str, timeout: float = 10.0, **arguments: object) -> object:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QMP {command}: {exc}") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._line(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"QMP {command}: {reply['error']!r}")
            if "return" in reply:
                return reply["return"]
            raise QmpError(f"QMP {command}: unexpected reply {reply!r}")
