"""Kata Containers' guest image contract: the disk, its verity parameters, the drop-in.

Facts read from kata-containers @7c6ba40c54 (write our own code, same bytes on disk):

- ``tools/osbuilder/image-builder/image_builder.sh``: ``create_erofs_rootfs_image`` sizes
  the disk as ``(erofs + 1 MiB) / 1 MiB + 1 + rootfs_start`` MiB, scaled by 100/99 when
  measured; ``create_disk`` writes an msdos label with ``parted -a optimal``: p1 from
  1 MiB to 99% of the disk (boot flag), p2 from there to the last sector; NVIDIA images
  set ``SKIP_DAX_HEADER=yes`` (``kata-deploy-binaries.sh`` ``install_image_nvidia_gpu``),
  so there is no DAX header in front. ``setup_verity`` runs ``veritysetup format
  --no-superblock p1 p2`` over the whole p1 and ``build_kernel_verity_params`` writes
  ``root_hash=H,salt=S,data_blocks=N,data_block_size=B,hash_block_size=B`` as one line.
- ``src/runtime/virtcontainers/hypervisor.go`` ``ParseKernelVerityParams`` reads that
  line back (``parse_verity_params`` here follows its rules and messages).
- ``src/runtime/config/configuration-qemu-nvidia-gpu.toml.in`` and ``src/runtime/Makefile``
  (``*_NV``): the ``[hypervisor.qemu]`` keys ``kernel``, ``image``/``initrd``,
  ``rootfs_type``, ``disable_image_nvdimm``, ``kernel_params``, ``kernel_verity_params``,
  ``firmware``; ``KERNELPARAMS_NV``; ``hypervisor.go`` ``conflictingAssets`` refuses
  image and initrd together. Drop-ins live in ``config.d/`` next to the configuration
  (``src/runtime/pkg/katautils/config.go``).

Unlike Kata's builder, the salt is derived from the erofs image (Kata's is random) and
the disk identifier from the salt: the same tree gives the same disk, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from rootfs.pack import verity_field
from rootfs.steps import BuildError, run

MIB = 1 << 20
SECTOR = 512
BLOCK = 4096  # Kata's erofs block size (image_builder.sh refuses another for erofs)
ROOTFS_START_MIB = 1  # image_builder.sh rootfs_start
DISK = "kata-containers.img"
ROOT_HASH = "root_hash.txt"
CONFIGURATION = "configuration.toml"
CONFIGURATION_INITRD = "configuration-initrd.toml"
# src/runtime/Makefile KERNELPARAMS_NV
KERNEL_PARAMS_NV = ("cgroup_no_v1=all", "pci=realloc", "pci=nocrs", "pci=assign-busses")
# src/runtime/Makefile FIRMWAREPATH_NV on amd64: $(PREFIXDEPS)/share/$(EDK2_NAME)/OVMF.fd
KATA_FIRMWARE = "/opt/kata/share/ovmf/OVMF.fd"
DEFAULT_PREFIX = "/opt/guestinit"
# Kernel options the Kata boot needs built in (no initrd with image =): firmware entry,
# the disk, the console, the verity root. kernel-config/kata.conf says why for each.
BUILTIN = ("CONFIG_EFI_STUB", "CONFIG_PCI", "CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_BLK",
           "CONFIG_VIRTIO_CONSOLE", "CONFIG_MSDOS_PARTITION", "CONFIG_BLK_DEV_DM",
           "CONFIG_DM_INIT", "CONFIG_DM_VERITY", "CONFIG_CRYPTO_SHA256", "CONFIG_EROFS_FS",
           "CONFIG_VSOCKETS", "CONFIG_VIRTIO_VSOCKETS")
VERITY_KEYS = ("root_hash", "salt", "data_blocks", "data_block_size", "hash_block_size")


@dataclass(frozen=True)
class VerityParams:
    root_hash: str
    salt: str
    data_blocks: int
    data_block_size: int
    hash_block_size: int

    def format(self) -> str:
        """The ``kernel_verity_params`` line (image_builder.sh build_kernel_verity_params)."""
        return (f"root_hash={self.root_hash},salt={self.salt},data_blocks={self.data_blocks},"
                f"data_block_size={self.data_block_size},hash_block_size={self.hash_block_size}")


class VerityParamsError(ValueError):
    pass


def parse_verity_params(text: str) -> VerityParams | None:
    """``kernel_verity_params`` as Kata's runtime reads it (``ParseKernelVerityParams``):
    empty is None (no verity); a field without ``=``, a missing or zero field, a block
    size that is no multiple of 512 are errors. Unknown keys are ignored, as there."""
    if not text.strip():
        return None
    values: dict[str, str] = {}
    for field in text.split(","):
        field = field.strip()
        if not field:
            continue
        key, sep, value = field.partition("=")
        if not sep:
            raise VerityParamsError(f"invalid kernel_verity_params entry: {field!r}")
        values[key] = value
    if not values.get("root_hash"):
        raise VerityParamsError("missing kernel_verity_params root_hash")
    numbers = {}
    for name in ("data_blocks", "data_block_size", "hash_block_size"):
        raw = values.get(name, "")
        if not raw:
            raise VerityParamsError(f"missing kernel_verity_params {name}")
        # strconv.ParseUint(value, 10, 64): ASCII digits, below 2**64
        if not (raw.isascii() and raw.isdigit()) or int(raw) >= 1 << 64:
            raise VerityParamsError(f"invalid kernel_verity_params {name} {raw!r}: not an "
                                    "unsigned 64-bit integer")
        numbers[name] = int(raw)
    if not values.get("salt"):
        raise VerityParamsError("missing kernel_verity_params salt")
    for name, n in numbers.items():
        if n == 0:
            raise VerityParamsError(f"invalid kernel_verity_params {name}: must be non-zero")
        if name != "data_blocks" and n % SECTOR:
            raise VerityParamsError(f"invalid kernel_verity_params {name}: must be multiple "
                                    f"of {SECTOR}")
    return VerityParams(values["root_hash"], values["salt"], numbers["data_blocks"],
                        numbers["data_block_size"], numbers["hash_block_size"])


@dataclass(frozen=True)
class Layout:
    """Where p1 and p2 sit in the disk, in bytes."""

    size: int
    p1_start: int
    p1_size: int
    p2_start: int
    p2_size: int


def layout_for(erofs_size: int) -> Layout:
    """The disk for an erofs image of ``erofs_size`` bytes, sized as image_builder.sh does
    (integer MiB arithmetic, the hash partition at 99% rounded down to a MiB)."""
    size_mib = (erofs_size + MIB) // MIB + 1 + ROOTFS_START_MIB
    size_mib = size_mib * 100 // 99 + 1  # MEASURED_ROOTFS: p1 gets only 99%
    hash_start_mib = size_mib * 99 // 100  # awk '{print $1 * 0.99}' | cut -d. -f1
    size = size_mib * MIB
    p1_start = ROOTFS_START_MIB * MIB
    p2_start = hash_start_mib * MIB
    # parted's end "-1s" is the last sector, inclusive
    return Layout(size, p1_start, p2_start - p1_start, p2_start, size - p2_start)


def sfdisk_script(lay: Layout, label_id: int) -> str:
    return ("label: dos\n"
            f"label-id: 0x{label_id:08x}\n"
            "unit: sectors\n\n"
            f"start={lay.p1_start // SECTOR}, size={lay.p1_size // SECTOR}, type=83, "
            "bootable\n"
            f"start={lay.p2_start // SECTOR}, size={lay.p2_size // SECTOR}, type=83\n")


def write_disk(erofs: Path, disk: Path) -> VerityParams:
    """``disk``: msdos label, p1 = ``erofs`` zero-padded to the partition, p2 = the
    dm-verity hash tree of all of p1 without a superblock. Returns the parameters."""
    data = erofs.read_bytes()
    lay = layout_for(len(data))
    salt = hashlib.sha256(b"guestinit-kata-salt\0" + data).hexdigest()
    with tempfile.TemporaryDirectory(prefix="kata-disk-", dir=disk.parent) as tmp:
        p1, p2 = Path(tmp) / "p1", Path(tmp) / "p2"
        p1.write_bytes(data)
        with p1.open("r+b") as fh:
            fh.truncate(lay.p1_size)
        text = run(["veritysetup", "format", "--no-superblock", "--hash=sha256",
                    f"--data-block-size={BLOCK}", f"--hash-block-size={BLOCK}",
                    f"--salt={salt}", p1, p2], what=f"veritysetup format for {disk.name}"
                   ).decode()
        params = VerityParams(verity_field(text, "Root hash"), verity_field(text, "Salt"),
                              int(verity_field(text, "Data blocks")),
                              int(verity_field(text, "Data block size")),
                              int(verity_field(text, "Hash block size")))
        tree = p2.read_bytes()
        if len(tree) > lay.p2_size:
            raise BuildError(f"{disk.name}: the hash tree ({len(tree)} bytes) does not fit "
                             f"the hash partition ({lay.p2_size} bytes)")
        disk.unlink(missing_ok=True)
        with disk.open("wb") as fh:
            fh.truncate(lay.size)
        run(["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe", "never", "-q", disk],
            stdin=sfdisk_script(lay, int(salt[:8], 16)).encode(),
            what=f"sfdisk (msdos label) on {disk.name}")
        with disk.open("r+b") as fh, p1.open("rb") as src:
            fh.seek(lay.p1_start)
            while chunk := src.read(8 * MIB):
                fh.write(chunk)
            fh.seek(lay.p2_start)
            fh.write(tree)
    return params


def write_checked_disk(erofs: Path, disk: Path, root_hash: Path) -> VerityParams:
    """``write_disk``, then its own check (``verify_disk``), then ``root_hash`` (the
    ``kernel_verity_params`` line): a base image or an extension image."""
    params = write_disk(erofs, disk)
    verify_disk(disk, params)
    root_hash.write_text(params.format() + "\n")
    return params


def partitions(disk: Path) -> list[tuple[int, int]]:
    """(start, size) in bytes of each partition of ``disk``, from sfdisk's own reading."""
    out = run(["sfdisk", "--json", disk], what=f"read the partition table of {disk}")
    try:
        table = json.loads(out)["partitiontable"]
        if table.get("label") != "dos":
            raise BuildError(f"{disk}: a {table.get('label')} partition table; Kata's "
                             "image is msdos")
        return [(int(p["start"]) * SECTOR, int(p["size"]) * SECTOR)
                for p in table["partitions"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"{disk}: sfdisk --json gave no partition table: {exc}") from None


def verify_disk(disk: Path, params: VerityParams) -> None:
    """``veritysetup verify --no-superblock`` of p1 against p2 with exactly ``params``."""
    parts = partitions(disk)
    if len(parts) != 2:
        raise BuildError(f"{disk}: {len(parts)} partitions; Kata's image has p1 (erofs) "
                         "and p2 (hash tree)")
    n1 = parts[0][1]
    if params.data_blocks * params.data_block_size > n1:
        raise BuildError(f"{disk}: data_blocks={params.data_blocks} reach past p1 "
                         f"({n1} bytes)")
    with tempfile.TemporaryDirectory(prefix="kata-verify-") as tmp, disk.open("rb") as fh:
        files = []
        for i, (start, size) in enumerate(parts):
            fh.seek(start)
            part = Path(tmp) / f"p{i + 1}"
            part.write_bytes(fh.read(size))
            files.append(part)
        run(["veritysetup", "verify", "--no-superblock", "--hash=sha256",
             f"--data-blocks={params.data_blocks}",
             f"--data-block-size={params.data_block_size}",
             f"--hash-block-size={params.hash_block_size}", f"--salt={params.salt}",
             files[0], files[1], params.root_hash],
            what=f"veritysetup verify of {disk.name} p1 against p2 with {ROOT_HASH}")


# -- configuration.toml ------------------------------------------------------------------

@dataclass(frozen=True)
class Drop:
    """The ``[hypervisor.qemu]`` keys our image sets in Kata's configuration."""

    kernel: str
    image: str | None
    initrd: str | None
    kernel_params: tuple[str, ...]
    kernel_verity_params: str
    firmware: str
    rootfs_type: str = "erofs"
    disable_image_nvdimm: bool = True
    # [[hypervisor.qemu.guest_extension_images]]: (name, path, verity_params)
    extensions: tuple[tuple[str, str, str], ...] = ()


def toml_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string for this alphabet


def render_configuration(drop: Drop, profile: str, extra: str = "") -> str:
    if drop.image and drop.initrd:
        raise BuildError("configuration.toml: image and initrd together; Kata refuses that "
                         "(hypervisor.go conflictingAssets): pick one")
    lines = [f"# guestinit {profile}: a drop-in for Kata's configuration-qemu-nvidia-gpu*.toml",
             "# (copy to config.d/ next to it, or merge these keys into its [hypervisor.qemu];",
             "# docs/kata.md). Paths assume the image directory is installed at the prefix "
             "below.",
             "[hypervisor.qemu]", f"kernel = {toml_str(drop.kernel)}"]
    if drop.image:
        lines += [f"image = {toml_str(drop.image)}",
                  f"rootfs_type = {toml_str(drop.rootfs_type)}",
                  f"disable_image_nvdimm = {'true' if drop.disable_image_nvdimm else 'false'}"]
    if drop.initrd:
        lines.append(f"initrd = {toml_str(drop.initrd)}")
    lines += [f"kernel_params = {toml_str(' '.join(drop.kernel_params))}",
              f"kernel_verity_params = {toml_str(drop.kernel_verity_params)}",
              f"firmware = {toml_str(drop.firmware)}"]
    return "\n".join(lines) + "\n" + extra


def read_configuration(path: Path) -> Drop:
    """A drop-in as Kata would read our keys; ConfigError-like BuildError naming the key."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise BuildError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BuildError(f"{path}: not valid TOML: {exc}") from None
    qemu = data.get("hypervisor", {}).get("qemu")
    if not isinstance(qemu, dict):
        raise BuildError(f"{path}: no [hypervisor.qemu] table")

    def text(key: str, required: bool = False) -> str:
        value = qemu.get(key, "")
        if not isinstance(value, str) or (required and not value):
            raise BuildError(f"{path}: key hypervisor.qemu.{key}: expected a "
                             f"{'non-empty ' if required else ''}string, got {value!r}")
        return value

    image, initrd = text("image") or None, text("initrd") or None
    if image and initrd:
        raise BuildError(f"{path}: sets both image and initrd; Kata refuses that "
                         "(hypervisor.go conflictingAssets: cannot set both image and "
                         "initrd at the same time)")
    if not image and not initrd:
        raise BuildError(f"{path}: sets neither image nor initrd")
    nvdimm = qemu.get("disable_image_nvdimm", False)
    if not isinstance(nvdimm, bool):
        raise BuildError(f"{path}: key hypervisor.qemu.disable_image_nvdimm: expected true "
                         f"or false, got {nvdimm!r}")
    verity = text("kernel_verity_params")
    try:
        parse_verity_params(verity)
    except VerityParamsError as exc:
        raise BuildError(f"{path}: key hypervisor.qemu.kernel_verity_params: {exc}") from None
    extensions = []
    entries = qemu.get("guest_extension_images", [])
    if not isinstance(entries, list):
        raise BuildError(f"{path}: key hypervisor.qemu.guest_extension_images: expected an "
                         "array of tables ([[hypervisor.qemu.guest_extension_images]])")
    for i, entry in enumerate(entries):
        fields = [entry.get(k, "") if isinstance(entry, dict) else None
                  for k in ("name", "path", "verity_params")]
        if not all(isinstance(f, str) for f in fields) or not fields[0]:
            raise BuildError(f"{path}: guest_extension_images entry {i}: expected name, path "
                             f"and verity_params strings, got {entry!r}")
        try:
            parse_verity_params(str(fields[2]))
        except VerityParamsError as exc:
            raise BuildError(f"{path}: guest_extension_images {fields[0]!r}: invalid "
                             f"verity_params: {exc}") from None
        extensions.append((str(fields[0]), str(fields[1]), str(fields[2])))
    return Drop(kernel=text("kernel", True), image=image, initrd=initrd,
                kernel_params=tuple(text("kernel_params").split()),
                kernel_verity_params=verity, firmware=text("firmware"),
                rootfs_type=text("rootfs_type") or "ext4", disable_image_nvdimm=nvdimm,
                extensions=tuple(extensions))


# -- the outputs of --format kata / kata-initrd ----------------------------------------------

def check_kernel(config: dict[str, str], built: bool, profile: str) -> None:
    """BuildError unless the kernel can boot Kata's way: built from fragments, with every
    option of BUILTIN ``=y`` (each missing one named)."""
    if not built:
        raise BuildError(f"profile {profile}: --format kata needs a kernel built from "
                         "kernel-config fragments (kernel.build = true, e.g. profile kata): "
                         "Kata boots image = with no initrd, and Debian's kernel has "
                         "virtio_pci, virtio_blk, dm-verity and erofs as modules")
    missing = [f"{o} ({'module' if config.get(o) == 'm' else 'not set'})"
               for o in BUILTIN if config.get(o) != "y"]
    if missing:
        raise BuildError(f"profile {profile}: the kernel lacks built-ins Kata's boot needs: "
                         f"{', '.join(missing)}; add them to a fragment "
                         "(kernel-config/kata.conf has them all)")


def write_outputs(out: Path, erofs: Path | None, initramfs: Path | None, profile: str,
                  prefix: str, extra_params: tuple[str, ...] = (),
                  extra_toml: str = "") -> dict[str, Path]:
    """The Kata disk (from ``erofs``) and/or the initrd drop-in (for ``initramfs``) in
    ``out``; ``extra_params`` follow NVIDIA's kernel_params. Returns the files written."""
    base = f"{prefix.rstrip('/')}/{profile}"
    params = (*KERNEL_PARAMS_NV, *extra_params)
    written: dict[str, Path] = {}
    if erofs is not None:
        verity = write_checked_disk(erofs, out / DISK, out / ROOT_HASH)
        drop = Drop(kernel=f"{base}/vmlinuz", image=f"{base}/{DISK}", initrd=None,
                    kernel_params=params, kernel_verity_params=verity.format(),
                    firmware=KATA_FIRMWARE)
        (out / CONFIGURATION).write_text(render_configuration(drop, profile, extra_toml))
        written.update({n: out / n for n in (DISK, ROOT_HASH, CONFIGURATION)})
    if initramfs is not None:
        drop = Drop(kernel=f"{base}/vmlinuz", image=None, initrd=f"{base}/{initramfs.name}",
                    kernel_params=params, kernel_verity_params="",
                    firmware=KATA_FIRMWARE)
        (out / CONFIGURATION_INITRD).write_text(render_configuration(drop, profile,
                                                                      extra_toml))
        written[CONFIGURATION_INITRD] = out / CONFIGURATION_INITRD
    return written
