"""``guestinit-build image``: profile -> out/<profile>/ (one pass, no back and forth)."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import guestinit
from guestinit import config as guest_config
from guestinit import modinfo, settings_doc
from rootfs import (
    closure,
    extension,
    fetch,
    freeze,
    images,
    kata,
    kbuild,
    kconfig,
    kernel,
    launcher,
    manifest,
    pack,
    profile,
    staticinit,
    tree_extras,
)
from rootfs.closure import Origin, Pool, Tree
from rootfs.steps import BuildError, Progress

PROJECT = Origin("guestinit", "0.1.0")
GENERATED = Origin("guestinit-build", "0.1.0")
GUEST_SITE = "usr/lib/guestinit"
BASE_DIRS = {"proc": 0o555, "sys": 0o555, "dev": 0o755, "run": 0o755, "tmp": 0o1777,
             "var": 0o755, "var/tmp": 0o1777, "etc": 0o755, "root": 0o700, "mnt": 0o755,
             "usr/lib/firmware": 0o755}
OUTPUT_NAMES = ("vmlinuz", "vmlinux", "kernel-release.txt", "initramfs.img", "rootfs.erofs",
                "rootfs.verity", "roothash.txt", "cmdline.txt", "cmdline-erofs.txt",
                kata.DISK, kata.ROOT_HASH, kata.CONFIGURATION, kata.CONFIGURATION_INITRD,
                "manifest.json", "sbom.spdx.json", "manifest.json.sig", "signing-key.pub.pem")
# Only these parts of a wheel reach the guest (cffi: the backend, not the compiler front end).
WHEEL_SKIP = ("cffi/", ".dist-info/")
STANDINS = "testing"  # guestinit.testing: only in images that ask for the stand-ins


@dataclass
class Inputs:
    lock: fetch.Lock
    debs: dict[str, Path]  # package -> .deb
    wheels: dict[str, Path]
    kernel_package: str


def check_lock(prof: profile.Profile, lock: fetch.Lock) -> str:
    """The kernel package the lock pins for ``prof``; BuildError naming every package the
    profile asks for and the lock does not pin. A build never writes the lock: re-pinning
    is ``./build.sh lock PROFILE`` (``guestinit-build lock``)."""
    meta = prof.kernel.package
    kpkg = lock.kernel.get(meta)
    missing = ([] if kpkg is not None else [f"kernel {meta}"])
    missing += [f"deb {n}" for n in [*prof.debs, *([kpkg] if kpkg else [])]
                if n not in lock.debs]
    missing += [f"wheel {w}" for w in prof.wheels if w not in lock.wheels]
    if missing or kpkg is None:
        raise BuildError(f"lock file {prof.lock}: does not match profile {prof.name}: "
                         f"{', '.join(missing)} not pinned; run `./build.sh lock {prof.name}` "
                         "and commit the lock file")
    return kpkg


def pin_inputs(prof: profile.Profile, progress: Progress, locked: bool) -> Inputs:
    """Fetch every input the lock pins (it must pin all the profile needs: ``check_lock``).

    A pinned version Debian no longer serves (a security update replaced it) fails with
    ``locked``; otherwise this build takes the archive's current version, says so, and
    leaves the lock file as it is (``pins`` in the manifest records what was used).
    """
    lock = fetch.Lock.load(prof.lock)
    kpkg = check_lock(prof, lock)
    names = [*prof.debs, kpkg]
    updated = [False]
    debs = {}
    for name in names:
        try:
            debs[name] = fetch.fetch_deb(lock.debs[name], updated=updated)
        except BuildError:
            if locked:
                raise
            fresh = fetch.resolve_debs([name])[name]
            progress.note(f"warning: {name} {lock.debs[name].version} (pinned in "
                          f"{prof.lock.name}) is gone from the archive; this build uses "
                          f"{fresh.version}; run ./build.sh lock {prof.name} to pin it")
            lock.debs[name] = fresh  # in memory only: the tracked lock stays as it is
            debs[name] = fetch.fetch_deb(fresh, updated=updated)
    wheels = {w: fetch.fetch_wheel(lock.wheels[w]) for w in prof.wheels}
    return Inputs(lock, debs, wheels, kpkg)


def pin_kernel_source(prof: profile.Profile, progress: Progress) -> tuple[Path, fetch.Pin, int]:
    """The linux-source .deb the lock pins for ``prof`` (fetched), its pin and the epoch."""
    lock = fetch.Lock.load(prof.lock)
    kpkg = check_lock(prof, lock)
    pin = lock.debs[kpkg]
    try:
        deb = fetch.fetch_deb(pin, updated=[False])
    except BuildError as exc:
        raise BuildError(f"{exc}; the kernel source {kpkg} {pin.version} pinned in "
                         f"{prof.lock.name} is needed: run ./build.sh lock {prof.name} "
                         "when the archive has moved on") from None
    progress.note(f"source: {kpkg} {pin.version}")
    return deb, pin, int(os.environ.get("SOURCE_DATE_EPOCH", lock.source_date_epoch))


def install_wheel(tree: Tree, whl: Path, origin: Origin, skip: tuple[str, ...] = ()) -> None:
    """The wheel's files under the site directory; ``skip``: extension modules by name
    prefix (``_cffi_backend.``) left out."""
    with zipfile.ZipFile(whl) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            name = info.filename
            if info.is_dir() or name.startswith(WHEEL_SKIP[0]) or WHEEL_SKIP[1] in name \
                    or "/__pycache__/" in name or name.startswith(skip):
                continue
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            tree.add_bytes(f"{GUEST_SITE}/{name}", zf.read(info), origin, mode | 0o444)


def install_guestinit(tree: Tree, standins: bool, one_executable: bool) -> list[str]:
    """The guestinit package with its subpackages and the init entry points; returns
    module names. ``guestinit.testing`` (the agent stand-in and fake NVIDIA programs the VM
    tier, the demo and the bench run inside the image) only with ``standins``. With
    ``one_executable`` /sbin/init links to /usr/bin/python3.11 (staticinit.install adds it),
    else it is the launcher."""
    src = Path(guestinit.__file__).parent
    modules = []
    for py in sorted(src.rglob("*.py")):
        rel = py.relative_to(src)
        if py.name == "_libc_build.py" or "__pycache__" in rel.parts:
            continue  # _libc_build: build-time generator of _libc_cffi.py, needs cffi's compiler
        if rel.parts[0] == STANDINS and not standins:
            continue
        tree.add_file(f"{GUEST_SITE}/guestinit/{rel}", py, PROJECT, 0o644)
        parts = ("guestinit", *rel.with_suffix("").parts)
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    if one_executable:
        # python3.11 by that name, the init by any other (rootfs/staticinit.c)
        tree.add_symlink("usr/sbin/init", "../bin/python3.11")
    else:
        # the launcher (rootfs/launcher.c) scrubs the environment, sets PYTHONHASHSEED and
        # execs Debian's python3.11 running guestinit.__main__.main
        tree.add_file("usr/sbin/init", launcher.launcher_binary(), GENERATED, 0o755)
    tree.add_symlink("init", "usr/sbin/init")
    tree.add_symlink("usr/bin/python3", "python3.11")
    return modules


def install_modules(tree: Tree, kt: kernel.KernelTree, mods: kernel.ModuleSet,
                    kernel_origin: Origin, driver: Origin | None) -> None:
    base = f"usr/lib/modules/{kt.release}"
    for name in mods.order:
        src = mods.paths[name]
        origin = kernel_origin if src.is_relative_to(kt.modules) or driver is None else driver
        tree.add_file(f"{base}/{mods.rel[name]}", src, origin, 0o644)
    for f in kernel.builtin_files(kt.modules):
        tree.add_file(f"{base}/{f.name}", f, kernel_origin, 0o644)
    for fname, text in modinfo.generate(str(tree.host("usr/lib/modules")), kt.release).items():
        tree.add_bytes(f"{base}/{fname}", text.encode(), GENERATED)


def write_users(tree: Tree, users: dict[str, int], shell: bool) -> None:
    login = "/bin/sh" if shell else "/usr/sbin/nologin"
    entries = [("root", 0, "/root", login)]
    entries += [(n, uid, "/nonexistent", "/usr/sbin/nologin") for n, uid in sorted(users.items())]
    entries.append(("nobody", 65534, "/nonexistent", "/usr/sbin/nologin"))
    passwd = "".join(f"{n}:x:{u}:{u}:{n}:{h}:{s}\n" for n, u, h, s in entries)
    group = "".join(f"{n}:x:{u}:\n" for n, u, _h, _s in entries[:-1]) + "nogroup:x:65534:\n"
    tree.add_bytes("etc/passwd", passwd.encode(), GENERATED)
    tree.add_bytes("etc/group", group.encode(), GENERATED)


def compile_python(tree: Tree, dirs: list[str], sourceless: bool = False,
                   skip: frozenset[str] = frozenset()) -> None:
    """Byte-compile every .py but the image paths in ``skip`` (unchecked-hash pycs: no
    mtimes, no rewrite on a read-only root).

    ``sourceless`` (the stdlib): only ``x.pyc`` ships, half the bytes to unpack at boot;
    guestinit and the wheels keep their sources for readable tracebacks.
    """
    sources = sorted(str(p) for d in dirs for p in tree.host(d).rglob("*.py")
                     if str(p.relative_to(tree.root)) not in skip)
    pack.compile_pycs(tree.root, sources, sourceless)
    for src in sources:
        rel = str(Path(src).relative_to(tree.root))
        if sourceless:
            tree.origins[rel + "c"] = tree.origins.pop(rel, GENERATED)
        else:
            pyc = Path(src).parent / "__pycache__" / f"{Path(src).stem}.cpython-311.pyc"
            tree.origins[str(pyc.relative_to(tree.root))] = tree.origins.get(rel, GENERATED)


BUILD_UMASK = 0o022  # whatever the caller's umask, the tree's modes are the same


def build_image(prof: profile.Profile, out: Path, *, driver_dir: Path | None = None,
                extra_config: dict[str, str] | None = None, locked: bool = False,
                progress: Progress | None = None,
                zstd_level: int = pack.ZSTD_LEVEL,
                compression: str = pack.DEFAULT_COMPRESSION,
                formats: tuple[profile.Format, ...] | None = None,
                kata_prefix: str = kata.DEFAULT_PREFIX, agent: Path | None = None,
                pause_bundle: Path | None = None,
                extension_name: str | None = None,
                standins: bool = False) -> manifest.Manifest:
    """Build ``out`` from ``prof`` in ``formats`` (default the profile's), with the test
    stand-ins when the profile or ``standins`` asks for them. Directories
    made along the way and the pycs the compiler writes take the process umask, so the
    build sets BUILD_UMASK for its run (and its tools') and puts the caller's back after."""
    saved = os.umask(BUILD_UMASK)
    try:
        return _build_image(prof, out, driver_dir, extra_config, locked,
                            progress or Progress(), zstd_level, compression,
                            formats or prof.formats, kata_prefix, agent, pause_bundle,
                            extension_name, standins or prof.standins)
    finally:
        os.umask(saved)


def _build_image(prof: profile.Profile, out: Path, driver_dir: Path | None,
                 extra_config: dict[str, str] | None, locked: bool, progress: Progress,
                 zstd_level: int, compression: str, formats: tuple[profile.Format, ...],
                 kata_prefix: str, agent: Path | None,
                 pause_bundle: Path | None, extension_name: str | None,
                 standins: bool) -> manifest.Manifest:
    if driver_dir is not None and prof.driver is profile.Driver.NONE:
        raise BuildError(f"profile {prof.name}: takes no driver bundle (driver = \"none\"); "
                         "use nvidia-gpu or nvidia-servicevm with --driver")
    if extension_name is not None:  # before any fetch or kernel build
        extension.check_name(extension_name)
        if driver_dir is None or profile.Format.KATA not in formats:
            raise BuildError(f"--extension {extension_name}: puts the driver bundle in a Kata "
                             "extension image: needs --driver DIR and the kata format")
    if prof.driver is profile.Driver.REQUIRED and driver_dir is None:
        raise BuildError(f"profile {prof.name}: needs a driver bundle: pass --driver DIR "
                         "(layout in docs/image.md)")
    with progress.step("pin and fetch inputs"):
        inputs = pin_inputs(prof, progress, locked)
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", inputs.lock.source_date_epoch))
    with progress.step("unpack packages"):
        pool = Pool()
        for name, deb in sorted(inputs.debs.items()):
            if name != inputs.kernel_package:
                origin = Origin(name, inputs.lock.debs[name].version)
                pool.add_package(fetch.extract_deb(deb), origin)
        if not prof.kernel.build:
            kt = kernel.open_tree(fetch.extract_deb(inputs.debs[inputs.kernel_package]),
                                  inputs.kernel_package)
    if prof.kernel.build:
        with progress.step(f"kernel from {inputs.kernel_package} (cached by inputs)"):
            built = kbuild.build(inputs.debs[inputs.kernel_package],
                                 inputs.lock.debs[inputs.kernel_package],
                                 prof.fragment_paths(), progress, epoch=epoch)
            kt = built.tree
            progress.note(f"kernel {kt.release}: "
                          + ("from the cache" if built.cached else "built") + f" ({built.key})")
    wants_kata = {profile.Format.KATA, profile.Format.KATA_INITRD} & set(formats)
    if wants_kata:
        kata.check_kernel(kconfig.read_config(kt.config), prof.kernel.build, prof.name)
    korigin = Origin(inputs.kernel_package, inputs.lock.debs[inputs.kernel_package].version)
    with progress.step("check kernel config and pick modules"):
        results = kernel.check_fragments(kt.config, prof.fragment_paths())
        needed = kconfig.modules_needed(results)
        bundle = (tree_extras.DriverBundle.open(driver_dir, kt.release, prof.driver_files)
                  if driver_dir else None)
        wanted = [*needed, *prof.kernel.modules, *(bundle.module_names() if bundle else [])]
        trees = [kt.modules, *([bundle.modules_dir] if bundle else [])]
        mods = kernel.select_modules(trees, wanted, kt.release)
        early = list(prof.kernel.early) or needed
        for m in early:
            if modinfo.module_name(m) not in mods.paths:
                raise BuildError(f"profile {prof.name}: key kernel.early: module {m} is not "
                                 "carried (add it to kernel.modules)")
        progress.note(f"kernel {kt.release}: {len(mods.order)} modules, early: {','.join(early)}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{prof.name}-", dir=out.parent))
    try:
        tree = Tree(staging)
        with progress.step("assemble tree"):
            for d, mode in BASE_DIRS.items():
                tree.mkdir(d, mode)
            # run-state lives on the /run tmpfs: on a read-only (erofs) root the NVIDIA
            # daemons' and the CDI spec's /var/run paths must land there too
            tree.add_symlink("var/run", "../run")
            early_set = kernel.select_modules(trees, early, kt.release)
            site_roots = tree_extras.install_init(tree, prof, pool, kt.release,
                                                  [early_set.rel[m] for m in early_set.order])
            one = prof.init is profile.Init.GUESTINIT and prof.static_init
            if prof.init is profile.Init.GUESTINIT:
                roots = install_guestinit(tree, standins, one)
                for name, whl in sorted(inputs.wheels.items()):
                    # cffi's backend is built into the one executable: no second copy
                    skip = staticinit.BUILT_IN if one else ()
                    install_wheel(tree, whl, Origin(name, fetch.wheel_version(whl)), skip)
                    tree_extras.take_dlopened(tree, pool, name)
                    roots.extend(r for r in tree_extras.wheel_roots(whl)
                                 if not f"{r}.".startswith(skip))
                if not one:
                    tree.take(pool, f"/{staticinit.PYTHON}", "the init")
                cfg = {"modules": ",".join(early), **prof.config, **(extra_config or {})}
                try:
                    text = settings_doc.render_file(cfg)
                except guest_config.ConfigError as exc:
                    raise BuildError(f"--append-config / profile config: {exc}") from None
                tree.add_bytes("etc/guestinit.conf", text.encode(), GENERATED)
                # the hostname the init will set: the baked file read as the init reads it
                tree_extras.write_agent_files(tree, guest_config.build(text).str("hostname"))
            if agent is not None:
                tree_extras.install_agent(tree, agent)
            if pause_bundle is not None:
                n = tree_extras.install_pause_bundle(tree, pause_bundle)
                progress.note(f"pause bundle: {n} files at /{tree_extras.PAUSE_BUNDLE}")
            for binary in prof.binaries:
                tree.take(pool, binary, f"binaries in profile {prof.name}")
            if prof.shell:
                tree_extras.install_busybox(tree, pool)
            if bundle:
                n = bundle.install(tree)
                progress.note(f"driver bundle {bundle.version}: {n} files, "
                              f"{len(bundle.module_names())} modules")
                if tree_extras.install_nvfm_binding(tree, GENERATED):
                    progress.note("libnvfm in the bundle: the partition service's binding "
                                  "built against it")
            if prof.init is profile.Init.GUESTINIT:
                found = closure.python_closure(tree, pool, roots + site_roots, GUEST_SITE,
                                               closure.python_scripts(tree))
                if one:  # built now: its inittab holds the built-in modules found
                    progress.note(staticinit.install(tree, pool, inputs.lock, found.builtins,
                                                     GENERATED))
            install_modules(tree, kt, mods, korigin, bundle.origin if bundle else None)
            write_users(tree, prof.users, prof.shell)
        with progress.step("ELF closure"):
            added = closure.elf_closure(tree, pool)
            progress.note(f"{len(added)} shared libraries added")
            tree_extras.write_ld_cache(tree)
        if prof.init is profile.Init.GUESTINIT:
            with progress.step("byte-compile python"):
                compile_python(tree, [closure.PY_STDLIB], sourceless=True)
                # frozen into the one executable: the sources stay for tracebacks, no pycs
                frozen = frozenset(path.lstrip("/") for _, path, _ in
                                   freeze.guest_modules(Path(guestinit.__file__).parent).values())
                compile_python(tree, [GUEST_SITE], skip=frozen if one else frozenset())
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_NAMES:  # only our own files: --out may be any directory
            (out / name).unlink(missing_ok=True)
        for old in [*out.glob(extension.disk_name("*")), *out.glob(extension.root_hash_name("*"))]:
            old.unlink()
        outputs, roothash, in_extension = images.pack_all(
            tree, out, staging, formats, prof, epoch, progress,
            images.Options(compression, zstd_level, kata_prefix, extension_name),
            bundle.origin if bundle else None)
        with progress.step("kernel, cmdline, manifest, SBOM"):
            shutil.copyfile(kt.vmlinuz, out / "vmlinuz")
            os.chmod(out / "vmlinuz", 0o644)
            outputs["vmlinuz"] = out / "vmlinuz"
            pvh = kt.root / "boot" / f"vmlinux-{kt.release}"
            if pvh.is_file():  # a built kernel: the ELF a VMM can enter at its PVH note
                shutil.copyfile(pvh, out / "vmlinux")
                os.chmod(out / "vmlinux", 0o644)
                outputs["vmlinux"] = out / "vmlinux"
            (out / "kernel-release.txt").write_text(kt.release + "\n")
            outputs["kernel-release.txt"] = out / "kernel-release.txt"
            (out / "cmdline.txt").write_text(" ".join(prof.cmdline()) + "\n")
            outputs["cmdline.txt"] = out / "cmdline.txt"
            if roothash is not None:
                kcfg = kconfig.read_config(kt.config)
                builtin = all(kcfg.get(o) == "y" for o in pack.VERITY_BUILTIN)
                pack.write_erofs_cmdline(out, prof.cmdline(), roothash, builtin)
            tools = manifest.host_tools()
            man = manifest.build(prof.name, kt.release, epoch, tree, outputs,
                                 {**{n: inputs.lock.debs[n] for n in inputs.debs},
                                  **{f"wheel:{n}": inputs.lock.wheels[n] for n in inputs.wheels}},
                                 bundle.origin if bundle else None, roothash,
                                 manifest.guestinit_source(), tools,
                                 {n: fetch.wheel_license(w) for n, w in inputs.wheels.items()},
                                 staticinit.static_links(inputs.lock, tools) if one else None)
            if extension_name is not None:  # where each file ships: verify reads it
                ext_disk, moved = extension.disk_name(extension_name), set(in_extension)
                for row in man.data["files"]:
                    if row["path"].lstrip("/") in moved:
                        row["image"] = ext_disk
            man.write(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = (out / "initramfs.img").stat().st_size if (out / "initramfs.img").exists() \
        else 0
    progress.note(f"out: {out} (initramfs {size / 2**20:.2f} MiB), total {progress.total():.1f} s")
    return man
