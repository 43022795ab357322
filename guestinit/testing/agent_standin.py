"""A kata-agent stand-in for tests (pid-namespace and VM tiers).

Behaves like an agent on the interfaces the init sees: it is started by PID 1,
logs to syslog, says when it is ready (``READY_MARKER`` on syslog, after listening
on ``--listen PATH`` if given: ``guestinit.agent.ready=syslog:agent-standin-ready`` or
``=unix:PATH``), runs until told to stop (SIGTERM) and exits with a status. Options
make it misbehave on purpose: leave orphans, crash, ignore SIGTERM, flood syslog,
become ready late or never.
Runs with ``python3 -IS`` in the image (stdlib only).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import time


def syslog(text: str, path: str = "/dev/log", pri: int = 14) -> None:
    """Log like an agent; with no syslog server there, say so on stderr and go on."""
    line = f"<{pri}>agent-standin[{os.getpid()}]: {text}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.send(line.encode())
    except OSError as exc:
        print(f"{line} (syslog {path}: {exc.strerror or exc})", file=sys.stderr, flush=True)


def leave_orphans(count: int, linger: float) -> None:
    """A middle child forks ``count`` grandchildren and exits at once: they become
    orphans re-parented to PID 1 (the subreaper), which must reap them."""
    middle = os.fork()
    if middle == 0:
        for _ in range(count):
            if os.fork() == 0:
                time.sleep(linger)
                os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)


def detach(ignore_term: bool, log: str) -> None:
    """A daemon of our own, as an agent's containers are: double-forked (its parent is
    PID 1 then, not us), so stopping the agent does not stop it; logs its pid."""
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else signal.SIG_DFL)
            syslog(f"daemon child pid={os.getpid()} ignore_term={int(ignore_term)}", log)
            while True:
                time.sleep(3600)
        os._exit(0)
    os.waitpid(middle, 0)


def virtio_port(name: str, sysfs: str = "/sys") -> str:
    """``/dev/vportNpM`` of the virtio-serial port called ``name``."""
    base = os.path.join(sysfs, "class", "virtio-ports")
    for entry in sorted(os.listdir(base)):
        with open(os.path.join(base, entry, "name")) as fh:
            if fh.read().strip() == name:
                return os.path.join("/dev", entry)
    raise FileNotFoundError(f"no virtio port named {name} in {base}")


def vsock_relay(port: int, port_name: str, log: str) -> None:
    """Listen on AF_VSOCK ``port`` (any CID) and forward the first connection's bytes to
    the virtio port ``port_name`` (VM tier: the init's vsock report, over vsock_loopback
    inside the guest, reaches the host harness's virtio-serial socket). The listener
    exists before this returns; a child does the forwarding."""
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(1)
    target = virtio_port(port_name)
    if os.fork() == 0:
        conn, _ = listener.accept()
        syslog(f"vsock relay: connection on port {port}, forwarding to {target}", log)
        fd = os.open(target, os.O_WRONLY)
        while data := conn.recv(65536):
            while data:
                data = data[os.write(fd, data):]
        os._exit(0)
    listener.close()
    syslog(f"vsock relay: listening on port {port}", log)


READY_MARKER = "agent-standin-ready"


def listen(path: str) -> socket.socket:
    """A Unix stream listener at ``path``, as an agent's API socket."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return sock


def serve(listener: socket.socket | None) -> None:
    """Run until a signal ends us: accept and close connections (the init's probe)."""
    while True:
        if listener is None:
            time.sleep(3600)
            continue
        if select.select([listener], [], [], 3600)[0]:
            conn, _ = listener.accept()
            conn.close()


def flood(path: str, count: int) -> int:
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        sock.setblocking(False)
        for i in range(count):
            try:
                sock.send(f"<15>flood[{os.getpid()}]: line {i} {'x' * 80}".encode())
                sent += 1
            except BlockingIOError:
                time.sleep(0.0005)
            except OSError:
                break
    return sent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", default="/dev/log")
    parser.add_argument("--message", default="agent stand-in up")
    parser.add_argument("--orphans", type=int, default=0)
    parser.add_argument("--linger", type=float, default=0.05)
    parser.add_argument("--flood", type=int, default=0)
    parser.add_argument("--exit-after", type=float, default=None)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--check-modules", default="", metavar="A,B",
                        help="log which of these modules /sys/module shows (VM tier)")
    parser.add_argument("--sys", default="/sys", help="sysfs to look in")
    parser.add_argument("--listen", default="", metavar="PATH",
                        help="listen on this Unix socket before saying ready")
    parser.add_argument("--ready-after", type=float, default=0.0, metavar="S",
                        help="become ready this many seconds after the start")
    parser.add_argument("--never-ready", action="store_true",
                        help="neither listen nor log the ready line")
    parser.add_argument("--vsock-relay", type=int, default=0, metavar="PORT",
                        help="forward AF_VSOCK PORT to the guestinit.report virtio port")
    parser.add_argument("--daemon-child", action="append", default=[],
                        choices=("term", "ignore-term"),
                        help="leave a detached daemon that SIGTERM ends (term) or does not")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    syslog(f"{args.message} pid={os.getpid()}", args.log)
    if args.check_modules:
        found = [f"{m}={'yes' if os.path.isdir(os.path.join(args.sys, 'module', m)) else 'no'}"
                 for m in args.check_modules.split(",")]
        syslog("in /sys/module: " + " ".join(found), args.log)
    if args.orphans:
        leave_orphans(args.orphans, args.linger)
        syslog(f"left {args.orphans} orphans", args.log)
    if args.vsock_relay:
        vsock_relay(args.vsock_relay, "guestinit.report", args.log)
    for kind in args.daemon_child:
        detach(kind == "ignore-term", args.log)
    if args.flood:
        sent = flood(args.log, args.flood)
        syslog(f"flood done: {sent} datagrams", args.log)
    listener = None
    if not args.never_ready:
        time.sleep(args.ready_after)
        if args.listen:
            listener = listen(args.listen)
        syslog(f"{READY_MARKER} listening={args.listen or 'no'}", args.log)
    if args.exit_after is not None:
        time.sleep(args.exit_after)
        syslog(f"exiting with {args.exit_code}", args.log)
        sys.exit(args.exit_code)
    serve(listener)


if __name__ == "__main__":
    main()
