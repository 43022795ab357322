"""msgpack encoding for the guest: the subset frames are made of, in pure Python.

``import msgpack`` costs the boot about 4 ms of a 6 ms interpreter start
(its ``ext`` module pulls in ``datetime`` and ``collections`` for Timestamp and
ExtType, which frames never carry). The guest only encodes; the host decodes with
msgpack itself (``wire.decode_body``). ``packb(obj)`` gives the same bytes as
``msgpack.packb(obj, use_bin_type=True)`` for None, bool, int, float, str,
bytes, list, tuple and dict, the smallest encoding of each (a unit test holds the
two side by side); anything else is a TypeError, an int beyond 64 bits an
OverflowError, as with msgpack.
"""

from __future__ import annotations

import struct

_B = struct.Struct(">B").pack
_H = struct.Struct(">H").pack
_I = struct.Struct(">I").pack
_Q = struct.Struct(">Q").pack
_b = struct.Struct(">b").pack
_h = struct.Struct(">h").pack
_i = struct.Struct(">i").pack
_q = struct.Struct(">q").pack
_d = struct.Struct(">d").pack


def packb(obj: object) -> bytes:
    out: list[bytes] = []
    _pack(obj, out)
    return b"".join(out)


def _length(n: int, fix: int, fix_max: int, codes: bytes, out: list[bytes]) -> None:
    """A str/bin/array/map header: fix form below ``fix_max``, else 8/16/32-bit length."""
    if n < fix_max:
        out.append(_B(fix | n))
    elif codes[0] and n <= 0xFF:
        out.append(_B(codes[0]) + _B(n))
    elif n <= 0xFFFF:
        out.append(_B(codes[1]) + _H(n))
    elif n <= 0xFFFFFFFF:
        out.append(_B(codes[2]) + _I(n))
    else:
        raise ValueError(f"{n} items or bytes is too large for msgpack")


def _int(n: int, out: list[bytes]) -> None:
    if 0 <= n <= 0x7F or -32 <= n < 0:
        out.append(_b(n) if n < 0 else _B(n))
    elif n > 0:
        if n <= 0xFF:
            out.append(b"\xcc" + _B(n))
        elif n <= 0xFFFF:
            out.append(b"\xcd" + _H(n))
        elif n <= 0xFFFFFFFF:
            out.append(b"\xce" + _I(n))
        elif n <= 0xFFFFFFFFFFFFFFFF:
            out.append(b"\xcf" + _Q(n))
        else:
            raise OverflowError("int too big to convert")
    elif n >= -0x80:
        out.append(b"\xd0" + _b(n))
    elif n >= -0x8000:
        out.append(b"\xd1" + _h(n))
    elif n >= -0x80000000:
        out.append(b"\xd2" + _i(n))
    elif n >= -0x8000000000000000:
        out.append(b"\xd3" + _q(n))
    else:
        raise OverflowError("int too big to convert")


def _pack(obj: object, out: list[bytes]) -> None:
    if obj is None:
        out.append(b"\xc0")
    elif obj is True:
        out.append(b"\xc3")
    elif obj is False:
        out.append(b"\xc2")
    elif isinstance(obj, int):
        _int(obj, out)
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
        _length(len(raw), 0xA0, 32, b"\xd9\xda\xdb", out)
        out.append(raw)
    elif isinstance(obj, float):
        out.append(b"\xcb" + _d(obj))
    elif isinstance(obj, list | tuple):
        _length(len(obj), 0x90, 16, b"\x00\xdc\xdd", out)
        for item in obj:
            _pack(item, out)
    elif isinstance(obj, dict):
        _length(len(obj), 0x80, 16, b"\x00\xde\xdf", out)
        for key, value in obj.items():
            _pack(key, out)
            _pack(value, out)
    elif isinstance(obj, bytes | bytearray | memoryview):
        raw = bytes(obj)
        _length(len(raw), 0, 0, b"\xc4\xc5\xc6", out)
        out.append(raw)
    else:
        raise TypeError(f"can not serialize {type(obj).__name__!r} object")
