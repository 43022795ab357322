"""agent.ready in the real init: ready only once the agent said so; failures say why.

Also: a module missing from the image fails the stage that needs it with a frame."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from guestinit.testing.agent_standin import READY_MARKER
from guestinit.wire import FrameType
from tests.pidns.harness import ROOT_TOKEN, NsInit, agent_arg, hide_modules, image_launch

DELAY = 0.5


def _ready_span(frame_timeline: list[tuple[str, int, int]]) -> float:
    spans = [(s, e) for name, s, e in frame_timeline if name == "agent:ready"]
    assert len(spans) == 1, frame_timeline
    return (spans[0][1] - spans[0][0]) / 1e9


def test_syslog_marker_gates_ready(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--ready-after", str(DELAY)) +
                   f" guestinit.agent.ready=syslog:{READY_MARKER}")
    ready = init.wait_frame(FrameType.READY)
    agent = ready.get("agent")
    assert isinstance(agent, dict), ready
    assert agent["ready"] == f"syslog:{READY_MARKER}" and agent["ready_by"] == "syslog"
    # in init mode (the default) the agent is PID 1 of its own namespace: its log says 1
    assert agent["init_mode"] is True and agent["pid"] != 1
    assert str(agent["ready_line"]).startswith(f"agent-standin[1]: {READY_MARKER}")
    assert _ready_span(ready.timeline()) >= DELAY * 0.9
    assert float(str(agent["wait_ms"])) >= DELAY * 900
    # the marker is in the syslog store, and it was there before ready went out
    assert READY_MARKER in init.wait_syslog(READY_MARKER, timeout=0.5)


def test_unix_listener_gates_ready(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--listen", f"{ROOT_TOKEN}/run/agent/api.sock",
                                       "--ready-after", str(DELAY)) +
                   " guestinit.agent.ready=unix:/run/agent/api.sock")
    ready = init.wait_frame(FrameType.READY)
    agent = ready.get("agent")
    assert isinstance(agent, dict), ready
    assert agent["listening_at"] == "unix:/run/agent/api.sock" and agent["ready_by"] == "unix"
    assert _ready_span(ready.timeline()) >= DELAY * 0.9
    assert init.status()["stage"] == "run"


def test_never_ready_fails_naming_the_condition(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--never-ready") +
                   " guestinit.agent.ready=unix:/run/api.sock guestinit.agent.ready_timeout=1")
    start = time.monotonic()
    failed = init.wait_frame(FrameType.FAILED)
    assert time.monotonic() - start < 10
    assert failed.get("stage") == "agent"
    reason = str(failed.get("reason"))
    assert "no listener on unix:/run/api.sock within 1s" in reason, reason
    assert "agent.ready=unix:/run/api.sock" in reason
    assert [f.type for f in init.frames].count(FrameType.READY) == 0
    init.wait_exit()


@pytest.mark.parametrize(("init_mode", "how"), [
    ("0", "exited with status 4 before it was ready"),
    # in init mode the agent ends as kata-agent does: reboot(RB_POWER_OFF), whatever its code
    ("1", "powered off (reboot(RB_POWER_OFF) in its PID namespace) before it was ready"),
])
def test_exit_before_ready_fails_with_the_status(ns_init: type[NsInit], tmp_path: Path,
                                                 init_mode: str, how: str) -> None:
    init = ns_init(tmp_path, agent_arg("--never-ready", "--exit-after", "0.1",
                                       "--exit-code", "4") +
                   f" guestinit.agent.ready=syslog:{READY_MARKER}"
                   f" guestinit.agent.init_mode={init_mode}")
    failed = init.wait_frame(FrameType.FAILED)
    assert failed.get("stage") == "agent"
    assert how in str(failed.get("reason")), failed


def test_sigterm_during_the_wait_is_an_orderly_shutdown(ns_init: type[NsInit],
                                                        tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--never-ready") +
                   f" guestinit.agent.ready=syslog:{READY_MARKER}")
    init.wait_syslog("agent stand-in up")  # the agent stage is waiting now
    init.signal(signal.SIGTERM)
    shutdown = init.wait_frame(FrameType.SHUTDOWN, timeout=5)
    assert shutdown.get("reason") == "signal SIGTERM, during stage agent"


def _boot_without(ns_init: type[NsInit], tmp_path: Path, module: str,
                  cmdline: str = "") -> tuple[NsInit, str]:
    """Boot an image that lacks ``module``; the init and the stage:reason it failed with."""
    init = ns_init(tmp_path, f"guestinit.agent=none {cmdline}".strip(),
                   launch=image_launch(hide_modules(module)))
    failed = init.wait_frame(FrameType.FAILED)
    return init, f"{failed.get('stage')}:{failed.get('reason')}"


def test_missing_module_in_a_stage_fails_that_stage(ns_init: type[NsInit],
                                                    tmp_path: Path) -> None:
    # the modules stage imports the loader (kmod.py) when it starts; an image without it
    # must still report
    _, failed = _boot_without(ns_init, tmp_path, "guestinit.kmod",
                              "guestinit.modules=virtio_console")
    assert failed.startswith("modules:ImportError") and "'kmod'" in failed, failed


def test_missing_libc_binding_fails_early_with_a_frame(ns_init: type[NsInit],
                                                       tmp_path: Path) -> None:
    init, failed = _boot_without(ns_init, tmp_path, "_cffi_backend")
    assert failed.startswith("early:"), failed
    assert "No module named '_cffi_backend'" in failed, failed
    assert init.wait_exit() == 3  # power off could not bind libc either: exit, no traceback
