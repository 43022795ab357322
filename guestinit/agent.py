"""The agent stage: kata-agent (or what the config names) as a supervised child."""

from __future__ import annotations

import os

from guestinit.stages import BootError, Stage, StopRequested
from guestinit.sysfs import read_text
from guestinit.values import Mode, Ready

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.boot import Boot
    from guestinit.effects import Effects
    from guestinit.supervisor import Service
    from guestinit.values import Condition

AGENT = "agent"


def run_agent(boot: Boot) -> None:
    cfg = boot.config()
    argv = cfg.words("agent")
    if argv == ("none",):  # nothing waits on the deferred mounts (teardown collects them)
        boot.kmsg.log(5, "no agent (guestinit.agent=none): the init stays up until told to stop")
        return
    try:  # the deferred mounts (cgroup2): the agent needs them
        for name, result in boot.wait_background():
            if name == "mounts" and isinstance(result, list):
                boot.facts.mounts.extend(result)
    except (OSError, TimeoutError) as exc:
        raise BootError(Stage.AGENT, f"deferred mounts: {exc}") from None
    if boot.root == "/":  # a test root shares the host's cgroup2 hierarchy: leave it
        delegated = delegate_controllers(boot.root, boot.effects)
        if delegated:
            boot.kmsg.log(6, f"cgroup2: {' '.join(delegated)} delegated below the root")
    restart = cfg.restart("agent.restart")
    exe = argv[0]
    if "/" in exe and not os.access(exe, os.X_OK):
        raise BootError(Stage.AGENT, f"start agent {exe}: not found or not executable "
                        "(set guestinit.agent=PATH)")
    nofile, oom = agent_limits(boot, cfg.int("agent.nofile"), cfg.int("agent.oom_score_adj"))
    init_mode = cfg.bool("agent.init_mode")
    env = agent_env(cfg.words("agent.env"), gpu=boot.facts.mode != Mode.CPU)
    try:
        service = boot.supervisor.add(
            AGENT, argv, restart=restart, nofile=nofile, oom_score_adj=oom,
            stdout=1, stderr=2, env=env, pid_namespace=init_mode,
        )
    except OSError as exc:
        raise BootError(Stage.AGENT, f"start agent {exe}: {exc.strerror or exc}") from None
    assert service.pid is not None
    cond = cfg.ready("agent.ready")
    facts: dict[str, object] = {"argv": list(argv), "pid": service.pid, "ready": str(cond),
                                "init_mode": init_mode}
    boot.facts.agent = facts
    boot.kmsg.log(6, f"agent {exe} started as pid {service.pid}")
    if cond.kind == Ready.NONE:
        facts["ready_by"] = "spawned"
        return
    facts.update(wait_agent(boot, service, cond, cfg.float("agent.ready_timeout")))


def wait_agent(boot: Boot, service: Service, cond: Condition, timeout: float) -> dict[str, object]:
    """Wait for ``cond`` (``readiness.wait_ready``); the ready frame's facts about it, an
    ``agent:ready`` span, or BootError naming the condition, the timeout or the status."""
    from guestinit.readiness import ExitedBeforeReady, NotReady, wait_ready

    assert service.pid is not None
    pid, exe = service.pid, service.argv[0]

    def exited() -> int | None:
        boot.procs.reap()
        if service.pid == pid:
            return None
        return service.last_status if service.last_status is not None else -1

    def on_wake() -> None:
        reason = boot.stop_requested()  # drains the wakeup fd (SIGCHLD lands there too)
        if reason:
            raise StopRequested(reason)

    start = boot.timeline.now()
    try:
        how = wait_ready(cond, pid, timeout, exited=exited, root=boot.root, syslog=boot.syslog,
                         wake_fd=boot.wake_fd, on_wake=on_wake)
    except ExitedBeforeReady as exc:
        raise BootError(Stage.AGENT, f"agent {exe} {exit_how(exc.status)} before it was "
                        f"ready (agent.ready={cond})") from None
    except NotReady as exc:
        raise BootError(Stage.AGENT, f"agent {exe} not ready: {exc} "
                        f"(agent.ready={cond}, agent.ready_timeout)") from None
    except (OSError, ValueError) as exc:
        raise BootError(Stage.AGENT, f"wait for agent.ready={cond}: {exc}") from None
    end = boot.timeline.now()
    boot.timeline.add("agent:ready", start, end)
    wait_ms = round((end - start) / 1e6, 3)
    boot.kmsg.log(6, f"agent ready ({cond}) after {wait_ms} ms")
    out: dict[str, object] = {"ready_by": str(cond.kind), "wait_ms": wait_ms}
    if cond.kind in (Ready.UNIX, Ready.VSOCK):
        out["listening_at"] = f"{cond.kind}:{cond.target}"
    else:
        out["ready_line"] = how[:256]
    return out


CAP_SYS_RESOURCE = 24


def agent_limits(boot: Boot, nofile: int, oom: int) -> tuple[int, int | None]:
    """The limits the agent can actually get, warning on kmsg about what it cannot.

    In a VM PID 1 holds every capability and gets both. A container running the
    init (the pid-namespace tests) may lack CAP_SYS_RESOURCE: then the agent runs
    with the hard NOFILE limit there is and its oom_score_adj is left alone,
    rather than the boot failing over a limit.
    """
    soft, hard = boot.effects.nofile()
    if hard != -1 and nofile > hard:
        try:  # raise PID 1's own hard limit so that the child may take it
            boot.effects.set_nofile(soft, nofile)
        except OSError as exc:
            boot.kmsg.log(4, f"agent RLIMIT_NOFILE {nofile} not allowed ({exc}); using {hard}")
            nofile = hard
    if oom < 0 and not _has_cap(boot, CAP_SYS_RESOURCE):
        boot.kmsg.log(4, f"agent oom_score_adj {oom} needs CAP_SYS_RESOURCE; left as is")
        return nofile, None
    return nofile, oom


def _has_cap(boot: Boot, cap: int) -> bool:
    try:
        for line in (read_text("/proc/self/status", (OSError,)) or "").splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    except ValueError:
        pass
    return boot.root == "/"


def agent_env(extra: tuple[str, ...], gpu: bool) -> dict[str, str]:
    """The agent's environment: a PATH, HOME and TERM, then in GPU mode
    ``KATA_ATTESTER_VARIANT=nvidia`` (NVRC sets it; the agent's attestation reads it), then
    ``agent.env`` (which wins)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/",
           "TERM": "vt100"}
    if gpu:
        env["KATA_ATTESTER_VARIANT"] = "nvidia"
    for entry in extra:
        name, _, value = entry.partition("=")
        env[name] = value
    return env


def delegate_controllers(root: str, effects: Effects) -> list[str]:
    """Every controller the root cgroup offers, enabled for its children
    (``cgroup.subtree_control``): kata-agent's cgroupfs driver makes the pod and container
    cgroups below the root and sets cpu, memory, pids... limits there. The root is exempt
    from cgroup v2's no-internal-processes rule. No cgroup2 mounted: nothing to do."""
    base = os.path.join(root, "sys/fs/cgroup")
    text = read_text(os.path.join(base, "cgroup.controllers"), (OSError,))
    if text is None:
        return []
    available = text.split()
    if available:
        try:
            effects.write(os.path.join(base, "cgroup.subtree_control"),
                          " ".join(f"+{c}" for c in available))
        except OSError as exc:
            raise BootError(Stage.AGENT, f"delegate cgroup controllers: {exc}") from None
    return available


def agent_exit_reason(status: int | None) -> str:
    """Why the VM stops when the agent did (the shutdown frame's reason)."""
    return f"agent {exit_how(status)}"


def exit_how(status: int | None) -> str:
    """How the agent ended. One in its own PID namespace that calls reboot() (kata-agent
    does when it ends in init mode) is killed by the kernel with SIGINT (power off, halt)
    or SIGHUP (restart): it asked, it did not crash."""
    if status == -2:
        return "powered off (reboot(RB_POWER_OFF) in its PID namespace)"
    if status == -1:
        return "asked for a restart (reboot(RB_AUTOBOOT) in its PID namespace)"
    return f"exited with status {status}"
