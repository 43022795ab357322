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
