"""The /sbin/init launcher: clean environment, hash seed, flags, exec failure, the build."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from rootfs import launcher
from rootfs.steps import BuildError

PYTHON = "/usr/bin/python3.11"
FLAGS = ["-s", "-S", "-P", "-B", "-c"]
DIRTY = {"PYTHONPATH": "/evil", "PYTHONSTARTUP": "x", "PYTHONHOME": "/evil", "FOO": "bar",
         "HOME": "/", "TERM": "linux", "PATH": "/usr/bin:/bin",
         "GUESTINIT_SPANS": "initramfs:1:2;verity:2:3"}


def build(tmp_path: Path, **defines: str) -> Path:
    """A test build; ``defines`` are Python strings, quoted here as C literals."""
    quoted = {k: json.dumps(v) for k, v in defines.items()}
    return launcher.compile_launcher(tmp_path / "launcher", quoted)


def fake_interpreter(tmp_path: Path) -> Path:
    """Records the argv and the environment it was exec'ed with (from /proc: exactly what
    execve passed, before the shell adds anything)."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\ncat /proc/$$/environ > {tmp_path}/environ\n"
                    f"printf '%s\\0' \"$@\" > {tmp_path}/argv\n")
    fake.chmod(0o755)
    return fake


def nul_list(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def run(binary: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], env=DIRTY, cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_child_sees_only_the_seed_guestinit_vars_the_flags_and_the_args(tmp_path: Path) -> None:
    binary = build(tmp_path, LAUNCHER_PYTHON=str(fake_interpreter(tmp_path)))
    res = run(binary, "--root", "/r", "quiet", "x=y")
    assert res.returncode == 0, res.stderr
    env = dict(item.partition("=")[::2] for item in nul_list(tmp_path / "environ"))
    assert set(env) == {"PYTHONHASHSEED", "GUESTINIT_SPANS"}
    assert env["GUESTINIT_SPANS"] == DIRTY["GUESTINIT_SPANS"]
    seed = env["PYTHONHASHSEED"]
    assert seed.isdigit() and seed == str(int(seed)) and 1 <= int(seed) <= 2**32 - 1
    argv = nul_list(tmp_path / "argv")
    assert argv[:5] == FLAGS
    assert "    from guestinit.__main__ import main\n" in argv[5]
    assert argv[5].endswith("\nmain()\n")
    compile(argv[5], "<launcher>", "exec")  # the entry code is valid Python
    assert 'sys.path.insert(0, "/usr/lib/guestinit")' in argv[5]
    assert argv[6:] == ["--root", "/r", "quiet", "x=y"]


def test_seed_comes_from_the_crng_when_it_is_ready(tmp_path: Path) -> None:
    binary = build(tmp_path, LAUNCHER_PYTHON=str(fake_interpreter(tmp_path)))
    seeds = set()
    for _ in range(3):
        assert run(binary).returncode == 0
        seeds.add(dict(i.partition("=")[::2] for i in nul_list(tmp_path / "environ"))
                  ["PYTHONHASHSEED"])
    assert len(seeds) == 3  # the fallback would repeat (a clash is a 1 in 2**31 event)


def test_missing_interpreter_exits_127_naming_it(tmp_path: Path) -> None:
    binary = build(tmp_path, LAUNCHER_PYTHON="/nonexistent/python3.11")
    res = run(binary, "--root", "/r")
    assert res.returncode == 127
    assert res.stderr == ("guestinit-launcher: exec /nonexistent/python3.11: "
                          "No such file or directory; exit 127\n")


def test_interpreter_that_is_not_executable(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    res = run(build(tmp_path, LAUNCHER_PYTHON=str(plain)))
    assert res.returncode == 127
    assert f"exec {plain}: Permission denied" in res.stderr


@pytest.mark.skipif(not os.access(PYTHON, os.X_OK), reason=f"needs {PYTHON}")
def test_real_interpreter_is_isolated_and_uses_the_seed(tmp_path: Path) -> None:
    """Against the host's python3.11: what -I gave, minus ignoring PYTHONHASHSEED."""
    (tmp_path / "evil.py").write_text("raise SystemExit('imported from the cwd')\n")
    code = ("import json, os, sys; f = sys.flags; "
            "json.dump(dict(no_site=f.no_site, no_user_site=f.no_user_site, "
            "safe_path=f.safe_path, hash_randomization=f.hash_randomization, "
            "ignore_environment=f.ignore_environment, path=sys.path, argv=sys.argv, "
            "env=dict(os.environ), hash=hash('guestinit'), "
            "evil=__import__('importlib.util').util.find_spec('evil') is not None), "
            "sys.stdout)")
    binary = build(tmp_path, LAUNCHER_CODE=code)
    res = run(binary, "--cmdline", "a=b", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert (got["no_site"], got["no_user_site"], got["safe_path"]) == (1, 1, True)
    assert got["hash_randomization"] == 1 and got["ignore_environment"] == 0
    assert got["argv"] == ["-c", "--cmdline", "a=b"]
    assert not got["evil"] and all(p.startswith("/usr/lib/python3") for p in got["path"])
    # Python adds LC_CTYPE itself (PEP 538 locale coercion), as it does under -I
    assert set(got["env"]) - {"LC_CTYPE"} == {"PYTHONHASHSEED", "GUESTINIT_SPANS"}
    seed = got["env"]["PYTHONHASHSEED"]
    same = subprocess.run([PYTHON, "-S", "-c", "print(hash('guestinit'))"], timeout=60,
                          env={"PYTHONHASHSEED": seed}, capture_output=True, text=True,
                          check=True)
    assert int(same.stdout) == got["hash"]  # the interpreter used the launcher's seed


@pytest.mark.pidns
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare")
def test_as_pid1_a_failed_exec_goes_to_kmsg_and_powers_off(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    binary = build(tmp_path, LAUNCHER_PYTHON="/nonexistent/python3.11",
                   LAUNCHER_KMSG=str(kmsg))
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--kill-child",
                          str(binary)], capture_output=True, text=True, timeout=60,
                         check=False)
    # reboot(POWER_OFF) in a PID namespace ends it with SIGINT (tests/pidns/test_init.py)
    assert res.returncode == -signal.SIGINT, res.stderr
    line = "guestinit-launcher: exec /nonexistent/python3.11: No such file or directory; "
    assert res.stderr == line + "powering off\n"
    assert kmsg.read_text() == "<2>" + line + "powering off\n"


def test_missing_compiler_names_the_packages(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"apt-get install musl-tools \(or gcc libc6-dev\)"):
        launcher.compile_launcher(tmp_path / "x", cc="/nonexistent/gcc")


def test_compile_error_names_the_packages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("#include <no-such-header.h>\n")
    with pytest.raises(BuildError, match=r"(?s)no-such-header.*apt-get install musl-tools"):
        launcher.compile_launcher(tmp_path / "x", source=bad)


def test_binary_is_static_reproducible_and_cached(tmp_path: Path) -> None:
    first = launcher.launcher_binary(cache=tmp_path / "cache")
    assert first.parent == tmp_path / "cache" / "launcher"
    assert launcher.launcher_binary(cache=tmp_path / "cache") == first
    again = launcher.compile_launcher(tmp_path / "again")
    assert again.read_bytes() == first.read_bytes()
    data = first.read_bytes()
    assert data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data  # no PT_INTERP
    assert b".note.gnu.build-id" not in data
    assert str(launcher.SOURCE.parent).encode() not in data


def test_guestinit_missing_from_the_image_is_named_without_a_traceback(tmp_path: Path) -> None:
    # a site directory without the guestinit package: the real interpreter runs the real
    # entry code, which names what is missing (as PID 1 it would power off too)
    site = tmp_path / "site"
    site.mkdir()
    binary = build(tmp_path, LAUNCHER_SITE=str(site))
    res = run(binary)
    assert res.returncode == 1
    assert res.stderr == ("guestinit: cannot start: ModuleNotFoundError: No module named "
                          "'guestinit' (the image lacks part of guestinit or its Python "
                          "modules); powering off\n")
