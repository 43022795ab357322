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
    restart = cfg["agent.restart"]
    assert isinstance(restart, Restart)
    exe = argv[0]
    if "/" in exe and not os.access(exe, os.X_OK):
        raise BootError(Stage.AGENT, f"start agent {exe}: not found or not executable "
                        "(set guestinit.agent=PATH)")
    try:
        service = boot.supervisor.add(
            AGENT, argv, restart=restart,
            nofile=cfg.int("agent.nofile"), oom_score_adj=cfg.int("agent.oom_score_adj"),
            stdout=1, stderr=2, env=_agent_env(),
        )
    except OSError as exc:
        raise BootError(Stage.AGENT, f"start agent {exe}: {exc.strerror or exc}") from None
    boot.facts["agent"] = {"argv": list(argv), "pid": service.pid}
    boot.kmsg.log(6, f"agent {exe} started as pid {service.pid}")


def _agent_env() -> dict[str, str]:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/",
            "TERM": "vt100"}

