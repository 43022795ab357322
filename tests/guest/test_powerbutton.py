"""The power button: finding its event node and reading KEY_POWER presses."""

from __future__ import annotations

import os
from pathlib import Path

from guestinit import powerbutton
from guestinit.powerbutton import EV_KEY, EVENT, KEY_POWER

EV_SYN = 0


def event(etype: int, code: int, value: int) -> bytes:
    return EVENT.pack(1700000000, 5, etype, code, value)


def fake_inputs(root: Path, names: dict[str, str]) -> None:
    for entry, name in names.items():
        d = root / "sys/class/input" / entry / "device"
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
    (root / "dev/input").mkdir(parents=True)


def test_event_size_is_the_kernels() -> None:
    assert EVENT.size == 24  # struct input_event on x86_64


def test_finds_the_power_button_among_inputs(tmp_path: Path) -> None:
    fake_inputs(tmp_path, {"event0": "AT Translated Set 2 keyboard", "mouse0": "Power Button",
                           "event1": "Power Button"})
    assert powerbutton.find(str(tmp_path)) == str(tmp_path / "dev/input/event1")
    assert powerbutton.find(str(tmp_path / "nothing")) is None


def test_press_is_key_power_down_only() -> None:
    press = event(EV_KEY, KEY_POWER, 1) + event(EV_SYN, 0, 0)
    release = event(EV_KEY, KEY_POWER, 0) + event(EV_SYN, 0, 0)
    other = event(EV_KEY, 30, 1)
    assert powerbutton.pressed(press)
    assert not powerbutton.pressed(release + other)
    assert powerbutton.pressed(other + press[:24] + b"\x01\x02")  # a torn tail is ignored


def test_reads_presses_from_a_nonblocking_node(tmp_path: Path) -> None:
    fake_inputs(tmp_path, {"event3": "Power Button"})
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        assert not powerbutton.read_pressed(r)  # nothing yet: EAGAIN, not a press
        os.write(w, event(EV_KEY, KEY_POWER, 1) + event(EV_KEY, KEY_POWER, 0))
        assert powerbutton.read_pressed(r)
        assert not powerbutton.read_pressed(r)
    finally:
        os.close(r)
        os.close(w)
    node = tmp_path / "dev/input/event3"
    assert powerbutton.open_button(str(tmp_path)) is None  # listed in sysfs, no node yet
    node.write_bytes(b"")
    fd = powerbutton.open_button(str(tmp_path))
    assert fd is not None
    os.close(fd)
