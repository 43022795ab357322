"""The module loader: plans from modules.dep, real Debian .modinfo, finit_module through effects."""

from __future__ import annotations

import errno
import pathlib

import pytest

from guestinit import kmod, modinfo
from guestinit.boot import Boot
from guestinit.effects import DryEffects
from guestinit.nvidia import modules
from guestinit.stages import BootError
from guestinit.values import Mode
from tests.fixtures.accel import accelerators, gpu_bdfs, make_boot
from tests.fixtures.kernel import extract_modules

REL = "6.1.0-test-amd64"

DIAMOND = """\
kernel/a.ko: kernel/b.ko kernel/c.ko kernel/d.ko
kernel/b.ko: kernel/d.ko
kernel/c.ko: kernel/d.ko
kernel/d.ko:
"""


def names(steps: list[kmod.LoadStep]) -> list[str]:
    return [s.name for s in steps]


def test_diamond_loads_the_shared_dependency_once_first() -> None:
    index = kmod.parse_modules_dep(DIAMOND, "/lib/modules/x")
    order = names(kmod.plan_load(["a"], index))
    assert order[0] == "d" and order[-1] == "a" and sorted(order) == ["a", "b", "c", "d"]
    assert kmod.plan_load(["a"], index)[-1].path == "/lib/modules/x/kernel/a.ko"


def test_names_with_dashes_match_underscored_files() -> None:
    index = kmod.parse_modules_dep("kernel/nvidia-uvm.ko: kernel/nvidia.ko\nkernel/nvidia.ko:\n")
    assert names(kmod.plan_load(["nvidia-uvm"], index)) == ["nvidia", "nvidia_uvm"]


def test_softdeps_pre_before_post_after_missing_ones_skipped() -> None:
    index = kmod.parse_modules_dep("k/x.ko:\nk/pre1.ko:\nk/post1.ko: k/x.ko\n")
    kmod.parse_softdeps("# comment\nsoftdep x pre: pre1 ghost post: post1\n", index)
    assert names(kmod.plan_load(["x"], index)) == ["pre1", "x", "post1"]


def test_softdep_on_an_alias_loads_the_first_module_carrying_it() -> None:
    """erofs needs libcrc32c, whose ``softdep pre: crc32c`` names an alias; the kernel's
    own request_module("crypto-crc32c") would find no modprobe in the guest."""
    index = kmod.parse_modules_dep("k/erofs.ko: k/libcrc32c.ko\nk/libcrc32c.ko:\n"
                                   "k/crc32c_generic.ko:\nk/crc32c-intel.ko:\n")
    kmod.parse_softdeps("softdep libcrc32c pre: crc32c\n", index)
    kmod.parse_aliases("alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\n"
                       "alias crc32c crc32c_intel\nalias pci:v*d* crc32c_intel\n", index)
    steps = kmod.plan_load(["erofs"], index)
    assert names(steps) == ["crc32c_generic", "libcrc32c", "erofs"]
    assert steps[0].why == "soft dependency of libcrc32c (alias crc32c)"
    assert "pci:v*d*" not in index.aliases
    index.aliases["crc32c"] = ["ghost"]  # an alias nothing in the image carries: skipped
    assert names(kmod.plan_load(["erofs"], index)) == ["libcrc32c", "erofs"]


def test_cycle_is_an_error_naming_the_chain() -> None:
    index = kmod.parse_modules_dep("k/a.ko: k/b.ko\nk/b.ko: k/c.ko\nk/c.ko: k/a.ko\n", "", "dep")
    with pytest.raises(kmod.ModuleError, match=r"dependency cycle a -> b -> c -> a in dep"):
        kmod.plan_load(["a"], index)


def test_missing_module_and_missing_dependency_name_who_needs_them() -> None:
    index = kmod.parse_modules_dep("k/a.ko: k/gone.ko\n", "", "modules.dep")
    with pytest.raises(kmod.ModuleError, match=r"module nope \(requested\): not in modules.dep"):
        kmod.plan_load(["nope"], index)
    with pytest.raises(kmod.ModuleError, match=r"module gone \(needed by a\)"):
        kmod.plan_load(["a"], index)


def test_loaded_and_builtin_modules_are_marked_not_reloaded() -> None:
    index = kmod.parse_modules_dep("k/a.ko: k/b.ko\nk/b.ko:\n")
    steps = kmod.plan_load(["a", "virtio_ring"], index, loaded={"b", "virtio_ring"})
    assert [(s.name, s.already) for s in steps] == [("b", True), ("a", False),
                                                     ("virtio_ring", True)]


def test_bad_modules_dep_line_is_named() -> None:
    with pytest.raises(kmod.ModuleError, match=r"modules\.dep:2"):
        kmod.parse_modules_dep("k/a.ko:\nno colon here\n")


def test_parameters_from_config_cmdline_and_auto() -> None:
    params = kmod.parse_params(["nvidia.NVreg_DeviceFileMode=0660", "nvidia-uvm.uvm_x=1",
                                "nvidia.NVreg_OpenRmEnableUnsupportedGpus=1"])
    assert params == {"nvidia": ["NVreg_DeviceFileMode=0660",
                                 "NVreg_OpenRmEnableUnsupportedGpus=1"],
                      "nvidia_uvm": ["uvm_x=1"]}
    with pytest.raises(kmod.ModuleError, match=r"'NVreg_X=1': expected module\.param=value"):
        kmod.parse_params(["NVreg_X=1"])
    assert kmod.cmdline_params("quiet nvidia.NVreg_X=1 vsock.y=2 guestinit.mode=gpu",
                               ["nvidia"]) == ["nvidia.NVreg_X=1"]


# -- a fake module tree with vermagic strings, loaded through DryEffects ------------------


def fake_ko(path: pathlib.Path, release: str = REL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF" + b"\0" * 60 + b"\0license=GPL\0vermagic=" + release.encode()
                     + b" SMP preempt mod_unload modversions \0name=x\0")


def module_tree(root: pathlib.Path, dep: str, release: str = REL) -> pathlib.Path:
    base = root / "lib/modules" / REL
    for line in dep.splitlines():
        fake_ko(base / line.partition(":")[0], release)
    (base / "modules.dep").write_text(dep)
    return base


GPU_DEP = """\
kernel/vsock.ko:
kernel/vmw_vsock_virtio_transport.ko: kernel/vsock.ko
kernel/nvidia.ko:
kernel/nvidia-uvm.ko: kernel/nvidia.ko
"""
EARLY = "guestinit.modules=vsock,vmw-vsock-virtio-transport"


def finits(boot_effects: object) -> list[tuple[str, str]]:
    assert isinstance(boot_effects, DryEffects)
    return [(pathlib.Path(str(c[1])).name, str(c[2])) for c in boot_effects.calls
            if c[0] == "finit_module"]


def run_stage(boot: Boot) -> None:
    """The modules stage as the boot script runs it: NVIDIA's plan, then the loader."""
    plan = modules.plan(boot.facts, boot.config()) if boot.facts.inventory else ([], [])
    kmod.run_modules(boot, *plan, kernel_release=REL)


def test_cpu_mode_loads_only_the_early_modules(tmp_path: pathlib.Path) -> None:
    module_tree(tmp_path, GPU_DEP)
    boot = make_boot(tmp_path, cmdline=EARLY)
    run_stage(boot)
    assert finits(boot.effects) == [("vsock.ko", ""), ("vmw_vsock_virtio_transport.ko", "")]
    assert boot.facts.modules == ["vsock", "vmw_vsock_virtio_transport"]
    assert [s[0] for s in boot.timeline.spans] == ["module:vsock",
                                                   "module:vmw_vsock_virtio_transport"]


def test_load_early_works_before_the_config_stage(tmp_path: pathlib.Path) -> None:
    module_tree(tmp_path, GPU_DEP)
    boot = make_boot(tmp_path)
    boot.cfg = None  # the failure path may run before the config stage
    assert kmod.load_early(boot, ["vmw-vsock-virtio-transport"], kernel_release=REL) == [
        "vsock", "vmw_vsock_virtio_transport"]


def test_cpu_mode_without_modules_touches_nothing(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tmp_path)  # no module tree at all
    run_stage(boot)
    assert boot.facts.modules == [] and finits(boot.effects) == []


def test_gpu_mode_sets_firmware_path_then_loads_with_parameters(tmp_path: pathlib.Path) -> None:
    module_tree(tmp_path, GPU_DEP)
    param = tmp_path / kmod.FIRMWARE_PARAM
    param.parent.mkdir(parents=True)
    param.write_text("\n")
    (tmp_path / "sys/module/vsock").mkdir()  # already loaded
    boot = make_boot(tmp_path, cmdline=EARLY + " nvidia.NVreg_EnableGpuFirmware=1",
                     conf="module.params=nvidia-uvm.uvm_perf_prefetch_enable=0\ndevice.mode=0660")
    boot.facts.mode, boot.facts.inventory = Mode.GPU, accelerators("gpu", gpu_bdfs(1))
    run_stage(boot)
    assert isinstance(boot.effects, DryEffects)
    writes = [c for c in boot.effects.calls if c[0] == "write"]
    assert writes == [("write", str(param), "/lib/firmware")]
    assert boot.effects.calls.index(writes[0]) < boot.effects.calls.index(
        next(c for c in boot.effects.calls if "nvidia.ko" in str(c[1])))
    assert finits(boot.effects) == [
        ("vmw_vsock_virtio_transport.ko", ""),
        ("nvidia.ko", "NVreg_DeviceFileMode=0660 NVreg_DeviceFileGID=0 NVreg_NvLinkDisable=1 "
                      "NVreg_EnableGpuFirmware=1"),
        ("nvidia-uvm.ko", "uvm_perf_prefetch_enable=0"),
    ]
    assert boot.facts.modules == ["vsock (already loaded)", "vmw_vsock_virtio_transport",
                                     "nvidia", "nvidia_uvm"]


class VermagicChecking(DryEffects):
    """Refuses a module built for another kernel with ENOEXEC, as the kernel does."""

    def finit_module(self, path: str, params: str = "") -> None:
        super().finit_module(path, params)
        if modinfo.read_vermagic(path).split()[0] != REL:
            raise OSError(errno.ENOEXEC, "Exec format error")


def test_vermagic_mismatch_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    module_tree(tmp_path, GPU_DEP, release="5.10.0-old-amd64")
    boot = make_boot(tmp_path, cmdline="guestinit.modules=vsock", effects=VermagicChecking())
    with pytest.raises(BootError) as err:
        run_stage(boot)
    assert err.value.stage == "modules"
    assert f"module vsock: built for kernel 5.10.0-old-amd64, running {REL}" in err.value.reason


def test_modules_are_not_read_before_the_kernel_refuses_one(tmp_path: pathlib.Path) -> None:
    # the happy path leaves the vermagic check to the kernel: a module whose vermagic
    # would fail our check loads when the kernel takes it (nothing read it first)
    module_tree(tmp_path, GPU_DEP, release="5.10.0-old-amd64")
    boot = make_boot(tmp_path, cmdline="guestinit.modules=vsock")
    run_stage(boot)
    assert boot.facts.modules == ["vsock"]


def test_kernel_refusal_names_module_errno_and_params(tmp_path: pathlib.Path) -> None:
    module_tree(tmp_path, GPU_DEP)

    class Refusing(DryEffects):
        def finit_module(self, path: str, params: str = "") -> None:
            super().finit_module(path, params)
            if "nvidia-uvm" in path:
                raise OSError(errno.ENOENT, "finit_module: No such file or directory")
            if "nvidia.ko" in path:
                raise OSError(errno.EEXIST, "File exists")

    boot = make_boot(tmp_path, effects=Refusing())
    boot.facts.mode, boot.facts.inventory = Mode.GPU, accelerators("gpu", gpu_bdfs(2))
    with pytest.raises(BootError, match=r"finit_module nvidia_uvm: ENOENT \(No such file or "
                                        r"directory\): unknown symbol or missing firmware"):
        run_stage(boot)


def test_missing_module_fails_the_stage_naming_it(tmp_path: pathlib.Path) -> None:
    module_tree(tmp_path, GPU_DEP)
    boot = make_boot(tmp_path, cmdline="guestinit.modules=virtio_console")
    with pytest.raises(BootError, match=r"module virtio_console \(requested\): not in .*"
                                        r"modules.dep"):
        run_stage(boot)


def test_present_modules_need_no_module_tree(tmp_path: pathlib.Path) -> None:
    for name in ("vsock", "nvidia", "nvidia_uvm"):
        (tmp_path / "sys/module" / name).mkdir(parents=True)
    boot = make_boot(tmp_path, cmdline="guestinit.modules=vsock")
    boot.facts.mode, boot.facts.inventory = Mode.GPU, accelerators("gpu", gpu_bdfs(1))
    run_stage(boot)
    assert finits(boot.effects) == []
    assert boot.facts.modules == ["vsock (already loaded)", "nvidia (already loaded)",
                                     "nvidia_uvm (already loaded)"]


def test_missing_tree_is_named(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tmp_path, cmdline="guestinit.modules=vsock")
    with pytest.raises(BootError, match=f"no module tree at .*/lib/modules/{REL}"):
        run_stage(boot)


# -- real Debian modules -------------------------------------------------------------------

REAL = [
    "kernel/net/vmw_vsock/vsock.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
    "kernel/drivers/char/virtio_console.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/char/ipmi/ipmi_msghandler.ko",
    "kernel/drivers/char/ipmi/ipmi_devintf.ko",
]


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, str]:
    root = tmp_path_factory.mktemp("debian")
    return root, extract_modules(root, REAL)


def test_real_modinfo_has_depends_vermagic_softdep(debian_root: tuple[pathlib.Path, str]) -> None:
    root, release = debian_root
    base = root / "lib/modules" / release
    transport = modinfo.read_modinfo(str(base / REAL[2]))
    assert modinfo.dependencies(transport) == ["virtio", "vmw_vsock_virtio_transport_common",
                                               "virtio_ring", "vsock"]
    assert transport["vermagic"][0].split()[0] == release
    assert modinfo.read_vermagic(str(base / REAL[2])) == transport["vermagic"][0]
    assert modinfo.read_modinfo(str(base / REAL[6]))["softdep"] == ["post: ipmi_devintf"]


def test_real_modules_plan_from_generated_index(debian_root: tuple[pathlib.Path, str]) -> None:
    root, release = debian_root
    base = root / "lib/modules" / release
    index = kmod.load_index(str(base), release)  # no modules.dep: generated from .modinfo
    assert "generated from .modinfo" in index.source
    order = names(kmod.plan_load(["vsock", "vmw_vsock_virtio_transport", "virtio_console"],
                                 index))
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_console")
    assert order.index("vsock") < order.index("vmw_vsock_virtio_transport_common") \
        < order.index("vmw_vsock_virtio_transport")
    assert len(order) == len(set(order)) == 6
    assert names(kmod.plan_load(["ipmi_msghandler"], index)) == ["ipmi_msghandler",
                                                                 "ipmi_devintf"]
    for step in kmod.plan_load(["vmw_vsock_virtio_transport"], index):
        modinfo.check_vermagic(step.name, step.path, release)
    with pytest.raises(modinfo.ModinfoError, match=f"built for kernel {release}, running 6.9.9"):
        modinfo.check_vermagic("vsock", str(base / REAL[0]), "6.9.9")


def test_real_modules_load_through_effects_in_order(debian_root: tuple[pathlib.Path, str]) -> None:
    root, release = debian_root
    boot = make_boot(root, cmdline="guestinit.modules=vsock,vmw_vsock_virtio_transport,"
                                   "virtio_console")
    kmod.run_modules(boot, kernel_release=release)
    loaded = [n.removesuffix(".ko").replace("-", "_") for n, _ in finits(boot.effects)]
    assert len(loaded) == 6 and boot.facts.modules[0] in ("virtio_ring", "vsock")  # type: ignore[index]
    # whatever order the threads of one wave finished in, each module came after its needs
    index = kmod.load_index(str(root / "lib/modules" / release), release)
    for name in loaded:
        for dep in index.deps[name]:
            assert loaded.index(dep) < loaded.index(name), (dep, name, loaded)
    spans = {n for n, _, _ in boot.timeline.snapshot()}
    assert {f"module:{n}" for n in loaded} <= spans


def test_waves_group_modules_that_need_nothing_from_each_other() -> None:
    index = kmod.parse_modules_dep(
        "k/vsock.ko:\nk/virtio_ring.ko:\nk/virtio.ko: k/virtio_ring.ko\n"
        "k/console.ko: k/virtio.ko k/virtio_ring.ko\n"
        "k/common.ko: k/vsock.ko k/virtio.ko k/virtio_ring.ko\n"
        "k/transport.ko: k/common.ko k/vsock.ko\nk/button.ko:\nk/evdev.ko:\n"
        "k/post.ko:\n")
    kmod.parse_softdeps("softdep button post: post\n", index)
    plan = kmod.plan_load(["transport", "console", "button", "evdev"], index)
    waves = [[s.name for s in wave] for wave in kmod.waves(plan)]
    assert waves == [["vsock", "virtio_ring", "button", "evdev"], ["virtio", "post"],
                     ["common", "console"], ["transport"]]


class RefuseB(DryEffects):
    def finit_module(self, path: str, params: str = "") -> None:
        super().finit_module(path, params)
        if path.endswith("/b.ko"):
            raise OSError(errno.ENOENT, "No such file or directory")


def test_a_failure_in_a_concurrent_wave_names_the_module(tmp_path: pathlib.Path) -> None:
    module_tree(tmp_path, "kernel/a.ko:\nkernel/b.ko:\nkernel/c.ko: kernel/a.ko kernel/b.ko\n")
    boot = make_boot(tmp_path)
    boot.effects = RefuseB()
    with pytest.raises(BootError, match=r"finit_module b: ENOENT .*kernel/b\.ko"):
        kmod.load_modules(boot, ["c"], kernel_release=REL)
    loaded = [pathlib.Path(str(c[1])).name for c in boot.effects.calls]
    assert sorted(loaded) == ["a.ko", "b.ko"]  # a and b went together; c never tried


class ThreadRecording(DryEffects):
    def finit_module(self, path: str, params: str = "") -> None:
        import threading

        super().finit_module(path, params)
        self.calls[-1] = (*self.calls[-1], threading.get_ident())


@pytest.mark.parametrize("parallel", [False, True])
def test_one_cpu_loads_in_plan_order_on_the_calling_thread(tmp_path: pathlib.Path,
                                                           parallel: bool) -> None:
    import threading

    module_tree(tmp_path, "kernel/a.ko:\nkernel/b.ko:\nkernel/c.ko: kernel/a.ko kernel/b.ko\n")
    boot = make_boot(tmp_path)
    boot.effects = ThreadRecording()
    index = kmod.load_index(str(tmp_path / "lib" / "modules" / REL), REL)
    steps = kmod.plan_load(["c"], index)
    assert kmod.load_steps(boot, steps, REL, parallel=parallel) == ["a", "b", "c"]
    threads = [c[-1] for c in boot.effects.calls]
    here = threading.get_ident()
    if parallel:  # a and b (one wave) each on a thread of their own, c after both
        assert here not in threads[:2] and threads[2] == here
    else:
        assert [pathlib.Path(str(c[1])).name for c in boot.effects.calls] == [
            "a.ko", "b.ko", "c.ko"]
        assert threads == [here] * 3
