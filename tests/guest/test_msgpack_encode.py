"""guestinit.msgpack_encode gives msgpack's own bytes for everything a frame is made of."""

from __future__ import annotations

import random

import msgpack
import pytest

from guestinit.config import LogLevel, Mode
from guestinit.msgpack_encode import packb

EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -32, -33,
         -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]


@pytest.mark.parametrize("value", [
    None, True, False, 0.0, -1.5, 1e300, float("inf"), "", "x" * 31, "x" * 32, "x" * 255,
    "x" * 256, "x" * 65535, "x" * 65536, "héllo ✓", b"", b"\x00" * 255, b"\x00" * 256,
    b"\x01" * 65536, bytearray(b"ab"), [], list(range(15)), list(range(16)),
    list(range(65536)), (1, "a"), {}, {str(i): i for i in range(15)},
    {str(i): i for i in range(16)}, {str(i): i for i in range(65536)},
    Mode.GPU, LogLevel.INFO, *EDGES,
])
def test_same_bytes_as_msgpack(value: object) -> None:
    assert packb(value) == msgpack.packb(value, use_bin_type=True)


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return min(2**64 - 1, max(-2**63, rng.choice(EDGES) + rng.randrange(-3, 4)))
    if kind == 1:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(40)))
    if kind == 2:
        return rng.choice([None, True, False, rng.random() * 1e6])
    if kind == 3:
        return rng.randbytes(rng.randrange(300))
    if kind == 4:
        return rng.randrange(-2**63, 2**64)
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(20))]
    if kind == 6:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randrange(5)))
    return {str(rng.randrange(1000)): _random_value(rng, depth + 1)
            for _ in range(rng.randrange(20))}


def test_random_frames_match_msgpack() -> None:
    rng = random.Random(1040)
    for _ in range(500):
        value = _random_value(rng)
        assert packb(value) == msgpack.packb(value, use_bin_type=True), value


@pytest.mark.parametrize("value", [2**64, -2**63 - 1])
def test_out_of_range_ints_overflow(value: int) -> None:
    with pytest.raises(OverflowError):
        msgpack.packb(value)
    with pytest.raises(OverflowError):
        packb(value)


@pytest.mark.parametrize("value", [object(), {1, 2}, 1j])
def test_other_types_are_type_errors(value: object) -> None:
    with pytest.raises(TypeError):
        packb(value)
