"""The ACPI power button: how a VMM's "please shut down" reaches PID 1.

QEMU's ``system_powerdown`` (what Kata and the bench harness use to stop a VM)
raises an ACPI power-button event. The kernel's ``button`` driver turns it into
a KEY_POWER press on the input device named "Power Button"; with ``evdev``
loaded that device has a /dev/input/eventN node. evdev drops events that no
one reads, so the node is opened before the ``ready`` frame goes out.
"""

from __future__ import annotations

import os
import struct

# <linux/input.h>: struct input_event on 64-bit (timeval as two longs, then
# type u16, code u16, value s32): 24 bytes.
EVENT = struct.Struct("=qqHHi")
EV_KEY = 1
KEY_POWER = 116
NAME = "Power Button"


def find(root: str) -> str | None:
    """The /dev/input/eventN node of the power button under ``root``, if any."""
    from guestinit.sysfs import find_named

    entry = find_named(root, "input", NAME, "device/name", prefix="event")
    return None if entry is None else os.path.join(root, "dev/input", entry)


def open_button(root: str) -> int | None:
    """Open the power button's event node (non-blocking), or None when there is none."""
    path = find(root)
    if path is None:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def pressed(data: bytes) -> bool:
    """Whether a read from the event node holds a KEY_POWER press."""
    usable = len(data) - len(data) % EVENT.size
    for _, _, etype, code, value in EVENT.iter_unpack(data[:usable]):
        if etype == EV_KEY and code == KEY_POWER and value == 1:
            return True
    return False


def read_pressed(fd: int) -> bool:
    """Drain the node; True when the button was pressed. OSError: the device is gone."""
    hit = False
    while True:
        try:
            data = os.read(fd, EVENT.size * 64)
        except BlockingIOError:
            return hit
        if not data:
            return hit
        hit = pressed(data) or hit
