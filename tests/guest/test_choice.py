"""guestinit.choice against the enum module it stands in for, on what the init uses."""

from __future__ import annotations

import enum
import json

import msgpack
import pytest

from guestinit.choice import IntChoice, StrChoice


class RealMode(enum.StrEnum):
    AUTO = "auto"
    GPU = "gpu"
    NVL4 = "nvl4"


class Mode(StrChoice):
    AUTO = "auto"
    GPU = "gpu"
    NVL4 = "nvl4"


class RealLevel(enum.IntEnum):
    OFF = -1
    ERROR = 3
    INFO = 6


class Level(IntChoice):
    OFF = -1
    ERROR = 3
    INFO = 6


@pytest.mark.parametrize(("real", "ours"), [(RealMode, Mode), (RealLevel, Level)])
def test_behaves_like_enum(real: type[enum.Enum], ours: type) -> None:
    assert [m.name for m in ours] == [m.name for m in real]
    assert [m.value for m in ours] == [m.value for m in real]
    assert len(ours) == len(real)
    for r in real:
        o = ours(r.value)
        assert o is getattr(ours, r.name) is ours[r.name]
        assert o == r.value and hash(o) == hash(r.value)
        assert (str(o), f"{o}", o.name, o.value) == (str(r), f"{r}", r.name, r.value)
        assert isinstance(o, type(r.value))
    with pytest.raises(ValueError, match="is not a valid"):
        ours("nope")
    with pytest.raises(ValueError):
        ours([1])  # unhashable: still ValueError, as enum
    with pytest.raises(KeyError):
        ours["nope"]
    with pytest.raises(KeyError):
        ours["mro"]


def test_members_travel_as_plain_values() -> None:
    frame = {"mode": Mode.GPU, "level": Level.INFO}
    assert msgpack.unpackb(msgpack.packb(frame)) == {"mode": "gpu", "level": 6}
    assert json.loads(json.dumps(frame)) == {"mode": "gpu", "level": 6}
    assert Level.ERROR < Level.INFO and Level.OFF < 0
    assert {Mode.GPU: 1}["gpu"] == 1
    assert repr(Mode.GPU) == "<Mode.GPU: 'gpu'>"


def test_boot_path_classes_use_it() -> None:
    from guestinit import config, pci, stages, wire

    for cls in (config.Mode, config.Restart, stages.Stage, wire.FrameType, pci.Kind):
        assert issubclass(cls, StrChoice), cls
    assert issubclass(config.LogLevel, IntChoice)
