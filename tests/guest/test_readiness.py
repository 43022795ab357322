"""agent.ready: parsing, and the wait against real processes, sockets and syslog."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestinit import config, settings_doc
from guestinit.config import LogLevel
from guestinit.kmsg import Kmsg
from guestinit.readiness import (
    ExitedBeforeReady,
    NotReady,
    deepest_dir,
    probe_unix,
    wait_ready,
)
from guestinit.syslog import SyslogServer
from guestinit.testing import agent_standin
from guestinit.values import READY_NONE as NONE
from guestinit.values import Condition, Ready, parse_ready

STANDIN = agent_standin.__file__


@pytest.mark.parametrize(("value", "want"), [
    ("none", NONE), ("NONE", NONE),
    ("syslog:agent-standin-ready", Condition(Ready.SYSLOG, "agent-standin-ready")),
    ("syslog:a b: c", Condition(Ready.SYSLOG, "a b: c")),
    ("unix:/run/kata//agent.sock", Condition(Ready.UNIX, "/run/kata/agent.sock")),
    ("vsock:1024", Condition(Ready.VSOCK, "1024")), ("VSOCK:01024", Condition(Ready.VSOCK, "1024")),
])
def test_parse_ready(value: str, want: Condition) -> None:
    assert parse_ready(value) == want


@pytest.mark.parametrize(("value", "why"), [
    ("unix:run/x", "absolute"), ("unix:/" + "x" * 107, "107 bytes"), ("vsock:0", "a port 1-"),
    ("vsock:4294967295", "a port 1-"), ("vsock:x", "a port 1-"), ("vsock:", "expected none"),
    ("syslog:", "expected none"), ("socket:/x", "expected none"), ("none:x", "expected none"),
])
def test_parse_ready_rejects(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_ready(value)


def test_config_key_typed_defaulted_and_documented() -> None:
    cfg = config.build("agent.ready=unix:/run/a.sock\n",
                       "guestinit.agent.ready=syslog:up guestinit.agent.ready_timeout=2.5s")
    assert cfg["agent.ready"] == Condition(Ready.SYSLOG, "up")
    assert cfg.float("agent.ready_timeout") == 2.5
    defaults = config.build()
    assert defaults["agent.ready"] == NONE and defaults.float("agent.ready_timeout") == 30.0
    assert "guestinit.agent.ready=none" in settings_doc.describe()
    assert "guestinit.agent.ready_timeout=30s" in settings_doc.describe()
    with pytest.raises(config.ConfigError, match=r"guestinit\.agent\.ready='tcp:1'"):
        config.build("", "guestinit.agent.ready=tcp:1")
    assert settings_doc.render_file({"agent.ready": "unix:/run/a.sock"}).endswith(
        "agent.ready=unix:/run/a.sock\n")


class Agent:
    """The stand-in as a real child process (not PID 1's: Popen may reap it here)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", STANDIN, "--log",
                                      str(tmp / "dev" / "log"), *args],
                                     stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.close()


def spawn(agents: list[Agent], tmp: Path, *args: str) -> Agent:
    agent = Agent(tmp, *args)
    agents.append(agent)
    return agent


def test_unix_ready_only_once_listening(tmp_path: Path, agents: list[Agent]) -> None:
    # the socket's directory does not exist yet: the watch climbs to what does
    sock = tmp_path / "run" / "kata" / "agent.sock"
    start = time.monotonic()  # before the spawn: the agent's 0.3 s start after this
    agent = spawn(agents, tmp_path, "--listen", str(sock), "--ready-after", "0.3")
    how = wait_ready(Condition(Ready.UNIX, "/run/kata/agent.sock"), agent.pid, 10,
                     exited=agent.exited, root=str(tmp_path))
    assert how == "listening"
    assert time.monotonic() - start >= 0.3
    assert probe_unix(str(sock)) == "listening"


def test_bound_but_not_listening_is_not_ready(tmp_path: Path, agents: list[Agent]) -> None:
    agent = spawn(agents, tmp_path, "--never-ready")
    path = tmp_path / "a.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    assert probe_unix(str(path)) == "refused"
    listening = threading.Event()

    def listen() -> None:
        sock.listen()
        listening.set()

    timer = threading.Timer(0.2, listen)
    timer.start()
    try:
        assert wait_ready(Condition(Ready.UNIX, "/a.sock"), agent.pid, 5, exited=agent.exited,
                          root=str(tmp_path)) == "listening"
        assert listening.is_set()  # ready only once listen() had run, not at bind()
    finally:
        timer.join()
        sock.close()


def test_never_ready_times_out_naming_the_condition(tmp_path: Path,
                                                    agents: list[Agent]) -> None:
    agent = spawn(agents, tmp_path, "--never-ready")
    start = time.monotonic()
    with pytest.raises(NotReady, match=r"no listener on unix:/run/x.sock within 0.4s"):
        wait_ready(Condition(Ready.UNIX, "/run/x.sock"), agent.pid, 0.4, exited=agent.exited,
                   root=str(tmp_path))
    assert time.monotonic() - start >= 0.4


def test_exit_before_ready_gives_the_status(tmp_path: Path, agents: list[Agent]) -> None:
    agent = spawn(agents, tmp_path, "--never-ready", "--exit-after", "0.1", "--exit-code", "7")
    start = time.monotonic()
    with pytest.raises(ExitedBeforeReady) as info:
        wait_ready(Condition(Ready.UNIX, "/x.sock"), agent.pid, 10, exited=agent.exited,
                   root=str(tmp_path))
    assert info.value.status == 7
    assert time.monotonic() - start < 5  # the pidfd woke the wait, not the timeout


@pytest.fixture
def syslog_server(tmp_path: Path) -> Iterator[SyslogServer]:
    kmsg = Kmsg(str(tmp_path / "kmsg"), level=LogLevel.DEBUG)
    server = SyslogServer(str(tmp_path / "dev" / "log"), kmsg, str(tmp_path / "store"),
                          1 << 16, 100, False)
    yield server
    server.close()


def test_syslog_marker(tmp_path: Path, agents: list[Agent], syslog_server: SyslogServer) -> None:
    cond = parse_ready(f"syslog:{agent_standin.READY_MARKER}")
    start = time.monotonic()  # before the spawn: the agent's 0.2 s start after this
    agent = spawn(agents, tmp_path, "--ready-after", "0.2")
    line = wait_ready(cond, agent.pid, 10, exited=agent.exited, syslog=syslog_server)
    assert line.startswith(f"agent-standin[{agent.pid}]: agent-standin-ready"), line
    assert time.monotonic() - start >= 0.2


def test_syslog_never_and_syslog_off(tmp_path: Path, agents: list[Agent],
                                     syslog_server: SyslogServer) -> None:
    agent = spawn(agents, tmp_path, "--never-ready")
    cond = Condition(Ready.SYSLOG, "agent-standin-ready")
    with pytest.raises(NotReady, match="no line containing 'agent-standin-ready' on syslog"):
        wait_ready(cond, agent.pid, 0.3, exited=agent.exited, syslog=syslog_server)
    with pytest.raises(ValueError, match="needs the syslog server"):
        wait_ready(cond, agent.pid, 0.3, exited=agent.exited, syslog=None)


def test_wake_fd_runs_on_wake(tmp_path: Path, agents: list[Agent]) -> None:
    agent = spawn(agents, tmp_path, "--never-ready")
    r, w = os.pipe()

    def on_wake() -> None:
        os.read(r, 16)
        raise RuntimeError("stop asked for")

    threading.Timer(0.1, os.write, (w, b"\x0f")).start()
    try:
        with pytest.raises(RuntimeError, match="stop asked for"):
            wait_ready(Condition(Ready.UNIX, "/x.sock"), agent.pid, 10, exited=agent.exited,
                       root=str(tmp_path), wake_fd=r, on_wake=on_wake)
    finally:
        os.close(r)
        os.close(w)


def test_none_is_spawned() -> None:
    assert wait_ready(NONE, os.getpid(), 0, exited=lambda: None) == "spawned"


def test_deepest_dir(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert deepest_dir(str(tmp_path / "a" / "b" / "c" / "x.sock")) == str(tmp_path / "a")
    assert deepest_dir(str(tmp_path / "a" / "x.sock")) == str(tmp_path / "a")


def _diag(*records: tuple[int, int, int], error: int | None = None, done: bool = True) -> bytes:
    """A sock_diag reply datagram: one message per (type, state, port), then DONE/ERROR."""
    import struct

    from guestinit import vsock_diag as vd

    out = b""
    for stype, state, port in records:
        body = struct.pack("=BBBBIIIII", 40, stype, state, 0, 3, port, 2, 0, 7) + b"\0" * 8
        out += struct.pack("=IHHII", 16 + len(body), vd.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body
    if error is not None:
        out += struct.pack("=IHHII", 20, vd.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -error)
    elif done:
        out += struct.pack("=IHHII", 20, vd.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    return out


def test_vsock_diag_reply_gives_listening_stream_ports() -> None:
    import errno

    from guestinit import vsock_diag as vd

    listen, established = vd.TCP_LISTEN, 1
    ports, done = vd.parse(_diag((1, listen, 1024), (1, established, 1040), (2, listen, 99)))
    assert (ports, done) == ({1024}, True)  # a connected socket and a datagram one are not
    assert vd.parse(_diag((1, listen, 5), done=False)) == ({5}, False)
    with pytest.raises(OSError, match="CONFIG_VSOCKETS_DIAG") as err:
        vd.parse(_diag(error=errno.ENOENT))
    assert err.value.errno == errno.ENOENT
    req = vd.request()
    assert len(req) == 16 + 24 and req[4:6] == vd.SOCK_DIAG_BY_FAMILY.to_bytes(2, "little")


def test_waiting_on_a_vsock_port_without_vsock_diag_names_it() -> None:
    """This host's kernel has no vsock_diag: the wait fails naming the option, at once."""
    from guestinit import vsock_diag as vd

    try:
        vd.listening_ports()
    except OSError as exc:
        with pytest.raises(OSError, match="vsock"):
            wait_ready(Condition(Ready.VSOCK, "1024"), os.getpid(), 5.0, exited=lambda: None)
        assert exc.errno is not None
    else:
        pytest.skip("this host's kernel answers vsock diag dumps: nothing to refuse")


def test_the_one_engine_waits_on_files_ports_and_a_check(tmp_path: Path) -> None:
    import socket
    import threading

    from guestinit.readiness import FileProbe, PortProbe, wait_for

    target = tmp_path / "run/daemon/socket"
    threading.Timer(0.2, lambda: (target.parent.mkdir(parents=True), target.touch())).start()
    rounds: list[int] = []
    assert wait_for([FileProbe([str(target)])], 5.0, check=lambda: rounds.append(1),
                    every=0.05) == str(target)
    assert len(rounds) >= 2  # the check ran every round while the file was missing
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        assert wait_for([PortProbe(port, lambda: True)], 5.0) == f"127.0.0.1:{port}"
        with pytest.raises(NotReady, match=r"within 0.3s"):  # a port of a dead daemon
            wait_for([PortProbe(port, lambda: False)], 0.3)
    finally:
        listener.close()

    def died() -> None:
        raise RuntimeError("the daemon died")

    with pytest.raises(RuntimeError, match="the daemon died"):  # check ends the wait
        wait_for([FileProbe([str(tmp_path / "never")])], 5.0, check=died)
