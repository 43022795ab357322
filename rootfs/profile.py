"""Profiles (``rootfs/profiles/*.toml``) and their lock file.

A profile is a small TOML file; ``extends = "cpu"`` starts from another profile
(top-level keys replace, the ``kernel``, ``config`` and ``users`` tables merge key
by key). Unknown keys, wrong types and bad values are errors naming the key.
"""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from guestinit import config as guest_config
from guestinit import settings_doc

E = TypeVar("E", bound=enum.StrEnum)
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
# package data, so an installed guestinit-build finds it; ./kernel-config links here
KCONFIG_DIR = Path(__file__).resolve().parent / "kernel-config"


class ProfileError(ValueError):
    """A profile or lock file is invalid; the message names the file and the key."""


class Init(enum.StrEnum):
    GUESTINIT = "guestinit"
    BUSYBOX = "busybox"
    SYSTEMD = "systemd"


class Format(enum.StrEnum):
    INITRAMFS = "initramfs"
    EROFS = "erofs"
    KATA = "kata"  # Kata's disk: msdos label, p1 erofs, p2 verity (rootfs/kata.py)
    KATA_INITRD = "kata-initrd"  # Kata's initrd = (kernel + initramfs, no verity)


class Driver(enum.StrEnum):
    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True)
class Kernel:
    package: str = "linux-image-amd64"
    build: bool = False  # True: package is a linux-source-* built with the fragments
    fragments: tuple[str, ...] = ("base.conf",)
    modules: tuple[str, ...] = ()
    early: tuple[str, ...] = ()
    cmdline: tuple[str, ...] = ("console=ttyS0",)
    cmdline_presets: tuple[str, ...] = ()
    # words the init needs on a Kata cmdline: appended to the drop-in's kernel_params
    kata_params: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    description: str
    init: Init
    formats: tuple[Format, ...]
    shell: bool
    standins: bool  # ship guestinit.testing (agent stand-in, fake NVIDIA programs)
    # /usr/bin/python3.11 is one executable with CPython and guestinit frozen in, and /sbin/init
    # links to it (rootfs/staticinit.py); false: the launcher + Debian's python3.11
    static_init: bool
    driver: Driver
    lock: Path
    debs: tuple[str, ...]
    wheels: tuple[str, ...]
    binaries: tuple[str, ...]
    driver_files: tuple[str, ...]
    kernel: Kernel
    users: dict[str, int] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)

    def fragment_paths(self) -> list[Path]:
        return [KCONFIG_DIR / f for f in self.kernel.fragments]

    def cmdline(self) -> list[str]:
        """The profile's cmdline words followed by the presets' (comments stripped)."""
        words = list(self.kernel.cmdline)
        for preset in self.kernel.cmdline_presets:
            words.extend(read_cmdline_preset(KCONFIG_DIR / "cmdline" / preset))
        return list(dict.fromkeys(words))  # first occurrence wins, order kept


TOP_KEYS = {"description", "extends", "init", "formats", "shell", "standins", "static_init",
            "driver",
            "driver_files",
            "lock", "debs", "wheels", "binaries", "kernel", "users", "config"}
KERNEL_KEYS = {"package", "build", "fragments", "modules", "early", "cmdline", "cmdline_presets",
               "kata_params"}


def read_cmdline_preset(path: Path) -> list[str]:
    """Words of a cmdline preset: one or more options per line, ``#`` starts a comment."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"cmdline preset {path}: {exc.strerror}") from None
    words: list[str] = []
    for line in text.splitlines():
        words.extend(line.split("#", 1)[0].split())
    return words


def _str(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{where}: key {key}: expected a non-empty string, got {value!r}")
    return value


def _strs(where: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ProfileError(f"{where}: key {key}: expected a list of non-empty strings, "
                           f"got {value!r}")
    return tuple(value)


def _enum(where: str, key: str, value: Any, cls: type[E]) -> E:
    try:
        return cls(value)
    except ValueError:
        names = ", ".join(m.value for m in cls)
        raise ProfileError(f"{where}: key {key}: {value!r} is not one of {names}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))
        raise ProfileError(f"profile {path}: no such file (profiles: {known})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {path}: not valid TOML: {exc}") from None


def _raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    data = _read_toml(path)
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ProfileError(f"profile {path}: unknown key {unknown[0]} "
                           f"(known: {', '.join(sorted(TOP_KEYS))})")
    for table in ("kernel", "users", "config"):
        if table in data and not isinstance(data[table], dict):
            raise ProfileError(f"profile {path}: key {table}: expected a table")
    if "kernel" in data:
        bad = sorted(set(data["kernel"]) - KERNEL_KEYS)
        if bad:
            raise ProfileError(f"profile {path}: unknown key kernel.{bad[0]} "
                               f"(known: {', '.join(sorted(KERNEL_KEYS))})")
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    parent_path = path.with_name(f"{_str(str(path), 'extends', parent_name)}.toml")
    if parent_path in seen:
        raise ProfileError(f"profile {path}: key extends: cycle through {parent_name}")
    merged = _raw(parent_path, (*seen, path))
    for key, value in data.items():
        if key in ("kernel", "users", "config"):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def resolve_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml":
        return candidate
    return PROFILES_DIR / f"{name_or_path}.toml"


def load(name_or_path: str) -> Profile:
    """Parse and check a profile by name (``cpu``) or path (``x/y.toml``)."""
    path = resolve_path(name_or_path)
    where = f"profile {path}"
    data = _raw(path)
    k = data.get("kernel", {})
    build = k.get("build", False)
    if not isinstance(build, bool):
        raise ProfileError(f"{where}: key kernel.build: expected true or false, got {build!r}")
    kernel = Kernel(
        package=_str(where, "kernel.package", k.get("package", Kernel.package)),
        build=build,
        fragments=_strs(where, "kernel.fragments", list(k.get("fragments", Kernel.fragments))),
        modules=_strs(where, "kernel.modules", k.get("modules", [])),
        early=_strs(where, "kernel.early", k.get("early", [])),
        cmdline=_strs(where, "kernel.cmdline", list(k.get("cmdline", Kernel.cmdline))),
        cmdline_presets=_strs(where, "kernel.cmdline_presets", k.get("cmdline_presets", [])),
        kata_params=_strs(where, "kernel.kata_params", k.get("kata_params", [])),
    )
    source = kernel.package.startswith("linux-source-")
    if kernel.build != source:
        raise ProfileError(f"{where}: key kernel.package: {kernel.package!r} "
                           + ("is not a linux-source-* package; a built kernel "
                              "(kernel.build = true) needs one, e.g. linux-source-6.1"
                              if kernel.build else
                              "is a source package: set kernel.build = true to build it"))
    for frag in kernel.fragments:
        if not (KCONFIG_DIR / frag).is_file():
            raise ProfileError(f"{where}: key kernel.fragments: {KCONFIG_DIR / frag} "
                               "does not exist")
    for preset in kernel.cmdline_presets:
        if not (KCONFIG_DIR / "cmdline" / preset).is_file():
            raise ProfileError(f"{where}: key kernel.cmdline_presets: "
                               f"{KCONFIG_DIR / 'cmdline' / preset} does not exist")
    users = data.get("users", {})
    for user, uid in users.items():
        if not isinstance(uid, int) or isinstance(uid, bool) or not 0 < uid < 65534:
            raise ProfileError(f"{where}: key users.{user}: expected a uid 1..65533, got {uid!r}")
    for key, v in data.get("config", {}).items():
        if isinstance(v, dict | list):
            raise ProfileError(f"{where}: key config.{key}: expected a string, number or "
                               f"boolean (quote dotted keys: \"{key}.x\" = ...)")
    cfg = {key: str(v).lower() if isinstance(v, bool) else str(v)
           for key, v in data.get("config", {}).items()}
    try:
        settings_doc.render_file(cfg)
    except guest_config.ConfigError as exc:
        raise ProfileError(f"{where}: key config.{exc.key}: {exc}") from None
    formats = tuple(_enum(where, "formats", f, Format)
                    for f in _strs(where, "formats", data.get("formats", ["initramfs"])))
    shell = data.get("shell", False)
    if not isinstance(shell, bool):
        raise ProfileError(f"{where}: key shell: expected true or false, got {shell!r}")
    standins = data.get("standins", False)
    if not isinstance(standins, bool):
        raise ProfileError(f"{where}: key standins: expected true or false, got {standins!r}")
    static_init = data.get("static_init", False)
    if not isinstance(static_init, bool):
        raise ProfileError(f"{where}: key static_init: expected true or false, "
                           f"got {static_init!r}")
    if static_init and data.get("init", "guestinit") != "guestinit":
        raise ProfileError(f"{where}: key static_init: only for init = \"guestinit\"")
    lock_name = _str(where, "lock", data.get("lock", "debian.lock"))
    return Profile(
        name=path.stem,
        path=path,
        description=_str(where, "description", data.get("description", path.stem)),
        init=_enum(where, "init", data.get("init", "guestinit"), Init),
        formats=formats,
        shell=shell,
        standins=standins,
        static_init=static_init,
        driver=_enum(where, "driver", data.get("driver", "none"), Driver),
        lock=path.with_name(lock_name),
        debs=_strs(where, "debs", data.get("debs", [])),
        wheels=_strs(where, "wheels", data.get("wheels", [])),
        binaries=_strs(where, "binaries", data.get("binaries", [])),
        driver_files=_strs(where, "driver_files", data.get("driver_files", [])),
        kernel=kernel,
        users=dict(users),
        config=cfg,
    )
