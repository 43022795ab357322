"""Our own module loader (the guest has no modprobe): plan from modules.dep, load with finit_module.

The index is ``<root>/lib/modules/<release>/modules.dep`` (+ ``modules.softdep``),
written by the image builder; if it is missing it is generated at run time from
each ``.ko``'s ``.modinfo`` (``guestinit.modinfo``, pyelftools, imported only then).

Loading goes in dependency waves: a wave's modules need nothing from each other and,
with more than one CPU, load concurrently (one thread each; finit_module releases the
GIL), each timed as a span ``module:<name>``. Most of what we load is chains (nvidia ->
nvidia_uvm), so a wave is often one module, loaded on the calling thread.
"""

from __future__ import annotations

import errno
import os

from guestinit.config import split_cmdline
from guestinit.stages import BootError, Stage
from guestinit.sysfs import read_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from guestinit.boot import Boot

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
FIRMWARE_PARAM = "sys/module/firmware_class/parameters/path"

class ModuleError(ValueError):
    """A module that cannot be planned or loaded; the message names it and why."""


def normalize(name: str) -> str:
    base = os.path.basename(name)
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


class ModuleIndex:
    """name -> path (relative to the release dir), dependencies, soft pre/post dependencies."""

    __slots__ = ("aliases", "base", "deps", "paths", "post", "pre", "source")

    def __init__(self, base: str, source: str = "modules.dep") -> None:
        self.base = base
        self.source = source
        self.paths: dict[str, str] = {}
        self.deps: dict[str, list[str]] = {}
        self.pre: dict[str, list[str]] = {}
        self.post: dict[str, list[str]] = {}
        self.aliases: dict[str, list[str]] = {}  # plain (non-glob) alias -> modules

    def path(self, name: str) -> str:
        return os.path.join(self.base, self.paths[name])


def parse_modules_dep(text: str, base: str = "", source: str = "modules.dep") -> ModuleIndex:
    """``path: dep dep`` lines (depmod format) -> an index; bad lines name their number."""
    index = ModuleIndex(base, source)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, deps = line.partition(":")
        if not sep or not path.strip():
            raise ModuleError(f"{source}:{lineno}: expected 'path: dependencies', got {line!r}")
        name = normalize(path.strip())
        index.paths[name] = path.strip()
        index.deps[name] = [normalize(d) for d in deps.split()]
    return index


def parse_softdeps(text: str, index: ModuleIndex) -> None:
    """``softdep NAME pre: A B post: C`` lines (modules.softdep / modprobe.d format)."""
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        name, bucket = normalize(words[1]), None
        for word in words[2:]:
            if word in ("pre:", "post:"):
                bucket = index.pre if word == "pre:" else index.post
            elif bucket is not None:
                bucket.setdefault(name, []).append(normalize(word))


def parse_aliases(text: str, index: ModuleIndex) -> None:
    """``alias NAME MODULE`` lines; only plain names (softdeps name ``crc32c``, not a
    module): device globs are udev's business, and nothing here loads by device."""
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias" and not any(c in words[1] for c in "*?["):
            index.aliases.setdefault(normalize(words[1]), []).append(normalize(words[2]))


def load_index(release_dir: str, kernel_release: str) -> ModuleIndex:
    """The index from modules.dep, or generated from .modinfo when the builder left none."""
    dep_path = os.path.join(release_dir, "modules.dep")
    dep = read_text(dep_path)
    soft = read_text(os.path.join(release_dir, "modules.softdep"))
    source = dep_path
    if dep is None:
        if not os.path.isdir(release_dir):
            raise ModuleError(f"no module tree at {release_dir} for kernel {kernel_release} "
                              "(does the image carry this kernel's modules?)")
        from guestinit import modinfo

        try:
            texts = modinfo.generate(release_dir, kernel_release)
        except (modinfo.ModinfoError, OSError) as exc:
            raise ModuleError(f"{dep_path} is missing and generating it failed: {exc}") from None
        dep, soft = texts["modules.dep"], texts["modules.softdep"]
        source = f"{dep_path} (generated from .modinfo)"
    index = parse_modules_dep(dep, release_dir, source)
    if soft:
        parse_softdeps(soft, index)
    aliases = read_text(os.path.join(release_dir, "modules.alias"))
    if aliases:
        parse_aliases(aliases, index)
    return index


class LoadStep:
    __slots__ = ("after", "already", "name", "params", "path", "why")

    def __init__(self, name: str, path: str, params: str, already: bool, why: str,
                 after: Iterable[str] = ()) -> None:
        self.name = name
        self.path = path
        self.params = params
        self.already = already
        self.why = why
        self.after = set(after)  # modules of the plan that must be in before this one

    def __repr__(self) -> str:
        return f"LoadStep({self.name!r}, already={self.already}, why={self.why!r})"


def plan_load(
    wanted: Iterable[str],
    index: ModuleIndex,
    loaded: Iterable[str] = (),
    params: Mapping[str, Sequence[str]] | None = None,
) -> list[LoadStep]:
    """Every module to load, each after its dependencies and soft ``pre:`` modules.

    A missing requested module or hard dependency is an error naming who needs it;
    a missing soft dependency is skipped (modprobe does the same); a cycle is an
    error naming the chain. Modules in ``loaded`` (``/sys/module``) are kept in the
    plan, marked ``already``, so the report shows them.
    """
    present = {normalize(n) for n in loaded}
    params = params or {}
    steps: list[LoadStep] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    chain: list[str] = []

    by_name: dict[str, LoadStep] = {}
    resolved: dict[str, str | None] = {}  # name or alias -> the module it loaded as

    def visit(name: str, why: str, soft: bool = False) -> str | None:
        mark = state.get(name)
        if mark == 2:
            return resolved.get(name)
        if mark == 1:
            cycle = " -> ".join([*chain[chain.index(name):], name])
            raise ModuleError(f"module {name}: dependency cycle {cycle} in {index.source}")
        if name not in index.paths and name not in present:
            # an alias (softdep "crc32c"): the first module carrying it, as the kernel
            # would have asked modprobe for it (there is no modprobe to ask)
            target = next((m for m in index.aliases.get(name, ()) if m in index.paths), None)
            if target is not None:
                resolved[name] = visit(target, f"{why} (alias {name})", soft)
                state[name] = 2
                return resolved[name]
        if name not in index.paths:
            if name in present or soft:
                state[name] = 2
                resolved[name] = None
                if name in present:
                    steps.append(LoadStep(name, "", "", True, why))
                return None
            raise ModuleError(f"module {name} ({why}): not in {index.source} "
                              "(is it in the image's module tree?)")
        state[name] = 1
        chain.append(name)
        after = [visit(dep, f"soft dependency of {name}", soft=True)
                 for dep in index.pre.get(name, [])]
        after += [visit(dep, f"needed by {name}") for dep in index.deps[name]]
        chain.pop()
        state[name] = 2
        resolved[name] = name
        step = LoadStep(name, index.path(name), " ".join(params.get(name, ())),
                        name in present, why, (a for a in after if a is not None))
        steps.append(step)
        by_name[name] = step
        for dep in index.post.get(name, []):
            post = visit(dep, f"soft post-dependency of {name}", soft=True)
            if post is not None and post in by_name and by_name[post] is not step \
                    and steps.index(by_name[post]) > steps.index(step):
                by_name[post].after.add(name)
        return name

    for name in wanted:
        visit(normalize(name), "requested")
    return steps


def parse_params(words: Iterable[str]) -> dict[str, list[str]]:
    """``module.param=value`` words -> module -> ["param=value", ...]."""
    out: dict[str, list[str]] = {}
    for word in words:
        key, sep, _ = word.partition("=")
        module, dot, param = key.partition(".")
        if not sep or not dot or not module or not param:
            raise ModuleError(f"module parameter {word!r}: expected module.param=value "
                              "(e.g. nvidia.NVreg_EnableGpuFirmware=1)")
        out.setdefault(normalize(module), []).append(word[len(module) + 1:])
    return out


def cmdline_params(cmdline: str, modules: Iterable[str]) -> list[str]:
    """``module.param=value`` cmdline words for ``modules`` (modprobe honours them too)."""
    names = {normalize(m) for m in modules}
    return [f"{k}={v}" for k, v in split_cmdline(cmdline)
            if "." in k and normalize(k.partition(".")[0]) in names]


def loaded_modules(root: str) -> set[str]:
    """Modules the kernel has (loaded or built in with parameters): ``/sys/module``."""
    try:
        return set(os.listdir(os.path.join(root, "sys", "module")))
    except FileNotFoundError:
        return set()


def _errno_name(exc: OSError) -> str:
    code = exc.errno or 0
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


_HINTS = {
    errno.ENOEXEC: "bad module format or vermagic",
    errno.EKEYREJECTED: "signature rejected (module signing enforced)",
    errno.EPERM: "module loading is disabled or not permitted",
    errno.ENOENT: "unknown symbol or missing firmware; see dmesg",
    errno.EINVAL: "invalid parameters or unknown symbols; see dmesg",
}


def waves(steps: Sequence[LoadStep]) -> list[list[LoadStep]]:
    """The plan in waves: every module of a wave has all it needs in earlier waves, so a
    wave's modules can load at the same time. Plan order is kept within a wave."""
    level: dict[str, int] = {}
    out: list[list[LoadStep]] = []
    for step in steps:
        n = 1 + max((level[a] for a in step.after if a in level), default=-1)
        level[step.name] = n
        while len(out) <= n:
            out.append([])
        out[n].append(step)
    return out


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return 1


def load_steps(boot: Boot, steps: Sequence[LoadStep], kernel_release: str,
               parallel: bool | None = None) -> list[str]:
    """Carry a plan out through ``boot.effects``, wave by wave, the modules of a wave
    concurrently (finit_module runs with the GIL released); each load is timed as
    ``module:<name>``. The names come back in plan order.

    ``parallel`` (default: more than one usable CPU): with one vCPU, the size a Kata
    guest boots with, the kernel's load work cannot overlap, and a thread per module
    only adds its start-up and the switches, so the plan loads in order on this thread.
    """
    from guestinit.boot import SideWork

    if parallel is None:
        parallel = usable_cpus() > 1
    done: dict[str, str] = {}
    for wave in waves([s for s in steps if not s.already]):
        if len(wave) == 1 or not parallel:
            for step in wave:
                done[step.name] = _load_one(boot, step, kernel_release)
            continue
        work = [SideWork(f"load {s.name}", lambda s=s: _load_one(boot, s, kernel_release))  # type: ignore[misc]
                for s in wave]
        # every load of the wave ends before the first failure is raised
        outcomes: list[object] = []
        for step, side in zip(wave, work, strict=True):
            try:
                outcomes.append(side.join())
            except BootError as exc:
                outcomes.append(exc)
            except Exception as exc:  # a bug in a load thread fails the boot, named
                outcomes.append(BootError(Stage.MODULES, f"load {step.name}: {exc!r}"))
        for step, outcome in zip(wave, outcomes, strict=True):
            if isinstance(outcome, BootError):
                raise outcome
            done[step.name] = str(outcome)
    return [done.get(s.name, s.name) if not s.already else f"{s.name} (already loaded)"
            for s in steps]


def _load_one(boot: Boot, step: LoadStep, kernel_release: str) -> str:
    """Load one module; its name for the report (marked if already there)."""
    start = boot.timeline.now()
    try:
        boot.effects.finit_module(step.path, step.params)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return f"{step.name} (already loaded)"
        if exc.errno == errno.ENOEXEC:
            # vermagic is read only now, not before every load: the kernel checks it
            # itself, and reading each module (and importing mmap) first cost boot time
            from guestinit.modinfo import ModinfoError, check_vermagic

            try:
                check_vermagic(step.name, step.path, kernel_release)
            except ModinfoError as why:
                raise BootError(Stage.MODULES, str(why)) from None
            except OSError as why:
                raise BootError(Stage.MODULES, f"read module {step.name} ({step.path}): "
                                f"{why.strerror or why}") from None
        hint = _HINTS.get(exc.errno or 0, "see dmesg")
        raise BootError(Stage.MODULES, f"finit_module {step.name}: {_errno_name(exc)}: "
                        f"{hint} ({step.path}"
                        + (f", params {step.params!r})" if step.params else ")")) from None
    boot.timeline.add(f"module:{step.name}", start, boot.timeline.now())
    boot.kmsg.log(7, f"modules: loaded {step.name} ({step.why})"
                  + (f" {step.params}" if step.params else ""))
    return step.name


def set_firmware_path(boot: Boot, path: str) -> None:
    param = boot.path(FIRMWARE_PARAM)
    if not path:
        return
    if not os.path.exists(param):
        boot.kmsg.log(6, f"modules: {param} missing; firmware search path left as is")
        return
    try:
        boot.effects.write(param, path)
    except OSError as exc:
        raise BootError(Stage.MODULES,
                        f"set firmware search path {path}: {exc.strerror or exc}") from None


def load_modules(boot: Boot, wanted: Sequence[str], extra_params: Sequence[str] = (),
                 kernel_release: str | None = None) -> list[str]:
    """Plan and load ``wanted`` (and their dependencies); the names, already-loaded marked."""
    if not wanted:
        return []
    release = kernel_release or os.uname().release
    present = loaded_modules(boot.root)
    if all(normalize(n) in present for n in wanted):
        # loaded or built in: no module tree needed (a kernel with these drivers =y)
        return [f"{normalize(n)} (already loaded)" for n in wanted]
    try:
        index = load_index(boot.path("lib", "modules", release), release)
        configured = boot.cfg.words("module.params") if boot.cfg is not None else ()
        words = [*extra_params, *configured,
                 *cmdline_params(boot.cmdline, index.paths)]
        steps = plan_load(wanted, index, present, parse_params(words))
    except ModuleError as exc:
        raise BootError(Stage.MODULES, str(exc)) from None
    return load_steps(boot, steps, release)


def load_early(boot: Boot, names: Sequence[str], kernel_release: str | None = None) -> list[str]:
    """The early modules alone (the failure path uses it to get the report channel up)."""
    return load_modules(boot, [normalize(n) for n in names], kernel_release=kernel_release)


def run_modules(boot: Boot, accel: Sequence[str] = (), accel_params: Sequence[str] = (),
                kernel_release: str | None = None) -> None:
    """Early modules (``modules``), then ``accel``, what the inventory needs (the caller's
    policy: ``nvidia.modules.plan``), with the parameters it chose (``accel_params``)."""
    cfg = boot.config()
    early = [normalize(m) for m in cfg.words("modules")]
    names = load_modules(boot, early, kernel_release=kernel_release)
    if accel:
        set_firmware_path(boot, cfg.str("firmware.path"))
        names += [n for n in load_modules(boot, accel, accel_params, kernel_release)
                  if n not in names]
    boot.facts.modules = names
