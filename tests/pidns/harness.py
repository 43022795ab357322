"""Runs the real init as PID 1 of a fresh PID + mount (+ UTS, net) namespace.

``NsInit(tmp_path, cmdline=..., conf=...)`` builds a root under tmp_path, listens
on a Unix socket for the report channel (``guestinit.report=unix:...``), starts
``unshare --pid --fork --mount --uts --net python -m guestinit --root ROOT``
and collects frames. Lockdown is off unless a test asks: under a test root,
/proc is the host's real procfs and ``modules_disabled`` is global.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from bench.listen import FramePump
from guestinit import wire
from guestinit.control import query

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "guestinit" / "testing" / "agent_standin.py"


ROOT_TOKEN = "@ROOT@"  # replaced by the test root in the cmdline (NsInit)


def agent_arg(*args: str) -> str:
    """``guestinit.agent=...`` running the stand-in with the test's Python, logging to
    the syslog server of the test root."""
    # --init-root: in init mode (the default) the stand-in does kata-agent's mounts and
    # /dev/ptmx link under the test root, never on the host's devtmpfs
    words = [sys.executable, "-I", str(STANDIN), "--log", f"{ROOT_TOKEN}/dev/log",
             "--init-root", ROOT_TOKEN, *args]
    return 'guestinit.agent="' + " ".join(words) + '"'


def image_launch(prelude: str = "", python_args: tuple[str, ...] = ()) -> list[str]:
    """The interpreter command the image's /sbin/init amounts to (``python3 -I -S``, an
    explicit sys.path: this checkout, then the venv's site-packages), with ``prelude``
    run before ``main()``: e.g. a meta-path finder that hides a module from the init."""
    site = sysconfig.get_paths()["purelib"]
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {site!r}]\n{prelude}\n"
            "from guestinit.__main__ import main; main()")
    return [sys.executable, *python_args, "-I", "-S", "-c", code]


HIDE_MODULES = """
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
"""


def hide_modules(*names: str) -> str:
    """A prelude for ``image_launch`` after which importing any of ``names`` fails as if
    the module were missing from the image (the package itself stays as it is)."""
    return HIDE_MODULES.format(names=set(names))


class NsInit:
    def __init__(self, tmp_path: Path, cmdline: str = "", conf: str = "",
                 root_setup: object = None, lockdown: bool = False,
                 launch: list[str] | None = None) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "root"
        for d in ("proc", "sys", "dev", "run", "tmp", "etc"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "guestinit.conf").write_text(conf)
        if callable(root_setup):
            root_setup(self.root)
        self.sock_path = tmp_path / "report.sock"
        self.channel = FramePump(str(self.sock_path), backlog=4)
        self.frames = self.channel.frames  # what arrived so far (the pump appends)
        self.errors = self.channel.errors
        full = f"guestinit.report=unix:{self.sock_path} guestinit.shutdown.grace=2 " + \
            ("" if lockdown else "guestinit.lockdown=0 ") + cmdline.replace(ROOT_TOKEN,
                                                                            str(self.root))
        python = launch if launch is not None else [sys.executable, "-m", "guestinit"]
        self.cmd = ["unshare", "--pid", "--fork", "--mount", "--uts", "--net", "--kill-child",
                    *python, "--root", str(self.root), "--cmdline", full]
        self.log_path = tmp_path / "init.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), env=env, start_new_session=True)

    # -- frames ------------------------------------------------------------
    def wait_frame(self, ftype: wire.FrameType, timeout: float = 20.0) -> wire.Frame:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for frame in self.frames[seen:]:
                if frame.type == ftype:
                    return frame
            seen = len(self.frames)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            channel = self.channel
            if (not channel.pump(min(left, 0.5)) and self.proc.poll() is not None
                    and channel.conn is not None and not channel.pump(0.1)):
                break  # init gone and the stream drained
        raise AssertionError(
            f"no {ftype.value} frame within {timeout}s; got {[f.type.value for f in self.frames]}"
            f", errors {self.errors}; init log:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    # -- the init ----------------------------------------------------------
    def init_pid(self) -> int:
        """Host pid of the namespace's PID 1 (unshare's only child)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
                if text.split():
                    return int(text.split()[0])
            except OSError:
                pass
            time.sleep(0.01)
        raise AssertionError("unshare started no child")

    def signal(self, sig: int) -> None:
        os.kill(self.init_pid(), sig)

    def inside(self, rel: str) -> Path:
        """``ROOT/rel`` as the init sees it: its /run, /dev, /tmp are mounts in its own
        mount namespace, reached from here through /proc/PID/root."""
        return Path(f"/proc/{self.init_pid()}/root") / str(self.root).lstrip("/") / rel

    def wait_syslog(self, text: str, timeout: float = 10.0) -> str:
        """The first line of the init's syslog store holding ``text`` (e.g. the agent's
        "up" line: ready goes out as soon as the agent is spawned, not initialised)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                lines = self.inside("run/guestinit/syslog").read_text(errors="replace")
            except OSError:
                lines = ""
            for line in lines.splitlines():
                if text in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no syslog line with {text!r} within {timeout}s; "
                             f"log:\n{self.log()}")

    def status(self, timeout: float = 2.0) -> dict[str, object]:
        # connect through an O_PATH fd of the directory: the /proc/PID/root path can be
        # longer than a sockaddr_un holds
        fd = os.open(self.inside("run/guestinit"), os.O_PATH | os.O_DIRECTORY)
        try:
            return query(f"/proc/self/fd/{fd}/control", timeout)
        finally:
            os.close(fd)

    def children_of_init(self) -> list[tuple[int, str]]:
        """(pid, state) of the init's direct children, from the host's /proc."""
        pid = self.init_pid()
        out = []
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        for kid in kids:
            try:
                stat = Path(f"/proc/{kid}/stat").read_text()
            except OSError:
                continue
            out.append((int(kid), stat.rsplit(")", 1)[1].split()[0]))
        return out

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"init did not end within {timeout}s; log:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.channel.close()
        self._log.close()
