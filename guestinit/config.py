"""Configuration: baked ``/etc/guestinit.conf`` overlaid by the kernel cmdline.

One declarative table (``SETTINGS``) drives parsing, defaults, NVRC aliases and
the docs (``python -m guestinit --help-config``). Parsers are pure: they return
values or raise ``ConfigError`` naming the key and the value; they never touch
/proc or /sys.
"""

from __future__ import annotations

import builtins

from guestinit.readiness import NONE as READY_NONE
from guestinit.readiness import parse_ready

TYPE_CHECKING = False
if TYPE_CHECKING:  # the type checker sees real enums; the boot path does without enum
    from collections.abc import Callable, Iterable, Mapping
    from enum import Enum, IntEnum, StrEnum
else:
    from guestinit.choice import IntChoice as IntEnum
    from guestinit.choice import StrChoice as StrEnum

PREFIX = "guestinit."
NVRC_PREFIX = "nvrc."


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
    aliases = {"warning": "warn", "err": "error", "0": "off", "none": "off"}
    name = aliases.get(value.lower(), value.lower())
    try:
        return LogLevel[name.upper()]
    except KeyError:
        raise ValueError("expected off, error, warn, info or debug") from None


def parse_report(value: str) -> str:
    kind, _, rest = value.partition(":")
    if kind == "console" and not rest:
        return value
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        if cid.isdigit() and port.isdigit() and 0 < int(port) < 2**32:
            return value
        raise ValueError("expected vsock:CID:PORT")
    if kind in ("virtio-port", "unix") and rest:
        return value
    raise ValueError("expected vsock:CID:PORT, virtio-port:NAME, unix:PATH or console")


def parse_words(value: str) -> tuple[str, ...]:
    words = tuple(value.split())
    if not words:
        raise ValueError("must not be empty")
    return words


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(w for w in value.replace(",", " ").split() if w)


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
    from guestinit.barmap import parse_target

    bdf, bar = parse_target(value)
    return f"{bdf}:{bar}"


def parse_size_text(value: str) -> str:
    from guestinit.barmap import parse_size

    parse_size(value)
    return value


def parse_mode_octal(value: str) -> int:
    n = int(value, 8)
    if not 0 <= n <= 0o7777:
        raise ValueError("expected an octal file mode like 0666")
    return n


class Setting:
    __slots__ = ("aliases", "default", "doc", "name", "parse")

    def __init__(
        self,
        name: str,
        parse: Callable[[str], object],
        default: object,
        doc: str,
        aliases: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.parse = parse
        self.default = default
        self.doc = doc
        self.aliases = aliases


# name (after "guestinit."), parser, default, doc, NVRC aliases (after "nvrc.")
SETTINGS: tuple[Setting, ...] = (
    Setting("log", parse_log, LogLevel.INFO, "kmsg log level: off/error/warn/info/debug",
            ("log",)),
    Setting("report", parse_report, "vsock:2:1040",
            "where frames go: vsock:CID:PORT, virtio-port:NAME, unix:PATH, console"),
    Setting("mode", _enum(Mode), Mode.AUTO, "auto (from the PCI inventory), cpu, gpu, nvl4, nvl5",
            ("mode",)),
    Setting("hostname", str, "localhost", "hostname set in the early stage"),
    Setting("agent", parse_words, ("/usr/bin/kata-agent",),
            "agent command line (space separated); none: start no agent"),
    Setting("agent.ready", parse_ready, READY_NONE,
            "when the agent is ready: none (when spawned), syslog:TEXT (a line with TEXT on "
            "syslog), unix:PATH (a socket at PATH accepts connections)"),
    Setting("agent.ready_timeout", parse_seconds, 30.0,
            "seconds the agent may take to meet agent.ready; then the boot fails"),
    Setting("agent.restart", _enum(Restart), Restart.NEVER, "agent restart policy"),
    Setting("agent.shutdown_on_exit", parse_bool, True,
            "power off when the agent stops for good"),
    Setting("agent.nofile", parse_uint, 1048576, "RLIMIT_NOFILE for the agent"),
    Setting("agent.oom_score_adj", parse_int, -997, "oom_score_adj for the agent"),
    Setting("restart.max", parse_uint, 5, "restarts before a daemon is given up (degraded)"),
    Setting("restart.backoff", parse_seconds, 0.2, "first restart delay; doubles each time"),
    Setting("restart.backoff_max", parse_seconds, 10.0, "longest restart delay"),
    Setting("restart.reset", parse_seconds, 60.0,
            "a daemon that ran this long starts its restart count afresh when it fails"),
    Setting("shutdown.grace", parse_seconds, 5.0,
            "seconds a daemon gets after SIGTERM before SIGKILL"),
    Setting("syslog", parse_bool, True, "run the syslog server on /dev/log"),
    Setting("syslog.file_max", parse_uint, 1 << 20,
            "bytes of syslog kept in /run/guestinit/syslog"),
    Setting("syslog.kmsg_rate", parse_uint, 50, "syslog lines per second forwarded to kmsg"),
    Setting("syslog.forward", parse_bool, True, "forward syslog lines to kmsg"),
    Setting("readonly", parse_list, (), "mount points remounted read-only in the lockdown stage"),
    Setting("lockdown", parse_bool, True, "write modules_disabled=1 after the last module"),
    Setting("modules", parse_list, (), "extra kernel modules loaded early (names)"),
    Setting("daemon.timeout", parse_seconds, 600.0, "seconds a daemon may take to become ready",
            ("daemon.timeout",)),
    Setting("uvm.persistence", parse_bool, True,
            "run nvidia-persistenced with --uvm-persistence-mode",
            ("uvm.persistence.mode",)),
    Setting("smi.lgc", str, "", "nvidia-smi --lock-gpu-clocks value", ("smi.lgc",)),
    Setting("smi.lmc", str, "", "nvidia-smi --lock-memory-clocks value", ("smi.lmc",)),
    Setting("smi.pl", str, "", "nvidia-smi --power-limit value", ("smi.pl",)),
    Setting("smi.srs", str, "", "nvidia-smi conf-compute --set-ready-state value", ("smi.srs",)),
    Setting("dcgm", parse_bool, False, "run nv-hostengine and dcgm-exporter", ("dcgm",)),
    Setting("fabricmanager.mode", parse_uint, 0, "FABRIC_MODE for nv-fabricmanager", ("fm.mode",)),
    Setting("fabricmanager.rail_policy", str, "greedy", "PARTITION_RAIL_POLICY",
            ("fm.rail",)),
    Setting("device.mode", parse_mode_octal, 0o666, "mode of the NVIDIA device nodes"),
    Setting("device.gid", parse_uint, 0, "group of the NVIDIA device nodes"),
    Setting("standin.gpu", parse_list, (),
            "test profile: PCI vendor:device ids discovered as NVIDIA GPUs (VM tests on "
            "emulated devices with the stand-in driver, e.g. 1af4:1110)"),
    Setting("standin.nvswitch", parse_list, (),
            "test profile: PCI vendor:device ids discovered as NVSwitches (e.g. 1234:11e8)"),
    Setting("accel", parse_list, (),
            "extra accelerator profiles: vendor:device[:class]=module+module, comma separated"),
    Setting("module.params", parse_list, (),
            "module parameters: module.param=value, comma separated (nvidia.NVreg_X=1)"),
    Setting("nvidia.modules", parse_list, (),
            "extra NVIDIA modules in gpu mode: nvidia-modeset, nvidia-drm, nvidia-peermem"),
    Setting("firmware.path", str, "/lib/firmware",
            "firmware search path written before loading modules (empty: leave it)"),
    Setting("nvidia.bin", str, "/usr/bin", "directory of the NVIDIA userspace binaries"),
    Setting("nvidia.user", str, "nvidia-persistenced",
            "system user nvidia-persistenced runs as, when the image has it"),
    Setting("fabricmanager.config", str, "/usr/share/nvidia/nvswitch/fabricmanager.cfg",
            "nv-fabricmanager config template (copied to /run and rewritten)"),
    Setting("verity.roothash", str, "",
            "dm-verity root hash of rootfs.erofs: the initramfs mounts it and switches root"),
    Setting("verity.reexec", parse_bool, False,
            "after the switch, exec the verified tree's /sbin/init instead of going on in "
            "the initramfs's init (a second interpreter start, ~0.4 s under TCG)"),
    Setting("bench.bar", parse_bar_target, "",
            "bench stage: map this BAR read-only (<bdf>:<bar>, e.g. 0000:00:01.0:2) and "
            "report the mapping costs in the ready frame (guestinit-bench bar-map)"),
    Setting("bench.bar_span", parse_size_text, "",
            "bytes of the BAR the bench stage maps (e.g. 256M; default min(1G, BAR size))"),
    Setting("inject", str, "", "test hook: raise an exception at the start of this stage"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
BY_ALIAS: dict[str, Setting] = {a: s for s in SETTINGS for a in s.aliases}


# Config's accessors are named after the builtins; annotations inside the class use these.
_Str = builtins.str
_Int = builtins.int
_Float = builtins.float
_Bool = builtins.bool


class Config:
    """Typed values, read with ``cfg["agent.restart"]``; immutable once built."""

    __slots__ = ("_values", "problems", "sources")

    def __init__(self, values: Mapping[str, object], sources: Mapping[str, str],
                 problems: Iterable[ConfigError] = ()) -> None:
        self._values = dict(values)
        self.sources = dict(sources)  # key -> "default" / "file" / "cmdline"
        self.problems = list(problems)  # the entries a lenient build skipped, in order

    def __getitem__(self, key: str) -> object:
        return self._values[key]

    def str(self, key: _Str) -> _Str:
        value = self._values[key]
        assert isinstance(value, str)
        return value

    def int(self, key: _Str) -> _Int:
        value = self._values[key]
        assert isinstance(value, int)
        return value

    def float(self, key: _Str) -> _Float:
        value = self._values[key]
        assert isinstance(value, int | float)
        return float(value)

    def bool(self, key: _Str) -> _Bool:
        value = self._values[key]
        assert isinstance(value, bool)
        return value

    def words(self, key: _Str) -> tuple[_Str, ...]:
        value = self._values[key]
        assert isinstance(value, tuple)
        return value

    def as_dict(self) -> dict[_Str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._values.items()}


def split_cmdline(cmdline: str) -> list[tuple[str, str]]:
    """Split a kernel cmdline into (key, value) like the kernel does.

    Words are separated by whitespace; double quotes group spaces and are
    removed (``key="a b"`` and ``"key=a b"`` both give ``a b``). A word with no
    ``=`` has value ``""``. ``--`` ends the kernel's part (the rest is init's argv).
    """
    out: list[tuple[str, str]] = []
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
        key, _, value = text.partition("=")
        out.append((key, value))
    return out


def _lookup(key: str) -> Setting | None:
    if key.startswith(PREFIX):
        return BY_NAME.get(key[len(PREFIX):])
    if key.startswith(NVRC_PREFIX):
        return BY_ALIAS.get(key[len(NVRC_PREFIX):])
    return None


def _parse_one(setting: Setting, key: str, value: str) -> object:
    try:
        return setting.parse(value)
    except ValueError as exc:
        raise ConfigError(key, value, str(exc) or "bad value") from None


def parse_file(text: str, origin: str = "/etc/guestinit.conf",
               problems: list[ConfigError] | None = None) -> list[tuple[Setting, str, str]]:
    """Lines of ``key=value`` (keys without the ``guestinit.`` prefix); ``#`` comments.

    A bad line raises ConfigError, or with ``problems`` is appended there and skipped,
    so the good lines around it still count.
    """
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        setting = BY_NAME.get(key)
        if not sep or setting is None:
            error = ConfigError(f"{origin}:{lineno}: {key}", value,
                                "unknown key" if sep else "expected key=value")
            if problems is None:
                raise error
            problems.append(error)
            continue
        out.append((setting, key, value))
    return out


def parse_cmdline(cmdline: str) -> list[tuple[Setting, str, str]]:
    """Our keys from the cmdline; unknown ``guestinit.*``/``nvrc.*`` keys are ignored."""
    out = []
    for key, value in split_cmdline(cmdline):
        setting = _lookup(key)
        if setting is not None:
            out.append((setting, key, value))
    return out


def build(file_text: str = "", cmdline: str = "", strict: bool = True) -> Config:
    """Defaults, then the baked file, then the cmdline (later wins).

    ``strict=False`` skips each bad entry (kept in ``problems``) instead of raising:
    the failure path uses it to find the report channel even when the config itself is
    what failed, and one bad line of the file costs only that line.
    """
    values: dict[str, object] = {s.name: s.default for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    problems: list[ConfigError] = []
    file_entries = parse_file(file_text, problems=None if strict else problems)
    layers: Iterable[tuple[str, list[tuple[Setting, str, str]]]] = (
        ("file", file_entries),
        ("cmdline", parse_cmdline(cmdline)),
    )
    for origin, entries in layers:
        for setting, key, value in entries:
            try:
                values[setting.name] = _parse_one(setting, key, value)
            except ConfigError as exc:
                if strict:
                    raise
                problems.append(exc)
                continue
            sources[setting.name] = origin
    return Config(values, sources, problems)


def render_file(values: Mapping[str, str]) -> str:
    """The baked config the image builder writes; rejects keys the init would."""
    lines = ["# generated by guestinit-build; keys as in `python -m guestinit --help-config`"]
    for key in sorted(values):
        setting = BY_NAME.get(key)
        if setting is None:
            raise ConfigError(key, values[key], "unknown key")
        _parse_one(setting, key, values[key])
        lines.append(f"{key}={values[key]}")
    return "\n".join(lines) + "\n"


def show_default(setting: Setting) -> str:
    """A default written the way a user would type it on the cmdline."""
    value = setting.default
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, LogLevel):
        return value.name.lower()
    if isinstance(value, tuple):
        sep = " " if setting.parse is parse_words else ","
        return sep.join(value) or '""'
    if setting.parse is parse_mode_octal and isinstance(value, int):
        return f"{value:04o}"
    if isinstance(value, float) and value.is_integer():
        return f"{int(value)}s"
    if isinstance(value, float):
        return f"{value}s"
    return str(value) or '""'


def describe() -> str:
    rows = []
    for s in SETTINGS:
        alias = f" (alias: {', '.join(NVRC_PREFIX + a for a in s.aliases)})" if s.aliases else ""
        rows.append(f"  {PREFIX}{s.name}={show_default(s)}\n      {s.doc}{alias}")
    return ("guestinit settings: kernel cmdline guestinit.KEY=VALUE, or KEY=VALUE lines in "
            "/etc/guestinit.conf\n(the cmdline wins); shown with their defaults:\n"
            + "\n".join(rows))
