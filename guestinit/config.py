"""Configuration: baked ``/etc/guestinit.conf`` overlaid by the kernel cmdline.

One declarative table (``SETTINGS``) drives parsing, defaults, NVRC aliases and
the docs (``python -m guestinit --help-config``). Parsers are pure: they return
values or raise ``ConfigError`` naming the key and the value; they never touch
/proc or /sys.
"""

from __future__ import annotations

# Config's accessors are named after the builtins; annotations inside the class use these.
from builtins import bool as _Bool
from builtins import float as _Float
from builtins import int as _Int
from builtins import str as _Str

from guestinit.values import (
    MODE_ALIASES,
    NVRC_PREFIX,
    PREFIX,
    READY_NONE,
    Condition,
    ConfigError,
    LogLevel,
    Mode,
    Restart,
    _enum,
    cmdline_words,
    parse_bar_target,
    parse_bool,
    parse_clock,
    parse_env,
    parse_fm_mode,
    parse_int,
    parse_list,
    parse_log,
    parse_mode,
    parse_mode_octal,
    parse_partitions_listen,
    parse_port,
    parse_rail_policy,
    parse_ready,
    parse_report,
    parse_seconds,
    parse_size_text,
    parse_srs,
    parse_uint,
    parse_watts,
    parse_words,
    split_cmdline,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = ["MODE_ALIASES", "NVRC_PREFIX", "PREFIX", "SETTINGS", "Config", "ConfigError",
           "LogLevel", "Mode", "Restart", "Setting", "build", "cmdline_words", "parse_bool",
           "parse_list", "parse_seconds", "parse_words", "split_cmdline"]

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
    Setting("log", parse_log, LogLevel.INFO,
            "kmsg log level: off/error/warn/info/debug (NVRC's trace: debug; empty: off)",
            ("log",)),
    Setting("report", parse_report, "vsock:2:1040",
            "where frames go: vsock:CID:PORT, virtio-port:NAME, unix:PATH, console"),
    Setting("mode", parse_mode, Mode.AUTO,
            "auto (from the PCI inventory), cpu, gpu, nvl4, nvl5 (service VMs; NVRC's "
            "nvswitch-nvl4/nvswitch-nvl5 too)", ("mode",)),
    Setting("hostname", str, "localhost", "hostname set in the early stage"),
    Setting("agent", parse_words, ("/usr/bin/kata-agent",),
            "agent command line (space separated); none: start no agent"),
    Setting("agent.ready", parse_ready, READY_NONE,
            "when the agent is ready: none (when spawned), syslog:TEXT (a line with TEXT on "
            "syslog), unix:PATH (a socket at PATH accepts connections), vsock:PORT (a vsock "
            "socket listens on PORT; kata-agent: vsock:1024; needs the kernel's vsock_diag)"),
    Setting("agent.ready_timeout", parse_seconds, 30.0,
            "seconds the agent may take to meet agent.ready; then the boot fails"),
    Setting("agent.restart", _enum(Restart), Restart.NEVER, "agent restart policy"),
    Setting("agent.shutdown_on_exit", parse_bool, True,
            "power off when the agent stops for good"),
    Setting("agent.init_mode", parse_bool, True,
            "run the agent as PID 1 of its own PID and mount namespace, so that kata-agent "
            "takes its init mode (getpid() == 1) while guestinit stays PID 1 of the VM"),
    Setting("agent.env", parse_env, (),
            "extra agent environment, NAME=VALUE,... (GPU mode adds "
            "KATA_ATTESTER_VARIANT=nvidia, as NVRC does)"),
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
    Setting("hotplug", parse_bool, False, "after ready, serve GPUs hot-added and hot-removed "
            "(PCI uevents through pyudev; needs the pyudev wheel and libudev1 in the image)"),
    Setting("hotplug.timeout", parse_seconds, 10.0,
            "seconds a hot-added GPU's driver may take to register it before it is refused"),
    Setting("modules", parse_list, (), "extra kernel modules loaded early (names)"),
    Setting("daemon.timeout", parse_seconds, 0.0,
            "seconds every daemon may take to become ready, unless it has its own "
            "*.timeout; 0: each daemon's default"),
    Setting("persistenced.timeout", parse_seconds, 600.0,
            "seconds nvidia-persistenced may take to say it is ready (NVRC's 600 s: 4-8 "
            "H200/B200 under TDX)"),
    Setting("fabricmanager.timeout", parse_seconds, 300.0,
            "seconds nv-fabricmanager may take to configure the NVSwitches"),
    Setting("nvlsm.timeout", parse_seconds, 300.0, "seconds nvlsm may take to bring the "
            "NVLink subnet up"),
    Setting("hostengine.timeout", parse_seconds, 60.0,
            "seconds nv-hostengine may take to listen on its port (5555)"),
    Setting("exporter.timeout", parse_seconds, 60.0,
            "seconds dcgm-exporter may take to listen on its port (9400)"),
    Setting("hostengine.port", parse_port, 5555, "nv-hostengine's TCP port (-p)"),
    Setting("exporter.port", parse_port, 9400, "dcgm-exporter's metrics port (-a :PORT)"),
    Setting("uvm.persistence", parse_bool, True,
            "run nvidia-persistenced with --uvm-persistence-mode",
            ("uvm.persistence.mode",)),
    Setting("uvm.tools", parse_bool, False,
            "create /dev/nvidia-uvm-tools (profiling/debugging; NVRC's default: off)",
            ("uvm.tools",)),
    Setting("smi.lgc", parse_clock, "", "nvidia-smi --lock-gpu-clocks (MHz or MIN,MAX)",
            ("smi.lgc",)),
    Setting("smi.lmc", parse_clock, "", "nvidia-smi --lock-memory-clocks (MHz or MIN,MAX)",
            ("smi.lmc",)),
    Setting("smi.pl", parse_watts, "", "nvidia-smi --power-limit (watts)", ("smi.pl",)),
    Setting("smi.srs", parse_srs, "",
            "nvidia-smi conf-compute --set-ready-state: enabled/1 or disabled/0",
            ("smi.srs",)),
    Setting("dcgm", parse_bool, False, "run nv-hostengine and dcgm-exporter", ("dcgm",)),
    Setting("fabricmanager.mode", parse_fm_mode, "auto",
            "FABRIC_MODE for nv-fabricmanager: auto (1 in a service VM, 0 beside GPUs), 0-2",
            ("fm.mode",)),
    Setting("fabricmanager.rail_policy", parse_rail_policy, "auto",
            "PARTITION_RAIL_POLICY: auto (symmetric on NVL5, greedy on NVL4), greedy, "
            "symmetric", ("fm.rail.policy", "fm.rail")),
    Setting("imex.channels", parse_uint, 0,
            "IMEX channel nodes to create and describe in nvidia-imex.json (0-N, at most the "
            "driver's ImexChannelCount; the driver creates none itself)"),
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
    Setting("partitions.listen", parse_partitions_listen, "vsock:1050",
            "service VM: where the NVLink partition service answers the host (vsock:PORT, "
            "host CID only; virtio-port:NAME; unix:PATH) or off"),
    Setting("partitions.timeout", parse_seconds, 30.0,
            "seconds the partition service may take to say it is ready"),
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



class Config:
    """Typed values (``cfg.int("restart.max")``, ``cfg.mode()``); immutable once built."""

    __slots__ = ("_values", "ignored", "problems", "sources")

    def __init__(self, values: Mapping[str, object], sources: Mapping[str, str],
                 problems: Iterable[ConfigError] = (), ignored: Iterable[str] = ()) -> None:
        self._values = dict(values)
        self.sources = dict(sources)  # key -> "default" / "file" / "cmdline"
        self.problems = list(problems)  # the entries a lenient build skipped, in order
        self.ignored = list(ignored)  # cmdline words under our prefixes that set nothing

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

    def mode(self) -> Mode:
        value = self._values["mode"]
        assert isinstance(value, Mode)
        return value

    def log_level(self) -> LogLevel:
        value = self._values["log"]
        assert isinstance(value, LogLevel)
        return value

    def restart(self, key: _Str) -> Restart:
        value = self._values[key]
        assert isinstance(value, Restart)
        return value

    def ready(self, key: _Str) -> Condition:
        value = self._values[key]
        assert isinstance(value, Condition)
        return value

    def as_dict(self) -> dict[_Str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._values.items()}


def _lookup(key: str) -> Setting | None:
    if key.startswith(PREFIX):
        return BY_NAME.get(key[len(PREFIX):])
    if key.startswith(NVRC_PREFIX):
        return BY_ALIAS.get(key[len(NVRC_PREFIX):])
    return None


def parse_value(setting: Setting, key: str, value: str) -> object:
    """``setting``'s value from ``value``; ConfigError names the key and the value."""
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


def parse_cmdline(cmdline: str, unknown: list[str] | None = None
                  ) -> list[tuple[Setting, str, str]]:
    """Our keys from the cmdline.

    Unknown ``guestinit.*``/``nvrc.*`` keys, and bare ``nvrc.*`` words (NVRC reads only
    ``key=value``), are skipped; with ``unknown`` they are listed there, as typed.
    """
    out = []
    for text in cmdline_words(cmdline):
        key, sep, value = text.partition("=")
        if not key.startswith((PREFIX, NVRC_PREFIX)):
            continue
        setting = _lookup(key)
        if setting is None or (not sep and key.startswith(NVRC_PREFIX)):
            if unknown is not None:
                unknown.append(text)
            continue
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
    ignored: list[str] = []
    file_entries = parse_file(file_text, problems=None if strict else problems)
    layers: Iterable[tuple[str, list[tuple[Setting, str, str]]]] = (
        ("file", file_entries),
        ("cmdline", parse_cmdline(cmdline, ignored)),
    )
    for origin, entries in layers:
        for setting, key, value in entries:
            try:
                values[setting.name] = parse_value(setting, key, value)
            except ConfigError as exc:
                if strict:
                    raise
                problems.append(exc)
                continue
            sources[setting.name] = origin
    if sources["log"] != "cmdline" and "quiet" in cmdline_words(cmdline):
        # the kernel's "quiet" (Kata's runtime always passes it) quiets us too, as NVRC
        # stays quiet unless nvrc.log asks: warnings and errors only
        level = values["log"]
        assert isinstance(level, LogLevel)
        values["log"] = min(level, LogLevel.WARN)
        sources["log"] = "quiet"
    return Config(values, sources, problems, ignored)
