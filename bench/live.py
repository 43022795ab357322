"""The running guest, for a boot's ``on_ready`` hook: its QMP monitor, and its frames as
they arrive (a hot-plug test adds a device and waits for the guest to say it served it)."""

from __future__ import annotations

import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence
    from typing import Protocol

    from bench.qmp import Qmp
    from guestinit.wire import Frame

    class Received(Protocol):  # bench.boot.Received, which imports this module
        @property
        def frame(self) -> Frame: ...


class Live:
    __slots__ = ("_report", "_take", "frames", "qmp")

    def __init__(self, qmp: Qmp, report: socket.socket, take: Callable[[bytes], None],
                 frames: Sequence[Received]) -> None:
        self.qmp = qmp
        self._report = report
        self._take = take  # feeds the boot's frame reader: frames land in ``frames``
        self.frames = frames

    def wait(self, match: Callable[[Frame], bool], timeout: float,
             since: int = 0) -> Received | None:
        """The first frame from index ``since`` on that ``match``es, reading the report
        port until it comes or ``timeout`` seconds pass (None then)."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for received in self.frames[seen:]:
                if match(received.frame):
                    return received
            seen = len(self.frames)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._report], [], [], min(left, 0.2))
            if ready:
                try:
                    data = self._report.recv(65536)
                except BlockingIOError:
                    continue
                self._take(data)
                if not data:
                    return None  # the guest closed its end
