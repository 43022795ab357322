"""Lock discipline: a build reads the lock and never writes it; a lock that does not pin
what the profile asks for is an error naming each package."""

from __future__ import annotations

import dataclasses

import pytest

from rootfs import fetch, profile
from rootfs.build import check_lock, pin_inputs
from rootfs.steps import BuildError, Progress


def test_the_tracked_lock_pins_every_profile() -> None:
    for name in ("cpu", "debug", "nvidia-gpu", "nvidia-servicevm", "baseline-busybox",
                 "baseline-systemd"):
        prof = profile.load(name)
        assert check_lock(prof, fetch.Lock.load(prof.lock)).startswith("linux-image-")


def test_a_profile_the_lock_does_not_match_fails_naming_each_package() -> None:
    prof = profile.load("cpu")
    before = prof.lock.read_bytes()
    odd = dataclasses.replace(prof, debs=(*prof.debs, "libfoo9"), wheels=("psutil", "bar"))
    with pytest.raises(BuildError) as err:
        pin_inputs(odd, Progress(quiet=True), locked=False)
    assert str(err.value) == (f"lock file {prof.lock}: does not match profile cpu: deb "
                              "libfoo9, wheel bar not pinned; run `./build.sh lock cpu` "
                              "and commit the lock file")
    assert prof.lock.read_bytes() == before  # nothing was re-pinned or written
