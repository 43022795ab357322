from __future__ import annotations

import base64
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestinit import wire
from guestinit.wire import Frame, FrameError, FrameReader, FrameType

timeline = st.lists(
    st.tuples(st.text(min_size=1, max_size=10), st.integers(0, 2**62), st.integers(0, 2**20))
    .map(lambda x: [x[0], x[1], x[1] + x[2]]), max_size=20)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    ftype = draw(st.sampled_from(list(FrameType)))
    fields: dict[str, object] = {}
    for key, want in wire.REQUIRED[ftype].items():
        if key == "timeline":
            fields[key] = draw(timeline)
        elif want == (str,):
            fields[key] = draw(st.text(max_size=50))
        else:
            fields[key] = draw(st.lists(st.text(max_size=10), max_size=5))
    if draw(st.booleans()):
        fields["detail"] = draw(st.text(max_size=100))
    return Frame(ftype, draw(st.text(min_size=1, max_size=32)), draw(st.integers(0, 2**63)),
                 fields)


@given(st.lists(frames(), min_size=1, max_size=5), st.integers(1, 64))
def test_round_trip_any_chunking(items: list[Frame], chunk: int) -> None:
    data = b"".join(wire.encode(f) for f in items)
    reader = FrameReader()
    out: list[Frame | FrameError] = []
    for i in range(0, len(data), chunk):
        out += reader.feed(data[i : i + chunk])
    assert reader.eof() == []
    assert out == items


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_never_crashes(data: bytes) -> None:
    reader = FrameReader()
    out = reader.feed(data) + reader.eof()
    assert all(isinstance(x, Frame | FrameError) for x in out)


@settings(max_examples=200)
@given(st.dictionaries(st.text(max_size=8),
                       st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(), st.none(),
                                 st.lists(st.integers(0, 9))), max_size=8))
def test_random_maps_are_frames_or_errors(obj: dict[str, object]) -> None:
    body = msgpack.packb(obj)
    got = FrameReader().feed(struct.pack(">I", len(body)) + body)
    assert len(got) == 1 and isinstance(got[0], Frame | FrameError)


def _raw(obj: object) -> bytes:
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


GOOD = {"v": 1, "type": "failed", "boot_id": "b", "t": 5, "stage": "config", "reason": "x",
        "timeline": [["early", 1, 2]]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "newer"),
        ({"v": "1"}, "schema version"),
        ({"type": "boom"}, "unknown frame type"),
        ({"boot_id": ""}, "boot_id"),
        ({"t": -1}, "bad time"),
        ({"stage": 7}, "failed.stage is a int"),
        ({"reason": "r" * 5000}, "over 4096"),
        ({"timeline": [["early", 5, 2]]}, "backwards"),
        ({"timeline": [["early", 1]]}, "not [stage, start, end]"),
        ({"timeline": "soon"}, "failed.timeline is a str"),
    ],
)
def test_schema_rejections(change: dict[str, object], message: str) -> None:
    (got,) = FrameReader().feed(_raw({**GOOD, **change}))
    assert isinstance(got, FrameError)
    assert message in str(got)


def test_missing_required_field_and_unknown_fields_ignored() -> None:
    bad = dict(GOOD)
    del bad["reason"]
    (got,) = FrameReader().feed(_raw(bad))
    assert isinstance(got, FrameError) and "lacks 'reason'" in str(got)
    (ok,) = FrameReader().feed(_raw({**GOOD, "future_field": {"x": 1}}))
    assert isinstance(ok, Frame) and "future_field" not in ok.fields


def test_gpu_progress_counts_reach_the_host() -> None:
    frame = Frame(FrameType.PROGRESS, "b" * 32, 5, {"stage": "daemons", "event": "gpus",
                                                   "detail": "3 of 8 GPUs", "gpus": 3, "of": 8})
    (got,) = FrameReader().feed(wire.encode(frame))
    assert isinstance(got, Frame) and (got.get("gpus"), got.get("of")) == (3, 8)
    (bad,) = FrameReader().feed(wire.encode(Frame(FrameType.PROGRESS, "b" * 32, 5, {
        "stage": "daemons", "event": "gpus", "gpus": "three"})))
    assert isinstance(bad, FrameError) and "progress.gpus is a str" in str(bad)


def test_oversized_length_closes_the_stream_without_buffering() -> None:
    reader = FrameReader()
    out = reader.feed(struct.pack(">I", wire.MAX_FRAME + 1) + b"x" * 100)
    assert len(out) == 1 and "outside" in str(out[0])
    assert reader.closed
    assert reader.feed(b"y" * 1_000_000) == []
    assert len(reader._buf) == 0


def test_encode_refuses_oversized_frames() -> None:
    big = Frame(FrameType.PROGRESS, "b", 1, {"stage": "x", "event": "y", "detail": "z" * 70000})
    with pytest.raises(FrameError, match="over 65536"):
        wire.encode(big)


def test_truncated_stream_is_an_error_at_eof() -> None:
    data = _raw(GOOD)
    reader = FrameReader()
    assert reader.feed(data[:-3]) == []
    (err,) = reader.eof()
    assert "ended inside a frame" in str(err)


def test_console_lines() -> None:
    frame = Frame(FrameType.READY, "b", 9, {"timeline": [["early", 1, 2]]})
    text = "junk\n[ 1.0] " + wire.CONSOLE_MARKER + base64.b64encode(wire.encode(frame)).decode()
    text += "\n" + wire.CONSOLE_MARKER + "!!!notbase64\n"
    out = list(wire.iter_console(text))
    assert out[0] == frame
    assert isinstance(out[1], FrameError)


def test_console_lines_quoted_in_katas_runtime_log() -> None:
    """Kata's runtime logs guest console lines as a logfmt field (sandbox.go
    consoleWatcher: vmconsole="..." then more fields): the frame still decodes."""
    frame = Frame(FrameType.READY, "a" * 32, 5, {"timeline": []})
    line = (f'time="2026-12-05T08:00:00Z" level=debug msg="reading guest console" '
            f'console-protocol=unix vmconsole="{wire.CONSOLE_MARKER}'
            f'{base64.b64encode(wire.encode(frame)).decode()}" sandbox=abc source=virtcontainers')
    got = list(wire.iter_console(line))
    assert len(got) == 1 and isinstance(got[0], Frame) and got[0].type is FrameType.READY
