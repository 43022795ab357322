"""The static init (rootfs/staticinit.c, profile key ``static_init``) boots the pidns root
to ``ready`` with the agent stand-in, as the image's /sbin/init would.

Its module path is the image's (``/usr/lib/guestinit``, absent on the host, then the
host's Debian stdlib for rare paths), so guestinit can only come from the frozen table:
a boot that reaches ``ready`` ran the frozen modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guestinit.wire import FrameType
from rootfs import fetch, staticinit
from rootfs.profile import PROFILES_DIR
from rootfs.steps import BuildError
from tests.pidns.harness import ROOT_TOKEN, NsInit, agent_arg

CMDLINE = (agent_arg("--listen", f"{ROOT_TOKEN}/run/agent.sock")
           + " guestinit.agent.ready=unix:/run/agent.sock guestinit.mode=cpu")


@pytest.fixture(scope="module")
def static_init() -> Path:
    lock = fetch.Lock.load(PROFILES_DIR / "debian.lock")
    try:
        binary, _ = staticinit.static_init_binary(
            Path("/usr/lib/python3.11"), lock.debs["python3.11-minimal"].version,
            lock.wheels["cffi"].version, pin=lock.sdists["cffi"])
    except BuildError as exc:
        pytest.fail(f"build the static init: {exc}")
    return binary


def test_static_init_boots_to_ready(ns_init: type[NsInit], tmp_path: Path,
                                    static_init: Path) -> None:
    init = ns_init(tmp_path, CMDLINE, launch=[str(static_init)])
    init.wait_frame(FrameType.READY)
    assert not init.errors

