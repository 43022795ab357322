"""The vsock transport for real: the init reports over AF_VSOCK inside the guest.

This host has no vhost-vsock, so the guest talks to itself: ``vsock_loopback`` gives
CID 1, the agent stand-in listens on port 1040 there and forwards the stream to the
virtio-serial port the harness reads. The init's frames (hello, progress, ready) thus
go through guestinit's vsock transport, socket family, connect and all. At shutdown the
relay is stopped with the agent before the shutdown frame is sent; the init then sends
that frame on the console, where the harness reads it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guestinit.wire import FrameType
from rootfs import profile
from tests.vm.conftest import agent, boot_vm, explain

pytestmark = pytest.mark.vm


def test_frames_travel_over_af_vsock_and_the_last_one_over_the_console(
        cpu_image: str, tmp_path: Path) -> None:
    early = ",".join([*profile.load("cpu").kernel.early, "vsock_loopback"])
    append = (f"guestinit.modules={early} guestinit.report=vsock:1:1040 "
              f"{agent('--vsock-relay', '1040')} "
              "guestinit.agent.ready=syslog:agent-standin-ready")
    res = boot_vm(cpu_image, tmp_path, append=append)
    types = [r.frame.type for r in res.frames]
    assert types[0] is FrameType.HELLO and FrameType.READY in types, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None and ready.fields["agent"]["ready_by"] == "syslog"
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None, explain(res)  # spilled to the console after the relay left
    with open(res.console_log, encoding="utf-8", errors="replace") as fh:
        console = fh.read()
    assert "GUESTINIT-FRAME " in console
    assert res.ok, explain(res)
