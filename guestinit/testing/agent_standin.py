"""A kata-agent stand-in for tests (pid-namespace and VM tiers).

Behaves like an agent on the interfaces the init sees: logs to syslog, says when it is
ready (``READY_MARKER`` on syslog, after ``--listen PATH`` if given), runs until SIGTERM
and exits with a status; options make it misbehave on purpose (orphans, crashes, ignored
SIGTERM, syslog floods, late or no readiness). ``python3 -IS`` in the image (stdlib only).

In init mode (``getpid() == 1``, kata-agent's test, ``src/agent/src/main.rs`` @7c6ba40c54)
it does what kata-agent does then: the init-mode mounts (``mount.rs``, each skipped when
already there), /dev/ptmx -> /dev/pts/ptmx, ``setsid()``, the hostname, reaping, and
``reboot(RB_POWER_OFF)`` at its end. ``--cgroup`` picks the driver as ``rpc.rs`` does
(systemd for a ``slice:prefix:name`` path outside init mode, which needs D-Bus; cgroupfs
in init mode, ``:`` -> ``/``), ``--resolv`` bind-mounts the DNS over /etc/resolv.conf
(``network.rs``), ``--vsock-listen`` listens as kata-agent does on 1024, ``--facts`` logs
what it found as one JSON line.
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
    _wait(middle)


def _wait(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # as init of its namespace the SIGCHLD reaper took it
        pass


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
    _wait(middle)


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
FACTS_MARKER = "agent-standin facts: "
# src/agent/src/mount.rs INIT_ROOTFS_MOUNTS: (fstype, source, target, flags)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND = 2, 4, 8, 4096
INIT_MOUNTS = (("proc", "proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
               ("sysfs", "sysfs", "/sys", MS_NOSUID | MS_NODEV | MS_NOEXEC),
               ("devtmpfs", "dev", "/dev", MS_NOSUID),
               ("tmpfs", "tmpfs", "/dev/shm", MS_NOSUID | MS_NODEV),
               ("devpts", "devpts", "/dev/pts", MS_NOSUID | MS_NOEXEC),
               ("tmpfs", "tmpfs", "/run", MS_NOSUID | MS_NODEV),
               ("cgroup2", "cgroup2", "/sys/fs/cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC))
RB_POWER_OFF = 0x4321FEDC
SYSTEMD_PATH = r"^[\w\-.]*:[\w\-.]*:[\w\-.]*$"  # rustjail SYSTEMD_CGROUP_PATH_FORMAT
DBUS = "/run/dbus/system_bus_socket"


def _libc() -> object:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str, flags: int) -> None:
    import ctypes

    libc = _libc()
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,  # type: ignore[attr-defined]
                  ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def mounted_types() -> dict[str, str]:
    try:
        with open("/proc/self/mountinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        fields = line.split()
        if " - " in line and len(fields) > 4:
            out[fields[4]] = line.split(" - ", 1)[1].split()[0]  # later mounts win
    return out


def init_mode_setup(log: str, root: str = "/") -> list[str]:
    """What kata-agent's init mode does before it serves (main.rs ``real_main``,
    ``init_agent_as_init``); returns one line per step for the facts. ``root`` is the
    pid-namespace tier's test root: there /dev is a tmpfs on purpose, and devtmpfs is
    one instance for the whole kernel, so it is neither mounted nor changed."""
    done = []
    test_root = os.path.realpath(root) != "/"
    for fstype, source, target, flags in INIT_MOUNTS:
        where = os.path.join(root, target.lstrip("/"))
        if mounted_types().get(where) == fstype:  # baremount: already there, skip
            done.append(f"{target}: already {fstype}")
            continue
        if test_root and fstype == "devtmpfs":
            done.append(f"{target}: test root, not mounted")
            continue
        os.makedirs(where, exist_ok=True)
        _mount(source, where, fstype, flags)
        done.append(f"{target}: mounted {fstype}")
    ptmx = os.path.join(root, "dev/ptmx")
    if os.path.lexists(ptmx) or not test_root:  # kata-agent fails when it is missing
        os.remove(ptmx)
    os.symlink("/dev/pts/ptmx", ptmx)
    done.append("/dev/ptmx -> /dev/pts/ptmx")
    os.setsid()  # fails (EPERM) for a session leader: kata-agent would exit here
    try:
        with open(os.path.join(root, "etc/hostname")) as fh:
            hostname = fh.read().split(" ")[0].strip() or "localhost"
    except OSError:
        hostname = "localhost"
    try:
        socket.sethostname(hostname)
    except OSError as exc:
        syslog(f"failed to set hostname: {exc}", log)
    signal.signal(signal.SIGCHLD, lambda *_: reap_all())
    return done


def reap_all() -> None:
    """As PID 1 of its namespace the agent reaps every orphan there."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def power_off() -> None:
    """kata-agent's last act in init mode: sync, reboot(RB_POWER_OFF). From a child PID
    namespace the kernel turns it into SIGINT for this process (its parent sees that)."""
    os.sync()
    _libc().reboot(RB_POWER_OFF)  # type: ignore[attr-defined]


def create_cgroup(path: str, init_mode: bool, root: str = "/") -> str:
    """A container cgroup for ``path`` with a child process in it, as rpc.rs and
    rustjail would; what happened, as one line (``error: ...`` on failure)."""
    import re

    if not init_mode and re.match(SYSTEMD_PATH, path):
        if not os.path.exists(os.path.join(root, DBUS.lstrip("/"))):
            return f"error: systemd cgroup driver for {path}: no systemd on D-Bus ({DBUS})"
        return f"systemd cgroup driver for {path}: not emulated"
    fs_path = path.replace(":", "/").strip("/")
    where = os.path.join(root, "sys/fs/cgroup", fs_path)
    try:
        os.makedirs(where, exist_ok=True)
        child = os.fork()
        if child == 0:
            time.sleep(3600)
            os._exit(0)
        with open(os.path.join(where, "cgroup.procs"), "w") as fh:
            fh.write(str(child))
    except OSError as exc:
        return f"error: cgroupfs driver: {where}: {exc}"
    return f"cgroupfs driver: {where} holds pid {child}"


def setup_dns(servers: str, root: str = "/") -> str:
    dst = os.path.join(root, "etc/resolv.conf")
    src = os.path.join(root, "run/kata-containers/sandbox/resolv.conf")
    if not os.path.exists(dst):
        return f"skipped: {dst} is absent"
    os.makedirs(os.path.dirname(src), exist_ok=True)
    with open(src, "w") as fh:
        fh.write("\n".join(f"nameserver {s}" for s in servers.split(",")))
    _mount(src, dst, "", MS_BIND)
    with open(dst) as fh:
        return f"bind-mounted over {dst}: {fh.read().splitlines()[0]}"


def facts(init_mode: bool, steps: list[str], extra: dict[str, object]) -> dict[str, object]:
    import resource

    def read(path: str) -> str:
        try:
            with open(path) as fh:
                return fh.read().strip()
        except OSError as exc:
            return f"error: {exc.strerror}"

    run = os.statvfs("/run")
    mem = read("/proc/meminfo").split("\n")[0].split()
    return {"pid": os.getpid(), "init_mode": init_mode, "proc_self": os.readlink("/proc/self"),
            "proc_1_comm": read("/proc/1/comm"), "cgroup2": mounted_types().get(
                "/sys/fs/cgroup") == "cgroup2", "run_bytes": run.f_blocks * run.f_frsize,
            "mem_bytes": int(mem[1]) * 1024 if len(mem) > 1 else 0,
            "resolv_conf": os.path.exists("/etc/resolv.conf"),
            "cgroup_subtree_control": read("/sys/fs/cgroup/cgroup.subtree_control"),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "oom_score_adj": read("/proc/self/oom_score_adj"), "hostname": socket.gethostname(),
            "env": {k: v for k, v in os.environ.items() if k.startswith("KATA_")},
            "steps": steps, **extra}


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
    parser.add_argument("--vsock-listen", type=int, default=0, metavar="PORT",
                        help="listen on AF_VSOCK PORT before saying ready (kata-agent: 1024)")
    parser.add_argument("--cgroup", default="", metavar="PATH",
                        help="create a container cgroup for this cgroupsPath")
    parser.add_argument("--resolv", default="", metavar="IP,IP",
                        help="set up guest DNS with these servers as kata-agent does")
    parser.add_argument("--init-root", default="/", metavar="DIR",
                        help="where init mode mounts and links (the pid-namespace tier's "
                        "test root; default /)")
    parser.add_argument("--facts", action="store_true",
                        help="log what this agent finds (init mode, /proc, limits...) as JSON")
    args = parser.parse_args()
    init_mode = os.getpid() == 1
    try:
        _serve(args, init_mode)
    finally:
        if init_mode:
            power_off()


def _serve(args: argparse.Namespace, init_mode: bool) -> None:
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    steps = init_mode_setup(args.log, args.init_root) if init_mode else []
    syslog(f"{args.message} pid={os.getpid()} init_mode={int(init_mode)}", args.log)
    extra: dict[str, object] = {}
    if args.cgroup:
        extra["cgroup"] = create_cgroup(args.cgroup, init_mode, args.init_root)
    if args.resolv:
        extra["dns"] = setup_dns(args.resolv, args.init_root)
    vsock = None
    if args.vsock_listen and not args.never_ready:
        vsock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        vsock.bind((socket.VMADDR_CID_ANY, args.vsock_listen))
        vsock.listen(16)
        extra["vsock_listen"] = args.vsock_listen
    if args.facts:
        import json

        syslog(FACTS_MARKER + json.dumps(facts(init_mode, steps, extra), sort_keys=True),
               args.log)
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
