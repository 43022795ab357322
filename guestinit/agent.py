"""The agent stage: kata-agent (or what the config names) as a supervised child."""

from __future__ import annotations

import os

from guestinit.config import Restart
from guestinit.stages import BootError, Stage

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.boot import Boot

AGENT = "agent"


def run_agent(boot: Boot) -> None:
    cfg = boot.config()
    argv = cfg.words("agent")
    if argv == ("none",):  # nothing waits on the deferred mounts (teardown collects them)
        boot.facts["agent"] = None
        boot.kmsg.log(5, "no agent (guestinit.agent=none): the init stays up until told to stop")
        return
    try:  # the deferred mounts (cgroup2): the agent needs them
        for name, result in boot.wait_background():
            if name == "mounts" and isinstance(result, list):
                boot.facts.setdefault("mounts", []).extend(result)  # type: ignore[attr-defined]
    except (OSError, TimeoutError) as exc:
        raise BootError(Stage.AGENT, f"deferred mounts: {exc}") from None
    restart = cfg["agent.restart"]
    assert isinstance(restart, Restart)
    exe = argv[0]
    if "/" in exe and not os.access(exe, os.X_OK):
        raise BootError(Stage.AGENT, f"start agent {exe}: not found or not executable "
                        "(set guestinit.agent=PATH)")
    nofile, oom = agent_limits(boot, cfg.int("agent.nofile"), cfg.int("agent.oom_score_adj"))
    try:
        service = boot.supervisor.add(
            AGENT, argv, restart=restart, nofile=nofile, oom_score_adj=oom,
            stdout=1, stderr=2, env=_agent_env(),
        )
    except OSError as exc:
        raise BootError(Stage.AGENT, f"start agent {exe}: {exc.strerror or exc}") from None
    boot.facts["agent"] = {"argv": list(argv), "pid": service.pid}
    boot.kmsg.log(6, f"agent {exe} started as pid {service.pid}")


CAP_SYS_RESOURCE = 24


def agent_limits(boot: Boot, nofile: int, oom: int) -> tuple[int, int | None]:
    """The limits the agent can actually get, warning on kmsg about what it cannot.

    In a VM PID 1 holds every capability and gets both. A container running the
    init (the pid-namespace tests) may lack CAP_SYS_RESOURCE: then the agent runs
    with the hard NOFILE limit there is and its oom_score_adj is left alone,
    rather than the boot failing over a limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and nofile > hard:
        try:  # raise PID 1's own hard limit so that the child may take it
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, nofile))
        except (ValueError, OSError) as exc:
            boot.kmsg.log(4, f"agent RLIMIT_NOFILE {nofile} not allowed ({exc}); using {hard}")
            nofile = hard
    if oom < 0 and not _has_cap(boot, CAP_SYS_RESOURCE):
        boot.kmsg.log(4, f"agent oom_score_adj {oom} needs CAP_SYS_RESOURCE; left as is")
        return nofile, None
    return nofile, oom


def _has_cap(boot: Boot, cap: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return boot.root == "/"


def _agent_env() -> dict[str, str]:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/",
            "TERM": "vt100"}

