"""kata-agent's init mode (docs/guest.md, "The agent in init mode"): the agent stand-in
as PID 1 of its own PID namespace under the real init. It sees getpid() == 1 and a /proc
of its own, does kata-agent's init-mode steps, reaps its own orphans and powers off with
reboot() when it ends; guestinit stays PID 1 of the VM and keeps its promises."""

from __future__ import annotations

import json
import resource
import signal
import time
from pathlib import Path

from guestinit.testing.agent_standin import FACTS_MARKER
from guestinit.wire import FrameType
from tests.pidns.harness import NsInit, agent_arg
from tests.pidns.test_init import POWERED_OFF


def _facts(init: NsInit) -> dict[str, object]:
    line = init.wait_syslog(FACTS_MARKER)
    found: dict[str, object] = json.loads(line.split(FACTS_MARKER, 1)[1])
    return found


def _cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def _children(pid: int) -> list[tuple[int, str]]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for kid in kids:
        try:
            out.append((int(kid), Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1]
                        .split()[0]))
        except OSError:
            continue
    return out


def test_the_agent_is_pid_1_of_its_namespace_with_its_own_proc(ns_init: type[NsInit],
                                                               tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--facts") + " guestinit.agent.env=KATA_X=1,B=2")
    ready = init.wait_frame(FrameType.READY)
    facts = _facts(init)
    assert facts["pid"] == 1 and facts["init_mode"] is True
    assert facts["proc_self"] == "1"  # /proc of its namespace, not the init's
    assert facts["proc_1_comm"] != "guestinit" and "python" in str(facts["proc_1_comm"])
    # 1048576 and -997 in a VM (the VM tier checks them); a container running this tier
    # without CAP_SYS_RESOURCE caps the hard limit and keeps oom_score_adj (agent_limits)
    if _cap_sys_resource():
        assert facts["nofile"] == 1048576 and facts["oom_score_adj"] == "-997"
    else:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert facts["nofile"] == min(hard, 1048576) and facts["oom_score_adj"] == "0"
    assert facts["env"] == {"KATA_X": "1"}  # cpu mode: no KATA_ATTESTER_VARIANT
    steps = [str(s) for s in facts["steps"]]  # type: ignore[attr-defined]
    assert "/proc: already proc" in steps and "/run: already tmpfs" in steps, steps
    assert "/dev/ptmx -> /dev/pts/ptmx" in steps
    agent = ready.get("agent")
    assert isinstance(agent, dict) and agent["init_mode"] is True
    assert isinstance(agent["pid"], int) and agent["pid"] > 1  # the init's view of it
    # seen from the init's mount namespace: the test root's /dev is its tmpfs
    ptmx = Path(f"/proc/{init.init_pid()}/root{tmp_path}/root/dev/ptmx")
    assert ptmx.is_symlink() and str(ptmx.readlink()) == "/dev/pts/ptmx"


def test_the_agents_orphans_are_its_own_to_reap(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--orphans", "200", "--linger", "0.05"))
    ready = init.wait_frame(FrameType.READY)
    agent = ready.get("agent")
    assert isinstance(agent, dict)
    init.wait_syslog("left 200 orphans")
    host_pid = next(pid for pid, _ in init.children_of_init())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _children(host_pid):
            break
        time.sleep(0.05)
    assert _children(host_pid) == []  # orphaned to the agent (its ns init), all reaped
    assert init.status()["orphans_reaped"] == 0  # none reached the VM's PID 1


def test_agent_power_off_is_an_orderly_shutdown(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--exit-after", "0.2", "--daemon-child",
                                       "ignore-term"))
    init.wait_frame(FrameType.READY)
    shutdown = init.wait_frame(FrameType.SHUTDOWN)
    assert shutdown.get("reason") == (
        "agent powered off (reboot(RB_POWER_OFF) in its PID namespace)")
    audit = [str(a) for a in shutdown.get("audit")]  # type: ignore[union-attr]
    # the agent's daemon died with the agent's namespace: nothing left to sweep
    assert "sweep: no other processes" in audit, audit
    assert init.wait_exit() == POWERED_OFF


def test_sigterm_stops_the_agent_and_its_namespace(ns_init: type[NsInit],
                                                   tmp_path: Path) -> None:
    init = ns_init(tmp_path, agent_arg("--daemon-child", "ignore-term"))
    init.wait_frame(FrameType.READY)
    init.wait_syslog("ignore_term=1")
    init.signal(signal.SIGTERM)
    shutdown = init.wait_frame(FrameType.SHUTDOWN)
    assert shutdown.get("reason") == "signal SIGTERM"
    audit = [str(a) for a in shutdown.get("audit")]  # type: ignore[union-attr]
    assert next(a for a in audit if a.startswith("agent:"))
    assert "sweep: no other processes" in audit, audit
    assert init.wait_exit() == POWERED_OFF


def test_systemd_cgroup_path_outside_init_mode_fails_as_kata_agent_does(
        ns_init: type[NsInit], tmp_path: Path) -> None:
    """Kata issues #7166, #6657: outside init mode a systemd-style cgroupsPath takes the
    systemd driver, and there is no systemd in the guest."""
    init = ns_init(tmp_path, agent_arg("--facts", "--cgroup", "kubepods.slice:cri:abc")
                   + " guestinit.agent.init_mode=0")
    init.wait_frame(FrameType.READY)
    facts = _facts(init)
    assert facts["init_mode"] is False and facts["pid"] != 1
    assert str(facts["cgroup"]).startswith("error: systemd cgroup driver"), facts
