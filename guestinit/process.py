"""Spawning children and learning how they ended, the PID-1 way.

PID 1 reaps every child with ``waitpid(-1)``: orphans re-parent to it and must
not linger as zombies. ``subprocess.Popen`` cannot live with that (a child reaped
behind its back reports return code 0), so the guest spawns with fork+exec here
and gets exit statuses from this table's reaper.
"""

from __future__ import annotations

import errno
import os
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable, Mapping, Sequence
else:  # signal.py imports enum (boot path); the C module has everything used here
    import _signal as signal

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_FINISHED = 256  # exit statuses kept for children nobody has waited for yet
RUN_OUTPUT_MAX = 1 << 20


def resolve(exe: str, env: Mapping[str, str] | None) -> str:
    """The file to exec for ``exe``: a path as given, or the first match on PATH."""
    if "/" in exe:
        return exe
    path = (env or {}).get("PATH", DEFAULT_PATH)
    for folder in path.split(":"):
        candidate = os.path.join(folder, exe)
        if os.access(candidate, os.X_OK):
            return candidate
    return exe


def _child(
    exe: str, argv: Sequence[str], env: Mapping[str, str], err_w: int,
    uid: int | None, gid: int | None, nofile: int | None, oom_score_adj: int | None,
    stdout: int | None, stderr: int | None, cwd: str | None, setsid: bool = True,
) -> None:
    """Runs in the forked child; never returns."""
    try:
        if setsid:
            os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPWR,
                    signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(stdout if stdout is not None else null, 1)
        os.dup2(stderr if stderr is not None else (stdout if stdout is not None else null), 2)
        if nofile is not None:
            from guestinit.effects import Effects  # libc's prlimit: no ``resource`` to load

            Effects().set_nofile(nofile, nofile)
        if oom_score_adj is not None:
            from guestinit.sysfs import write_text  # not open(): the codec registry (sysfs.py)

            write_text("/proc/self/oom_score_adj", str(oom_score_adj))
        if gid is not None:
            os.setgroups([gid])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
        if cwd is not None:
            os.chdir(cwd)
        os.execve(exe, list(argv), dict(env))
    except BaseException as exc:  # report any failure to the parent, then die
        _die(err_w, exc)


def _die(err_w: int, exc: BaseException) -> None:
    """In a forked child: tell the parent what failed (``spawn`` raises it), exit 127."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
    try:
        os.write(err_w, f"{code}:{type(exc).__name__}: {exc}".encode()[:500])
    finally:
        os._exit(127)


def _fork_pid_namespace(err_w: int) -> int:
    """Like fork(), but the child is PID 1 of a new PID namespace: 0 in the child, its pid
    (in our namespace) in the parent. unshare(CLONE_NEWPID) applies to the children of the
    caller, so an intermediate process makes it, forks the namespace's first process and
    exits; that process is then re-parented to us (PID 1, or the subreaper)."""
    from guestinit.effects import (
        CLONE_NEWNS,
        CLONE_NEWPID,
        MS_NODEV,
        MS_NOEXEC,
        MS_NOSUID,
        MS_REC,
        MS_SLAVE,
        Effects,
    )

    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    middle = os.fork()
    if middle == 0:
        os.close(pid_r)
        try:
            fx = Effects()
            fx.unshare(CLONE_NEWPID)
            first = os.fork()
            if first == 0:
                fx.unshare(CLONE_NEWNS)
                fx.mount("none", "/", "", MS_REC | MS_SLAVE)
                # the /proc of the new namespace: its pids, /proc/self, /proc/1 = itself
                fx.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                return 0
            os.write(pid_w, str(first).encode())
            os._exit(0)
        except BaseException as exc:  # tell the parent through the exec-error pipe
            _die(err_w, exc)
    os.close(pid_w)
    try:
        text = os.read(pid_r, 32)
    finally:
        os.close(pid_r)
    os.waitpid(middle, 0)
    if not text:  # the middle process failed before forking: its report is in err_w
        return -1
    return int(text)


class ProcessTable:
    """Children we started (pid -> return code or None while running)."""

    __slots__ = ("_callbacks", "_finished", "_status", "env", "orphans_reaped")

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._status: dict[int, int | None] = {}
        # finished children in reap order: only the last MAX_FINISHED keep their status,
        # so a restart loop cannot grow the table (a dict keeps order, and costs no import)
        self._finished: dict[int, None] = {}
        self._callbacks: dict[int, Callable[[int, int], None]] = {}
        self.orphans_reaped = 0
        self.env = dict(env) if env is not None else {"PATH": DEFAULT_PATH, "HOME": "/"}

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        uid: int | None = None,
        gid: int | None = None,
        nofile: int | None = None,
        oom_score_adj: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        cwd: str | None = None,
        on_exit: Callable[[int, int], None] | None = None,
        pid_namespace: bool = False,
    ) -> int:
        """Fork and exec ``argv``; OSError if the exec failed. ``pid_namespace``: the child
        is PID 1 of a new PID namespace with its own mount namespace (a slave of ours, so
        our later mounts reach it and its own stay there) and a /proc of that namespace,
        and it is no session leader (kata-agent in init mode calls setsid() itself)."""
        if not argv:
            raise OSError(errno.EINVAL, "spawn: empty command")
        full_env = dict(self.env if env is None else env)
        exe = resolve(argv[0], full_env)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = _fork_pid_namespace(err_w) if pid_namespace else os.fork()
            if pid == 0:
                os.close(err_r)
                _child(exe, argv, full_env, err_w, uid, gid, nofile, oom_score_adj,
                       stdout, stderr, cwd, setsid=not pid_namespace)
            os.close(err_w)
            err_w = -1
            self._status[pid] = None
            self._finished.pop(pid, None)  # a reused pid is a new child
            report = b""
            while chunk := os.read(err_r, 512):
                report += chunk
        finally:
            os.close(err_r)
            if err_w >= 0:
                os.close(err_w)
        if report:
            # exec failed: the child exits at once; collect it here
            if pid > 0:
                os.waitpid(pid, 0)
            del self._status[pid]
            code, _, text = report.decode(errors="replace").partition(":")
            raise OSError(int(code) if code.isdigit() else errno.EINVAL, f"spawn {exe}: {text}")
        if on_exit is not None:
            self._callbacks[pid] = on_exit
        return pid

    def reap(self) -> list[tuple[int, int]]:
        """Collect every exited child, ours or orphaned; call on_exit for ours."""
        done: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            if pid in self._status:
                self._status[pid] = code
                self._finished[pid] = None
                done.append((pid, code))
            else:
                self.orphans_reaped += 1
        while len(self._finished) > MAX_FINISHED:
            oldest = next(iter(self._finished))
            del self._finished[oldest]
            self._status.pop(oldest, None)
        for pid, code in done:
            callback = self._callbacks.pop(pid, None)
            if callback is not None:
                callback(pid, code)
        return done

    def poll(self, pid: int) -> int | None:
        self.reap()
        if pid not in self._status:
            raise KeyError(f"pid {pid} was not started by this table")
        return self._status[pid]

    def forget(self, pid: int) -> None:
        """Drop a finished child's record (the table would otherwise grow forever)."""
        if self._status.get(pid) is not None:
            del self._status[pid]
            self._finished.pop(pid, None)

    def running(self) -> list[int]:
        return [pid for pid, code in self._status.items() if code is None]

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return self.poll(pid)
        try:
            while (code := self.poll(pid)) is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                select.select([pidfd], [], [], left)
            return code
        finally:
            os.close(pidfd)

    def kill(self, pid: int, sig: int) -> None:
        if self._status.get(pid, 0) is None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass  # exited between the check and the kill; the reaper will see it

    def run(
        self, argv: Sequence[str], timeout: float, **spawn_kw: object
    ) -> tuple[int, str]:
        """Run to completion, capturing stdout+stderr (at most 1 MiB)."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = self.spawn(argv, stdout=out_w, stderr=out_w, **spawn_kw)  # type: ignore[arg-type]
        except BaseException:
            os.close(out_r)
            raise
        finally:
            os.close(out_w)
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill(pid, signal.SIGKILL)
                    self.wait(pid, 5)
                    raise TimeoutError(f"{argv[0]} did not finish within {timeout}s")
                ready, _, _ = select.select([out_r], [], [], left)
                if not ready:
                    continue
                chunk = os.read(out_r, 65536)
                if not chunk:
                    break
                if size < RUN_OUTPUT_MAX:
                    chunks.append(chunk[: RUN_OUTPUT_MAX - size])
                    size += len(chunk)
        finally:
            os.close(out_r)
        code = self.wait(pid, max(0.0, deadline - time.monotonic()))
        if code is None:
            self.kill(pid, signal.SIGKILL)
            self.wait(pid, 5)
            raise TimeoutError(f"{argv[0]} did not exit within {timeout}s")
        self.forget(pid)
        return code, b"".join(chunks).decode(errors="replace")
