"""The real init as PID 1 of a PID namespace: boot, reap, supervise, shut down, fail."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from guestinit.wire import FrameType
from tests.pidns.harness import NsInit, agent_arg

EXPECTED_STAGES = ["early", "log", "config", "discover", "modules", "devices", "daemons", "cdi",
                   "lockdown", "agent", "ready"]

# reboot(2) in a PID namespace does not power anything off: the kernel kills the
# namespace's init with SIGINT for POWER_OFF/HALT (SIGHUP would mean RESTART), and
# unshare --fork passes its child's death signal on.
POWERED_OFF = -signal.SIGINT


def test_ready_frame_carries_the_timeline(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg())
    hello = init.wait_frame(FrameType.HELLO)
    ready = init.wait_frame(FrameType.READY)
    stages = [name for name, _, _ in ready.timeline()]
    for stage in EXPECTED_STAGES:
        assert stage in stages, f"{stage} missing from {stages}"
    starts = [start for name, start, _ in ready.timeline() if name in EXPECTED_STAGES]
    assert starts == sorted(starts), "stages ran out of order"
    assert all(end >= start for _, start, end in ready.timeline())
    assert ready.boot_id == hello.boot_id
    assert ready.get("mode") == "cpu"
    daemons = ready.get("daemons")
    assert isinstance(daemons, list) and daemons[0]["name"] == "agent" and daemons[0]["running"]
    assert init.errors == []


# Tests of what the init does with whatever its children leave use the agent outside init
# mode (guestinit.agent.init_mode=0): in init mode the agent's orphans and daemons stay in
# its own PID namespace and are its own (test_agent_init_mode.py).
PLAIN = " guestinit.agent.init_mode=0"


def test_orphans_are_reaped(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--orphans", "2000", "--linger", "0.05") + PLAIN)
    init.wait_frame(FrameType.READY)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = init.status()
        if status["orphans_reaped"] == 2000:
            break
        time.sleep(0.05)
    assert status["orphans_reaped"] == 2000, status
    # collection was off until ready; then the boot's objects were frozen and it came back
    assert status["gc"]["enabled"] and status["gc"]["frozen"] > 1000, status["gc"]
    # all 2000 exited by now; within 1 s none may be left as a zombie of PID 1
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        zombies = [pid for pid, state in init.children_of_init() if state == "Z"]
        if not zombies:
            break
        time.sleep(0.02)
    assert zombies == []
    # the agent stand-in is still the only child left
    assert [state for _, state in init.children_of_init()] in (["S"], ["R"])


def test_agent_restarted_then_given_up_degraded(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--exit-after", "0.05", "--exit-code", "3") + PLAIN +
                   " guestinit.agent.restart=on-failure guestinit.restart.max=2"
                   " guestinit.restart.backoff=0.05")
    degraded = init.wait_frame(FrameType.DEGRADED)
    assert degraded.get("name") == "agent"
    assert degraded.get("restarts") == 2
    assert "exited 3" in str(degraded.get("reason"))
    # given up -> the agent is gone for good -> orderly shutdown
    shutdown = init.wait_frame(FrameType.SHUTDOWN)
    assert "agent exited with status 3" in str(shutdown.get("reason"))
    assert init.wait_exit() == POWERED_OFF


def test_sigterm_orderly_teardown(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--ignore-term"))
    init.wait_frame(FrameType.READY)
    init.wait_syslog("agent stand-in up")  # SIGTERM ignored from here on
    init.signal(signal.SIGTERM)
    shutdown = init.wait_frame(FrameType.SHUTDOWN)
    assert shutdown.get("reason") == "signal SIGTERM"
    audit = [str(a) for a in shutdown.get("audit")]  # type: ignore[union-attr]
    agent_line = next(i for i, a in enumerate(audit) if a.startswith("agent:"))
    sync_line = audit.index("sync")
    umounts = [i for i, a in enumerate(audit) if a.startswith("umount ")]
    assert "killed after 2.0s grace" in audit[agent_line]  # ignored SIGTERM -> SIGKILL
    assert agent_line < sync_line < min(umounts)
    assert any(a.endswith("/proc") for a in audit)
    # reboot(POWER_OFF) from a namespace's init ends the namespace with SIGINT
    assert init.wait_exit() == POWERED_OFF


def test_agent_exit_triggers_shutdown(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--exit-after", "0.2") + PLAIN)
    init.wait_frame(FrameType.READY)
    shutdown = init.wait_frame(FrameType.SHUTDOWN)
    assert shutdown.get("reason") == "agent exited with status 0"
    assert init.wait_exit() == POWERED_OFF


def test_bad_cmdline_value_fails_naming_the_key(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg() + " guestinit.log=loud")
    failed = init.wait_frame(FrameType.FAILED)
    assert failed.get("stage") == "config"
    assert "guestinit.log" in str(failed.get("reason"))
    assert "loud" in str(failed.get("reason"))
    stages = [n for n, _, _ in failed.timeline() if ":" not in n]  # stages, not sub-spans
    assert stages[:3] == ["early", "log", "config"]
    assert init.wait_exit() == POWERED_OFF


def test_injected_exception_fails(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg() + " guestinit.inject=devices")
    failed = init.wait_frame(FrameType.FAILED)
    assert failed.get("stage") == "devices"
    assert "RuntimeError: fault injected at stage devices" in str(failed.get("reason"))
    assert init.wait_exit() == POWERED_OFF


def test_syslog_flood_keeps_control_answering(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--flood", "100000")
                   + " guestinit.syslog.file_max=262144")
    init.wait_frame(FrameType.READY)
    worst = 0.0
    rss = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        status = init.status(timeout=2.0)
        worst = max(worst, time.monotonic() - t0)
        rss.append(status["self_rss"])
        syslog = status["syslog"]
        assert isinstance(syslog, dict)
        if any("flood done" in line for line in _syslog_tail(init)):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("flood did not finish")
    assert worst < 1.0, f"control socket took {worst:.2f}s under the flood"
    store = init.inside("run/guestinit/syslog")
    on_disk = sum(p.stat().st_size for p in store.parent.glob("syslog*"))
    assert on_disk <= 2 * 262144
    assert isinstance(rss[-1], int) and rss[-1] < 120 * 2**20


def _syslog_tail(init: NsInit) -> list[str]:
    store = init.inside("run/guestinit/syslog")
    try:
        return store.read_text(errors="replace").splitlines()[-5:]
    except OSError:
        return []


def test_shutdown_sweeps_the_daemons_the_agent_left(ns_init: type[NsInit],
                                                    tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--daemon-child", "term", "--daemon-child",
                                       "ignore-term") + PLAIN)
    init.wait_frame(FrameType.READY)
    pids = {}
    for flag in ("0", "1"):
        line = init.wait_syslog(f"ignore_term={flag}")
        pids[flag] = line.split("daemon child pid=")[1].split()[0]
    init.signal(signal.SIGTERM)
    shutdown = init.wait_frame(FrameType.SHUTDOWN)
    audit = [str(a) for a in shutdown.get("audit")]  # type: ignore[union-attr]
    term = next(a for a in audit if a.startswith("sweep: SIGTERM to 2: "))
    assert f"[{pids['0']}]" in term and f"[{pids['1']}]" in term  # both named, by pid
    kill = next(a for a in audit if a.startswith("sweep: SIGKILL to 1 left after 2s: "))
    assert f"[{pids['1']}]" in kill and f"[{pids['0']}]" not in kill
    assert not any(a.startswith("sweep: ") and "still there" in a for a in audit)
    assert audit.index(term) > next(i for i, a in enumerate(audit) if a.startswith("agent:"))
    assert audit.index(kill) < audit.index("sync")
    assert init.wait_exit() == POWERED_OFF


def test_one_bad_line_in_the_baked_config_is_named_and_the_rest_still_counts(
        ns_init: type[NsInit], tmp_path: Path) -> None:
    # the config stage fails naming exactly the bad line, none of the good ones around it
    init = ns_init(tmp_path, agent_arg(),
                   conf="hostname=gpu-vm\nsyslog.kmsg_rate=7\nbogus=1\nlog=debug\n")
    failed = init.wait_frame(FrameType.FAILED)
    assert failed.get("stage") == "config"
    assert failed.get("reason") == "bad setting /etc/guestinit.conf:3: bogus='1': unknown key"
    assert init.wait_exit() == POWERED_OFF
