"""The image's one executable (rootfs/staticinit.c, profile key ``static_init``) boots the
pidns root to ``ready`` with the agent stand-in, as the image's /sbin/init would.

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
        pytest.fail(f"build the executable: {exc}")
    return binary


def test_static_init_boots_to_ready(ns_init: type[NsInit], tmp_path: Path,
                                    static_init: Path) -> None:
    init = ns_init(tmp_path, CMDLINE, launch=[str(static_init)])
    init.wait_frame(FrameType.READY)
    assert not init.errors


def test_the_main_start_phase_runs_after_ready(ns_init: type[NsInit], tmp_path: Path,
                                             static_init: Path) -> None:
    """The boot runs on the interpreter's core phase: no codec registry (the encodings
    package) and no path import before ready. The main phase runs after the ready frame
    (its span says when), and the status request that reports it is served."""
    init = ns_init(tmp_path, CMDLINE, launch=[str(static_init)])
    ready = init.wait_frame(FrameType.READY)
    status = init.status(timeout=10)
    start = status["start"]
    assert isinstance(start, dict)
    assert start["main_phase"] == "ready"
    before = start["boot_modules"]
    assert isinstance(before, list) and "guestinit.pid1" in before
    assert "encodings" not in before and "json" not in before
    assert not [m for m in before if m.startswith("_frozen_importlib_external")]
    spans = {name: (a, b) for name, a, b in status["timeline"]}  # type: ignore[union-attr]
    assert {"start:python", "start:imports", "start:main"} <= set(spans)
    assert spans["start:main"][0] >= ready.t


def test_its_commands_run_the_main_phase_first(tmp_path: Path, static_init: Path) -> None:
    """As the init, the executable's commands (``--help``, ``status``) print: they run the
    main phase (sys.stdout) before anything else."""
    import subprocess

    init = tmp_path / "init"
    init.symlink_to(static_init)
    done = subprocess.run([str(init), "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("python -m guestinit [--root DIR]")


def test_its_last_finder_hands_over_to_the_path_finder(tmp_path: Path,
                                                       static_init: Path) -> None:
    """``_guestinit_start`` as a finder: once the main phase ran (here Py_BytesMain's), it
    asks the path finder, leaves ``sys.meta_path`` and says nothing ran the phase for it.
    (What it turns away in the core phase, json's accelerator, the VM tier's GPU boot
    covers: its CDI stage writes json before ready.)"""
    import subprocess

    python = tmp_path / "python3.11"
    python.symlink_to(static_init)
    code = ("import sys, _guestinit_start as s\n"
            "sys.meta_path.append(s)\n"
            "spec = s.find_spec('json', None)\n"
            "print(spec.origin, s in sys.meta_path, s.state(), s.finish())\n")
    done = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["/usr/lib/python3.11/json/__init__.py", "False", "None",
                                   "False"]


def test_a_boot_that_fails_before_ready_still_says_why(ns_init: type[NsInit], tmp_path: Path,
                                                       static_init: Path) -> None:
    """A failure on the core phase takes the failure path whole: the ``failed`` frame
    names the stage, and the init ends."""
    init = ns_init(tmp_path, CMDLINE + " guestinit.inject=discover", launch=[str(static_init)])
    failed = init.wait_frame(FrameType.FAILED)
    assert failed.get("stage") == "discover"
    assert "fault injected at stage discover" in str(failed.get("reason"))
    init.wait_exit()


def test_run_as_python_it_is_the_interpreter_with_frozen_stdlib_and_api_mode_libc(
        tmp_path: Path, static_init: Path) -> None:
    """Linked as python3.11 it is the image's interpreter: extension modules load from
    lib-dynload and the wheels (symbols exported), the boot's stdlib comes frozen, and
    guestinit's libc calls are there in cffi's API mode."""
    import site
    import subprocess

    python = tmp_path / "python3.11"
    python.symlink_to(static_init)
    code = (
        "import sys; sys.path.append(sys.argv[1])\n"
        "import enum, mmap, psutil, resource, _guestinit_libc as m\n"
        "old = m.ffi.new('struct rlimit *')\n"
        "assert m.lib.prlimit(0, resource.RLIMIT_NOFILE, m.ffi.NULL, old) == 0\n"
        "print(enum.__spec__.origin, mmap.__spec__.origin.endswith('.so'),\n"
        "      psutil.Process().pid > 1, old.rlim_cur == resource.getrlimit(7)[0],\n"
        "      type(m.lib).__name__, sys.flags.isolated)\n")
    done = subprocess.run([str(python), "-I", "-c", code, site.getsitepackages()[0]],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["frozen", "True", "True", "True", "Lib", "1"]
