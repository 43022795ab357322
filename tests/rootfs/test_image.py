"""The cpu image: byte-identical rebuilds, contents, sign/verify and tamper detection."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rootfs import cpio, fetch, pack, profile
from rootfs.build import pin_inputs
from rootfs.cli import main
from rootfs.closure import canonical
from rootfs.fetch import sha256_file
from rootfs.sign import VerifyError, verify
from rootfs.steps import Progress
from tests.fixtures.tcg import tsc_word

EARLY = "virtio_mmio,virtio_console,vsock,vmw_vsock_virtio_transport,button,evdev"
OUTPUTS = {"vmlinuz", "initramfs.img", "rootfs.erofs", "rootfs.verity", "roothash.txt",
           "cmdline.txt", "cmdline-erofs.txt", "manifest.json", "sbom.spdx.json",
           "kernel-release.txt"}


def entries(out: Path) -> dict[str, cpio.Entry]:
    return {e.path: e for e in cpio.read(pack.decompress(out / "initramfs.img"))}


def write_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub = path.with_suffix(".pub")
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


def test_rebuild_is_byte_identical(cpu_images: tuple[Path, Path]) -> None:
    a, b = cpu_images
    names = sorted(p.name for p in a.iterdir())
    assert set(names) == OUTPUTS
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def test_initramfs_contents(cpu_images: tuple[Path, Path]) -> None:
    out = cpu_images[0]
    ents = entries(out)
    assert (out / "initramfs.img").stat().st_size <= 16 * 2**20
    assert ents["dev/console"].rdev == (5, 1) and stat.S_ISCHR(ents["dev/console"].mode)
    for d in ("proc", "sys", "dev", "run", "tmp", "var", "etc"):
        assert stat.S_ISDIR(ents[d].mode), d
    # one executable (rootfs/staticinit.c) is python3.11 and, through /sbin/init, the init
    python = ents["usr/bin/python3.11"].data
    assert python.startswith(b"\x7fELF") and b"guestinit.__main__\0" \
        in python
    assert b"guestinit-init: %s: %s; %s" in python  # its own failure line
    assert b"guestinit.__main__" in python  # the frozen table
    assert ents["usr/sbin/init"].data == b"../bin/python3.11"
    assert ents["usr/bin/python3"].data == b"python3.11"
    assert ents["init"].data == b"usr/sbin/init"
    assert ents["sbin"].data == b"usr/sbin"  # /sbin/init resolves through the usr merge
    conf = ents["etc/guestinit.conf"].data.decode()
    assert f"modules={EARLY}\n" in conf
    release = (out / "kernel-release.txt").read_text().strip()
    dep = ents[f"usr/lib/modules/{release}/modules.dep"].data.decode()
    for mod in ("virtio_mmio", "virtio_console", "vsock", "vmw_vsock_virtio_transport",
                "virtio_blk", "dm-verity", "dm-mod", "erofs"):
        assert f"/{mod}.ko:" in dep, mod
    # cffi's backend is built in, and so are zlib and expat: no second copy (libffi.so
    # stays for lib-dynload's _ctypes)
    assert not any("_cffi_backend" in p for p in ents)
    assert not any(p.startswith(("usr/lib/x86_64-linux-gnu/libz.so",
                                 "usr/lib/x86_64-linux-gnu/libexpat.so")) for p in ents)
    assert "usr/lib/x86_64-linux-gnu/libc.so.6" in ents  # glibc stays shared
    assert not any(p.startswith("usr/lib/guestinit/pyudev") for p in ents)  # sysfs directly
    # the VM tier runs guestinit.testing's agent stand-in inside the cpu image
    assert "usr/lib/guestinit/guestinit/testing/agent_standin.py" in ents
    # stdlib ships sourceless (x.pyc next to nothing) but for the modules frozen into the
    # executable (no file at all); guestinit with sources, pycs only for what is not frozen
    assert "usr/lib/python3.11/inspect.pyc" in ents
    assert "usr/lib/python3.11/inspect.py" not in ents
    assert not any(p.startswith(("usr/lib/python3.11/enum.", "usr/lib/python3.11/re/"))
                   for p in ents)
    assert "usr/lib/guestinit/guestinit/config.py" in ents
    assert "usr/lib/guestinit/guestinit/__pycache__/config.cpython-311.pyc" not in ents
    assert ("usr/lib/guestinit/guestinit/testing/__pycache__/agent_standin.cpython-311.pyc"
            in ents)
    # left out on purpose (closure.PY_EXCLUDES): no OpenSSL, asyncio or email in a guest
    assert not any(p.startswith(("usr/lib/python3.11/asyncio", "usr/lib/python3.11/email"))
                   for p in ents)
    assert "usr/lib/x86_64-linux-gnu/libcrypto.so.3" not in ents
    assert "usr/lib/x86_64-linux-gnu/libudev.so.1" not in ents
    assert "usr/sbin/ldconfig" not in ents  # nothing in the guest looks libraries up
    # distroless: no shell, no package manager, no docs
    assert not any(p in ents for p in ("usr/bin/sh", "usr/bin/busybox", "usr/bin/dpkg"))
    assert not any(p.startswith(("usr/share/doc", "usr/share/locale")) for p in ents)
    assert not any(p.startswith("usr/lib/guestinit/cffi/") for p in ents)
    assert ents["etc/passwd"].data.startswith(b"root:x:0:0:")
    assert all(e.path != "usr/lib/guestinit/guestinit/_libc_build.py" for e in ents.values())


def test_manifest_and_sbom(cpu_images: tuple[Path, Path]) -> None:
    out = cpu_images[0]
    man = json.loads((out / "manifest.json").read_text())
    files = {r["path"]: r for r in man["files"]}
    assert files["/usr/bin/python3.11"]["package"] == "guestinit-build"  # the one executable
    assert files["/usr/lib/guestinit/psutil/__init__.py"]["package"] == "psutil"
    assert not any(p.startswith("/usr/lib/guestinit/msgpack") for p in files)  # host only
    assert files["/usr/sbin/init"]["type"] == "symlink"
    assert files["/init"] == {"path": "/init", "type": "symlink", "mode": "0777",
                              "target": "usr/sbin/init"}
    assert files["/dev/console"]["type"] == "chardev"
    assert all(r.get("package") not in (None, "unknown") for r in files.values()
               if r["type"] == "file")
    assert man["roothash"] == (out / "roothash.txt").read_text().strip()
    sbom = json.loads((out / "sbom.spdx.json").read_text())
    assert sbom["spdxVersion"] == "SPDX-2.3"
    names = {p["name"] for p in sbom["packages"]}
    assert {"libc6", "libpython3.11-stdlib", "psutil", "guestinit"} <= names
    # what the one executable has compiled in: STATIC_LINK from its file
    py_ref = next(f["SPDXID"] for f in sbom["files"] if f["fileName"] == "./usr/bin/python3.11")
    linked = {r["relatedSpdxElement"] for r in sbom["relationships"]
              if r["spdxElementId"] == py_ref and r["relationshipType"] == "STATIC_LINK"}
    linked_names = {p["name"] for p in sbom["packages"] if p["SPDXID"] in linked}
    assert linked_names == {"cffi", "libpython3.11-dev", "libffi-dev", "zlib1g-dev",
                            "libexpat1-dev"}
    cffi = next(p for p in sbom["packages"] if p["SPDXID"] in linked and p["name"] == "cffi")
    assert cffi["packageFileName"] == "cffi-2.1.1.tar.gz"
    assert cffi["externalRefs"][0]["referenceLocator"] == "pkg:pypi/cffi@2.1.1"
    assert not {"pyudev", "libudev1", "libc-bin"} & names
    assert any(n.startswith("linux-image-6.") for n in names)
    assert man["outputs"]["sbom.spdx.json"]["sha256"] == sha256_file(out / "sbom.spdx.json")
    assert set(man["tools"]) >= {"python", "erofs-utils", "cryptsetup-bin", "lz4", "zstd",
                                 "libpython3.11-dev", "libffi-dev"}


def test_sbom_validates_and_lists_exactly_what_ships(cpu_images: tuple[Path, Path]) -> None:
    """spdx-tools finds nothing wrong; its packages are the packages whose files are in the
    image, computed here from the packages' own contents, not from the builder's origins."""
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    out = cpu_images[0]
    assert validate_full_spdx_document(parse_file(str(out / "sbom.spdx.json"))) == []
    sbom = json.loads((out / "sbom.spdx.json").read_text())
    shipped = {r["path"].lstrip("/") for r in json.loads((out / "manifest.json").read_text())
               ["files"] if r["type"] == "file"}
    prof = profile.load("cpu")
    inputs = pin_inputs(prof, Progress(quiet=True), locked=True)
    expected = set()
    for name, deb in inputs.debs.items():
        root = fetch.extract_deb(deb)
        paths = {canonical(str(p.relative_to(root))) for p in root.rglob("*") if p.is_file()}
        paths.discard("usr/bin/python3.11")  # the image's is the one executable, built
        # the stdlib ships as pycs compiled from the package's sources
        paths |= {p + "c" for p in paths if p.endswith(".py")}
        paths |= {f"{p.rsplit('/', 1)[0]}/__pycache__/{p.rsplit('/', 1)[1][:-3]}.cpython-311"
                  ".pyc" for p in paths if p.endswith(".py") and "/" in p}
        if paths & shipped:
            expected.add(name)
    declared = {p["name"]: p["licenseDeclared"] for p in sbom["packages"]}
    for name, whl in inputs.wheels.items():
        with zipfile.ZipFile(whl) as zf:
            if {f"usr/lib/guestinit/{n}" for n in zf.namelist()} & shipped:
                expected.add(name)
                assert declared[name] == fetch.wheel_license(whl) != ""  # from its METADATA
    assert declared["guestinit"] == "Apache-2.0" and declared["libc6"] == "NOASSERTION"
    expected |= {"guestinit", "guestinit-build"}  # its package, and what the builder made
    packages = {p["name"] for p in sbom["packages"] if p["SPDXID"] != "SPDXRef-image"
                and not p["SPDXID"].startswith("SPDXRef-Static-")}  # test_manifest_and_sbom
    assert packages == expected
    assert len(sbom["files"]) == len(shipped)
    assert all({c["algorithm"] for c in f["checksums"]} == {"SHA1", "SHA256"}
               for f in sbom["files"])
    libc = next(p for p in sbom["packages"] if p["name"] == "libc6")
    locator = libc["externalRefs"][0]["referenceLocator"]
    assert "+" not in locator and "%2B" in locator  # packageurl-python percent-encodes
    contains = {(r["spdxElementId"], r["relationshipType"]) for r in sbom["relationships"]}
    assert ("SPDXRef-image", "CONTAINS") in contains


def test_verify_sign_and_tamper(cpu_copy: Path, tmp_path: Path) -> None:
    out = cpu_copy
    with pytest.raises(VerifyError, match=r"manifest\.json\.sig is missing: the image is not "
                       "signed; sign it"):
        verify(out, None)  # unsigned: refused, unless asked to check integrity only
    checked = verify(out, None, allow_unsigned=True)
    assert any("dm-verity" in line for line in checked)
    assert checked[-1].startswith("WARNING: not signed (--allow-unsigned)")
    assert main(["verify", str(out)]) == 1  # refused: the signature is missing
    assert main(["verify", str(out), "--allow-unsigned"]) == 0
    assert main(["verify", str(tmp_path / "nothing-here")]) == 2  # no manifest: unusable
    pub = write_key(tmp_path / "key.pem")
    assert main(["sign", "--key", str(tmp_path / "key.pem"), str(out)]) == 0
    assert any("signature valid" in line for line in verify(out, pub))
    # a different key is rejected
    other = write_key(tmp_path / "other.pem")
    with pytest.raises(VerifyError, match=r"does not match manifest\.json under key"):
        verify(out, other)
    # a changed manifest breaks the signature (after fixing nothing else)
    man = out / "manifest.json"
    original = man.read_bytes()
    man.write_bytes(original.replace(b'"profile": "cpu"', b'"profile": "cpX"'))
    with pytest.raises(VerifyError, match="signature"):
        verify(out, pub)
    man.write_bytes(original)
    # the SBOM is an output the signed manifest covers: an edited SBOM is named
    sbom = out / "sbom.spdx.json"
    listed = sbom.read_bytes()
    sbom.write_bytes(listed.replace(b'"SPDX-2.3"', b'"SPDX-2.2"'))
    with pytest.raises(VerifyError, match=r"output sbom\.spdx\.json was modified"):
        verify(out, pub)
    sbom.write_bytes(listed)
    # a changed output is named
    kernel = out / "vmlinuz"
    data = bytearray(kernel.read_bytes())
    data[-1] ^= 0xFF
    kernel.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="output vmlinuz was modified"):
        verify(out, pub)
    assert main(["verify", str(out), "--key", str(pub)]) == 1
    data[-1] ^= 0xFF
    kernel.write_bytes(bytes(data))  # put it back: now only the key is wrong
    (tmp_path / "junk.pem").write_text("not a key\n")
    assert main(["verify", str(out), "--key", str(tmp_path / "junk.pem")]) == 2


def test_signature_checks_with_openssl(cpu_copy: Path, tmp_path: Path) -> None:
    """The cosign blob format is base64(DER ECDSA over SHA-256): openssl agrees."""
    pub = write_key(tmp_path / "key.pem")
    assert main(["sign", "--key", str(tmp_path / "key.pem"), str(cpu_copy)]) == 0
    der = tmp_path / "sig.der"
    der.write_bytes(base64.b64decode((cpu_copy / "manifest.json.sig").read_text()))
    res = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature",
                          str(der), str(cpu_copy / "manifest.json")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "Verified OK" in res.stdout, res.stderr


def test_verify_names_file_inside_initramfs(cpu_copy: Path) -> None:
    out = cpu_copy
    raw = pack.decompress(out / "initramfs.img")
    patched = raw.replace(b"root:x:0:0:root:", b"root:x:0:0:r00t:", 1)
    assert patched != raw
    compressed = subprocess.run(["zstd", "-q", "-c"], input=patched, capture_output=True,
                                check=True).stdout
    (out / "initramfs.img").write_bytes(compressed)
    with pytest.raises(VerifyError, match="initramfs file /etc/passwd was modified"):
        verify(out, None, allow_unsigned=True)


def test_verify_detects_erofs_tamper(cpu_copy: Path) -> None:
    image = cpu_copy / "rootfs.erofs"
    data = bytearray(image.read_bytes())
    data[8192] ^= 0x01
    image.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"output rootfs\.erofs was modified"):
        verify(cpu_copy, None, allow_unsigned=True)


def test_inspect_table(cpu_images: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(cpu_images[0])]) == 0
    table = capsys.readouterr().out
    for comp in ("kernel", "modules", "python", "wheels", "guestinit", "libraries"):
        assert f"\n{comp} " in table, comp
    assert "initramfs.img" in table


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_python_runs_inside_the_tree(cpu_images: tuple[Path, Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], cwd=root, check=True,
                   input=pack.decompress(cpu_images[0] / "initramfs.img"))
    # every guestinit module imports inside the tree (a top-level import the closure
    # missed fails here), the wheels work, hashlib works without OpenSSL
    code = ("import sys, os, importlib, importlib.util; sys.path.insert(0, '/usr/lib/guestinit')\n"
            "import guestinit, psutil, _cffi_backend, hashlib\n"
            "from guestinit import wire\n"
            "for d, _, fs in os.walk('/usr/lib/guestinit/guestinit'):\n"
            "    pkg = d[len('/usr/lib/guestinit/'):].replace('/', '.')\n"
            "    for f in fs:\n"
            "        if f.endswith('.py') and f != '__main__.py':\n"
            "            importlib.import_module(pkg + '.' + f[:-3])\n"
            "assert hashlib.sha256(b'').hexdigest().startswith('e3b0c442')\n"
            "assert importlib.util.find_spec('msgpack') is None\n"
            "assert len(wire.encode(wire.Frame(wire.FrameType.HELLO, 'b', 1, "
            "{'version': '1'}))) > 4\n"
            "assert psutil.cpu_count() > 0\n"
            "from guestinit import pci\n"
            "print([(d.bdf, d.vendor, d.device, d.cls) for d in pci.scan('/tmp/pci')], "
            "guestinit.config.build(open('/etc/guestinit.conf').read()).words('modules'))")
    # a one-device sysfs tree for the image's pci module to read
    dev = root / "tmp" / "pci" / "sys" / "bus" / "pci" / "devices" / "0000:00:05.0"
    dev.mkdir(parents=True)
    for name, value in (("vendor", "0x10de"), ("device", "0x2330"), ("class", "0x030200")):
        (dev / name).write_text(value + "\n")
    res = subprocess.run(["chroot", str(root), "/usr/bin/python3.11", "-IS", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("[('0000:00:05.0', 4318, 9008, 197120)] "
                                 "('virtio_mmio', 'virtio_console'")


@pytest.mark.vm
def test_kernel_runs_python_init(cpu_images: tuple[Path, Path]) -> None:
    out = cpu_images[0]
    cmdline = (out / "cmdline.txt").read_text().strip() + " loglevel=7" + tsc_word()
    argv = ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "512", "-nographic",
            "-no-reboot", "-nodefaults", "-serial", "stdio", "-kernel", str(out / "vmlinuz"),
            "-initrd", str(out / "initramfs.img"), "-append", cmdline]
    try:
        console = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                 check=False).stdout
    except subprocess.TimeoutExpired as exc:  # the init may wait for a host; it started
        raw = exc.stdout or b""
        console = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    assert "Run /init as init process" in console, console[-3000:]
    assert "Fatal Python error" not in console, console[-3000:]
    assert "No working init found" not in console


def test_rebuild_into_a_directory_keeps_foreign_files(cpu_images: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    from rootfs import profile
    from rootfs.build import build_image
    from rootfs.steps import Progress

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "vmlinuz").write_text("stale")
    build_image(profile.load("cpu"), out, locked=True, progress=Progress(quiet=True),
                zstd_level=1)
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "vmlinuz").read_bytes() == (cpu_images[0] / "vmlinuz").read_bytes()


def test_erofs_cmdline_for_a_modular_kernel(cpu_images: tuple[Path, Path]) -> None:
    """Debian's dm-mod/dm-verity/erofs are modules: no dm-mod.create, the initramfs mounts
    the verity root and learns the root hash from the cmdline."""
    out = cpu_images[0]
    words = (out / "cmdline-erofs.txt").read_text().split()
    roothash = (out / "roothash.txt").read_text().strip()
    assert f"{pack.ROOTHASH_KEY}={roothash}" in words
    assert not any(w.startswith(("root=", "dm-mod.create")) for w in words)
    assert words[: len((out / "cmdline.txt").read_text().split())] == \
        (out / "cmdline.txt").read_text().split()


def test_erofs_cmdline_for_a_builtin_kernel(cpu_copy: Path) -> None:
    roothash = (cpu_copy / "roothash.txt").read_text().strip()
    text = pack.write_erofs_cmdline(cpu_copy, ["console=ttyS0"], roothash, builtin=True)
    dump = subprocess.run(["veritysetup", "dump", str(cpu_copy / "rootfs.verity")],
                          capture_output=True, text=True, check=True).stdout
    blocks = pack.verity_field(dump, "Data blocks")
    table = text.split('dm-mod.create="')[1].split('"')[0].split()
    # vroot,,,ro,0 SECTORS verity 1 DATA HASH 4096 4096 BLOCKS HASH_START sha256 ROOT SALT
    assert table[2:4] == ["verity", "1"] and table[4:6] == ["/dev/vda", "/dev/vdb"]
    assert table[8] == blocks and int(table[1]) == int(blocks) * 8
    assert table[9] == "1"  # block 0 of the hash device is veritysetup's superblock
    assert table[11] == roothash
    assert table[12] == pack.verity_field(dump, "Salt")
    assert "root=/dev/dm-0" in text.split()


def test_every_output_tampered_is_named(cpu_copy: Path, tmp_path: Path) -> None:
    """The tamper matrix: one flipped byte in any output, the SBOM included, fails verify
    naming that output (signed image; initramfs and erofs have their own tests above)."""
    out = cpu_copy
    pub = write_key(tmp_path / "key.pem")
    assert main(["sign", "--key", str(tmp_path / "key.pem"), str(out)]) == 0
    outputs = json.loads((out / "manifest.json").read_text())["outputs"]
    assert "sbom.spdx.json" in outputs
    for name in sorted(set(outputs) - {"initramfs.img"}):
        path = out / name
        original = path.read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0x20
        path.write_bytes(bytes(changed))
        with pytest.raises(VerifyError, match=rf"output {name.replace('.', '[.]')} was "
                           "modified"):
            verify(out, pub)
        path.write_bytes(original)
    assert any("signature valid" in line for line in verify(out, pub))


def test_wheel_license_takes_only_spdx_expressions(tmp_path: Path) -> None:
    def wheel(headers: str) -> Path:
        path = tmp_path / f"w{len(list(tmp_path.iterdir()))}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("w-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\n{headers}\n\n"
                        "License: not a header here\n")
        return path

    assert fetch.wheel_license(wheel("License-Expression: MIT OR Apache-2.0")) == \
        "MIT OR Apache-2.0"
    assert fetch.wheel_license(wheel("License: BSD-3-Clause")) == "BSD-3-Clause"
    assert fetch.wheel_license(wheel("License: The MIT License, see LICENSE.txt")) == ""
    assert fetch.wheel_license(wheel("Name: w")) == ""
