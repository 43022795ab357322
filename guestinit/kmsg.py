"""The init's own log: lines written to /dev/kmsg, so they land in the kernel ring
(and on the console) next to the kernel's messages.

PID 1 must never die because logging failed: ``Kmsg`` never raises. When the
device cannot be opened (before devtmpfs is mounted, or in tests) lines go to a
fallback stream (stderr by default) and the open is retried on the next line.

Note: unless the kernel runs with ``printk.devkmsg=on`` (or
``/proc/sys/kernel/printk_devkmsg`` says ``on``), the kernel itself rate-limits
writes to /dev/kmsg to a burst of 10 lines per 5 s per open file.
"""

from __future__ import annotations

import os
import sys

from guestinit.values import LogLevel

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

# The kernel keeps at most ~1 KiB per record (PRINTKRB_RECORD_MAX / LOG_LINE_MAX
# minus the header); longer writes are cut by the kernel mid-character, so cut
# ourselves, on a UTF-8 boundary.
MAX_LINE = 976
TAG = "guestinit: "


def clip(data: bytes, limit: int) -> bytes:
    """UTF-8 ``data`` cut to at most ``limit`` bytes without splitting a character."""
    if len(data) <= limit:
        return data
    # "ignore" drops only the partial character at the cut: ``data`` is valid UTF-8.
    return data[:limit].decode("utf-8", "ignore").encode()


class Kmsg:
    """``Kmsg().log(6, "text")`` writes ``<6>guestinit: text`` to /dev/kmsg."""

    __slots__ = ("_fallback", "_fd", "level", "path", "write_errors")

    def __init__(
        self,
        path: str = "/dev/kmsg",
        level: LogLevel = LogLevel.INFO,
        fallback: TextIO | None = None,
    ) -> None:
        self.path = path
        self.level = level
        self._fallback = fallback
        self._fd: int | None = None
        self.write_errors = 0  # writes that failed on the device and went to the fallback
        self._open()

    def _open(self) -> bool:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            self._fd = None
            return False
        return True

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def set_level(self, level: LogLevel | int) -> None:
        self.level = LogLevel(level)

    def log(self, level: int, text: str) -> None:
        """Write ``text`` at syslog priority ``level`` (3 err, 4 warn, 6 info, 7 debug)
        if ``level`` passes the threshold; one record per line of ``text``."""
        if level > self.level or level < 0:
            return
        prefix = f"<{level}>{TAG}".encode()
        for line in text.rstrip("\n").split("\n"):
            body = line.encode("utf-8", "replace")
            self._write(prefix + clip(body, MAX_LINE - 1 - len(prefix)) + b"\n")

    def raw(self, line: str) -> None:
        """Write a record already formatted with its ``<PRI>`` prefix (the syslog
        forwarder's lines); not filtered by ``level`` (the caller decides)."""
        if self.level == LogLevel.OFF:
            return
        data = clip(line.rstrip("\n").encode("utf-8", "replace"), MAX_LINE - 1) + b"\n"
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._fd is None and not self._open():
            self._to_fallback(data)
            return
        assert self._fd is not None
        try:
            os.write(self._fd, data)
        except OSError:
            # EAGAIN / EINVAL / EIO: the line is not lost, it goes to the fallback.
            self.write_errors += 1
            self._to_fallback(data)

    def _to_fallback(self, data: bytes) -> None:
        stream = self._fallback if self._fallback is not None else sys.stderr
        if stream is None:  # stdio closed (python3 -I -S with no console)
            return
        try:
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()
        except (OSError, ValueError):
            # A closed or broken stream: nothing left to tell, and PID 1 must go on.
            return

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                return


# Kernel lines the boot report carries (the console may not show them: ``quiet``).
KERNEL_MARKS = (
    ("run_init_ns", ("Run /init as init process", "Run /sbin/init as init process")),
    ("crng_ready_ns", ("random: crng init done",)),
)
MAX_RECORDS = 20000
# PCI set-up before init: the root bridge line, the last device/bus line of the scan
# (before resource assignment begins), and the last PCI line before init ran. The
# bench's bar-sweep reads enumeration time from these.
PCI_ROOT = ("ACPI: PCI Root Bridge", "PCI host bridge to bus")
PCI_LINE = ("pci ", "pci_bus ")


class _PciMarks:
    __slots__ = ("assigning", "found")

    def __init__(self) -> None:
        self.found: dict[str, int] = {}
        self.assigning = False

    def take(self, ns: int, text: str) -> None:
        if "pci_root_ns" not in self.found:
            if text.startswith(PCI_ROOT):
                self.found["pci_root_ns"] = ns
            return
        if not text.startswith(PCI_LINE):
            return
        # resource assignment (a later initcall) starts with a BAR "assigned" or a bus's
        # "resource N" line ("root bus resource" lines belong to the scan)
        self.assigning = self.assigning or "assigned" in text or (
            text.startswith("pci_bus ") and ": resource " in text)
        if not self.assigning:
            self.found["pci_scanned_ns"] = ns
        self.found["pci_done_ns"] = ns


def parse_record(record: bytes) -> tuple[int, str] | None:
    """``b"6,339,1552563,-;text\\n KEY=v"`` -> (timestamp ns, text); None if malformed."""
    head, sep, rest = record.partition(b";")
    fields = head.split(b",")
    if not sep or len(fields) < 3 or not fields[2].isdigit():
        return None
    text = rest.split(b"\n", 1)[0].decode("utf-8", "replace")
    return int(fields[2]) * 1000, text


def kernel_marks(path: str = "/dev/kmsg") -> dict[str, int]:
    """When the kernel ran init, when its CRNG was ready and the PCI marks, from the kernel
    ring (ns, CLOCK_BOOTTIME); only the marks found. Reads what is there, never waits."""
    found: dict[str, int] = {}
    pci = _PciMarks()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return found
    try:
        for _ in range(MAX_RECORDS):
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # records overwritten while we read: go on
                continue
            except OSError:
                break
            if not record:
                break
            parsed = parse_record(record)
            if parsed is None:
                continue
            ns, text = parsed
            if "run_init_ns" not in found:
                pci.take(ns, text)
            for key, texts in KERNEL_MARKS:
                if key not in found and text.startswith(texts):
                    found[key] = ns
            if len(found) == len(KERNEL_MARKS):
                break
    finally:
        os.close(fd)
    return found | pci.found
