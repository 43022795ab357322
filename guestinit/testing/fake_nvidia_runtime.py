"""Where an NVIDIA stand-in runs (``fake_nvidia``): its root, the injected behaviour, the
call log, syslog, and what daemons do (detach, sleep until SIGTERM). Stdlib only."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

VERSION = "550.54.15"


def find_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    while True:
        if os.path.isdir(os.path.join(here, "etc", "fake-nvidia")):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return "/"
        here = parent


ROOT = find_root()


def rooted(path: str) -> str:
    return os.path.join(ROOT, path.lstrip("/"))


def behaviour() -> dict[str, str]:
    out = {}
    try:
        with open(rooted("etc/fake-nvidia/behaviour")) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    out[key.strip()] = value.strip()
    except FileNotFoundError:
        pass
    return out


def record(prog: str, argv: list[str]) -> None:
    try:
        with open(rooted("etc/fake-nvidia/calls.log"), "a") as f:
            f.write(" ".join([prog, *argv]) + "\n")
    except OSError:
        pass


class Syslog:
    """syslog(3) over a datagram to /dev/log: ``<PRI>Mmm dd hh:mm:ss tag[pid]: text``."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __call__(self, text: str, pri: int = 6, facility: int = 3) -> None:
        stamp = time.strftime("%b %e %H:%M:%S")
        data = f"<{facility * 8 + pri}>{stamp} {self.tag}[{os.getpid()}]: {text}".encode()
        with contextlib.suppress(OSError):  # like syslog(3): no logger, no message
            self.sock.sendto(data, rooted("/dev/log"))


def gpus() -> list[tuple[str, dict[str, str]]]:
    base = rooted("/proc/driver/nvidia/gpus")
    out = []
    for bdf in sorted(os.listdir(base)):
        info = {}
        with open(os.path.join(base, bdf, "information")) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    info[key.strip()] = value.strip()
        out.append((bdf, info))
    return out


def driver_ok() -> bool:
    return os.path.exists(rooted("/dev/nvidiactl")) and os.path.isdir(
        rooted("/proc/driver/nvidia/gpus"))


def detach() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()


def sleep_forever(cleanup: list[str], log: Syslog, verbose: bool) -> None:
    def stop(signum: int, _frame: object) -> None:
        if verbose:
            log(f"Received signal {signum}", pri=7)
        for path in cleanup:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log(f"Shutdown ({os.getpid()})")
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        signal.pause()
