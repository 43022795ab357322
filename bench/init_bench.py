"""``guestinit-bench init``: exec -> ``ready`` of the init as PID 1 of a namespace, vs Python.

Each run starts the real init (``python -m guestinit``) as PID 1 of fresh PID, mount,
UTS and network namespaces (``unshare``) on a temporary root, with no accelerators and
no agent, and times it from just before the spawn to the ``ready`` frame arriving on
a Unix socket; then SIGTERM, the ``shutdown`` frame and the exit. Next to it, in the
same loop, the same interpreter's bare start (``python3 -I -S -c pass``): baseline and
init alternate, after warm-up runs of each, so load on the machine hits both alike.
The issue's target is a median ratio of 3 or less; ``--gate RATIO`` makes a ratio above
RATIO exit with status 1 (for CI).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from bench.cli_args import positive_count
from bench.init_report import (
    EXEC_TO_EARLY,
    READY_TO_HOST,
    TARGET_RATIO,
    Results,
    Sample,
    gate_line,
    table,
)
from bench.listen import FramePump
from guestinit.wire import Frame, FrameType
from rootfs import proc

REPO = Path(__file__).resolve().parents[1]
WARMUP = 2
READY_TIMEOUT = 20.0  # s from spawn to ready (or failed)
STOP_TIMEOUT = 10.0  # s from SIGTERM to the shutdown frame, and again to the exit
JSON_SCHEMA = 1
CMDLINE = ("guestinit.lockdown=0 guestinit.agent=none guestinit.mode=cpu "
           "guestinit.shutdown.grace=1")
BASELINE_ARGS = ("-I", "-S", "-c", "pass")
EXIT_FAILED = 1
EXIT_USAGE = 2


class RunFailed(Exception):
    """One run went wrong; the message names the run and says why."""


def boottime_ns() -> int:
    # The namespaces share the host's CLOCK_BOOTTIME (no time namespace), so host
    # stamps and the guest timeline compare directly.
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class InitRun:
    """One init in fresh namespaces; its root, report socket and log live under ``workdir``."""

    def __init__(self, python: str, workdir: Path, append: str = "",
                 executable: str | None = None) -> None:
        root = workdir / "root"
        for d in ("proc", "sys", "dev", "run", "tmp", "etc"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "etc" / "guestinit.conf").write_text("")
        self.log_path = workdir / "init.log"
        sock_path = workdir / "report.sock"
        self.channel = FramePump(str(sock_path))
        self.cmdline = f"guestinit.report=unix:{sock_path} {CMDLINE} {append}".strip()
        # Started the way the image's /sbin/init starts it: ``python3 -I -S`` and an
        # explicit sys.path (this checkout, then the directories holding the wheels).
        # With ``executable`` (the image's one executable, rootfs/staticinit.c): run by a
        # name that is not python*, it is the init with guestinit frozen in.
        start = [executable] if executable else [python, "-I", "-S", "-c", launcher(python)]
        self.argv = ["unshare", "--pid", "--fork", "--mount", "--uts", "--net",
                     "--kill-child", *start, "--root", str(root), "--cmdline", self.cmdline]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.child: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.child = proc.spawn(self.argv, stdout=self._log.fileno(),
                                stderr=subprocess.STDOUT, cwd=str(REPO))

    def _pump(self, timeout: float) -> None:
        """Read what arrives within ``timeout`` s; malformed input ends the run."""
        self.channel.pump(timeout)
        if self.channel.errors:
            raise RunFailed(f"malformed frame from the init: {self.channel.errors[0]}")

    def wait_for(self, wanted: tuple[FrameType, ...], timeout: float) -> Frame | None:
        """The first frame of a ``wanted`` type; None on timeout or once the init is gone."""
        assert self.child is not None
        deadline = time.monotonic() + timeout
        seen = 0
        channel = self.channel
        while True:
            for frame in channel.frames[seen:]:
                if frame.type in wanted:
                    return frame
            seen = len(channel.frames)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.child.poll() is not None:
                if channel.eof:
                    return None  # gone, and everything it sent is read
                if channel.conn is None:
                    self._pump(0.05)  # a connection may still wait in the backlog
                    if channel.conn is None:
                        return None
                    continue
            self._pump(min(left, 0.2))

    def init_pid(self) -> int:
        """Host pid of the namespace's PID 1: unshare's only child."""
        assert self.child is not None
        pid = self.child.pid
        deadline = time.monotonic() + 2.0
        while self.child.poll() is None and time.monotonic() < deadline:
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise RunFailed("unshare has no child to signal (the init is gone)")

    def stop(self) -> None:
        """SIGTERM the init, then wait for its ``shutdown`` frame and for unshare's exit."""
        assert self.child is not None
        os.kill(self.init_pid(), signal.SIGTERM)
        if self.wait_for((FrameType.SHUTDOWN,), STOP_TIMEOUT) is None:
            raise RunFailed(f"no shutdown frame within {STOP_TIMEOUT:g}s of SIGTERM")
        try:
            self.child.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"the init did not exit within {STOP_TIMEOUT:g}s "
                            "of its shutdown frame") from None

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")[-4000:]
        return "\n".join(text.strip().splitlines()[-lines:])

    def close(self) -> None:
        """Kill and reap whatever is left (the whole process group), close everything."""
        if self.child is not None:
            proc.stop(self.child, grace=1.0)
        self.channel.close()
        self._log.close()


def phases_ms(ready: Frame, spawned_ns: int, received_ns: int) -> dict[str, float]:
    """ms per stage (repeated names summed) plus the host-seen time around the stages."""
    spans = ready.timeline()
    out: dict[str, float] = {}
    stages = [s for name, s, _ in spans if not name.startswith("start:")]  # the exe's own
    if stages:
        out[EXEC_TO_EARLY] = (min(stages) - spawned_ns) / 1e6
    for name, start, end in spans:
        out[name] = out.get(name, 0.0) + (end - start) / 1e6
    if spans:
        out[READY_TO_HOST] = (received_ns - max(e for _, _, e in spans)) / 1e6
    return out


_LAUNCHERS: dict[str, str] = {}
WHEELS = ("msgpack", "psutil", "cffi")


def launcher(python: str) -> str:
    """``-c`` code for ``python -I -S`` that runs the init like the image's /sbin/init."""
    if python not in _LAUNCHERS:
        code = ("import importlib.util as u, os\n"
                f"for m in {WHEELS!r}:\n"
                "    print(os.path.dirname(os.path.dirname(u.find_spec(m).origin)))")
        try:
            done = proc.run([python, "-c", code], timeout=60)
        except proc.RunError as exc:
            raise RunFailed(f"{python} cannot import the init's wheels {', '.join(WHEELS)}: "
                            f"{exc} (run ./build.sh setup)") from None
        paths = [str(REPO), *dict.fromkeys(done.stdout.split())]
        _LAUNCHERS[python] = (f"import sys; sys.path[:0] = {paths!r}; "
                              "from guestinit.__main__ import main; main()")
    return _LAUNCHERS[python]


def time_init(python: str, workdir: Path, append: str,
              executable: str | None = None) -> Sample:
    run = InitRun(python, workdir, append, executable)
    try:
        spawned_ns = boottime_ns()
        t0 = time.perf_counter()
        run.start()
        frame = run.wait_for((FrameType.READY, FrameType.FAILED), READY_TIMEOUT)
        seconds = time.perf_counter() - t0
        received_ns = boottime_ns()
        try:
            if frame is None:
                seen = ", ".join(f.type.value for f in run.channel.frames) or "none"
                assert run.child is not None
                if run.child.poll() is not None:
                    raise RunFailed(f"the init exited (status {run.child.returncode}) before "
                                    f"ready; frames seen: {seen}")
                raise RunFailed(f"no ready frame within {READY_TIMEOUT:g}s; frames seen: {seen}")
            if frame.type is FrameType.FAILED:
                raise RunFailed(f"the init sent a failed frame (stage {frame.get('stage')}): "
                                f"{frame.get('reason')}")
            run.stop()
        except RunFailed as exc:
            raise RunFailed(f"{exc}\ninit output (last lines):\n{run.log_tail()}") from None
        return Sample(seconds, phases_ms(frame, spawned_ns, received_ns))
    finally:
        run.close()


def time_python(python: str) -> float:
    t0 = time.perf_counter()
    child = proc.spawn([python, *BASELINE_ARGS], stderr=subprocess.DEVNULL)
    try:
        rc = child.wait(READY_TIMEOUT)
        seconds = time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        raise RunFailed(f"{python} -I -S -c pass still running after {READY_TIMEOUT:g}s") \
            from None
    finally:
        proc.stop(child, grace=0.0)
    if rc != 0:
        raise RunFailed(f"{python} -I -S -c pass: exit status {rc}")
    return seconds


def _python_version(python: str) -> str:
    done = proc.run([python, "-c", "import sys; print(sys.version)"], timeout=30)
    return done.stdout.strip().splitlines()[0]


def to_json(res: Results, python: str, runs: int, append: str) -> dict[str, object]:
    return {
        "schema": JSON_SCHEMA,
        "benchmark": "guestinit-bench init",
        "runs": runs,
        "warmup": WARMUP,
        "python": python,
        "python_version": _python_version(python),
        "cpu_count": os.cpu_count(),
        "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cmdline": f"{CMDLINE} {append}".strip(),
        "samples_ms": {"init": res.init_ms, "python": res.python_ms},
        "median_ms": {"init": statistics.median(res.init_ms),
                      "python": statistics.median(res.python_ms)},
        "ratio": res.ratio(),
        "target_ratio": TARGET_RATIO,
        "target_met": res.ratio() <= TARGET_RATIO,
        "stage_samples_ms": {n: res.phases[n] for n in res.stage_names()},
        "stage_median_ms": {n: statistics.median(res.phases[n]) for n in res.stage_names()},
        "host_median_ms": {n: statistics.median(res.phases[n])
                           for n in (EXEC_TO_EARLY, READY_TO_HOST) if n in res.phases},
    }


def one_executable(spec: str, workdir: Path) -> tuple[str, str]:
    """(the init, the baseline interpreter) for ``--executable``: ``spec`` is the path of the
    image's one executable, or ``build`` for the one rootfs.staticinit builds for this
    checkout and the lock (cached); the baseline is the same file run as python3.11."""
    if spec == "build":
        from rootfs import fetch, staticinit
        from rootfs.profile import PROFILES_DIR
        from rootfs.steps import BuildError

        lock = fetch.Lock.load(PROFILES_DIR / "debian.lock")
        try:
            built, _ = staticinit.static_init_binary(
                Path("/usr/lib/python3.11"), lock.debs["python3.11-minimal"].version,
                lock.wheels["cffi"].version, pin=lock.sdists.get("cffi"))
        except BuildError as exc:
            raise RunFailed(f"build the one executable: {exc}") from None
        spec = str(built)
    exe = Path(spec).resolve()
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise RunFailed(f"--executable {spec}: not an executable file (give the image's "
                        "/usr/bin/python3.11, or `build`)")
    as_python = workdir / "python3.11"  # the name picks its interpreter mode
    as_python.symlink_to(exe)
    return str(exe), str(as_python)


def bench(python: str, runs: int, append: str, progress: TextIO,
          executable: str | None = None) -> Results:
    res = Results()
    with tempfile.TemporaryDirectory(prefix="guestinit-bench-init-") as tmp:
        init_exe = None
        if executable is not None:
            init_exe, python = one_executable(executable, Path(tmp))
            print(f"one executable {init_exe}: the init, and as {python} the baseline",
                  file=progress, flush=True)
        for i in range(WARMUP + runs):
            warm = i < WARMUP
            name = f"warm-up {i + 1}/{WARMUP}" if warm else f"run {i - WARMUP + 1}/{runs}"
            try:
                python_s = time_python(python)
                sample = time_init(python, Path(tmp) / f"run{i}", append, init_exe)
            except RunFailed as exc:
                raise RunFailed(f"{name}: {exc}") from None
            print(f"{name}: init {sample.seconds * 1e3:.0f} ms, python {python_s * 1e3:.0f} ms",
                  file=progress, flush=True)
            if not warm:
                res.add(python_s, sample)
    return res


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guestinit-bench init",
        description="Median time from exec to the ready frame of guestinit as PID 1 of a "
        "PID namespace (no accelerators, no agent), next to python3 -I -S -c pass.")
    p.add_argument("--runs", type=positive_count, default=20, metavar="N",
                   help="measured runs of each, after 2 warm-up runs (default 20)")
    p.add_argument("--json", metavar="FILE",
                   help="write every sample, the medians, the ratio and the host facts")
    p.add_argument("--python", default=sys.executable, metavar="PATH",
                   help="interpreter for both the init and the baseline (default: this one)")
    p.add_argument("--executable", metavar="PATH",
                   help="time the image's one executable (rootfs/staticinit.c) instead: "
                   "PATH started as the init and, linked as python3.11, as the baseline; "
                   "`build` builds it for this checkout (cached)")
    p.add_argument("--append", default="", metavar="ARGS",
                   help="extra guestinit.* cmdline words, last so they win "
                   "(e.g. 'guestinit.log=debug')")
    p.add_argument("--gate", type=positive_ratio, metavar="RATIO",
                   help="exit status 1 when the median ratio exceeds RATIO (default: no gate)")
    return p


def positive_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive ratio")
    return value


def _cannot_run(python: str) -> str | None:
    if os.geteuid() != 0:
        return ("needs root: the init runs as PID 1 of new PID and mount namespaces "
                "(unshare --pid --mount); run it as root")
    if shutil.which("unshare") is None:
        return "unshare not found (util-linux)"
    if shutil.which(python) is None:
        return f"{python}: no such interpreter"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["--"]:
        # ``guestinit-bench init -- --runs 5``: the top-level parser's REMAINDER keeps the
        # ``--`` that gets options past it.
        words = words[1:]
    args = parser().parse_args(words)
    why = _cannot_run(args.python)
    if why is not None:
        print(f"guestinit-bench init: {why}", file=sys.stderr)
        return EXIT_USAGE
    print(f"guestinit-bench init: {args.runs} runs (+{WARMUP} warm-up) of each, interleaved; "
          f"python {args.python}", file=sys.stderr, flush=True)
    try:
        res = bench(args.python, args.runs, args.append, sys.stderr, args.executable)
    except (RunFailed, proc.RunError) as exc:
        print(f"guestinit-bench init: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(table(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            data = to_json(res, args.python, args.runs, args.append)
            data["executable"] = args.executable  # None: python -I -S -c LAUNCHER
            json.dump(data, fh, indent=1)
            fh.write("\n")
        print(f"wrote {args.json}")
    passed, line = gate_line(res.ratio(), args.gate)
    if line is not None:
        print(line)
    return 0 if passed else EXIT_FAILED
