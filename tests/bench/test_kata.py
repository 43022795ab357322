"""bench/kata.py against Kata Containers' Go runtime (kata-containers @7c6ba40c54).

The root-parameter cases are Kata's ``TestGetKernelRootParams`` table and the serialisation
cases its ``TestSerializeParams*``, both in ``src/runtime/virtcontainers/hypervisor_test.go``.
The full cmdlines are built by hand from ``qemu.go`` ``kernelParameters``, ``qemu_amd64.go``
``kernelParams``/``newQemuArch`` and ``qemu_arch_base.go`` (``handleImagePath``, then
``appendConsole``, then ``kernelParamsNonDebug``/``kernelParamsDebug``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.kata import (
    KataConfigError,
    Runtime,
    kernel_parameters,
    machine_argv,
    root_params,
    serialize,
)

EXT4, XFS, EROFS = "ext4", "xfs", "erofs"
NVDIMM, VIRTIO_BLK = "/dev/pmem0p1", "/dev/vda1"
EXT4_FLAGS, EXT4_DAX = "data=ordered,errors=remount-ro ro", "dax,data=ordered,errors=remount-ro ro"
VERITY1 = "root_hash=abc,salt=def,data_blocks=1,data_block_size=4096,hash_block_size=4096"

Params = list[tuple[str, str]]
# rootfstype, expected, disableNvdimm, dax, verityParams, error
ROOT_CASES: list[tuple[str, Params, bool, bool, str, bool]] = [
    (EXT4, [("root", NVDIMM), ("rootflags", EXT4_FLAGS), ("rootfstype", EXT4)],
     False, False, "", False),
    (EXT4, [("root", NVDIMM), ("rootflags", EXT4_DAX), ("rootfstype", EXT4)],
     False, True, "", False),
    (EXT4, [("root", VIRTIO_BLK), ("rootflags", EXT4_FLAGS), ("rootfstype", EXT4)],
     True, False, "", False),
    (XFS, [("root", NVDIMM), ("rootflags", "ro"), ("rootfstype", XFS)], False, False, "", False),
    (XFS, [("root", NVDIMM), ("rootflags", "dax ro"), ("rootfstype", XFS)],
     False, True, "", False),
    (XFS, [("root", VIRTIO_BLK), ("rootflags", "ro"), ("rootfstype", XFS)],
     True, False, "", False),
    (EROFS, [("root", NVDIMM), ("rootflags", "ro"), ("rootfstype", EROFS)],
     False, False, "", False),
    (EROFS, [("root", NVDIMM), ("rootflags", "dax ro"), ("rootfstype", EROFS)],
     False, True, "", False),
    (EROFS, [("root", VIRTIO_BLK), ("rootflags", "ro"), ("rootfstype", EROFS)],
     True, False, "", False),
    # Unsupported rootfs type
    ("foo", [("root", VIRTIO_BLK), ("rootflags", EXT4_FLAGS), ("rootfstype", EXT4)],
     False, False, "", True),
    # Nvdimm does not support DAX
    (EXT4, [("root", VIRTIO_BLK), ("rootflags", EXT4_DAX), ("rootfstype", EXT4)],
     True, True, "", True),
    (EXT4, [("dm-mod.create",
             '"dm-verity,,,ro,0 8 verity 1 /dev/vda1 /dev/vda2 4096 4096 1 0 sha256 abc def"'),
            ("root", "/dev/dm-0"), ("rootflags", EXT4_FLAGS), ("rootfstype", EXT4)],
     True, False, VERITY1, False),
    (EXT4, [], False, False,
     "root_hash=abc,data_blocks=1,data_block_size=4096,hash_block_size=4096", True),
    (EXT4, [], False, False,
     "root_hash=abc,salt=def,data_block_size=4096,hash_block_size=4096", True),
    (EXT4, [], False, False,
     "root_hash=abc,salt=def,data_blocks=foo,data_block_size=4096,hash_block_size=4096", True),
    (EXT4, [], False, False, VERITY1 + ",badfield", True),
]


@pytest.mark.parametrize(("rootfstype", "expected", "disable_nvdimm", "dax", "verity", "error"),
                         ROOT_CASES)
def test_root_params_match_kata_table(rootfstype: str, expected: Params, disable_nvdimm: bool,
                                      dax: bool, verity: str, error: bool) -> None:
    if error:  # Kata asserts only the error; its expected value is not looked at
        with pytest.raises(KataConfigError):
            root_params(rootfstype, disable_nvdimm, dax, verity)
    else:
        assert root_params(rootfstype, disable_nvdimm, dax, verity) == expected


@pytest.mark.parametrize("blocks", ["\u0661", "\u00b2", str(2**64)])
def test_root_params_reject_what_go_parseuint_rejects(blocks: str) -> None:
    # hypervisor.go ParseKernelVerityParams: strconv.ParseUint(value, 10, 64) takes ASCII
    # digits that fit in a uint64 and nothing else
    verity = VERITY1.replace("data_blocks=1", f"data_blocks={blocks}")
    with pytest.raises(KataConfigError):
        root_params(EROFS, True, False, verity)


@pytest.mark.parametrize(("params", "delim", "expected"), [
    ([("", "")], "", []),  # NoParamNoValue
    ([("", "value1")], "", ["value1"]),  # NoParam
    ([("param1", "")], "", ["param1"]),  # NoValue
    ([("param1", "value1")], "", ["param1", "value1"]),  # NoDelim
    ([("param1", "value1")], "=", ["param1=value1"]),  # TestSerializeParams
])
def test_serialize_matches_kata(params: Params, delim: str, expected: list[str]) -> None:
    assert serialize(params, delim) == expected


NV = Runtime(image=True, rootfs_type="erofs", disable_image_nvdimm=True,
             kernel_verity_params="root_hash=abc,salt=def,data_blocks=2,data_block_size=4096,"
                                  "hash_block_size=4096",
             kernel_params=("cgroup_no_v1=all", "pci=realloc", "pci=nocrs", "pci=assign-busses"),
             max_vcpus=4)
AMD64 = ("tsc=reliable no_timer_check rcupdate.rcu_expedited=1 i8042.direct=1 i8042.dumbkbd=1 "
         "i8042.nopnp=1 i8042.noaux=1 noreplace-smp reboot=k cryptomgr.notests net.ifnames=0 "
         "pci=lastbus=0")
NV_ROOT = ('dm-mod.create="dm-verity,,,ro,0 16 verity 1 /dev/vda1 /dev/vda2 4096 4096 2 0 '
           'sha256 abc def" root=/dev/dm-0 rootflags=ro rootfstype=erofs')
CONSOLE = "console=hvc0 console=hvc1"
# katautils.SetKernelParams (config.go) puts these before the configuration's kernel_params:
# systemd's words when an image boots (create.go), scsi_mod.scan=none for virtio-scsi (the
# Makefile's DEFBLOCKSTORAGEDRIVER_QEMU), the agent's launch_process_timeout (NVIDIA: 15)
SYSTEMD = ("systemd.unit=kata-containers.target systemd.mask=systemd-networkd.service "
           "systemd.mask=systemd-networkd.socket")
AGENT = "scsi_mod.scan=none agent.launch_process_timeout=15"
NV_TAIL = f"{SYSTEMD} {AGENT} cgroup_no_v1=all pci=realloc pci=nocrs pci=assign-busses"


def test_nvidia_image_cmdline_is_kata_order() -> None:
    assert kernel_parameters(NV) == (
        f"{AMD64} {NV_ROOT} {CONSOLE} quiet systemd.show_status=false panic=1 nr_cpus=4 "
        f"selinux=0 {NV_TAIL}")


def test_debug_swaps_quiet_for_the_debug_and_systemd_words() -> None:
    assert kernel_parameters(replace(NV, debug=True)) == (
        f"{AMD64} {NV_ROOT} {CONSOLE} debug systemd.show_status=true systemd.log_level=debug "
        f"panic=1 nr_cpus=4 selinux=0 {NV_TAIL}")


@pytest.mark.parametrize(("debug", "words"), [(False, "quiet"), (True, "debug")])
def test_initrd_has_no_root_and_no_systemd_words(debug: bool, words: str) -> None:
    rt = replace(NV, image=False, debug=debug)
    assert kernel_parameters(rt) == (
        f"{AMD64} {CONSOLE} {words} panic=1 nr_cpus=4 selinux=0 {NV_TAIL[len(SYSTEMD) + 1:]}")


def test_agent_debug_and_block_driver_words() -> None:
    rt = replace(NV, agent_debug=True, block_device_driver="virtio-blk",
                 launch_process_timeout=0)
    assert kernel_parameters(rt).endswith(f"selinux=0 {SYSTEMD} agent.log=debug cgroup_no_v1=all "
                                          "pci=realloc pci=nocrs pci=assign-busses")


@pytest.mark.parametrize(("verity", "word"), [
    ("root_hash=x,salt=y", "kata.extension.gpu.verity_params=root_hash=x,salt=y"),
    ("", "kata.extension.gpu.verity_params"),  # emitted even unmeasured; Serialize drops '='
])
def test_extension_verity_params_come_last(verity: str, word: str) -> None:
    line = kernel_parameters(replace(NV, extensions=(("gpu", verity),)))
    assert line == f"{kernel_parameters(NV)} {word}"


def test_confidential_guest_has_no_nr_cpus() -> None:
    words = kernel_parameters(replace(NV, confidential=True)).split(" ")
    assert not [w for w in words if w.startswith("nr_cpus")]
    assert words[words.index("panic=1") + 1] == "selinux=0"


def test_confidential_guest_forces_virtio_blk_root() -> None:
    # qemu_amd64.go newQemuArch: a confidential guest sets disableNvdimm = true before
    # handleImagePath, so the root is /dev/vda1 without dax whatever the configuration says
    rt = replace(NV, confidential=True, disable_image_nvdimm=False, kernel_verity_params="")
    assert f"root={VIRTIO_BLK} rootflags=ro rootfstype=erofs {CONSOLE}" in kernel_parameters(rt)


def test_nvdimm_image_root_uses_amd64_dax() -> None:
    rt = replace(NV, disable_image_nvdimm=False, kernel_verity_params="")
    assert f"{AMD64} root={NVDIMM} rootflags=dax ro rootfstype=erofs {CONSOLE} " in (
        kernel_parameters(rt))


def test_guest_selinux_enabled_gives_selinux_1() -> None:
    assert " selinux=1 " in kernel_parameters(replace(NV, disable_guest_selinux=False))


def test_kernel_param_with_empty_value_serialises_as_the_key() -> None:
    # DeserializeParams splits "foo=" into {foo, ""}; SerializeParams then writes "foo"
    assert kernel_parameters(replace(NV, kernel_params=("foo=",))).endswith(f" {AGENT} foo")


def test_bad_verity_params_raise() -> None:
    with pytest.raises(KataConfigError):
        kernel_parameters(replace(NV, kernel_verity_params="root_hash=abc,salt=def"))


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    assert len(argv) % 2 == 0
    return list(zip(argv[::2], argv[1::2], strict=True))


def _fields(spec: str) -> dict[str, str]:
    """``driver,k=v,...`` as {"": driver, k: v}."""
    head, *rest = spec.split(",")
    return {"": head, **dict(f.split("=", 1) for f in rest)}


def _devices(argv: list[str], driver: str) -> list[dict[str, str]]:
    specs = [_fields(v) for k, v in _pairs(argv) if k == "-device"]
    return [d for d in specs if d[""] == driver]


CHARDEV = "socket,path=/run/console.sock,server=on,wait=off"
GPUS = ["virtio-gpu-pci,id=gpu0", "virtio-gpu-pci,id=gpu1"]


def test_machine_argv_builds_kata_q35() -> None:
    argv = machine_argv("/fw/OVMF.fd", "/img/disk.raw", 3, CHARDEV, GPUS)
    pairs = _pairs(argv)
    assert pairs[:2] == [("-M", "q35"), ("-bios", "/fw/OVMF.fd")]
    assert len(_devices(argv, "virtio-serial-pci")) == 1
    (chardev,) = [v for k, v in pairs if k == "-chardev"]
    assert chardev.startswith(CHARDEV + ",")
    (console,) = _devices(argv, "virtconsole")
    assert console["chardev"] == _fields(chardev)["id"]
    (drive,) = [_fields("," + v) for k, v in pairs if k == "-drive"]
    assert drive["file"] == "/img/disk.raw" and drive["readonly"] == "on"
    (blk,) = _devices(argv, "virtio-blk-pci")
    assert blk["drive"] == drive["id"]
    ports = _devices(argv, "pcie-root-port")
    assert [p["id"] for p in ports] == ["rp0", "rp1", "rp2"]
    assert all(p["bus"] == "pcie.0" for p in ports)
    assert len({(p["chassis"], p["slot"]) for p in ports}) == 3
    plugged = _devices(argv, "virtio-gpu-pci")
    assert [(d["id"], d["bus"]) for d in plugged] == [("gpu0", "rp0"), ("gpu1", "rp1")]
    devs = [v for k, v in pairs if k == "-device"]
    last_port = max(i for i, v in enumerate(devs) if v.startswith("pcie-root-port,"))
    assert devs.index(f"{GPUS[0]},bus=rp0") > last_port  # a bus exists before its device


def test_machine_argv_without_disk_has_no_drive() -> None:
    argv = machine_argv("/fw/OVMF.fd", None, 2, CHARDEV)
    assert "-drive" not in argv
    assert not _devices(argv, "virtio-blk-pci")
    assert len(_devices(argv, "pcie-root-port")) == 2


def test_machine_argv_fills_every_root_port() -> None:
    argv = machine_argv("/fw/OVMF.fd", None, 2, CHARDEV, GPUS)
    assert [d["bus"] for d in _devices(argv, "virtio-gpu-pci")] == ["rp0", "rp1"]


def test_machine_argv_rejects_more_devices_than_root_ports() -> None:
    with pytest.raises(KataConfigError):
        machine_argv("/fw/OVMF.fd", "/img/disk.raw", 1, CHARDEV, GPUS)
