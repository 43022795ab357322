"""The fabric manager stand-in's partition API: an 8-GPU HGX partition table and the
server that the libnvfm stand-in (``libnvfm_standin.c``) talks to (issue #25).

The table is the Shared NVSwitch one of an HGX H100 8-GPU board, as NVIDIA's Fabric
Manager user guide lists it: one 8-GPU partition, two of 4 GPUs, four of 2 and eight of
1, with 18 NVLinks per GPU in every multi-GPU partition and none in a 1-GPU one.
The rules are the fabric manager's:
- a partition that shares a GPU with an active one cannot be activated (``FM_ST_IN_USE``);
- an unknown id is ``FM_ST_BADPARAM``;
- deactivating an inactive partition is ``FM_ST_UNINITIALIZED`` (nv_fm_agent.h);
- after a restart (``restart=True``, nv-fabricmanager ``--restart``) every partition
  call is ``FM_ST_NOT_CONFIGURED`` until the activated list is set again.

Requests from any number of clients are handled one at a time, in arrival order.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from collections.abc import Iterable

# fmReturn_t (guestinit/nvidia/fm_sdk.h)
SUCCESS, BADPARAM, NOT_SUPPORTED, IN_USE, NOT_CONFIGURED = 0, -1, -3, -7, -8
UNINITIALIZED = -4
NVLINKS_PER_GPU = 18  # NVLink4 on H100
LINE_RATE_MBPS = 25000
# id -> GPU physical ids (module ids 1..8)
HGX_8GPU: dict[int, tuple[int, ...]] = {
    0: (1, 2, 3, 4, 5, 6, 7, 8),
    1: (1, 2, 3, 4), 2: (5, 6, 7, 8),
    3: (1, 3), 4: (2, 4), 5: (5, 7), 6: (6, 8),
    **{6 + n: (n,) for n in range(1, 9)},
}
MAX_REQUEST = 4096  # bytes of one request line


def gpu_bdf(physical_id: int) -> str:
    return f"00000000:{0x17 + 0x10 * physical_id:02X}:00.0"


def gpu_uuid(physical_id: int) -> str:
    return f"GPU-5f3c{physical_id:04x}-1b2e-4c8d-9a70-00000000{physical_id:04x}"


class FabricState:
    """The partitions and which are active: what nv-fabricmanager keeps in memory."""

    def __init__(self, table: dict[int, tuple[int, ...]] | None = None,
                 restart: bool = False, crash_after: int = 0) -> None:
        self.table = dict(table or HGX_8GPU)
        self.active: set[int] = set()
        self.configured = not restart
        self.log: list[str] = []
        # a fault for tests: the process dies after answering this many activations
        self.crash_after = crash_after
        self.activations = 0

    def _check(self, pid: int) -> int:
        if not self.configured:
            return NOT_CONFIGURED
        return SUCCESS if pid in self.table else BADPARAM

    def activate(self, pid: int) -> int:
        rc = self._check(pid)
        if rc != SUCCESS:
            return rc
        if pid in self.active:
            return IN_USE
        busy = [a for a in sorted(self.active) if set(self.table[a]) & set(self.table[pid])]
        if busy:
            self.log.append(f"partition {pid} shares GPUs with active partition {busy[0]}")
            return IN_USE
        self.active.add(pid)
        self.activations += 1
        self.log.append(f"partition {pid} activated")
        return SUCCESS

    @property
    def crashing(self) -> bool:
        return bool(self.crash_after) and self.activations >= self.crash_after

    def deactivate(self, pid: int) -> int:
        rc = self._check(pid)
        if rc != SUCCESS:
            return rc
        if pid not in self.active:
            return UNINITIALIZED
        self.active.discard(pid)
        self.log.append(f"partition {pid} deactivated")
        return SUCCESS

    def set_activated(self, ids: Iterable[int]) -> int:
        if self.configured:
            return NOT_SUPPORTED  # only a restarted fabric manager takes the list
        wanted = list(ids)
        if any(i not in self.table for i in wanted):
            return BADPARAM
        self.active = set(wanted)
        self.configured = True
        self.log.append(f"activated list set: {sorted(wanted)}")
        return SUCCESS

    def listing(self) -> str:
        lines = []
        for pid, gpus in sorted(self.table.items()):
            links = NVLINKS_PER_GPU if len(gpus) > 1 else 0
            lines.append(f"P {pid} {int(pid in self.active)} {len(gpus)}")
            lines += [f"G {g} {gpu_uuid(g)} {gpu_bdf(g)} {links} {NVLINKS_PER_GPU} "
                      f"{LINE_RATE_MBPS}" for g in gpus]
        return "".join(f"{line}\n" for line in lines)

    def answer(self, line: str) -> str:
        """The reply to one request line (without its newline)."""
        verb, _, rest = line.partition(" ")
        try:
            args = [int(w) for w in rest.split()]
        except ValueError:
            return f"E {BADPARAM}\n"
        if verb == "LIST" and not args:
            rc = SUCCESS if self.configured else NOT_CONFIGURED
            return self.listing() + ".\n" if rc == SUCCESS else f"E {rc}\n"
        if verb in ("UNSUPPORTED", "FAILED") and not args:
            return ".\n"  # an HGX board with every NVLink trained supports them all
        if verb in ("ACTIVATE", "DEACTIVATE") and len(args) == 1:
            rc = (self.activate if verb == "ACTIVATE" else self.deactivate)(args[0])
        elif verb == "SET":
            rc = self.set_activated(args)
        else:
            return f"E {BADPARAM}\n"
        return ".\n" if rc == SUCCESS else f"E {rc}\n"


class Server:
    """Serve ``state`` on a listening socket until ``stop()``: each complete request line
    answered in turn, a line over MAX_REQUEST bytes ends that client."""

    def __init__(self, state: FabricState, listener: socket.socket) -> None:
        self.state, self.listener = state, listener
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="fake-fabric", daemon=True)

    @classmethod
    def unix(cls, state: FabricState, path: str) -> Server:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock.bind(path)
        sock.listen(8)
        return cls(state, sock)

    @classmethod
    def tcp(cls, state: FabricState, host: str, port: int) -> Server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(8)
        return cls(state, sock)

    def start(self) -> Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        self.thread.join(5)
        self.listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        buffers: dict[socket.socket, bytes] = {}
        while not self._stop.is_set():
            for key, _ in sel.select():
                if key.fileobj is self.listener:
                    conn, _ = self.listener.accept()
                    buffers[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                elif isinstance(key.fileobj, socket.socket):
                    self._serve(key.fileobj, buffers, sel)
        for conn in buffers:
            conn.close()

    def _serve(self, conn: socket.socket, buffers: dict[socket.socket, bytes],
               sel: selectors.BaseSelector) -> None:
        data = conn.recv(4096)
        buf = buffers[conn] + data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            conn.sendall(self.state.answer(line.decode(errors="replace")).encode())
            if self.state.crashing:  # the injected fault: gone, as a crashed process is
                os._exit(1)
        if not data or len(buf) > MAX_REQUEST:
            sel.unregister(conn)
            conn.close()
            del buffers[conn]
            return
        buffers[conn] = buf
