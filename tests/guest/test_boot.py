"""Boot's side work: deferred mounts run on a side thread and are collected later."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from guestinit.boot import Boot


def bare_boot() -> Boot:
    return Boot("/nonexistent", None, None, None, None, None, None, "")  # type: ignore[arg-type]


def test_background_results_and_errors_come_back_in_order() -> None:
    boot = bare_boot()
    boot.background("slow", lambda: (time.sleep(0.1), "done")[1])
    boot.background("quick", lambda: 7)
    assert boot.wait_background() == [("slow", "done"), ("quick", 7)]
    assert boot.wait_background() == []

    def boom() -> None:
        raise OSError(19, "cgroup2: No such device")

    boot.background("mounts", boom)
    with pytest.raises(OSError, match="cgroup2"):
        boot.wait_background()


def test_background_that_hangs_times_out_naming_it() -> None:
    boot = bare_boot()
    boot.background("mounts", lambda: time.sleep(1.0))
    with pytest.raises(TimeoutError, match=r"mounts did not finish within 0\.05s"):
        boot.wait_background(timeout=0.05)
    assert boot.wait_background(timeout=5) == [("mounts", None)]


def test_syscall_numbers_come_from_one_table_per_architecture() -> None:
    from guestinit.effects import SYSCALLS, syscall_number

    assert syscall_number("finit_module", "x86_64") == 313
    assert syscall_number("finit_module", "aarch64") == 273
    assert set(SYSCALLS) == {"x86_64", "aarch64"}
    with pytest.raises(OSError, match="no syscall number known for riscv64"):
        syscall_number("finit_module", "riscv64")


def test_the_audit_list_is_a_ring_that_counts_what_it_dropped(tmp_path: Path) -> None:
    from guestinit.boot import MAX_AUDIT
    from tests.fixtures.accel import make_boot

    boot = make_boot(tmp_path)
    for i in range(MAX_AUDIT + 7):
        boot.audit_event(f"event {i}")
    assert len(boot.audit) == MAX_AUDIT and boot.audit_dropped == 7
    assert boot.audit[0] == "event 7" and boot.audit[-1] == f"event {MAX_AUDIT + 6}"


def test_kill_all_is_recorded_by_the_fake() -> None:
    from guestinit.effects import DryEffects

    dry = DryEffects()
    dry.kill_all(15)
    assert dry.calls == [("kill_all", 15)]


def test_cgroup_controllers_are_delegated_below_the_root(tmp_path: Path) -> None:
    from guestinit.agent import delegate_controllers
    from guestinit.effects import DryEffects

    fx = DryEffects()
    assert delegate_controllers(str(tmp_path), fx) == [] and fx.calls == []  # no cgroup2
    base = tmp_path / "sys/fs/cgroup"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert delegate_controllers(str(tmp_path), fx) == ["cpuset", "cpu", "io", "memory", "pids"]
    assert fx.calls == [("write", str(base / "cgroup.subtree_control"),
                         "+cpuset +cpu +io +memory +pids")]


def test_nofile_limits_go_through_libc_prlimit() -> None:
    import resource

    from guestinit.effects import Effects

    fx = Effects()
    soft, hard = fx.nofile()
    want = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert (soft, hard) == tuple(-1 if v == resource.RLIM_INFINITY else v for v in want)
    fx.set_nofile(soft, hard)  # setting what is there changes nothing and is allowed
    assert fx.nofile() == (soft, hard)
    with pytest.raises(OSError, match=r"setrlimit NOFILE 9:8: Invalid argument"):
        fx.set_nofile(9, 8)  # soft above hard: EINVAL, named


def test_agent_limits_raise_the_hard_limit_through_effects(tmp_path: Path) -> None:
    from guestinit.agent import agent_limits
    from guestinit.effects import DryEffects
    from tests.fixtures.accel import make_boot

    boot = make_boot(tmp_path, effects=DryEffects())
    soft, hard = boot.effects.nofile()
    want = (hard + 1) if hard != -1 else 1 << 20
    nofile, _ = agent_limits(boot, want, 0)
    assert nofile == want
    assert isinstance(boot.effects, DryEffects)
    assert boot.effects.calls == ([("set_nofile", soft, want)] if hard != -1 else [])


def test_the_gpu_list_status_shows_is_in_index_order() -> None:
    """``status``'s ``devices`` (hot-plug on or off): the assigned GPUs by index, whatever
    order they were assigned in (a hot-added GPU takes the lowest free index)."""
    from guestinit.boot import AssignedGpu, Facts

    facts = Facts()
    for index, bdf in ((2, "0000:00:03.0"), (0, "0000:00:01.0"), (1, "0000:00:05.0")):
        facts.gpus.append(AssignedGpu(index, bdf, f"GPU-{index}", "H100", index,
                                      {"path": f"/dev/nvidia{index}"}, []))
    maps = facts.gpu_maps()
    assert [m["index"] for m in maps] == [0, 1, 2]
    assert [m["bdf"] for m in maps] == ["0000:00:01.0", "0000:00:05.0", "0000:00:03.0"]
