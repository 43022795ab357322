"""The CDI specs: cdiVersion rules, content, validity against the upstream schema
(tests/fixtures/cdi/upstream) and our structural checks, the boot stage."""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import jsonschema
import pytest

import guestinit.__main__ as boot_script
from guestinit import discover
from guestinit.boot import AssignedGpu, Boot
from guestinit.nvidia import cdi, devices
from guestinit.nvidia.driver_files import Library, Userspace
from guestinit.stages import BootError
from guestinit.testing import nvidia_bundle
from guestinit.values import Mode
from tests.fixtures.accel import (
    CAPS_MAJOR,
    IMEX_MAJOR,
    cap_minor,
    fake_nvidia_proc,
    gpu_bdfs,
    kmsg_text,
    make_boot,
)
from tests.fixtures.cdi_schema import UPSTREAM_VALIDATOR, structural_problems, validate
from tests.fixtures.umockdev_tree import load, materialize

LIB = "/usr/lib/x86_64-linux-gnu"


def gpus(n: int, uuid: bool = True) -> list[dict[str, object]]:
    return [{"index": i, "bdf": f"0000:{0x18 + i:02x}:00.0",
             "uuid": f"GPU-{i:08x}-aaaa-bbbb-cccc-dddddddddddd" if uuid else "",
             "model": "NVIDIA H100",
             "node": {"path": f"/dev/nvidia{i}", "major": 195, "minor": i, "mode": 0o666}}
            for i in range(n)]


CONTROL = [{"path": "/dev/nvidiactl", "major": 195, "minor": 255, "mode": 0o666},
           {"path": "/dev/nvidia-uvm", "major": 510, "minor": 0, "mode": 0o666}]


def base(**extra: object) -> Any:
    return {"cdiVersion": "0.3.0", "kind": "vendor.com/dev",
            "devices": [{"name": "dev0", "containerEdits": {"env": ["A=1"]}}], **extra}


def device_edit(key: str, value: object) -> Any:
    spec = base()
    spec["devices"][0]["containerEdits"][key] = value
    return spec


@pytest.mark.parametrize(("spec", "version"), [
    (base(), "0.3.0"),
    (base(containerEdits={"mounts": [{"hostPath": "/a", "containerPath": "/a"}]}), "0.3.0"),
    (base(containerEdits={"mounts": [{"hostPath": "/a", "containerPath": "/a", "type": ""}]}),
     "0.3.0"),  # an empty type is no type, as in Go
    (base(containerEdits={"mounts": [{"hostPath": "/a", "containerPath": "/a",
                                      "type": "bind"}]}), "0.4.0"),
    (device_edit("mounts", [{"hostPath": "/a", "containerPath": "/a", "type": "tmpfs"}]),
     "0.4.0"),
    (base(devices=[{"name": "0", "containerEdits": {"env": ["A=1"]}}]), "0.5.0"),
    (base(devices=[{"name": "_x", "containerEdits": {"env": ["A=1"]}}]), "0.5.0"),
    (base(devices=[{"name": "éa", "containerEdits": {"env": ["A=1"]}}]), "0.5.0"),
    (device_edit("deviceNodes", [{"path": "/dev/x", "hostPath": "/dev/y"}]), "0.5.0"),
    (base(containerEdits={"deviceNodes": [{"path": "/dev/x", "hostPath": "/dev/y"}]}), "0.5.0"),
    (base(annotations={"a": "b"}), "0.6.0"),
    (base(annotations={}), "0.3.0"),
    (base(devices=[{"name": "d", "annotations": {"a": "b"},
                    "containerEdits": {"env": ["A=1"]}}]), "0.6.0"),
    (base(kind="vendor.com/dev.sub"), "0.6.0"),
    (base(kind="vendor.com/dev"), "0.3.0"),  # dots in the vendor part were always allowed
    (base(containerEdits={"additionalGids": [44]}), "0.7.0"),
    (base(containerEdits={"additionalGids": []}), "0.3.0"),
    (device_edit("additionalGids", [44]), "0.7.0"),
    (base(containerEdits={"intelRdt": {"closID": "x"}}), "0.7.0"),
    (device_edit("intelRdt", {}), "0.7.0"),  # present at all, as Go's non-nil pointer
    (base(devices=[{"name": "0", "containerEdits": {"additionalGids": [1]}}],
          annotations={"a": "b"}), "0.7.0"),  # the highest rule wins
])
def test_minimum_version_follows_cdi_rules(spec: dict[str, object], version: str) -> None:
    assert cdi.minimum_version(spec) == version


def test_one_gpu_spec_has_index_uuid_all_and_needs_0_5_0() -> None:
    spec: Any = cdi.plan_spec(gpus(1), CONTROL)
    validate(spec)
    assert spec["cdiVersion"] == "0.5.0" == cdi.minimum_version(spec)  # device "0"
    assert spec["kind"] == "nvidia.com/gpu"
    devs = {d["name"]: d["containerEdits"]["deviceNodes"] for d in spec["devices"]}
    assert list(devs) == ["0", "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd", "all"]
    assert devs["0"] == [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0,
                          "fileMode": 0o666, "permissions": "rw"}]
    common = spec["containerEdits"]
    assert isinstance(common, dict)
    assert common["env"] == ["NVIDIA_VISIBLE_DEVICES=void"]
    assert [n["path"] for n in common["deviceNodes"]] == ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert not {"additionalGids", "mounts", "hooks"} & set(common)


def test_a_group_adds_additional_gids_and_needs_0_7_0() -> None:
    spec: Any = cdi.plan_spec(gpus(2, uuid=False), CONTROL, gid=44)
    validate(spec)
    assert spec["cdiVersion"] == "0.7.0"
    assert spec["containerEdits"]["additionalGids"] == [44]
    assert [d["name"] for d in spec["devices"]] == ["0", "1", "all"]


def test_mig_instances_become_devices_with_their_caps() -> None:
    caps = [{"path": f"/dev/nvidia-caps/nvidia-cap{m}", "major": CAPS_MAJOR, "minor": m,
             "mode": 0o444} for m in (12, 13)]
    listed = gpus(2)
    listed[1]["mig"] = [{"gi": 1, "nodes": caps}]
    spec: Any = cdi.plan_spec(listed, CONTROL)
    validate(spec)
    devs = {d["name"]: d["containerEdits"]["deviceNodes"] for d in spec["devices"]}
    assert list(devs)[-2:] == ["1:1", "all"]
    assert [(n["path"], n["fileMode"]) for n in devs["1:1"]] == [
        ("/dev/nvidia1", 0o666), ("/dev/nvidia-caps/nvidia-cap12", 0o444),
        ("/dev/nvidia-caps/nvidia-cap13", 0o444)]
    assert [n["path"] for n in devs["all"]] == [
        "/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia-caps/nvidia-cap12",
        "/dev/nvidia-caps/nvidia-cap13"]


def test_userspace_becomes_mounts_and_hooks() -> None:
    files = Userspace("550.54.15", LIB,
                      [Library(f"{LIB}/libcuda.so.550.54.15", "libcuda.so.1")],
                      binaries=["/usr/bin/nvidia-smi"],
                      sockets=["/run/nvidia-persistenced/socket"],
                      hook="/usr/bin/nvidia-cdi-hook")
    spec: Any = cdi.plan_spec(gpus(1), CONTROL, files=files)
    validate(spec)
    assert spec["cdiVersion"] == "0.5.0"  # mounts without "type" need nothing newer
    common = spec["containerEdits"]
    assert isinstance(common, dict)
    assert [m["containerPath"] for m in common["mounts"]] == [
        f"{LIB}/libcuda.so.550.54.15", "/usr/bin/nvidia-smi", "/run/nvidia-persistenced/socket"]
    assert [h["args"][1] for h in common["hooks"]] == ["create-symlinks", "update-ldcache"]


def test_imex_spec_one_device_per_channel() -> None:
    channels = [{"path": f"/dev/nvidia-caps-imex-channels/channel{n}", "major": IMEX_MAJOR,
                 "minor": n, "mode": 0o666} for n in range(3)]
    spec: Any = cdi.plan_imex_spec(channels)
    validate(spec)
    assert spec["kind"] == "nvidia.com/imex-channel" and spec["cdiVersion"] == "0.5.0"
    assert "containerEdits" not in spec
    assert [d["name"] for d in spec["devices"]] == ["0", "1", "2"]
    assert spec["devices"][2]["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidia-caps-imex-channels/channel2", "type": "c", "major": IMEX_MAJOR,
         "minor": 2, "fileMode": 0o666, "permissions": "rw"}]
    with_gid: Any = cdi.plan_imex_spec(channels, gid=44)
    validate(with_gid)
    assert with_gid["cdiVersion"] == "0.7.0"


@pytest.mark.parametrize("breakage", ["no devices", "no edits", "path type", "major type",
                                      "mount", "hook"])
def test_the_upstream_schema_rejects_broken_specs(breakage: str) -> None:
    spec: Any = copy.deepcopy(cdi.plan_spec(gpus(1), CONTROL))
    dev = spec["devices"][0]
    if breakage == "no devices":
        del spec["devices"]
    elif breakage == "no edits":
        del dev["containerEdits"]
    elif breakage == "path type":  # found only through defs.json: the registry is used
        dev["containerEdits"]["deviceNodes"][0]["path"] = 0
    elif breakage == "major type":
        dev["containerEdits"]["deviceNodes"][0]["major"] = "195"
    elif breakage == "mount":  # in a device: this schema.json has no spec-wide edits
        dev["containerEdits"]["mounts"] = [{"hostPath": "/x"}]
    else:
        dev["containerEdits"]["hooks"] = [{"hookName": "createContainer"}]
    with pytest.raises(jsonschema.ValidationError):
        UPSTREAM_VALIDATOR.validate(spec)


@pytest.mark.parametrize(("breakage", "problem"), [
    ("extra", "unknown key containerEdit"),
    ("kind", "kind 'gpu' is not vendor.com/class"),
    ("version", "cdiVersion 0.3.0 is below what it uses (0.5.0)"),
    ("gids", "additionalGids is not a list of uint32"),
    ("fileMode", "fileMode '0666' is not a permission integer"),
    ("relative", "device node path 'dev/nvidia0' is not absolute"),
    ("hookName", "hook name 'createcontainer'"),
    ("common", "containerEdits: mount paths of {'hostPath': '/x'} are not absolute"),
    ("major", "containerEdits: device node major '195' is not an integer"),
])
def test_structural_checks_catch_what_the_old_schema_cannot(breakage: str, problem: str) -> None:
    spec: Any = copy.deepcopy(cdi.plan_spec(gpus(1), CONTROL))
    node = spec["devices"][0]["containerEdits"]["deviceNodes"][0]
    common = spec["containerEdits"]
    assert isinstance(common, dict)
    if breakage == "extra":
        spec["containerEdit"] = {}
    elif breakage == "kind":
        spec["kind"] = "gpu"
    elif breakage == "version":
        spec["cdiVersion"] = "0.3.0"
    elif breakage == "gids":
        common["additionalGids"] = [-1]
    elif breakage == "fileMode":
        node["fileMode"] = "0666"
    elif breakage == "relative":
        node["path"] = "dev/nvidia0"
    elif breakage == "common":  # spec-wide edits: the vendored schema.json does not list them
        common["mounts"] = [{"hostPath": "/x"}]
    elif breakage == "major":
        common["deviceNodes"][0]["major"] = "195"
    else:
        common["hooks"] = [{"hookName": "createcontainer", "path": "/bin/true"}]
    UPSTREAM_VALIDATOR.validate(spec)  # the vendored schema lets each of these through
    assert any(problem in p for p in structural_problems(spec)), structural_problems(spec)


def gpu_root(root: pathlib.Path, topology: str, count: int, conf: str = "",
             bundle: bool = True, **proc: Any) -> Boot:
    materialize(load(topology), root)
    fake_nvidia_proc(root, gpu_bdfs(count), **proc)
    (root / "dev").mkdir(exist_ok=True)
    if bundle:
        nvidia_bundle.install(root)
    boot = make_boot(root, conf=conf)
    discover.run_discover(boot)
    boot.facts.modules = ["nvidia", "nvidia_uvm"]
    devices.run_devices(boot)
    return boot


def read_spec(root: pathlib.Path, name: str = "nvidia.json") -> Any:
    spec = json.loads((root / "var/run/cdi" / name).read_text())
    assert isinstance(spec, dict)
    validate(spec)
    return spec


def test_run_cdi_on_eight_gpus_with_the_standin_bundle(tmp_path: pathlib.Path) -> None:
    boot = gpu_root(tmp_path, "h100x8_nvswitch4", 8, conf="device.gid=44")
    cdi.run_cdi(boot)
    spec = read_spec(tmp_path)
    assert spec["cdiVersion"] == "0.7.0"
    assert len(spec["devices"]) == 8 * 2 + 1 and spec["devices"][-1]["name"] == "all"
    common = spec["containerEdits"]
    assert isinstance(common, dict)
    assert [n["path"] for n in common["deviceNodes"]] == ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert common["additionalGids"] == [44]
    libs = [f"{LIB}/{n}.so.550.54.15" for n in sorted(nvidia_bundle.LIBRARIES)]
    # the bundle has nvidia-smi and nvidia-persistenced, not debugdump or the MPS pair
    assert [m["hostPath"] for m in common["mounts"]] == [
        *libs, "/usr/bin/nvidia-smi", "/usr/bin/nvidia-persistenced"]
    assert all(m["options"] == ["ro", "nosuid", "nodev", "bind"] and "type" not in m
               and m["hostPath"] == m["containerPath"] for m in common["mounts"])
    assert common["hooks"] == [
        {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
         "args": ["nvidia-cdi-hook", "create-symlinks",
                  "--link", f"libcuda.so.1::{LIB}/libcuda.so",
                  "--link", f"libcuda.so.550.54.15::{LIB}/libcuda.so.1",
                  "--link", f"libnvidia-ml.so.550.54.15::{LIB}/libnvidia-ml.so.1",
                  "--link", f"libnvidia-ptxjitcompiler.so.550.54.15::{LIB}/"
                            "libnvidia-ptxjitcompiler.so.1"]},
        {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
         "args": ["nvidia-cdi-hook", "update-ldcache", "--folder", LIB]}]
    assert boot.facts.cdi == ["/var/run/cdi/nvidia.json"]
    assert not (tmp_path / "var/run/cdi/nvidia-imex.json").exists()
    path = tmp_path / "var/run/cdi/nvidia.json"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not (tmp_path / "var/run/cdi/nvidia.json.tmp").exists()
    assert "cdiVersion 0.7.0" in kmsg_text(tmp_path) and "<4>" not in kmsg_text(tmp_path)


def test_run_cdi_with_mig_names_instances_that_have_a_compute_instance(
        tmp_path: pathlib.Path) -> None:
    boot = gpu_root(tmp_path, "h100x1", 1, caps=True)
    cdi.run_cdi(boot)
    spec = read_spec(tmp_path)
    devs = {d["name"]: d["containerEdits"]["deviceNodes"] for d in spec["devices"]}
    # gi1 and gi2 have ci0; gi3 has no compute instance, so it is no MIG device
    assert list(devs) == ["0", "GPU-00000000-1111-2222-3333-444455556666", "0:1", "0:2", "all"]
    assert [(n["minor"], n["fileMode"]) for n in devs["0:2"]] == [
        (0, 0o666), (cap_minor(0, 2), 0o444), (cap_minor(0, 2, 0), 0o444)]
    assert [n["minor"] for n in devs["all"]] == [
        0, cap_minor(0, 1), cap_minor(0, 1, 0), cap_minor(0, 2), cap_minor(0, 2, 0)]
    assert spec["cdiVersion"] == "0.5.0"


def test_run_cdi_writes_the_imex_spec_when_channels_are_asked_for(
        tmp_path: pathlib.Path) -> None:
    boot = gpu_root(tmp_path, "h100x1", 1, conf="imex.channels=2", imex=4)
    cdi.run_cdi(boot)
    imex = read_spec(tmp_path, "nvidia-imex.json")
    assert imex["kind"] == "nvidia.com/imex-channel"
    assert [d["name"] for d in imex["devices"]] == ["0", "1"]
    assert boot.facts.cdi == ["/var/run/cdi/nvidia.json", "/var/run/cdi/nvidia-imex.json"]
    read_spec(tmp_path)


def test_no_hook_binary_no_hooks_and_one_warning(tmp_path: pathlib.Path) -> None:
    boot = gpu_root(tmp_path, "h100x1", 1)
    (tmp_path / nvidia_bundle.CDI_HOOK).unlink()
    cdi.run_cdi(boot)
    spec = read_spec(tmp_path)
    assert "hooks" not in spec["containerEdits"]
    assert len(spec["containerEdits"]["mounts"]) == 5
    warnings = [line for line in kmsg_text(tmp_path).splitlines() if line.startswith("<4>")]
    assert len(warnings) == 1 and "/usr/bin/nvidia-cdi-hook is not in the image" in warnings[0]


def test_without_a_driver_version_no_libraries_are_mounted(tmp_path: pathlib.Path) -> None:
    boot = gpu_root(tmp_path, "h100x1", 1, version=None)
    cdi.run_cdi(boot)
    mounts = read_spec(tmp_path)["containerEdits"]["mounts"]
    assert [m["hostPath"] for m in mounts] == [
        "/usr/bin/nvidia-smi", "/usr/bin/nvidia-persistenced"]
    assert "no driver version in /proc/driver/nvidia/version" in kmsg_text(tmp_path)


def test_the_cdi_stage_is_a_no_op_without_gpus(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tmp_path, cmdline="guestinit.smi.srs=1")
    boot.facts.mode = Mode.NVL4
    boot_script.run_cdi(boot)  # the boot script's gate: a spec describes GPUs
    assert boot.facts.cdi == [] and not (tmp_path / "var").exists()
    assert boot.timeline.spans == []  # and no nvidia-smi -srs either


def test_unwritable_spec_dir_is_named(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tmp_path)
    boot.facts.mode = Mode.GPU
    boot.facts.gpus = [AssignedGpu(int(str(g["index"])), str(g["bdf"]), str(g["uuid"]),
                                   str(g["model"]), 0, g["node"], [])  # type: ignore[arg-type]
                       for g in gpus(1)]
    boot.facts.device_nodes = {"control": CONTROL}
    (tmp_path / "var").write_text("a file where the directory should be")
    with pytest.raises(BootError, match=r"write CDI spec .*/var/run/cdi/nvidia.json"):
        cdi.run_cdi(boot)


def test_features_table_says_why_for_what_is_left_out() -> None:
    table = cdi.features()
    names = [name for name, _, _ in table]
    assert len(names) == len(set(names))
    produced = {name for name, done, _ in table if done}
    assert {"MIG devices", "IMEX channels", "library mounts", "hook update-ldcache"} <= produced
    left_out = {name: why for name, done, why in table if not done}
    assert set(left_out) >= {"hook enable-cuda-compat", "hook chmod, DRI nodes"}
    assert all(len(why) > 20 for why in left_out.values())


def test_the_docs_feature_table_is_features() -> None:
    doc = (pathlib.Path(__file__).resolve().parents[3] / "docs/guest.md").read_text()
    for name, ok, how in cdi.features():
        assert f"  | {name} | {'✓' if ok else '✗'} | {how} |\n" in doc, name
