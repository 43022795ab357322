"""Kernel uevents after ready: pyudev's netlink monitor, and a bounded, coalescing queue.

There is no udevd in the guest: the monitor listens to the kernel's own uevents
(``Monitor.from_netlink(context, source="kernel")``, netlink group 1), filtered to one
subsystem. pyudev 0.24 finds libudev with ``ctypes.util.find_library``, which runs
``ldconfig -p`` (no ldconfig in the image; ~0.8 s under TCG when discovery used it at
boot): ``Monitor`` names the soname the image ships instead (Debian's libudev1),
which the dynamic loader finds on its default path. None of this is imported before
ready (``Init.main_loop`` opens the monitor after the ``ready`` frame).

An event is the uevent's properties (``ACTION``, ``DEVPATH``, ``SUBSYSTEM``,
``PCI_SLOT_NAME``, ``SEQNUM``...): never the device's sysfs, which a ``remove`` has
already taken away. ``EventQueue`` keeps, per device, only what the consumer must act
on: the last presence (``add``/``remove``) and whether a ``remove`` came in between, so
a storm of events for a few devices costs a few entries; beyond ``limit`` devices the
queue says so (``overflowed``) and the consumer rescans instead of trusting it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

LIBUDEV = "libudev.so.1"  # Debian's libudev1; the image's profile lists the package
RCVBUF = 1 << 20  # bytes the kernel buffers for us before events are lost (ENOBUFS)
MAX_BATCH = 64  # events taken per wakeup: the main loop gets back to its other fds
PRESENCE = ("add", "remove")


class Event:
    """One uevent, from its properties; ``key`` names the device (its PCI address when
    the kernel gives one, else the last part of its sysfs path)."""

    __slots__ = ("action", "devpath", "key", "received_ns", "seqnum", "subsystem")

    def __init__(self, props: Mapping[str, str], received_ns: int = 0) -> None:
        self.action = props.get("ACTION", "")
        self.devpath = props.get("DEVPATH", "")
        self.subsystem = props.get("SUBSYSTEM", "")
        seq = props.get("SEQNUM", "")
        self.seqnum = int(seq) if seq.isdigit() else -1
        self.key = (props.get("PCI_SLOT_NAME") or os.path.basename(self.devpath)).lower()
        self.received_ns = received_ns

    def __repr__(self) -> str:
        return f"Event({self.action} {self.key} seq {self.seqnum})"


class Pending:
    """What the queue holds for one device: its last presence, and whether it went away
    at some point (a ``remove`` then ``add`` is a new card in the slot: both count)."""

    __slots__ = ("event", "removed")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.removed = event.action == "remove"


class EventQueue:
    """Per-device coalescing in arrival order, at most ``limit`` devices."""

    __slots__ = ("_items", "coalesced", "limit", "overflowed", "received")

    def __init__(self, limit: int = 256) -> None:
        self._items: dict[str, Pending] = {}
        self.limit = limit
        self.received = 0
        self.coalesced = 0  # events folded into one already queued
        self.overflowed = 0  # events dropped because the queue was full

    def __len__(self) -> int:
        return len(self._items)

    def push(self, event: Event) -> None:
        self.received += 1
        if event.action not in PRESENCE and event.action != "bind":
            return  # change, unbind, move...: nothing the consumer acts on
        held = self._items.get(event.key)
        if held is None:
            if len(self._items) >= self.limit:
                self.overflowed += 1
                return
            self._items[event.key] = Pending(event)
            return
        self.coalesced += 1
        if event.action == "bind":
            return  # a driver bound what is already queued: the queued add covers it
        held.removed = held.removed or event.action == "remove"
        held.event = event

    def take(self) -> Iterator[Pending]:
        """Everything queued, oldest device first; the queue is empty afterwards."""
        items, self._items = self._items, {}
        yield from items.values()


def _soname(name: str) -> str | None:
    return LIBUDEV if name == "udev" else None


class Monitor:
    """``Monitor(subsystem)``: the kernel's uevents for ``subsystem``, non-blocking.

    Raises ``OSError`` naming what is missing (pyudev, libudev) or what the kernel
    refused; ``receive()`` returns the properties of up to ``MAX_BATCH`` events and
    counts lost ones (``lost``: the socket buffer overflowed, ENOBUFS)."""

    __slots__ = ("_monitor", "lost")

    def __init__(self, subsystem: str) -> None:
        try:
            from pyudev._ctypeslib import utils

            utils.find_library = _soname  # see the module doc
            import pyudev
        except ImportError as exc:
            raise OSError(f"pyudev is not in the image ({exc}): add the pyudev wheel to "
                          "the profile's wheels") from None
        try:
            context = pyudev.Context()
        except ImportError as exc:  # pyudev raises it when the library does not load
            raise OSError(f"{LIBUDEV} did not load ({exc}): add libudev1 to the profile's "
                          "debs") from None
        except OSError as exc:
            raise OSError(f"{LIBUDEV} did not load: {exc}") from None
        monitor = pyudev.Monitor.from_netlink(context, source="kernel")
        monitor.filter_by(subsystem)
        try:
            monitor.set_receive_buffer_size(RCVBUF)  # SO_RCVBUFFORCE: root only
        except OSError:
            pass  # the default buffer: more events may be lost in a storm (counted)
        monitor.start()
        self._monitor = monitor
        self.lost = 0

    def fileno(self) -> int:
        return int(self._monitor.fileno())

    def receive(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        while len(out) < MAX_BATCH:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError:  # ENOBUFS: the kernel dropped events for us
                self.lost += 1  # the consumer rescans: what was lost is not replayed
                break
            if device is None:
                break
            out.append({str(k): str(v) for k, v in device.properties.items()})
        return out

    def close(self) -> None:
        """Drop the monitor: libudev closes its socket (pyudev's ``__del__`` unrefs it)."""
        self._monitor = None
