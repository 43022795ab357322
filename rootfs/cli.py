"""``guestinit-build``: build, sign, verify and inspect guest images; check kernel configs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rootfs import fetch, kconfig, profile, staticinit
from rootfs.steps import BuildError, Progress


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guestinit-build", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    img = sub.add_parser("image", help="build out/PROFILE from rootfs/profiles/PROFILE.toml")
    img.add_argument("profile", help="profile name (cpu, debug, nvidia-gpu...) or a .toml path")
    img.add_argument("--out", type=Path, help="output directory (default out/PROFILE)")
    img.add_argument("--driver", type=Path, help="NVIDIA driver bundle directory")
    img.add_argument("--append-config", type=_kv, action="append", default=[],
                     metavar="KEY=VALUE", help="extra /etc/guestinit.conf setting")
    img.add_argument("--locked", action="store_true",
                     help="fail when a pinned package version is gone from the archive "
                     "(default: build with the current one and warn; the lock file is "
                     "never written by a build)")
    img.add_argument("--compression", choices=("lz4", "zstd", "none"), default="lz4",
                     help="initramfs compression (default lz4: the guest kernel unpacks it "
                     "fastest; see docs/image.md)")
    img.add_argument("--zstd-level", type=int, default=19, choices=range(1, 20),
                     metavar="1-19", help="level for --compression zstd (default 19)")
    img.add_argument("--format", dest="formats", action="append", default=[],
                     choices=[f.value for f in profile.Format],
                     help="output format, repeatable (default: the profile's formats): "
                     "initramfs, erofs (+ dm-verity, two disks), kata (Kata's disk image, "
                     "root_hash.txt and configuration.toml), kata-initrd (Kata's initrd = "
                     "drop-in); see docs/kata.md")
    img.add_argument("--kata-prefix", default="/opt/guestinit", metavar="DIR",
                     help="where the image directory is installed on Kata hosts: the paths "
                     "in configuration.toml are DIR/PROFILE/... (default /opt/guestinit)")
    img.add_argument("--agent", type=Path, metavar="PATH",
                     help="install this kata-agent binary at /usr/bin/kata-agent (its "
                     "libraries come from the profile's packages; a static one needs none)")
    img.add_argument("--pause-bundle", type=Path, metavar="DIR",
                     help="an OCI bundle (config.json, rootfs/) for kata-agent's /pause_bundle")
    img.add_argument("--extension", metavar="NAME",
                     help="put the driver bundle in a Kata extension image NAME (e.g. gpu) "
                     "beside the base disk, listed in configuration.toml's "
                     "guest_extension_images (docs/kata.md)")
    img.add_argument("--standins", action="store_true",
                     help="also ship guestinit.testing (the agent stand-in and the fake NVIDIA "
                     "programs) for tests, whatever the profile says; never for production")
    img.add_argument("-q", "--quiet", action="store_true")
    sg = sub.add_parser("sign", help="sign OUT/manifest.json (ECDSA P-256, cosign blob format)")
    sg.add_argument("--key", type=Path, required=True, help="PEM EC P-256 private key")
    sg.add_argument("out", type=Path)
    vf = sub.add_parser("verify", help="check outputs, verity root hash and signature")
    vf.add_argument("out", type=Path)
    vf.add_argument("--key", type=Path, help="PEM public key to check the signature against")
    vf.add_argument("--allow-unsigned", action="store_true",
                    help="accept an image without manifest.json.sig (integrity only; "
                    "says so loudly)")
    ins = sub.add_parser("inspect", help="size by component")
    ins.add_argument("out", type=Path)
    kc = sub.add_parser("kconfig", help="kernel config tools")
    kcs = kc.add_subparsers(dest="kcmd", required=True)
    chk = kcs.add_parser("check", help="hold a kernel .config against fragments")
    chk.add_argument("--config", type=Path, required=True)
    chk.add_argument("--fragment", type=Path, action="append", default=[],
                     help="fragment file or name in kernel-config/ (default base.conf)")
    kb = sub.add_parser("kernel", help="build a guest kernel from linux-source and fragments "
                        "(cached by the hash of source and fragments)")
    kb.add_argument("fragments", nargs="*", type=Path, metavar="FRAGMENT",
                    help="fragment files or names in kernel-config/, merged in order "
                    "(default: the profile's kernel.fragments)")
    kb.add_argument("--profile", default="cpu-tuned",
                    help="profile whose lock pins the linux-source package and whose "
                    "fragments are the default (default cpu-tuned)")
    kb.add_argument("--jobs", type=int, metavar="N", help="make -jN (default: every CPU)")
    kb.add_argument("--module-build-dir", action="store_true",
                    help="also prepare the tree out-of-tree modules (the NVIDIA driver) "
                    "build against: make -C DIR M=SRC KBUILD_MODPOST_WARN=1 modules; "
                    "print DIR last")
    kb.add_argument("-q", "--quiet", action="store_true")
    lk = sub.add_parser("lock", help="re-resolve the profile's packages into its lock file")
    lk.add_argument("profile")
    return p


def _fragment(path: Path) -> Path:
    if path.exists():
        return path
    candidate = profile.KCONFIG_DIR / path
    if candidate.exists():
        return candidate
    raise BuildError(f"kernel-config fragment {path} not found (nor {candidate})")


def _kernel(args: argparse.Namespace) -> None:
    from rootfs import kbuild
    from rootfs.build import pin_kernel_source

    prof = profile.load(args.profile)
    if not prof.kernel.build:
        raise BuildError(f"profile {prof.name}: kernel.package {prof.kernel.package} is a "
                         "binary kernel; pick a profile with kernel.build = true (cpu-tuned)")
    frags = [_fragment(f) for f in args.fragments] or prof.fragment_paths()
    progress = Progress(quiet=args.quiet)
    deb, pin, epoch = pin_kernel_source(prof, progress)
    built = kbuild.build(deb, pin, frags, progress, epoch=epoch, jobs=args.jobs)
    dropped = [r for r in built.results if r.status in (kconfig.Status.MISSING,
                                                         kconfig.Status.WRONG)]
    how = (f"from the cache in {built.seconds:.1f} s (cold build took "
           f"{built.build_seconds / 60:.1f} min)" if built.cached
           else f"built in {built.seconds / 60:.1f} min")
    print(f"kernel {built.tree.release} ({', '.join(f.name for f in frags)}): {how}")
    print(f"  bzImage {built.tree.vmlinuz}\n  vmlinux {built.vmlinux} (PVH entry)\n"
          f"  config  {built.tree.config}")
    print(f"  {len(built.results)} options requested, {len(built.results) - len(dropped)} "
          f"as asked" + (f", {len(dropped)} advisory not as asked:" if dropped else ""))
    for r in dropped:
        print(f"    {r.want.option}={r.want.value} ({r.want.fragment}): found "
              f"{r.found or 'unset'}")
    if args.module_build_dir:
        where = kbuild.module_build_dir(built, deb, pin, progress, epoch=epoch)
        print(f"  module build dir (make -C DIR M=SRC KBUILD_MODPOST_WARN=1 modules):\n{where}")


def _lock(name: str) -> None:
    prof = profile.load(name)
    lock = fetch.Lock.load(prof.lock)
    kpkg = fetch.kernel_abi_package(prof.kernel.package)
    lock.kernel[prof.kernel.package] = kpkg
    lock.debs.update(fetch.resolve_debs([*prof.debs, kpkg]))
    for w in prof.wheels:
        lock.wheels[w] = fetch.resolve_wheel(w)
    if prof.static_init:  # the image's Python executable compiles cffi's backend in
        lock.sdists["cffi"] = staticinit.sdist_pin(lock.wheels["cffi"].version)
    lock.save()
    print(f"{prof.lock}: {len(prof.debs) + 1} debs, {len(prof.wheels)} wheels pinned "
          f"(kernel {kpkg} {lock.debs[kpkg].version})")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd == "image":
            from rootfs.build import build_image

            prof = profile.load(args.profile)
            out = args.out or Path("out") / prof.name
            build_image(prof, out.resolve(), driver_dir=args.driver,
                        extra_config=dict(args.append_config), locked=args.locked,
                        progress=Progress(quiet=args.quiet), zstd_level=args.zstd_level,
                        compression=args.compression,
                        formats=tuple(profile.Format(f) for f in args.formats) or None,
                        kata_prefix=args.kata_prefix, agent=args.agent,
                        pause_bundle=args.pause_bundle, extension_name=args.extension,
                        standins=args.standins)
        elif args.cmd == "sign":
            from rootfs.sign import sign

            print(f"wrote {sign(args.out, args.key)}")
        elif args.cmd == "verify":
            from rootfs.sign import UnusableInput, VerifyError, verify

            try:
                lines = verify(args.out, args.key, args.allow_unsigned)
            except VerifyError as exc:  # a mismatch: 1; nothing to check against: 2
                print(f"guestinit-build: error: {exc}", file=sys.stderr)
                return 2 if isinstance(exc, UnusableInput) else 1
            for line in lines:
                print(line if line.lower().startswith("warning") else f"ok: {line}")
        elif args.cmd == "inspect":
            from rootfs.manifest import inspect_table

            print(inspect_table(args.out))
        elif args.cmd == "kconfig":
            wants = []
            for frag in args.fragment or [Path("base.conf")]:
                wants.extend(kconfig.read_fragment(_fragment(frag)))
            results = kconfig.check(kconfig.read_config(args.config), wants)
            print(kconfig.table(results))
            bad = [r for r in results if r.fails]
            mods = kconfig.modules_needed(results)
            if mods:
                print(f"\nmodules the image must carry and load early: {', '.join(mods)}")
            if bad:
                print(f"\n{len(bad)} required option(s) missing or wrong: "
                      + ", ".join(r.want.option for r in bad), file=sys.stderr)
                return 1
        elif args.cmd == "kernel":
            _kernel(args)
        elif args.cmd == "lock":
            _lock(args.profile)
    except (BuildError, profile.ProfileError) as exc:
        print(f"guestinit-build: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
