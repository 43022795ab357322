"""Guest kernels built from Debian's ``linux-source`` package and ``kernel-config/`` fragments.

The recipe: ``make allnoconfig``, then ``scripts/kconfig/merge_config.sh -m`` layers the
fragments in order (a later fragment wins), then ``make olddefconfig`` resolves the
dependencies. Kconfig drops an option whose dependencies are unmet without a word, so
the final ``.config`` is held against every fragment (``rootfs.kconfig.check``): a
required option that did not land fails the build, naming the option and what it
depends on; an advisory one is reported.

Builds are cached in ``~/.cache/guestinit/kernels/<key>/`` where the key hashes the
source package (name, version, sha256), the recipe and every fragment's bytes: a
second build with the same inputs only reads ``build.json``. The entry is laid out
like an unpacked ``linux-image`` package (``boot/vmlinuz-R``, ``boot/config-R``,
``lib/modules/R/``) plus ``boot/vmlinux-R``, the uncompressed ELF a VMM can enter at
its PVH entry point. Builds are reproducible: the timestamp, user and host that
Kbuild bakes into the image come from the lock file's ``SOURCE_DATE_EPOCH``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rootfs import fetch, kconfig, kernel, proc
from rootfs.steps import BuildError, Progress, run

RECIPE = 1  # bump when the recipe below changes: it is part of every cache key
BASE_TARGET = "allnoconfig"
LOCALVERSION = "-guestinit"
PROGRESS_EVERY = 15.0  # seconds between "compiled N files" lines
_COMPILED = re.compile(rb"^\s+(CC|AS)\s")
_SYMBOL = re.compile(r"^(?:menu)?config\s+([A-Za-z0-9_]+)\s*$")


def kernels_dir() -> Path:
    return fetch.cache_dir() / "kernels"


def cache_key(source: fetch.Pin, fragments: Sequence[Path]) -> str:
    digest = hashlib.sha256(f"{RECIPE}\0{BASE_TARGET}\0{LOCALVERSION}\0{source.name}\0"
                            f"{source.version}\0{source.sha256}\0".encode())
    for frag in fragments:
        try:
            digest.update(frag.name.encode() + b"\0" + frag.read_bytes() + b"\0")
        except OSError as exc:
            raise BuildError(f"kernel fragment {frag}: {exc.strerror}") from None
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Built:
    tree: kernel.KernelTree
    key: str
    cached: bool
    seconds: float  # this call's time: the whole build, or the cache lookup
    build_seconds: float  # what the cold build took (recorded in build.json)
    results: list[kconfig.Result]

    @property
    def vmlinux(self) -> Path:
        return self.tree.root / "boot" / f"vmlinux-{self.tree.release}"


# -- the source tree and Kconfig's own tools ----------------------------------------------

def unpack_source(deb: Path, package: str, progress: Progress) -> Path:
    """The source tree inside ``deb`` (``usr/src/PACKAGE.tar.xz``), unpacked once."""
    target = kernels_dir() / f"src-{deb.name.removesuffix('.deb')}"
    if (target / "Makefile").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".src-"))
    member = f"./usr/src/{package}.tar.xz"
    progress.note(f"unpacking {deb.name} ({deb.stat().st_size / 2**20:.0f} MiB)")
    try:
        script = ('set -o pipefail; dpkg-deb --fsys-tarfile "$1" | tar -xO "$2" '
                  '| tar -xJ --strip-components=1 -C "$3"')
        try:
            run(["bash", "-c", script, "unpack", deb, member, tmp],
                what=f"unpack {member} from {deb.name}")
        except BuildError as exc:
            raise BuildError(f"{exc}; is {deb.name} a linux-source package? "
                             "(kernel.package in the profile)") from None
        if not (tmp / "scripts" / "kconfig" / "merge_config.sh").is_file():
            raise BuildError(f"{deb.name}: {member} holds no scripts/kconfig/merge_config.sh; "
                             "not a kernel source tree")
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Kconfig:
    """Runs Kconfig targets (allnoconfig, olddefconfig) on ``config``: through the kernel's
    Makefile for a kernel tree, or straight through a ``conf`` binary for any Kconfig
    tree (the tests' synthetic one)."""

    root: Path  # the tree whose top-level ``Kconfig`` is read
    work: Path  # where ``.config`` lives (the O= build directory)
    conf: Path | None = None  # None: ``make -C root O=work TARGET``
    env: tuple[tuple[str, str], ...] = ()

    @property
    def config(self) -> Path:
        return self.work / ".config"

    def target(self, name: str) -> None:
        env = {**os.environ, **dict(self.env)}
        if self.conf is None:
            argv: list[str | Path] = ["make", "-s", "-C", self.root, f"O={self.work}", name]
        else:
            env.update(srctree=str(self.root), KCONFIG_CONFIG=str(self.config))
            argv = [self.conf, f"--{name}", "Kconfig"]
        run(argv, cwd=self.root, env=env, what=f"kconfig {name}")


def merge(kc: Kconfig, merge_script: Path, fragments: Sequence[Path]) -> dict[str, str]:
    """allnoconfig, the fragments merged in order, olddefconfig: the final config."""
    kc.work.mkdir(parents=True, exist_ok=True)
    kc.target(BASE_TARGET)
    run([merge_script, "-m", "-O", kc.work, kc.config, *fragments], cwd=kc.work,
        what="merge_config.sh")
    kc.target("olddefconfig")
    return kconfig.read_config(kc.config)


def kconfig_symbols(root: Path, options: Sequence[str]) -> dict[str, list[str]]:
    """For each ``CONFIG_X`` defined in ``root``'s Kconfig files: the enclosing ``if``
    blocks of its file, its ``depends on`` and prompt-``if`` conditions (empty when it
    has none); undefined options are absent."""
    names = {o.removeprefix("CONFIG_") for o in options}
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("Kconfig*")):
        if not path.is_file():
            continue
        current: str | None = None
        ifs: list[str] = []
        help_indent: int | None = None  # inside a help text: its indentation
        for raw in path.read_text(errors="replace").splitlines():
            line = raw.strip()
            indent = len(raw.expandtabs()) - len(raw.expandtabs().lstrip())
            if help_indent is not None:
                if not line or help_indent < 0 or indent >= help_indent:
                    if line and help_indent < 0:
                        help_indent = indent  # the first line of the text sets it
                    continue  # prose, not syntax: "if there are ..." opens no block
                help_indent = None
            if line in ("help", "---help---"):
                help_indent = -1
                continue
            if m := _SYMBOL.match(line):
                current = m.group(1) if m.group(1) in names else None
                if current is not None:
                    found.setdefault(f"CONFIG_{current}", []).extend(ifs)
            elif line.startswith("if "):
                ifs.append(line.removeprefix("if ").strip())
                current = None
            elif line == "endif":
                ifs = ifs[:-1]
                current = None
            elif current is not None:
                if line.startswith("depends on "):
                    found[f"CONFIG_{current}"].append(line.removeprefix("depends on ").strip())
                elif re.match(r'^(bool|tristate|prompt)\s+".*"\s+if\s+', line):
                    found[f"CONFIG_{current}"].append(line.rsplit(" if ", 1)[1].strip())
                elif line.startswith(("endmenu", "menu ", "choice", "comment ", "source ")):
                    current = None
    return found


def explain(results: Sequence[kconfig.Result], root: Path, release: str) -> list[str]:
    """One line per option that did not land as requested, saying why Kconfig left it."""
    bad = [r for r in results if r.status in (kconfig.Status.MISSING, kconfig.Status.WRONG)]
    symbols = kconfig_symbols(root, [r.want.option for r in bad])
    lines = []
    for r in bad:
        where = f"{r.want.fragment}: {r.want.option}={r.want.value}"
        kind = "" if r.want.required else " (advisory)"
        if r.want.option not in symbols:
            lines.append(f"{where}{kind}: no such option in {release}; remove it or fix "
                         "its name")
            continue
        conds = symbols[r.want.option]
        deps = " && ".join(f"({d})" if "||" in d and len(conds) > 1 else d for d in conds)
        got = f"final value {r.found}" if r.found else "not set"
        if deps:
            lines.append(f"{where}{kind}: {got}; depends on {deps}: add the options it "
                         "needs to a fragment")
        else:
            lines.append(f"{where}{kind}: {got}; Kconfig forces it (a select or a choice): "
                         "set the option that controls it")
    return lines


def kconfig_tools(deb: Path, package: str, progress: Progress) -> tuple[Path, Path, Path]:
    """(source tree, merge_config.sh, a built ``conf``) for the tests' synthetic trees."""
    src = unpack_source(deb, package, progress)
    work = kernels_dir() / f"conf-{deb.name.removesuffix('.deb')}"
    conf = work / "scripts" / "kconfig" / "conf"
    if not conf.is_file():
        Kconfig(src, work).target(BASE_TARGET)
    return src, src / "scripts" / "kconfig" / "merge_config.sh", conf


# -- the build ---------------------------------------------------------------------------

def _make_env(epoch: int) -> tuple[tuple[str, str], ...]:
    return (("KBUILD_BUILD_TIMESTAMP", f"@{epoch}"), ("KBUILD_BUILD_USER", "guestinit"),
            ("KBUILD_BUILD_HOST", "guestinit"), ("KBUILD_BUILD_VERSION", "1"),
            ("LC_ALL", "C"))


def _expected_objects() -> int | None:
    """Files the last cold build compiled: the denominator of the progress line."""
    counts = []
    for meta in kernels_dir().glob("*/build.json"):
        try:
            counts.append(int(json.loads(meta.read_text())["compiled"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return max(counts) if counts else None


def _compile(argv: list[str | Path], env: dict[str, str], progress: Progress,
             clock: Callable[[], float] = time.monotonic) -> int:
    """Run make, one progress line every PROGRESS_EVERY s; the number of files compiled.

    A cold build runs for many minutes, so make's output is read as it comes (not
    captured to the end, as ``run`` does) to say how far it got.
    """
    expected = _expected_objects()
    started = last = clock()
    compiled, tail = 0, list[bytes]()

    def on_line(line: bytes) -> None:
        nonlocal compiled, tail, last
        tail = [*tail[-39:], line]
        if _COMPILED.match(line):
            compiled += 1
        if clock() - last >= PROGRESS_EVERY:
            last = clock()
            of = f"/~{expected}" if expected else ""
            progress.note(f"make: {compiled}{of} files compiled, {last - started:.0f} s")

    try:
        status = proc.stream(argv, on_line, env=env)
    except proc.NotFound:
        raise BuildError(f"kernel build: command {argv[0]} not found "
                         "(run ./build.sh setup to install the Debian packages)") from None
    if status != 0:
        text = b"".join(tail).decode("utf-8", "replace").rstrip()
        raise BuildError(f"kernel build: `{' '.join(map(str, argv))}` exited "
                         f"{status}:\n{text}")
    return compiled


def _load(entry: Path, fragments: Sequence[Path], started: float) -> Built:
    meta = json.loads((entry / "build.json").read_text())
    tree = kernel.open_tree(entry, f"kernel build {entry.name}")
    wants = [w for f in fragments for w in kconfig.read_fragment(f)]
    results = kconfig.check(kconfig.read_config(tree.config), wants)
    return Built(tree, entry.name, True, time.monotonic() - started,
                 float(meta["build_seconds"]), results)


def build(deb: Path, source: fetch.Pin, fragments: Sequence[Path], progress: Progress, *,
          epoch: int, jobs: int | None = None) -> Built:
    """The kernel for ``fragments`` from the source package ``deb`` (pinned as ``source``),
    from the cache when it holds one with the same key."""
    started = time.monotonic()
    key = cache_key(source, fragments)
    entry = kernels_dir() / key
    if (entry / "build.json").is_file():
        return _load(entry, fragments, started)
    wants = [w for f in fragments for w in kconfig.read_fragment(f)]
    src = unpack_source(deb, source.name, progress)
    work = kernels_dir() / f".build-{key}"
    shutil.rmtree(work, ignore_errors=True)
    env = _make_env(epoch)
    kc = Kconfig(src, work, env=env)
    local = work / "guestinit-release.conf"  # not localversion*: Kbuild appends those
    work.mkdir(parents=True)
    local.write_text(f'CONFIG_LOCALVERSION="{LOCALVERSION}"\n'
                     "# CONFIG_LOCALVERSION_AUTO is not set\n")
    progress.note(f"config: {BASE_TARGET} + {', '.join(f.name for f in fragments)}")
    final = merge(kc, src / "scripts" / "kconfig" / "merge_config.sh", [*fragments, local])
    results = kconfig.check(final, wants)
    why = explain(results, src, f"{source.name} {source.version}")
    for line in why:
        progress.note(f"dropped: {line}")
    failing = [r for r in results if r.fails]
    if failing:
        raise BuildError(f"kernel config: {len(failing)} required option(s) did not land in "
                         f"the final .config (Kconfig drops unmet dependencies):\n  "
                         + "\n  ".join(line for line in why if "(advisory)" not in line))
    make: list[str | Path] = ["make", "-C", src, f"O={work}", f"-j{jobs or os.cpu_count() or 1}"]
    compiled = _compile([*make, "bzImage", "vmlinux", "modules"], {**os.environ, **dict(env)},
                        progress)
    # written by the build itself: `make kernelrelease` before it lacks CONFIG_LOCALVERSION
    release = (work / "include" / "config" / "kernel.release").read_text().strip()
    tmp = Path(tempfile.mkdtemp(dir=kernels_dir(), prefix=f".entry-{key}-"))
    try:
        run([*make, "-s", f"INSTALL_MOD_PATH={tmp}", "INSTALL_MOD_STRIP=1", "modules_install"],
            env={**os.environ, **dict(env)}, what="make modules_install")
        (tmp / "lib" / "modules" / release / "build").unlink(missing_ok=True)
        (tmp / "lib" / "modules" / release / "source").unlink(missing_ok=True)
        boot = tmp / "boot"
        boot.mkdir()
        shutil.copyfile(work / "arch" / "x86" / "boot" / "bzImage", boot / f"vmlinuz-{release}")
        shutil.copyfile(work / "vmlinux", boot / f"vmlinux-{release}")
        shutil.copyfile(work / ".config", boot / f"config-{release}")
        took = time.monotonic() - started
        (tmp / "build.json").write_text(json.dumps({
            "key": key, "recipe": RECIPE, "base": BASE_TARGET,
            "source": {"package": source.name, "version": source.version,
                       "sha256": source.sha256},
            "fragments": [f.name for f in fragments], "release": release,
            "build_seconds": round(took, 1), "compiled": compiled, "jobs": make[-1],
            "dropped": why,
        }, indent=1) + "\n")
        tmp.rename(entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    progress.note(f"kernel {release}: {compiled} files compiled in {took / 60:.1f} min "
                  f"({make[-1]}), cached as {entry}")
    return Built(kernel.open_tree(entry, f"kernel build {key}"), key, False,
                 time.monotonic() - started, took, results)


def module_build_dir(built: Built, deb: Path, source: fetch.Pin, progress: Progress, *,
                     epoch: int) -> Path:
    """A tree to build out-of-tree modules (NVIDIA's open modules, the tests' stand-ins)
    against the cached kernel ``built``: ``make -C DIR M=SRC modules``. Kbuild's own
    ``modules_prepare`` over the entry's ``.config`` makes it, once, in the entry's
    ``build/``. The cache keeps no objects, so there is no ``Module.symvers``: build with
    ``KBUILD_MODPOST_WARN=1`` (modpost then warns about symbols it cannot see; the kernel
    still checks every symbol when the module loads)."""
    target = built.tree.root / "build"
    if (target / "Makefile").is_file():
        return target
    src = unpack_source(deb, source.name, progress)
    tmp = Path(tempfile.mkdtemp(dir=built.tree.root, prefix=".build-"))
    try:
        shutil.copyfile(built.tree.config, tmp / ".config")
        env = {**os.environ, **dict(_make_env(epoch))}
        progress.note(f"modules_prepare for {built.tree.release} (out-of-tree module builds)")
        run(["make", "-s", "-C", src, f"O={tmp}", f"-j{os.cpu_count() or 1}", "olddefconfig",
             "modules_prepare"], env=env, what=f"make modules_prepare for {built.tree.release}")
        made = (tmp / "include" / "config" / "kernel.release").read_text().strip()
        if made != built.tree.release:
            raise BuildError(f"modules_prepare made release {made}, the kernel is "
                             f"{built.tree.release}: modules built there would not load")
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
