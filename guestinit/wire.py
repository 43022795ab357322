"""The guest -> host wire format, imported by both sides.

A stream of frames: a 4-byte big-endian length, then one msgpack map of at most
MAX_FRAME bytes. Every frame carries ``v``, ``type``, ``boot_id`` and ``t``
(CLOCK_BOOTTIME ns). The host treats the guest as untrusted: ``FrameReader``
bounds every read, validates every field it knows, ignores fields it does not,
and turns malformed input into ``FrameError`` values instead of raising.

Kept free of dataclasses/typing so the guest pays little to import it; the guest
encodes with ``guestinit.msgpack_encode`` and only the host's decoder imports msgpack.
"""

from __future__ import annotations

import struct

from guestinit.msgpack_encode import packb

TYPE_CHECKING = False  # typing costs import time on the guest's boot path
if TYPE_CHECKING:  # the type checker sees a real enum; the boot path does without enum
    from collections.abc import Iterator
    from enum import StrEnum
else:
    from guestinit.choice import StrChoice as StrEnum

SCHEMA_VERSION = 1
MAX_FRAME = 64 * 1024
HEADER = struct.Struct(">I")
CONSOLE_MARKER = "GUESTINIT-FRAME "
MAX_STR = 4096


class FrameType(StrEnum):
    HELLO = "hello"
    PROGRESS = "progress"
    READY = "ready"
    FAILED = "failed"
    DEGRADED = "degraded"
    SHUTDOWN = "shutdown"
    # the service VM's partition service (guestinit/nvidia/partitions.py): a host request
    # and the guest's reply, on their own connection, never on the boot's report channel
    REQUEST = "request"
    REPLY = "reply"


class FrameError(ValueError):
    """A frame that cannot be trusted; carried as a value by FrameReader."""


# Per type: field -> expected python type(s). ``timeline`` is checked deeper.
# Unknown fields are dropped by ``validate`` (a newer guest may send more).
_STR = (str,)
_INT = (int,)
_LIST = (list,)
_MAP = (dict,)
REQUIRED: dict[FrameType, dict[str, tuple[type, ...]]] = {
    FrameType.HELLO: {"version": _STR},
    FrameType.PROGRESS: {"stage": _STR, "event": _STR},
    FrameType.READY: {"timeline": _LIST},
    FrameType.FAILED: {"stage": _STR, "reason": _STR, "timeline": _LIST},
    FrameType.DEGRADED: {"name": _STR, "reason": _STR},
    FrameType.SHUTDOWN: {"reason": _STR, "audit": _LIST},
    FrameType.REQUEST: {"op": _STR},
    FrameType.REPLY: {"op": _STR, "status": _STR},
}
OPTIONAL: dict[str, tuple[type, ...]] = {
    "detail": _STR,
    "inventory": _MAP,
    "modules": _LIST,
    "daemons": _LIST,
    "mode": _STR,
    "restarts": _INT,
    "timeline": _LIST,
    "pid": _INT,
    "cmdline": _STR,
    "error": _STR,
    "gpus": _INT,  # progress while daemons wait: GPUs attached so far ...
    "of": _INT,  # ... of how many
    "ignored": _INT,  # progress/warning from config: cmdline words under our prefixes ignored
    "waited_ms": _INT,  # progress while a daemon is waited for: how long so far
    "agent": _MAP,  # ready: argv, pid, ready (the condition), ready_by, wait_ms, listening_at
    "kernel": _MAP,  # shutdown: kernel marks (run_init_ns, crng_ready_ns) from the ring
    "bench": _MAP,  # ready: the bench stage's figures (bar-map), only when asked for
    "extensions": _MAP,  # ready: Kata extension images mounted (mounted, usr_overlay)
    "init": _STR,  # which init sent it (the bench's baseline inits say so)
    "id": _INT,  # request/reply: the partition id of activate and deactivate
    "by": _STR,  # request: who asks (kept in the audit trail)
    "partitions": _LIST,  # reply: the fabric's partitions (list, status)
    "audit": _LIST,  # reply: the audit events of the request; shutdown: the boot's
    "bdf": _STR,  # progress from hotplug: the device's PCI address
    "index": _INT,  # ... the GPU's index (CDI's nvidia.com/gpu=N)
    "uuid": _STR,  # ... the GPU's UUID
    "latency_us": _INT,  # ... from the uevent's arrival to the work's end
    "fds": _INT,  # ... PID 1's open fds, threads, RSS and the GPU nodes in /dev after it
    "threads": _INT,
    "rss_kib": _INT,
    "nodes": _INT,
}


class Frame:
    """One validated frame. ``fields`` holds everything beyond the header."""

    __slots__ = ("boot_id", "fields", "t", "type", "v")

    def __init__(
        self, type: FrameType, boot_id: str, t: int, fields: dict[str, object], v: int = 1
    ) -> None:
        self.type = type
        self.boot_id = boot_id
        self.t = t
        self.fields = fields
        self.v = v

    def __repr__(self) -> str:
        return f"Frame({self.type.value}, t={self.t}, {self.fields!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and self.to_map() == other.to_map()

    def __hash__(self) -> int:
        return hash((self.type, self.boot_id, self.t))

    def get(self, key: str, default: object = None) -> object:
        return self.fields.get(key, default)

    def to_map(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.fields)
        out.update(v=self.v, type=self.type.value, boot_id=self.boot_id, t=self.t)
        return out

    def timeline(self) -> list[tuple[str, int, int]]:
        raw = self.fields.get("timeline") or []
        assert isinstance(raw, list)
        return [(str(s), int(a), int(b)) for s, a, b in raw]


def encode(frame: Frame) -> bytes:
    body = packb(frame.to_map())
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame {frame.type.value} is {len(body)} bytes, over {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def _check_timeline(raw: list[object]) -> None:
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise FrameError(f"timeline entry {entry!r} is not [stage, start, end]")
        stage, start, end = entry
        if not isinstance(stage, str) or len(stage) > 64:
            raise FrameError(f"timeline stage {stage!r} is not a short string")
        if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool):
            raise FrameError(f"timeline times for {stage} are not integers")
        if start < 0 or end < start:
            raise FrameError(f"timeline for {stage} runs backwards ({start}..{end})")


def validate(obj: object) -> Frame:
    """Turn one decoded msgpack object into a Frame, or raise FrameError."""
    if not isinstance(obj, dict):
        raise FrameError(f"frame is a {type(obj).__name__}, not a map")
    v = obj.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise FrameError(f"bad schema version {v!r}")
    if v > SCHEMA_VERSION:
        raise FrameError(f"schema version {v} is newer than {SCHEMA_VERSION}")
    try:
        ftype = FrameType(str(obj.get("type")))
    except ValueError:
        raise FrameError(f"unknown frame type {obj.get('type')!r}") from None
    boot_id = obj.get("boot_id")
    if not isinstance(boot_id, str) or not 0 < len(boot_id) <= 64:
        raise FrameError(f"bad boot_id {boot_id!r}")
    t = obj.get("t")
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise FrameError(f"bad time t={t!r}")
    fields: dict[str, object] = {}
    required = REQUIRED[ftype]
    for key, value in obj.items():
        if key in ("v", "type", "boot_id", "t"):
            continue
        if not isinstance(key, str):
            raise FrameError(f"non-string key {key!r}")
        want = required.get(key) or OPTIONAL.get(key)
        if want is None:
            continue  # unknown fields are ignored, by design (forward compatible)
        if not isinstance(value, want) or isinstance(value, bool):
            raise FrameError(f"{ftype.value}.{key} is a {type(value).__name__}")
        if isinstance(value, str) and len(value) > MAX_STR:
            raise FrameError(f"{ftype.value}.{key} is {len(value)} chars, over {MAX_STR}")
        fields[key] = value
    for key in required:
        if key not in fields:
            raise FrameError(f"{ftype.value} frame lacks {key!r}")
    if "timeline" in fields:
        timeline = fields["timeline"]
        assert isinstance(timeline, list)
        _check_timeline(timeline)
    return Frame(ftype, boot_id, t, fields, v)


def decode_body(body: bytes) -> Frame:
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame body is {len(body)} bytes, over {MAX_FRAME}")
    import msgpack  # the host side only: the guest never decodes

    try:
        obj = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # garbage in several shapes
        raise FrameError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    return validate(obj)


class FrameReader:
    """Incremental, bounded reader for a byte stream of frames.

    ``feed`` returns what became complete: Frames and FrameErrors. After a bad
    length prefix the stream cannot be resynchronised, so the reader closes and
    reports one error; later input is dropped without being buffered.
    """

    __slots__ = ("_buf", "closed")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.closed = False

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        if self.closed:
            return []
        self._buf += data
        out: list[Frame | FrameError] = []
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length == 0 or length > MAX_FRAME:
                self.closed = True
                self._buf.clear()
                out.append(FrameError(f"frame length {length} outside 1..{MAX_FRAME}"))
                break
            if len(self._buf) < HEADER.size + length:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            try:
                out.append(decode_body(body))
            except FrameError as exc:
                out.append(exc)
        return out

    def eof(self) -> list[FrameError]:
        """Call at end of stream: a partial frame left over is an error."""
        if self._buf and not self.closed:
            n = len(self._buf)
            self._buf.clear()
            return [FrameError(f"stream ended inside a frame ({n} bytes left)")]
        return []


_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def iter_console(text: str) -> Iterator[Frame | FrameError]:
    """Frames sent with the ``console`` transport: one base64 line each."""
    import base64
    import binascii

    for line in text.splitlines():
        idx = line.find(CONSOLE_MARKER)
        if idx < 0:
            continue
        # the base64 run after the marker: a log that quotes the console line (Kata's
        # runtime logs it as vmconsole="..." with more fields after) still decodes
        rest = line[idx + len(CONSOLE_MARKER) :].lstrip()
        end = 0
        while end < len(rest) and rest[end] in _BASE64:
            end += 1
        payload = rest[:end]
        if not payload:
            yield FrameError("console frame is not base64")
            continue
        if len(payload) > (MAX_FRAME + HEADER.size) * 4 // 3 + 8:
            yield FrameError("console frame line too long")
            continue
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            yield FrameError("console frame is not base64")
            continue
        reader = FrameReader()
        got = reader.feed(raw) + reader.eof()
        yield from got if got else [FrameError("empty console frame")]
