"""The value types and parsers of the settings (``config.SETTINGS``).

Parsers are pure: they return a value or raise ValueError saying what was expected;
``config`` turns that into a ``ConfigError`` naming the key and the value. NVRC's
spellings are accepted where they differ from ours (``nvrc.log=trace``,
``nvrc.mode=nvswitch-nvl4``, ``nvrc.smi.srs=enabled``).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # the type checker sees real enums; the boot path does without enum
    from collections.abc import Callable
    from enum import Enum, IntEnum, StrEnum
else:
    from guestinit.choice import IntChoice as IntEnum
    from guestinit.choice import StrChoice as StrEnum

PREFIX = "guestinit."
NVRC_PREFIX = "nvrc."
VSOCK_PORT_MAX = 0xFFFFFFFE  # VMADDR_PORT_ANY (-1U) is no port to wait for
SUN_PATH_MAX = 107


class ConfigError(ValueError):
    def __init__(self, key: str, value: str, why: str) -> None:
        super().__init__(f"{key}={value!r}: {why}")
        self.key = key
        self.value = value


class LogLevel(IntEnum):
    """Syslog priorities (lower = more severe); ``off`` logs nothing."""

    OFF = -1
    ERROR = 3
    WARN = 4
    INFO = 6
    DEBUG = 7


class Mode(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"
    NVL4 = "nvl4"  # service VM: NVSwitches, nv-fabricmanager
    NVL5 = "nvl5"  # service VM: Mellanox SW_MNG, nvlsm


class Fabric(StrEnum):
    """The NVLink fabric beside GPUs (``discover`` decides it with the mode)."""

    NONE = ""
    NVL4 = "nvl4"  # NVSwitches: nv-fabricmanager, FABRIC_MODE 0
    NVL5 = "nvl5"  # SW_MNG bridges: nvlsm, then nv-fabricmanager


class Restart(StrEnum):
    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


_TRUE = {"1", "y", "yes", "on", "true"}
_FALSE = {"0", "n", "no", "off", "false"}


def parse_bool(value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected one of 1/0, yes/no, on/off, true/false")


def parse_int(value: str) -> int:
    return int(value, 0)


def parse_uint(value: str) -> int:
    n = int(value, 0)
    if n < 0:
        raise ValueError("must not be negative")
    return n


def parse_seconds(value: str) -> float:
    n = float(value.removesuffix("s"))
    if not n >= 0 or n == float("inf"):
        raise ValueError("expected a non-negative number of seconds")
    return n


def parse_log(value: str) -> LogLevel:
    """NVRC's levels too: ``trace`` logs as ``debug``, an empty value (``nvrc.log=``) is off."""
    aliases = {"warning": "warn", "err": "error", "0": "off", "none": "off", "": "off",
               "trace": "debug"}
    name = aliases.get(value.lower(), value.lower())
    try:
        return LogLevel[name.upper()]
    except KeyError:
        raise ValueError("expected off, error, warn, info, debug or trace") from None


# NVRC's names for the modes (``nvrc.mode``, older releases) beside ours
MODE_ALIASES = {"nvswitch-nvl4": "nvl4", "nvswitch-nvl5": "nvl5", "servicevm-nvl4": "nvl4",
                "servicevm-nvl5": "nvl5"}


def parse_mode(value: str) -> Mode:
    low = value.lower()
    try:
        return Mode(MODE_ALIASES.get(low, low))
    except ValueError:
        names = ", ".join([*(str(m.value) for m in Mode), *MODE_ALIASES])
        raise ValueError(f"expected one of {names}") from None


def parse_fm_mode(value: str) -> str:
    """FABRIC_MODE: auto (NVRC's: 1 in a service VM, 0 beside GPUs), 0, 1 or 2."""
    if value.lower() == "auto":
        return "auto"
    if value in ("0", "1", "2"):
        return value
    raise ValueError("expected auto, 0 (bare metal / full passthrough), 1 (shared NVSwitch "
                     "service VM) or 2 (vGPU)")


def parse_rail_policy(value: str) -> str:
    """PARTITION_RAIL_POLICY: auto (NVRC's: symmetric on NVL5, greedy on NVL4) or a policy."""
    low = value.lower()
    if low in ("auto", "greedy", "symmetric"):
        return low
    raise ValueError("expected auto, greedy or symmetric")


def parse_clock(value: str) -> str:
    """A clock lock for nvidia-smi: MHz (NVRC's form) or MIN,MAX in MHz."""
    parts = value.split(",")
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        nums = [int(p) for p in parts]
        if nums[0] <= nums[-1] and nums[-1] > 0:
            return ",".join(str(n) for n in nums)
    raise ValueError("expected MHz (like 1500) or MIN,MAX (like 1500,1980)")


def parse_watts(value: str) -> str:
    if value.isdigit() and int(value) > 0:
        return value
    raise ValueError("expected a power limit in whole watts (like 300)")


SRS = {"0": "0", "1": "1", "disabled": "0", "enabled": "1"}


def parse_srs(value: str) -> str:
    """``nvidia-smi conf-compute -srs``: 0/1, or NVRC's documented disabled/enabled."""
    try:
        return SRS[value.lower()]
    except KeyError:
        raise ValueError("expected enabled, disabled, 1 or 0") from None




def report_target(value: str) -> tuple[str, str, int]:
    """``report``'s transport, its name or path or CID, and its port (vsock; else 0): the
    one reading of the URI, for the setting's check and for opening the channel."""
    kind, _, rest = value.partition(":")
    if kind == "console" and not rest:
        return kind, "", 0
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        if cid.isdigit() and port.isdigit() and 0 < int(port) < 2**32:
            return kind, cid, int(port)
        raise ValueError("expected vsock:CID:PORT")
    if kind in ("virtio-port", "unix") and rest:
        return kind, rest, 0
    raise ValueError("expected vsock:CID:PORT, virtio-port:NAME, unix:PATH or console")


def parse_report(value: str) -> str:
    report_target(value)
    return value


def parse_words(value: str) -> tuple[str, ...]:
    words = tuple(value.split())
    if not words:
        raise ValueError("must not be empty")
    return words


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(w for w in value.replace(",", " ").split() if w)


def parse_env(value: str) -> tuple[str, ...]:
    """``NAME=VALUE,NAME=VALUE``: environment entries, each name a C identifier."""
    out = []
    for entry in parse_list(value):
        name, sep, _ = entry.partition("=")
        if not sep or not name or not (name[0].isalpha() or name[0] == "_") or \
                not name.replace("_", "a").isalnum() or not name.isascii():
            raise ValueError(f"{entry!r} is not NAME=VALUE")
        out.append(entry)
    return tuple(out)


def _enum(cls: type[Enum]) -> Callable[[str], object]:
    def parse(value: str) -> object:
        try:
            return cls(value.lower())
        except ValueError:
            names = ", ".join(str(m.value) for m in cls)
            raise ValueError(f"expected one of {names}") from None

    return parse


def parse_bar_target(value: str) -> str:
    """``<bdf>:<bar>`` for the bench stage's bar-map, normalised (barmap only when given)."""
    from guestinit.sizes import parse_target

    bdf, bar = parse_target(value)
    return f"{bdf}:{bar}"


def parse_size_text(value: str) -> str:
    from guestinit.sizes import parse_size

    parse_size(value)
    return value


def parse_partitions_listen(value: str) -> str:
    kind, _, rest = value.partition(":")
    if value == "off" or (kind == "vsock" and rest.isdigit() and 0 < int(rest) < 2**32) \
            or (kind in ("virtio-port", "unix") and rest):
        return value
    raise ValueError("expected vsock:PORT, virtio-port:NAME, unix:PATH or off")


def parse_port(value: str) -> int:
    n = int(value, 10)
    if not 0 < n < 65536:
        raise ValueError("expected a TCP port, 1-65535")
    return n


def parse_mode_octal(value: str) -> int:
    n = int(value, 8)
    if not 0 <= n <= 0o7777:
        raise ValueError("expected an octal file mode like 0666")
    return n


class Ready(StrEnum):
    NONE = "none"
    SYSLOG = "syslog"
    UNIX = "unix"
    VSOCK = "vsock"


class Condition:
    """``Condition(Ready.UNIX, "/run/agent.sock")``; ``str()`` gives it as configured."""

    __slots__ = ("kind", "target")

    def __init__(self, kind: Ready, target: str = "") -> None:
        self.kind = kind
        self.target = target

    def __str__(self) -> str:
        return str(self.kind) if self.kind == Ready.NONE else f"{self.kind}:{self.target}"

    def __repr__(self) -> str:
        return f"Condition({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def describe(self) -> str:
        """What was waited for, for a ``failed`` reason."""
        if self.kind == Ready.SYSLOG:
            return f"no line containing {self.target!r} on syslog"
        if self.kind == Ready.UNIX:
            return f"no listener on unix:{self.target}"
        if self.kind == Ready.VSOCK:
            return f"no listener on vsock port {self.target}"
        return "spawned"


READY_NONE = Condition(Ready.NONE)


def parse_ready(value: str) -> Condition:
    kind, sep, target = value.partition(":")
    low = kind.lower()
    if low == "none" and not sep:
        return READY_NONE
    if low == "syslog" and target:
        return Condition(Ready.SYSLOG, target)
    if low == "unix" and target:
        if not target.startswith("/"):
            raise ValueError("unix: takes an absolute path")
        if len(target.encode()) > SUN_PATH_MAX:
            raise ValueError(f"a unix socket path has at most {SUN_PATH_MAX} bytes")
        return Condition(Ready.UNIX, os.path.normpath(target))
    if low == "vsock" and target:
        if not target.isascii() or not target.isdigit() or not 0 < int(target) <= VSOCK_PORT_MAX:
            raise ValueError(f"vsock: takes a port 1-{VSOCK_PORT_MAX}, got {target!r}")
        return Condition(Ready.VSOCK, str(int(target)))
    raise ValueError("expected none, syslog:TEXT, unix:PATH or vsock:PORT")


def cmdline_words(cmdline: str) -> list[str]:
    """The kernel's words of a cmdline: whitespace separated, double quotes group spaces and
    are removed; ``--`` ends the kernel's part (the rest is init's argv)."""
    out: list[str] = []
    i, n = 0, len(cmdline)
    while i < n:
        while i < n and cmdline[i].isspace():
            i += 1
        if i >= n:
            break
        word: list[str] = []
        quoted = False
        while i < n and (quoted or not cmdline[i].isspace()):
            ch = cmdline[i]
            if ch == '"':
                quoted = not quoted
            else:
                word.append(ch)
            i += 1
        text = "".join(word)
        if text == "--":
            break
        out.append(text)
    return out


def split_cmdline(cmdline: str) -> list[tuple[str, str]]:
    """Split a kernel cmdline into (key, value) like the kernel does.

    ``key="a b"`` and ``"key=a b"`` both give ``a b``; a word with no ``=`` has value ``""``.
    """
    out = []
    for text in cmdline_words(cmdline):
        key, _, value = text.partition("=")
        out.append((key, value))
    return out
