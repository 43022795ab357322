"""Boot's side work: deferred mounts run on a side thread and are collected later."""

from __future__ import annotations

import time

import pytest

from guestinit.boot import Boot


def bare_boot() -> Boot:
    return Boot("/nonexistent", None, None, None, None, None, None, "")  # type: ignore[arg-type]


def test_background_results_and_errors_come_back_in_order() -> None:
    boot = bare_boot()
    boot.background("slow", lambda: (time.sleep(0.1), "done")[1])
    boot.background("quick", lambda: 7)
    assert boot.wait_background() == [("slow", "done"), ("quick", 7)]
    assert boot.wait_background() == []

    def boom() -> None:
        raise OSError(19, "cgroup2: No such device")

    boot.background("mounts", boom)
    with pytest.raises(OSError, match="cgroup2"):
        boot.wait_background()


def test_background_that_hangs_times_out_naming_it() -> None:
    boot = bare_boot()
    boot.background("mounts", lambda: time.sleep(1.0))
    with pytest.raises(TimeoutError, match=r"mounts did not finish within 0\.05s"):
        boot.wait_background(timeout=0.05)
    assert boot.wait_background(timeout=5) == [("mounts", None)]
