"""The harness's I/O with QEMU: the sockets it listens on before QEMU connects, the
serial console read live (frames in its marker lines included), the line shown while
waiting, and QEMU's peak RSS."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import BinaryIO, TextIO

from guestinit.wire import CONSOLE_MARKER, Frame, FrameError, iter_console

CONNECT_SECONDS = 15.0
MAX_CONSOLE_LINE = 256 * 1024  # longer than any frame's marker line


class Progress:
    """One status line while waiting: rewritten in place on a tty, every 5 s otherwise."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self.next_at = 0.0

    def show(self, elapsed: float, waiting_for: str, last: str) -> None:
        if self.stream is None or elapsed < self.next_at:
            return
        line = f"  {elapsed:5.1f}s  waiting for {waiting_for}; last seen: {last}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.next_at = elapsed + 0.5
        else:
            self.stream.write(line + "\n")
            self.next_at = elapsed + 5.0
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def listen(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    return sock


def accept(listener: socket.socket, child: subprocess.Popen[bytes], what: str) -> socket.socket:
    deadline = time.monotonic() + CONNECT_SECONDS
    listener.settimeout(0.1)
    while True:
        try:
            conn, _ = listener.accept()
            conn.settimeout(None)
            return conn
        except TimeoutError:
            pass
        if child.poll() is not None:
            raise RuntimeError(f"QEMU exited (status {child.returncode}) before connecting {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU did not connect {what} within {CONNECT_SECONDS}s")


def peak_rss_kib(pid: int, proc_dir: str = "/proc") -> int | None:
    """A live process's peak resident set (``VmHWM``) in KiB; None once it is gone."""
    try:
        with open(os.path.join(proc_dir, str(pid), "status")) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_text(path: str, limit: int = 4000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()[-limit:]
    except OSError:
        return ""


class Console:
    """The serial console, read from its socket into the log file as it arrives.

    Reading it live (instead of QEMU writing a file) gives the host time of the
    guest's first output and lets ``hold_until`` look at what has come so far.
    """

    def __init__(self, sock: socket.socket, log: BinaryIO) -> None:
        self.sock, self.log = sock, log
        self.seen = b""  # the tail kept for hold_until matches across reads
        self.partial = b""  # a console line not yet ended
        sock.setblocking(False)

    def frames(self, data: bytes) -> list[Frame | FrameError]:
        """Log ``data``; the frames of the marker lines it completes."""
        self.log.write(data)
        self.log.flush()
        self.seen = (self.seen + data)[-8192:]
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-MAX_CONSOLE_LINE:]
        marked = [line for line in lines if CONSOLE_MARKER.encode() in line]
        return list(iter_console(b"\n".join(marked).decode("ascii", "replace"))) if marked else []


def recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""
    except OSError:
        return b""


# What the image's launcher and its entry code print when guestinit cannot run at all
# (rootfs/launcher.c): no frame can say it, the console does.
START_FAILURES = ("guestinit-launcher: ", "guestinit: cannot start: ")
KERNEL_LAST_WORDS = ("is corrupted", "Kernel panic", "VFS: Cannot open root device")


def last_words(console_log: str) -> str:
    """Why a guest stopped before its init could report: the launcher's or the init's
    start-up failure line, else the kernel's own last words."""
    text = read_text(console_log, limit=16384)
    said = [line.strip() for line in text.splitlines() if line.startswith(START_FAILURES)]
    if said:
        return said[-1][:300]
    # no init ran: the kernel's own last words (a verity root that fails its hash tree
    # panics in mount_root; Kata's panic=1 then reboots, which -no-reboot ends)
    kernel = [line.split("] ", 1)[-1].strip() for line in text.splitlines()
              if any(k in line for k in KERNEL_LAST_WORDS)]
    return "; ".join(dict.fromkeys(kernel))[:400]
