"""Devices after ready: hot-add and hot-remove from the kernel's uevents, in PID 1's loop.

``Hotplug`` consumes ``uevents.Monitor`` (pyudev) through a bounded, coalescing
``EventQueue`` and hands each device to a ``Handler`` (NVIDIA's GPUs:
``guestinit.nvidia.hotplug``), which decides what the device is and does the work:

- ``add`` of a device the handler accepts: ``assign`` it. When its driver has not
  registered it yet, the add waits (``hotplug.timeout``), retried on the driver's
  ``bind`` event and on every tick; past the timeout it is refused, naming the device.
- ``remove`` of an assigned device: ``release`` it. A ``remove`` while its add still
  waits cancels the add.
- anything else: logged and ignored (an unknown device, a second ``add``).

Each outcome is a ``progress`` frame (stage ``hotplug``; event ``assign``, ``release``,
``refused``, ``cancelled``) with the device's address and the time from the uevent's
arrival to the work's end (``latency_us``), and assignments and releases are device
events (``Boot.device_event``: the audit ring, kmsg, and the ``shutdown`` frame's audit).
Nothing here blocks: no step waits for the driver, and a storm of events for a few
devices is folded into a few queue entries; when events were lost (the socket buffer
or the queue overflowed) the handler's view is rebuilt from sysfs (``rescan``).
"""

from __future__ import annotations

import os

from guestinit.uevents import Event, EventQueue

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    from guestinit.boot import Boot
    from guestinit.uevents import Monitor

    class Handler(Protocol):
        def accepts(self, event: Event) -> str | None:
            """None when the device is one to serve; else why it is ignored."""

        def owns(self, key: str) -> bool:
            """The device is assigned now."""

        def assign(self, key: str) -> dict[str, object] | None:
            """Serve it: the frame's fields (``detail`` is the audit line), or None while
            its driver has not registered it; ``HotplugError`` when it cannot be served."""

        def release(self, key: str) -> dict[str, object]:
            """Stop serving it (it is gone): the frame's fields, ``detail`` the audit line."""

        def present(self) -> set[str]:
            """The devices sysfs shows now that ``accepts`` would take (for ``rescan``)."""

        def owned(self) -> set[str]:
            """Every device assigned now."""

        def devices(self) -> list[dict[str, object]]:
            """The current device set, for the control socket's status."""

POLL_WHILE_PENDING = 0.05  # seconds between looks at a device whose driver is due


class HotplugError(Exception):
    """A device that cannot be served; the message names it and what to do."""


class Hotplug:
    __slots__ = ("_monitor", "boot", "counts", "handler", "pending", "queue", "timeout")

    def __init__(self, boot: Boot, handler: Handler, monitor: Monitor,
                 timeout: float = 10.0, queue_limit: int = 256) -> None:
        self.boot = boot
        self.handler = handler
        self._monitor = monitor
        self.timeout = timeout
        self.queue = EventQueue(queue_limit)
        self.pending: dict[str, tuple[Event, int]] = {}  # key -> (its add, deadline ns)
        self.counts = {"assign": 0, "release": 0, "refused": 0, "cancelled": 0,
                       "ignored": 0, "rescans": 0}

    def fileno(self) -> int:
        return self._monitor.fileno()

    def on_readable(self) -> None:
        """Take what the kernel sent (at most a batch), then act on it."""
        self.guarded(self._on_readable)

    def guarded(self, work: Callable[[], object]) -> object:
        """A hot-plug bug must not take PID 1 (and the VM) down after ready: it is logged
        and reported (``progress``, event ``warning``), and the loop goes on."""
        try:
            return work()
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}"
            self.boot.kmsg.log(3, f"hotplug: internal error: {what}")
            self.boot.reporter.progress("hotplug", "warning", f"internal error: {what}")
            return None

    def _on_readable(self) -> None:
        now = self.boot.timeline.now()
        overflowed, lost = self.queue.overflowed, self._monitor.lost
        debug = self.boot.kmsg.level >= 7
        for props in self._monitor.receive():
            if debug:  # guestinit.log=debug: each uevent whole (tests/fixtures/uevents.json)
                self.boot.kmsg.log(7, f"hotplug: uevent {json_line(props)}")
            self.queue.push(Event(props, now))
        self.process()
        if self.queue.overflowed != overflowed or self._monitor.lost != lost:
            self.rescan(now, f"uevents lost (queue {self.queue.overflowed}, socket "
                        f"{self._monitor.lost}); rescanning sysfs", level=4)

    def process(self) -> None:
        for item in self.queue.take():
            event = item.event
            key = event.key
            if item.removed:
                if key in self.pending:
                    del self.pending[key]
                    self._outcome("cancelled", event, {
                        "detail": f"{key} was removed before its driver registered it"})
                elif self.handler.owns(key):
                    self._release(key, event)
            if event.action == "remove":
                continue
            if key in self.pending:
                self._try(key, self.pending[key][0])  # bind (or a second add): look again
            elif self.handler.owns(key):
                self.boot.kmsg.log(7, f"hotplug: {event.action} {key}: already assigned")
            elif event.action == "add":
                why = self.handler.accepts(event)
                if why is not None:
                    self.counts["ignored"] += 1
                    self.boot.kmsg.log(6, f"hotplug: add {key} ignored: {why}")
                    continue
                self.pending[key] = (event, event.received_ns + int(self.timeout * 1e9))
                self._try(key, event)

    def _try(self, key: str, event: Event) -> None:
        try:
            fields = self.handler.assign(key)
        except HotplugError as exc:
            del self.pending[key]
            self._outcome("refused", event, {"detail": str(exc)})
            return
        except Exception:
            del self.pending[key]  # reported once (guarded), not retried every tick
            raise
        if fields is not None:
            del self.pending[key]
            self._outcome("assign", event, fields)

    def _release(self, key: str, event: Event) -> None:
        try:
            fields = self.handler.release(key)
        except HotplugError as exc:
            self._outcome("refused", event, {"detail": str(exc)})
            return
        self._outcome("release", event, fields)

    def _outcome(self, what: str, event: Event, fields: dict[str, object]) -> None:
        boot = self.boot
        self.counts[what] += 1
        detail = str(fields.get("detail", ""))
        if what in ("assign", "release"):
            boot.device_event(detail)
        else:
            boot.kmsg.log(4 if what == "refused" else 5, f"hotplug: {what}: {detail}")
        latency = max(0, boot.timeline.now() - event.received_ns) // 1000 \
            if event.received_ns else 0
        extra = {k: v for k, v in fields.items() if k != "detail"}
        boot.reporter.progress("hotplug", what, detail, bdf=event.key, **extra,
                               latency_us=latency, **vitals(boot.root))

    def tick(self) -> float | None:
        """Look again at devices whose driver is due; refuse those past their time.
        Seconds until the next look (None: nothing waits)."""
        if not self.pending:
            return None
        self.guarded(self._tick)
        return POLL_WHILE_PENDING if self.pending else None

    def _tick(self) -> None:
        now = self.boot.timeline.now()
        for key, (event, deadline) in list(self.pending.items()):
            self._try(key, event)
            if key in self.pending and now >= deadline:
                del self.pending[key]
                self._outcome("refused", event, {"detail": (
                    f"{key}: its driver did not register it within {self.timeout:g}s "
                    "(the driver refused the device or is not bound to it: see dmesg)")})

    def rescan(self, now: int, why: str, level: int = 6) -> None:
        """What sysfs shows decides (adds for devices not yet served, removes for assigned
        devices that are gone): when events were lost, and once when the monitor opens
        (a device added between the discover stage and then has sent its uevent already)."""
        self.counts["rescans"] += 1
        present, owned = self.handler.present(), self.handler.owned()
        self.boot.kmsg.log(level, f"hotplug: {why}")
        for key in sorted(owned - present):
            self.queue.push(Event({"ACTION": "remove", "PCI_SLOT_NAME": key}, now))
        for key in sorted(present - owned - set(self.pending)):
            self.queue.push(Event({"ACTION": "add", "PCI_SLOT_NAME": key,
                                   "DEVPATH": f"/bus/pci/devices/{key}"}, now))
        self.process()

    def status(self) -> dict[str, object]:
        return {"devices": self.handler.devices(), "pending": sorted(self.pending),
                "events": self.queue.received, "coalesced": self.queue.coalesced,
                "overflowed": self.queue.overflowed, "lost": self._monitor.lost,
                **self.counts}

    def close(self) -> None:
        self._monitor.close()


def vitals(root: str) -> dict[str, int]:
    """PID 1's open fds, threads and RSS (KiB), and the GPU nodes in /dev: what a leak
    across hot-plug cycles would show (each hot-plug frame carries them)."""
    out: dict[str, int] = {}
    try:  # this process's own (any procfs shows it): a test root may have none
        out["fds"] = len(os.listdir("/proc/self/fd"))
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out["threads"] = int(fields["Threads"])
        out["rss_kib"] = int(fields["VmRSS"].split()[0])
    except (OSError, KeyError, ValueError):
        pass
    try:
        names = os.listdir(os.path.join(root, "dev"))
    except OSError:
        names = []
    out["nodes"] = sum(1 for n in names if n.startswith("nvidia") and n[6:].isdigit())
    return out


def json_line(props: dict[str, str]) -> str:
    import json

    return json.dumps(props, sort_keys=True)
