"""The CDI spec: content, schema validity (tests/fixtures/cdi/schema.json), atomic write."""

from __future__ import annotations

import copy
import json
import pathlib

import jsonschema
import pytest

from guestinit import cdi, devices, pci
from guestinit.stages import BootError
from tests.fixtures.accel import fake_nvidia_proc, gpu_bdfs, make_boot
from tests.fixtures.umockdev_tree import load, materialize

SCHEMA = json.loads((pathlib.Path(__file__).parents[1] / "fixtures/cdi/schema.json").read_text())


def gpus(n: int, uuid: bool = True) -> list[dict[str, object]]:
    return [{"index": i, "bdf": f"0000:{0x18 + i:02x}:00.0",
             "uuid": f"GPU-{i:08x}-aaaa-bbbb-cccc-dddddddddddd" if uuid else "",
             "model": "NVIDIA H100", "node": {"path": f"/dev/nvidia{i}", "major": 195, "minor": i}}
            for i in range(n)]


CONTROL = [{"path": "/dev/nvidiactl", "major": 195, "minor": 255},
           {"path": "/dev/nvidia-uvm", "major": 510, "minor": 0},
           {"path": "/dev/nvidia-uvm-tools", "major": 510, "minor": 1}]


def test_spec_has_index_uuid_and_all_devices() -> None:
    spec = cdi.plan_spec(gpus(2), CONTROL, gid=44)
    jsonschema.validate(spec, SCHEMA)
    assert spec["cdiVersion"] == "0.7.0" and spec["kind"] == "nvidia.com/gpu"
    devs = {d["name"]: d["containerEdits"]["deviceNodes"] for d in spec["devices"]}  # type: ignore[union-attr,index]
    assert list(devs) == ["0", "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd", "1",
                          "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd", "all"]
    assert devs["1"] == [{"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1,
                          "permissions": "rw"}]
    assert [n["path"] for n in devs["all"]] == ["/dev/nvidia0", "/dev/nvidia1"]
    common = spec["containerEdits"]
    assert isinstance(common, dict)
    assert [n["path"] for n in common["deviceNodes"]] == [c["path"] for c in CONTROL]
    assert common["additionalGids"] == [44]


def test_no_uuid_no_uuid_device_and_no_gid_no_additional_gids() -> None:
    spec = cdi.plan_spec(gpus(1, uuid=False), CONTROL)
    jsonschema.validate(spec, SCHEMA)
    assert [d["name"] for d in spec["devices"]] == ["0", "all"]  # type: ignore[index,union-attr]
    assert "additionalGids" not in spec["containerEdits"]  # type: ignore[operator]


@pytest.mark.parametrize("breakage", ["kind", "node", "extra"])
def test_the_schema_rejects_broken_specs(breakage: str) -> None:
    spec = copy.deepcopy(cdi.plan_spec(gpus(1), CONTROL))
    if breakage == "kind":
        spec["kind"] = "gpu"
    elif breakage == "node":
        spec["devices"][0]["containerEdits"]["deviceNodes"][0]["path"] = "dev/nvidia0"  # type: ignore[index]
    else:
        spec["containerEdit"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(spec, SCHEMA)


def test_run_cdi_after_devices_writes_a_valid_spec(tmp_path: pathlib.Path) -> None:
    materialize(load("h100x8_nvswitch4"), tmp_path)
    fake_nvidia_proc(tmp_path, gpu_bdfs(8))
    (tmp_path / "dev").mkdir()
    boot = make_boot(tmp_path, conf="device.gid=44")
    pci.run_discover(boot)
    boot.facts["modules"] = ["nvidia", "nvidia_uvm"]
    devices.run_devices(boot)
    cdi.run_cdi(boot)
    path = tmp_path / "var/run/cdi/nvidia.json"
    spec = json.loads(path.read_text())
    jsonschema.validate(spec, SCHEMA)
    assert len(spec["devices"]) == 8 * 2 + 1
    assert spec["devices"][-1]["name"] == "all"
    assert {n["path"] for n in spec["containerEdits"]["deviceNodes"]} == {
        "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}
    assert boot.facts["cdi"] == "/var/run/cdi/nvidia.json"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not (tmp_path / "var/run/cdi/nvidia.json.tmp").exists()


def test_run_cdi_is_a_no_op_without_gpus(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tmp_path)
    boot.facts.update(mode="nvl4", inventory=[], gpus=[])
    cdi.run_cdi(boot)
    assert "cdi" not in boot.facts and not (tmp_path / "var").exists()


def test_unwritable_spec_dir_is_named(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tmp_path)
    boot.facts.update(mode="gpu", gpus=gpus(1), device_nodes={"control": CONTROL})
    (tmp_path / "var").write_text("a file where the directory should be")
    with pytest.raises(BootError, match=r"write CDI spec .*/var/run/cdi/nvidia.json"):
        cdi.run_cdi(boot)
