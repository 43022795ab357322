"""When is the agent ready: the wait for ``guestinit.agent.ready``.

Conditions (``values.parse_ready``, pure):

- ``none``: spawned is ready (nothing is observed; the ``ready`` frame says so);
- ``syslog:TEXT``: a line containing TEXT reaches the init's syslog server;
- ``unix:PATH``: a Unix stream socket at PATH (under the boot root) accepts
  connections;
- ``vsock:PORT``: a vsock stream socket listens on PORT (kata-agent's 1024, the port
  Kata's runtime dials).

``wait_ready`` blocks in one ``select`` on every event that can end the wait: the
agent's pidfd (it exited), PID 1's signal wakeup fd (a shutdown request), and the
condition's own fd: the syslog socket, or an inotify watch on PATH's deepest
existing directory (a socket file or a missing directory appearing). It never
wakes on a timer, with one exception: a socket file that exists but refuses
connections is bound and not yet listening (the agent is between ``bind`` and
``listen``, which no event announces), so it is tried again every
``LISTEN_RETRY`` seconds until it accepts or the timeout ends.

A vsock listener is the other exception: the kernel announces no listen(), so the
vsock diag interface (vsock_diag.py) is asked again after ``VSOCK_RETRY`` seconds,
doubling up to ``VSOCK_RETRY_MAX``, while the agent's exit and PID 1's signals still
end the wait at once.
"""

from __future__ import annotations

import _socket as socket  # socket.py would import enum and selectors (boot path)
import errno
import os
import select
import time

from guestinit.values import Condition, Ready

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Protocol

    from guestinit.syslog import SyslogServer

    class Probe(Protocol):
        """What ``wait_for`` waits on: ``check`` says how it holds (None: not yet),
        ``fds`` wake the wait, ``retry`` is the longest sleep between checks."""

        retry: float | None

        def fds(self) -> list[int]: ...
        def check(self) -> str | None: ...
        def woke(self, ready: list[int]) -> None: ...
        def close(self) -> None: ...

POLL = 0.1  # s between looks for what announces itself by no event (a file, a TCP port)
LISTEN_RETRY = 0.005  # s between connects while a socket file refuses (bind -> listen)
VSOCK_RETRY, VSOCK_RETRY_MAX = 0.005, 0.1  # s between vsock diag dumps (doubling)
# <sys/inotify.h>
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


class ExitedBeforeReady(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"exited with status {status}")
        self.status = status


class NotReady(TimeoutError):
    """The condition did not hold within the timeout."""


class Inotify:
    """An inotify fd (non-blocking); events only wake the wait, which then looks again."""

    __slots__ = ("_ffi", "_lib", "fd", "watched")

    def __init__(self) -> None:
        from guestinit.effects import _lib

        self._ffi, self._lib = _lib()
        fd = self._lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)  # type: ignore[attr-defined]
        if fd < 0:
            err = self._ffi.errno  # type: ignore[attr-defined]
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self.watched: set[str] = set()

    def watch_dir(self, path: str) -> None:
        """Watch ``path`` for entries created or moved in (once per path)."""
        if path in self.watched:
            return
        mask = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR
        if self._lib.inotify_add_watch(self.fd, path.encode(), mask) < 0:  # type: ignore[attr-defined]
            err = self._ffi.errno  # type: ignore[attr-defined]
            raise OSError(err, f"inotify watch {path}: {os.strerror(err)}")
        self.watched.add(path)

    def drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def probe_unix(path: str) -> str:
    """``listening``, ``refused`` (a file that takes no connection yet) or ``absent``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                         | socket.SOCK_NONBLOCK)
    try:
        sock.connect(path)
    except BlockingIOError:  # EAGAIN: a listener whose backlog is full
        return "listening"
    except (FileNotFoundError, NotADirectoryError):
        return "absent"
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.EPROTOTYPE, errno.EACCES):
            return "refused"
        raise OSError(exc.errno, f"connect {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    return "listening"


def deepest_dir(path: str) -> str:
    """The deepest existing directory on the way to ``path`` (its parent, or above)."""
    folder = os.path.dirname(path)
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    return folder


class _UnixProbe:
    __slots__ = ("inotify", "path", "retry")

    def __init__(self, path: str) -> None:
        self.path = path
        self.inotify = Inotify()
        self.retry: float | None = None

    def fds(self) -> list[int]:
        return [self.inotify.fd]

    def check(self) -> str | None:
        # watch first, then look: a socket made in between still leaves an event
        self.inotify.watch_dir(deepest_dir(self.path))
        state = probe_unix(self.path)
        self.retry = LISTEN_RETRY if state == "refused" else None
        return "listening" if state == "listening" else None

    def woke(self, ready: list[int]) -> None:
        if self.inotify.fd in ready:
            self.inotify.drain()

    def close(self) -> None:
        self.inotify.close()


class _VsockProbe:
    __slots__ = ("port", "retry")

    def __init__(self, port: int) -> None:
        self.port = port
        self.retry: float | None = VSOCK_RETRY

    def fds(self) -> list[int]:
        return []

    def check(self) -> str | None:
        from guestinit.vsock_diag import listening_ports

        if self.port in listening_ports():
            return f"listening on vsock port {self.port}"
        self.retry = min(VSOCK_RETRY_MAX, (self.retry or VSOCK_RETRY) * 2)
        return None

    def woke(self, ready: list[int]) -> None:
        """Nothing of its own to drain."""

    def close(self) -> None:
        """No fd kept between dumps."""


class SyslogProbe:
    __slots__ = ("retry", "server", "text")

    def __init__(self, server: SyslogServer, text: str) -> None:
        self.server = server
        self.text = text
        self.retry: float | None = None

    def fds(self) -> list[int]:
        return [self.server.fileno()]

    def check(self) -> str | None:
        try:  # timeout 0: drain what is queued and look, without blocking
            return self.server.wait_for(self.text, 0.0)
        except TimeoutError:
            return None

    def woke(self, ready: list[int]) -> None:
        """The next check drains the socket."""

    def close(self) -> None:
        """The server belongs to the init."""


class FileProbe:
    """One of ``paths`` exists (a daemon's socket), looked for every ``POLL`` s."""

    __slots__ = ("paths", "retry")

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self.retry: float | None = POLL

    def fds(self) -> list[int]:
        return []

    def check(self) -> str | None:
        return next((p for p in self.paths if os.path.exists(p)), None)

    def woke(self, ready: list[int]) -> None:
        """Nothing to drain."""

    def close(self) -> None:
        """Nothing held."""


class PortProbe:
    """127.0.0.1:``port`` accepts a TCP connection while ``alive()`` (a daemon listens),
    tried every ``POLL`` s."""

    __slots__ = ("alive", "port", "retry")

    def __init__(self, port: int, alive: Callable[[], bool]) -> None:
        self.port = port
        self.alive = alive
        self.retry: float | None = POLL

    def fds(self) -> list[int]:
        return []

    def check(self) -> str | None:
        if not self.alive():
            return None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(0.2)
            sock.connect(("127.0.0.1", self.port))
            return f"127.0.0.1:{self.port}"
        except OSError:
            return None
        finally:
            sock.close()

    def woke(self, ready: list[int]) -> None:
        """Nothing to drain."""

    def close(self) -> None:
        """No socket kept between tries."""


def wait_for(
    probes: Sequence[Probe],
    timeout: float,
    *,
    check: Callable[[], None] = lambda: None,
    fds: Sequence[int] = (),
    every: float | None = None,
    wake_fd: int = -1,
    on_wake: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """The one wait of the boot (the agent's ``agent.ready``, each NVIDIA daemon's signal):
    block until a probe holds and return what it saw; the probes are closed after.

    Each round looks at every probe, then runs ``check`` (it raises to end the wait: the
    process waited for exited, a shutdown was asked for), then sleeps in one ``select`` on
    the probes' fds, ``fds`` (a pidfd) and ``wake_fd`` (PID 1's signals: ``on_wake`` runs
    and may raise), for at most the shortest probe retry or ``every`` seconds.
    ``NotReady`` after ``timeout`` seconds."""
    deadline = clock() + timeout
    try:
        while True:
            for probe in probes:
                how = probe.check()
                if how is not None:
                    return how
            check()
            left = deadline - clock()
            if left <= 0:
                raise NotReady(f"within {timeout:g}s")
            waits = [w for w in (every, *(p.retry for p in probes)) if w is not None]
            watched = [fd for fd in (*fds, wake_fd, *(f for p in probes for f in p.fds()))
                       if fd >= 0]
            ready, _, _ = select.select(watched, [], [], min([left, *waits]))
            if wake_fd in ready:
                on_wake()
            for probe in probes:
                probe.woke(ready)
    finally:
        for probe in probes:
            probe.close()


def probe_for(cond: Condition, root: str = "/", syslog: SyslogServer | None = None) -> Probe:
    """The probe that watches ``cond`` (not ``none``)."""
    if cond.kind == Ready.SYSLOG:
        if syslog is None:
            raise ValueError(f"agent.ready={cond} needs the syslog server (syslog=1)")
        return SyslogProbe(syslog, cond.target)
    if cond.kind == Ready.VSOCK:
        return _VsockProbe(int(cond.target))
    return _UnixProbe(os.path.join(root, cond.target.lstrip("/")))


def wait_ready(
    cond: Condition,
    pid: int,
    timeout: float,
    *,
    exited: Callable[[], int | None],
    root: str = "/",
    syslog: SyslogServer | None = None,
    wake_fd: int = -1,
    on_wake: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Block until ``cond`` holds for the agent ``pid``; what showed it (the syslog
    line, or ``listening``). ``exited()`` reaps and gives the agent's status once it
    is gone (``ExitedBeforeReady``); ``on_wake`` runs when ``wake_fd`` is readable
    and may raise (a shutdown request). ``NotReady`` after ``timeout`` seconds."""
    if cond.kind == Ready.NONE:
        return "spawned"
    probe = probe_for(cond, root, syslog)

    def gone() -> None:
        status = exited()
        if status is not None:
            raise ExitedBeforeReady(status)

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # already reaped: exited() has its status
        pidfd = -1
    try:
        return wait_for([probe], timeout, check=gone, fds=[pidfd], wake_fd=wake_fd,
                        on_wake=on_wake, clock=clock)
    except NotReady as exc:
        raise NotReady(f"{cond.describe()} {exc}") from None
    finally:
        if pidfd >= 0:
            os.close(pidfd)
