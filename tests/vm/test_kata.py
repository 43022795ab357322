"""Kata's machine (q35 + OVMF, virtio-pci) booting the kata profile as Kata's runtime
would: one disk (p1 erofs, p2 verity tree), the cmdline Kata writes from the image's
configuration.toml, no initrd, frames read from the console (hvc0), where Kata logs
guest output. A copy of the disk with one byte changed in p1 never reaches ready.
OVMF under TCG costs ~3 s per boot before the kernel runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import image
from bench.boot import BootOptions, BootResult, boot
from guestinit.wire import FrameType
from rootfs import kata, proc
from tests.vm.conftest import REPO, _builder, agent, explain

pytestmark = pytest.mark.vm

TIMEOUT = 120.0  # OVMF under TCG, then the kernel
# the kata profile's agent.ready is vsock:1024: the stand-in listens where kata-agent does
AGENT = agent("--vsock-listen", "1024")


def boot_kata(img: image.Image, workdir: Path, append: str) -> BootResult:
    return boot(img, BootOptions(timeout=TIMEOUT, workdir=str(workdir), append=append),
                progress=None)


def tampered_copy(disk: Path, copy: Path) -> Path:
    """``copy`` of a Kata disk with one bit changed in p1's erofs superblock, which the
    kernel reads first when it mounts the file system."""
    shutil.copyfile(disk, copy)
    at = kata.partitions(copy)[0][0] + 1024
    with copy.open("r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x01]))
    return copy


def console_text(res: BootResult) -> str:
    with open(res.console_log, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def test_kata_disk_boots_to_ready_on_q35_ovmf_with_katas_cmdline(kata_image: str,
                                                                  tmp_path: Path) -> None:
    img = image.load_kata(kata_image)
    assert img.initramfs is None and img.disks == [f"{kata_image}/{kata.DISK}"]
    params = kata.parse_verity_params((Path(kata_image) / kata.ROOT_HASH).read_text())
    assert params is not None
    assert (f'dm-mod.create="dm-verity,,,ro,0 {params.data_blocks * 8} verity 1 /dev/vda1 '
            f'/dev/vda2 4096 4096 {params.data_blocks} 0 sha256 {params.root_hash} '
            f'{params.salt}"') in img.cmdline
    res = boot_kata(img, tmp_path, AGENT)
    assert res.ok, explain(res)
    assert "-bios" in res.argv and "q35" in res.argv and "guestinit.report" not in res.cmdline
    ready = res.first(FrameType.READY)
    assert ready is not None
    # every frame came over the console (hvc0): what Kata's console log holds
    assert console_text(res).count("GUESTINIT-FRAME ") == len(res.frames)
    inventory = ready.fields["inventory"]
    assert isinstance(inventory, dict)
    ids = {d["id"] for d in inventory["pci"]}  # type: ignore[index, union-attr]
    assert "8086:29c0" in ids  # q35's host bridge
    assert "1b36:000c" in ids  # Kata's pcie-root-ports
    assert ready.fields.get("modules") == []  # the whole boot path is built in
    assert res.first(FrameType.SHUTDOWN) is not None and res.qemu_rc == 0, explain(res)


def test_a_disk_with_one_byte_changed_in_p1_never_reaches_ready(kata_image: str,
                                                               tmp_path: Path) -> None:
    tampered = tampered_copy(Path(kata_image) / kata.DISK, tmp_path / "tampered.img")
    res = boot_kata(image.load_kata(kata_image, disk=str(tampered)), tmp_path / "w", AGENT)
    assert not res.ok and res.first(FrameType.READY) is None
    assert "is corrupted" in res.reason and "Kernel panic" in res.reason, res.reason


def test_the_initrd_variant_boots_to_ready(kata_image: str, tmp_path: Path) -> None:
    img = image.load_kata(kata_image, initrd=True)
    assert img.initramfs is not None and img.disks == []
    assert "dm-mod.create" not in img.cmdline and "root=" not in img.cmdline
    res = boot_kata(img, tmp_path, AGENT)
    assert res.ok, explain(res)


def test_verify_checks_the_kata_disk_against_root_hash_txt(kata_image: str,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(kata_image, out)
    said = proc.run([_builder(), "verify", "--allow-unsigned", str(out)]).stdout
    assert f"{kata.DISK} p1 matches its p2 hash tree with {kata.ROOT_HASH}" in said
    with (out / kata.DISK).open("r+b") as fh:
        fh.seek(kata.MIB + 4096)
        fh.write(b"x")
    failed = proc.run([_builder(), "verify", "--allow-unsigned", str(out)], check=False)
    assert failed.returncode == 1 and kata.DISK in failed.stderr


@pytest.fixture(scope="session")
def kata_gpu_images(kata_image: str, tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, str]:
    """nvidia-gpu-kata and nvidia-servicevm-kata with the stand-in bundle, its modules
    built against the kata kernel's module build dir (as a user builds NVIDIA's)."""
    from tests.fixtures import standin_bundle
    from tests.fixtures.standin_bundle import GPU_ID, NVSWITCH_ID

    said = proc.run([_builder(), "kernel", "--profile", "kata", "--module-build-dir", "-q"],
                    timeout=3600, cwd=str(REPO)).stdout
    build_dir = Path(said.strip().splitlines()[-1])
    release = (Path(kata_image) / "kernel-release.txt").read_text().strip()
    tmp = tmp_path_factory.mktemp("kata-gpu")
    try:
        bundle = standin_bundle.build(tmp / "bundle", release, build_dir=build_dir)
    except standin_bundle.StandinError as exc:
        pytest.fail(str(exc))
    out = {}
    for name, profile, standin, more in (
            ("gpu", "nvidia-gpu-kata", f"standin.gpu={GPU_ID}", []),
            ("servicevm", "nvidia-servicevm-kata", f"standin.nvswitch={NVSWITCH_ID}", []),
            # composable: the driver bundle in the gpu extension image, beside the base
            ("gpu-ext", "nvidia-gpu-kata", f"standin.gpu={GPU_ID}", ["--extension", "gpu"])):
        out[name] = str(tmp / name)
        proc.run([_builder(), "image", profile, "--driver", str(bundle), "--out", out[name],
                  "--append-config", standin, "--append-config", "agent=none", "-q",
                  "--standins", *more],
                 timeout=1800, cwd=str(REPO))
    return out


def test_gpu_image_in_kata_format_with_stand_in_gpus_on_root_ports(
        kata_gpu_images: dict[str, str], tmp_path: Path) -> None:
    from bench.qemu import BarDevice

    res = boot(image.load_kata(kata_gpu_images["gpu"]),
               BootOptions(timeout=TIMEOUT, workdir=str(tmp_path),
                           bar=BarDevice(64 << 20, count=2)), progress=None)
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None and ready.fields["mode"] == "gpu"
    devices = ready.fields["inventory"]["devices"]  # type: ignore[index]
    # cold-plugged behind Kata's root ports: buses 1 and 2, not the root complex
    assert [(d["kind"], d["bdf"]) for d in devices] == [  # type: ignore[index]
        ("gpu", "0000:01:00.0"), ("gpu", "0000:02:00.0")]
    assert ready.fields["modules"] == ["nvidia", "nvidia_uvm"]


def test_service_vm_in_kata_format_reaches_ready(kata_gpu_images: dict[str, str],
                                                 tmp_path: Path) -> None:
    from bench.qemu import BarDevice

    res = boot(image.load_kata(kata_gpu_images["servicevm"]),
               BootOptions(timeout=TIMEOUT, workdir=str(tmp_path),
                           bar=BarDevice(0, edu=4)), progress=None)
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None and ready.fields["mode"] == "nvl4"
    daemons = [d["name"] for d in ready.fields["daemons"]]  # type: ignore[index, union-attr]
    assert "nv-fabricmanager" in daemons, daemons


def test_a_rebuild_of_the_kata_image_is_byte_identical(kata_image: str,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "kata"
    proc.run([_builder(), "image", "kata", "--standins", "--out", str(out), "-q"], timeout=3600,
             cwd=str(REPO))
    for name in (kata.DISK, kata.ROOT_HASH, kata.CONFIGURATION, kata.CONFIGURATION_INITRD,
                 "vmlinuz", "initramfs.img", "manifest.json", "sbom.spdx.json"):
        assert (out / name).read_bytes() == (Path(kata_image) / name).read_bytes(), name


def test_the_init_lifts_the_kmsg_rate_limit_kata_leaves_on(kata_image: str,
                                                          tmp_path: Path) -> None:
    """Kata passes no printk.devkmsg=on: without the init's own setting the kernel keeps
    10 lines per 5 s of what the init writes to /dev/kmsg and says "callbacks suppressed"."""
    img = image.load_kata(kata_image)
    assert "printk.devkmsg" not in img.cmdline
    res = boot_kata(img, tmp_path, f"{AGENT} guestinit.log=debug loglevel=7")
    assert res.ok, explain(res)
    text = console_text(res)
    ours = [line for line in text.splitlines() if "guestinit: " in line]
    assert len(ours) > 10, text[-3000:]  # most of them within a second of each other
    assert "callbacks suppressed" not in text


def test_base_plus_gpu_extension_runs_the_gpu_stages_from_the_extension(
        kata_gpu_images: dict[str, str], tmp_path: Path) -> None:
    from bench.qemu import BarDevice

    img = image.load_kata(kata_gpu_images["gpu-ext"])
    assert [n for n, _ in img.extensions] == ["gpu"]
    assert "kata.extension.gpu.verity_params=root_hash=" in img.cmdline
    res = boot(img, BootOptions(timeout=TIMEOUT, workdir=str(tmp_path),
                                bar=BarDevice(64 << 20, count=2)), progress=None)
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None and ready.fields["mode"] == "gpu"
    ext = ready.fields["extensions"]
    assert isinstance(ext, dict)
    assert [(m["name"], m["verity"]) for m in ext["mounted"]] == [("gpu", True)]
    assert str(ext["usr_overlay"]).startswith("lowerdir=/run/kata-extensions/gpu/usr:")
    # the modules, persistenced and the CDI spec came from the extension: the base has none
    assert ready.fields["modules"] == ["nvidia", "nvidia_uvm"]
    daemons = [d["name"] for d in ready.fields["daemons"]]  # type: ignore[index, union-attr]
    assert "nvidia-persistenced" in daemons


def test_a_changed_extension_or_a_missing_one_fails_the_boot_naming_it(
        kata_gpu_images: dict[str, str], tmp_path: Path) -> None:
    import dataclasses

    directory = kata_gpu_images["gpu-ext"]
    tampered = tampered_copy(Path(directory) / "extension-gpu.img",
                             tmp_path / "extension-gpu.img")
    img = image.load_kata(directory, extensions={"gpu": str(tampered)})
    res = boot(img, BootOptions(timeout=TIMEOUT, workdir=str(tmp_path / "a")), progress=None)
    failed = res.first(FrameType.FAILED)
    assert failed is not None and failed.fields["stage"] == "extensions", explain(res)
    assert "extension gpu: mount erofs" in str(failed.fields["reason"])
    assert "does not match its hash tree" in str(failed.fields["reason"])
    # named on the cmdline, not attached
    absent = dataclasses.replace(image.load_kata(directory), extensions=())
    res = boot(absent, BootOptions(timeout=TIMEOUT, workdir=str(tmp_path / "b")), progress=None)
    failed = res.first(FrameType.FAILED)
    assert failed is not None, explain(res)
    assert "no disk with serial extension-gpu" in str(failed.fields["reason"])


def test_verify_checks_the_base_and_the_extension_image(kata_gpu_images: dict[str, str]) -> None:
    said = proc.run([_builder(), "verify", "--allow-unsigned", kata_gpu_images["gpu-ext"]]).stdout
    assert "extension-gpu.img p1 matches its p2 hash tree with root_hash_extension-gpu.txt" \
        in said
    assert "kata-containers.img p1 matches its p2 hash tree" in said
    assert "initramfs entries match" in said  # the bundle's files are not in the base
