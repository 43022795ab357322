"""``guestinit-bench boot``: boot an image in QEMU, collect its frames, judge the boot.

One pass: listen on the report and QMP sockets, spawn QEMU (it connects to both
before the guest runs), read frames until ``ready`` or ``failed``, ask for a
powerdown, wait for ``shutdown`` and QEMU's exit. QEMU is always stopped and
reaped on the way out, whatever happened.
"""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from bench.image import Image, kernel_words, replace_cmdline
from bench.kata import ROOT_PORTS
from bench.live import Live
from bench.qemu import (
    QEMU,
    BarDevice,
    VmSpec,
    choose_accel,
    host_tsc_khz,
    kernel_cmdline,
    qemu_argv,
)
from bench.qmp import Qmp, QmpError
from bench.vmio import (
    Console,
    Progress,
    accept,
    last_words,
    listen,
    peak_rss_kib,
    read_text,
    recv,
)
from guestinit.wire import Frame, FrameError, FrameReader, FrameType
from rootfs import proc


@dataclass
class BootOptions:
    append: str = ""
    timeout: float = 60.0  # seconds from QEMU spawn to `ready` (or `failed`)
    erofs: bool = False
    shutdown: bool = True  # QMP system_powerdown after `ready`; else wait for the guest
    memory_mib: int = 1024
    accel: str = "auto"
    workdir: str | None = None  # console log and sockets; default a new /tmp dir
    powerdown_grace: float = 20.0  # powerdown -> `shutdown` + exit, before QMP quit
    exit_grace: float = 20.0  # `failed`/`shutdown` frame -> QEMU exit, before a kill
    hold_until: str | None = None  # after ready, wait for this console text, then powerdown
    qemu: str = QEMU
    entropy: str = "rdrand"  # bench.qemu.ENTROPY: the guest's early entropy source
    bar: BarDevice | None = None  # PCIe and a large-BAR device (bar-sweep)
    # Replaces the image's cmdline words (cmdline.txt); an erofs boot keeps its root words.
    cmdline: str | None = None
    firmware: str = "/usr/share/ovmf/OVMF.fd"  # a Kata-machine image boots through OVMF
    ports: tuple[tuple[str, str], ...] = ()  # more virtio-serial ports (bench.qemu.VmSpec)
    # run once at ready, before the powerdown, with the running guest (bench.live.Live)
    on_ready: Callable[[Live], None] | None = None


@dataclass
class Received:
    host_s: float  # seconds since QEMU was spawned
    frame: Frame


@dataclass
class BootResult:
    ok: bool = False
    reason: str = ""
    accel: str = ""
    accel_why: str = ""
    cmdline: str = ""
    argv: list[str] = field(default_factory=list)
    workdir: str = ""
    console_log: str = ""
    frames: list[Received] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed input from the guest
    qemu_rc: int | None = None
    qemu_stderr: str = ""
    forced: str = ""  # "quit" / "kill" when the harness had to stop QEMU itself
    timings: dict[str, float | int | None] = field(default_factory=dict)
    qemu_peak_rss_kib: int | None = None  # QEMU's VmHWM, read before it exits

    def first(self, ftype: FrameType) -> Frame | None:
        return next((r.frame for r in self.frames if r.frame.type is ftype), None)

    def last_stage(self) -> str:
        for rec in reversed(self.frames):
            if rec.frame.type is FrameType.PROGRESS:
                return f"{rec.frame.fields['stage']} {rec.frame.fields['event']}"
            if rec.frame.type is not FrameType.DEGRADED:
                return rec.frame.type.value
        return "none yet"


def _note_rss(res: BootResult, pid: int) -> None:
    now = peak_rss_kib(pid)
    if now is not None:
        res.qemu_peak_rss_kib = max(now, res.qemu_peak_rss_kib or 0)


def prepare(image: Image, opts: BootOptions) -> tuple[BootResult, VmSpec]:
    """Choose the accelerator, assemble the cmdline and QEMU argv; start nothing."""
    res = BootResult()
    res.workdir = opts.workdir or tempfile.mkdtemp(prefix="guestinit-boot-")
    os.makedirs(res.workdir, exist_ok=True)
    res.console_log = os.path.join(res.workdir, "console.log")
    res.accel, res.accel_why = choose_accel(opts.accel, image.kernel, opts.qemu)
    if image.machine == "kata":
        # Kata's runtime writes the whole cmdline (bench.kata); --append words follow it as
        # a configuration's kernel_params would. Frames come on the console (hvc0) unless
        # the words name guestinit.report=virtio-port:guestinit.report.
        res.cmdline = " ".join([image.cmdline, *kernel_words(opts.append)])
    else:
        tsc = host_tsc_khz() if res.accel == "tcg" else None
        base = image.cmdline if opts.cmdline is None else replace_cmdline(image, opts.cmdline)
        res.cmdline = kernel_cmdline(base, opts.append, tsc_khz=tsc)
    spec = VmSpec(
        kernel=image.kernel, initramfs=image.initramfs, cmdline=res.cmdline,
        console_log=res.console_log, report_socket=os.path.join(res.workdir, "report.sock"),
        qmp_socket=os.path.join(res.workdir, "qmp.sock"), accel=res.accel,
        memory_mib=opts.memory_mib, disks=image.disks, qemu=opts.qemu, entropy=opts.entropy,
        console_socket=os.path.join(res.workdir, "console.sock"), bar=opts.bar,
        machine=image.machine, firmware=opts.firmware,
        root_ports=ROOT_PORTS if image.machine == "kata" else 0, extensions=image.extensions,
        ports=opts.ports,
    )
    res.argv = qemu_argv(spec)
    return res, spec


def boot(image: Image, opts: BootOptions, progress: TextIO | None = None) -> BootResult:
    """Boot ``image`` once; never raises for guest misbehaviour (it is in the result)."""
    res, spec = prepare(image, opts)
    return run(res, spec, opts, progress)


def run(
    res: BootResult, spec: VmSpec, opts: BootOptions, progress: TextIO | None = None
) -> BootResult:
    """Run the boot ``prepare`` planned; QEMU is stopped and reaped before this returns."""
    report_l = listen(spec.report_socket)
    qmp_l = listen(spec.qmp_socket)
    console_l = listen(spec.console_socket) if spec.console_socket else None
    stderr_path = os.path.join(res.workdir, "qemu.stderr")
    child: subprocess.Popen[bytes] | None = None
    try:
        with open(stderr_path, "wb") as err:
            spawned = time.monotonic()
            child = proc.spawn(res.argv, stderr=err.fileno())
        try:
            qmp_conn = accept(qmp_l, child, "the QMP monitor")
            console = (accept(console_l, child, "the serial console")
                       if console_l is not None else None)
            report = accept(report_l, child, f"the {spec.report_socket} report port")
            qmp = Qmp(qmp_conn)
            qmp.handshake()
        except (RuntimeError, QmpError) as exc:
            res.reason = str(exc)
        else:
            watch = _Watch(res, opts, qmp, spawned, child.pid)
            with open(res.console_log, "wb") as log:
                watch.console = Console(console, log) if console is not None else None
                watch.loop(child, report, Progress(progress))
            report.close()
            qmp_conn.close()
            if console is not None:
                console.close()
    finally:
        if child is not None:
            _note_rss(res, child.pid)
            if child.poll() is None and not res.forced:
                res.forced = "kill"
            res.qemu_rc = proc.stop(child)
        report_l.close()
        qmp_l.close()
        if console_l is not None:
            console_l.close()
        for path in (spec.report_socket, spec.qmp_socket, spec.console_socket):
            if path and os.path.exists(path):
                os.unlink(path)
        res.qemu_stderr = read_text(stderr_path)
    _judge(res)
    return res


class _Watch:
    """The states of one boot: ready -> [hold] -> shutdown -> exit, with a deadline each."""

    READY = "ready"
    HOLD = "console text"
    SHUTDOWN = "shutdown"
    EXIT = "QEMU to exit"

    def __init__(self, res: BootResult, opts: BootOptions, qmp: Qmp, spawned: float,
                 pid: int) -> None:
        self.res, self.opts, self.qmp, self.spawned = res, opts, qmp, spawned
        self.pid = pid  # QEMU's, for its peak RSS while it still runs
        self.reader = FrameReader()
        self.state = self.READY
        self.deadline = spawned + opts.timeout
        self.quit_sent = False
        self.console: Console | None = None
        self.hold_seen = False
        self.report: socket.socket | None = None  # set by loop()

    def _at(self, now: float) -> float:
        return now - self.spawned

    def _powerdown(self, now: float) -> None:
        self.state = self.SHUTDOWN
        if not self.opts.shutdown:
            self.deadline = now + self.opts.timeout  # the guest is to stop on its own
            return
        self.res.timings["host_powerdown_s"] = self._at(now)
        try:
            self.qmp.execute("system_powerdown", timeout=3.0)
        except QmpError as exc:
            self.res.errors.append(f"asking for a powerdown: {exc}")
        self.deadline = now + self.opts.powerdown_grace

    def take(self, data: bytes) -> None:
        self._items(self.reader.feed(data) if data else list(self.reader.eof()))

    def _items(self, items: list[Frame | FrameError]) -> None:
        res, timings = self.res, self.res.timings
        for item in items:
            now = time.monotonic()
            if isinstance(item, FrameError):
                res.errors.append(str(item))
                continue
            res.frames.append(Received(self._at(now), item))
            if item.type is FrameType.READY and self.state == self.READY:
                timings["host_ready_s"] = self._at(now)
                if self.opts.on_ready is not None:  # the host talks to the running guest
                    assert self.report is not None  # frames come through loop()
                    try:
                        self.opts.on_ready(Live(self.qmp, self.report, self.take, res.frames))
                    except Exception as exc:
                        res.errors.append(f"on_ready: {type(exc).__name__}: {exc}")
                    now = time.monotonic()
                if self.opts.hold_until:
                    self.state = self.HOLD
                    self.deadline = now + self.opts.timeout
                else:
                    self._powerdown(now)
            elif item.type is FrameType.FAILED and "host_failed_s" not in timings:
                timings["host_failed_s"] = self._at(now)
                _note_rss(res, self.pid)
                self.state = self.EXIT
                self.deadline = now + self.opts.exit_grace
            elif item.type is FrameType.SHUTDOWN and "host_shutdown_s" not in timings:
                timings["host_shutdown_s"] = self._at(now)
                _note_rss(res, self.pid)
                self.state = self.EXIT
                self.deadline = now + self.opts.exit_grace

    def take_console(self, data: bytes) -> None:
        if self.console is None:
            return
        if data and "host_first_output_s" not in self.res.timings:
            self.res.timings["host_first_output_s"] = self._at(time.monotonic())
        # a guest whose report channel broke sends what it still had as console marker
        # lines just before it powers off (guestinit.report.Reporter.spill_to_console)
        self._items(self.console.frames(data))
        if self.opts.hold_until and not self.hold_seen:  # seen before ready counts too
            self.hold_seen = self.opts.hold_until.encode() in self.console.seen

    def _overdue(self, now: float) -> bool:
        """Act on a passed deadline; True when the loop should stop."""
        res = self.res
        if self.state == self.READY:
            res.reason = f"no ready frame after {self.opts.timeout:g}s"
            return True
        if self.state == self.HOLD:
            res.reason = (f"{self.opts.hold_until!r} did not appear on the console within "
                          f"{self.opts.timeout:g}s after ready")
            self._powerdown(now)
            return False
        if self.quit_sent:
            return True
        # The guest did not stop on its own: QMP quit so nothing hangs, and say so.
        res.forced = "quit"
        self.quit_sent = True
        self.deadline = now + 5.0
        try:
            self.qmp.execute("quit", timeout=3.0)
        except QmpError:
            return True
        return False

    def loop(self, child: subprocess.Popen[bytes], report: socket.socket,
             progress: Progress) -> None:
        sel = selectors.DefaultSelector()
        self.report = report
        report.setblocking(False)
        sel.register(report, selectors.EVENT_READ)
        if self.console is not None:
            sel.register(self.console.sock, selectors.EVENT_READ)
        try:
            while child.poll() is None:
                now = time.monotonic()
                if now >= self.deadline:
                    if self._overdue(now):
                        break
                    continue
                for key, _ev in sel.select(timeout=min(0.2, max(0.0, self.deadline - now))):
                    data = recv(key.fileobj)  # type: ignore[arg-type]
                    if key.fileobj is report:
                        self.take(data)
                    else:
                        self.take_console(data)
                    if not data:
                        sel.unregister(key.fileobj)
                if self.reader.closed and self.state == self.READY:
                    # After a bad length prefix nothing more can be decoded: no ready follows.
                    self.res.reason = (f"the report stream broke ({self.res.errors[-1]}); "
                                       "no ready can follow")
                    break
                if self.state == self.HOLD and self.hold_seen:
                    self.res.timings["host_hold_s"] = self._at(time.monotonic())
                    self._powerdown(time.monotonic())
                waiting = self.state
                if self.state == self.HOLD:
                    waiting = f"{self.opts.hold_until!r} on the console"
                progress.show(self._at(time.monotonic()), waiting, self.res.last_stage())
            # QEMU is gone (or being stopped): whatever it had delivered is still readable.
            if child.poll() is not None:
                self.res.timings["host_exit_s"] = self._at(time.monotonic())
                while data := recv(report):
                    self.take(data)
                self.take(b"")
                if self.console is not None:
                    while data := recv(self.console.sock):
                        self.take_console(data)
        finally:
            progress.done()
            sel.close()


def _judge(res: BootResult) -> None:
    ready = res.first(FrameType.READY)
    failed = res.first(FrameType.FAILED)
    shutdown = res.first(FrameType.SHUTDOWN)
    firsts = [r.frame.t for r in res.frames]
    res.timings["guest_first_frame_ns"] = min(firsts) if firsts else None
    final = ready or failed
    spans = final.timeline() if final is not None else []
    early = next((s for name, s, _ in spans if name == "early"), None)
    res.timings["guest_init_exec_ns"] = early
    res.timings["guest_ready_ns"] = ready.t if ready else None
    if failed is not None:
        res.reason = (
            f"guest failed in stage {failed.fields['stage']}: {failed.fields['reason']}"
        )
    elif res.reason:
        pass  # a harness-side reason (timeout, QEMU did not start) is already set
    elif ready is None:
        res.reason = f"QEMU exited (status {res.qemu_rc}) before the guest was ready"
        if not res.frames:
            res.reason += " (no frame arrived on the report port or the console)"
            said = last_words(res.console_log)
            if said:
                res.reason += f"; the console says: {said}"
    elif shutdown is None:
        res.reason = "the guest was ready but sent no shutdown frame"
        if res.forced:
            res.reason += f" (QEMU stopped with {res.forced})"
        if "host_powerdown_s" in res.timings:
            res.reason += ("; system_powerdown is an ACPI power button press: the guest "
                           "needs the button and evdev modules and a reader on its "
                           "/dev/input/event* node, opened before ready")
    elif res.forced:
        res.reason = f"QEMU did not exit after the shutdown frame (stopped with {res.forced})"
    elif res.qemu_rc != 0:
        res.reason = f"QEMU exited with status {res.qemu_rc}"
    elif res.errors:
        res.reason = f"{len(res.errors)} malformed frame(s) from the guest: {res.errors[0]}"
    res.ok = not res.reason
