"""A stand-in for qemu-system-x86_64 that speaks just enough to drive the harness loop.

Only for unit tests of the harness's own logic (malformed frames, a VMM that will
not exit, a VMM that dies); the real-QEMU test boots the busybox image instead.
It connects to the ``report`` and ``qmp`` chardev sockets named on its command
line, and acts out ``fake.mode=`` from ``-append``; ``fake.delay=S`` (the last one
wins, as on a kernel cmdline) waits S seconds before the frames, a slower boot.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time

from guestinit.wire import Frame, FrameType, encode

BOOT = "fakevmm"
TIMELINE: list[object] = [["early", 100, 200], ["ready", 200, 300]]


def _sockets(argv: list[str]) -> tuple[dict[str, str], str]:
    paths: dict[str, str] = {}
    append = ""
    for i, word in enumerate(argv):
        if word == "-chardev" and argv[i + 1].startswith("socket,"):
            opts = dict(kv.split("=", 1) for kv in argv[i + 1].split(",")[1:])
            paths[opts["id"]] = opts["path"]
        if word == "-append":
            append = argv[i + 1]
    return paths, append


def main() -> int:
    if sys.argv[1:] == ["--version"]:
        print("QEMU emulator version 0.0 (fakevmm)")
        return 0
    paths, append = _sockets(sys.argv)
    report_path, qmp_path = paths["report"], paths["qmp"]
    console = None
    if "console" in paths:  # the harness reads the serial console from a socket
        console = socket.socket(socket.AF_UNIX)
        console.connect(paths["console"])
        console.sendall(b"[    0.100000] Run /init as init process\n")
    mode = next((w.split("=", 1)[1] for w in append.split() if w.startswith("fake.mode=")), "ok")
    delays = [float(w.split("=", 1)[1]) for w in append.split() if w.startswith("fake.delay=")]
    qmp = socket.socket(socket.AF_UNIX)
    qmp.connect(qmp_path)
    report = socket.socket(socket.AF_UNIX)
    report.connect(report_path)
    qf = qmp.makefile("rw")
    qf.write(json.dumps({"QMP": {"version": {}, "capabilities": []}}) + "\n")
    qf.flush()
    qf.readline()
    qf.write('{"return": {}}\n')
    qf.flush()
    if mode == "die":
        return 3
    if mode == "nostart" and console is not None:  # what the image's entry code prints
        console.sendall(b"guestinit: cannot start: ModuleNotFoundError: No module named "
                        b"'guestinit.__main__' (the image lacks part of guestinit or its "
                        b"Python modules); powering off\n[    1.3] reboot: Power down\n")
        console.close()
        return 0
    if delays:
        time.sleep(delays[-1])
    hello = encode(Frame(FrameType.HELLO, BOOT, 10, {"version": "x"}))
    ready = encode(Frame(FrameType.READY, BOOT, 300, {"timeline": TIMELINE, "modules": ["m"]}))
    if mode == "split":  # one byte at a time: frames must be reassembled
        for byte in hello + ready:
            report.sendall(bytes([byte]))
            time.sleep(0.001)
    elif mode == "junk":  # a valid frame, an undecodable one, a schema-invalid one
        bad_schema = encode(Frame(FrameType.PROGRESS, BOOT, 20, {"stage": "x"})).replace(
            b"\xa5stage", b"\xa5stagf")
        report.sendall(hello + b"\x00\x00\x00\x02\xc1\xc1" + bad_schema + ready)
    elif mode == "badlength":  # an absurd length prefix: the stream cannot be trusted after
        report.sendall(hello + b"\xff\xff\xff\xff" + ready)
    elif mode == "stubborn":  # ready, then ignore powerdown and SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        report.sendall(hello + ready)
        while True:
            time.sleep(1)
    else:
        report.sendall(hello + ready)
    while line := qf.readline():
        cmd = json.loads(line).get("execute")
        qf.write('{"return": {}}\n')
        qf.flush()
        if cmd == "system_powerdown":
            if mode != "noshutdown":
                report.sendall(encode(Frame(FrameType.SHUTDOWN, BOOT, 900, {
                    "reason": "powerdown", "audit": []})))
            if mode == "quitonly":
                continue
            return 0
        if cmd == "quit":
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
