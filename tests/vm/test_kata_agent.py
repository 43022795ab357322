"""kata-agent as Kata runs it: a static test agent installed with ``guestinit-build
--agent`` at /usr/bin/kata-agent, in the Kata-format image booted as Kata boots it. The
agent runs in init mode (PID 1 of its own PID namespace) and finds what kata-agent needs;
guestinit sends ready only once it listens on vsock port 1024, fails naming the port when
it never does, and powers the VM off when the agent does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import image
from bench.boot import BootOptions, BootResult, boot
from guestinit.testing.agent_standin import FACTS_MARKER
from guestinit.wire import FrameType
from rootfs import proc
from tests.fixtures import kata_agent
from tests.vm.conftest import REPO, _builder, explain
from tests.vm.test_kata import TIMEOUT

pytestmark = pytest.mark.vm


@pytest.fixture(scope="session")
def agent_image(kata_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The kata profile with the static test agent at /usr/bin/kata-agent."""
    tmp = tmp_path_factory.mktemp("kata-agent")
    agent = kata_agent.build(tmp / "kata-agent")
    out = tmp / "kata"
    proc.run([_builder(), "image", "kata", "--agent", str(agent), "--standins", "--out",
              str(out), "-q"],
             timeout=3600, cwd=str(REPO))
    return str(out)


def _boot(directory: str, workdir: Path, append: str = "") -> BootResult:
    # info-level syslog reaches the console (hvc0) with loglevel=7: the agent's facts
    words = f"guestinit.log=info loglevel=7 {append}".strip()
    return boot(image.load_kata(directory),
                # the stand-in logs its facts after the agent is ready: the powerdown waits
                # for them (a loaded host once powered off first)
                BootOptions(timeout=TIMEOUT, workdir=str(workdir), append=words,
                            hold_until=FACTS_MARKER), progress=None)


def _facts(res: BootResult) -> dict[str, object]:
    with open(res.console_log, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if FACTS_MARKER in line:
                found: dict[str, object] = json.loads(line.split(FACTS_MARKER, 1)[1])
                return found
    raise AssertionError(f"no agent facts on the console:\n{explain(res)}")


def test_the_agent_runs_in_init_mode_and_finds_what_kata_agent_needs(
        agent_image: str, tmp_path: Path) -> None:
    res = _boot(agent_image, tmp_path)
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None
    agent = ready.fields["agent"]
    assert isinstance(agent, dict)
    assert agent["argv"] == ["/usr/bin/kata-agent"] and agent["init_mode"] is True
    assert agent["ready_by"] == "vsock" and agent["listening_at"] == "vsock:1024"
    facts = _facts(res)
    assert facts["pid"] == 1 and facts["proc_self"] == "1" and facts["init_mode"] is True
    assert facts["cgroup2"] is True and facts["resolv_conf"] is True
    delegated = str(facts["cgroup_subtree_control"]).split()
    assert {"cpu", "memory", "pids"} <= set(delegated), delegated  # for the agent's cgroups
    assert facts["nofile"] == 1048576 and facts["oom_score_adj"] == "-997"
    assert int(str(facts["run_bytes"])) >= 0.4 * int(str(facts["mem_bytes"]))
    assert facts["vsock_listen"] == 1024
    # kubelet's systemd-style cgroupsPath, in init mode: the cgroupfs driver
    assert str(facts["cgroup"]).startswith(
        "cgroupfs driver: /sys/fs/cgroup/kubepods-besteffort-pod1.slice/cri-containerd/abc")
    assert facts["dns"] == "bind-mounted over /etc/resolv.conf: nameserver 10.0.2.3"
    assert res.first(FrameType.SHUTDOWN) is not None and res.qemu_rc == 0, explain(res)


def test_an_agent_that_never_listens_fails_naming_the_port(agent_image: str,
                                                           tmp_path: Path) -> None:
    res = _boot(agent_image, tmp_path,
                'guestinit.agent="/usr/bin/kata-agent --never-ready" '
                "guestinit.agent.ready_timeout=3")
    failed = res.first(FrameType.FAILED)
    assert failed is not None, explain(res)
    assert failed.fields["stage"] == "agent"
    assert "no listener on vsock port 1024 within 3s" in str(failed.fields["reason"])
    assert res.first(FrameType.READY) is None


def test_the_agent_powering_off_powers_the_vm_off(agent_image: str, tmp_path: Path) -> None:
    res = boot(image.load_kata(agent_image),
               BootOptions(timeout=TIMEOUT, workdir=str(tmp_path), shutdown=False,
                           append='guestinit.agent="/usr/bin/kata-agent --exit-after 0.5"'),
               progress=None)
    assert res.first(FrameType.READY) is not None, explain(res)
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None, explain(res)
    assert shutdown.fields["reason"] == (
        "agent powered off (reboot(RB_POWER_OFF) in its PID namespace)")
    assert res.qemu_rc == 0 and not res.forced, explain(res)
